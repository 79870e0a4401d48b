"""Which checkpoint to try first, and whether a group's live state may be loaded (pure)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Iterable, Optional, Sequence

from peer.checkpoints.store import (
    LocalCheckpoint,
)
from protocol.records import CheckpointAnnouncement

log = logging.getLogger("swarmtrain.ckpt")


# ---------------------------------------------------------------------------------------------
# the loading policy


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A checkpoint worth trying: on local disk (``path``) or announced by ``sources``."""

    step: int
    manifest: Optional[str]  # None for a local one (known after verification)
    path: Optional[Path] = None
    sources: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        return str(self.path) if self.path is not None else f"announced by {', '.join(s[:16] for s in self.sources)}"


def restore_candidates(
    local: Iterable[LocalCheckpoint],
    announced: Iterable[tuple[str, CheckpointAnnouncement]],
    *,
    held_step: Optional[int] = None,
    exclude_sources: Iterable[str] = (),
    trusted: Optional[Iterable[str]] = None,
    min_signatures: int = 1,
    step_bound: Optional[int] = None,
    limit: int = 16,
) -> list[Candidate]:
    """What to try, newest step first; at equal steps a local copy before a download, and a
    digest announced by more peers first. Nothing older than ``held_step`` (no rollback).
    Announcements are unverified hints: a wrong one costs one failed try. An announcement that
    does not even claim ``min_signatures`` of the ``trusted`` fingerprints is not tried.

    ``step_bound``: the newest step the stage group can have reached (``group_epoch_bound`` of
    its peers' records). Announcements beyond it are tried only after all the others: a
    stranger announcing many checkpoints at a huge step cannot hide the real ones."""
    excluded = set(exclude_sources)
    trusted = None if trusted is None else set(trusted)
    out: list[tuple[tuple, Candidate]] = []
    for c in local:
        if held_step is None or c.meta.step >= held_step:
            out.append(((False, -c.meta.step, 0, 0), Candidate(c.meta.step, None, path=c.path)))
    by_digest: dict[str, tuple[int, list[str]]] = {}
    for peer_id, record in announced:
        if peer_id in excluded:
            continue
        if trusted is not None and len(trusted & set(record.signers)) < min_signatures:
            continue
        step, digest = record.step, record.manifest_digest
        if held_step is not None and step < held_step:
            continue
        if digest in by_digest:
            by_digest[digest][1].append(peer_id)
            # One digest is one checkpoint: if announcers disagree on its step, the smallest wins
            # (a liar cannot make an old checkpoint look newer to the ordering).
            by_digest[digest] = (min(step, by_digest[digest][0]), by_digest[digest][1])
        else:
            by_digest[digest] = (step, [peer_id])
    for digest, (step, peers) in by_digest.items():
        beyond = step_bound is not None and step > step_bound
        out.append(((beyond, -step, 1, -len(peers)), Candidate(step, digest, sources=tuple(peers))))
    out.sort(key=lambda kc: kc[0])
    return [c for _, c in out][:limit]


def group_epoch_bound(claims: Sequence[int]) -> int:
    """The highest epoch believed of a stage group: its members' (lower) median claim, plus one
    for a member that stepped a moment before the others. One liar cannot move it."""
    ordered = sorted(claims)
    return ordered[(len(ordered) - 1) // 2] + 1 if ordered else 0


def live_state_verdict(
    *,
    group_epoch: int,
    local_epoch: int,
    trusted_step: Optional[int],
    has_trusted_keys: bool,
    accept_untrusted: bool,
    max_lag: int,
) -> tuple[bool, str]:
    """(load live state?, why) for a peer joining a stage group, by the spec's trust policy.

    Live state (parameters and optimizer state copied from one peer of the group) is signed
    by no one. It is loaded only when the group is ahead of this peer, the spec accepts
    untrusted live state at all, and, when the spec trusts checkpoint keys, the group is at
    most ``max_lag`` epochs ahead of the trusted base: the step of the checkpoint this peer
    restored, or 0 (the spec's deterministic initialisation, which every peer can recompute)
    when it restored none. Without trusted keys nothing is trusted more than live state, so
    the lag is not checked.
    """
    if group_epoch <= local_epoch:
        return False, f"in step with the group (epoch {local_epoch})"
    if not accept_untrusted:
        return False, (
            f"the group is at epoch {group_epoch}, but the spec forbids untrusted live state "
            "(trust.accept_untrusted_live_state = false)"
        )
    if has_trusted_keys:
        base = trusted_step or 0
        what = (
            f"the trusted checkpoint (step {base})"
            if trusted_step
            else "the spec's initialisation (no trusted checkpoint)"
        )
        if group_epoch - base > max_lag:
            return False, (
                f"the group's live state (epoch {group_epoch}) is {group_epoch - base} epochs ahead of "
                f"{what}, more than trust.max_live_state_lag = {max_lag}"
            )
        return True, f"the group is at epoch {group_epoch}, {group_epoch - base} epoch(s) ahead of {what}"
    return True, f"the group is at epoch {group_epoch} (the spec trusts no checkpoint key: no lag limit)"
