"""The ``swarmtrain`` command line. It only parses options and calls into ``peer``."""

from __future__ import annotations

import os
import sys

# hivemind shares futures' state through torch shared memory; its default "file_system"
# strategy relies on a torch_shm_manager process, which we saw vanish mid-run under load
# ("Broken pipe" on every DHT call). File descriptors need no helper process.
os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")

import click  # noqa: E402

from peer import __version__
from peer.base.config import (
    DEFAULT_BOOTSTRAP_MADDRS,
    BootstrapConfig,
    CheckpointConfig,
    ChurnConfig,
    DataConfig,
    KeeperConfig,
    NetworkConfig,
    OutputConfig,
    PeerConfig,
)
from peer.cli.checkpoint import checkpoint, keygen
from peer.cli.observe import dashboard, status
from peer.cli.options import (
    announce,
    build_keeper_config,
    check_keeper,
    exit_now,
    finite,
    guarded,
    identity,
    initial,
    keeper_options,
    load_spec_option,
    maddrs,
    network_config,
    printing,
    raise_fd_limit,
    rebalance_period_for,
    relaying,
    run_config,
    setup_logging,
    which_run,
    with_metrics,
)
from peer.cli.spec import spec
from peer.cli.teach import teach


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="swarmtrain")
def main() -> None:
    """swarmtrain: train one transformer together, peer to peer.

    Each peer holds one pipeline stage, trains on its own local data, averages compressed
    gradients with the peers of its stage, and trusts only signed checkpoints.
    """


main.add_command(spec)
main.add_command(keygen)
main.add_command(checkpoint)
main.add_command(teach)
main.add_command(status)
main.add_command(dashboard)


@main.command()
@click.option("--seconds", type=float, default=None, help="Stop after this long (default: 150).")
@click.option("--stages", type=int, default=2, show_default=True)
@click.option("--peers-per-stage", type=int, default=2, show_default=True)
@click.option("--preset", default="tiny", show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False), default=None, help="Where logs go (default: a temp dir).")
@click.option("--json-summary", is_flag=True, help="Print a JSON summary line at the end (progress goes to stderr).")
def demo(seconds, stages, peers_per_stage, preset, workdir, json_summary):
    """Run a local demo swarm on 127.0.0.1 with built-in defaults.

    Starts a bootstrap and STAGES x PEERS_PER_STAGE peer processes that train a small Llama on
    the Python standard library's source files, shows live progress, and stops them all.
    """
    from peer.dev.demo import run_demo

    sys.exit(
        run_demo(
            seconds=seconds,
            stages=stages,
            peers_per_stage=peers_per_stage,
            preset=preset,
            workdir=workdir,
            json_summary=json_summary,
        )
    )


@main.command()
@initial
@which_run
@click.option(
    "--data",
    type=click.Path(exists=True),
    help="Local text: a file, a directory, JSONL or Parquet. Without it the peer only serves.",
)
@click.option("--data-suffix", "data_suffixes", multiple=True, help="Only read files with these suffixes (e.g. .py).")
@click.option("--stage", default="auto", show_default=True, help="'auto' (the least-served stage) or a stage index.")
@maddrs
@announce
@identity
@click.option("--threads", type=int, default=PeerConfig.threads, show_default=True, help="torch threads for this peer.")
@click.option("--max-seconds", type=float, default=None, help="Stop after this long.")
@click.option("--max-steps", "max_microbatches", type=int, default=None, help="Stop after this many micro-batches.")
@click.option("--announce-period", type=float, default=NetworkConfig.announce_period, show_default=True)
@click.option("--status-every", type=float, default=OutputConfig.status_every, show_default=True)
@click.option("--request-timeout", type=float, default=NetworkConfig.request_timeout, show_default=True)
@click.option("--client-mode", is_flag=True, help="Do not accept inbound connections (behind NAT without relays).")
@relaying
@click.option(
    "--rebalance-period",
    type=click.FloatRange(min=0.0),
    default=None,
    help="Seconds between checks for a better stage (randomised by a third either way; 0: never move). "
    "Default: 15 with --stage auto, 0 with a fixed --stage. A peer also moves to refill a stage "
    "whose peers are all gone.",
)
@click.option(
    "--rebalance-cooldown",
    type=click.FloatRange(min=0.0),
    default=ChurnConfig.rebalance_cooldown,
    show_default=True,
    help="Seconds a peer stays on a stage after joining or moving before a rebalancing move "
    "(refilling an empty stage does not wait).",
)
@click.option(
    "--throughput",
    type=click.FloatRange(min=0.0, min_open=True, max=1e9),
    default=None,
    callback=finite,
    help="Samples/s this peer announces for its stage, which stage choice and rebalancing weigh. "
    "Default: measured when a stage opens (the best of a few forward+backward passes).",
)
@click.option(
    "--final-state",
    type=click.Path(dir_okay=False),
    default=None,
    help="On exit, write this peer's stage weights (safetensors) here.",
)
@click.option(
    "--checkpoint-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Local signed checkpoints: the newest that verifies is loaded at start, fetched ones are kept "
    "here (default: a temporary dir).",
)
@keeper_options
@with_metrics
@printing
def run(
    initial_peers,
    spec_path,
    run_id,
    spec_digest,
    trusted_key_paths,
    data,
    data_suffixes,
    stage,
    host_maddrs,
    announce_maddrs,
    identity,
    threads,
    max_seconds,
    max_microbatches,
    announce_period,
    status_every,
    request_timeout,
    client_mode,
    use_relay,
    relays,
    rebalance_period,
    rebalance_cooldown,
    throughput,
    final_state,
    checkpoint_dir,
    keeper,
    signing_key,
    keeper_every,
    keeper_keep,
    eval_data,
    metrics_port,
    metrics_host,
    log_json,
    verbose,
):
    """Join a swarm as a peer: serve a stage and train on local data."""
    from peer.base.procs import start_reaper

    network = network_config(
        initial_peers,
        host_maddrs,
        announce_maddrs,
        identity,
        client_mode=client_mode,
        use_relay=use_relay,
        relays=list(relays),
        announce_period=announce_period,
        request_timeout=request_timeout,
    )
    run_spec = run_config(spec_path, run_id, spec_digest, trusted_key_paths)
    if stage != "auto" and not stage.isdigit():
        raise click.UsageError("--stage must be 'auto' or a stage index")
    check_keeper(keeper, signing_key, checkpoint_dir)
    setup_logging(verbose)
    start_reaper()  # before any thread or child: p2pd and hivemind's helpers die with this peer
    raise_fd_limit()
    from peer.node import run_peer

    keeper_config = build_keeper_config(
        keeper,
        signing_key,
        checkpoint_dir,
        keeper_every,
        keeper_keep,
        eval_data,
        request_timeout=max(KeeperConfig.request_timeout, request_timeout),
    )
    config = PeerConfig(
        network=network,
        run=run_spec,
        data=DataConfig(path=data, suffixes=list(data_suffixes) or None),
        churn=ChurnConfig(
            stage=None if stage == "auto" else int(stage),
            rebalance_period=rebalance_period_for(rebalance_period, stage),
            rebalance_cooldown=rebalance_cooldown,
            throughput=throughput,
        ),
        checkpoints=CheckpointConfig(directory=checkpoint_dir, keeper=keeper_config),
        output=OutputConfig(
            log_json=log_json, status_every=status_every, metrics_port=metrics_port, metrics_host=metrics_host
        ),
        threads=threads,
        max_seconds=max_seconds,
        max_microbatches=max_microbatches,
        final_state=final_state,
    )
    exit_now(guarded(run_peer, config))


@main.command()
@maddrs
@announce
@identity
@initial
@click.option(
    "--spec", "spec_path", type=click.Path(exists=True, dir_okay=False), help="Publish this run spec in the DHT."
)
@click.option("--max-seconds", type=float, default=None, help="Stop after this long.")
@click.option(
    "--checkpoint-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="With --keeper: where signed checkpoints are written, kept and served from.",
)
@keeper_options
@click.option(
    "--announce-period",
    type=float,
    default=5.0,
    show_default=True,
    help="With --keeper: seconds between checkpoint announcements.",
)
@click.option(
    "--dashboard-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Also serve the web dashboard of the run on this port (needs --spec; 0: any free port).",
)
@click.option(
    "--dashboard-host",
    default="127.0.0.1",
    show_default=True,
    help="Address for --dashboard-port (0.0.0.0 to show it to other machines).",
)
@click.option(
    "--relay/--no-relay",
    default=True,
    show_default=True,
    help="Tell peers whether others can dial them, and forward streams to peers behind routers nobody can dial.",
)
@with_metrics
@printing
def bootstrap(
    host_maddrs,
    announce_maddrs,
    identity,
    initial_peers,
    spec_path,
    max_seconds,
    checkpoint_dir,
    keeper,
    signing_key,
    keeper_every,
    keeper_keep,
    eval_data,
    announce_period,
    dashboard_port,
    dashboard_host,
    relay,
    metrics_port,
    metrics_host,
    log_json,
    verbose,
):
    """Host a bootstrap DHT node with a persistent identity.

    Prints the multiaddrs that peers pass as --initial-peers. A stock `hivemind-dht` works as
    a bootstrap too (then peers need --spec, since it publishes no spec).
    """
    from peer.base.procs import start_reaper

    check_keeper(keeper, signing_key, checkpoint_dir, signing_key_alone=True)
    if keeper and spec_path is None:
        raise click.UsageError("--keeper needs --spec SPEC.toml")
    if signing_key and spec_path is None:
        raise click.UsageError("--signing-key needs --spec SPEC.toml: it signs the spec this bootstrap publishes")
    if dashboard_port is not None and spec_path is None:
        raise click.UsageError("--dashboard-port needs --spec SPEC.toml (the dashboard shows one run)")
    spec = load_spec_option(spec_path)
    setup_logging(verbose)
    start_reaper()
    from peer.node.bootstrap import run_bootstrap

    config = BootstrapConfig(
        network=NetworkConfig(
            initial_peers=list(initial_peers),
            host_maddrs=list(host_maddrs) or DEFAULT_BOOTSTRAP_MADDRS,
            announce_maddrs=list(announce_maddrs),
            identity=identity,
            announce_period=announce_period,
        ),
        spec=spec,
        spec_signing_key=signing_key,
        keeper=build_keeper_config(keeper, signing_key, checkpoint_dir, keeper_every, keeper_keep, eval_data),
        dashboard=(dashboard_host, dashboard_port) if dashboard_port is not None else None,
        relay=relay,
        output=OutputConfig(log_json=log_json, metrics_port=metrics_port, metrics_host=metrics_host),
        max_seconds=max_seconds,
    )
    exit_now(run_bootstrap(config))


def entry() -> None:
    """The console script: every option can also come from SWARMTRAIN_<COMMAND>_<OPTION>
    (e.g. SWARMTRAIN_RUN_INITIAL_PEERS), which is how the Docker image is configured."""
    main(auto_envvar_prefix="SWARMTRAIN")


if __name__ == "__main__":
    entry()
