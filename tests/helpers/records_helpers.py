"""Helpers of the DHT record tests."""

from __future__ import annotations

from protocol.records import PeerInfo


def peer_info(peer_id: str, **fields) -> PeerInfo:
    """An online stage-0 peer's record (throughput 5, epoch 3, version 0.1.0), ``fields`` changed."""
    return PeerInfo(
        **{**dict(peer_id=peer_id, stage=0, state="online", throughput=5.0, epoch=3, version="0.1.0"), **fields}
    )
