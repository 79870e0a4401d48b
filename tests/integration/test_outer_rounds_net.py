"""Outer rounds over real hivemind DHTs and P2P daemons (peer.averaging.rounds): members of one
stage group publish signed contributions, gather them by digest, agree on the set and end with
the same bits; a member whose bytes never arrive, and one whose bytes do not decode, are left
out without delaying the others past the deadline."""

from __future__ import annotations

import concurrent.futures
import hashlib

import numpy as np
import pytest

from peer.averaging.rounds import RoundNet, run_round
from peer.averaging.sparse import SparseConfig, compress
from peer.base import LoopThread
from peer.swarm.dht import start_dht, visible_maddrs
from peer.swarm.identity import cleanup_identity, load_or_create_identity
from protocol import records

pytestmark = pytest.mark.timeout(300)

RUN, DIGEST = "outertest", "ab" * 32
NUMEL = 20_000
CFG = SparseConfig(chunk=256, k=16, bits=2)


@pytest.fixture(scope="module")
def group():
    loop = LoopThread()
    validators = records.run_validators(RUN, DIGEST)
    members, dhts, ids = [], [], []
    try:
        for i in range(4):
            ident = load_or_create_identity(None)
            ids.append(ident)
            dht = start_dht(ident, initial_peers=visible_maddrs(dhts[0]) if dhts else (), validators=validators)
            dhts.append(dht)
            p2p = loop.run(dht.replicate_p2p(), timeout=30)
            net = RoundNet(
                dht,
                p2p,
                loop.run,
                run_id=RUN,
                spec_digest=DIGEST,
                stage=1,
                key=ident.private_key,
                peer_id=str(ident.peer_id),
            )
            loop.run(net.start(), timeout=30)
            members.append(net)
        yield members
    finally:
        for net in members:
            loop.run(net.stop(), timeout=10)
        for dht in dhts:
            dht.shutdown()
        for ident in ids:
            cleanup_identity(ident)
        loop.stop()


def encoded(seed, scale=0.01):
    delta = (np.random.default_rng(seed).standard_normal(NUMEL) * scale).astype(np.float32)
    update, _ = compress(delta, np.zeros(NUMEL, np.float32), CFG)
    return update.to_bytes()


def rounds(members, round_, blobs, **kw):
    kw = dict(numel=NUMEL, config=CFG, max_weight=64.0, gather_s=8.0, agree_s=6.0, **kw)
    with concurrent.futures.ThreadPoolExecutor(len(members)) as pool:
        futures = [pool.submit(run_round, net, round_, blob, 32.0, **kw) for net, blob in zip(members, blobs)]
        return [f.result(timeout=120) for f in futures]


def digest(result):
    return hashlib.sha256(result.aggregate.update.tobytes()).hexdigest()


def test_members_agree_and_hold_the_same_bits(group):
    results = rounds(group[:3], 1, [encoded(i) for i in range(3)], expected=3)
    assert len({digest(r) for r in results}) == 1
    assert all(len(r.agreed) == 3 and r.contributions == 3 for r in results)


def test_a_member_whose_bytes_never_arrive_is_left_out(group):
    silent = group[3]
    from peer.averaging.contribution import Contribution

    blob = encoded(99)
    c = Contribution.sign(
        silent.key, run=silent.run_prefix, stage=1, round_=2, author=silent.peer_id, weight=32.0, blob=blob
    )
    silent.publish(c, len(blob), ttl=120)  # announced, never served (not held)
    results = rounds(group[:3], 2, [encoded(10 + i) for i in range(3)], expected=4)
    assert len({digest(r) for r in results}) == 1
    assert all(c.digest not in r.agreed and len(r.agreed) == 3 for r in results)


def test_bytes_that_do_not_decode_are_left_out(group):
    honest = [encoded(20 + i) for i in range(3)]
    bad = bytearray(encoded(23))
    bad[22:26] = np.float32(np.nan).tobytes()  # the first chunk's scale
    results = rounds(group, 3, [*honest, bytes(bad)], expected=4)
    # Nobody holds the bytes that do not decode, their sender included: all four agree on the
    # three others and hold the same bits.
    assert len({digest(r) for r in results}) == 1
    assert all(len(r.agreed) == 3 for r in results)
    assert np.isfinite(results[0].aggregate.update).all()


def test_an_announcement_one_member_sees_late_is_still_agreed_on(group, monkeypatch):
    """The announcement of c's contribution reaches b only after b's gather deadline (b has
    published what it holds): a and c hold c's bytes, so the rule agrees on them; b then reads
    the announcement, fetches the bytes from a holder, and all three hold the same bits."""
    a, b, c = group[:3]
    blobs = [encoded(40 + i) for i in range(3)]
    hidden = hashlib.sha256(blobs[2]).hexdigest()
    revealed = []
    seen_by_b, publish_holding = b.contributions, b.publish_holding

    def late_view(round_):
        found = seen_by_b(round_)
        return found if revealed else {d: v for d, v in found.items() if d != hidden}

    def publish_then_see(h, ttl):
        assert hidden not in h.digests  # b gathered without it
        revealed.append(True)
        return publish_holding(h, ttl)

    monkeypatch.setattr(b, "contributions", late_view)
    monkeypatch.setattr(b, "publish_holding", publish_then_see)
    results = rounds([a, b, c], 4, blobs)
    assert revealed and len({digest(r) for r in results}) == 1
    assert all(hidden in r.agreed and len(r.agreed) == 3 for r in results)
    assert results[1].contributions == 2  # b held two at its gather deadline, then fetched c's
