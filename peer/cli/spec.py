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
@click.option(
    "--from-hf",
    "hf_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="A Hugging Face Llama model directory: its config.json is the architecture, its weights are "
    "step 0 (import them with `swarmtrain checkpoint import`), its tokenizer.json the tokenizer.",
)
@click.option(
    "--layers",
    default=None,
    help="With --from-hf: the first layer of each stage after the first, e.g. 4,8 (default: an even split "
    "into --stages, 2 unless given).",
)
@click.option(
    "--averaging",
    type=click.Choice(["per_step", "outer"]),
    default="per_step",
    show_default=True,
    help="per_step: hivemind's all-reduce of gradients at every step; outer: stage groups train on "
    "their own and exchange compressed, signed updates every training.outer.round_seconds.",
)
@click.option(
    "--distill",
    is_flag=True,
    help="Let teacher peers (swarmtrain teach) help: a [distill] section with default weight, temperature, "
    "k and spot-check fraction; any teacher whose vocabulary matches unless --teacher-digest pins some.",
)
@click.option(
    "--teacher-digest",
    "teacher_digests",
    multiple=True,
    help="With --distill: accept only teachers with these weights (the SHA-256 `swarmtrain teach` prints); repeatable.",
)
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def spec_init(
    out: Path,
    preset,
    stages,
    run_id,
    seed,
    trusted_keys,
    min_signatures,
    hf_dir,
    layers,
    averaging,
    distill,
    teacher_digests,
    force,
):
    """Write a valid run spec to OUT."""
    if out.exists() and not force:
        raise click.ClickException(f"{out} exists; pass --force to overwrite")
    if teacher_digests and not distill:
        raise click.UsageError("--teacher-digest needs --distill")
    distill_section = None
    if distill:
        from pydantic import ValidationError

        from protocol.spec import DistillSpec

        try:
            distill_section = DistillSpec(teacher_digests=tuple(d.lower() for d in teacher_digests))
        except ValidationError as err:
            message = err.errors()[0]["msg"].removeprefix("Value error, ")
            raise click.BadParameter(message, param_hint="--teacher-digest") from None
    keys = []
    for path in trusted_keys:
        text = path.read_text()
        if "BEGIN PUBLIC KEY" not in text:
            raise click.ClickException(f"--trusted-key {path}: not a PEM public key")
        keys.append(text)
    if layers is not None and hf_dir is None:
        raise click.UsageError("--layers needs --from-hf")
    if hf_dir is not None:
        run_spec = _from_hf(hf_dir, run_id=run_id, stages=stages, layers=layers, seed=seed, keys=keys)
        run_spec = run_spec.model_copy(
            update={
                "trust": run_spec.trust.model_copy(update={"min_signatures": min_signatures}),
                "distill": distill_section,
            }
        )
        run_spec = _fit_outer_round(run_spec)
        run_spec.save(out)
        click.echo(
            f"wrote {out}: run {run_spec.run_id} from {hf_dir}, {run_spec.num_stages} stages "
            f"({', '.join(f'[{s.start}, {s.end})' for s in run_spec.stages)}), weights {run_spec.init.weights_sha256[:16]}, "
            f"digest {run_spec.digest()}"
        )
        return
    try:
        run_spec = preset_spec(
            preset,
            stages=stages,
            run_id=run_id,
            seed=seed,
            trusted_keys=tuple(keys),
            trust=dict(min_signatures=min_signatures),
            training=dict(averaging=averaging),
            **({"distill": distill_section.model_dump()} if distill_section is not None else {}),
        )
    except SpecError as err:
        raise click.ClickException(str(err)) from None
    run_spec = _fit_outer_round(run_spec)
    run_spec.save(out)
    click.echo(
        f"wrote {out}: run {run_spec.run_id}, {run_spec.num_stages} stages, digest {run_spec.digest()}"
        + (", distilling from teachers" if run_spec.distill is not None else "")
    )


def _fit_outer_round(run_spec):
    """An outer round long enough for the model's contributions on a slow line."""
    if run_spec.training.averaging != "outer":
        return run_spec
    from peer.averaging.deadlines import fit_round_seconds

    fitted = fit_round_seconds(run_spec)
    before, after = run_spec.training.outer.round_seconds, fitted.training.outer.round_seconds
    if after != before:
        click.echo(
            f"training.outer.round_seconds {after:.0f} (not {before:.0f}): a round must hold this model's "
            "contributions, and a joiner's read of the group's round state, on a 10 Mbit/s line (docs/network.md)"
        )
    return fitted


def _from_hf(hf_dir: Path, *, run_id, stages, layers, seed, keys):
    from peer.data.tokenizer import file_sha256
    from peer.model.hf_io import CheckpointError, spec_from_hf
    from protocol.weights import WeightsError

    try:
        cuts = [int(x) for x in layers.split(",")] if layers else None
    except ValueError:
        raise click.UsageError(f"--layers {layers!r}: a comma-separated list of layer numbers") from None
    tokenizer = None
    tok = hf_dir / "tokenizer.json"
    if tok.is_file():
        # Peers read the tokenizer at this path (checked against the SHA-256 wherever it is).
        tokenizer = {"kind": "file", "path": str(tok.resolve()), "sha256": file_sha256(tok)}
    try:
        return spec_from_hf(
            hf_dir, run_id=run_id, stages=stages, cuts=cuts, seed=seed, trusted_keys=keys, tokenizer=tokenizer
        )
    except (CheckpointError, WeightsError, SpecError, ValueError) as err:
        raise click.ClickException(str(err)) from None


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
    if run_spec.init.weights_sha256:
        click.echo(f"init     the weights {run_spec.init.weights_sha256} (step 0: `swarmtrain checkpoint import`)")
    if run_spec.tokenizer.kind == "file":
        click.echo(f"tokens   {run_spec.tokenizer.path} (SHA-256 {run_spec.tokenizer.sha256[:16]})")
    if run_spec.distill is not None:
        d = run_spec.distill
        who = ", ".join(x[:16] for x in d.teacher_digests) if d.teacher_digests else "any whose vocabulary matches"
        click.echo(
            f"distill  weight {d.weight:g}, temperature {d.temperature:g}, top-{d.k}, spot checks {d.spot_check:.0%}; "
            f"teachers: {who}"
        )
