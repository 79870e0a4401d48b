"""Checkpoints over the P2P network: serve the ones we hold, fetch the ones others announce.

Wire (handler ``swarmtrain.ckpt``, ``peer.wire`` framing): one ``CkptRequest`` per stream.

- ``op="list"``: the files of the checkpoint with that manifest digest and their sizes.
- ``op="read"``: bytes ``[offset, offset + length)`` of one listed file, as ``CkptResponse.data``
  frames of at most ``DATA_FRAME_BYTES``.

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
import hashlib
import logging
import os
import re
import secrets
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence

from hivemind.p2p import P2P, PeerID

from peer.checkpoint_store import (
    TEMP_PREFIX,
    CheckpointStore,
    LocalCheckpoint,
    expected_stage_shapes,
    load_into_module,
    stage_dir_name,
    step_dir_name,
)
from peer.wire import FrameError, read_frame, write_frame
from protocol import signing
from protocol.checkpoint import (
    CHECKPOINT_FILES,
    META_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    CheckpointRefused,
    VerifiedCheckpoint,
    check_file_set,
    check_meta,
    check_signature_set,
    manifest_digest,
    parse_meta,
    trusted_key_map,
    verify_checkpoint,
)
from protocol.messages_pb2 import CkptFile, CkptRequest, CkptResponse
from protocol.spec import RunSpec

log = logging.getLogger("swarmtrain.ckpt")

CKPT = "swarmtrain.ckpt"
DATA_FRAME_BYTES = 1 << 20  # one data frame (under the 4 MiB frame cap)
MAX_READ_BYTES = 8 << 20  # one read request
MAX_SIGNATURES = 16
MAX_META_BYTES = 64 << 10
MAX_SIGNATURE_BYTES = 256 << 10
PROGRESS_MIN_BYTES = 8 << 20  # show a progress bar for transfers at least this large
_SIG_NAME = re.compile(r"^signatures/[0-9a-f]{16}\.sig$")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class SourceFailed(RuntimeError):
    """One source could not deliver (unreachable, error reply, bad data); others may."""


class FetchFailed(RuntimeError):
    """No source delivered the checkpoint; the message lists what each one did."""


# ---------------------------------------------------------------------------------------------
# limits (pure)


def file_size_limits(spec: RunSpec, stage: int) -> dict[str, int]:
    """The largest size a file of a checkpoint of ``stage`` may have: what a stranger may make
    us download. Model: every parameter in float64 plus the header; optimizer: three times that."""
    numel = 0
    for shape in expected_stage_shapes(spec, stage).values():
        n = 1
        for d in shape:
            n *= d
        numel += n
    model = 8 * numel + (1 << 20)
    return {META_FILE: MAX_META_BYTES, MODEL_FILE: model, OPTIMIZER_FILE: 3 * model}


def check_listing(files: Mapping[str, int], limits: Mapping[str, int], *, source: str = "source") -> None:
    """A listing from a stranger: only checkpoint files and signatures, sizes within limits."""
    if not files:
        raise SourceFailed(f"{source}: empty file list")
    sigs = [n for n in files if n.startswith("signatures/")]
    for name, size in files.items():
        if name in CHECKPOINT_FILES:
            limit = limits[name]
        elif _SIG_NAME.match(name):
            limit = MAX_SIGNATURE_BYTES
        else:
            raise SourceFailed(f"{source}: lists {name!r}, which is not part of a checkpoint")
        if size > limit:
            raise SourceFailed(f"{source}: {name} is {size} bytes, more than the {limit} bytes it can be for this stage")
    for name in (META_FILE, MODEL_FILE):
        if name not in files:
            raise SourceFailed(f"{source}: the listing lacks {name}")
    if not sigs:
        raise SourceFailed(f"{source}: the listing has no signature")
    if len(sigs) > MAX_SIGNATURES:
        raise SourceFailed(f"{source}: {len(sigs)} signature files (at most {MAX_SIGNATURES})")


# ---------------------------------------------------------------------------------------------
# serving


@dataclasses.dataclass(frozen=True)
class Served:
    path: Path
    stage: int
    step: int


def _listing(path: Path) -> dict[str, int]:
    listing = signing.list_signed_dir(path)
    names = list(listing.content) + [f"{signing.SIGNATURES_DIR}/{fp}{signing.SIGNATURE_SUFFIX}" for fp in listing.signatures]
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
        self.counters = counters
        self._index: dict[str, Served] = {}
        self._lock = threading.Lock()
        self._max_concurrent = max_concurrent
        self._active = 0
        self.p2p: Optional[P2P] = None
        self.requests_rejected = 0

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
        self.p2p = p2p
        await p2p.add_binary_stream_handler(CKPT, self._handle)

    async def stop(self) -> None:
        if self.p2p is not None:
            try:
                await self.p2p.remove_binary_stream_handler(CKPT)
            except Exception:
                pass

    async def _handle(self, _stream_info, reader, writer) -> None:
        try:
            if self._active >= self._max_concurrent:
                frames = [CkptResponse(error="too many transfers in progress", error_code="busy")]
            else:
                self._active += 1
                try:
                    frames = await self._respond(reader)
                finally:
                    self._active -= 1
            for frame in frames:
                if self.counters is not None:
                    self.counters.add("sent", "checkpoint", frame.ByteSize())
                await write_frame(writer, frame)
            await write_frame(writer, None)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            pass
        except Exception:
            log.exception("checkpoint handler failed")
        finally:
            writer.close()

    async def _respond(self, reader) -> list[CkptResponse]:
        def fail(code: str, message: str) -> list[CkptResponse]:
            self.requests_rejected += 1
            return [CkptResponse(error=message, error_code=code)]

        try:
            request = await asyncio.wait_for(read_frame(reader, CkptRequest), timeout=10.0)
            # Read up to the end marker before answering: closing a stream with unread input
            # resets it, and the caller would lose the answer.
            extra = None if request is None else await asyncio.wait_for(read_frame(reader, CkptRequest), timeout=10.0)
        except FrameError as err:
            return fail("bad_request", f"malformed request: {err}")
        if request is None:
            return fail("bad_request", "empty request")
        if extra is not None:
            return fail("bad_request", "one request per stream")
        if request.spec_digest != self.digest:
            return fail("wrong_spec", f"spec digest {request.spec_digest[:16]!r} does not match {self.digest[:16]!r}")
        with self._lock:
            served = self._index.get(request.manifest_digest)
        if served is None:
            return fail("not_found", f"no checkpoint with manifest digest {request.manifest_digest[:16]!r} here")
        try:
            files = await asyncio.to_thread(_listing, served.path)
        except (OSError, signing.SigningError) as err:
            self.remove(request.manifest_digest)  # pruned or damaged since it was registered
            return fail("gone", f"checkpoint {request.manifest_digest[:16]} is no longer here ({err})")
        if request.op == "list":
            return [CkptResponse(files=[CkptFile(name=n, size=s) for n, s in sorted(files.items())],
                                 stage=served.stage, step=served.step)]
        if request.op != "read":
            return fail("bad_request", f"unknown op {request.op!r} (list or read)")
        if request.name not in files:  # names come only from our own listing: no path tricks
            return fail("bad_request", f"{request.name!r} is not a file of this checkpoint")
        size = files[request.name]
        if request.offset > size or request.length == 0 or request.length > MAX_READ_BYTES:
            return fail("bad_request", f"bad range offset={request.offset} length={request.length} for a "
                                       f"{size}-byte file (reads are at most {MAX_READ_BYTES} bytes)")
        try:
            data = await asyncio.to_thread(_read_range, served.path / request.name, request.offset, request.length)
        except OSError as err:
            return fail("gone", f"{request.name}: {err.strerror}")
        return [CkptResponse(data=data[i:i + DATA_FRAME_BYTES]) for i in range(0, len(data), DATA_FRAME_BYTES)] or [
            CkptResponse()]


# ---------------------------------------------------------------------------------------------
# client RPCs


async def _call(p2p: P2P, peer_id: str, request: CkptRequest, *, max_bytes: int) -> list[CkptResponse]:
    try:
        _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), CKPT)
    except Exception as err:
        raise SourceFailed(f"{peer_id}: unreachable ({type(err).__name__}: {err})") from None
    frames: list[CkptResponse] = []
    total = 0
    try:
        await write_frame(writer, request)
        await write_frame(writer, None)
        while True:
            frame = await read_frame(reader, CkptResponse)
            if frame is None:
                break
            total += frame.ByteSize()
            if total > max_bytes:
                raise SourceFailed(f"{peer_id}: sent more than the {max_bytes} bytes asked for")
            frames.append(frame)
    except (asyncio.IncompleteReadError, ConnectionError, FrameError) as err:
        raise SourceFailed(f"{peer_id}: transfer broken ({type(err).__name__}: {err})") from None
    finally:
        writer.close()
    if not frames:
        raise SourceFailed(f"{peer_id}: closed the stream without an answer")
    if frames[0].error:
        raise SourceFailed(f"{peer_id}: {frames[0].error_code or 'error'}: {frames[0].error}")
    return frames


async def list_remote(p2p: P2P, peer_id: str, spec_digest: str, manifest: str) -> tuple[dict[str, int], int, int]:
    frames = await _call(p2p, peer_id, CkptRequest(spec_digest=spec_digest, manifest_digest=manifest, op="list"),
                         max_bytes=1 << 20)
    head = frames[0]
    files: dict[str, int] = {}
    for f in head.files:
        if f.name in files:
            raise SourceFailed(f"{peer_id}: lists {f.name!r} twice")
        files[f.name] = int(f.size)
    return files, int(head.stage), int(head.step)


async def read_remote(p2p: P2P, peer_id: str, spec_digest: str, manifest: str, name: str, offset: int,
                      length: int) -> bytes:
    frames = await _call(p2p, peer_id, CkptRequest(spec_digest=spec_digest, manifest_digest=manifest, op="read",
                                                   name=name, offset=offset, length=length),
                         max_bytes=length + 64 * (length // DATA_FRAME_BYTES + 2))
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

    def __init__(self, spec: RunSpec, p2p: P2P, run: Callable, *, request_timeout: float = 30.0,
                 read_bytes: int = 4 << 20, progress: Optional[bool] = None):
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

    def fetch(self, stage: int, manifest: str, sources: Sequence[str], dest_root: Path, *,
              held_step: Optional[int] = None) -> FetchResult:
        """Download, check and publish a checkpoint into ``dest_root/stage-<k>/``.

        Raises ``CheckpointRefused`` when what arrived does not verify (the message names the
        file and the check), ``FetchFailed`` when no source delivered it.
        """
        if not _DIGEST.match(manifest):
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
            verified = verify_checkpoint(tmp, self.spec, expected_stage=stage, held_step=held_step,
                                         expected_shapes=expected_stage_shapes(self.spec, stage))
            if verified.manifest_digest != manifest:
                raise CheckpointRefused(tmp, f"the files form checkpoint {verified.manifest_digest}, not the "
                                             f"announced {manifest}")
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
        raise FetchFailed(f"checkpoint {self.manifest[:16]} of stage {self.stage}: no source delivered it"
                          + ("" if failures else " (no sources)") + "".join(f"; {m}" for m in failures))

    def _from(self, source: str) -> None:
        f = self.f
        files, stage, step = f._rpc(list_remote(f.p2p, source, f.digest, self.manifest))
        check_listing(files, self.limits, source=source)
        if stage != self.stage:
            raise SourceFailed(f"{source}: says checkpoint {self.manifest[:16]} is of stage {stage}, not {self.stage}")
        content = {n: s for n, s in files.items() if not n.startswith("signatures/")}
        if self.sizes is None:
            self.sizes = content
        elif content != self.sizes:
            # Same manifest digest, different files: one of the two sources lies; the signatures decide.
            raise SourceFailed(f"{source}: lists files {sorted(content.items())}, another source listed "
                               f"{sorted(self.sizes.items())}")
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

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                            desc=f"checkpoint stage {self.stage}", leave=False)

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
            data = self.f._rpc(read_remote(self.f.p2p, source, self.f.digest, self.manifest, name, have, want))
            if not data:
                raise SourceFailed(f"{source}: returned no bytes of {name} at offset {have} (listed {size} bytes)")
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
                raise SourceFailed(f"{source}: {name} does not match its signed sha256 ({self.signed[name]}, got "
                                   f"{actual}): discarded")
        self.done.add(name)

    def _precheck(self) -> dict[str, str]:
        """Check the signatures and checkpoint.json before the large files are downloaded;
        returns the signed digests. A refusal here is final (``CheckpointRefused``)."""
        spec = self.f.spec
        trusted = trusted_key_map(spec.trust.trusted_keys, path=self.tmp)
        if not trusted:
            raise CheckpointRefused(self.tmp, "no trusted keys: the spec's trust.trusted_keys is empty")
        valid, invalid, untrusted = {}, {}, []
        listing = signing.list_signed_dir(self.tmp)
        for fp, sig in listing.signatures.items():
            if fp not in trusted:
                untrusted.append(fp)
                continue
            try:
                valid[fp] = signing.read_signed_manifest(sig, trusted[fp])
            except signing.SigningError as err:
                invalid[fp] = str(err)
        manifest = check_signature_set(self.tmp, valid=valid, invalid=invalid, untrusted=untrusted,
                                       trusted=trusted, min_signatures=spec.trust.min_signatures)
        signed = dict(manifest.files)
        if manifest_digest(signed) != self.manifest:
            raise CheckpointRefused(self.tmp, f"the signatures cover checkpoint {manifest_digest(signed)}, not the "
                                              f"requested {self.manifest}")
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


# ---------------------------------------------------------------------------------------------
# announcing


class CheckpointAnnouncer:
    """Keeps this peer's newest verified checkpoint of each stage announced in the DHT."""

    def __init__(self, swarm, period: float):
        self.swarm, self.period = swarm, period
        self._records: dict[int, dict] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def publish(self, stage: int, record: dict) -> None:
        with self._lock:
            current = self._records.get(stage)
            if current is not None and current["step"] > record["step"]:
                return
            self._records[stage] = dict(record)
        self._wake.set()
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="ckpt-announcer", daemon=True)
            self._thread.start()

    def records(self) -> dict[int, dict]:
        with self._lock:
            return dict(self._records)

    def _loop(self) -> None:
        while True:  # at least one pass: what was published before stop() is announced once
            for stage, record in self.records().items():
                try:
                    self.swarm.announce_checkpoint(stage, record, ttl=3 * self.period)
                except Exception as err:
                    log.debug("announcing checkpoint of stage %d failed: %s", stage, err)
            if self._stop.is_set():
                return
            self._wake.wait(self.period)
            self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)


# ---------------------------------------------------------------------------------------------
# the loading policy


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A checkpoint worth trying: on local disk (``path``) or announced by ``sources``."""

    step: int
    manifest: Optional[str]  # None for a local one (known after verification)
    path: Optional[Path] = None
    sources: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        return str(self.path) if self.path is not None else f"announced by {', '.join(s[:16] for s in self.sources)}"


def restore_candidates(
    local: Iterable[LocalCheckpoint],
    announced: Iterable[tuple[str, dict]],
    *,
    held_step: Optional[int] = None,
    exclude_sources: Iterable[str] = (),
    trusted: Optional[Iterable[str]] = None,
    min_signatures: int = 1,
    limit: int = 8,
) -> list[Candidate]:
    """What to try, newest step first; at equal steps a local copy before a download, and a
    digest announced by more peers first. Nothing older than ``held_step`` (no rollback).
    Announcements are unverified hints: a wrong one costs one failed try. An announcement that
    does not even claim ``min_signatures`` of the ``trusted`` fingerprints is not tried."""
    excluded = set(exclude_sources)
    trusted = None if trusted is None else set(trusted)
    out: list[tuple[tuple, Candidate]] = []
    for c in local:
        if held_step is None or c.meta.step >= held_step:
            out.append(((-c.meta.step, 0, 0), Candidate(c.meta.step, None, path=c.path)))
    by_digest: dict[str, tuple[int, list[str]]] = {}
    for peer_id, record in announced:
        if peer_id in excluded:
            continue
        if trusted is not None and len(trusted & set(record.get("signers", ()))) < min_signatures:
            continue
        step, digest = int(record["step"]), record["manifest_digest"]
        if held_step is not None and step < held_step:
            continue
        if digest in by_digest:
            by_digest[digest][1].append(peer_id)
            # One digest is one checkpoint: if announcers disagree on its step, the smallest wins
            # (a liar cannot make an old checkpoint look newer to the ordering).
            by_digest[digest] = (min(step, by_digest[digest][0]), by_digest[digest][1])
        else:
            by_digest[digest] = (step, [peer_id])
    for digest, (step, peers) in by_digest.items():
        out.append(((-step, 1, -len(peers)), Candidate(step, digest, sources=tuple(peers))))
    out.sort(key=lambda kc: kc[0])
    return [c for _, c in out][:limit]


def live_state_verdict(
    *,
    group_epoch: int,
    local_epoch: int,
    trusted_step: Optional[int],
    has_trusted_keys: bool,
    accept_untrusted: bool,
    max_lag: int,
) -> tuple[bool, str]:
    """(load live state?, why) for a peer joining a stage group, by the spec's trust policy.

    Live state (parameters and optimizer state copied from one peer of the group) is signed
    by no one. It is loaded only when the group is ahead of this peer, the spec accepts
    untrusted live state at all, and, when the spec trusts checkpoint keys, the group is at
    most ``max_lag`` epochs ahead of the trusted base: the step of the checkpoint this peer
    restored, or 0 (the spec's deterministic initialisation, which every peer can recompute)
    when it restored none. Without trusted keys nothing is trusted more than live state, so
    the lag is not checked.
    """
    if group_epoch <= local_epoch:
        return False, f"in step with the group (epoch {local_epoch})"
    if not accept_untrusted:
        return False, (f"the group is at epoch {group_epoch}, but the spec forbids untrusted live state "
                       "(trust.accept_untrusted_live_state = false)")
    if has_trusted_keys:
        base = trusted_step or 0
        what = f"the trusted checkpoint (step {base})" if trusted_step else "the spec's initialisation (no trusted checkpoint)"
        if group_epoch - base > max_lag:
            return False, (f"the group's live state (epoch {group_epoch}) is {group_epoch - base} epochs ahead of "
                           f"{what}, more than trust.max_live_state_lag = {max_lag}")
        return True, f"the group is at epoch {group_epoch}, {group_epoch - base} epoch(s) ahead of {what}"
    return True, f"the group is at epoch {group_epoch} (the spec trusts no checkpoint key: no lag limit)"


@dataclasses.dataclass
class Restored:
    verified: VerifiedCheckpoint
    source: str  # "local" or the peer id that delivered the (last) bytes
    sources: list[str]


class CheckpointService:
    """A peer's checkpoint side: its local store, serving what it verified, announcing it,
    and finding the newest trusted checkpoint of a stage (locally or from the swarm).

    ``event(name, text, **fields)`` reports (the peer's ``Output.event``).
    """

    def __init__(self, spec: RunSpec, store: CheckpointStore, *, swarm, p2p: Optional[P2P], run: Optional[Callable],
                 event: Callable, announce_period: float = 5.0, request_timeout: float = 30.0, counters=None):
        self.spec, self.store, self.swarm, self.p2p, self.run = spec, store, swarm, p2p, run
        self.event = event
        self.server = CheckpointServer(spec, counters=counters)
        self.announcer = CheckpointAnnouncer(swarm, announce_period) if swarm is not None else None
        self.request_timeout = request_timeout
        self.peer_id = swarm.peer_id if swarm is not None else None
        self._started = False

    def start(self) -> None:
        if self.p2p is not None and not self._started:
            self.run(self.server.start(self.p2p), 30)
            self._started = True

    def stop(self) -> None:
        if self.announcer is not None:
            self.announcer.stop()
        if self._started:
            try:
                self.run(self.server.stop(), 5)
            except Exception:
                pass

    def offer(self, verified: VerifiedCheckpoint) -> None:
        """Serve a verified checkpoint and announce it (the newest of its stage is announced)."""
        self.server.add(verified.manifest_digest, verified.path, verified.meta.stage, verified.meta.step)
        if self.announcer is not None:
            self.announcer.publish(verified.meta.stage, verified.to_record())

    def announcements(self, stage: int) -> list[tuple[str, dict]]:
        if self.swarm is None:
            return []
        try:
            return self.swarm.checkpoint_announcements(stage)
        except Exception as err:
            log.warning("reading checkpoint announcements failed: %s", err)
            return []

    def restore(self, stage: int, module, *, held_step: Optional[int] = None) -> Optional[Restored]:
        """Load the newest checkpoint of ``stage`` that verifies into ``module``; None if none.

        Local checkpoints (``--checkpoint-dir``) and the swarm's announcements are tried newest
        step first. Each refusal is reported with its reason and leaves ``module`` untouched:
        weights are copied only from a checkpoint that passed every check.
        """
        if not self.spec.trust.trusted_keys:
            self.event("restore_skipped", f"stage {stage}: the spec trusts no checkpoint key; starting from the "
                                          "spec's initialisation", stage=stage, reason="no trusted keys")
            return None
        trusted = {signing.fingerprint(k) for k in self.spec.trust.trusted_keys}
        candidates = restore_candidates(self.store.list(stage), self.announcements(stage), held_step=held_step,
                                        exclude_sources=[self.peer_id] if self.peer_id else [], trusted=trusted,
                                        min_signatures=self.spec.trust.min_signatures)
        for c in candidates:
            try:
                restored = self._try(stage, c, held_step)
            except CheckpointRefused as err:
                self.event("checkpoint_refused", f"stage {stage}: refused checkpoint step {c.step} ({c.where}): "
                                                 f"{err.reason}", stage=stage, step=c.step, manifest_digest=c.manifest,
                           path=str(err.path) if err.path else None, sources=list(c.sources),
                           source="local" if c.path is not None else None, reason=err.reason)
                continue
            except FetchFailed as err:
                self.event("checkpoint_unavailable", f"stage {stage}: could not fetch checkpoint step {c.step}: {err}",
                           stage=stage, step=c.step, manifest_digest=c.manifest, reason=str(err))
                continue
            v = restored.verified
            load_into_module(v, module)
            self.offer(v)
            self.event("restored", f"stage {stage}: restored checkpoint step {v.meta.step} "
                                   f"({v.manifest_digest[:16]}, signed by {', '.join(v.signers)}) from "
                                   f"{'local ' + str(v.path) if restored.source == 'local' else restored.source}",
                       stage=stage, step=v.meta.step, manifest_digest=v.manifest_digest, signers=list(v.signers),
                       source=restored.source, sources=restored.sources, path=str(v.path),
                       tokens_seen=v.meta.tokens_seen)
            return restored
        self.event("restore_none", f"stage {stage}: no trusted checkpoint found"
                                   + (f" ({len(candidates)} tried)" if candidates else "")
                                   + "; starting from the spec's initialisation", stage=stage,
                   tried=len(candidates))
        return None

    def _try(self, stage: int, c: Candidate, held_step: Optional[int]) -> Restored:
        if c.path is not None:
            return Restored(self.store.load(c.path, stage, held_step=held_step), "local", ["local"])
        if self.p2p is None:
            raise FetchFailed("no P2P connection")
        local = self._local_copy(stage, c.manifest, held_step)
        if local is not None:
            return local
        fetcher = CheckpointFetcher(self.spec, self.p2p, self.run, request_timeout=self.request_timeout)
        remaining = list(c.sources)
        last_refusal: Optional[CheckpointRefused] = None
        # A refusal may be one source's doing (a tampered file from one peer): try the sources
        # that were not used, up to three rounds.
        for _ in range(3):
            if not remaining:
                break
            try:
                result = fetcher.fetch(stage, c.manifest, remaining, self.store.root, held_step=held_step)
            except CheckpointRefused as err:
                last_refusal = err
                self.event("checkpoint_refused", f"stage {stage}: checkpoint {c.manifest[:16]} fetched from "
                                                 f"{', '.join(s[:16] for s in remaining)} refused: {err.reason}",
                           stage=stage, step=c.step, manifest_digest=c.manifest, sources=remaining, reason=err.reason)
                remaining = remaining[1:]
                continue
            self.store._digests[result.verified.path] = result.verified.manifest_digest
            self.event("checkpoint_fetched", f"stage {stage}: fetched checkpoint step {result.verified.meta.step} "
                                             f"({result.bytes_fetched} bytes in {result.seconds:.1f}s) from "
                                             f"{', '.join(s[:16] for s in result.sources)}",
                       stage=stage, step=result.verified.meta.step, manifest_digest=c.manifest,
                       sources=result.sources, bytes=result.bytes_fetched, seconds=round(result.seconds, 3))
            return Restored(result.verified, result.sources[-1] if result.sources else "?", result.sources)
        assert last_refusal is not None
        raise last_refusal

    def _local_copy(self, stage: int, manifest: str, held_step: Optional[int]) -> Optional[Restored]:
        """A checkpoint already in the store under that digest (fetched earlier) needs no transfer."""
        for c in self.store.list(stage):
            try:
                if self.store.manifest_digest_of(c.path) == manifest:
                    return Restored(self.store.load(c.path, stage, held_step=held_step), "local", ["local"])
            except (OSError, signing.SigningError):
                continue
        return None


# ---------------------------------------------------------------------------------------------
# listing the swarm's checkpoints (``swarmtrain checkpoint list``)


def announced_checkpoints(announcements: Iterable[tuple[str, dict]]) -> list[dict]:
    """Announcements grouped by (stage, manifest digest): one row per checkpoint with the peers
    that serve it, by stage then newest step first. Announced fields are claims: only a
    fetched and verified checkpoint is known to be what it says."""
    rows: dict[tuple[int, str], dict] = {}
    for peer_id, rec in announcements:
        key = (int(rec["stage"]), rec["manifest_digest"])
        row = rows.get(key)
        if row is None:
            row = rows[key] = {"stage": key[0], "step": int(rec["step"]), "manifest_digest": key[1],
                               "signers": sorted(rec.get("signers", [])), "files": rec.get("files"),
                               "total_bytes": rec.get("total_bytes"), "served_by": []}
        row["step"] = min(row["step"], int(rec["step"]))  # announcers may disagree: the smallest claim
        row["signers"] = sorted(set(row["signers"]) | set(rec.get("signers", [])))
        if peer_id not in row["served_by"]:
            row["served_by"].append(peer_id)
    return sorted(rows.values(), key=lambda r: (r["stage"], -r["step"], r["manifest_digest"]))
