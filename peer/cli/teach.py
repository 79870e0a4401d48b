"""``swarmtrain teach``: serve a model's soft targets to the trainers of a run."""

from __future__ import annotations

import click

from peer.base.config import NetworkConfig, OutputConfig, TeacherConfig
from peer.cli.options import (
    announce,
    exit_now,
    guarded,
    identity,
    initial,
    maddrs,
    network_config,
    printing,
    raise_fd_limit,
    relaying,
    run_config,
    setup_logging,
    which_run,
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
@which_run
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
@relaying
@with_metrics
@printing
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

    network = network_config(
        initial_peers,
        host_maddrs,
        announce_maddrs,
        identity,
        use_relay=use_relay,
        relays=list(relays),
        announce_period=announce_period,
    )
    run_spec = run_config(spec_path, run_id, spec_digest, trusted_key_paths)
    spec = run_spec.spec
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
        network=network,
        run=run_spec,
        output=OutputConfig(
            log_json=log_json, status_every=status_every, metrics_port=metrics_port, metrics_host=metrics_host
        ),
        threads=threads,
        max_batch_samples=max_batch_samples,
        max_seconds=max_seconds,
    )
    exit_now(guarded(run_teacher, config))
