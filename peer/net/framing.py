"""Framing of swarmtrain's RPCs over hivemind's binary P2P streams (``protocol.rpc``).

hivemind's protobuf stream handlers close the stream on a malformed message and read
length-prefixed messages of any length. Stage servers take requests from strangers, so they
frame messages themselves: a 4-byte length with a hard cap, then a protobuf. A malformed or
oversized frame gets an error reply, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Optional, Sequence, Type, TypeVar

from google.protobuf.message import DecodeError, Message
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import split_for_streaming

from protocol.rpc import CHUNK_BYTES, END_OF_STREAM, MAX_FRAME_BYTES

_HEADER = struct.Struct(">I")

M = TypeVar("M", bound=Message)


class FrameError(ValueError):
    """A frame that cannot be read: too large, truncated or not the expected protobuf."""


async def write_frame(writer: asyncio.StreamWriter, message: Optional[Message]) -> int:
    payload = b"" if message is None else message.SerializeToString()
    if len(payload) > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {len(payload)} bytes exceeds {MAX_FRAME_BYTES}")
    writer.write(_HEADER.pack(len(payload) if message is not None else END_OF_STREAM) + payload)
    await writer.drain()
    return len(payload) + _HEADER.size


async def read_frame(reader: asyncio.StreamReader, message_type: Type[M]) -> Optional[M]:
    """The next message, or None at end of stream. Raises FrameError on a bad frame and
    asyncio.IncompleteReadError when the peer hung up."""
    (length,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if length == END_OF_STREAM:
        return None
    if length > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {length} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    payload = await reader.readexactly(length)
    message = message_type()
    try:
        message.ParseFromString(payload)
    except DecodeError as err:
        raise FrameError(f"not a valid {message_type.__name__} ({err})") from None
    return message


def split_message(header: Message, names: Sequence[str], tensors: Sequence[runtime_pb2.Tensor]) -> list[Message]:
    """One request/response as frames: the header fields on the first frame, each tensor's
    chunks on following frames (hivemind's ``split_for_streaming`` parts)."""
    frames = [header]
    first = True
    for name, tensor in zip(names, tensors):
        for part in split_for_streaming(tensor, CHUNK_BYTES):
            frame = header if first else type(header)()
            frame.tensor_names.append(name)
            frame.tensors.append(part)
            if not first:
                frames.append(frame)
            first = False
    return frames


def join_tensors(frames: Sequence[Message], max_bytes: int) -> dict[str, runtime_pb2.Tensor]:
    """Reassemble named tensors from frames; a tensor's first part declares its chunk count."""
    out: dict[str, runtime_pb2.Tensor] = {}
    pending: Optional[tuple[str, runtime_pb2.Tensor, list[bytes], int]] = None
    total = 0
    for frame in frames:
        if len(frame.tensor_names) != len(frame.tensors):
            raise FrameError("tensor_names and tensors differ in length")
        for name, part in zip(frame.tensor_names, frame.tensors):
            total += len(part.buffer)
            if total > max_bytes:
                raise FrameError(f"tensors exceed the {max_bytes}-byte request limit")
            if pending is None:
                if name in out:
                    raise FrameError(f"tensor {name!r} sent twice")
                if part.chunks < 1 or part.chunks > max_bytes + 1:
                    raise FrameError(f"tensor {name!r} declares {part.chunks} chunks")
                pending = (name, part, [part.buffer], part.chunks)
            else:
                if name != pending[0]:
                    raise FrameError(f"tensor {pending[0]!r} is incomplete when {name!r} starts")
                pending[2].append(part.buffer)
            if len(pending[2]) == pending[3]:
                whole = runtime_pb2.Tensor()
                whole.CopyFrom(pending[1])
                whole.buffer = b"".join(pending[2])
                whole.chunks = 0
                out[pending[0]] = whole
                pending = None
    if pending is not None:
        raise FrameError(f"tensor {pending[0]!r} is truncated ({len(pending[2])} of {pending[3]} chunks)")
    return out
