"""Outer rounds' trust: signed contributions and holdings, the agreement rule, the outer step
(peer.averaging.contribution, peer.averaging.outer_step)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hivemind.utils.crypto import RSAPrivateKey

from peer.averaging.contribution import (
    Contribution,
    ContributionRejected,
    Holding,
    NoQuorum,
    agreed_set,
    blob_digest,
)
from peer.averaging.outer_step import OuterNesterov
from peer.swarm.identity import peer_id_of_ssh_public_key

RUN = "r.0123456789abcdef"


@pytest.fixture(scope="module")
def members():
    keys = [RSAPrivateKey() for _ in range(4)]
    return [(k, peer_id_of_ssh_public_key(k.get_public_key().to_bytes())) for k in keys]


def contribution(member, blob=b"update", round_=3, weight=64.0):
    key, author = member
    return Contribution.sign(key, run=RUN, stage=1, round_=round_, author=author, weight=weight, blob=blob)


def test_a_signed_contribution_verifies_from_any_source(members):
    c = contribution(members[0])
    c.verify(run=RUN, stage=1, round_=3, blob=b"update")
    c.verify(run=RUN, stage=1, round_=3)  # the announcement alone, before the bytes are fetched


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(weight=1e9), "does not verify"),  # a claim changed after signing
        (dict(round=4), "not this round"),
        (dict(run="other.0123456789abcdef"), "not this round"),
        (dict(digest="0" * 64), "does not verify"),
        (dict(digest="zz"), "64 hex digits"),
        (dict(weight=float("nan")), "not a number"),
        (dict(signature=b"\x00" * 256), "does not verify"),
        (dict(public_key=b"garbage"), "unreadable public key"),
    ],
)
def test_a_tampered_contribution_is_refused(members, change, message):
    c = dataclasses.replace(contribution(members[0]), **change)
    with pytest.raises(ContributionRejected, match=message):
        c.verify(run=RUN, stage=1, round_=3)


def test_a_contribution_in_another_members_name_or_with_other_bytes_is_refused(members):
    mine = contribution(members[0])
    # Re-signed by member 1 but naming member 0 as its author.
    forged = Contribution.sign(members[1][0], run=RUN, stage=1, round_=3, author=members[0][1], weight=64.0, blob=b"x")
    with pytest.raises(ContributionRejected, match="not by its author"):
        forged.verify(run=RUN, stage=1, round_=3)
    with pytest.raises(ContributionRejected, match="do not match the signed digest"):
        mine.verify(run=RUN, stage=1, round_=3, blob=b"other bytes")


def holding(member, digests, round_=3):
    key, peer_id = member
    return Holding.sign(key, run=RUN, stage=1, round_=round_, member=peer_id, digests=digests)


def test_holdings_verify_and_refuse_tampering(members):
    d = [blob_digest(bytes([i])) for i in range(3)]
    h = holding(members[0], d)
    h.verify(run=RUN, stage=1, round_=3)
    with pytest.raises(ContributionRejected, match="does not verify"):
        dataclasses.replace(h, digests=tuple(sorted(d[:2]))).verify(run=RUN, stage=1, round_=3)
    with pytest.raises(ContributionRejected, match="sorted"):
        dataclasses.replace(h, digests=tuple(reversed(h.digests))).verify(run=RUN, stage=1, round_=3)


def test_the_agreed_set_is_what_most_contributors_hold(members):
    ids = [m[1] for m in members]
    a, b, c, late = (blob_digest(bytes([i])) for i in range(4))
    holdings = [
        holding(members[0], [a, b, c, late]),  # saw the late one in time
        holding(members[1], [a, b, c]),
        holding(members[2], [a, b, c]),
        holding(members[3], [a, b, c, late]),
    ]
    assert agreed_set(holdings, ids) == {a, b, c}  # 'late' is held by 2 of 4: not a majority
    # The same answer whatever order the holdings were read in.
    assert agreed_set(list(reversed(holdings)), ids) == {a, b, c}
    # A stranger's holdings (and a second holding of a member) do not count.
    stranger = (RSAPrivateKey(), None)
    stranger = (stranger[0], peer_id_of_ssh_public_key(stranger[0].get_public_key().to_bytes()))
    extra = [holding(stranger, [late]) for _ in range(5)] + [holding(members[1], [late])]
    assert agreed_set(holdings + extra, ids) == {a, b, c}
    # Two of four contributors said what they hold: no decision.
    with pytest.raises(NoQuorum):
        agreed_set(holdings[:2], ids)


def test_the_outer_step_is_nesterov_and_the_same_bits_with_any_thread_count():
    rng = np.random.default_rng(0)
    start = rng.standard_normal(10_000).astype(np.float32)
    updates = [rng.standard_normal(10_000).astype(np.float32) * 1e-2 for _ in range(3)]
    results = set()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        opt, w = OuterNesterov(lr=0.7, momentum=0.9), start
        for u in updates:
            w = opt.step(w, u)
        results.add(w.tobytes())
    torch.set_num_threads(1)
    assert len(results) == 1
    # Against a float64 reading of the same rule.
    m = np.zeros(10_000)
    ref = start.astype(np.float64)
    for u in updates:
        m = 0.9 * m + u
        ref = ref - 0.7 * (u + 0.9 * m)
    assert np.allclose(np.frombuffer(results.pop(), dtype=np.float32), ref, atol=1e-5)
    with pytest.raises(ValueError):
        OuterNesterov(lr=0.7).step(start, updates[0][:10])


def test_drop_reasons_have_few_labels():
    from peer.averaging.outer import DROP_REASONS, drop_reason

    assert drop_reason("not finite") == "not_finite"
    assert drop_reason("weight inf is not a positive number") == "bad_weight"
    assert drop_reason("points against most of the others") == "opposed"
    assert drop_reason("something new") == "other"
    assert set(DROP_REASONS.values()) == {"not_agreed", "not_finite", "bad_weight", "opposed"}


class _InThread:
    """The stage worker's ``call`` without its thread: runs the function here."""

    def call(self, fn, timeout=None):
        return fn()


class _ServedGroup:
    """An outer group whose read returns ``served`` (the network faked; the decision is real)."""

    def __init__(self, served):
        self.served = served

    def read(self, purpose, *, round_busy_s):
        return self.served

    def rounds_behind_on_same_bits(self, history):
        return None

    def behind(self, history, epoch):
        return None


def test_after_a_missed_round_a_member_takes_the_group_state_only_when_it_is_ahead():
    from peer.averaging.flat import flat_of
    from peer.averaging.group import RoundState
    from peer.averaging.outer import OuterOptimizer
    from peer.model.llama import LlamaStage
    from protocol.spec import preset_spec

    spec = preset_spec("tiny", stages=2, training=dict(averaging="outer"))
    torch.manual_seed(0)
    module, group = LlamaStage.from_spec(spec, 1), LlamaStage.from_spec(spec, 1)
    events = []
    served = _ServedGroup(None)
    opt = OuterOptimizer(spec, 1, module, net=None, group=served, event=lambda name, text, **kw: events.append(name))
    opt.worker = _InThread()
    tensors = {n: p.detach().clone() for n, p in group.named_parameters()}
    base = flat_of(tensors, opt.names)
    served.served = RoundState(round=0, base=base, momentum=np.zeros_like(base), sources=("a", "b"))
    mine = [p.detach().clone() for p in module.parameters()]

    opt._missed = True
    opt.catch_up()  # the group is not ahead (an undecided round for everyone): keep going
    assert not opt._missed and opt.local_epoch == 0 and "outer_resynced" not in events
    assert all(torch.equal(a, b) for a, b in zip(mine, module.parameters()))

    served.served = dataclasses.replace(served.served, round=3)
    opt._missed = True
    opt.catch_up()
    assert opt.local_epoch == 3 and events[-1] == "outer_resynced"
    assert all(torch.equal(p, group.get_parameter(n)) for n, p in module.named_parameters())
    assert opt.round_state()[2] == 3

    # Same round, other bits (a join that was refused, a round applied differently): adopt.
    for p in module.parameters():
        p.data.add_(1.0)
    opt.base, opt.digest = opt.flat.read(), "other"
    opt.catch_up("records")
    assert events[-1] == "outer_resynced" and opt.history[3] == opt.digest[:16]
    assert all(torch.equal(p, group.get_parameter(n)) for n, p in module.named_parameters())
    n = len(events)
    opt.catch_up("records")  # the same bits already: nothing to do
    assert len(events) == n


def test_a_member_reads_the_group_again_only_when_two_mates_or_a_mate_ahead_say_so():
    from peer.averaging.group import behind_group

    mine = {4: "a" * 16, 5: "b" * 16}

    def why(mates, lone=True):
        return behind_group(mine, 5, mates, lone_mate_trusted=lone)

    assert why([(5, "b" * 16), (5, "b" * 16)]) is None  # in step
    assert why([(4, "a" * 16), (5, "b" * 16)]) is None  # a mate's record lags a round
    assert "round 6" in why([(6, "c" * 16), (6, "c" * 16)])  # two mates applied a round this one missed
    assert "holds round 5 as base cccc" in why([(5, "c" * 16), (5, "c" * 16), (5, "b" * 16)])
    assert "holds round 4" in why([(4, "c" * 16), (4, "c" * 16)])  # records a round late, still other bits
    assert why([(5, "c" * 16), (5, "d" * 16)]) is None  # two mates that disagree decide nothing
    assert why([(9, "c" * 16), (9, "")]) is None  # per_step records and joiners announce no digest
    assert why([(5, "c" * 16)]) is None  # one mate, same round, other bits: nobody can tell
    assert "only other member is at round 7" in why([(7, "c" * 16)])  # the one behind yields
    assert why([(7, "c" * 16)], lone=False) is None  # unless the spec takes no state from one peer
    assert why([]) is None


def test_a_group_that_holds_this_members_bits_gives_its_round_count_without_a_read():
    from peer.averaging.group import rounds_behind_on_same_bits

    a, b, c = "a" * 16, "b" * 16, "c" * 16

    def behind(mine, mates, lone=True):
        return rounds_behind_on_same_bits(mine, mates, lone_mate_trusted=lone)

    assert behind({0: a}, [(0, a), (0, a)]) == 0  # peers that start together from the init
    assert behind({0: a}, [(3, a), (3, a)]) == 3  # rounds that applied nothing are counted
    assert behind({0: a}, [(3, a)]) == 3  # the only mate, when the spec takes state from one peer
    assert behind({0: a}, [(3, a)], lone=False) is None  # otherwise one mate proves nothing
    assert behind({5: a, 6: b}, [(6, a)]) == 1  # a lagging record of a mate one round ahead
    assert behind({5: a, 6: b}, [(7, b), (7, b)]) == 1
    assert behind({5: a, 6: b}, [(6, b), (6, b)]) == 0  # in step
    assert behind({5: a, 6: b}, [(5, b), (5, b)]) == 0  # the group counts behind: it recounts
    assert behind({0: a}, [(2, c), (2, c)]) is None  # the group holds other bits: read
    assert behind({0: a}, [(0, a), (0, c)]) is None  # two mates that disagree decide nothing
    assert behind({0: a}, [(0, ""), (0, "")]) is None  # joiners announce no digest yet
    assert behind({0: a}, []) is None


def test_counting_rounds_as_the_group_keeps_the_bits_and_shifts_the_history():
    from peer.averaging.outer import OuterOptimizer
    from peer.model.llama import LlamaStage
    from protocol.spec import preset_spec

    spec = preset_spec("tiny", stages=2, training=dict(averaging="outer"))
    torch.manual_seed(0)
    opt = OuterOptimizer(spec, 1, LlamaStage.from_spec(spec, 1), net=None, event=lambda *a, **kw: None)
    digest, base = opt.digest, opt.base.copy()
    opt.count_rounds_as_group(3)
    assert opt.local_epoch == 3 and opt.history == {3: digest[:16]}
    assert opt.digest == digest and (opt.base == base).all()
    opt.count_rounds_as_group(0)
    assert opt.local_epoch == 3
