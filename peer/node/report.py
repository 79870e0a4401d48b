"""What a running peer tells its user and the swarm about its training: the periodic status line,
the first-contribution event and the live figures of its record. Read-only: each reads one
``PeerSnapshot`` (``Peer.snapshot``)."""

from __future__ import annotations

import math
import time
from typing import Callable

from peer.node.presence import TrainingFigures
from peer.observe.snapshot import PeerSnapshot
from protocol.records import MAX_LOSS as MAX_RECORD_LOSS


class FirstContribution:
    """Event ``contributing``, once: the first micro-batch this peer's stage accumulated for
    its group (served) or its trainer finished (trained); how long a newcomer takes to become
    useful."""

    def __init__(self):
        self.done = False

    def check(self, snap: PeerSnapshot, event: Callable) -> None:
        if self.done:
            return
        served = snap.worker.samples if snap.worker is not None else 0
        trained = snap.trainer.microbatches if snap.trainer is not None else 0
        if served or trained:
            self.done = True
            seconds = time.time() - snap.started
            event(
                "contributing",
                f"first contribution {seconds:.1f}s after start",
                seconds=round(seconds, 3),
                served_samples=served,
                trained_microbatches=trained,
                stage=snap.stage,
            )


def print_status(snap: PeerSnapshot, event: Callable) -> None:
    per_stage = snap.online_per_stage()
    t, worker = snap.trainer, snap.worker
    elapsed = max(1e-6, time.monotonic() - t.started) if t else 1.0
    tok_s = t.tokens / elapsed if t else 0.0
    loss = snap.loss
    served = worker.served if worker is not None else 0
    sent = sum(snap.sent.values())
    teachers = snap.teaching.usable if snap.teaching is not None else None
    text = (
        f"stage {snap.stage} | epoch {snap.epoch} | "
        + (f"step {t.microbatches} | " if t else "")
        + (f"loss {loss:.3f} | " if loss is not None else "")
        + (f"{tok_s:,.0f} tok/s | " if t else "")
        + (f"teachers {teachers}, distilled {t.distilled} | " if teachers is not None and t else "")
        + f"served {served} | peers/stage {per_stage} | sent {sent / 1e6:.1f} MB"
    )
    event(
        "status",
        text,
        stage=snap.stage,
        epoch=snap.epoch,
        microbatches=t.microbatches if t else 0,
        loss=loss,
        tokens=t.tokens if t else 0,
        tokens_per_s=tok_s,
        peers_per_stage=per_stage,
        samples_accumulated=worker.samples if worker is not None else 0,
        served=served,
        retries=t.retries if t else 0,
        distilled=t.distilled if t else 0,
        teachers=teachers,
        bytes_sent=dict(snap.sent),
        bytes_received=dict(snap.received),
    )


def training_figures(snap: PeerSnapshot) -> TrainingFigures:
    """The live figures of a peer's record: epoch, loss, the round state's digest (outer rounds)
    and its trainer's work."""
    loss = snap.loss
    if loss is not None and not (math.isfinite(loss) and 0.0 <= loss <= MAX_RECORD_LOSS):
        loss = None  # the record's schema would refuse it, and the peer would vanish from the swarm
    digest = snap.optimizer.state_digest if snap.optimizer is not None else ""
    t = snap.trainer
    if t is None:
        return TrainingFigures(epoch=snap.epoch, loss=loss, state_digest=digest)
    elapsed = max(1e-6, time.monotonic() - t.started)
    return TrainingFigures(
        epoch=snap.epoch,
        loss=float(loss) if loss is not None else None,
        tokens=t.tokens,
        samples_per_s=t.samples / elapsed,
        has_data=True,
        state_digest=digest,
    )
