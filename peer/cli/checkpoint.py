"""``swarmtrain keygen`` and ``swarmtrain checkpoint``: keys, signing, verification, export."""

from __future__ import annotations

from pathlib import Path

import click

from peer.cli.options import load_spec_option, spec_or_run
from protocol import signing
from protocol.checkpoint import (
    CHECKPOINT_FILES,
    META_FILE,
    REQUIRED_FILES,
    CheckpointRefused,
    VerifiedCheckpoint,
    parse_meta,
    verify_checkpoint,
)
from protocol.spec import RunSpec, SpecError


class CheckFailed(click.ClickException):
    """A refused checkpoint or unusable input: exit 1 with the reason."""

    exit_code = 1


@click.command()
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite an existing key pair.")
def keygen(out: Path, force: bool):
    """Write an ECDSA P-256 signing key to OUT (mode 0600) and its public key beside it
    (OUT.pem -> OUT.pub; any other name gets .pub appended)."""
    try:
        private, public, fp = signing.write_keypair(out, force=force)
    except FileExistsError as err:
        raise CheckFailed(str(err)) from None
    except OSError as err:
        raise CheckFailed(f"cannot write {err.filename}: {err.strerror}") from None
    click.echo(f"wrote private key {private} (mode 0600) and public key {public}")
    click.echo(f"fingerprint {fp}")
    click.echo(f"trust it with: swarmtrain spec init SPEC.toml --trusted-key {public}")


@click.group()
def checkpoint() -> None:
    """Sign, verify and export stage checkpoints."""


def _read_trusted_keys(paths) -> tuple[str, ...] | None:
    if not paths:
        return None
    keys = []
    for p in paths:
        try:
            signing.load_public_key_file(p)
        except signing.SigningError as err:
            raise CheckFailed(f"--trusted-key {err}") from None
        keys.append(Path(p).read_text())
    return tuple(keys)


def _expected_shapes(spec: RunSpec | None, stage: int | None):
    if spec is None or stage is None or not 0 <= stage < spec.num_stages:
        return None  # without a spec, or with a bad stage that check_meta reports
    from peer.checkpoints.store import expected_stage_shapes

    return expected_stage_shapes(spec, stage)


def _verify(directory: Path, spec, trusted_keys, min_signatures, *, held_step=None, stage=None) -> VerifiedCheckpoint:
    """Full verification, with the stage's expected parameter shapes when the spec is known."""
    if spec is None and trusted_keys is None:
        raise CheckFailed("no trusted keys: pass --spec SPEC.toml (its trust section) or --trusted-key PUB.pem")
    if stage is None and spec is not None:
        # The stage comes from checkpoint.json, which is only trusted once verified: peek to
        # pick the expected shapes, and verify_checkpoint re-reads it from the checked bytes.
        try:
            stage = parse_meta((directory / META_FILE).read_bytes(), directory).stage
        except (OSError, CheckpointRefused):
            stage = None
        shapes = _expected_shapes(spec, stage)
        stage_arg = stage if shapes is not None else None
    else:
        shapes, stage_arg = _expected_shapes(spec, stage), stage
    try:
        return verify_checkpoint(
            directory,
            spec,
            trusted_keys=trusted_keys,
            min_signatures=min_signatures,
            held_step=held_step,
            expected_stage=stage_arg,
            expected_shapes=shapes,
        )
    except CheckpointRefused as err:
        raise CheckFailed(str(err)) from None


@checkpoint.command("sign")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--key",
    "key_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Private key (PEM) from `swarmtrain keygen`.",
)
def checkpoint_sign(directory: Path, key_path: Path):
    """Sign a checkpoint directory: add signatures/<fingerprint>.sig.

    Co-signing: each signer runs this on the same directory; every signature covers the same
    files, so a spec can require several (trust.min_signatures).
    """
    try:
        listing = signing.list_signed_dir(directory)
        missing = [f for f in REQUIRED_FILES if f not in listing.content]
        if missing:
            raise CheckFailed(f"{directory}: not a checkpoint: {', '.join(missing)} missing")
        extra = [f for f in listing.content if f not in CHECKPOINT_FILES]
        if extra:
            raise CheckFailed(
                f"{directory}: unexpected file(s) {', '.join(extra)}; a checkpoint holds only "
                f"{', '.join(CHECKPOINT_FILES)}"
            )
        meta = parse_meta((directory / META_FILE).read_bytes(), directory)
        sig = signing.sign_dir(directory, key_path)
    except (signing.SigningError, CheckpointRefused) as err:
        raise CheckFailed(str(err)) from None
    fp = sig.name[: -len(signing.SIGNATURE_SUFFIX)]
    click.echo(f"signed {directory} (run {meta.run_id}, stage {meta.stage}, step {meta.step}) with key {fp}: {sig}")
    pub = signing.public_key_path_for(key_path)
    click.echo("check with the stock tool: " + " ".join(signing.stock_verify_command(directory, fp, pub)))


@checkpoint.command("verify")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--spec",
    "spec_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Run spec: checks spec digest, run id, stage, tensor names and shapes; its trusted keys "
    "are used unless --trusted-key is given.",
)
@click.option(
    "--trusted-key",
    "trusted_keys",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Public key (PEM) to trust instead of the spec's; repeatable.",
)
@click.option(
    "--min-signatures",
    type=click.IntRange(min=1),
    default=None,
    help="Valid trusted signatures required (default: the spec's, else 1).",
)
@click.option(
    "--held-step", type=click.IntRange(min=0), default=None, help="Refuse a checkpoint older than this step (rollback)."
)
@click.option("--stage", type=click.IntRange(min=0), default=None, help="Refuse a checkpoint of another stage.")
def checkpoint_verify(directory: Path, spec_path, trusted_keys, min_signatures, held_step, stage):
    """Verify a checkpoint: trusted signatures, file digests, metadata and tensors.

    Exits 0 and prints a summary when every check passes, 1 with the reason otherwise.

    The stock OpenSSF tool checks one signature's digests (not the spec, step or tensors):

    \b
      model_signing verify key DIR --signature DIR/signatures/<fingerprint>.sig --public_key PUB.pem
    """
    spec = load_spec_option(spec_path, CheckFailed)
    keys = _read_trusted_keys(trusted_keys)
    v = _verify(directory, spec, keys, min_signatures, held_step=held_step, stage=stage)
    m = v.meta
    click.echo(f"OK {directory}")
    click.echo(f"run       {m.run_id}")
    click.echo(f"spec      {m.spec_digest}" + ("" if spec is not None else " (not checked: no --spec)"))
    click.echo(f"stage     {m.stage}")
    click.echo(f"step      {m.step}")
    click.echo(f"tokens    {m.tokens_seen}")
    click.echo(f"parent    {m.parent_digest or '-'}")
    click.echo(f"manifest  {v.manifest_digest}")
    click.echo(f"files     {', '.join(sorted(v.files))} ({v.total_bytes} bytes)")
    click.echo(f"signers   {', '.join(v.signers)}")
    if v.untrusted_signers:
        click.echo(f"ignored   {', '.join(v.untrusted_signers)} (untrusted keys, not counted)")


@checkpoint.command("export")
@click.argument("directories", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Hugging Face model directory to create (must not exist, or be empty).",
)
@click.option(
    "--spec",
    "spec_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Run spec of the checkpoints (required: checkpoints carry only its digest).",
)
@click.option(
    "--trusted-key",
    "trusted_keys",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Public key (PEM) to trust instead of the spec's; repeatable.",
)
@click.option("--min-signatures", type=click.IntRange(min=1), default=None)
@click.option(
    "--max-shard-bytes", type=click.IntRange(min=1), default=None, help="Split model.safetensors into shards."
)
def checkpoint_export(directories, out_dir: Path, spec_path, trusted_keys, min_signatures, max_shard_bytes):
    """Join verified checkpoints of every stage of one step into a Hugging Face model directory."""
    if spec_path is None:
        raise CheckFailed(
            "export needs --spec SPEC.toml: a checkpoint records only the spec's digest, and the "
            "architecture (config.json) comes from the spec"
        )
    spec = load_spec_option(spec_path, CheckFailed)
    keys = _read_trusted_keys(trusted_keys)
    verified = [_verify(d, spec, keys, min_signatures) for d in directories]

    from peer.checkpoints.export import export_checkpoints

    try:
        step = export_checkpoints(spec, verified, out_dir, max_shard_bytes=max_shard_bytes)
    except ValueError as err:
        raise CheckFailed(str(err)) from None
    click.echo(f"exported run {spec.run_id} step {step} ({spec.num_stages} stages) to {out_dir}")


@checkpoint.command("import")
@click.argument("hf_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--spec",
    "spec_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The run spec (from `spec init --from-hf`), which names the digest of these weights.",
)
@click.option(
    "--signing-key",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The private key that signs the checkpoints (the keeper's; the spec must trust it).",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the signed checkpoints go (the keeper's --checkpoint-dir).",
)
def checkpoint_import(hf_dir: Path, spec_path: Path, signing_key: Path, out_dir: Path):
    """Write a Hugging Face model's weights as the run's signed step 0, one checkpoint per stage."""
    spec = load_spec_option(spec_path, CheckFailed)
    from peer.checkpoints.hf_import import import_hf
    from peer.model.hf_io import CheckpointError
    from protocol.weights import WeightsError

    try:
        written = import_hf(hf_dir, spec, signing_key, out_dir, progress=click.echo)
    except (CheckpointError, CheckpointRefused, WeightsError, signing.SigningError, OSError) as err:
        raise CheckFailed(str(err)) from None
    click.echo(
        f"imported {hf_dir} as step 0 of run {spec.run_id}: {len(written)} signed checkpoint(s) in {out_dir}; "
        f"serve them with `swarmtrain bootstrap --keeper --checkpoint-dir {out_dir} ...`"
    )


@checkpoint.command("list")
@click.option("--initial-peers", multiple=True, help="Multiaddr of a bootstrap or any peer; repeatable.")
@click.option("--run", "run_id", help="The run id (its spec is read from the DHT).")
@click.option(
    "--spec", "spec_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Or the run spec file."
)
@click.option("--spec-digest", help="Pin the spec digest (or a prefix) when joining by --run.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def checkpoint_list(initial_peers, run_id, spec_path, spec_digest, as_json):
    """List the checkpoints announced in the swarm: per stage, each checkpoint's step, manifest
    digest, signers and the peers that serve it.

    Announcements are claims; a peer verifies a checkpoint after fetching it and before using it
    (`swarmtrain checkpoint verify` does the same on a local copy).
    """
    import json
    import logging

    if not initial_peers:
        raise click.UsageError("--initial-peers is required")
    spec = spec_or_run(spec_path, run_id, run_first=True, error=CheckFailed)
    logging.getLogger("hivemind").setLevel(logging.ERROR)
    from peer.checkpoints import announced_checkpoints
    from peer.observe.status import open_observer

    try:
        swarm, close = open_observer(list(initial_peers), spec=spec, run_id=run_id, spec_digest=spec_digest)
    except SpecError as err:
        raise CheckFailed(str(err)) from None
    try:
        rows = announced_checkpoints(swarm.checkpoint_announcements())
        spec = swarm.spec
    finally:
        close()
    if as_json:
        click.echo(json.dumps({"run_id": spec.run_id, "digest": spec.digest(), "checkpoints": rows}, indent=2))
        return
    click.echo(f"run {spec.run_id}  digest {spec.digest()[:16]}  {len(rows)} checkpoint(s) announced")
    for stage in range(spec.num_stages):
        mine = [r for r in rows if r["stage"] == stage]
        click.echo(f"stage {stage}" + ("" if mine else ": none announced"))
        for r in mine:
            click.echo(
                f"  step {r['step']:>6}  digest {r['manifest_digest'][:16]}  signers {','.join(r['signers']) or '-'}"
                f"  {r['total_bytes'] or 0:,} bytes  served by {', '.join(r['served_by'])}"
            )
