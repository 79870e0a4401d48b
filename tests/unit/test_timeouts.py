"""Timeouts derived from bytes and measured call times (peer.net.timeouts)."""

import math

import pytest

from peer.averaging.deadlines import (
    check_rounds_fit,
    contribution_bytes,
    fit_round_seconds,
    join_read_seconds,
    needed_round_seconds,
)
from peer.net.timeouts import (
    MIN_TIMEOUT_S,
    SLOW_LINK,
    CallTimer,
    Link,
    RoundTooShort,
    dht_wait_timeout,
    outer_round_times,
    transfer_timeout,
)
from protocol.rpc import MAX_TIMEOUT
from protocol.spec import preset_spec


def test_transfer_timeout_grows_with_bytes_and_round_trip():
    assert transfer_timeout(0) == MIN_TIMEOUT_S
    big = 20e6
    assert transfer_timeout(big) == pytest.approx(6 * SLOW_LINK.rtt_s + big / SLOW_LINK.rate)
    far = Link(rtt_s=3.0, rate=SLOW_LINK.rate)
    assert transfer_timeout(big, far) > transfer_timeout(big)
    assert transfer_timeout(1e12) == MAX_TIMEOUT


def test_the_slow_link_carries_a_far_profile_line_with_a_margin():
    # the lab's `far`: 150 ms round trip, 10 Mbit/s
    assert SLOW_LINK.rtt_s >= 2 * 0.150
    assert SLOW_LINK.rate <= 10e6 / 8 / 2


def test_dht_wait_never_below_hivemind_default():
    assert dht_wait_timeout(0) == 3.0
    assert dht_wait_timeout(10_000_000) > 3.0


def test_outer_round_times_keep_the_spec_when_it_suffices_and_lengthen_otherwise():
    assert outer_round_times(120, 15, 10, 20_000) == (15, 10)
    assert outer_round_times(20, 6, 4, 20_000) == (6, 4)  # the tests' short rounds, tiny contributions
    gather, agree = outer_round_times(600, 15, 10, 10_000_000)
    assert gather == pytest.approx(transfer_timeout(3 * 10_000_000)) and gather > 15
    assert agree == 10
    assert outer_round_times(600, 1, 1, 0)[1] == pytest.approx(12 * SLOW_LINK.rtt_s)
    with pytest.raises(RoundTooShort, match="round_seconds"):
        outer_round_times(55, 15, 10, 10_000_000)


def test_call_timer_starts_from_the_initial_and_follows_measurements():
    t = CallTimer(floor=1.0)
    assert t.timeout("p", initial=20.0) == 20.0
    for _ in range(50):
        t.observe("p", 2.0)
    assert 2.0 <= t.timeout("p", initial=20.0) < 3.0  # srtt 2, deviation shrinking
    t.observe("q", 2.0)
    assert t.timeout("q", initial=20.0) == pytest.approx(2.0 + 4 * 1.0)  # RFC 6298's first sample
    assert t.timeout("other", initial=7.0) == 7.0


def test_call_timer_variance_and_backoff():
    steady, jumpy = CallTimer(floor=0.1), CallTimer(floor=0.1)
    for i in range(40):
        steady.observe("p", 1.0)
        jumpy.observe("p", 0.2 if i % 2 else 1.8)
    assert jumpy.timeout("p", 1) > steady.timeout("p", 1)
    base = steady.timeout("p", 1)
    steady.expired("p")
    assert steady.timeout("p", 1) == pytest.approx(2 * base)
    steady.expired("p")
    assert steady.timeout("p", 1) == pytest.approx(4 * base)
    for _ in range(20):
        steady.expired("p")
    assert steady.timeout("p", 1) == pytest.approx(base * 2**CallTimer.MAX_BACKOFF)
    steady.observe("p", 1.0)  # an answer resets the backoff
    assert steady.timeout("p", 1) < 2 * base


def test_call_timer_floor_ceiling_and_bad_samples():
    t = CallTimer(floor=30.0)
    for _ in range(10):
        t.observe("p", 0.01)
    assert t.timeout("p", 0.5) == 30.0  # the configured request timeout stays the floor
    t.observe("p", math.nan)
    t.observe("p", -1.0)
    assert t.timeout("p", 0.5) == 30.0
    slow = CallTimer(floor=1.0)
    slow.observe("p", 10_000.0)
    assert slow.timeout("p", 1.0) == MAX_TIMEOUT


def test_round_seconds_fitted_to_the_model():
    tiny = preset_spec("tiny", stages=2, run_id="t", training=dict(averaging="outer"))
    assert fit_round_seconds(tiny) is tiny
    assert contribution_bytes(tiny, 0) < 100_000
    short = preset_spec(
        "small",
        stages=2,
        run_id="s",
        training=dict(averaging="outer", outer=dict(round_seconds=8.0, gather_seconds=2.0, agree_seconds=1.0)),
    )
    fitted = fit_round_seconds(short)
    o = fitted.training.outer
    assert o.round_seconds > 8 and o.round_seconds % 60 == 0
    gather, agree = outer_round_times(o.round_seconds, o.gather_seconds, o.agree_seconds, contribution_bytes(short, 0))
    assert 2 * (gather + agree) <= o.round_seconds
    assert needed_round_seconds(short) <= o.round_seconds < needed_round_seconds(short) + 60
    # without outer momentum a joiner reads one member's weights (~48 MB) on the slow line
    assert o.round_seconds >= 48e6 / SLOW_LINK.rate
    assert fitted.digest() != short.digest()
    # with momentum, two members' weights and momentum (~96 MB each): longer rounds
    with_momentum = short.model_copy(
        update={"training": short.training.model_copy(update={"outer": short.training.outer.model_copy(
            update={"outer_momentum": 0.9})})}
    )  # fmt: skip
    assert fit_round_seconds(with_momentum).training.outer.round_seconds >= 2 * 96e6 / SLOW_LINK.rate
    assert join_read_seconds(with_momentum, 0) > 3 * join_read_seconds(short, 0)


def test_a_spec_whose_rounds_cannot_carry_its_contributions_is_found_out():
    fitted = preset_spec("tiny", stages=2, run_id="t", training=dict(averaging="outer"))
    check_rounds_fit(fitted)  # spec init's rounds fit
    check_rounds_fit(preset_spec("tiny", stages=2, run_id="t"))  # per_step: no rounds
    short = preset_spec(
        "tiny", stages=2, run_id="t", training=dict(averaging="outer", outer=dict(round_seconds=4.0, gather_seconds=1.0, agree_seconds=1.0))
    )  # fmt: skip
    with pytest.raises(RoundTooShort, match="raise training.outer.round_seconds above 6"):
        check_rounds_fit(short)
