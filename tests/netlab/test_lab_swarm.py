"""swarmtrain in the network lab: a bootstrap and 2 stages x 2 peers, each on its own host with
the ``broadband`` profile (10 Mbit/s up, 50 down, 40 ms round-trip, 0.1% loss each way), with
the timeouts ``spec init`` writes (no timeout flags). In outer mode: every member completes
rounds with the same bits as its stage-mate (the digests they log, and the test's own hash of
the weights both serve over the state RPC, read from inside the lab), and the loss falls."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from labkit import assert_rounds_agree, lab_marks, lab_swarm

HERE = Path(__file__).resolve().parent

pytestmark = lab_marks(900)


def test_a_2x2_swarm_across_five_broadband_hosts_trains_and_agrees(tmp_path):
    with lab_swarm(tmp_path, "labswarm") as s:
        hosts = {n: s.lab.add_host(n, "broadband") for n in ("boot", "a0", "a1", "b0", "b1")}
        addr = s.start_bootstrap(hosts["boot"])
        for name in ("b0", "b1", "a0", "a1"):
            s.start_peer(name, hosts[name], stage=1 if name[0] == "b" else 0, data=name[0] == "a")
        peers = s.peers
        ids = {n: p.wait_event("ready", 300)["peer_id"] for n, p in peers.items()}
        s.cluster.track()
        first = peers["a0"].wait_event("status", 300, lambda e: e.get("loss") is not None)

        for p in peers.values():
            p.wait_event("outer_round", 400, lambda e: e["epoch"] >= 4)
        s.cluster.track()
        for pair in (("a0", "a1"), ("b0", "b1")):
            assert_rounds_agree(peers, pair)

        # The test's own hash of what both members serve, read by a DHT client inside the lab.
        reader = [sys.executable, str(HERE / "read_states.py"), addr, str(s.spec_path)]
        for stage, pair in ((0, ("a0", "a1")), (1, ("b0", "b1"))):
            out = s.lab.run(hosts["boot"], [*reader, str(stage), *(ids[n] for n in pair)], timeout=300)
            (r0, h0), (r1, h1) = json.loads(out.strip().splitlines()[-1]).values()
            assert r0 == r1 >= 3 and h0 == h1, (stage, r0, r1, h0, h1)

        # The latest loss, after the rounds above (not the first status 40 micro-batches on: the
        # loss of a few micro-batches early in training is too noisy to compare).
        later = peers["a0"].last_event("status")
        assert later["microbatches"] > first["microbatches"] + 40, (first, later)
        assert later["loss"] < first["loss"], (first, later)
        s.cluster.track()
