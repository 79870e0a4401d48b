"""Calling a remote stage: one request out, one response back, with a timeout (``peer.net.rpc``)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from hivemind.p2p import P2P

from peer.net import RemoteError, WireCounters, call, join_tensors, split_message
from peer.net.framing import FrameError
from protocol.codecs import decode, encode
from protocol.messages_pb2 import InfoRequest, InfoResponse, StageRequest, StageResponse
from protocol.rpc import BACKWARD, CHUNK_BYTES, FORWARD, INFO, ErrorCode

__all__ = ["RemoteError", "call_info", "call_stage"]


async def call_stage(
    p2p: P2P,
    peer_id: str,
    *,
    backward: bool,
    header: StageRequest,
    names: Sequence[str],
    tensors: Sequence[torch.Tensor],
    codec: str,
    timeout: float,
    counters: Optional[WireCounters] = None,
    max_bytes: int = 1 << 31,
    soft_targets: bytes = b"",
) -> tuple[StageResponse, dict[str, torch.Tensor]]:
    """Send one forward/backward request; returns the response header and decoded tensors.
    ``soft_targets`` (to the last stage): a teacher's, as bytes, in frames after the tensors."""
    header.timeout = timeout
    frames = split_message(header, names, [encode(t, codec) for t in tensors])
    frames += [
        StageRequest(soft_targets=soft_targets[i : i + CHUNK_BYTES]) for i in range(0, len(soft_targets), CHUNK_BYTES)
    ]
    responses = await call(
        p2p,
        peer_id,
        BACKWARD if backward else FORWARD,
        frames,
        StageResponse,
        timeout=timeout,
        max_bytes=max_bytes,
        counters=counters,
        kind="activations",
    )
    try:
        raw = join_tensors(responses, max_bytes)
        decoded = {name: decode(proto, name=name) for name, proto in raw.items()}
    except (FrameError, ValueError) as err:
        raise RemoteError(ErrorCode.BAD_RESPONSE, f"{peer_id[:12]}: {err}") from None
    return responses[0], decoded


async def call_info(p2p: P2P, peer_id: str, spec_digest: str, timeout: float = 5.0) -> InfoResponse:
    """The peer's InfoResponse; its ``error`` says when the peer serves another spec."""
    responses = await call(
        p2p,
        peer_id,
        INFO,
        [InfoRequest(spec_digest=spec_digest)],
        InfoResponse,
        timeout=timeout,
        max_bytes=64 << 10,
        max_frames=1,
        kind="info",
        raise_errors=False,
    )
    return responses[0]
