"""Metrics of teachers: a trainer's requests, spot checks and bans (read from its
``TeacherClient``), the last stage's distilled micro-batches, and a teacher peer's own figures
(``swarmtrain teach --metrics-port``: ``TeacherMetrics``)."""

from __future__ import annotations

import time

from peer.base import Output
from peer.base.config import OutputConfig

__all__ = ["TEACHER_METRICS", "TeacherMetrics", "read_teaching"]

TEACHER_METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # a trainer of a run that distills
    "teacher_requests": (
        "counter",
        "Soft-target requests this trainer sent to teachers, by outcome (ok, failed).",
        ("outcome",),
    ),
    "teacher_spot_checks": (
        "counter",
        "Micro-batches also sent to a second teacher of the same weights, by result (agree, disagree, incomplete).",
        ("result",),
    ),
    "teachers_banned": ("gauge", "Teachers this trainer banned: outvoted by two of the same weights.", ()),
    "teachers_suspended": ("gauge", "Teachers set aside: in a dispute that no third teacher has decided yet.", ()),
    "teachers_online": ("gauge", "Teachers of accepted weights in this trainer's latest DHT read.", ()),
    "distilled_microbatches": ("counter", "Micro-batches this trainer sent to the last stage with soft targets.", ()),
    "no_teacher_microbatches": ("counter", "Micro-batches that found no teacher to answer (labels only).", ()),
    "stage_distilled": ("counter", "Last stage: micro-batches whose loss had a distillation term.", ()),
    # a teacher peer
    "teacher_answered_requests": ("counter", "Soft-target requests this teacher answered.", ()),
    "teacher_answered_tokens": ("counter", "Tokens this teacher answered.", ()),
    "teacher_batches": ("counter", "Forwards this teacher ran (waiting requests are batched into one).", ()),
    "teacher_expired": ("counter", "Requests whose trainer's deadline passed before their turn.", ()),
    "teacher_queue_depth": ("gauge", "Requests waiting for this teacher's model.", ()),
    "teacher_throughput": ("gauge", "Samples/s of one micro-batch through the model, measured at start.", ()),
}


def read_teaching(peer, put) -> None:
    """A training peer's teacher figures (nothing when its run does not distill)."""
    worker = peer.worker
    if worker is not None and getattr(worker, "is_last", False):
        put("stage_distilled", worker.stats.distilled)
    side = getattr(peer, "teaching", None)
    if side is None:
        return
    client = side.client
    for outcome, n in dict(client.stats.requests).items():
        put("teacher_requests", n, outcome)
    for result, n in dict(client.stats.spot_checks).items():
        put("teacher_spot_checks", n, result)
    put("teachers_banned", len(client.banned))
    put("teachers_suspended", len(client.suspended))
    put("teachers_online", len(client.usable()))
    put("no_teacher_microbatches", client.stats.no_teacher)
    if peer.trainer is not None:
        put("distilled_microbatches", peer.trainer.stats.distilled)


class TeacherMetrics:
    """``/metrics`` of a teacher peer: its own figures, the bytes it moved, refused requests."""

    def __init__(self):
        from peer.observe.metrics import PeerMetrics

        self._metrics = PeerMetrics()

    @classmethod
    def start(cls, config: OutputConfig, out: Output) -> "TeacherMetrics":
        metrics = cls()
        try:
            port = metrics._metrics.serve(config.metrics_port, host=config.metrics_host)
        except OSError as err:
            raise SystemExit(f"--metrics-port {config.metrics_port}: cannot listen on {config.metrics_host}: {err}")
        url = f"http://{config.metrics_host}:{port}/metrics"
        out.event("metrics", f"Prometheus metrics at {url}", port=port, url=url)
        return metrics

    def update(self, teacher) -> None:
        values: dict = {}

        def put(name: str, value, *labels) -> None:
            if value is not None:
                values.setdefault(name, {})[tuple(str(x) for x in labels)] = float(value)

        put("up_seconds", time.time() - teacher.started)
        stats = teacher.server.stats
        put("teacher_answered_requests", stats.requests)
        put("teacher_answered_tokens", stats.tokens)
        put("teacher_batches", stats.batches)
        put("teacher_expired", stats.expired)
        put("teacher_queue_depth", teacher.server.queued)
        put("teacher_throughput", teacher.throughput)
        counters = teacher.counters
        for kind, n in list(counters.sent.items()):
            put("sent_bytes", n, kind)
        for kind, n in list(counters.received.items()):
            put("received_bytes", n, kind)
        for rpc, n in list(counters.rejected.items()):
            put("requests_rejected", n, rpc)
        for rpc, n in list(counters.busy.items()):
            put("requests_busy", n, rpc)
        self._metrics.set_values(values)

    def close(self) -> None:
        self._metrics.close()
