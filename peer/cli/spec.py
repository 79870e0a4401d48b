"""``swarmtrain spec``: write, check and show run specs."""

from __future__ import annotations

import json
from pathlib import Path

import click

from protocol.spec import PRESETS, SpecError, load_spec, preset_spec


@click.group()
def spec() -> None:
    """Write, check and show run specs (TOML)."""


@spec.command("init")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--preset",
    type=click.Choice(sorted(PRESETS)),
    default="tiny",
    show_default=True,
    help="tiny (~1M parameters, tests), small (~25M), base (~1B).",
)
@click.option("--stages", type=int, default=None, help="Number of pipeline stages (default: the preset's).")
@click.option("--run-id", default="swarm", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Init seed shared by every peer.")
@click.option(
    "--trusted-key",
    "trusted_keys",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A public key (PEM) whose signature makes a checkpoint trusted; repeatable.",
)
@click.option("--min-signatures", type=int, default=1, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def spec_init(out: Path, preset, stages, run_id, seed, trusted_keys, min_signatures, force):
    """Write a valid run spec to OUT."""
    if out.exists() and not force:
        raise click.ClickException(f"{out} exists; pass --force to overwrite")
    keys = []
    for path in trusted_keys:
        text = path.read_text()
        if "BEGIN PUBLIC KEY" not in text:
            raise click.ClickException(f"--trusted-key {path}: not a PEM public key")
        keys.append(text)
    try:
        run_spec = preset_spec(
            preset,
            stages=stages,
            run_id=run_id,
            seed=seed,
            trusted_keys=tuple(keys),
            trust=dict(min_signatures=min_signatures),
        )
    except SpecError as err:
        raise click.ClickException(str(err)) from None
    run_spec.save(out)
    click.echo(f"wrote {out}: run {run_spec.run_id}, {run_spec.num_stages} stages, digest {run_spec.digest()}")


@spec.command("show")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the canonical JSON.")
def spec_show(path: Path, as_json: bool):
    """Validate a spec and print its digest and partition."""
    try:
        run_spec = load_spec(path)
    except SpecError as err:
        raise click.ClickException(str(err)) from None
    if as_json:
        click.echo(json.dumps(json.loads(run_spec.canonical_json()), indent=2))
        return
    m = run_spec.model
    click.echo(f"run_id   {run_spec.run_id}")
    click.echo(f"digest   {run_spec.digest()}")
    click.echo(
        f"model    hidden {m.hidden_size}, layers {m.num_hidden_layers}, heads {m.num_attention_heads}/"
        f"{m.num_key_value_heads} kv, vocab {m.vocab_size}"
    )
    for k, s in enumerate(run_spec.stages):
        extra = (" + embedding" if k == 0 else "") + (" + norm, LM head" if k == run_spec.num_stages - 1 else "")
        click.echo(f"stage {k}  layers [{s.start}, {s.end}){extra}")
    click.echo(
        f"trust    {len(run_spec.trust.trusted_keys)} trusted key(s), {run_spec.trust.min_signatures} signature(s) needed"
    )
