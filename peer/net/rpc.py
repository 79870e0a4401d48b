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
from peer.net.routes import LOCAL, ROUTES
from protocol.messages_pb2 import Route
from protocol.rpc import MAX_FRAMES, RELAY, ErrorCode

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
        code = printable(getattr(head, "error_code", "") or ErrorCode.INTERNAL, 32)
        raise RemoteError(code, printable(error))
    return frames


async def _exchange(p2p, peer_id, handler, request, response_type, max_bytes, max_frames, counters, kind):
    relay = ROUTES.via(peer_id)
    where = peer_id[:12] + (f" (through relay {relay[:12]})" if relay else "")
    try:
        if relay is None:
            _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), handler)
        else:
            _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(relay), RELAY)
    except Exception as err:
        raise RemoteError(ErrorCode.UNREACHABLE, f"{where}: {type(err).__name__}: {err}") from None
    frames: list[Message] = []
    total = 0
    try:
        if relay is not None:
            await write_frame(writer, Route(target=peer_id, handler=handler))
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
        raise RemoteError(ErrorCode.UNREACHABLE, f"{where}: {type(err).__name__}: {err}") from None
    finally:
        writer.close()
    if not frames:
        raise RemoteError(ErrorCode.UNREACHABLE, f"{where} closed the stream without an answer")
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
Handle = Callable[[list, str], Awaitable[Sequence[Message]]]  # (request frames, remote peer id)


class RpcServer:
    """Registers handlers on a P2P instance, each behind the same request reader and limits.

    Streams are admitted up to ``max_streams`` at once, ``max_streams_per_peer`` from one remote
    peer: more get ``busy`` at once (a stranger cannot hold every slot with idle streams).
    Refused requests are counted by handler in ``counters.rejected``, busy ones in
    ``counters.busy`` (``/metrics``), and logged once a minute per remote peer, by peer id."""

    def __init__(
        self, counters: Optional[WireCounters] = None, *, max_streams: int = 64, max_streams_per_peer: int = 8
    ):
        self.counters = counters or WireCounters()
        self.p2p: Optional[P2P] = None
        self.max_streams, self.max_streams_per_peer = max_streams, max_streams_per_peer
        self._names: list[str] = []
        self._active: dict[str, int] = {}
        self._active_total = 0
        self._logged: dict[str, float] = {}

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
        ``await handle(frames, remote_peer_id)`` and send what it returns. ``handle`` raises ``Rejected`` to
        refuse; any other exception is answered ``internal`` and logged."""
        self.p2p = p2p
        wrapped = self._wrap(name, handle, request_type, error_reply, limits, kind)
        await p2p.add_binary_stream_handler(name, wrapped)
        LOCAL[(id(p2p), name)] = wrapped  # what a stream forwarded by this peer's relay reaches
        self._names.append(name)

    async def remove_all(self) -> None:
        if self.p2p is None:
            return
        for name in self._names:
            LOCAL.pop((id(self.p2p), name), None)
            try:
                await self.p2p.remove_binary_stream_handler(name)
            except Exception:
                pass
        self._names.clear()

    def _wrap(self, name, handle, request_type, error_reply, limits, kind):
        async def handler(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            remote = str(getattr(stream_info, "peer_id", "") or "?")
            if not self._admit(remote):
                self.counters.refuse_busy(name)
                self._note(remote, name, "busy: too many streams at once")
                await _reply_and_close(writer, [error_reply(ErrorCode.BUSY, "too many requests at once")])
                return
            try:
                try:
                    frames = await self._read_request(reader, request_type, limits, kind)
                    response = await handle(frames, remote)
                except Rejected as err:
                    self.counters.reject(name)
                    self._note(remote, name, f"{err.code}: {err}")
                    response = [error_reply(err.code, str(err))]
                except (asyncio.IncompleteReadError, ConnectionError):
                    raise
                except Exception:
                    log.exception("%s handler failed on a request from %s", name, remote)
                    response = [error_reply(ErrorCode.INTERNAL, "the server failed on this request")]
                for frame in response:
                    self.counters.add("sent", kind, frame.ByteSize())
                    await write_frame(writer, frame)
                await write_frame(writer, None)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass  # the caller hung up; nothing was changed for it
            except Exception:
                log.exception("%s: answering %s failed", name, remote)
            finally:
                self._release(remote)
                writer.close()

        return handler

    def _admit(self, remote: str) -> bool:
        if self._active_total >= self.max_streams or self._active.get(remote, 0) >= self.max_streams_per_peer:
            return False
        self._active_total += 1
        self._active[remote] = self._active.get(remote, 0) + 1
        return True

    def _release(self, remote: str) -> None:
        self._active_total -= 1
        left = self._active.get(remote, 1) - 1
        if left > 0:
            self._active[remote] = left
        else:
            self._active.pop(remote, None)

    def _note(self, remote: str, name: str, why: str) -> None:
        """One log line per remote peer a minute: an attack is visible without flooding the log."""
        now = time.monotonic()
        if now - self._logged.get(remote, -1e9) < 60.0:
            return
        if len(self._logged) >= 4096:
            self._logged.clear()
        self._logged[remote] = now
        log.warning("%s: refused a request from peer %s (%s)", name, remote, printable(why))

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


async def _reply_and_close(writer: asyncio.StreamWriter, frames: Sequence[Message]) -> None:
    try:
        for frame in frames:
            await write_frame(writer, frame)
        await write_frame(writer, None)
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


def printable(text: str, limit: int = 300) -> str:
    """A remote peer's text made safe to print: no terminal escapes or fake log lines."""
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in str(text)[:limit])
    return cleaned + ("..." if len(str(text)) > limit else "")
