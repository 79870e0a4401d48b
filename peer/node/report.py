"""What a running peer tells its user: the periodic status line and the first-contribution
event. Read-only: both read the peer's public view (``status``, ``worker``, ``trainer``)."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from peer.node.presence import TrainingFigures
from protocol.records import MAX_LOSS as MAX_RECORD_LOSS

if TYPE_CHECKING:
    from peer.node.peer import Peer


class FirstContribution:
    """Event ``contributing``, once: the first micro-batch this peer's stage accumulated for
    its group (served) or its trainer finished (trained); how long a newcomer takes to become
    useful."""

    def __init__(self):
        self.done = False

    def check(self, peer: "Peer") -> None:
        if self.done:
            return
        served = peer.worker.stats.samples if peer.worker is not None else 0
        trained = peer.trainer.stats.microbatches if peer.trainer is not None else 0
        if served or trained:
            self.done = True
            seconds = time.time() - peer.started
            peer.out.event(
                "contributing",
                f"first contribution {seconds:.1f}s after start",
                seconds=round(seconds, 3),
                served_samples=served,
                trained_microbatches=trained,
                stage=peer.status.stage,
            )


def print_status(peer: "Peer") -> None:
    per_stage = peer.presence.online_per_stage(peer.spec.num_stages)
    stage, epoch, worker = peer.status.stage, peer.epoch, peer.worker
    t = peer.trainer.stats if peer.trainer is not None else None
    elapsed = max(1e-6, time.monotonic() - t.started) if t else 1.0
    tok_s = t.tokens / elapsed if t else 0.0
    loss = t.loss_ema if t else (worker.stats.loss_ema if worker is not None else None)
    served = (worker.stats.backward + (worker.stats.forward if worker.is_last else 0)) if worker is not None else 0
    sent = sum(peer.counters.sent.values())
    teaching = getattr(peer, "teaching", None)
    teachers = len(teaching.client.usable()) if teaching is not None else None
    text = (
        f"stage {stage} | epoch {epoch} | "
        + (f"step {t.microbatches} | " if t else "")
        + (f"loss {loss:.3f} | " if loss is not None else "")
        + (f"{tok_s:,.0f} tok/s | " if t else "")
        + (f"teachers {teachers}, distilled {t.distilled} | " if teachers is not None and t else "")
        + f"served {served} | peers/stage {per_stage} | sent {sent / 1e6:.1f} MB"
    )
    peer.out.event(
        "status",
        text,
        stage=stage,
        epoch=epoch,
        microbatches=t.microbatches if t else 0,
        loss=loss,
        tokens=t.tokens if t else 0,
        tokens_per_s=tok_s,
        peers_per_stage=per_stage,
        samples_accumulated=worker.stats.samples if worker is not None else 0,
        served=served,
        retries=t.retries if t else 0,
        distilled=t.distilled if t else 0,
        teachers=teachers,
        bytes_sent=dict(peer.counters.sent),
        bytes_received=dict(peer.counters.received),
    )


def training_figures(peer: "Peer") -> TrainingFigures:
    """The live figures of a peer's record: epoch, loss, and its trainer's work."""
    trainer, worker = peer.trainer, peer.worker
    loss = None
    if trainer is not None and trainer.stats.loss_ema is not None:
        loss = float(trainer.stats.loss_ema)
    elif worker is not None and worker.stats.loss_ema is not None:
        loss = float(worker.stats.loss_ema)
    if loss is not None and not (math.isfinite(loss) and 0.0 <= loss <= MAX_RECORD_LOSS):
        loss = None  # the record's schema would refuse it, and the peer would vanish from the swarm
    optimizer = getattr(peer.slot, "optimizer", None)
    digest = str(getattr(optimizer, "round_digest", ""))[:16]  # outer rounds only
    if trainer is None:
        return TrainingFigures(epoch=peer.epoch, loss=loss, state_digest=digest)
    stats = trainer.stats
    elapsed = max(1e-6, time.monotonic() - stats.started)
    return TrainingFigures(
        epoch=peer.epoch,
        loss=loss,
        tokens=stats.tokens,
        samples_per_s=stats.samples / elapsed,
        has_data=True,
        state_digest=digest,
    )
