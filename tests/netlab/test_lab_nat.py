"""Volunteers behind home routers, in the network lab: with no port forwarding and no extra
flag, a peer behind NAT finds out at start that nobody can dial it, joins the DHT as a client,
takes a reservation at the bootstrap (which relays by default) and serves its stage through it.

One swarm on the ``broadband`` profile, in outer mode: a bootstrap and a trainer ``a0`` on
public addresses; ``t0``, a trainer behind its own NAT (stage 0); ``b0`` and ``b1``, each
behind its own NAT, the two members of stage 1. Shown: every NATed peer is told it is
unreachable and serves through the relay; trainers' micro-batches reach both stage-1 peers
(through the relay: nobody can dial them); the NATed trainer's loss falls; the two NATed
members of stage 1 complete rounds together, both contributions in each, with the same bits."""

from __future__ import annotations

from labkit import assert_rounds_agree, lab_marks, lab_swarm

pytestmark = lab_marks(900)


def test_peers_behind_nat_serve_train_and_average_through_the_bootstrap_relay(tmp_path):
    with lab_swarm(tmp_path, "labnat") as s:
        hosts = {"boot": s.lab.add_host("boot", "broadband"), "a0": s.lab.add_host("a0", "broadband")}
        hosts.update({n: s.lab.add_host(n, "broadband", nat=True) for n in ("t0", "b0", "b1")})
        addr = s.start_bootstrap(hosts["boot"])
        for name in ("b0", "b1", "a0", "t0"):
            s.start_peer(name, hosts[name], stage=1 if name[0] == "b" else 0, data=name[0] in "at")
        peers = s.peers
        for p in peers.values():
            p.wait_event("ready", 300)
        s.cluster.track()
        for name in ("t0", "b0", "b1"):
            told = peers[name].wait_event("unreachable", 5)
            assert told["observed"].startswith(f"/ip4/{hosts[name].public_addr}/"), told  # its router's address
            assert peers[name].wait_event("relayed", 5)["via"] in addr
        assert peers["a0"].wait_event("reachable", 5)["observed"].startswith(f"/ip4/{hosts['a0'].addr}/")

        first = peers["t0"].wait_event("status", 300, lambda e: e.get("loss") is not None)
        for name in ("b0", "b1"):
            peers[name].wait_event("outer_round", 400, lambda e: e["epoch"] >= 4)
            peers[name].wait_event("status", 60, lambda e: e["served"] > 0)
        s.cluster.track()
        assert_rounds_agree(peers, ("b0", "b1"))

        later = peers["t0"].wait_event(
            "status", 300, lambda e: e.get("loss") is not None and e["microbatches"] > first["microbatches"] + 40
        )
        assert later["loss"] < first["loss"], (first, later)
        s.cluster.track()
