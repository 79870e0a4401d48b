"""The mover: when a running peer changes stage (rebalancing, or refilling an emptied stage),
and the move itself. The decisions are ``peer.swarm.churn``'s pure functions; this module
does the I/O around them and owns the churn state (cool-down, next check, epochs seen)."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from typing import Callable, Optional, Sequence

from peer.base.distrust import DistrustTally
from peer.net.rpc import printable
from peer.node.holder import StageHolder
from peer.node.presence import Presence
from peer.pipeline.client import call_info
from peer.swarm.balancing import RebalancePolicy, overclaims, without_unproven
from peer.swarm.churn import EmptyStages, StageEpochs, check_move, epochs_lost, next_check_delay
from peer.swarm.view import SwarmView
from protocol.records import ACTIVE_STATES, PeerInfo, PeerState
from protocol.spec import RunSpec

log = logging.getLogger("swarmtrain.peer")


class Mover:
    """``holder``: the stage it swaps; ``presence``: this peer's status and the swarm's records;
    ``swarm``: a fresh read before a move; ``p2p`` and ``run`` (a ``LoopThread.run``): the info
    requests that prove a stage's other peers; ``stopping``: set when the peer shuts down;
    ``give_up()``: stop waiting to hand gradients back (a second Ctrl-C)."""

    def __init__(
        self,
        spec: RunSpec,
        holder: StageHolder,
        presence: Presence,
        swarm: SwarmView,
        *,
        p2p,
        run: Callable,
        distrust: DistrustTally,
        event: Callable,
        stopping: threading.Event,
        give_up: Callable[[], bool],
        period: float,
        cooldown: float,
    ):
        self.spec, self.holder, self.presence, self.swarm = spec, holder, presence, swarm
        self.p2p, self.run, self.distrust, self.event = p2p, run, distrust, event
        self.stopping, self.give_up = stopping, give_up
        self.period, self.policy = period, RebalancePolicy(cooldown_s=cooldown)
        # When this peer last joined or moved (the policy's cool-down), when it next looks for
        # a move, and the highest epoch seen per stage (work lost on a recovery).
        self.last_move_at: Optional[float] = None
        self._next_check_at: Optional[float] = None
        self._stage_epochs = StageEpochs()
        self._empty_stages = EmptyStages()
        self._rng = random.Random()
        self._last_snapshot: object = None

    def joined(self) -> None:
        """A join starts the cool-down, as a move does."""
        self.last_move_at = time.monotonic()
        self._schedule()

    def _schedule(self) -> None:
        delay = next_check_delay(self.period, self._rng)
        self._next_check_at = None if delay is None else time.monotonic() + delay

    def maybe_move(self) -> None:
        """Every ~--rebalance-period seconds: move to another stage if the policy names this
        peer (a clear throughput gain, or a stage whose peers are all gone)."""
        presence, num_stages = self.presence, self.spec.num_stages
        snapshot = presence.peers
        if snapshot is not self._last_snapshot:
            self._last_snapshot = snapshot
            self._report_overclaims(snapshot)
        self._stage_epochs.observe(snapshot)
        if any(p.peer_id == presence.peer_id for p in snapshot):  # a read that found the swarm
            self._empty_stages.observe(snapshot, num_stages, time.monotonic())
        if self._next_check_at is None or time.monotonic() < self._next_check_at:
            return
        if self.stopping.is_set() or presence.status.state != PeerState.ONLINE:
            return
        self._schedule()
        # A candidate's turn to refill an empty stage comes two check periods after the
        # previous one's: time enough for a mover's 'joining' record to be seen.
        turns = dict(empty_since=self._empty_stages.since, fallback_grace=2 * self.period)
        here = dict(my_peer_id=presence.peer_id, my_stage=presence.status.stage)
        planned = check_move(
            snapshot,
            num_stages,
            now=time.monotonic(),
            last_move_at=self.last_move_at,
            policy=self.policy,
            **here,
            **turns,
        )
        if planned.target is None:
            return
        # Records may be a few seconds old: decide again on a fresh read right before moving,
        # so that a move planned on stale records never empties a stage.
        try:
            fresh = self.swarm.snapshot()
        except Exception as err:
            log.warning("not moving: the fresh snapshot failed: %s", err)
            return
        self._stage_epochs.observe(fresh)
        fresh = self._proven(fresh, presence.status.stage)
        confirmed = check_move(
            fresh,
            num_stages,
            now=time.monotonic(),
            last_move_at=self.last_move_at,
            policy=self.policy,
            planned=planned.target,
            **here,
            **turns,
        )
        if confirmed.target is None:
            self.event(
                "move_cancelled",
                f"not moving to stage {planned.target}: {confirmed.why}",
                to=planned.target,
                reason=confirmed.why,
            )
            return
        self.move_to(confirmed.target, recovery=confirmed.recovery)

    def _report_overclaims(self, snapshot: Sequence[PeerInfo]) -> None:
        for peer_id, claimed, counted in overclaims(snapshot, self.spec.num_stages):
            self.distrust.report(
                peer_id,
                "claim_capped",
                f"peer {peer_id} announces {claimed:.3g} samples/s; balancing counts {counted:.3g} "
                "(4x the median peer)",
                claimed=claimed,
                counted=counted,
            )

    def _proven(self, snapshot: list[PeerInfo], stage: int) -> list[PeerInfo]:
        """The snapshot without the records of this stage's other peers that do not answer an
        info request as servers of this spec and stage (within 5 s): a move out of the stage
        is only made to peers that exist."""
        me = self.presence.peer_id
        mates = [p for p in snapshot if p.stage == stage and p.peer_id != me and p.state in ACTIVE_STATES]
        if not mates:
            return snapshot
        digest = self.spec.digest()

        async def ask_all():
            return await asyncio.gather(
                *(call_info(self.p2p, p.peer_id, digest, timeout=5.0) for p in mates), return_exceptions=True
            )

        try:
            answers = self.run(ask_all(), timeout=15)
        except Exception as err:  # our own loop failed: nobody is proven, nobody moves
            answers = [err] * len(mates)
        proven = set()
        for p, answer in zip(mates, answers):
            if isinstance(answer, BaseException):
                why = printable(f"{type(answer).__name__}: {answer}")
            elif answer.error or answer.spec_digest != digest or answer.stage != stage:
                why = printable(answer.error or f"it serves stage {answer.stage} of spec {answer.spec_digest[:16]!r}")
            else:
                proven.add(p.peer_id)
                continue
            self.distrust.report(
                p.peer_id,
                "no_server",
                f"peer {p.peer_id} announces stage {stage} but does not answer as its server ({why}): not counted",
                stage=stage,
            )
        return without_unproven(snapshot, stage, proven, me)

    def move_to(self, target: int, *, recovery: bool) -> bool:
        """Serve ``target`` instead of the current stage: load its state (the newest trusted
        checkpoint, then the group's live state) before announcing it online there.

        The trainer keeps going: it routes the old stage to its other peers while this one
        closes it, and the new stage to this peer once it is open. Returns True if moved."""
        holder, presence, event = self.holder, self.presence, self.event
        old, started = presence.status.stage, time.monotonic()
        reason = "recovery" if recovery else "rebalance"
        last_seen = self._stage_epochs.last(target)
        event(
            "moving",
            f"moving from stage {old} to stage {target} ({reason})",
            **{"from": old, "to": target, "reason": reason},
        )
        if not recovery:
            # The old group's next round may take this peer's accumulated samples; a recovery
            # does not wait: the pipeline is stalled until the empty stage is back.
            holder.hand_back(give_up=self.give_up)
        # Announced at the target as 'joining', in one update: routers stop sending the old
        # stage's work here and send none of the new stage's yet, and the balancing policy of
        # every other peer counts this peer at the target (nobody else moves to refill it).
        presence.update(stage=target, state=PeerState.JOINING)
        presence.announce()
        holder.close(for_move=True)
        closed = time.monotonic()
        try:
            holder.open(target)
            if recovery and holder.slot.restored_step is None and holder.checkpoints_announced(target):
                # The stage's signed checkpoint exists but this try failed (a broken transfer):
                # one more try before restarting a whole stage from the spec's init.
                event(
                    "restore_retry",
                    f"stage {target} has signed checkpoints but none could be loaded; trying once more",
                    stage=target,
                )
                holder.close(for_move=False)
                holder.open(target)
        except Exception as err:
            log.exception("opening stage %d failed", target)
            event(
                "move_failed",
                f"could not open stage {target} ({type(err).__name__}: {err}); going back to stage {old}",
                **{"from": old, "to": target, "reason": f"{type(err).__name__}: {err}"},
            )
            presence.update(stage=old)
            presence.announce()
            holder.open(old)
            target = old
        if recovery and target != old:
            # The group's progress records outlive its peers: the epoch they had reached.
            group_epoch = holder.resume_if_group_gone()
            seen = [e for e in (last_seen, group_epoch) if e is not None]
            last_seen = max(seen) if seen else None
        presence.update(state=PeerState.ONLINE)
        presence.announce()
        self.last_move_at = time.monotonic()
        if target == old:
            return False
        slot = holder.slot
        seconds = time.monotonic() - started
        event(
            "moved",
            f"now serving stage {target} (was {old}, {reason}) after {seconds:.1f}s, at epoch "
            f"{slot.epoch}"
            + (f", restored from checkpoint step {slot.restored_step}" if slot.restored_step is not None else ""),
            **{
                "from": old,
                "to": target,
                "reason": reason,
                "seconds": round(seconds, 3),
                "close_s": round(closed - started, 3),
                "open_s": round(time.monotonic() - closed, 3),
                "epoch": slot.epoch,
                "restored_step": slot.restored_step,
            },
        )
        if recovery:
            lost = epochs_lost(last_seen, slot.restored_step)
            source = (
                f"checkpoint step {slot.restored_step}"
                if slot.restored_step is not None
                else "the spec's initialisation (no trusted checkpoint)"
            )
            event(
                "recovered",
                f"stage {target} had no peer left: restored from {source}; "
                + (
                    f"{lost} epoch(s) of its training lost (last seen at epoch {last_seen})"
                    if lost is not None
                    else "its last epoch was never seen"
                ),
                stage=target,
                restored_step=slot.restored_step,
                epoch_lost=lost,
                last_seen_epoch=last_seen,
                epoch=slot.epoch,
            )
        return True
