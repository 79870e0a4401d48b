"""Helpers of the outer-rounds swarm tests: the test's own reading of members' weights over the
state RPC, and /metrics values."""

from __future__ import annotations

import hashlib
import time

import torch

from peer.base import LoopThread
from peer.checkpoints.state_pull import pull_stage_state
from peer.swarm.dht import start_dht
from peer.swarm.identity import cleanup_identity, load_or_create_identity
from protocol import records


def metric(text: str, key: str) -> float:
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def state_hash(tensors: dict[str, torch.Tensor]) -> str:
    """The test's own hash of a state (not the peers' code): names and raw bytes, sorted by name."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def round_states(addr: str, spec, stage: int, peer_ids: list[str], tries: int = 10) -> list[tuple[int, dict]]:
    """(round, tensors) each peer serves over the state RPC, read until all serve the same round
    (a read may straddle a round boundary), by a DHT client of the test's own."""
    ident = load_or_create_identity(None)
    loop = LoopThread()
    dht = start_dht(ident, initial_peers=[addr], validators=records.run_validators(spec.run_id, spec.digest()))
    try:
        p2p = loop.run(dht.replicate_p2p(), timeout=30)
        for _ in range(tries):
            got = [loop.run(pull_stage_state(p2p, pid, spec, stage), timeout=90) for pid in peer_ids]
            if len({r for r, _ in got}) == 1:
                break
            time.sleep(2.0)
        return [(r, t) for r, t in got]
    finally:
        dht.shutdown()
        loop.stop()
        cleanup_identity(ident)
