"""The pipeline: a stage's worker and server, calling remote stages, and the trainer that
drives micro-batches through them (with its routing policy)."""

from peer.pipeline.client import RemoteError, call_info, call_stage
from peer.pipeline.routing import BanList, ThroughputEMA, choose_peer
from peer.pipeline.server import Limits, ServedInfo, StageServer
from peer.pipeline.trainer import Trainer
from peer.pipeline.worker import StageError, StageWorker

__all__ = [
    "BanList",
    "Limits",
    "RemoteError",
    "ServedInfo",
    "StageError",
    "StageServer",
    "StageWorker",
    "ThroughputEMA",
    "Trainer",
    "call_info",
    "call_stage",
    "choose_peer",
]
