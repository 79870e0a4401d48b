"""``swarmtrain keygen`` and ``swarmtrain checkpoint``."""

from __future__ import annotations

import click


class NotYetAvailable(click.ClickException):
    exit_code = 3


@click.command()
@click.argument("out")
def keygen(out):
    """Write an ECDSA P-256 signing key to OUT (0600) and its public key to OUT.pub."""
    raise NotYetAvailable("`swarmtrain keygen` arrives with the trust issue (#4)")


@click.group()
def checkpoint() -> None:
    """Sign, verify, list and export stage checkpoints."""


@checkpoint.command("verify")
@click.argument("directory")
def checkpoint_verify(directory):
    """Verify a checkpoint directory's signature and digests."""
    raise NotYetAvailable("`swarmtrain checkpoint verify` arrives with the trust issue (#4)")
