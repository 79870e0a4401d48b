"""Outer mode in a real swarm: a bootstrap and 2 stages x 2 peers (both stage-0 peers train), each
peer in its own process. Every stage group completes rounds with the same bits on both members
(their reported base digests, and the test's own hash of the weights both serve over the state
RPC); a member joining the running group adopts its round state and then holds the same bits;
the loss falls."""

from __future__ import annotations

import hashlib
import time
import urllib.request

import pytest
import torch

from peer.base import LoopThread
from peer.checkpoints.state_pull import pull_stage_state
from peer.swarm.dht import start_dht
from peer.swarm.identity import cleanup_identity, load_or_create_identity
from protocol import records

from conftest import TrackedCluster, assert_all_gone, make_tiny_spec, write_text_data

# About three minutes (20 s rounds): marked slow to keep the default suite well inside its
# budget; .ci/run runs it on its own (`pytest -m slow tests/test_outer_swarm.py`).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

OUTER = dict(round_seconds=20.0, gather_seconds=6.0, agree_seconds=4.0, chunk=256, k=16, bits=2)


def metric(text: str, key: str) -> float:
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def state_hash(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def test_stage_groups_complete_rounds_and_hold_the_same_bits(tmp_path):
    spec = make_tiny_spec(run_id="outer", averaging="outer", outer=OUTER)
    spec_path = tmp_path / "spec.toml"
    spec.save(spec_path)
    data = write_text_data(tmp_path / "data", files=3)
    cluster = TrackedCluster(tmp_path / "cluster")
    ident = load_or_create_identity(None)
    dht = loop = None
    try:
        boot, addr = cluster.bootstrap(spec_path=spec_path, timeout=240)
        peers = {
            "a0": cluster.peer(
                "a0", [addr], spec_path=spec_path, stage=0, data=str(data), extra=["--metrics-port", "0"]
            ),
            "a1": cluster.peer("a1", [addr], spec_path=spec_path, stage=0, data=str(data)),
            "b0": cluster.peer("b0", [addr], spec_path=spec_path, stage=1),
            "b1": cluster.peer("b1", [addr], spec_path=spec_path, stage=1),
        }
        ids = {name: p.wait_event("ready", 240)["peer_id"] for name, p in peers.items()}
        cluster.track()
        first_loss = peers["a0"].wait_event("status", 240, lambda e: e.get("loss") is not None)

        # Every peer applies three rounds; in each round both members of a stage agree.
        for name, p in peers.items():
            p.wait_event("outer_round", 300, lambda e: e["epoch"] >= 4)
        for pair in (("a0", "a1"), ("b0", "b1")):
            rounds = [{e["round"]: e for e in peers[n].events if e.get("event") == "outer_round"} for n in pair]
            common = set(rounds[0]) & set(rounds[1])
            assert len(common) >= 3, rounds
            assert all(rounds[0][r]["digest"] == rounds[1][r]["digest"] for r in common), rounds
            # A member that opened its stage just before a boundary may miss its first round: the
            # other one's contribution alone is then the agreed set, on both.
            assert sum(rounds[0][r]["contributions"] == 2 for r in common) >= 3, rounds

        # A member joining the running group takes the round state two members serve, and from
        # then on holds the group's bits.
        peers["a2"] = cluster.peer("a2", [addr], spec_path=spec_path, stage=0, data=str(data))
        joined = peers["a2"].wait_event("outer_joined", 240)
        assert len(joined["sources"]) == 2 and joined["epoch"] >= 3
        last = peers["a2"].wait_event("outer_round", 240, lambda e: e["epoch"] >= joined["epoch"] + 2)["round"]
        peers["a0"].wait_event("outer_round", 60, lambda e: e["round"] >= last)  # a0 may log it a moment later
        cluster.track()
        ours = {e["round"]: e for e in peers["a2"].events if e.get("event") == "outer_round"}
        theirs = {e["round"]: e for e in peers["a0"].events if e.get("event") == "outer_round"}
        common = set(ours) & set(theirs)
        assert len(common) >= 2 and all(ours[r]["digest"] == theirs[r]["digest"] for r in common), (ours, theirs)
        assert any(ours[r]["contributions"] == 3 for r in common), ours

        # The test's own reading of the members' weights, over the state RPC.
        loop = LoopThread()
        dht = start_dht(ident, initial_peers=[addr], validators=records.run_validators(spec.run_id, spec.digest()))
        p2p = loop.run(dht.replicate_p2p(), timeout=30)
        for stage, pair in ((0, ("a0", "a1")), (1, ("b0", "b1"))):
            for _ in range(10):
                got = [loop.run(pull_stage_state(p2p, ids[n], spec, stage), timeout=90) for n in pair]
                if got[0][0] == got[1][0]:  # the same round on both (not across a boundary)
                    break
                time.sleep(2.0)
            assert got[0][0] == got[1][0] >= 3
            assert state_hash(got[0][1]) == state_hash(got[1][1]), f"stage {stage}: members differ"

        # What /metrics says of it: rounds by outcome, and the bytes the rounds sent.
        text = urllib.request.urlopen(peers["a0"].wait_event("metrics", 10)["url"], timeout=10).read().decode()
        assert metric(text, 'swarmtrain_outer_rounds_total{outcome="applied"}') >= 3
        assert metric(text, 'swarmtrain_sent_bytes_total{kind="averaging"}') > 0
        assert metric(text, 'swarmtrain_received_bytes_total{kind="averaging"}') > 0

        later = peers["a0"].wait_event(
            "status", 120, lambda e: e.get("loss") is not None and e["microbatches"] > first_loss["microbatches"] + 50
        )
        assert later["loss"] < first_loss["loss"], (first_loss, later)
        cluster.track()
    finally:
        if dht is not None:
            dht.shutdown()
        if loop is not None:
            loop.stop()
        cleanup_identity(ident)
        cluster.close()
        assert_all_gone(cluster.seen)
