"""Relaying at the application level (peer.net.relay, peer.net.reach), the policies as pure
functions: which addresses to dial back, the reachability verdict, routes, a relayed peer's prior."""

from __future__ import annotations

import pytest

from peer.net.reach import RelayAnswer, verdict
from peer.net.relay import dialable, split_maddr
from peer.net.routes import Routes
from peer.pipeline.routing import RELAYED_PRIOR_FACTOR, announced_prior


def test_dial_back_only_on_the_address_the_connection_comes_from():
    said = ["/ip4/192.168.1.2/tcp/4000", "/ip4/10.0.0.7/tcp/4001/p2p/Qm", "/ip4/10.0.0.7/udp/4001/quic",
            "/ip4/10.0.0.7/tcp/0", "/ip4/10.0.0.7/tcp/99999", "/ip6/::1/tcp/5", "/dns/x/tcp/1", "junk"]  # fmt: skip
    assert dialable(said, "/ip4/10.0.0.7/tcp/51234") == ["/ip4/10.0.0.7/tcp/4001"]
    assert dialable(said, "") == []  # no connection seen: dial nothing
    many = ["/ip4/1.2.3.4/tcp/1"] * 100 + ["/ip4/1.2.3.4/tcp/2"]
    assert dialable(many, "/ip4/1.2.3.4/tcp/9") == ["/ip4/1.2.3.4/tcp/1"]  # 64 read, duplicates once


def test_split_maddr_needs_a_peer_id():
    assert split_maddr("/ip4/1.2.3.4/tcp/5/p2p/QmX") == ("/ip4/1.2.3.4/tcp/5", "QmX")
    with pytest.raises(ValueError, match="names no peer"):
        split_maddr("/ip4/1.2.3.4/tcp/5")


def test_verdict_one_dial_back_is_enough_and_silence_tells_nothing():
    assert verdict([RelayAnswer("a", False, "/ip4/9.9.9.9/tcp/1"), RelayAnswer("b", True)]).reachable is True
    no = verdict([RelayAnswer("a", False, "/ip4/9.9.9.9/tcp/1"), RelayAnswer("b", None, error="timeout")])
    assert no.reachable is False and no.observed == "/ip4/9.9.9.9/tcp/1" and "1 relay(s)" in no.why
    unknown = verdict([RelayAnswer("a", None, error="refused")])
    assert unknown.reachable is None and "refused" in unknown.why
    assert verdict([]).reachable is None


def test_routes_follow_each_sources_latest_read():
    routes = Routes()
    routes.learn("peers", [("p1", "r1"), ("p2", ""), ("p3", "p3")])  # a peer is never its own relay
    assert (routes.via("p1"), routes.via("p2"), routes.via("p3")) == ("r1", None, None)
    routes.learn("peers", [("p2", "r2")])
    assert (routes.via("p1"), routes.via("p2")) == (None, "r2")
    # A read of the teacher records keeps the stage peers' routes, and the reverse.
    routes.learn("teachers", [("t1", "r1")])
    assert (routes.via("p2"), routes.via("t1")) == ("r2", "r1")
    routes.learn("peers", [])
    assert (routes.via("p2"), routes.via("t1")) == (None, "r1")
    routes.set("p9", "r9")
    routes.learn("teachers", [])
    assert (routes.via("p9"), routes.via("t1")) == ("r9", None)


def test_a_relayed_peer_counts_less_until_measured():
    assert announced_prior(10.0, relayed=False) == 10.0
    assert announced_prior(10.0, relayed=True) == 10.0 * RELAYED_PRIOR_FACTOR < 10.0
