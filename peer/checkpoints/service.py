"""A peer's checkpoint side: store, serve, announce, and restore the newest trusted checkpoint."""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Optional

from hivemind.p2p import P2P

from peer.checkpoints.announce import CheckpointAnnouncer
from peer.checkpoints.fetch import CheckpointFetcher
from peer.checkpoints.limits import FetchFailed
from peer.checkpoints.policy import Candidate, group_epoch_bound, restore_candidates
from peer.checkpoints.serve import CheckpointServer
from peer.checkpoints.store import (
    CheckpointStore,
    load_into_module,
)
from peer.swarm.view import SwarmView
from protocol import signing
from protocol.checkpoint import (
    CheckpointRefused,
    VerifiedCheckpoint,
)
from protocol.records import CheckpointAnnouncement, PeerState
from protocol.spec import RunSpec

log = logging.getLogger("swarmtrain.ckpt")


@dataclasses.dataclass
class Restored:
    verified: VerifiedCheckpoint
    source: str  # "local" or the peer id that delivered the (last) bytes
    sources: list[str]


class CheckpointService:
    """A peer's checkpoint side: its local store, serving what it verified, announcing it,
    and finding the newest trusted checkpoint of a stage (locally or from the swarm).

    ``event(name, text, **fields)`` reports (the peer's ``Output.event``).
    """

    def __init__(
        self,
        spec: RunSpec,
        store: CheckpointStore,
        *,
        swarm: Optional[SwarmView],
        p2p: Optional[P2P],
        run: Optional[Callable],
        event: Callable,
        announce_period: float = 5.0,
        request_timeout: float = 30.0,
        counters=None,
        distrust=None,
    ):
        self.spec, self.store, self.swarm, self.p2p, self.run = spec, store, swarm, p2p, run
        self.event = event
        self.distrust = distrust  # peer.base.distrust.DistrustTally, or None: not reported
        self.server = CheckpointServer(spec, counters=counters)
        self.announcer = CheckpointAnnouncer(swarm, announce_period) if swarm is not None else None
        self.request_timeout = request_timeout
        self.peer_id = swarm.peer_id if swarm is not None else None
        self._started = False

    def start(self) -> None:
        if self.p2p is not None and not self._started:
            self.run(self.server.start(self.p2p), 30)
            self._started = True

    def stop(self) -> None:
        if self.announcer is not None:
            self.announcer.stop()
        if self._started:
            try:
                self.run(self.server.stop(), 5)
            except Exception:
                pass

    def offer(self, verified: VerifiedCheckpoint) -> None:
        """Serve a verified checkpoint and announce it (the newest of its stage is announced)."""
        self.server.add(verified.manifest_digest, verified.path, verified.meta.stage, verified.meta.step)
        if self.announcer is not None:
            self.announcer.publish(verified.meta.stage, verified.to_record())

    def announcements(self, stage: int) -> list[tuple[str, CheckpointAnnouncement]]:
        if self.swarm is None:
            return []
        try:
            return self.swarm.checkpoint_announcements(stage)
        except Exception as err:
            log.warning("reading checkpoint announcements failed: %s", err)
            return []

    def restore(self, stage: int, module, *, held_step: Optional[int] = None) -> Optional[Restored]:
        """Load the newest checkpoint of ``stage`` that verifies into ``module``; None if none.

        Local checkpoints (``--checkpoint-dir``) and the swarm's announcements are tried newest
        step first. Each refusal is reported with its reason and leaves ``module`` untouched:
        weights are copied only from a checkpoint that passed every check.
        """
        if not self.spec.trust.trusted_keys:
            self.event(
                "restore_skipped",
                f"stage {stage}: the spec trusts no checkpoint key; starting from the spec's initialisation",
                stage=stage,
                reason="no trusted keys",
            )
            return None
        trusted = {signing.fingerprint(k) for k in self.spec.trust.trusted_keys}
        announced = self.announcements(stage)
        bound = self._group_step_bound(stage)
        self._report_beyond(stage, announced, bound)
        candidates = restore_candidates(
            self.store.list(stage),
            announced,
            held_step=held_step,
            exclude_sources=[self.peer_id] if self.peer_id else [],
            trusted=trusted,
            min_signatures=self.spec.trust.min_signatures,
            step_bound=bound,
        )
        for c in candidates:
            try:
                restored = self._try(stage, c, held_step)
            except CheckpointRefused as err:
                self.event(
                    "checkpoint_refused",
                    f"stage {stage}: refused checkpoint step {c.step} ({c.where}): {err.reason}",
                    stage=stage,
                    step=c.step,
                    manifest_digest=c.manifest,
                    path=str(err.path) if err.path else None,
                    sources=list(c.sources),
                    source="local" if c.path is not None else None,
                    reason=err.reason,
                )
                continue
            except FetchFailed as err:
                self.event(
                    "checkpoint_unavailable",
                    f"stage {stage}: could not fetch checkpoint step {c.step}: {err}",
                    stage=stage,
                    step=c.step,
                    manifest_digest=c.manifest,
                    reason=str(err),
                )
                continue
            v = restored.verified
            load_into_module(v, module)
            self.offer(v)
            self.event(
                "restored",
                f"stage {stage}: restored checkpoint step {v.meta.step} "
                f"({v.manifest_digest[:16]}, signed by {', '.join(v.signers)}) from "
                f"{'local ' + str(v.path) if restored.source == 'local' else restored.source}",
                stage=stage,
                step=v.meta.step,
                manifest_digest=v.manifest_digest,
                signers=list(v.signers),
                source=restored.source,
                sources=restored.sources,
                path=str(v.path),
                tokens_seen=v.meta.tokens_seen,
            )
            return restored
        self.event(
            "restore_none",
            f"stage {stage}: no trusted checkpoint found"
            + (f" ({len(candidates)} tried)" if candidates else "")
            + "; starting from the spec's initialisation",
            stage=stage,
            tried=len(candidates),
        )
        return None

    def _report_beyond(self, stage: int, announced, bound: Optional[int]) -> None:
        if self.distrust is None or bound is None:
            return
        for peer_id, record in announced:
            if record.step > bound:
                self.distrust.report(
                    peer_id,
                    "checkpoint_step",
                    f"peer {peer_id} announces a stage {stage} checkpoint at step {record.step}, beyond its "
                    f"group's {bound}: tried after all others",
                    stage=stage,
                    step=record.step,
                )

    def _group_step_bound(self, stage: int) -> Optional[int]:
        """What the stage's peers' signed records say of its progress; None with no peer online
        (a stage being recovered: every announcement is tried)."""
        try:
            peers = [p for p in self.swarm.snapshot() if p.stage == stage and p.state == PeerState.ONLINE]
        except Exception:
            return None
        return group_epoch_bound([p.epoch for p in peers]) if peers else None

    def _try(self, stage: int, c: Candidate, held_step: Optional[int]) -> Restored:
        if c.path is not None:
            return Restored(self.store.load(c.path, stage, held_step=held_step), "local", ["local"])
        if self.p2p is None:
            raise FetchFailed("no P2P connection")
        local = self._local_copy(stage, c.manifest, held_step)
        if local is not None:
            return local
        fetcher = CheckpointFetcher(self.spec, self.p2p, self.run, request_timeout=self.request_timeout)
        remaining = list(c.sources)
        last_refusal: Optional[CheckpointRefused] = None
        # A refusal may be one source's doing (a tampered file from one peer): try the sources
        # that were not used, up to three rounds.
        for _ in range(3):
            if not remaining:
                break
            try:
                result = fetcher.fetch(stage, c.manifest, remaining, self.store.root, held_step=held_step)
            except CheckpointRefused as err:
                last_refusal = err
                self.event(
                    "checkpoint_refused",
                    f"stage {stage}: checkpoint {c.manifest[:16]} fetched from "
                    f"{', '.join(s[:16] for s in remaining)} refused: {err.reason}",
                    stage=stage,
                    step=c.step,
                    manifest_digest=c.manifest,
                    sources=remaining,
                    reason=err.reason,
                )
                remaining = remaining[1:]
                continue
            self.store._digests[result.verified.path] = result.verified.manifest_digest
            self.event(
                "checkpoint_fetched",
                f"stage {stage}: fetched checkpoint step {result.verified.meta.step} "
                f"({result.bytes_fetched} bytes in {result.seconds:.1f}s) from "
                f"{', '.join(s[:16] for s in result.sources)}",
                stage=stage,
                step=result.verified.meta.step,
                manifest_digest=c.manifest,
                sources=result.sources,
                bytes=result.bytes_fetched,
                seconds=round(result.seconds, 3),
            )
            return Restored(result.verified, result.sources[-1] if result.sources else "?", result.sources)
        assert last_refusal is not None
        raise last_refusal

    def _local_copy(self, stage: int, manifest: str, held_step: Optional[int]) -> Optional[Restored]:
        """A checkpoint already in the store under that digest (fetched earlier) needs no transfer."""
        for c in self.store.list(stage):
            try:
                if self.store.manifest_digest_of(c.path) == manifest:
                    return Restored(self.store.load(c.path, stage, held_step=held_step), "local", ["local"])
            except (OSError, signing.SigningError):
                continue
        return None
