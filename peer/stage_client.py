"""Calling a remote stage: one request out, one response back, with a timeout."""

from __future__ import annotations

import asyncio
from typing import Optional, Sequence

import torch
from hivemind.p2p import P2P, PeerID

from peer.server import BACKWARD, FORWARD, INFO, WireCounters
from peer.wire import FrameError, join_tensors, read_frame, split_message, write_frame
from protocol.codecs import decode, encode
from protocol.messages_pb2 import InfoRequest, InfoResponse, StageRequest, StageResponse


class RemoteError(RuntimeError):
    """The remote stage answered with an error, or could not be reached."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


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
) -> tuple[StageResponse, dict[str, torch.Tensor]]:
    """Send one forward/backward request; returns the response header and decoded tensors."""
    header.timeout = timeout
    frames = split_message(header, names, [encode(t, codec) for t in tensors])
    try:
        return await asyncio.wait_for(_exchange(p2p, peer_id, BACKWARD if backward else FORWARD, frames,
                                                counters, max_bytes), timeout)
    except asyncio.TimeoutError:
        raise RemoteError("timeout", f"no answer from {peer_id[:12]} within {timeout:.1f}s") from None


async def _exchange(p2p, peer_id, handler, frames, counters, max_bytes):
    try:
        _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), handler)
    except Exception as err:
        raise RemoteError("unreachable", f"{peer_id[:12]}: {type(err).__name__}: {err}") from None
    try:
        for frame in frames:
            sent = await write_frame(writer, frame)
            if counters is not None:
                counters.add("sent", "activations", sent)
        await write_frame(writer, None)
        responses: list[StageResponse] = []
        while True:
            frame = await read_frame(reader, StageResponse)
            if frame is None:
                break
            if counters is not None:
                counters.add("received", "activations", frame.ByteSize())
            responses.append(frame)
    except (asyncio.IncompleteReadError, ConnectionError, FrameError) as err:
        raise RemoteError("unreachable", f"{peer_id[:12]}: {type(err).__name__}: {err}") from None
    finally:
        writer.close()
    if not responses:
        raise RemoteError("unreachable", f"{peer_id[:12]} closed the stream without an answer")
    head = responses[0]
    if head.error:
        raise RemoteError(head.error_code or "internal", head.error)
    try:
        raw = join_tensors(responses, max_bytes)
        tensors = {name: decode(proto, name=name) for name, proto in raw.items()}
    except (FrameError, ValueError) as err:
        raise RemoteError("bad_response", f"{peer_id[:12]}: {err}") from None
    return head, tensors


async def call_info(p2p: P2P, peer_id: str, spec_digest: str, timeout: float = 5.0) -> InfoResponse:
    async def exchange():
        _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), INFO)
        try:
            await write_frame(writer, InfoRequest(spec_digest=spec_digest))
            await write_frame(writer, None)
            response = await read_frame(reader, InfoResponse)
            if response is None:
                raise RemoteError("unreachable", "no info response")
            return response
        finally:
            writer.close()

    try:
        return await asyncio.wait_for(exchange(), timeout)
    except asyncio.TimeoutError:
        raise RemoteError("timeout", f"no info from {peer_id[:12]} within {timeout:.1f}s") from None
