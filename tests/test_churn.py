"""Churn: peers that join late, leave, crash, move to another stage, refill an empty stage and
restart.

The first part tests the node-level move logic (``peer.churn``) as pure functions; the rest
starts real peers on 127.0.0.1 (``peer.launcher.Cluster``) and is marked slow.
"""

from __future__ import annotations

import random
from typing import Optional

import pytest

from peer.balancing import RebalancePolicy
from peer.churn import StageEpochs, check_move, epochs_lost, missed_round, next_check_delay
from protocol.records import PeerInfo

POLICY = RebalancePolicy(cooldown_s=60.0)
LONG_AGO = -1e9


def peer(peer_id: str, stage: int, throughput: float = 10.0, state: str = "online", epoch: int = 0) -> PeerInfo:
    return PeerInfo(peer_id=peer_id, stage=stage, state=state, throughput=throughput, epoch=epoch)


def check(peers, me: str, *, num_stages: int = 2, last_move_at: Optional[float] = LONG_AGO, planned=None, now=0.0):
    my_stage = next(p.stage for p in peers if p.peer_id == me)
    return check_move(peers, num_stages, my_peer_id=me, my_stage=my_stage, now=now, last_move_at=last_move_at,
                      policy=POLICY, planned=planned)


# --- when to look ---------------------------------------------------------------------------------


def test_check_delay_is_randomised_around_the_period_and_off_at_zero():
    rng = random.Random(1)
    delays = [next_check_delay(15.0, rng) for _ in range(200)]
    assert all(10.0 <= d <= 20.0 for d in delays)
    assert max(delays) - min(delays) > 5.0  # peers started together do not look in lockstep
    assert next_check_delay(0.0, rng) is None


# --- planning and confirming a move ---------------------------------------------------------------


def test_clear_imbalance_moves_the_named_peer_only():
    peers = [peer("a", 0), peer("b", 0), peer("c", 0), peer("d", 1)]
    verdicts = {p.peer_id: check(peers, p.peer_id) for p in peers}
    movers = {pid: v for pid, v in verdicts.items() if v.target is not None}
    assert len(movers) == 1
    (mover, verdict), = movers.items()
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
        peers = [peer(f"p{i}", rng.randrange(num_stages), throughput=rng.choice([0.0, 1.0, 5.0, 20.0]),
                      state=rng.choice(["online", "online", "online", "joining", "leaving"]))
                 for i in range(rng.randint(1, 7))]
        for p in peers:
            v = check(peers, p.peer_id, num_stages=num_stages)
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
    assert check_move(peers, 2, my_peer_id="b", my_stage=1, now=0.0, last_move_at=LONG_AGO,
                      policy=POLICY).target is None


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


def _wait_for(condition, timeout: float, what: str) -> None:
    """Poll a condition on state that background threads update (not a sleep for readiness)."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


@pytest.mark.timeout(300)
def test_a_peer_that_missed_its_round_drops_its_gradients():
    """Two stage-group members on real DHTs. A has accumulated (huge) gradients at epoch 0 and
    then stalls; B alone finishes epoch 0 and gathers a whole batch at epoch 1. When A wakes
    up, its gradients are stale: it must drop them and load B's state, not average them in
    (vanilla hivemind would average them into its next round, or apply them alone)."""
    import uuid

    import hivemind
    import torch

    from peer.averaging import BoundedOptimizer

    run_id = f"lag{uuid.uuid4().hex[:8]}"
    dhts, opts = [], []
    try:
        dhts.append(hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
        dhts.append(hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                 initial_peers=[str(m) for m in dhts[0].get_visible_maddrs()]))
        params = []
        for dht in dhts:
            param = torch.nn.Parameter(torch.zeros(8))
            params.append(param)
            opts.append(BoundedOptimizer(
                dht=dht, run_id=run_id, target_batch_size=4, batch_size_per_step=4, params=[param],
                optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0), matchmaking_time=1.0, averaging_timeout=10.0,
                load_state_timeout=30.0, delay_optimizer_step=False, average_state_every=1000,
                tracker_opts=dict(min_refresh_period=0.1, max_refresh_period=0.5, default_refresh_period=0.2)))
        (pa, pb), (a, b) = params, opts
        # A accumulates one micro-batch of huge gradients at epoch 0, in step with the group.
        pa.grad = torch.full_like(pa, 1000.0)
        a.grad_averager.accumulate_grads_(batch_size=1)
        a.tracker.report_local_progress(0, 1)
        _wait_for(lambda: b.tracker.global_progress.samples_accumulated == 1
                  and a.tracker.fetched_global_progress_this_epoch.is_set(), 60, "B to see A's progress")
        a.tick()  # hivemind's once-per-epoch exact sync check happens here, while in sync
        assert a.local_epoch == 0 and a.grad_averager.local_samples_accumulated == 1

        # B alone finishes epoch 0 (A is stalled and not in the round) ...
        pb.grad = torch.ones_like(pb)
        b.grad_averager.accumulate_grads_(batch_size=4)
        b.tracker.report_local_progress(0, 4)

        def b_ticks_to_epoch_1():
            b.tick()
            return b.local_epoch == 1

        _wait_for(b_ticks_to_epoch_1, 90, "B's round for epoch 0")
        after_round = pb.detach().clone()
        assert torch.allclose(after_round, torch.full_like(pb, -1.0)), after_round  # B's own update only
        # ... and gathers a whole batch at epoch 1.
        pb.grad = torch.ones_like(pb)
        b.grad_averager.accumulate_grads_(batch_size=4)
        b.tracker.report_local_progress(1, 4)
        _wait_for(lambda: a.tracker.global_epoch == 1 and a.tracker.global_progress.samples_accumulated >= 4, 60,
                  "A to see the group at epoch 1 with a whole batch")

        # A wakes up one epoch behind. hivemind alone would let it keep its gradients.
        assert a.local_epoch == 0 and a.tracker.global_epoch == 1
        a.tick()
        assert a.local_epoch == 1, "A did not catch up with its group"
        assert a.grad_averager.local_samples_accumulated == 0
        assert all(float(g.abs().sum()) == 0.0 for g in a.grad_averager._grad_accumulators()), "stale grads kept"
        assert torch.equal(pa.detach(), after_round), f"A's weights {pa.detach()} are not the group's {after_round}"
        assert torch.equal(pb.detach(), after_round), "B's weights changed: A's stale gradients reached B"
    finally:
        for opt in opts:
            opt.shutdown()
        for dht in dhts:
            dht.shutdown()
