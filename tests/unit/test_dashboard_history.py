"""The dashboard's history without a network: windowed rates, downsampling, history points and
bounds, a poller that keeps its last snapshot on error."""

from __future__ import annotations

import math
from collections import deque

import pytest

from peer.observe.dashboard import History, Poller, downsample, finite, windowed_rate

from observe_helpers import fake_snapshot


def test_windowed_rate_counts_growth_per_peer():
    samples = deque([(0.0, {"a": 100}), (10.0, {"a": 600, "b": 50}), (20.0, {"b": 250})])
    # a grew 500 before leaving, b grew 200 after joining: 700 tokens in 20 s.
    assert windowed_rate(samples) == pytest.approx(35.0)
    assert windowed_rate(deque([(0.0, {"a": 1})])) is None
    # A restarted peer's counter going backwards adds nothing instead of a negative rate.
    assert windowed_rate(deque([(0.0, {"a": 900}), (5.0, {"a": 10})])) == 0.0


def test_downsample_keeps_ends_and_spreads():
    points = list(range(1000))
    small = downsample(points, 5)
    assert small == [0, 250, 500, 749, 999]
    assert downsample(points[:3], 10) == [0, 1, 2] and downsample(points, 0) == points


def test_history_points_and_bounds():
    h = History(max_points=3, rate_window=10.0)
    for i in range(5):
        h.add(fake_snapshot(100.0 + 2 * i, tokens=1000 * i, loss=5.0 - i))
    points = h.as_list()
    assert len(points) == 3 and points[-1]["time"] == 108.0
    assert points[-1]["loss"] == 1.0 and points[-1]["tokens"] == 4000
    assert points[-1]["tokens_per_s"] == pytest.approx(500.0)
    assert points[-1]["online"] == [1, 1] and points[-1]["stage_throughput"] == [3.0, 5.0]
    assert finite({"x": [float("nan"), 1.0, math.inf]}) == {"x": [None, 1.0, None]}


def test_poller_keeps_last_snapshot_on_error():
    calls = iter([fake_snapshot(1.0, 10, 4.0), RuntimeError("DHT timeout")])

    def read():
        item = next(calls)
        if isinstance(item, Exception):
            raise item
        return item

    poller = Poller(read)
    poller.poll_once()
    poller.poll_once()
    view = poller.swarm_view()
    assert view["run_id"] == "r" and view["observer"]["error"] == "RuntimeError: DHT timeout"
    assert view["observer"]["polls"] == 1 and len(poller.history.as_list()) == 1
