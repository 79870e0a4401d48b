"""``swarmtrain teach``: serve a model's soft targets to the trainers of a run."""

from __future__ import annotations

import click

from peer.base.config import DEFAULT_HOST_MADDRS, NetworkConfig, OutputConfig, RunConfig, TeacherConfig
from peer.cli.options import (
    announce,
    exit_now,
    guarded,
    identity,
    initial,
    maddrs,
    raise_fd_limit,
    read_keys,
    setup_logging,
    spec_or_run,
    with_metrics,
)


@click.command()
@click.option(
    "--model",
    "model_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="A local Hugging Face causal LM directory (config.json, *.safetensors) that speaks the run's vocabulary.",
)
@initial
@click.option("--spec", "spec_path", type=click.Path(exists=True, dir_okay=False), help="The run spec (TOML).")
@click.option("--run", "run_id", help="Or the run id: the spec is read from the DHT.")
@click.option("--spec-digest", help="Pin the spec by its whole digest (64 hex digits) when joining by --run.")
@click.option(
    "--trusted-key",
    "trusted_key_paths",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Or take the run's spec that this public key signed; repeatable.",
)
@maddrs
@announce
@identity
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads (default: every core).")
@click.option(
    "--max-batch",
    "max_batch_samples",
    type=click.IntRange(min=1),
    default=None,
    help="Sequences of waiting requests run as one forward (default: 4 micro-batches of the spec).",
)
@click.option("--max-seconds", type=float, default=None, help="Stop after this long.")
@click.option("--announce-period", type=float, default=NetworkConfig.announce_period, show_default=True)
@click.option("--status-every", type=float, default=OutputConfig.status_every, show_default=True)
@click.option(
    "--relay/--no-relay",
    "use_relay",
    default=NetworkConfig.use_relay,
    show_default=True,
    help="When others cannot dial this teacher (a home router), serve through a relay.",
)
@click.option(
    "--trusted-relay", "relays", multiple=True, help="A relay's multiaddr (repeatable; default: the initial peers)."
)
@with_metrics
@click.option("--log-json", is_flag=True, help="JSON lines instead of the status line.")
@click.option("-v", "--verbose", is_flag=True)
def teach(
    model_dir,
    initial_peers,
    spec_path,
    run_id,
    spec_digest,
    trusted_key_paths,
    host_maddrs,
    announce_maddrs,
    identity,
    threads,
    max_batch_samples,
    max_seconds,
    announce_period,
    status_every,
    use_relay,
    relays,
    metrics_port,
    metrics_host,
    log_json,
    verbose,
):
    """Serve a model's soft targets to the trainers of a run that distills.

    The model stays frozen; trainers send it their micro-batches' token ids and add its top-k
    next-token distributions to their loss (the spec's [distill] section). It announces its
    weights' SHA-256, which the spec may pin.
    """
    from peer.base.procs import start_reaper

    if not initial_peers:
        raise click.UsageError("--initial-peers is required (the bootstrap's multiaddr)")
    spec = spec_or_run(spec_path, run_id)
    trusted_keys = read_keys(trusted_key_paths)
    if spec is not None and spec.distill is None:
        raise click.UsageError(
            f"run {spec.run_id!r} does not distill: its spec has no [distill] section (swarmtrain spec init --distill)"
        )
    setup_logging(verbose)
    start_reaper()
    raise_fd_limit()
    from peer.node.teacher import run_teacher

    config = TeacherConfig(
        model_dir=model_dir,
        network=NetworkConfig(
            initial_peers=list(initial_peers),
            host_maddrs=list(host_maddrs) or DEFAULT_HOST_MADDRS,
            announce_maddrs=list(announce_maddrs),
            identity=identity,
            use_relay=use_relay,
            relays=list(relays),
            announce_period=announce_period,
        ),
        run=RunConfig(spec=spec, run_id=run_id, spec_digest=spec_digest, trusted_keys=trusted_keys),
        output=OutputConfig(
            log_json=log_json, status_every=status_every, metrics_port=metrics_port, metrics_host=metrics_host
        ),
        threads=threads,
        max_batch_samples=max_batch_samples,
        max_seconds=max_seconds,
    )
    exit_now(guarded(run_teacher, config))
