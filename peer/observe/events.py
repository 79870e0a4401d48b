"""Counts of a node's events, served as Prometheus metrics: for a node with no training to
measure (the bootstrap and its keeper)."""

from __future__ import annotations

import threading

from prometheus_client.core import CounterMetricFamily

from peer.observe.prom import PREFIX

__all__ = ["EventCounts"]


class EventCounts:
    """For a node with no training to measure (the bootstrap and its keeper): wraps an
    ``Output.event`` and counts the events it reports, served as ``swarmtrain_events_total{event}``
    (``checkpoint_signed``, ``keeper_refused``, ``state_rejected``, ``keeper_skip``...); it is the
    collector ``serve_metrics`` serves."""

    def __init__(self, event):
        self._event = event
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, name: str, text: str, **fields) -> None:
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + 1
        self._event(name, text, **fields)

    def collect(self):
        with self._lock:
            counts = dict(self.counts)
        family = CounterMetricFamily(f"{PREFIX}_events", "Events this node reported, by name.", labels=["event"])
        for name, n in sorted(counts.items()):
            family.add_metric([name], float(n))
        yield family

    def describe(self):
        return []
