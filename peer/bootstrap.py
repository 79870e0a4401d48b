"""A bootstrap node: a DHT peer with a persistent identity that others dial first, and that
publishes the run spec for peers joining by run id."""

from __future__ import annotations

import signal
import threading
import time
from typing import Optional, Sequence

from peer.identity import load_or_create_identity
from peer.node import Output
from peer.swarm_dht import publish_spec, start_dht, visible_maddrs
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
) -> int:
    out = Output(log_json)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ident = load_or_create_identity(identity or "~/.swarmtrain/bootstrap.id")
    validators = run_validators(spec.run_id, spec.digest()) if spec is not None else ()
    dht = start_dht(ident, initial_peers=initial_peers, host_maddrs=host_maddrs, announce_maddrs=announce_maddrs,
                    validators=validators)
    try:
        maddrs = visible_maddrs(dht)
        if log_json:
            out.event("ready", "bootstrap ready", peer_id=str(ident.peer_id), maddrs=maddrs,
                      digest=spec.digest() if spec else None)
        else:
            print(f"[swarmtrain] bootstrap {ident.peer_id} is up (identity {ident.path}). Peers join with:", flush=True)
            for m in maddrs:
                print(f"  --initial-peers {m}", flush=True)
            if spec is not None:
                print(f"[swarmtrain] publishing spec of run {spec.run_id!r}, digest {spec.digest()}", flush=True)
            print("[swarmtrain] Ctrl-C to stop", flush=True)
        deadline = time.monotonic() + max_seconds if max_seconds else None
        while not stop.is_set():
            if spec is not None:
                publish_spec(dht, ident, spec, ttl=3 * refresh_period)
            stop.wait(refresh_period)
            if deadline is not None and time.monotonic() > deadline:
                break
    finally:
        dht.shutdown()
        out.event("stopped", "bootstrap stopped")
    return 0
