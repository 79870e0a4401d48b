"""Serving a node's figures as Prometheus metrics: the one start-up every node kind uses, and the
collector that turns a table of metric names into families when Prometheus scrapes.

A node copies its values into a ``Values`` under a lock (from its main loop); a scrape only reads
that copy and never touches the node's threads.
"""

from __future__ import annotations

import threading
from typing import Callable, Mapping

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = ["PREFIX", "Values", "close_server", "serve_metrics"]

PREFIX = "swarmtrain"

# name: (type, help, label names)
Table = Mapping[str, tuple[str, str, tuple[str, ...]]]


class Values:
    """The latest values of the metrics of ``table``, {name: {label values: value}}."""

    def __init__(self, table: Table):
        self.table = table
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple, float]] = {}

    def set(self, values: dict[str, dict[tuple, float]]) -> None:
        with self._lock:
            self._values = values

    def describe(self):
        return []  # values appear after the first update: no fixed description

    def collect(self):
        with self._lock:
            values = {k: dict(v) for k, v in self._values.items()}
        for name, (kind, help_text, labels) in self.table.items():
            series = values.get(name)
            if not series:
                continue
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                f"{PREFIX}_{name}", help_text, labels=list(labels)
            )
            for label_values, value in series.items():
                family.add_metric(list(label_values), float(value))
            yield family


def putter(values: dict) -> Callable:
    """``put(name, value, *labels)`` into ``values``; a None value is left out (absent, not 0)."""

    def put(name: str, value, *labels) -> None:
        if value is not None:
            values.setdefault(name, {})[tuple(str(x) for x in labels)] = float(value)

    return put


def serve_metrics(collector, *, host: str, port: int, event: Callable):
    """Serve ``collector`` at http://host:port/metrics (port 0: any free one), said in one event;
    a port that cannot be taken stops the node before it joins anything. Returns the server."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as err:
        raise SystemExit(f"--metrics-port {port}: cannot listen on {host}: {err}") from None
    port = server.server_address[1]
    url = f"http://{host}:{port}/metrics"
    event("metrics", f"Prometheus metrics at {url}", port=port, url=url)
    return server


def close_server(server) -> None:
    """Stop a ``serve_metrics`` server (None: nothing to stop); returns None."""
    if server is not None:
        server.shutdown()
        server.server_close()
