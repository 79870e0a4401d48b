"""One RPC layer for every swarmtrain handler: a client call and a server-side handler wrapper.

Both sides speak ``protocol.rpc``'s framing (``peer.net.framing``). Whatever the RPC, the
limits live here and apply while bytes arrive, not afterwards:

- the caller reads at most ``max_bytes`` and ``max_frames`` of response, within one overall
  ``timeout``, and gets a ``RemoteError`` with an ``ErrorCode`` for anything else (the
  server's own error reply included);
- the server reads at most ``max_bytes`` and ``max_frames`` of request within one overall
  deadline, answers anything malformed or oversized with ``bad_request`` (the handler never
  sees it) and counts it as rejected, and keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional, Sequence, Type, TypeVar

from google.protobuf.message import Message
from hivemind.p2p import P2P, PeerID

from peer.net.counters import WireCounters
from peer.net.framing import FrameError, read_frame, write_frame
from protocol.rpc import MAX_FRAMES, ErrorCode

log = logging.getLogger("swarmtrain.rpc")

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)


class RemoteError(RuntimeError):
    """A call failed: the remote answered with an error, or no valid answer came back."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = str(code)


# --- the caller's side ----------------------------------------------------------------------


async def call(
    p2p: P2P,
    peer_id: str,
    handler: str,
    request: Sequence[Message],
    response_type: Type[Resp],
    *,
    timeout: float,
    max_bytes: int,
    max_frames: int = MAX_FRAMES,
    counters: Optional[WireCounters] = None,
    kind: str = "activations",
    raise_errors: bool = True,
) -> list[Resp]:
    """Send ``request`` (frames) to ``handler`` of ``peer_id``; return the response frames.

    The first response frame's ``error``/``error_code`` (when set) becomes a RemoteError,
    unless ``raise_errors`` is False (the caller reads the error field itself)."""
    try:
        frames = await asyncio.wait_for(
            _exchange(p2p, peer_id, handler, request, response_type, max_bytes, max_frames, counters, kind), timeout
        )
    except asyncio.TimeoutError:
        raise RemoteError(ErrorCode.TIMEOUT, f"no answer from {peer_id[:12]} within {timeout:.1f}s") from None
    head = frames[0]
    error = getattr(head, "error", "")
    if error and raise_errors:
        raise RemoteError(getattr(head, "error_code", "") or ErrorCode.INTERNAL, error)
    return frames


async def _exchange(p2p, peer_id, handler, request, response_type, max_bytes, max_frames, counters, kind):
    try:
        _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), handler)
    except Exception as err:
        raise RemoteError(ErrorCode.UNREACHABLE, f"{peer_id[:12]}: {type(err).__name__}: {err}") from None
    frames: list[Message] = []
    total = 0
    try:
        for frame in request:
            sent = await write_frame(writer, frame)
            if counters is not None:
                counters.add("sent", kind, sent)
        await write_frame(writer, None)
        while True:
            frame = await read_frame(reader, response_type)
            if frame is None:
                break
            size = frame.ByteSize()
            total += size
            if counters is not None:
                counters.add("received", kind, size)
            frames.append(frame)
            if total > max_bytes or len(frames) > max_frames:
                raise RemoteError(
                    ErrorCode.BAD_RESPONSE,
                    f"{peer_id[:12]}: the answer exceeds {max_bytes} bytes or {max_frames} frames",
                )
    except (asyncio.IncompleteReadError, ConnectionError, FrameError) as err:
        raise RemoteError(ErrorCode.UNREACHABLE, f"{peer_id[:12]}: {type(err).__name__}: {err}") from None
    finally:
        writer.close()
    if not frames:
        raise RemoteError(ErrorCode.UNREACHABLE, f"{peer_id[:12]} closed the stream without an answer")
    return frames


# --- the server's side ----------------------------------------------------------------------


@dataclass(frozen=True)
class RequestLimits:
    """What one request to a handler may be: bytes, frames, and seconds to arrive in full."""

    max_bytes: int
    max_frames: int = MAX_FRAMES
    deadline: float = 60.0


class Rejected(Exception):
    """Raised by a handler (or the request reader) for a request it refuses: answered with
    ``code`` and counted as rejected. The server's state is unchanged."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = str(code)


ErrorReply = Callable[[str, str], Message]  # (code, message) -> the handler's response type
Handle = Callable[[list], Awaitable[Sequence[Message]]]


class RpcServer:
    """Registers handlers on a P2P instance, each behind the same request reader and limits.

    Refused requests are counted by handler in ``counters.rejected``, for ``/metrics``."""

    def __init__(self, counters: Optional[WireCounters] = None):
        self.counters = counters or WireCounters()
        self.p2p: Optional[P2P] = None
        self._names: list[str] = []

    async def add(
        self,
        p2p: P2P,
        name: str,
        handle: Handle,
        request_type: Type[Message],
        error_reply: ErrorReply,
        limits: RequestLimits,
        *,
        kind: str,
    ) -> None:
        """Serve ``name``: read a request of ``request_type`` frames within ``limits``, then
        ``await handle(frames)`` and send what it returns. ``handle`` raises ``Rejected`` to
        refuse; any other exception is answered ``internal`` and logged."""
        self.p2p = p2p
        await p2p.add_binary_stream_handler(name, self._wrap(name, handle, request_type, error_reply, limits, kind))
        self._names.append(name)

    async def remove_all(self) -> None:
        if self.p2p is None:
            return
        for name in self._names:
            try:
                await self.p2p.remove_binary_stream_handler(name)
            except Exception:
                pass
        self._names.clear()

    def _wrap(self, name, handle, request_type, error_reply, limits, kind):
        async def handler(_stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                try:
                    frames = await self._read_request(reader, request_type, limits, kind)
                    response = await handle(frames)
                except Rejected as err:
                    self.counters.reject(name)
                    response = [error_reply(err.code, str(err))]
                for frame in response:
                    self.counters.add("sent", kind, frame.ByteSize())
                    await write_frame(writer, frame)
                await write_frame(writer, None)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass  # the caller hung up; nothing was changed for it
            except Exception:
                log.exception("%s handler failed", name)
            finally:
                writer.close()

        return handler

    async def _read_request(self, reader, request_type, limits: RequestLimits, kind: str) -> list:
        """Every frame up to the caller's end marker (closing a stream with unread input resets
        it, and the caller would lose the answer), within the limits."""
        frames: list = []
        total = 0
        deadline = time.monotonic() + limits.deadline
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise asyncio.TimeoutError
                frame = await asyncio.wait_for(read_frame(reader, request_type), timeout=left)
            except FrameError as err:
                raise Rejected(ErrorCode.BAD_REQUEST, f"malformed request: {err}") from None
            except asyncio.TimeoutError:
                raise Rejected(ErrorCode.BAD_REQUEST, "request stream stalled") from None
            if frame is None:
                break
            frames.append(frame)
            total += frame.ByteSize()
            self.counters.add("received", kind, frame.ByteSize())
            if limits.max_frames == 1 and len(frames) > 1:
                raise Rejected(ErrorCode.BAD_REQUEST, "one request per stream")
            if len(frames) > limits.max_frames or total > limits.max_bytes:
                raise Rejected(
                    ErrorCode.BAD_REQUEST, f"request exceeds {limits.max_bytes} bytes or {limits.max_frames} frames"
                )
        if not frames:
            raise Rejected(ErrorCode.BAD_REQUEST, "empty request")
        return frames
