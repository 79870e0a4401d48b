"""A bootstrap node: a DHT peer with a persistent identity that others dial first, and that
publishes the run spec for peers joining by run id. It relays for peers nobody can dial
(``peer.net.relay``), and with a keeper it signs, keeps, serves and announces checkpoints of
every stage (``peer.checkpoints.keeper``); with a dashboard it shows the run."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from peer.base import Output
from peer.base.config import DEFAULT_BOOTSTRAP_IDENTITY, BootstrapConfig, CheckpointConfig, NetworkConfig
from peer.node.joined import Joined, StopSignals, joined
from peer.observe.prom import close_server, serve_metrics
from peer.swarm.dht import publish_spec, visible_maddrs
from protocol import signing
from protocol.records import run_validators


def run_bootstrap(config: BootstrapConfig) -> int:
    out = Output(config.output.log_json)
    event = out.event
    spec = config.spec
    if config.dashboard is not None and spec is None:
        raise SystemExit("--dashboard-port needs --spec: the dashboard shows one run")
    _check_keeper(config)
    spec_key = _spec_signing_key(config)
    signals = StopSignals(event, "stopping the bootstrap").install()
    with contextlib.ExitStack() as stack:
        stack.callback(out.event, "stopped", "bootstrap stopped")
        if config.output.metrics_port is not None:
            from peer.observe.events import EventCounts

            event = EventCounts(out.event)  # the keeper's signatures, refusals and rejected states
            o = config.output
            stack.callback(
                close_server, serve_metrics(event, host=o.metrics_host, port=o.metrics_port, event=out.event)
            )
        node = stack.enter_context(
            joined(
                config.network,
                event,
                spec=spec,
                default_identity=DEFAULT_BOOTSTRAP_IDENTITY,
                check_reach=False,
                validators=run_validators(spec.run_id, spec.digest()) if spec is not None else (),
            )
        )
        if config.relay:
            stack.enter_context(_relay(node))
        if config.keeper is not None:
            stack.enter_context(_keeper(node, config, event))
        if config.dashboard is not None:
            stack.enter_context(_dashboard(node, config.dashboard, out))
        _say_ready(node, out, spec_key)
        deadline = time.monotonic() + config.max_seconds if config.max_seconds else None
        while not signals.stop.is_set():
            if spec is not None:
                publish_spec(node.dht, node.identity, spec, ttl=3 * config.refresh_period, signing_key=spec_key)
            signals.stop.wait(config.refresh_period)
            if deadline is not None and time.monotonic() > deadline:
                break
    return 0


def _check_keeper(config: BootstrapConfig) -> None:
    if config.keeper is None:
        return
    if config.spec is None:
        raise SystemExit("--keeper needs --spec: the keeper checks and signs checkpoints of one run spec")
    from peer.checkpoints.keeper import check_signing_key

    try:
        check_signing_key(config.spec, Path(config.keeper.signing_key))
    except Exception as err:  # refuse before opening the DHT: an unusable key is a setup error
        raise SystemExit(f"--keeper: {err}")


def _spec_signing_key(config: BootstrapConfig):
    if config.spec_signing_key is None:
        return None
    try:
        return signing.load_private_key(config.spec_signing_key)
    except Exception as err:
        raise SystemExit(f"--signing-key: {err}")


def _say_ready(node: Joined, out: Output, spec_key) -> None:
    maddrs, spec = visible_maddrs(node.dht), node.spec
    if out.as_json:
        out.event(
            "ready", "bootstrap ready", peer_id=node.peer_id, maddrs=maddrs, digest=spec.digest() if spec else None
        )
        return
    print(f"[swarmtrain] bootstrap {node.peer_id} is up (identity {node.identity.path}). Peers join with:", flush=True)
    for m in maddrs:
        print(f"  --initial-peers {m}", flush=True)
    if spec is not None:
        signed = f", signed by key {signing.fingerprint(spec_key)}" if spec_key is not None else ""
        print(f"[swarmtrain] publishing spec of run {spec.run_id!r}, digest {spec.digest()}{signed}", flush=True)
        print(f"[swarmtrain] peers join with --run {spec.run_id} --spec-digest {spec.digest()}", flush=True)
    print("[swarmtrain] Ctrl-C to stop", flush=True)


@contextlib.contextmanager
def _relay(node: Joined):
    from peer.net.relay import RelayService

    service = RelayService()
    node.loop.run(service.start(node.p2p), timeout=30)
    try:
        yield service
    finally:
        node.loop.run(service.stop(), timeout=10)


@contextlib.contextmanager
def _keeper(node: Joined, config: BootstrapConfig, event):
    """The keeper of ``bootstrap --keeper``: the same checkpoint side a ``run --keeper`` peer has."""
    from peer.node.checkpointing import CheckpointSide

    keeper = config.keeper
    side = CheckpointSide(
        node.spec,
        CheckpointConfig(directory=str(keeper.checkpoint_dir), keeper=keeper),
        NetworkConfig(announce_period=config.network.announce_period, request_timeout=keeper.request_timeout),
        swarm=node.swarm,
        p2p=node.p2p,
        loop=node.loop,
        event=event,
    )
    side.start_keeper(local_state=None)
    try:
        yield side
    finally:
        side.stop()


@contextlib.contextmanager
def _dashboard(node: Joined, where: tuple[str, int], out: Output):
    from peer.observe.dashboard import Dashboard

    host, port = where
    try:
        board = Dashboard(node.swarm, host=host, port=port)
    except OSError as err:
        raise SystemExit(f"--dashboard-port {port}: cannot listen on {host}: {err}")
    board.start()
    out.event("dashboard", f"dashboard of run {node.spec.run_id!r} at {board.url}", url=board.url, port=board.port)
    try:
        yield board
    finally:
        board.close()
