"""When a stage peer has fallen out of its group's averaging rounds (pure rules).

``BoundedOptimizer.tick`` asks these on every step; they read counters, never the network."""

from __future__ import annotations

from typing import Optional


def missed_round(*, local_epoch: int, group_epoch: int, group_samples: int, target: int) -> Optional[str]:
    """Why the gradients a peer accumulated at ``local_epoch`` are stale, or None if they may
    still join its stage group's round.

    hivemind (``Optimizer._should_load_state_from_peers``) lets a peer one epoch behind keep
    its gradients: right after the first peer of the group starts the round for an epoch it
    announces the next one, and the others, a refresh later, still join that same round. But
    once the group has gathered a whole batch (``group_samples`` >= ``target``) in the next
    epoch, that round is long over and the next one is due: the lagging peer's gradients,
    computed on parameters one update old, would be averaged into it. Two or more epochs
    behind, hivemind reloads state anyway. Either way the peer drops its gradients and catches
    up instead (``peer.averaging.optimizer.BoundedOptimizer``).
    """
    behind = group_epoch - local_epoch
    if behind <= 0:
        return None
    if behind >= 2:
        return f"{behind} epochs behind the group (epoch {group_epoch})"
    if group_samples >= target:
        return (
            f"the group is at epoch {group_epoch} and already has a whole batch for its next round "
            f"({group_samples}/{target} samples): the round for epoch {local_epoch} is over"
        )
    return None


def left_out_of_round(*, local_epoch: int, group_epoch: int, local_samples: int) -> Optional[str]:
    """Why an idle peer must load its group's state rather than step into the group's epoch,
    or None.

    A stage peer that got no micro-batch for a while has nothing to add to its group's round,
    and the group may finish that round without it. Moving to the group's epoch by stepping
    (hivemind's transition) would apply an empty update: the peer would be at the group's
    epoch with the weights from before the round. With samples of its own the peer is still
    in the round (``missed_round`` judges whether they are stale).
    """
    if group_epoch <= local_epoch or local_samples > 0:
        return None
    return f"the stage group moved to epoch {group_epoch} without this peer (it had no samples)"
