"""Serving the checkpoints this peer holds, over P2P.

Wire (handler ``swarmtrain.ckpt``, ``peer.net.framing`` framing): one ``CkptRequest`` per stream.

- ``op="list"``: the files of the checkpoint with that manifest digest and their sizes.
- ``op="read"``: bytes ``[offset, offset + length)`` of one listed file, as ``CkptResponse.data``
  frames of at most ``DATA_FRAME_BYTES``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from pathlib import Path

from hivemind.p2p import P2P

from peer.checkpoints.limits import DATA_FRAME_BYTES, MAX_READ_BYTES
from peer.net import Rejected, RequestLimits, RpcServer
from protocol import signing
from protocol.messages_pb2 import CkptFile, CkptRequest, CkptResponse
from protocol.rpc import CKPT, ErrorCode
from protocol.spec import RunSpec

REQUEST_LIMITS = RequestLimits(max_bytes=64 << 10, max_frames=1, deadline=10.0)

log = logging.getLogger("swarmtrain.ckpt")


# ---------------------------------------------------------------------------------------------
# serving


@dataclasses.dataclass(frozen=True)
class Served:
    path: Path
    stage: int
    step: int


def _listing(path: Path) -> dict[str, int]:
    listing = signing.list_signed_dir(path)
    names = list(listing.content) + [
        f"{signing.SIGNATURES_DIR}/{fp}{signing.SIGNATURE_SUFFIX}" for fp in listing.signatures
    ]
    return {name: (path / name).stat().st_size for name in names}


def _read_range(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


class CheckpointServer:
    """Serves the checkpoints registered with ``add`` (ones this process wrote or verified),
    by manifest digest. Only the files of a registered checkpoint directory can be read."""

    def __init__(self, spec: RunSpec, *, max_concurrent: int = 4, counters=None):
        self.spec = spec
        self.digest = spec.digest()
        self._index: dict[str, Served] = {}
        self._lock = threading.Lock()
        self._max_concurrent = max_concurrent
        self._active = 0
        self.rpc = RpcServer(counters, max_streams=4 * max_concurrent, max_streams_per_peer=2)

    def add(self, manifest: str, path: Path, stage: int, step: int) -> None:
        with self._lock:
            self._index[manifest] = Served(Path(path), stage, step)

    def remove(self, manifest: str) -> None:
        with self._lock:
            self._index.pop(manifest, None)

    def served(self) -> dict[str, Served]:
        with self._lock:
            return dict(self._index)

    async def start(self, p2p: P2P) -> None:
        await self.rpc.add(p2p, CKPT, self._handle, CkptRequest, _error, REQUEST_LIMITS, kind="checkpoint")

    async def stop(self) -> None:
        await self.rpc.remove_all()

    async def _handle(self, frames: list[CkptRequest], _remote: str) -> list[CkptResponse]:
        if self._active >= self._max_concurrent:
            return [_error(ErrorCode.BUSY, "too many transfers in progress")]
        self._active += 1
        try:
            return await self._respond(frames[0])
        finally:
            self._active -= 1

    async def _respond(self, request: CkptRequest) -> list[CkptResponse]:
        if request.spec_digest != self.digest:
            raise Rejected(
                ErrorCode.WRONG_SPEC, f"spec digest {request.spec_digest[:16]!r} does not match {self.digest[:16]!r}"
            )
        with self._lock:
            served = self._index.get(request.manifest_digest)
        if served is None:
            raise Rejected(
                ErrorCode.NOT_FOUND, f"no checkpoint with manifest digest {request.manifest_digest[:16]!r} here"
            )
        try:
            files = await asyncio.to_thread(_listing, served.path)
        except (OSError, signing.SigningError) as err:
            self.remove(request.manifest_digest)  # pruned or damaged since it was registered
            raise Rejected(
                ErrorCode.GONE, f"checkpoint {request.manifest_digest[:16]} is no longer here ({err})"
            ) from None
        if request.op == "list":
            return [
                CkptResponse(
                    files=[CkptFile(name=n, size=s) for n, s in sorted(files.items())],
                    stage=served.stage,
                    step=served.step,
                )
            ]
        if request.op != "read":
            raise Rejected(ErrorCode.BAD_REQUEST, f"unknown op {request.op!r} (list or read)")
        if request.name not in files:  # names come only from our own listing: no path tricks
            raise Rejected(ErrorCode.BAD_REQUEST, f"{request.name!r} is not a file of this checkpoint")
        size = files[request.name]
        if request.offset > size or request.length == 0 or request.length > MAX_READ_BYTES:
            raise Rejected(
                ErrorCode.BAD_REQUEST,
                f"bad range offset={request.offset} length={request.length} for "
                f"a {size}-byte file (reads are at most {MAX_READ_BYTES} bytes)",
            )
        try:
            data = await asyncio.to_thread(_read_range, served.path / request.name, request.offset, request.length)
        except OSError as err:
            raise Rejected(ErrorCode.GONE, f"{request.name}: {err.strerror}") from None
        return [CkptResponse(data=data[i : i + DATA_FRAME_BYTES]) for i in range(0, len(data), DATA_FRAME_BYTES)] or [
            CkptResponse()
        ]


def _error(code: str, message: str) -> CkptResponse:
    return CkptResponse(error=message, error_code=str(code))
