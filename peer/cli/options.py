"""What several commands share: which run (``--spec`` or ``--run``), and loading the spec."""

from __future__ import annotations

from typing import Optional, Type

import click

from protocol.spec import RunSpec, SpecError, load_spec


def load_spec_option(path, error: Type[click.ClickException] = click.ClickException) -> Optional[RunSpec]:
    """The spec file given with ``--spec`` (None without one); a bad file is ``error``."""
    if path is None:
        return None
    try:
        return load_spec(path)
    except SpecError as err:
        raise error(str(err)) from None


def spec_or_run(spec_path, run_id, *, run_first: bool = False,
                error: Type[click.ClickException] = click.ClickException) -> Optional[RunSpec]:
    """Exactly one of ``--spec FILE`` (loaded here) and ``--run RUN_ID`` (the spec comes from the
    DHT later, checked against ``--spec-digest``). A peer usually names a spec file, an
    observer a run: the message lists the usual one first."""
    if (spec_path is None) == (run_id is None):
        options = ["--spec SPEC.toml", "--run RUN_ID"]
        raise click.UsageError("pass exactly one of " + " or ".join(options[::-1] if run_first else options))
    return load_spec_option(spec_path, error)
