"""One stage as this peer serves it: built, restored, measured, caught up, served, closed.

A ``StageSlot`` owns every part that belongs to one stage (module, optimizer, worker, server,
the announced capacity and the restored step) and is swapped as one object on a move, so no
part of an old stage outlives it by accident and no reader sees half of a new one.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Callable, Optional, Sequence

import hivemind
from hivemind.p2p import P2P
from hivemind.utils.crypto import RSAPrivateKey

from peer.averaging import StageOptimizer, make_stage_optimizer
from peer.averaging.flat import FlatParams
from peer.averaging.group import OuterGroup
from peer.averaging.outer import OuterOptimizer
from peer.averaging.rounds import RoundNet
from peer.base import LoopThread
from peer.checkpoints import CheckpointService
from peer.checkpoints.state_pull import StateReader
from peer.model.capacity import measure_stage_capacity
from peer.model.llama import LlamaStage
from peer.net import WireCounters
from peer.pipeline import ServedInfo, StageServer, StageWorker
from peer.pipeline.clipping import MicroBatchClip
from protocol.records import PeerInfo
from protocol.spec import RunSpec

log = logging.getLogger("swarmtrain.peer")

Event = Callable[..., None]


@dataclasses.dataclass
class SlotContext:
    """What every slot of one peer shares: the swarm's handles and the peer's settings."""

    spec: RunSpec
    dht: hivemind.DHT
    p2p: P2P
    loop: LoopThread
    counters: WireCounters
    event: Event
    checkpoints: Callable[[], CheckpointService]
    records: Callable[[], Sequence[PeerInfo]]  # a fresh read of the swarm's peer records
    throughput: Optional[float] = None  # --throughput: announced instead of a measured figure
    info: Optional[Callable[[], ServedInfo]] = None  # what the info RPC answers (the holder's)


class NoStartingWeights(RuntimeError):
    """The run starts from existing weights and this peer has no verified checkpoint of them."""


class StageSlot:
    def __init__(self, ctx: SlotContext, stage: int, module: LlamaStage):
        self.ctx, self.stage, self.module = ctx, stage, module
        self.restored_step: Optional[int] = None
        self.capacity: Optional[float] = None
        self.optimizer: Optional[StageOptimizer] = None
        self.worker: Optional[StageWorker] = None
        self.server: Optional[StageServer] = None
        self._closed_epoch = 0

    @classmethod
    def open(cls, ctx: SlotContext, stage: int, *, held_step: Optional[int] = None) -> "StageSlot":
        """Build stage ``stage``, restore its state, catch up with its group, start serving it."""
        slot = cls(ctx, stage, LlamaStage.from_spec(ctx.spec, stage))
        slot._restore(held_step)
        slot._measure_capacity()
        slot.optimizer = slot._make_optimizer()
        slot.optimizer.join(slot.restored_step)
        # Micro-batch gradients are clipped against their running median unless the spec turns
        # clipping off (training.grad_clip = 0: exact updates, as the parity test needs).
        clip = MicroBatchClip() if ctx.spec.training.grad_clip > 0 else None
        slot.worker = StageWorker(
            slot.module,
            is_last=stage == ctx.spec.num_stages - 1,
            optimizer=slot.optimizer,
            clip=clip,
            distill=ctx.spec.distill,
        )
        slot.optimizer.attach(slot.worker)
        slot.server = StageServer(ctx.spec, stage, slot.worker, info=ctx.info, counters=ctx.counters)
        ctx.loop.run(slot.server.start(ctx.p2p), timeout=30)
        return slot

    @property
    def epoch(self) -> int:
        return int(self.optimizer.local_epoch) if self.optimizer is not None else self._closed_epoch

    # --- opening ---------------------------------------------------------------------------

    def _make_optimizer(self) -> StageOptimizer:
        ctx, stage = self.ctx, self.stage
        if ctx.spec.training.averaging != "outer":
            return make_stage_optimizer(ctx.spec, stage, self.module, ctx.dht, event=ctx.event)
        me = ctx.p2p.peer_id.to_base58()
        net = RoundNet(
            ctx.dht,
            ctx.p2p,
            ctx.loop.run,
            run_id=ctx.spec.run_id,
            spec_digest=ctx.spec.digest(),
            stage=stage,
            key=RSAPrivateKey.process_wide(),  # the peer's identity (Identity.install_as_process_key)
            peer_id=me,
            counters=ctx.counters,
        )
        ctx.loop.run(net.start(), timeout=30)
        group = OuterGroup(
            ctx.spec,
            stage,
            me,
            names=FlatParams(self.module).names,
            records=ctx.records,
            reader=StateReader(ctx.p2p, ctx.loop.run, ctx.spec, stage),
            event=ctx.event,
        )
        return OuterOptimizer(ctx.spec, stage, self.module, net, group=group, event=ctx.event)

    def _restore(self, held_step: Optional[int]) -> None:
        """Load the newest trusted checkpoint of the stage into the module before it serves
        (``CheckpointService.restore``: local or announced, verified, no rollback below
        ``held_step``); leaves the spec's init when there is none, unless the spec starts from
        existing weights (``init.weights_sha256``): then ``NoStartingWeights``."""
        restored = self.ctx.checkpoints().restore(self.stage, self.module, held_step=held_step)
        if restored is not None:
            self.restored_step = restored.verified.meta.step
        elif self.ctx.spec.init.weights_sha256 is not None:
            raise NoStartingWeights(
                f"stage {self.stage}: this run starts from the weights {self.ctx.spec.init.weights_sha256[:16]} "
                f"(init.weights_sha256) and no verified checkpoint of stage {self.stage} was found, locally or in "
                "the swarm; refusing to start from random weights. Step 0 is written by `swarmtrain checkpoint "
                "import` and served by the keeper (`swarmtrain bootstrap --keeper --checkpoint-dir DIR`)."
            )

    def _measure_capacity(self) -> None:
        """The figure this peer announces for the stage until it serves another one: measured
        here once (or given by --throughput), not the live rate, which swings with the load
        of the machine and made peers move back and forth (peer.model.capacity)."""
        if self.ctx.throughput is not None:
            self.capacity = float(self.ctx.throughput)
            return
        capacity = measure_stage_capacity(self.ctx.spec, self.module)
        self.capacity = capacity.samples_per_s
        self.ctx.event(
            "capacity",
            f"stage {self.stage}: {capacity.samples_per_s:.1f} samples/s (best of "
            f"{capacity.passes} forward+backward passes, {capacity.seconds:.1f}s)",
            stage=self.stage,
            samples_per_s=round(capacity.samples_per_s, 3),
            passes=capacity.passes,
            seconds=round(capacity.seconds, 3),
        )

    def resume_if_group_gone(self, others_online: Sequence[PeerInfo]) -> Optional[int]:
        """If this peer is the only one left on its stage, continue the stage's epoch count with
        the weights it has (``StageOptimizer.resume_if_alone``); the epoch, or None."""
        return self.optimizer.resume_if_alone(bool(others_online))

    # --- while serving ---------------------------------------------------------------------

    def parameters(self):
        """(epoch, parameters) of the stage, read in its worker thread (for ``run --keeper``)."""
        worker = self.worker
        return worker.call(
            lambda: (self.epoch, {k: p.detach().clone() for k, p in worker.module.named_parameters()}), timeout=60
        )

    def hand_back(self, *, partners: Sequence[PeerInfo], budget: float, give_up: Callable[[], bool]) -> None:
        """Before leaving, let the stage group's next update take what this peer accumulated,
        instead of dropping it; waits up to ``budget`` seconds."""
        if self.optimizer is not None and self.worker is not None:
            self.optimizer.hand_back(partners=bool(partners), budget=budget, give_up=give_up, event=self.ctx.event)

    # --- closing ---------------------------------------------------------------------------

    def close(self, *, wait_for_optimizer: bool = True) -> None:
        """Stop serving; in-flight requests get 'busy' and are retried elsewhere.

        ``wait_for_optimizer=False`` (a move) does not wait for the old group's pending update
        (hivemind's optimizer shutdown waits for its background averaging round, up to the
        averaging timeout): it would only change weights this peer is dropping. The old
        optimizer and its processes then shut down in the background."""
        if self.server is not None:
            try:
                self.ctx.loop.run(self.server.stop(), timeout=5)
            except Exception:
                pass
            self.server = None
        if self.worker is not None:
            self.worker.shutdown()
        if self.optimizer is None:
            return
        self._closed_epoch = self.epoch
        optimizer, self.optimizer = self.optimizer, None
        if wait_for_optimizer:
            _shutdown(optimizer)
        else:
            threading.Thread(target=_shutdown, args=(optimizer,), name="old-stage-optimizer", daemon=True).start()


def _shutdown(optimizer) -> None:
    try:
        optimizer.shutdown()
    except Exception as err:
        log.debug("optimizer shutdown: %s", err)
