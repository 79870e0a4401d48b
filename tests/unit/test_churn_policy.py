"""Churn, the node-level logic as pure functions (peer.swarm.churn, peer.averaging.staleness):
when to look, planning and confirming a move, what a recovery lost, a peer behind its group."""

from __future__ import annotations

import random
from typing import Optional

import pytest

from peer.averaging.staleness import left_out_of_round, missed_round
from peer.swarm.balancing import RebalancePolicy
from peer.swarm.churn import EmptyStages, StageEpochs, check_move, epochs_lost, next_check_delay
from protocol.records import PeerInfo

POLICY = RebalancePolicy(cooldown_s=60.0)


LONG_AGO = -1e9


def peer(peer_id: str, stage: int, throughput: float = 10.0, state: str = "online", epoch: int = 0) -> PeerInfo:
    return PeerInfo(peer_id=peer_id, stage=stage, state=state, throughput=throughput, epoch=epoch)


def check(
    peers, me: str, *, num_stages: int = 2, last_move_at: Optional[float] = LONG_AGO, planned=None, now=0.0, **turns
):
    my_stage = next(p.stage for p in peers if p.peer_id == me)
    return check_move(
        peers,
        num_stages,
        my_peer_id=me,
        my_stage=my_stage,
        now=now,
        last_move_at=last_move_at,
        policy=POLICY,
        planned=planned,
        **turns,
    )


# --- when to look ---------------------------------------------------------------------------------


def test_check_delay_is_randomised_around_the_period_and_off_at_zero():
    rng = random.Random(1)
    delays = [next_check_delay(15.0, rng) for _ in range(200)]
    assert all(10.0 <= d <= 20.0 for d in delays)
    assert max(delays) - min(delays) > 5.0  # peers started together do not look in lockstep
    assert next_check_delay(0.0, rng) is None


def test_cli_rebalances_auto_peers_by_default_and_pinned_ones_on_request():
    from peer.cli.options import rebalance_period_for as _rebalance_period

    assert _rebalance_period(None, "auto") == 15.0
    assert _rebalance_period(None, "1") == 0.0
    assert _rebalance_period(3.0, "1") == 3.0 and _rebalance_period(0.0, "auto") == 0.0


# --- planning and confirming a move ---------------------------------------------------------------


def test_clear_imbalance_moves_the_named_peer_only():
    peers = [peer("a", 0), peer("b", 0), peer("c", 0), peer("d", 1)]
    verdicts = {p.peer_id: check(peers, p.peer_id) for p in peers}
    movers = {pid: v for pid, v in verdicts.items() if v.target is not None}
    assert len(movers) == 1
    ((mover, verdict),) = movers.items()
    assert verdict.target == 1 and not verdict.recovery and verdict.why == "rebalance"
    # The confirmation on a fresh snapshot agrees when nothing changed.
    assert check(peers, mover, planned=1).target == 1


def test_cooldown_holds_a_rebalance_but_not_a_recovery():
    peers = [peer("a", 0), peer("b", 0), peer("c", 0), peer("d", 1)]
    mover = next(p.peer_id for p in peers if check(peers, p.peer_id).target is not None)
    assert check(peers, mover, last_move_at=0.0, now=10.0).target is None  # 10 s into a 60 s cool-down
    empty = [peer("a", 0), peer("b", 0)]  # stage 1's peers are gone
    verdicts = [check(empty, pid, last_move_at=0.0, now=1.0) for pid in ("a", "b")]
    assert sorted(v.target is not None for v in verdicts) == [False, True]
    recovery = next(v for v in verdicts if v.target is not None)
    assert recovery.target == 1 and recovery.recovery and recovery.why == "recovery"


def test_stage_whose_peers_only_announce_leaving_is_recovered():
    peers = [peer("a", 0), peer("b", 0), peer("x", 1, state="leaving")]
    assert {check(peers, pid).target for pid in ("a", "b")} == {None, 1}


def test_a_plan_made_on_stale_records_is_dropped():
    peers = [peer("a", 0), peer("b", 0), peer("c", 0), peer("d", 1)]
    mover = next(p.peer_id for p in peers if check(peers, p.peer_id).target is not None)
    # Meanwhile another peer joined stage 1: the swarm is balanced, the move is off.
    fresh = peers + [peer("e", 1)]
    verdict = check(fresh, mover, planned=1)
    assert verdict.target is None and "keeps this peer" in verdict.why
    # Or the empty stage was refilled by someone else before this peer moved.
    empty = [peer("a", 0), peer("b", 0)]
    rescuer = next(pid for pid in ("a", "b") if check(empty, pid).target is not None)
    assert check(empty + [peer("z", 1, state="joining")], rescuer, planned=1).target is None


@pytest.mark.parametrize("seed", range(5))
def test_never_empties_the_stage_it_leaves_over_random_swarms(seed):
    rng = random.Random(seed)
    for _ in range(200):
        num_stages = rng.randint(2, 4)
        peers = [
            peer(
                f"p{i}",
                rng.randrange(num_stages),
                throughput=rng.choice([0.0, 1.0, 5.0, 20.0]),
                state=rng.choice(["online", "online", "online", "joining", "leaving"]),
            )
            for i in range(rng.randint(1, 7))
        ]
        # With and without the fallback turns (everyone's turn has come).
        turns = rng.choice([{}, dict(empty_since={s: 0.0 for s in range(num_stages)}, fallback_grace=1.0)])
        for p in peers:
            v = check(peers, p.peer_id, num_stages=num_stages, now=1e6, **turns)
            if v.target is None:
                continue
            assert p.state == "online" and v.target != p.stage
            stays = [q for q in peers if q.stage == p.stage and q.peer_id != p.peer_id and q.state != "leaving"]
            assert stays, f"{p.peer_id} would empty stage {p.stage}: {peers}"
            there = [q for q in peers if q.stage == v.target and q.state != "leaving"]
            assert v.recovery == (not there)


def test_no_move_unless_announced_online_where_it_is():
    peers = [peer("a", 0, state="joining"), peer("b", 0), peer("c", 0), peer("d", 1)]
    assert "not announced online" in check(peers, "a").why
    assert check_move(peers, 2, my_peer_id="zz", my_stage=0, now=0.0, last_move_at=None, policy=POLICY).target is None
    # A record that still shows the previous stage (right after a move) is not acted on.
    assert (
        check_move(peers, 2, my_peer_id="b", my_stage=1, now=0.0, last_move_at=LONG_AGO, policy=POLICY).target is None
    )


def test_when_the_named_peer_does_not_refill_an_empty_stage_the_others_take_turns():
    # Stage 2 is empty; stage 0 can spare two peers, stage 1 none.
    peers = [peer("a", 0), peer("b", 0), peer("c", 0), peer("d", 1)]
    since = {2: 100.0}

    def movers(now):
        return {
            pid: v.target
            for pid in "abcd"
            if (v := check(peers, pid, num_stages=3, now=now, empty_since=since, fallback_grace=10.0)).target
        }

    named = movers(100.0)
    assert list(named.values()) == [2]  # at first only the policy's choice
    (first,) = named
    assert len(movers(110.0)) == 2 and len(movers(120.0)) == 3  # one more candidate every grace period
    assert "d" not in movers(1000.0)  # never the last peer of a stage
    # Without the record of when the stage emptied, only the policy's choice moves.
    assert {pid for pid in "abcd" if check(peers, pid, num_stages=3, now=1000.0).target} == {first}


def test_empty_stages_remember_when_a_stage_emptied():
    empty = EmptyStages()
    empty.observe([peer("a", 0), peer("b", 1)], 2, now=1.0)
    assert empty.since == {}
    empty.observe([peer("a", 0), peer("b", 1, state="leaving")], 2, now=2.0)
    empty.observe([peer("a", 0)], 2, now=3.0)
    assert empty.since == {1: 2.0}
    empty.observe([peer("a", 0), peer("c", 1, state="joining")], 2, now=4.0)
    assert empty.since == {}


# --- what a recovery lost -------------------------------------------------------------------------


def test_stage_epochs_remember_the_highest_epoch_seen():
    seen = StageEpochs()
    seen.observe([peer("a", 0, epoch=3), peer("b", 1, epoch=7), peer("c", 1, epoch=5)])
    seen.observe([peer("a", 0, epoch=4), peer("x", 1, epoch=99, state="leaving")])  # b, c gone
    assert seen.last(0) == 4 and seen.last(1) == 7 and seen.last(2) is None


def test_epochs_lost():
    assert epochs_lost(12, 10) == 2
    assert epochs_lost(12, None) == 12  # restarted from the spec's initialisation
    assert epochs_lost(5, 8) == 0  # the checkpoint is newer than what this peer saw
    assert epochs_lost(None, 3) is None


# --- a peer behind its group: its accumulated gradients are stale ---------------------------------


def test_missed_round():
    # In step, or the group only just moved on (its round for our epoch may still take us).
    assert missed_round(local_epoch=4, group_epoch=4, group_samples=100, target=32) is None
    assert missed_round(local_epoch=4, group_epoch=5, group_samples=8, target=32) is None
    # The group already collected a whole batch in the next epoch: our round is long gone.
    assert "whole batch" in missed_round(local_epoch=4, group_epoch=5, group_samples=32, target=32)
    # Two or more epochs behind.
    assert "2 epochs behind" in missed_round(local_epoch=3, group_epoch=5, group_samples=0, target=32)


def test_an_idle_peer_left_out_of_a_round_loads_state_instead_of_stepping():
    assert "epoch 5 without this peer" in left_out_of_round(local_epoch=4, group_epoch=5, local_samples=0)
    # With samples of its own it is still part of the round (missed_round judges staleness).
    assert left_out_of_round(local_epoch=4, group_epoch=5, local_samples=8) is None
    # In step (or ahead, when its own progress record is the newest), there is nothing to load.
    assert left_out_of_round(local_epoch=5, group_epoch=5, local_samples=0) is None
    assert left_out_of_round(local_epoch=6, group_epoch=5, local_samples=0) is None
