"""Fetching a checkpoint others announce, from any of them.

The source does not matter: a checkpoint is fetched into a temporary directory, every file is
checked against the signed digests as soon as it is complete, and the whole directory goes
through ``verify_checkpoint`` before it is renamed into the local store. A source that dies
or lies is dropped and the transfer continues from the byte where it stopped, with the next
source that announces the same manifest digest.

Everything a source sends is untrusted: file names must be those of a checkpoint, sizes are
capped by what the spec's stage can weigh, a lying size or digest only costs that source.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from hivemind.p2p import P2P

from peer.checkpoints.limits import (
    DATA_FRAME_BYTES,
    DIGEST,
    MAX_READ_BYTES,
    FetchFailed,
    SourceFailed,
    check_listing,
    file_size_limits,
)
from peer.checkpoints.store import (
    TEMP_PREFIX,
    expected_stage_shapes,
    stage_dir_name,
    step_dir_name,
)
from peer.net import RemoteError, call
from protocol import signing
from protocol.checkpoint import (
    META_FILE,
    CheckpointRefused,
    VerifiedCheckpoint,
    check_file_set,
    check_meta,
    manifest_digest,
    parse_meta,
    signed_manifest,
    trusted_key_map,
    verify_checkpoint,
)
from protocol.messages_pb2 import CkptRequest, CkptResponse
from protocol.rpc import CKPT
from protocol.spec import RunSpec

log = logging.getLogger("swarmtrain.ckpt")

PROGRESS_MIN_BYTES = 8 << 20  # show a progress bar for transfers at least this large
MIN_TRANSFER_RATE = 256 << 10  # bytes/s below which a source is dropped for the next one


# ---------------------------------------------------------------------------------------------
# client RPCs


async def _call(
    p2p: P2P, peer_id: str, request: CkptRequest, *, max_bytes: int, timeout: float = 60.0
) -> list[CkptResponse]:
    try:
        return await call(
            p2p, peer_id, CKPT, [request], CkptResponse, timeout=timeout, max_bytes=max_bytes, kind="checkpoint"
        )
    except RemoteError as err:
        raise SourceFailed(f"{peer_id}: {err}") from None


async def list_remote(p2p: P2P, peer_id: str, spec_digest: str, manifest: str) -> tuple[dict[str, int], int, int]:
    frames = await _call(
        p2p, peer_id, CkptRequest(spec_digest=spec_digest, manifest_digest=manifest, op="list"), max_bytes=1 << 20
    )
    head = frames[0]
    files: dict[str, int] = {}
    for f in head.files:
        if f.name in files:
            raise SourceFailed(f"{peer_id}: lists {f.name!r} twice")
        files[f.name] = int(f.size)
    return files, int(head.stage), int(head.step)


async def read_remote(
    p2p: P2P, peer_id: str, spec_digest: str, manifest: str, name: str, offset: int, length: int
) -> bytes:
    frames = await _call(
        p2p,
        peer_id,
        CkptRequest(
            spec_digest=spec_digest, manifest_digest=manifest, op="read", name=name, offset=offset, length=length
        ),
        max_bytes=length + 64 * (length // DATA_FRAME_BYTES + 2),
    )
    data = b"".join(f.data for f in frames)
    if len(data) > length:
        raise SourceFailed(f"{peer_id}: sent {len(data)} bytes of {name} for a {length}-byte read")
    return data


# ---------------------------------------------------------------------------------------------
# fetching


@dataclasses.dataclass
class FetchResult:
    verified: VerifiedCheckpoint
    sources: list[str]  # peers that delivered bytes, in order
    bytes_fetched: int
    seconds: float


def _write_at(path: Path, data: bytes, offset: int) -> None:
    with open(path, "r+b" if path.exists() else "wb") as f:
        f.seek(offset)
        f.write(data)


class CheckpointFetcher:
    """Fetches one checkpoint (by manifest digest) from the peers that announce it.

    ``run(coro, timeout)`` runs a coroutine on the loop that owns ``p2p`` and returns its
    result (``LoopThread.run``); the fetcher itself is synchronous.
    """

    def __init__(
        self,
        spec: RunSpec,
        p2p: P2P,
        run: Callable,
        *,
        request_timeout: float = 30.0,
        read_bytes: int = 4 << 20,
        progress: Optional[bool] = None,
    ):
        self.spec, self.p2p, self.run = spec, p2p, run
        self.digest = spec.digest()
        self.request_timeout = request_timeout
        self.read_bytes = min(read_bytes, MAX_READ_BYTES)
        self.progress = progress  # None: a bar on stderr for transfers >= PROGRESS_MIN_BYTES

    def _rpc(self, coro):
        try:
            return self.run(asyncio.wait_for(coro, self.request_timeout), self.request_timeout + 5)
        except (asyncio.TimeoutError, TimeoutError):
            raise SourceFailed(f"no answer within {self.request_timeout:.0f}s") from None

    def fetch(
        self, stage: int, manifest: str, sources: Sequence[str], dest_root: Path, *, held_step: Optional[int] = None
    ) -> FetchResult:
        """Download, check and publish a checkpoint into ``dest_root/stage-<k>/``.

        Raises ``CheckpointRefused`` when what arrived does not verify (the message names the
        file and the check), ``FetchFailed`` when no source delivered it.
        """
        if not DIGEST.fullmatch(manifest):
            raise ValueError(f"not a manifest digest: {manifest!r}")
        started = time.monotonic()
        stage_dir = Path(dest_root) / stage_dir_name(stage)
        stage_dir.mkdir(parents=True, exist_ok=True)
        outer = stage_dir / f"{TEMP_PREFIX}fetch-{manifest[:16]}-{secrets.token_hex(4)}"
        outer.mkdir()
        tmp = outer / "ckpt"
        (tmp / signing.SIGNATURES_DIR).mkdir(parents=True)
        try:
            state = _Transfer(self, stage, manifest, tmp, held_step)
            state.download(list(sources))
            verified = verify_checkpoint(
                tmp,
                self.spec,
                expected_stage=stage,
                held_step=held_step,
                expected_shapes=expected_stage_shapes(self.spec, stage),
            )
            if verified.manifest_digest != manifest:
                raise CheckpointRefused(
                    tmp, f"the files form checkpoint {verified.manifest_digest}, not the announced {manifest}"
                )
            for name in os.listdir(tmp / signing.SIGNATURES_DIR):
                signing.fsync_file(tmp / signing.SIGNATURES_DIR / name)
            signing.fsync_dir(tmp / signing.SIGNATURES_DIR)
            signing.fsync_dir(tmp)
            final = _publish_fetched(tmp, stage_dir, verified)
            verified = dataclasses.replace(verified, path=final)
            return FetchResult(verified, state.used_sources, state.bytes_fetched, time.monotonic() - started)
        finally:
            shutil.rmtree(outer, ignore_errors=True)


def _publish_fetched(tmp: Path, stage_dir: Path, verified: VerifiedCheckpoint) -> Path:
    """Rename into place atomically; an existing directory of the same step is never replaced
    (if it holds the same checkpoint, it is reused)."""
    target = stage_dir / step_dir_name(verified.meta.step)
    if target.exists():
        try:
            listing = signing.list_signed_dir(target)
            if manifest_digest(signing.hash_files(target, listing.content)) == verified.manifest_digest:
                return target
        except (OSError, signing.SigningError):
            pass
        target = stage_dir / f"{step_dir_name(verified.meta.step)}-{verified.manifest_digest[:12]}"
        if target.exists():
            return target
    os.rename(tmp, target)
    signing.fsync_dir(stage_dir)
    return target


class _Transfer:
    """The state of one fetch: which files are complete, how many bytes of each we hold."""

    def __init__(self, fetcher: CheckpointFetcher, stage: int, manifest: str, tmp: Path, held_step: Optional[int]):
        self.f, self.stage, self.manifest, self.tmp, self.held_step = fetcher, stage, manifest, tmp, held_step
        self.limits = file_size_limits(fetcher.spec, stage)
        self.sizes: Optional[dict[str, int]] = None  # the reference listing (content files)
        self.signed: Optional[dict[str, str]] = None  # name -> sha256, once the signatures are checked
        self.done: set[str] = set()
        self.used_sources: list[str] = []
        self.bytes_fetched = 0
        self.bar = None
        self.deadline = float("inf")  # set per source by _from

    def download(self, sources: list[str]) -> None:
        failures: list[str] = []
        remaining = list(dict.fromkeys(sources))
        try:
            while remaining:
                source = remaining.pop(0)
                try:
                    self._from(source)
                    return
                except SourceFailed as err:
                    msg = str(err) if str(err).startswith(source) else f"{source}: {err}"
                    log.info("checkpoint %s: %s; trying the next source", self.manifest[:16], msg)
                    failures.append(msg)
        finally:
            if self.bar is not None:
                self.bar.close()
        raise FetchFailed(
            f"checkpoint {self.manifest[:16]} of stage {self.stage}: no source delivered it"
            + ("" if failures else " (no sources)")
            + "".join(f"; {m}" for m in failures)
        )

    def _from(self, source: str) -> None:
        f = self.f
        files, stage, step = f._rpc(list_remote(f.p2p, source, f.digest, self.manifest))
        check_listing(files, self.limits, source=source)
        # One overall deadline per source: a request timeout, plus the listed bytes at a slow
        # link's rate; a source that answers every read just in time cannot stall the join.
        self.deadline = time.monotonic() + f.request_timeout + sum(files.values()) / MIN_TRANSFER_RATE
        if stage != self.stage:
            raise SourceFailed(f"{source}: says checkpoint {self.manifest[:16]} is of stage {stage}, not {self.stage}")
        content = {n: s for n, s in files.items() if not n.startswith("signatures/")}
        if self.sizes is None:
            self.sizes = content
        elif content != self.sizes:
            # Same manifest digest, different files: one of the two sources lies; the signatures decide.
            raise SourceFailed(
                f"{source}: lists files {sorted(content.items())}, another source listed {sorted(self.sizes.items())}"
            )
        if source not in self.used_sources:
            self.used_sources.append(source)
        # A partial signature file of an earlier source that this one does not have would read
        # as a broken signature: drop it.
        for sig in (self.tmp / signing.SIGNATURES_DIR).iterdir():
            name = f"{signing.SIGNATURES_DIR}/{sig.name}"
            if name not in files and name not in self.done:
                sig.unlink()
        self._start_bar(files)
        # Small files first: the signatures and checkpoint.json decide whether the big ones are
        # worth downloading at all.
        sigs = sorted(n for n in files if n.startswith("signatures/"))
        for name in sigs + [META_FILE]:
            self._get(source, name, files[name])
        if self.signed is None:
            self.signed = self._precheck()
        for name in sorted(self.sizes):
            if name not in self.done:
                self._get(source, name, self.sizes[name])

    def _start_bar(self, files: Mapping[str, int]) -> None:
        total = sum(files.values())
        show = self.f.progress if self.f.progress is not None else total >= PROGRESS_MIN_BYTES
        if show and self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=sys.stderr,
                desc=f"checkpoint stage {self.stage}",
                leave=False,
            )

    def _get(self, source: str, name: str, size: int) -> None:
        """Fetch ``name`` up to ``size`` bytes, resuming from what is already on disk."""
        if name in self.done:
            return
        path = self.tmp / name
        have = path.stat().st_size if path.exists() else 0
        if have > size:  # a signature file of another source's listing: start it over
            path.unlink()
            have = 0
        while have < size:
            want = min(self.f.read_bytes, size - have)
            if time.monotonic() > self.deadline:
                raise SourceFailed(f"{source}: too slow: {name} not complete within the transfer's deadline")
            data = self.f._rpc(read_remote(self.f.p2p, source, self.f.digest, self.manifest, name, have, want))
            if len(data) != want:
                # A server answers exactly what is asked of a file it listed: a short reply is a
                # source that stalls (it would otherwise drip one byte per request for ever).
                raise SourceFailed(f"{source}: returned {len(data)} bytes of {name} at offset {have}, not {want}")
            _write_at(path, data, have)
            have += len(data)
            self.bytes_fetched += len(data)
            if self.bar is not None:
                self.bar.update(len(data))
        if not path.exists():
            path.write_bytes(b"")
        signing.fsync_file(path)
        if self.signed is not None and name in self.signed:
            actual = signing.sha256_file(path)
            if actual != self.signed[name]:
                # A tampered chunk: drop this file and fetch it again from another source.
                path.unlink()
                raise SourceFailed(
                    f"{source}: {name} does not match its signed sha256 ({self.signed[name]}, got {actual}): discarded"
                )
        self.done.add(name)

    def _precheck(self) -> dict[str, str]:
        """Check the signatures and checkpoint.json before the large files are downloaded;
        returns the signed digests. A refusal here is final (``CheckpointRefused``)."""
        spec = self.f.spec
        trusted = trusted_key_map(spec.trust.trusted_keys, path=self.tmp)
        if not trusted:
            raise CheckpointRefused(self.tmp, "no trusted keys: the spec's trust.trusted_keys is empty")
        listing = signing.list_signed_dir(self.tmp)
        manifest, _, _ = signed_manifest(
            self.tmp, listing.signatures, trusted, min_signatures=spec.trust.min_signatures
        )
        signed = dict(manifest.files)
        if manifest_digest(signed) != self.manifest:
            raise CheckpointRefused(
                self.tmp,
                f"the signatures cover checkpoint {manifest_digest(signed)}, not the requested {self.manifest}",
            )
        check_file_set(self.tmp, signed, list(self.sizes))
        meta_path = self.tmp / META_FILE
        actual = signing.sha256_file(meta_path)
        if actual != signed[META_FILE]:
            meta_path.unlink()
            self.done.discard(META_FILE)
            raise SourceFailed(f"{META_FILE} does not match its signed sha256: discarded")
        meta = parse_meta(meta_path.read_bytes(), self.tmp)
        check_meta(self.tmp, meta, spec, expected_stage=self.stage, held_step=self.held_step)
        return signed
