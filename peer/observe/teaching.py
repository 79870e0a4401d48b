"""Metrics of teachers: a trainer's requests, spot checks and bans (read from its
``TeacherClient``), the last stage's distilled micro-batches, and the names of a teacher peer's
own figures (``swarmtrain teach --metrics-port``: ``peer.observe.metrics.TeacherMetrics``)."""

from __future__ import annotations

from peer.observe.snapshot import PeerSnapshot

__all__ = ["TEACHER_METRICS", "read_teaching"]

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


def read_teaching(snap: PeerSnapshot, put) -> None:
    """A training peer's teacher figures (nothing when its run does not distill)."""
    if snap.worker is not None and snap.worker.is_last:
        put("stage_distilled", snap.worker.distilled)
    teaching = snap.teaching
    if teaching is None:
        return
    for outcome, n in teaching.requests.items():
        put("teacher_requests", n, outcome)
    for result, n in teaching.spot_checks.items():
        put("teacher_spot_checks", n, result)
    put("teachers_banned", teaching.banned)
    put("teachers_suspended", teaching.suspended)
    put("teachers_online", teaching.usable)
    put("no_teacher_microbatches", teaching.no_teacher)
    if snap.trainer is not None:
        put("distilled_microbatches", snap.trainer.distilled)
