"""Checkpoints: the local store, serving and fetching them over P2P, announcing them, the
restore policy, and the keeper that signs them."""

from peer.checkpoints.announce import CheckpointAnnouncer, announced_checkpoints
from peer.checkpoints.fetch import CheckpointFetcher
from peer.checkpoints.limits import FetchFailed, SourceFailed
from peer.checkpoints.policy import live_state_verdict, restore_candidates
from peer.checkpoints.serve import CheckpointServer
from peer.checkpoints.service import CheckpointService, Restored
from peer.checkpoints.store import CheckpointStore

__all__ = [
    "CheckpointAnnouncer",
    "CheckpointFetcher",
    "CheckpointServer",
    "CheckpointService",
    "CheckpointStore",
    "FetchFailed",
    "Restored",
    "SourceFailed",
    "announced_checkpoints",
    "live_state_verdict",
    "restore_candidates",
]
