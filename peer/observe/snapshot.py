"""One immutable snapshot of a running peer: what its status line, its DHT record's live figures
and /metrics read.

The peer's main loop takes a ``PeerSnapshot`` (``peer.node.peer.Peer.snapshot``) from its parts,
copying every figure, and hands it to the readers; they never hold the peer or reach into its
parts, and the parts keep their counters as they like.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

from peer.averaging.stage_optimizer import OptimizerFigures
from protocol.records import PeerInfo, PeerState, online_per_stage

__all__ = ["PeerSnapshot", "StageFigures", "TeachingFigures", "TrainerFigures"]


@dataclasses.dataclass(frozen=True)
class TrainerFigures:
    """A trainer's counters (``peer.pipeline.trainer.TrainerStats``) and its routing state."""

    microbatches: int = 0
    samples: int = 0
    tokens: int = 0
    retries: int = 0
    failures: int = 0
    loss_ema: Optional[float] = None
    started: float = 0.0  # monotonic
    distilled: int = 0
    inflight: int = 0
    banned: frozenset = frozenset()

    @classmethod
    def of(cls, trainer, now: float) -> "TrainerFigures":
        s = trainer.stats
        return cls(
            microbatches=s.microbatches,
            samples=s.samples,
            tokens=s.tokens,
            retries=s.retries,
            failures=s.failures,
            loss_ema=s.loss_ema,
            started=s.started,
            distilled=s.distilled,
            inflight=sum(trainer.inflight.values()),
            banned=frozenset(trainer.bans.banned(now)),
        )


@dataclasses.dataclass(frozen=True)
class StageFigures:
    """The stage worker's counters (``peer.pipeline.worker.StageStats``) and its queue."""

    forward: int = 0
    backward: int = 0
    samples: int = 0
    rejected: int = 0
    discarded: int = 0
    clipped: int = 0
    compute_s: float = 0.0
    throughput: float = 0.0
    loss_ema: Optional[float] = None
    distilled: int = 0
    queue_depth: int = 0
    is_last: bool = False

    @classmethod
    def of(cls, worker) -> "StageFigures":
        s = worker.stats
        return cls(
            forward=s.forward,
            backward=s.backward,
            samples=s.samples,
            rejected=s.rejected,
            discarded=s.discarded,
            clipped=s.clipped,
            compute_s=s.compute_s,
            throughput=s.throughput,
            loss_ema=s.loss_ema,
            distilled=s.distilled,
            queue_depth=worker.queue_depth,
            is_last=worker.is_last,
        )

    @property
    def served(self) -> int:
        """Micro-batches this stage finished for others: backward passes (forwards on the last stage)."""
        return self.backward + (self.forward if self.is_last else 0)


@dataclasses.dataclass(frozen=True)
class TeachingFigures:
    """A trainer's side of teachers (``peer.teach.client.TeacherClient``)."""

    requests: Mapping[str, int] = dataclasses.field(default_factory=dict)
    spot_checks: Mapping[str, int] = dataclasses.field(default_factory=dict)
    banned: int = 0
    suspended: int = 0
    usable: int = 0
    no_teacher: int = 0

    @classmethod
    def of(cls, client) -> "TeachingFigures":
        return cls(
            requests=dict(client.stats.requests),
            spot_checks=dict(client.stats.spot_checks),
            banned=len(client.banned),
            suspended=len(client.suspended),
            usable=len(client.usable()),
            no_teacher=client.stats.no_teacher,
        )


@dataclasses.dataclass(frozen=True)
class PeerSnapshot:
    peer_id: str = ""
    run_id: str = ""
    digest: str = ""  # the spec's
    started: float = 0.0  # wall clock
    num_stages: int = 0
    stage: Optional[int] = None
    state: PeerState = PeerState.JOINING
    peers: tuple[PeerInfo, ...] = ()  # the latest snapshot of the swarm's records
    epoch: int = 0
    slot_serial: int = 0  # counts the stages this peer opened: a new one has a new optimizer
    trainer: Optional[TrainerFigures] = None
    worker: Optional[StageFigures] = None
    optimizer: Optional[OptimizerFigures] = None
    teaching: Optional[TeachingFigures] = None
    sent: Mapping[str, int] = dataclasses.field(default_factory=dict)
    received: Mapping[str, int] = dataclasses.field(default_factory=dict)
    rejected: Mapping[str, int] = dataclasses.field(default_factory=dict)
    busy: Mapping[str, int] = dataclasses.field(default_factory=dict)
    distrusted: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def online_per_stage(self) -> list[int]:
        return online_per_stage(list(self.peers), self.num_stages)

    @property
    def loss(self) -> Optional[float]:
        """The trainer's recent loss, or the last stage's when this peer only serves."""
        if self.trainer is not None and self.trainer.loss_ema is not None:
            return self.trainer.loss_ema
        return self.worker.loss_ema if self.worker is not None else None
