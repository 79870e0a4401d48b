"""``swarmtrain status`` and ``swarmtrain dashboard``: reading a swarm, never joining it."""

from __future__ import annotations

import click

from peer.cli.options import exit_now, guarded, initial, setup_logging, spec_or_run


@click.command()
@initial
@click.option("--run", "run_id", help="The run id (its spec is read from the DHT).")
@click.option("--spec", "spec_path", type=click.Path(exists=True, dir_okay=False), help="Or the run spec file.")
@click.option("--spec-digest", help="Pin the spec by its whole digest (64 hex digits).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--watch", type=float, default=None, help="Refresh every this many seconds.")
def status(initial_peers, run_id, spec_path, spec_digest, as_json, watch):
    """Show the swarm as the DHT sees it: per stage its peers, state, throughput, epoch, loss."""
    import json as _json

    if not initial_peers:
        raise click.UsageError("--initial-peers is required")
    spec = spec_or_run(spec_path, run_id, run_first=True)
    setup_logging(False)
    from peer.observe.status import format_snapshot, open_observer, swarm_snapshot
    from protocol.spec import SpecError

    try:
        swarm, close = open_observer(list(initial_peers), spec=spec, run_id=run_id, spec_digest=spec_digest)
    except SpecError as err:
        raise click.ClickException(str(err)) from None
    try:
        while True:
            view = swarm_snapshot(swarm)
            click.echo(_json.dumps(view, indent=2) if as_json else format_snapshot(view))
            if not watch:
                break
            import time as _time

            _time.sleep(watch)
    finally:
        close()


@click.command()
@initial
@click.option("--run", "run_id", help="The run id (its spec is read from the DHT).")
@click.option("--spec", "spec_path", type=click.Path(exists=True, dir_okay=False), help="Or the run spec file.")
@click.option("--spec-digest", help="Pin the spec by its whole digest (64 hex digits).")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="HTTP port (0: any free port)."
)
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: other machines too)."
)
@click.option(
    "--poll-period",
    type=click.FloatRange(min=0.5),
    default=2.0,
    show_default=True,
    help="Seconds between reads of the DHT.",
)
@click.option("--max-seconds", type=float, default=None, help="Stop after this long.")
@click.option("--log-json", is_flag=True)
@click.option("-v", "--verbose", is_flag=True)
def dashboard(initial_peers, run_id, spec_path, spec_digest, port, host, poll_period, max_seconds, log_json, verbose):
    """Serve a web page that shows the swarm live: stages and their peers, loss and tokens/s
    over time, signed checkpoints. Open the printed URL in a browser."""
    from peer.base.procs import start_reaper

    if not initial_peers:
        raise click.UsageError("--initial-peers is required")
    spec = spec_or_run(spec_path, run_id, run_first=True)
    setup_logging(verbose)
    start_reaper()  # the observer's p2pd dies with this process
    from peer.observe.dashboard import run_dashboard

    exit_now(
        guarded(
            run_dashboard,
            list(initial_peers),
            spec=spec,
            run_id=run_id,
            spec_digest=spec_digest,
            host=host,
            port=port,
            period=poll_period,
            log_json=log_json,
            max_seconds=max_seconds,
        )
    )
