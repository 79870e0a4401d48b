"""A poisoned member of an outer-rounds stage group, through the real wire (finding 13 of
docs/security.md): a bootstrap, a stage-0 peer that trains and two stage-1 peers in outer mode,
each in its own process, and a real attacker process (tests/hostile/attacker.py
``outer-poison``) that joins stage 1's rounds as a third member. Each round it sends another
attack (an honest contribution sign-flipped and scaled x10, noise at 10x, NaN scales, a constant
direction at 10x) and claims 1e9 samples. The honest members must drop or clip every one, keep
agreeing bit for bit (the test hashes the weights both serve over the state RPC), keep finite
weights, and keep training. Then a liar (``outer-junk``) announces contributions in another
member's name, claiming 2 GiB, or served with other bytes than it signed, and sends the
round RPC malformed requests: the two honest members leave all of it out and agree. Last, a
forger announces the group's round state and serves other weights: a joiner takes nothing
from it and joins with the group's bits."""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import TrackedCluster, assert_all_gone, dump_logs, make_tiny_spec, write_text_data
from outer_helpers import metric, round_states, state_hash

pytestmark = [pytest.mark.hostile, pytest.mark.timeout(900)]

ATTACKER = Path(__file__).with_name("attacker.py")
OUTER = dict(round_seconds=20.0, gather_seconds=6.0, agree_seconds=4.0, chunk=256, k=16, bits=2)
ATTACKS = ("sign_flip_x10", "noise", "nan", "constant")


def test_a_poisoned_member_of_three_is_dropped_or_clipped(tmp_path):
    spec = make_tiny_spec(run_id="outerpoison", averaging="outer", outer=OUTER)
    spec_path = tmp_path / "spec.toml"
    spec.save(spec_path)
    data = write_text_data(tmp_path / "data", files=3)
    cluster = TrackedCluster(tmp_path / "cluster")
    try:
        _boot, addr = cluster.bootstrap(spec_path=spec_path, timeout=240)
        peers = {
            "b0": cluster.peer("b0", [addr], spec_path=spec_path, stage=1, extra=["--metrics-port", "0"]),
            "b1": cluster.peer("b1", [addr], spec_path=spec_path, stage=1),
            "a0": cluster.peer("a0", [addr], spec_path=spec_path, stage=0, data=str(data)),
        }
        ids = {name: p.wait_event("ready", 240)["peer_id"] for name, p in peers.items()}
        cluster.track()
        for name in ("b0", "b1"):
            peers[name].wait_event("outer_round", 240, lambda e: e["contributions"] == 2)
        before = peers["a0"].wait_event("status", 60, lambda e: e.get("loss") is not None)

        rounds = len(ATTACKS) + 1
        attacker = cluster.start(
            "attacker",
            [
                "outer-poison",
                "--initial-peers",
                addr,
                "--spec",
                str(spec_path),
                "--stage",
                "1",
                "--seconds",
                str(rounds * OUTER["round_seconds"]),
            ],
            command=[sys.executable, str(ATTACKER)],
        )
        attacker.wait_event("ready", 120)
        cluster.track()
        done = attacker.wait_event("done", rounds * OUTER["round_seconds"] + 120)
        poisoned = {e["round"]: e for e in attacker.events if e.get("event") == "poisoning"}
        assert {e["attack"] for e in poisoned.values()} == set(ATTACKS), (poisoned, done)
        assert all(e["saw_honest"] for e in poisoned.values()), poisoned
        last = max(poisoned)
        for name in ("b0", "b1"):
            peers[name].wait_event("outer_round", 120, lambda e: e["round"] >= last)

        # Every poisoned round: both honest members applied it, with the same bits, and left the
        # attacker's contribution out (NaN: nobody holds bytes that do not decode) or cut it down.
        logged = {n: {e["round"]: e for e in peers[n].events if e.get("event") == "outer_round"} for n in ("b0", "b1")}
        for r, attack in ((r, e["attack"]) for r, e in poisoned.items()):
            b0, b1 = logged["b0"].get(r), logged["b1"].get(r)
            assert b0 is not None and b1 is not None, (r, attack, logged)
            assert b0["digest"] == b1["digest"], (r, attack, b0, b1)
            if attack == "nan":
                assert b0["contributions"] == 2, (attack, b0)
            else:
                assert b0["contributions"] == 3 and b0["clipped"] + b0["dropped"] >= 1, (attack, b0)

        text = urllib.request.urlopen(peers["b0"].wait_event("metrics", 10)["url"], timeout=10).read().decode()
        assert (
            metric(text, 'swarmtrain_outer_contributions_total{kind="dropped"}')
            + metric(text, 'swarmtrain_outer_contributions_total{kind="clipped"}')
            >= len(ATTACKS) - 1
        )
        # NaN scales: the bytes decode for no member, so no one holds them: "not agreed".
        assert metric(text, 'swarmtrain_outer_dropped_total{reason="not_agreed"}') >= 1

        # The test's own reading of both members' weights: the same bits, all finite.
        (r0, w0), (r1, w1) = round_states(addr, spec, 1, [ids["b0"], ids["b1"]])
        assert r0 == r1 and state_hash(w0) == state_hash(w1)
        assert all(bool(torch.isfinite(t).all()) for t in w0.values())

        # Lies about contributions, and malformed requests to the round RPC: nothing gets in.
        liar = cluster.start(
            "liar",
            [
                "outer-junk",
                "--initial-peers",
                addr,
                "--spec",
                str(spec_path),
                "--stage",
                "1",
                "--target",
                ids["b0"],
                "--seconds",
                str(3 * OUTER["round_seconds"]),
            ],
            command=[sys.executable, str(ATTACKER)],
        )
        liar.wait_event("ready", 120)
        cluster.track()
        junk = liar.wait_event("done", 4 * OUTER["round_seconds"] + 120)["results"]
        lies = {e["round"]: e["lie"] for e in liar.events if e.get("event") == "lying"}
        assert set(lies.values()) == {"forged-author", "huge-size", "wrong-bytes"}, (lies, junk)
        assert any(k.startswith("answered") for k in junk), junk  # error replies, not a crash
        for name in ("b0", "b1"):
            peers[name].wait_event("outer_round", 120, lambda e: e["round"] >= max(lies))
        logged = {n: {e["round"]: e for e in peers[n].events if e.get("event") == "outer_round"} for n in ("b0", "b1")}
        for r, lie in lies.items():
            b0, b1 = logged["b0"].get(r), logged["b1"].get(r)
            assert b0 is not None and b1 is not None and b0["digest"] == b1["digest"], (r, lie, b0, b1)
            assert b0["contributions"] == 2, (lie, b0)
        assert peers["b0"].alive() and peers["b1"].alive()

        # A stranger whose record announces the group's round state and whose state server
        # serves other weights: a joiner asks it first (its peer id sorts first), takes nothing
        # from it, reads the group's weights from an honest member and holds the group's bits.
        forger = cluster.start(
            "forger",
            ["outer-fake-state", "--initial-peers", addr, "--spec", str(spec_path), "--stage", "1",
             "--target", min(ids["b0"], ids["b1"]), "--seconds", "400"],
            command=[sys.executable, str(ATTACKER)],
        )  # fmt: skip
        forger_id = forger.wait_event("ready", 120)["peer_id"]
        forger.wait_event("attacking", 120, lambda e: e["digest"] != "")
        peers["b2"] = cluster.peer("b2", [addr], spec_path=spec_path, stage=1)
        joined = peers["b2"].wait_event("outer_joined", 300)
        cluster.track()
        assert joined["sources"] and forger_id not in joined["sources"], (joined, forger_id)
        assert set(joined["sources"]) <= {ids["b0"], ids["b1"]}, joined
        asked = [e for e in peers["b2"].events if e.get("event") == "outer_join_skip"]
        assert any(e["source"] == forger_id and "the group announces" in e["why"] for e in asked), asked
        r = peers["b2"].wait_event("outer_round", 120)["round"]
        peers["b0"].wait_event("outer_round", 60, lambda e: e["round"] >= r)
        mine = {e["round"]: e["digest"] for e in peers["b2"].events if e.get("event") == "outer_round"}
        theirs = {e["round"]: e["digest"] for e in peers["b0"].events if e.get("event") == "outer_round"}
        assert mine[r] == theirs[r], (r, mine, theirs)

        after = peers["a0"].wait_event(
            "status", 120, lambda e: e.get("loss") is not None and e["microbatches"] > before["microbatches"] + 50
        )
        assert after["loss"] < before["loss"], (before, after)
        cluster.track()
    except Exception:
        print(dump_logs(cluster))
        raise
    finally:
        cluster.close()
        assert_all_gone(cluster.seen)
