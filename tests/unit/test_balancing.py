"""Stage choice and rebalancing on synthetic swarms (no network, no clock)."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from typing import Optional

import pytest

from peer.swarm.balancing import RebalancePolicy, choose_stage, plan_move, stage_throughputs
from protocol.records import PeerInfo

LONG_AGO = -1e9  # a last_move_at outside any cool-down


def peer(peer_id: str, stage: int, throughput: float, state: str = "online") -> PeerInfo:
    return PeerInfo(peer_id=peer_id, stage=stage, state=state, throughput=throughput)


def swarm(*stages: list[float]) -> list[PeerInfo]:
    """One list of throughputs per stage; peer ids are 's<stage>p<index>'."""
    return [peer(f"s{s}p{i}", s, t) for s, tps in enumerate(stages) for i, t in enumerate(tps)]


def move(peers: list[PeerInfo], peer_id: str, target: int) -> list[PeerInfo]:
    return [dataclasses.replace(p, stage=target) if p.peer_id == peer_id else p for p in peers]


def all_moves(
    peers: list[PeerInfo],
    num_stages: int,
    *,
    now: float = 0.0,
    last_move_at: Optional[float] = LONG_AGO,
    policy: RebalancePolicy = RebalancePolicy(),
) -> dict[str, int]:
    """What every peer decides from the same snapshot."""
    moves = {}
    for p in peers:
        target = plan_move(peers, num_stages, my_peer_id=p.peer_id, now=now, last_move_at=last_move_at, policy=policy)
        if target is not None:
            moves[p.peer_id] = target
    return moves


def occupied(peers: list[PeerInfo], num_stages: int) -> set[int]:
    return {p.stage for p in peers if p.state in ("joining", "online") and p.stage < num_stages}


# --- stage_throughputs -------------------------------------------------------------------------


def test_stage_throughputs_counts_joining_and_online_only():
    peers = [
        peer("a", 0, 10.0),
        peer("b", 0, 5.0, state="joining"),
        peer("c", 1, 7.0, state="leaving"),
        peer("d", 2, 3.0),
        peer("e", 9, 100.0),  # a stage this spec does not have
    ]
    assert stage_throughputs(peers, 3) == [15.0, 0.0, 3.0]
    assert stage_throughputs(peers, 3, exclude="a") == [5.0, 0.0, 3.0]
    assert stage_throughputs([], 2) == [0.0, 0.0]


# --- choose_stage ------------------------------------------------------------------------------


def test_choose_stage_takes_least_served():
    assert choose_stage(swarm([300.0], [100.0], [200.0]), 3, my_throughput=50.0, my_peer_id="x") == 1
    assert choose_stage(swarm([100.0, 100.0], [150.0], [90.0, 80.0]), 3, my_throughput=50.0, my_peer_id="x") == 1


def test_choose_stage_empty_stage_wins():
    # Stage 0's only peer is still loading (zero throughput) but it is there; stage 2 is not.
    peers = [peer("a", 0, 0.0, state="joining"), peer("b", 1, 500.0), peer("c", 2, 500.0, state="leaving")]
    assert choose_stage(peers, 3, my_throughput=10.0, my_peer_id="x") == 2


def test_choose_stage_ignores_own_record():
    peers = [peer("me", 0, 1000.0), peer("b", 1, 100.0), peer("c", 0, 50.0)]
    assert choose_stage(peers, 2, my_throughput=1000.0, my_peer_id="me") == 0


def test_choose_stage_spreads_ties_deterministically():
    ids = [f"peer-{i}" for i in range(300)]
    picks = Counter(choose_stage([], 3, my_throughput=1.0, my_peer_id=i) for i in ids)
    assert set(picks) == {0, 1, 2}
    assert min(picks.values()) >= 60  # about 100 each
    # Tied stages only: stage 2 is better served and must never be picked.
    peers = swarm([100.0], [100.0], [300.0])
    picks = Counter(choose_stage(peers, 3, my_throughput=1.0, my_peer_id=i) for i in ids)
    assert set(picks) == {0, 1}
    # Reproducible, whatever order the snapshot lists peers in.
    again = Counter(choose_stage(list(reversed(peers)), 3, my_throughput=1.0, my_peer_id=i) for i in ids)
    assert again == picks


def test_choose_stage_ties_survive_float_noise():
    # 0.1 + 0.2 != 0.3 in floats; the two stages are still tied.
    peers = [peer("a", 0, 0.1), peer("b", 0, 0.2), peer("c", 1, 0.3)]
    picks = {choose_stage(peers, 2, my_throughput=1.0, my_peer_id=f"n{i}") for i in range(100)}
    assert picks == {0, 1}


def test_choose_stage_rejects_bad_input():
    with pytest.raises(ValueError):
        choose_stage([], 0, my_throughput=1.0)
    with pytest.raises(ValueError):
        choose_stage([], 2, my_throughput=-1.0)


# --- RebalancePolicy ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{"margin": 0.9}, {"cooldown_s": -1.0}, {"min_peers_left": 0}])
def test_policy_rejects_unsafe_settings(kwargs):
    with pytest.raises(ValueError):
        RebalancePolicy(**kwargs)


# --- plan_move: clear improvement only ---------------------------------------------------------


def test_clear_improvement_moves_exactly_one_peer():
    peers = swarm([100.0, 100.0, 100.0], [100.0])
    moves = all_moves(peers, 2)
    # All four read the same snapshot; if every peer of stage 0 acted, stage 0 would be emptied.
    assert len(moves) == 1
    ((mover, target),) = moves.items()
    assert mover.startswith("s0") and target == 1
    assert stage_throughputs(move(peers, mover, target), 2) == [200.0, 200.0]


def test_ten_percent_imbalance_does_not_move():
    # Moving a 5 samples/s peer would give [105, 105]: better, but not by the margin.
    peers = swarm([50.0, 50.0, 5.0, 5.0], [50.0, 50.0])
    assert all_moves(peers, 2) == {}
    # The margin is what holds it back: with no margin the same swarm does move.
    assert all_moves(peers, 2, policy=RebalancePolicy(margin=1.0)) == {"s0p2": 1}


def test_no_move_when_already_optimal():
    assert all_moves(swarm([100.0, 100.0], [100.0, 100.0], [200.0]), 3) == {}


def test_moves_only_with_margin_over_random_swarms():
    policy = RebalancePolicy()
    rng = random.Random(1234)
    moved = 0
    for _ in range(400):
        num_stages = rng.randint(2, 4)
        peers = [peer(f"p{i}", rng.randrange(num_stages), rng.uniform(1.0, 200.0)) for i in range(rng.randint(2, 10))]
        if len(occupied(peers, num_stages)) < num_stages:
            continue  # empty stages are the recovery case, tested below
        old_min = min(stage_throughputs(peers, num_stages))
        for peer_id, target in all_moves(peers, num_stages, policy=policy).items():
            new_min = min(stage_throughputs(move(peers, peer_id, target), num_stages))
            assert new_min >= policy.margin * old_min
            moved += 1
    assert moved > 10  # the property was exercised, not vacuously true


def test_picks_target_that_maximises_new_minimum():
    # Into stage 1 the slowest stage stays at 30; into stage 2 it rises to 40.
    peers = swarm([100.0, 100.0, 100.0], [40.0], [30.0])
    moves = all_moves(peers, 3)
    assert list(moves.values()) == [2]


# --- plan_move: never empty a stage ------------------------------------------------------------


def test_never_leaves_own_stage_empty():
    # Stage 1 is starved, but its only hope is stage 0's single peer.
    assert all_moves(swarm([1000.0], [1.0]), 2) == {}
    assert all_moves(swarm([1000.0, 900.0], [1.0]), 2, policy=RebalancePolicy(min_peers_left=2)) == {}


def test_never_empties_a_stage_over_random_swarms():
    rng = random.Random(99)
    states = ["online"] * 6 + ["joining", "leaving"]
    for _ in range(500):
        num_stages = rng.randint(2, 5)
        peers = [
            peer(f"p{i}", rng.randrange(num_stages), rng.choice([0.0, rng.uniform(0.1, 300.0)]), rng.choice(states))
            for i in range(rng.randint(1, 12))
        ]
        policy = RebalancePolicy(min_peers_left=rng.randint(1, 2), cooldown_s=rng.choice([0.0, 120.0]))
        before = occupied(peers, num_stages)
        moves = all_moves(peers, num_stages, now=100.0, last_move_at=rng.choice([None, 0.0, 50.0]), policy=policy)
        for peer_id, target in moves.items():  # each move on its own...
            assert target != next(p.stage for p in peers if p.peer_id == peer_id)
            assert before <= occupied(move(peers, peer_id, target), num_stages)
        after = peers  # ...and all of them at once, as peers reading one snapshot would do
        for peer_id, target in moves.items():
            after = move(after, peer_id, target)
        assert before <= occupied(after, num_stages)


# --- plan_move: recovery of an empty stage -----------------------------------------------------


def test_empty_stage_gets_a_peer_from_the_most_populated_stage():
    peers = swarm([100.0, 100.0], [50.0, 50.0, 50.0], [])
    # Everyone moved or joined 10 s ago: the cool-down does not hold back a recovery.
    moves = all_moves(peers, 3, now=10.0, last_move_at=0.0)
    assert len(moves) == 1
    ((mover, target),) = moves.items()
    assert mover.startswith("s1") and target == 2


def test_stage_with_only_leaving_peers_counts_as_empty():
    peers = swarm([100.0, 100.0], [100.0]) + [peer("bye", 2, 500.0, state="leaving")]
    moves = all_moves(peers, 3, now=10.0, last_move_at=0.0)
    assert list(moves.values()) == [2]
    assert next(iter(moves)).startswith("s0")


def test_recovery_fills_every_empty_stage_it_can():
    peers = swarm([10.0, 10.0, 10.0, 10.0], [], [20.0], [])
    moves = all_moves(peers, 4, now=10.0, last_move_at=0.0)
    assert sorted(moves.values()) == [1, 3]
    after = peers
    for peer_id, target in moves.items():
        after = move(after, peer_id, target)
    assert occupied(after, 4) == {0, 1, 2, 3}


def test_recovery_never_empties_the_donor():
    # Every stage has one peer: an empty stage cannot be refilled without opening another hole.
    assert all_moves(swarm([100.0], [100.0], []), 3, now=10.0, last_move_at=0.0) == {}


def test_recovery_overrides_min_peers_left_but_keeps_one():
    peers = swarm([100.0, 100.0], [])
    moves = all_moves(peers, 2, now=10.0, last_move_at=0.0, policy=RebalancePolicy(min_peers_left=2))
    assert list(moves.values()) == [1]


def test_joining_peer_is_not_asked_to_move():
    peers = [peer("a", 0, 100.0, state="joining"), peer("b", 0, 100.0, state="joining"), peer("c", 1, 10.0)]
    assert all_moves(peers, 3, now=10.0, last_move_at=0.0) == {}


# --- plan_move: cool-down ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_peers_reading_noisy_snapshots_name_one_mover(seed):
    """Three peers on stage 0, one on stage 1. Each peer reads the swarm at its own moment, and
    every throughput report is off by up to +-20% in each read: all of them must still name
    the same single mover (ranked by exact throughput, each named itself in a live test and
    all three left stage 0 together)."""
    rng = random.Random(seed)
    ids = [f"Qm{rng.getrandbits(64):016x}" for _ in range(4)]

    def snapshot():
        return [peer(pid, 0 if i < 3 else 1, 10.0 * rng.uniform(0.8, 1.2)) for i, pid in enumerate(ids)]

    movers = set()
    for pid in ids[:3]:
        for _ in range(5):  # several checks each, every one on a fresh read
            if plan_move(snapshot(), 2, my_peer_id=pid, now=0.0, last_move_at=LONG_AGO) is not None:
                movers.add(pid)
    assert movers == {min(ids[:3])}, movers


def test_cooldown_is_respected():
    peers = swarm([100.0, 100.0, 100.0], [100.0])
    ((mover, target),) = all_moves(peers, 2).items()
    policy = RebalancePolicy(cooldown_s=120.0)

    def plan(now: float, last_move_at: Optional[float]) -> Optional[int]:
        return plan_move(peers, 2, my_peer_id=mover, now=now, last_move_at=last_move_at, policy=policy)

    assert plan(now=1000.0, last_move_at=1000.0 - 60.0) is None
    assert plan(now=1000.0, last_move_at=1000.0 - 119.9) is None
    assert plan(now=1000.0, last_move_at=1000.0 - 120.0) == target
    assert plan(now=1000.0, last_move_at=None) == target


def test_unknown_or_leaving_self_does_not_move():
    peers = swarm([100.0, 100.0, 100.0], [100.0])
    assert plan_move(peers, 2, my_peer_id="stranger", now=0.0, last_move_at=None) is None
    leaving = [dataclasses.replace(p, state="leaving") if p.peer_id == "s0p0" else p for p in peers]
    assert plan_move(leaving, 2, my_peer_id="s0p0", now=0.0, last_move_at=None) is None
    assert plan_move(swarm([1.0, 2.0]), 1, my_peer_id="s0p0", now=0.0, last_move_at=None) is None


# --- synthetic swarms over time: no flapping ---------------------------------------------------


def simulate(
    base: dict[str, float],
    stages: dict[str, int],
    num_stages: int,
    *,
    rounds: int,
    noise: float,
    seed: int,
    period_s: float = 30.0,
) -> list[tuple[int, str, int, int]]:
    """Every peer checks once per round (in a shuffled order, seeing earlier moves of the round);
    measured throughputs jitter by +-noise around each peer's base. Returns (round, peer, from, to)."""
    rng = random.Random(seed)
    policy = RebalancePolicy()
    last_move_at = {peer_id: 0.0 for peer_id in base}
    history = []
    for r in range(rounds):
        now = (r + 1) * period_s
        peers = [peer(pid, stages[pid], base[pid] * rng.uniform(1 - noise, 1 + noise)) for pid in sorted(base)]
        order = list(base)
        rng.shuffle(order)
        for pid in order:
            target = plan_move(
                peers, num_stages, my_peer_id=pid, now=now, last_move_at=last_move_at[pid], policy=policy
            )
            if target is not None:
                history.append((r, pid, stages[pid], target))
                stages[pid] = target
                last_move_at[pid] = now
                peers = move(peers, pid, target)
    return history


@pytest.mark.parametrize("seed", range(5))
def test_balanced_swarm_with_noise_never_moves(seed):
    rng = random.Random(seed)
    base = {f"p{i}": 100.0 * rng.uniform(0.95, 1.05) for i in range(16)}
    stages = {pid: i % 4 for i, pid in enumerate(sorted(base))}
    assert simulate(base, stages, 4, rounds=60, noise=0.1, seed=seed) == []


@pytest.mark.parametrize("seed", range(5))
def test_heterogeneous_swarm_settles_without_oscillation(seed):
    rng = random.Random(1000 + seed)
    num_stages = 4
    base: dict[str, float] = {}
    stages: dict[str, int] = {}
    # Peers join one by one, each choosing from what it sees; then a third of them is killed and
    # one stage loses all its peers, which leaves a hole and an unbalanced swarm to fix.
    for i in range(18):
        pid = f"p{i}"
        snapshot = [peer(q, stages[q], base[q]) for q in base]
        base[pid] = rng.uniform(20.0, 200.0)
        stages[pid] = choose_stage(snapshot, num_stages, my_throughput=base[pid], my_peer_id=pid)
    killed = set(rng.sample(sorted(base), 6)) | {pid for pid in base if stages[pid] == seed % num_stages}
    base = {pid: t for pid, t in base.items() if pid not in killed}
    stages = {pid: s for pid, s in stages.items() if pid not in killed}
    assert seed % num_stages not in stages.values()

    history = simulate(base, stages, num_stages, rounds=80, noise=0.05, seed=seed)
    assert 1 <= len(history) <= len(base)
    assert all(r < 40 for r, *_ in history), history  # settled: nothing moves in the second half
    for pid in base:
        path = [(src, dst) for _, p, src, dst in history if p == pid]
        for (src1, dst1), (src2, dst2) in zip(path, path[1:]):
            assert not (dst2 == src1 and src2 == dst1), f"{pid} flapped: {path}"
    assert set(stages.values()) == set(range(num_stages))


def simulate_measured(
    base: dict[str, float],
    stages: dict[str, int],
    cost: list[float],
    *,
    rounds: int,
    error: float,
    seed: int,
    period_s: float = 30.0,
) -> list[tuple[int, str, int, int]]:
    """Like ``simulate``, but as peers announce since peer.model.capacity: a peer's figure is
    measured when it opens a stage, as its base speed divided by the stage's cost, times a
    measurement error of up to +-error drawn at that moment, and held until it moves again."""
    rng = random.Random(seed)
    policy = RebalancePolicy()

    def measure(pid: str) -> float:
        return base[pid] / cost[stages[pid]] * rng.uniform(1 - error, 1 + error)

    figure = {pid: measure(pid) for pid in sorted(base)}
    last_move_at = {pid: 0.0 for pid in base}
    history = []
    for r in range(rounds):
        now = (r + 1) * period_s
        order = sorted(base)
        rng.shuffle(order)
        for pid in order:
            peers = [peer(q, stages[q], figure[q]) for q in sorted(base)]
            target = plan_move(peers, len(cost), my_peer_id=pid, now=now, last_move_at=last_move_at[pid], policy=policy)
            if target is not None:
                history.append((r, pid, stages[pid], target))
                stages[pid], last_move_at[pid] = target, now
                figure[pid] = measure(pid)
                assert set(stages.values()) == set(range(len(cost))), "a move emptied a stage"
    return history


@pytest.mark.parametrize("seed", range(20))
def test_figures_measured_once_per_stage_settle_on_stages_of_unequal_cost(seed):
    # The last stage runs the head and the loss (1.6x the work here); the machines differ 5x and
    # each figure is off by up to 40% (measured while other processes competed for the CPU).
    rng = random.Random(seed)
    cost = [1.0, 1.0, 1.6]
    base = {f"p{i}": rng.uniform(40.0, 200.0) for i in range(9)}
    stages = {pid: rng.randrange(len(cost)) for pid in sorted(base)}
    for s in range(len(cost)):  # no stage starts empty (recovery is tested above)
        stages[f"p{s}"] = s
    history = simulate_measured(base, stages, cost, rounds=60, error=0.4, seed=seed)
    assert len(history) <= len(base), history
    assert all(r < 30 for r, *_ in history), history  # settled: nothing moves in the second half
    for pid in base:
        path = [(src, dst) for _, p, src, dst in history if p == pid]
        for (src1, dst1), (src2, dst2) in zip(path, path[1:]):
            assert not (dst2 == src1 and src2 == dst1), f"{pid} flapped: {path}"


def test_a_claim_of_huge_throughput_counts_as_a_fast_peer_not_a_stage():
    from peer.swarm.balancing import CLAIM_CAP_FACTOR, capped_claims

    honest = [PeerInfo(f"h{i}", i % 2, "online", 100.0) for i in range(4)]
    fake = PeerInfo("fake", 0, "online", 1e9)
    capped = {p.peer_id: p.throughput for p in capped_claims([*honest, fake])}
    assert capped["fake"] == CLAIM_CAP_FACTOR * 100.0 and capped["h0"] == 100.0
    # One fake record on stage 0 does not send a newcomer away from it for ever:
    totals = stage_throughputs([*honest, fake], 2)
    assert totals == [200.0 + CLAIM_CAP_FACTOR * 100.0, 200.0]


def test_overclaims_name_the_capped_peers_only():
    from peer.swarm.balancing import CLAIM_CAP_FACTOR, overclaims

    honest = [PeerInfo(f"h{i}", i % 2, "online", 100.0) for i in range(4)]
    fake = PeerInfo("fake", 1, "online", 1e9)
    gone = PeerInfo("gone", 1, "leaving", 1e9)
    assert overclaims([*honest, fake, gone], 2) == [("fake", 1e9, CLAIM_CAP_FACTOR * 100.0)]
    assert overclaims(honest, 2) == []


def test_a_fake_record_in_my_stage_moves_me_only_while_it_is_believed():
    """One fake stage-1 record with a capped claim still names the honest stage-1 peer for a
    move (5 x its throughput on stage 1 against 1 x on stage 0): only proof that a server stands
    behind the record keeps the honest peer where it is, serving the stage."""
    from peer.swarm.balancing import without_unproven

    honest = [peer("a", 0, 100.0), peer("b", 1, 100.0)]
    fake = peer("zz-fake", 1, 1e9)  # sorts after "b": the policy names b
    assert plan_move([*honest, fake], 2, my_peer_id="b", now=0.0, last_move_at=LONG_AGO) == 0
    seen = without_unproven([*honest, fake], 1, proven=set(), my_peer_id="b")
    assert [p.peer_id for p in seen] == ["a", "b"]
    assert plan_move(seen, 2, my_peer_id="b", now=0.0, last_move_at=LONG_AGO) is None
    # Proven stage-mates and the other stages' records are kept as they are.
    assert without_unproven([*honest, fake], 1, proven={"zz-fake"}, my_peer_id="b") == [*honest, fake]
    assert without_unproven([*honest, fake], 0, proven=set(), my_peer_id="b") == [honest[1], fake]
