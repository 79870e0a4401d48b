"""Routing policy: bans, weighted peer choice, measured throughput (no network, no sleeping)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from peer.pipeline.routing import BanList, ThroughputEMA, choose_peer

# --- BanList -----------------------------------------------------------------------------------


def test_ban_durations_double_up_to_max():
    bans = BanList(base_s=2.0, max_s=60.0)
    now, durations = 0.0, []
    for _ in range(8):
        durations.append(bans.ban("a", now))
        now += durations[-1]  # the next failure comes once the ban has run out
    assert durations == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]


def test_success_resets_the_failure_count():
    bans = BanList(base_s=1.0, max_s=100.0)
    assert bans.ban("a", 0.0) == 1.0
    assert bans.ban("a", 5.0) == 2.0
    bans.record_success("a")
    assert bans.ban("a", 10.0) == 1.0


def test_ban_expires():
    bans = BanList(base_s=2.0)
    bans.ban("a", 100.0)
    assert bans.is_banned("a", 100.0)
    assert bans.is_banned("a", 101.9)
    assert not bans.is_banned("a", 102.0)
    assert not bans.is_banned("never-failed", 100.0)
    assert bans.banned(101.0) == {"a"}
    assert bans.banned(102.0) == set()


def test_failures_while_banned_are_one_incident():
    bans = BanList(base_s=2.0, max_s=60.0)
    assert bans.ban("a", 0.0) == 2.0
    # Three more micro-batches that were in flight fail a moment later.
    assert bans.ban("a", 0.5) == pytest.approx(1.5)
    assert bans.ban("a", 1.0) == pytest.approx(1.0)
    assert not bans.is_banned("a", 2.0)
    assert bans.ban("a", 3.0) == 4.0  # the second incident, not the fourth


def test_bans_are_per_peer():
    bans = BanList()
    bans.ban("a", 0.0)
    bans.ban("a", 10.0)
    assert bans.ban("b", 10.0) == 2.0
    assert bans.banned(10.0) == {"a", "b"}


def test_ban_list_rejects_bad_settings():
    with pytest.raises(ValueError):
        BanList(base_s=0.0)
    with pytest.raises(ValueError):
        BanList(base_s=10.0, max_s=5.0)


# --- choose_peer -------------------------------------------------------------------------------


def frequencies(candidates, banned=frozenset(), draws=20_000, seed=0) -> Counter:
    rng = random.Random(seed)
    return Counter(choose_peer(candidates, banned=set(banned), rng=rng) for _ in range(draws))


def test_choice_is_proportional_to_throughput():
    counts = frequencies([("slow", 10.0, 0), ("mid", 30.0, 0), ("fast", 60.0, 0)])
    # Expected 10% / 30% / 60% of 20 000 draws; the bounds are many standard deviations wide.
    assert 1600 < counts["slow"] < 2400
    assert 5300 < counts["mid"] < 6700
    assert 11200 < counts["fast"] < 12800


def test_in_flight_reduces_weight():
    # Same throughput, but "busy" has three micro-batches queued: weight 1/4 of "idle".
    counts = frequencies([("idle", 50.0, 0), ("busy", 50.0, 3)])
    assert 3400 < counts["busy"] < 4600  # expected 4000 (20%)
    assert 15400 < counts["idle"] < 16600  # expected 16000 (80%)


def test_never_picks_a_banned_peer():
    counts = frequencies([("a", 10.0, 0), ("b", 1000.0, 0), ("c", 10.0, 0)], banned={"b"})
    assert set(counts) == {"a", "c"}


def test_none_when_all_banned_or_empty():
    rng = random.Random(0)
    assert choose_peer([("a", 10.0, 0), ("b", 5.0, 1)], banned={"a", "b"}, rng=rng) is None
    assert choose_peer([], banned=set(), rng=rng) is None


def test_unknown_throughput_gets_a_small_floor():
    counts = frequencies([("known", 100.0, 0), ("new", 0.0, 0), ("nan", float("nan"), 0)])
    # The floor is 10% of the mean known throughput: weights 100 / 10 / 10.
    assert counts["new"] > 0 and counts["nan"] > 0
    assert counts["new"] < counts["known"] / 5
    # With nothing known at all, every peer is equally worth a try.
    counts = frequencies([("x", 0.0, 0), ("y", 0.0, 0)])
    assert 9000 < counts["x"] < 11000


def test_choice_is_reproducible_with_a_seeded_rng():
    candidates = [("a", 1.0, 0), ("b", 2.0, 1), ("c", 3.0, 2)]
    assert frequencies(candidates, draws=50, seed=7) == frequencies(candidates, draws=50, seed=7)


# --- ThroughputEMA -----------------------------------------------------------------------------


def test_ema_first_measurement_replaces_the_default():
    ema = ThroughputEMA(alpha=0.5)
    assert ema.get("a", 42.0) == 42.0
    assert "a" not in ema
    assert ema.update("a", samples=100, seconds=2.0) == 50.0
    assert ema.get("a", 42.0) == 50.0
    assert "a" in ema


def test_ema_moves_toward_new_measurements():
    ema = ThroughputEMA(alpha=0.5)
    ema.update("a", 100, 1.0)
    assert ema.update("a", 200, 1.0) == 150.0
    assert ema.update("a", 200, 1.0) == 175.0
    for _ in range(30):
        ema.update("a", 200, 1.0)
    assert ema.get("a") == pytest.approx(200.0)


def test_ema_ignores_unmeasurable_samples_and_forgets():
    ema = ThroughputEMA()
    ema.update("a", 10, 1.0)
    assert ema.update("a", 10, 0.0) == 10.0
    assert ema.update("a", -5, 1.0) == 10.0
    assert ema.update("b", 10, -1.0) == 0.0
    assert "b" not in ema
    ema.forget("a")
    assert ema.get("a", 3.0) == 3.0
    with pytest.raises(ValueError):
        ThroughputEMA(alpha=0.0)


def test_announced_throughput_is_a_prior_capped_by_the_others():
    from peer.pipeline.routing import PRIOR_CAP_FACTOR, capped_priors

    cands = [("liar", 1e9, 0), ("a", 100.0, 0), ("b", 120.0, 0)]
    capped = dict((p, t) for p, t, _ in capped_priors(cands))
    assert capped["liar"] == PRIOR_CAP_FACTOR * 120.0 and capped["a"] == 100.0 and capped["b"] == 120.0  # the median
    # Two peers: the lower median is the honest one's figure.
    assert dict((p, t) for p, t, _ in capped_priors(cands[:2]))["liar"] == PRIOR_CAP_FACTOR * 100.0
    # Once something is measured, the best measured figure is the reference.
    assert dict((p, t) for p, t, _ in capped_priors(cands, {"a": 50.0}))["liar"] == PRIOR_CAP_FACTOR * 50.0
    assert capped_priors([("x", float("inf"), 1), ("y", 10.0, 0)])[0][1] == PRIOR_CAP_FACTOR * 10.0
    # The liar now gets about 2.4/(2.4+1+1.2) of the traffic, not all of it.
    counts = Counter(choose_peer(capped_priors(cands), banned=set(), rng=random.Random(s)) for s in range(2000))
    assert counts["liar"] < 1200
