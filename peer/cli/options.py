"""What several commands share: options, which run (``--spec`` or ``--run``), loading the spec,
logging, and how a command exits."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Optional, Type

import click

from peer.base.config import DEFAULT_HOST_MADDRS, KeeperConfig, NetworkConfig, OutputConfig, RunConfig
from protocol.spec import RunSpec, SpecError, load_spec


def load_spec_option(path, error: Type[click.ClickException] = click.ClickException) -> Optional[RunSpec]:
    """The spec file given with ``--spec`` (None without one); a bad file is ``error``."""
    if path is None:
        return None
    try:
        return load_spec(path)
    except SpecError as err:
        raise error(str(err)) from None


def spec_or_run(
    spec_path, run_id, *, run_first: bool = False, error: Type[click.ClickException] = click.ClickException
) -> Optional[RunSpec]:
    """Exactly one of ``--spec FILE`` (loaded here) and ``--run RUN_ID`` (the spec comes from the
    DHT later, checked against ``--spec-digest``). A peer usually names a spec file, an
    observer a run: the message lists the usual one first."""
    if (spec_path is None) == (run_id is None):
        options = ["--spec SPEC.toml", "--run RUN_ID"]
        raise click.UsageError("pass exactly one of " + " or ".join(options[::-1] if run_first else options))
    return load_spec_option(spec_path, error)


def exit_now(code: int) -> None:
    """Exit once shutdown is done. hivemind leaves executor threads waiting on events that
    never fire, and Python would join them forever at exit; everything was stopped already,
    and the reaper sweeps the process group."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def guarded(fn, *args, **kwargs) -> int:
    """Run a long-lived command; turn failures into a clear message and an exit code."""
    from protocol.spec import SpecError

    try:
        return fn(*args, **kwargs) or 0
    except KeyboardInterrupt:
        return 130
    except SystemExit as err:
        if isinstance(err.code, str):
            click.echo(f"Error: {err.code}", err=True)
            return 1
        return err.code or 0
    except (SpecError, ValueError, OSError) as err:
        click.echo(f"Error: {err}", err=True)
        return 1
    except Exception:
        import traceback

        traceback.print_exc()
        return 1


def raise_fd_limit() -> None:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def setup_logging(verbose: bool) -> None:
    import logging

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not verbose:
        # hivemind logs every averaging round at INFO; keep the console to our status line.
        logging.getLogger("hivemind").setLevel(logging.ERROR)


maddrs = click.option(
    "--host-maddrs", multiple=True, help="Multiaddrs to listen on (default: all interfaces, a free TCP port)."
)
announce = click.option(
    "--announce-maddrs", multiple=True, help="Public multiaddrs to announce (behind NAT or a port forward)."
)
identity = click.option(
    "--identity",
    type=click.Path(dir_okay=False),
    default=None,
    help="Identity key file: the same peer id after a restart (created if missing).",
)
initial = click.option("--initial-peers", multiple=True, help="Multiaddr of a bootstrap or any peer; repeatable.")


def stacked(*options):
    """One decorator of several click options, in the order given (as --help lists them)."""

    def apply(fn):
        for opt in reversed(options):
            fn = opt(fn)
        return fn

    return apply


# Which run a node joins: `run` and `teach`.
which_run = stacked(
    click.option("--spec", "spec_path", type=click.Path(exists=True, dir_okay=False), help="The run spec (TOML)."),
    click.option("--run", "run_id", help="Or join by run id: the spec is read from the DHT."),
    click.option("--spec-digest", help="Pin the spec by its whole digest (64 hex digits) when joining by --run."),
    click.option(
        "--trusted-key",
        "trusted_key_paths",
        multiple=True,
        type=click.Path(exists=True, dir_okay=False),
        help="Or join by --run taking the spec that this public key signed (the keeper's keeper.pub); repeatable.",
    ),
)

# Serving from behind a home router: `run` and `teach`.
relaying = stacked(
    click.option(
        "--relay/--no-relay",
        "use_relay",
        default=NetworkConfig.use_relay,
        show_default=True,
        help="When others cannot dial this node (a home router, no port forwarding), serve through a "
        "relay. --no-relay: say so and go on unrelayed.",
    ),
    click.option(
        "--trusted-relay",
        "relays",
        multiple=True,
        help="A relay's multiaddr (repeatable): who checks whether others can dial this node and relays "
        "for it. Default: the initial peers.",
    ),
)

# What every long-running node prints.
printing = stacked(
    click.option("--log-json", is_flag=True, help="JSON lines instead of the status line."),
    click.option("-v", "--verbose", is_flag=True),
)


def run_config(spec_path, run_id, spec_digest, trusted_key_paths) -> RunConfig:
    """``which_run``'s options, checked: exactly one of --spec and --run, readable keys."""
    spec = spec_or_run(spec_path, run_id)
    trusted_keys = read_keys(trusted_key_paths)  # before anything starts: a bad key file is a usage error
    return RunConfig(spec=spec, run_id=run_id, spec_digest=spec_digest, trusted_keys=trusted_keys)


def network_config(initial_peers, host_maddrs, announce_maddrs, identity, **more) -> NetworkConfig:
    if not initial_peers:
        raise click.UsageError("--initial-peers is required (the bootstrap's multiaddr)")
    return NetworkConfig(
        initial_peers=list(initial_peers),
        host_maddrs=list(host_maddrs) or DEFAULT_HOST_MADDRS,
        announce_maddrs=list(announce_maddrs),
        identity=identity,
        **more,
    )


# Options of the keeper (peer.checkpoints.keeper), shared by `run` and `bootstrap`.
keeper_options = stacked(
    click.option(
        "--keeper",
        is_flag=True,
        help="Be the keeper: periodically pull every stage's state, check it "
        "and sign it as a checkpoint (needs --signing-key, --checkpoint-dir).",
    ),
    click.option(
        "--signing-key",
        type=click.Path(exists=True, dir_okay=False),
        help="The keeper's private key (swarmtrain keygen); the spec must trust its public key. A "
        "bootstrap also signs the spec it publishes with it, for peers that join with --trusted-key.",
    ),
    click.option(
        "--every",
        "keeper_every",
        type=click.FloatRange(min=1.0),
        default=KeeperConfig.every,
        show_default=True,
        help="Seconds between keeper rounds.",
    ),
    click.option(
        "--keep",
        "keeper_keep",
        type=click.IntRange(min=1),
        default=KeeperConfig.keep,
        show_default=True,
        help="Signed checkpoints kept per stage.",
    ),
    click.option(
        "--eval-data",
        type=click.Path(exists=True),
        default=None,
        help="Held-out text for the keeper's loss check (default: the Python standard library).",
    ),
)


def rebalance_period_for(period, stage) -> float:
    """A peer that chose its stage itself rebalances by default; one told ``--stage K`` stays
    there unless ``--rebalance-period`` is given too."""
    from peer.swarm.churn import DEFAULT_REBALANCE_PERIOD

    if period is not None:
        return period
    return DEFAULT_REBALANCE_PERIOD if stage == "auto" else 0.0


def finite(ctx, param, value):
    # click's FloatRange lets "nan" through (every comparison with NaN is false).
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a number of samples/s")
    return value


def build_keeper_config(keeper, signing_key, checkpoint_dir, every, keep, eval_data, **more) -> Optional[KeeperConfig]:
    if not keeper:
        return None
    return KeeperConfig(
        signing_key=Path(signing_key),
        checkpoint_dir=Path(checkpoint_dir),
        every=every,
        keep=keep,
        eval_data=eval_data,
        **more,
    )


def check_keeper(keeper, signing_key, checkpoint_dir, *, signing_key_alone: bool = False):
    """``signing_key_alone``: the command uses --signing-key without --keeper too (a bootstrap
    signs the spec it publishes)."""
    if keeper and (signing_key is None or checkpoint_dir is None):
        raise click.UsageError("--keeper needs --signing-key KEY.pem and --checkpoint-dir DIR")
    if not keeper and signing_key is not None and not signing_key_alone:
        raise click.UsageError("--signing-key is only used with --keeper")


def read_keys(paths) -> tuple[str, ...]:
    """PEM public keys from files (``--trusted-key``), checked to be ECDSA P-256 keys."""
    from protocol import signing

    keys = []
    for path in paths:
        try:
            keys.append(signing.public_key_pem(signing.load_public_key_file(path)))
        except (OSError, signing.SigningError) as err:
            raise click.BadParameter(f"{path}: {err}", param_hint="--trusted-key") from None
    return tuple(keys)


with_metrics = stacked(
    click.option(
        "--metrics-port",
        type=click.IntRange(0, 65535),
        default=None,
        help="Serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port).",
    ),
    click.option(
        "--metrics-host",
        default=OutputConfig.metrics_host,
        show_default=True,
        help="Address for --metrics-port (0.0.0.0 to let another machine scrape it).",
    ),
)
