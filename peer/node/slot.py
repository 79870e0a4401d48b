"""One stage as this peer serves it: built, restored, measured, caught up, served, closed.

A ``StageSlot`` owns every part that belongs to one stage (module, optimizer, worker, server,
the announced capacity and the restored step) and is swapped as one object on a move, so no
part of an old stage outlives it by accident and no reader sees half of a new one.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable, Optional, Sequence

import hivemind
from hivemind.p2p import P2P

from peer.averaging import make_stage_optimizer
from peer.base import LoopThread
from peer.checkpoints import CheckpointService, live_state_verdict
from peer.model.capacity import measure_stage_capacity
from peer.model.llama import LlamaStage
from peer.net import WireCounters
from peer.pipeline import ServedInfo, StageServer, StageWorker
from peer.pipeline.clipping import MicroBatchClip
from protocol.records import PeerInfo, PeerState
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
    info: Callable[[], ServedInfo]
    checkpoints: Callable[[], CheckpointService]
    throughput: Optional[float] = None  # --throughput: announced instead of a measured figure


class NoStartingWeights(RuntimeError):
    """The run starts from existing weights and this peer has no verified checkpoint of them."""


class StageSlot:
    def __init__(self, ctx: SlotContext, stage: int, module: LlamaStage):
        self.ctx, self.stage, self.module = ctx, stage, module
        self.restored_step: Optional[int] = None
        self.capacity: Optional[float] = None
        self.optimizer = None
        self.worker: Optional[StageWorker] = None
        self.server: Optional[StageServer] = None
        self._closed_epoch = 0

    @classmethod
    def open(cls, ctx: SlotContext, stage: int, *, held_step: Optional[int] = None) -> "StageSlot":
        """Build stage ``stage``, restore its state, catch up with its group, start serving it."""
        slot = cls(ctx, stage, LlamaStage.from_spec(ctx.spec, stage))
        slot._restore(held_step)
        slot._measure_capacity()
        outer = ctx.spec.training.averaging == "outer"
        slot.optimizer = (
            slot._outer_optimizer() if outer else make_stage_optimizer(ctx.spec, stage, slot.module, ctx.dht)
        )
        if not outer:  # outer rounds start from the restored (or initial) weights: no live state
            slot._catch_up()
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
        if outer:
            slot.optimizer.attach(slot.worker)
        slot.server = StageServer(ctx.spec, stage, slot.worker, info=ctx.info, counters=ctx.counters)
        ctx.loop.run(slot.server.start(ctx.p2p), timeout=30)
        return slot

    @property
    def epoch(self) -> int:
        return int(self.optimizer.local_epoch) if self.optimizer is not None else self._closed_epoch

    # --- opening ---------------------------------------------------------------------------

    def _outer_optimizer(self):
        from hivemind.utils.crypto import RSAPrivateKey

        from peer.averaging.outer import OuterOptimizer
        from peer.averaging.rounds import RoundNet

        ctx = self.ctx
        net = RoundNet(
            ctx.dht,
            ctx.p2p,
            ctx.loop.run,
            run_id=ctx.spec.run_id,
            spec_digest=ctx.spec.digest(),
            stage=self.stage,
            key=RSAPrivateKey.process_wide(),  # the peer's identity (Identity.install_as_process_key)
            peer_id=ctx.p2p.peer_id.to_base58(),
            counters=ctx.counters,
        )
        ctx.loop.run(net.start(), timeout=30)
        opt = OuterOptimizer(ctx.spec, self.stage, self.module, net, event=ctx.event)
        self._join_outer_group(opt, net.peer_id)
        return opt

    def _join_outer_group(self, opt, me: str) -> None:
        """Take the round state the group serves before training (``peer.node.outer_group``): a
        member that trained elsewhere would never hold the group's bits. A group that already
        holds this peer's bits (peers that start together from the spec's init or one checkpoint)
        is joined by taking its round count, without a read. After a round it missed, the
        optimizer reads the state again (``resync``)."""
        from peer.node.outer_group import behind_group, read_group_state, rounds_behind_on_same_bits

        ctx, stage = self.ctx, self.stage
        lone_mate_trusted = ctx.spec.trust.accept_untrusted_live_state

        def read(purpose: str):
            def refused(why: str) -> None:
                ctx.event(
                    f"outer_{purpose}_refused",
                    f"stage {stage}: {why}; keeping this peer's weights",
                    stage=stage,
                    why=why,
                )

            return read_group_state(
                ctx, stage, me, refused=refused, round_busy_s=opt.gather_s + opt.agree_s, base_digest=opt.base_digest_of
            )

        def mate_states() -> list[tuple[int, str]]:
            swarm = ctx.checkpoints().swarm
            return [
                (p.epoch, p.state_digest)
                for p in (swarm.snapshot() if swarm is not None else [])
                if p.stage == stage and p.peer_id != me and p.state == PeerState.ONLINE
            ]

        def behind() -> Optional[str]:
            mates = mate_states()
            skipped = rounds_behind_on_same_bits(opt.history, mates, lone_mate_trusted=lone_mate_trusted)
            if skipped:
                opt.count_rounds_as_group(skipped)
                ctx.event(
                    "outer_recounted",
                    f"stage {stage}: the group holds this peer's bits {skipped} round(s) later; now at round "
                    f"{opt.local_epoch}",
                    stage=stage,
                    epoch=opt.local_epoch,
                    rounds=skipped,
                )
            return behind_group(opt.history, opt.local_epoch, mates, lone_mate_trusted=lone_mate_trusted)

        opt.resync = lambda: read("resync")
        opt.behind = behind
        skipped = rounds_behind_on_same_bits(opt.history, mate_states(), lone_mate_trusted=lone_mate_trusted)
        if skipped is not None:
            opt.count_rounds_as_group(skipped)
            ctx.event(
                "outer_joined",
                f"stage {stage}: the group holds this peer's bits (round {opt.local_epoch}, base "
                f"{opt.round_digest[:16]}); nothing to read",
                stage=stage,
                epoch=opt.local_epoch,
                digest=opt.round_digest,
                sources=[],
            )
            return
        got = read("join")
        if got is None:
            return
        opt.adopt(got.round, got.tensors)
        ctx.event(
            "outer_joined",
            f"stage {stage}: joined the group at round state {got.round} (base {got.digest[:16]}, from "
            f"{', '.join(pid[:16] for pid in got.sources)})",
            stage=stage,
            epoch=got.round,
            digest=got.digest,
            sources=list(got.sources),
        )

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

    def _catch_up(self) -> None:
        """Join the stage group at its current epoch, as far as the spec's trust policy allows.

        - A restored checkpoint's step becomes this peer's epoch first, so that live state
          older than the trusted checkpoint is never loaded over it (hivemind refuses state
          from peers behind its local epoch).
        - When the group is ahead, its live state (unsigned, from one peer of the group) is
          loaded only if ``trust.accept_untrusted_live_state`` and, when the spec trusts
          checkpoint keys, the group is at most ``trust.max_live_state_lag`` epochs ahead of
          the restored checkpoint (or of the spec's init when there is none); see
          ``peer.checkpoints.policy.live_state_verdict``.
        - Otherwise the peer keeps its trusted weights (event ``live_state_refused`` says
          why), takes the group's epoch number so that it trains in step with the group, and
          stops accepting live state for this stage: its parameters converge through the
          group's periodic parameter averaging, not by copying one untrusted peer.
        """
        opt, trust, event = self.optimizer, self.ctx.spec.trust, self.ctx.event
        tracker = opt.tracker
        if self.restored_step is not None and opt.local_epoch < self.restored_step:
            opt.set_local_epoch(self.restored_step)
        tracker.fetched_global_progress_this_epoch.wait(timeout=5.0)
        group = tracker.global_epoch
        load, why = live_state_verdict(
            group_epoch=group,
            local_epoch=opt.local_epoch,
            trusted_step=self.restored_step,
            has_trusted_keys=bool(trust.trusted_keys),
            accept_untrusted=trust.accept_untrusted_live_state,
            max_lag=trust.max_live_state_lag,
        )
        if load:
            event(
                "catch_up",
                f"stage group is at epoch {group}: loading its state ({why})",
                epoch=group,
                restored_step=self.restored_step,
            )
            opt.load_state_from_peers()
        elif group > opt.local_epoch:
            weights = "checkpoint" if self.restored_step is not None else "initial"
            event(
                "live_state_refused",
                f"not loading the stage group's live state: {why}; keeping the {weights} "
                f"weights and joining at epoch {group}",
                epoch=group,
                restored_step=self.restored_step,
                reason=why,
            )
            opt.accept_live_state = False
            opt.set_local_epoch(group)

    def resume_if_group_gone(self, others_online: Sequence[PeerInfo]) -> Optional[int]:
        """If this peer is the only one left on its stage, continue the stage's epoch count
        with the weights it has (restored or initial); returns that epoch, or None.

        The stage's previous peers may be gone while their training-progress records outlive
        them (about a minute): the optimizer would count itself epochs behind, try to load
        state from dead peers on every step and never step. Only done when the live-state
        catch-up left this peer behind *and* the signed peer records show no other online
        peer on the stage (``others_online``); the work lost is reported by the caller."""
        opt, worker = self.optimizer, self.worker
        if getattr(opt, "tracker", None) is None:  # outer rounds keep no hivemind progress records
            return None
        group = int(opt.tracker.global_epoch)
        if group <= opt.local_epoch or others_online:
            return None
        worker.call(lambda: opt.set_local_epoch(group), timeout=60)
        if opt.use_gradient_averaging and opt.grad_averager is not None:
            worker.call(opt.grad_averager.reset_accumulated_grads_, timeout=60)
        return group

    # --- while serving ---------------------------------------------------------------------

    def parameters(self):
        """(epoch, parameters) of the stage, read in its worker thread (for ``run --keeper``)."""
        worker = self.worker
        return worker.call(
            lambda: (self.epoch, {k: p.detach().clone() for k, p in worker.module.named_parameters()}), timeout=60
        )

    def hand_back_gradients(self, *, partners: Sequence[PeerInfo], budget: float, give_up: Callable[[], bool]) -> None:
        """Before leaving, let the stage group's next round take the samples this peer
        accumulated, instead of dropping them; waits up to ``budget`` seconds."""
        opt = self.optimizer
        averager = getattr(opt, "grad_averager", None)
        if averager is None or averager.local_samples_accumulated == 0 or self.worker is None:
            return
        # Alone in the stage group: nobody to hand the samples to. The progress tracker alone
        # cannot tell: a peer that started seconds ago may not have fetched its partners'
        # progress yet (the parity test's trainer left with its samples that way, and its
        # partner waited for them forever), so the signed peer records count too.
        if opt.tracker.global_progress.num_peers <= 1 and not partners:
            return
        samples, epoch = averager.local_samples_accumulated, opt.local_epoch
        self.ctx.event(
            "handing_back",
            f"waiting up to {budget:.0f}s for stage {self.stage}'s averaging round to "
            f"take {samples} accumulated samples",
            samples=samples,
            epoch=epoch,
        )
        deadline = time.monotonic() + budget
        while time.monotonic() < deadline and opt.local_epoch == epoch and not give_up():
            time.sleep(0.2)
        self.ctx.event(
            "handed_back" if opt.local_epoch != epoch else "hand_back_timeout",
            f"epoch {opt.local_epoch}" + ("" if opt.local_epoch != epoch else ": samples dropped"),
            epoch=opt.local_epoch,
        )

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
