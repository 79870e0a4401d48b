"""A bootstrap node: a DHT peer with a persistent identity that others dial first, and that
publishes the run spec for peers joining by run id. With ``keeper`` it is also the keeper
(``peer.checkpoints.keeper``): it signs, keeps, serves and announces checkpoints of every stage."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

from peer.base import Output
from peer.base.config import CheckpointConfig, KeeperConfig, NetworkConfig
from peer.swarm.dht import publish_spec, start_dht, visible_maddrs
from peer.swarm.identity import load_or_create_identity
from protocol import signing
from protocol.records import run_validators
from protocol.spec import RunSpec


def run_bootstrap(
    *,
    host_maddrs: Sequence[str],
    announce_maddrs: Sequence[str] = (),
    identity: Optional[str] = None,
    initial_peers: Sequence[str] = (),
    spec: Optional[RunSpec] = None,
    log_json: bool = False,
    refresh_period: float = 30.0,
    max_seconds: Optional[float] = None,
    keeper: Optional[KeeperConfig] = None,
    spec_signing_key: Optional[str] = None,
    announce_period: float = 5.0,
    dashboard: Optional[tuple[str, int]] = None,
    metrics: Optional[tuple[str, int]] = None,
    relay: bool = True,
) -> int:
    """``keeper``: a ``KeeperConfig`` to run the keeper here (needs ``spec``). ``spec_signing_key``:
    a private key file that signs the published spec (peers that trust its public key join by
    run id without a pinned digest).
    ``dashboard``: (host, port) to serve the run's web dashboard (``peer.observe.dashboard``) too.
    ``metrics``: (host, port) to serve Prometheus metrics: the count of each event it reported
    (the keeper's signatures, refusals and rejected states).
    ``relay``: answer peers' reachability checks and forward streams to peers behind routers
    that nobody can dial (``peer.net.relay``)."""
    out = Output(log_json)
    event = out.event
    counts = None
    if metrics is not None:
        from peer.observe.events import EventCounts

        host, port = metrics
        counts = EventCounts(out.event)
        try:
            port = counts.serve(port, host=host)
        except OSError as err:
            raise SystemExit(f"--metrics-port {port}: cannot listen on {host}: {err}")
        url = f"http://{host}:{port}/metrics"
        out.event("metrics", f"Prometheus metrics at {url}", port=port, url=url)
        event = counts
    if dashboard is not None and spec is None:
        raise SystemExit("--dashboard-port needs --spec: the dashboard shows one run")
    if keeper is not None:
        if spec is None:
            raise SystemExit("--keeper needs --spec: the keeper checks and signs checkpoints of one run spec")
        from peer.checkpoints.keeper import check_signing_key

        try:
            check_signing_key(spec, Path(keeper.signing_key))
        except Exception as err:  # refuse before opening the DHT: an unusable key is a setup error
            raise SystemExit(f"--keeper: {err}")
    spec_key = None
    if spec_signing_key is not None:
        try:
            spec_key = signing.load_private_key(spec_signing_key)
        except Exception as err:
            raise SystemExit(f"--signing-key: {err}")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ident = load_or_create_identity(identity or "~/.swarmtrain/bootstrap.id")
    validators = run_validators(spec.run_id, spec.digest()) if spec is not None else ()
    dht = start_dht(
        ident,
        initial_peers=initial_peers,
        host_maddrs=host_maddrs,
        announce_maddrs=announce_maddrs,
        validators=validators,
    )
    keeper_parts = board = relay_parts = None
    try:
        if relay:
            relay_parts = _start_relay(dht)
        if keeper is not None:
            keeper_parts = _start_keeper(dht, ident, spec, keeper, event, announce_period)
        if dashboard is not None:
            board = _start_dashboard(dht, ident, spec, dashboard, out)
        maddrs = visible_maddrs(dht)
        if log_json:
            out.event(
                "ready",
                "bootstrap ready",
                peer_id=str(ident.peer_id),
                maddrs=maddrs,
                digest=spec.digest() if spec else None,
            )
        else:
            print(f"[swarmtrain] bootstrap {ident.peer_id} is up (identity {ident.path}). Peers join with:", flush=True)
            for m in maddrs:
                print(f"  --initial-peers {m}", flush=True)
            if spec is not None:
                signed = f", signed by key {signing.fingerprint(spec_key)}" if spec_key is not None else ""
                print(
                    f"[swarmtrain] publishing spec of run {spec.run_id!r}, digest {spec.digest()}{signed}", flush=True
                )
                print(f"[swarmtrain] peers join with --run {spec.run_id} --spec-digest {spec.digest()}", flush=True)
            print("[swarmtrain] Ctrl-C to stop", flush=True)
        deadline = time.monotonic() + max_seconds if max_seconds else None
        while not stop.is_set():
            if spec is not None:
                publish_spec(dht, ident, spec, ttl=3 * refresh_period, signing_key=spec_key)
            stop.wait(refresh_period)
            if deadline is not None and time.monotonic() > deadline:
                break
    finally:
        if board is not None:
            board.close()
        if counts is not None:
            counts.close()
        if keeper_parts is not None:
            _stop_keeper(*keeper_parts)
        if relay_parts is not None:
            _stop_relay(*relay_parts)
        dht.shutdown()
        out.event("stopped", "bootstrap stopped")
    return 0


def _start_relay(dht):
    from peer.base import LoopThread
    from peer.net.relay import RelayService

    loop = LoopThread()
    service = RelayService()
    loop.run(service.start(loop.run(dht.replicate_p2p(), timeout=30)), timeout=30)
    return service, loop


def _stop_relay(service, loop) -> None:
    try:
        loop.run(service.stop(), timeout=10)
    finally:
        loop.stop()


def _start_dashboard(dht, ident, spec: RunSpec, where: tuple[str, int], out: Output):
    from peer.observe.dashboard import Dashboard
    from peer.swarm.dht import SwarmDHT

    host, port = where
    try:
        board = Dashboard(SwarmDHT(dht, spec, ident), host=host, port=port)
    except OSError as err:
        raise SystemExit(f"--dashboard-port {port}: cannot listen on {host}: {err}")
    board.start()
    out.event("dashboard", f"dashboard of run {spec.run_id!r} at {board.url}", url=board.url, port=board.port)
    return board


def _start_keeper(dht, ident, spec: RunSpec, config: KeeperConfig, event, announce_period: float):
    """The keeper of ``bootstrap --keeper``: the same checkpoint side a ``run --keeper`` peer has."""
    from peer.base import LoopThread
    from peer.node.checkpointing import CheckpointSide
    from peer.swarm.dht import SwarmDHT

    loop = LoopThread()
    p2p = loop.run(dht.replicate_p2p(), timeout=30)
    side = CheckpointSide(
        spec,
        CheckpointConfig(directory=str(config.checkpoint_dir), keeper=config),
        NetworkConfig(announce_period=announce_period, request_timeout=config.request_timeout),
        swarm=SwarmDHT(dht, spec, ident),
        p2p=p2p,
        loop=loop,
        event=event,
    )
    side.start_keeper(local_state=None)
    return side, loop


def _stop_keeper(side, loop) -> None:
    side.stop()
    loop.stop()
