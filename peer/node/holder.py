"""The stage this peer holds: one ``StageSlot`` at a time, opened, swapped on a move and closed.

``StageHolder`` is what the peer's start-up, the mover and the shutdown use to change stage, and
what the stage's RPCs, the trainer and the keeper read. It tells the others of a change: the
presence gets the slot's measured capacity, and ``on_change`` gets the ``LocalStage`` the trainer
routes to (None while no stage is open), one value swapped whole.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Optional

from peer.node.checkpointing import CheckpointSide
from peer.node.presence import Presence
from peer.node.slot import SlotContext, StageSlot
from peer.pipeline import ServedInfo
from peer.pipeline.trainer import LocalStage
from protocol import PROTOCOL_VERSION
from protocol.records import ACTIVE_STATES, PeerState

log = logging.getLogger("swarmtrain.peer")


class StageHolder:
    def __init__(self, ctx: SlotContext, ckpt: CheckpointSide, presence: Presence):
        """``ctx``: what every slot shares; the info RPC answers this holder's ``served_info``."""
        self.ckpt, self.presence = ckpt, presence
        self.ctx = dataclasses.replace(ctx, info=self.served_info)
        self.slot: Optional[StageSlot] = None
        self.on_change: Callable[[Optional[LocalStage]], None] = lambda local: None

    @property
    def epoch(self) -> int:
        return self.slot.epoch if self.slot is not None else 0

    def open(self, stage: int) -> StageSlot:
        slot = StageSlot.open(self.ctx, stage, held_step=self.ckpt.held_step(stage))
        if slot.restored_step is not None:
            self.ckpt.hold(stage, slot.restored_step)
        self.slot = slot
        # Before its first stage opens, a new peer's small positive figure (PeerStatus's 1.0)
        # only lets routers try it. While a moving peer loads its target stage it announces the
        # old stage's figure: a placeholder made the target still look starved, and the other
        # peers of the source stage followed one by one until they emptied it (tests/integration/test_churn_swarm.py).
        if slot.capacity:
            self.presence.update(throughput=slot.capacity)
        self.on_change(LocalStage(stage, slot.worker))
        return slot

    def close(self, *, for_move: bool) -> None:
        self.on_change(None)
        if self.slot is not None:
            self.slot.close(wait_for_optimizer=not for_move)

    def resume_if_group_gone(self) -> Optional[int]:
        if self.slot is None:
            return None
        others = self.presence.others_on(self.slot.stage, (PeerState.ONLINE,))
        return self.slot.resume_if_group_gone(others)

    def hand_back(self, *, give_up: Callable[[], bool]) -> None:
        """Before leaving the stage: wait up to one averaging round (matchmaking and the
        all-reduce) for the group to take what this peer accumulated; ``give_up()`` stops it."""
        if self.slot is None:
            return
        training = self.ctx.spec.training
        try:
            partners = self.presence.others_on(self.slot.stage, ACTIVE_STATES)
            budget = training.matchmaking_time + training.averaging_timeout
            self.slot.hand_back(partners=partners, budget=budget, give_up=give_up)
        except Exception as err:
            log.warning("could not hand back gradients: %s", err)

    def checkpoints_announced(self, stage: int) -> bool:
        return self.ckpt.announced(stage)

    def local_state(self, stage: int):
        """(epoch, parameters) of the stage this peer serves, for ``run --keeper``; None otherwise."""
        slot = self.slot
        if slot is None or slot.worker is None or slot.stage != stage:
            return None
        return slot.parameters()

    def served_info(self) -> ServedInfo:
        """What the info RPC answers (read on the event loop thread)."""
        status = self.presence.status
        return ServedInfo(state=status.state, throughput=status.throughput, epoch=self.epoch, version=PROTOCOL_VERSION)
