"""Counts of a node's events, served as Prometheus metrics: for a node with no training to
measure (the bootstrap and its keeper)."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily

PREFIX = "swarmtrain"

__all__ = ["EventCounts", "close_server"]


class EventCounts:
    """For a node with no training to measure (the bootstrap and its keeper): wraps an
    ``Output.event`` and counts the events it reports, served as ``swarmtrain_events_total{event}``
    (``checkpoint_signed``, ``keeper_refused``, ``state_rejected``, ``keeper_skip``...)."""

    def __init__(self, event):
        self._event = event
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self.server = None

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

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        self.server, _ = start_http_server(port, addr=host, registry=registry)
        return self.server.server_address[1]

    def close(self) -> None:
        self.server = close_server(self.server)


def close_server(server) -> None:
    """Stop a ``start_http_server`` server (None: nothing to stop); returns None."""
    if server is not None:
        server.shutdown()
        server.server_close()
