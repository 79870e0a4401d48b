"""Outer mode in a real swarm, with and without outer momentum: a bootstrap and 2 stages x 2 peers (both stage-0 peers train), each
peer in its own process. Every stage group completes rounds with the same bits on both members
(their reported base digests, and the test's own hash of the weights both serve over the state
RPC); a member joining the running group adopts its round state and then holds the same bits;
a member SIGKILLed mid-round leaves the others deciding that round and the next ones alike; the
loss falls."""

from __future__ import annotations

import time
import urllib.request

import pytest
from hivemind.utils import get_dht_time

from peer.observe.status import open_observer, swarm_snapshot

from conftest import TrackedCluster, assert_all_gone, make_tiny_spec, write_text_data
from outer_helpers import metric, round_states, state_hash

# About three minutes a run (20 s rounds): marked slow to keep the default suite well inside its
# budget; .ci/run runs it on its own (`pytest -m slow tests/integration/test_outer_swarm.py`).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

OUTER = dict(round_seconds=20.0, gather_seconds=6.0, agree_seconds=4.0, chunk=256, k=16, bits=2)


@pytest.mark.parametrize("momentum", [0.0, 0.5], ids=["no_momentum", "momentum"])
def test_stage_groups_complete_rounds_and_hold_the_same_bits(tmp_path, momentum):
    spec = make_tiny_spec(run_id="outer", averaging="outer", outer={**OUTER, "outer_momentum": momentum})
    spec_path = tmp_path / "spec.toml"
    spec.save(spec_path)
    data = write_text_data(tmp_path / "data", files=3)
    cluster = TrackedCluster(tmp_path / "cluster")
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

        # A member joining the running group takes its round state and from then on holds the
        # group's bits: without momentum the base weights of one member, checked against what
        # the records announce; with momentum, which no record covers, what two members serve.
        peers["a2"] = cluster.peer("a2", [addr], spec_path=spec_path, stage=0, data=str(data))
        ids["a2"] = peers["a2"].wait_event("ready", 240)["peer_id"]
        joined = peers["a2"].wait_event("outer_joined", 240)
        assert len(joined["sources"]) == (2 if momentum else 1) and joined["epoch"] >= 3
        last = peers["a2"].wait_event("outer_round", 240, lambda e: e["epoch"] >= joined["epoch"] + 2)["round"]
        peers["a0"].wait_event("outer_round", 60, lambda e: e["round"] >= last)  # a0 may log it a moment later
        cluster.track()
        ours = {e["round"]: e for e in peers["a2"].events if e.get("event") == "outer_round"}
        theirs = {e["round"]: e for e in peers["a0"].events if e.get("event") == "outer_round"}
        common = set(ours) & set(theirs)
        assert len(common) >= 2 and all(ours[r]["digest"] == theirs[r]["digest"] for r in common), (ours, theirs)
        assert any(ours[r]["contributions"] == 3 for r in common), ours

        # A member SIGKILLed mid-round, after it published its contribution: the two left decide
        # that round alike (with or without its bytes, as their holdings say) and go on.
        cluster.track()
        now = get_dht_time()
        killed_in = int(now // OUTER["round_seconds"]) + 1
        time.sleep(killed_in * OUTER["round_seconds"] - now + 3.0)
        cluster.kill(peers["a1"])
        for n in ("a0", "a2"):
            peers[n].wait_event("outer_round", 120, lambda e: e["round"] >= killed_in + 1)
        after = [{e["round"]: e for e in peers[n].events if e.get("event") == "outer_round"} for n in ("a0", "a2")]
        for r in (killed_in, killed_in + 1):
            if r in after[0] and r in after[1]:
                assert after[0][r]["digest"] == after[1][r]["digest"], (r, after)
        assert after[0][killed_in + 1]["digest"] == after[1][killed_in + 1]["digest"]
        assert after[0][killed_in + 1]["contributions"] == 2

        # The test's own reading of the members' weights, over the state RPC.
        for stage, pair in ((0, ("a0", "a2")), (1, ("b0", "b1"))):
            (r0, w0), (r1, w1) = round_states(addr, spec, stage, [ids[n] for n in pair])
            assert r0 == r1 >= 3
            assert state_hash(w0) == state_hash(w1), f"stage {stage}: members differ"

        # What /metrics says of it: rounds by outcome, and the bytes the rounds sent.
        text = urllib.request.urlopen(peers["a0"].wait_event("metrics", 10)["url"], timeout=10).read().decode()
        assert metric(text, 'swarmtrain_outer_rounds_total{outcome="applied"}') >= 3
        assert metric(text, 'swarmtrain_sent_bytes_total{kind="averaging"}') > 0
        assert metric(text, 'swarmtrain_received_bytes_total{kind="averaging"}') > 0

        # What `swarmtrain status` shows of it: each member's round state digest, from its record.
        swarm, close = open_observer([addr], spec=spec)
        try:
            view = swarm_snapshot(swarm)
        finally:
            close()
        shown = {p["peer_id"]: p["state_digest"] for st in view["stages"] for p in st["peers"]}
        assert all(len(shown.get(ids[n], "")) == 16 for n in ("a0", "a2", "b0", "b1")), shown

        # The latest loss, after the rounds above (not the first status 50 micro-batches on: the
        # loss of a few micro-batches early in training is too noisy to compare).
        later = peers["a0"].last_event("status")
        assert later["microbatches"] > first_loss["microbatches"] + 50, (first_loss, later)
        assert later["loss"] < first_loss["loss"], (first_loss, later)
        cluster.track()
    finally:
        cluster.close()
        assert_all_gone(cluster.seen)
