"""Limits on what a stage group's members can make this peer's optimizer believe.

hivemind takes the group's epoch as the maximum of the members' signed but unbounded
progress records, and catches up by stepping the LR scheduler once per epoch: one record
claiming epoch 2^40 made every joiner loop for ever. Here a record more than
``max_epoch_lead`` epochs ahead of this peer is dropped (with one warning naming its signer),
and the scheduler moves to any epoch in O(1).
"""

from __future__ import annotations

import logging

from hivemind.optim.progress_tracker import LocalTrainingProgress, ProgressTracker
from hivemind.p2p import PeerID

from protocol.records import MAX_EPOCH  # no epoch above it is believed

log = logging.getLogger("swarmtrain.averaging")


class BoundedProgressTracker(ProgressTracker):
    def __init__(self, *args, max_epoch_lead: int = MAX_EPOCH, **kwargs):
        self.max_epoch_lead = max_epoch_lead  # before super().__init__: it starts the fetching thread
        self._dropped: set[bytes] = set()
        super().__init__(*args, **kwargs)

    @property
    def ignored_signers(self) -> int:
        """Distinct peers whose progress record was ignored for claiming too high an epoch."""
        return len(self._dropped)

    def _parse_swarm_progress_data(self, metadata):
        if isinstance(metadata, dict):
            bound = min(self.local_progress.epoch + self.max_epoch_lead, MAX_EPOCH)
            kept = {}
            for subkey, item in metadata.items():
                claim = _parsed(item)
                if claim is not None and claim.epoch > bound:
                    signer = bytes(claim.peer_id)
                    if signer not in self._dropped and len(self._dropped) < 1024:
                        self._dropped.add(signer)
                        log.warning(
                            "ignoring the progress record of peer %s: it claims epoch %d, more than %d ahead of "
                            "this peer's %d",
                            _peer_name(signer),
                            claim.epoch,
                            self.max_epoch_lead,
                            self.local_progress.epoch,
                        )
                    continue
                kept[subkey] = item
            metadata = kept
        return super()._parse_swarm_progress_data(metadata)


def _parsed(item):
    try:
        return LocalTrainingProgress.parse_obj(item.value)
    except Exception:
        return None  # hivemind's own parser drops it


def update_scheduler_fast(state_averager) -> None:
    """What hivemind's ``TrainingStateAverager._update_scheduler`` computes (one ``step()`` per
    epoch up to ``local_epoch``), in O(1) for the LambdaLR every stage uses."""
    scheduler = state_averager.scheduler
    if scheduler is None:
        return
    target = int(state_averager.local_epoch)
    if scheduler._step_count > target:
        return
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None:  # another scheduler: hivemind's loop
        while scheduler._step_count <= target:
            scheduler.step()
        return
    scheduler.last_epoch = target
    scheduler._step_count = target + 1
    for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, lambdas):
        group["lr"] = base * fn(target)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def _peer_name(peer_id: bytes) -> str:
    try:
        return PeerID(peer_id).to_base58()
    except Exception:  # not a peer id: the record's signer is named by its bytes
        return peer_id.hex()[:32]
