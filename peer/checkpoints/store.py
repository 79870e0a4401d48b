"""The local checkpoint store: write signed stage checkpoints atomically, list, prune, load.

Layout: ``<root>/stage-<k>/step-<step, 10 digits>/`` (see ``protocol.checkpoint`` for what a
checkpoint directory holds). A checkpoint is built and signed inside a temporary directory
``.tmp-<name>-<random>/`` beside it, fsynced, then renamed into place, so a crash never leaves
a directory that looks complete: readers skip ``.tmp-*`` and anything without
``checkpoint.json`` and at least one signature.

Loading goes through ``protocol.checkpoint.verify_checkpoint`` only; nothing here copies
tensors into a model before every check has passed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from peer.model.tensor_files import unaliased
from protocol import signing
from protocol.checkpoint import (
    META_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    CheckpointMeta,
    CheckpointRefused,
    VerifiedCheckpoint,
    manifest_digest,
    optimizer_state_to_tensors,
    parse_meta,
    verify_checkpoint,
)
from protocol.records import MAX_EPOCH
from protocol.signing import fsync_file
from protocol.spec import RunSpec

log = logging.getLogger("swarmtrain.checkpoint")

TEMP_PREFIX = signing.TEMP_PREFIX
_AUTO = object()
_MODEL_METADATA = {"format": "pt"}  # transformers refuses safetensors files without it


def stage_dir_name(stage: int) -> str:
    return f"stage-{stage}"


def step_dir_name(step: int) -> str:
    return f"step-{step:010d}"


@dataclasses.dataclass(frozen=True)
class WrittenCheckpoint:
    path: Path
    meta: CheckpointMeta
    manifest_digest: str
    signers: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class LocalCheckpoint:
    """A complete-looking checkpoint on disk. Not verified: ``signers`` are only the
    fingerprints in the signature file names."""

    path: Path
    meta: CheckpointMeta
    signers: tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# writing


def _publish(tmp: Path, target: Path) -> None:
    # rename(2) of a directory is atomic and refuses a non-empty target: readers see either no
    # checkpoint or a complete, signed one, and an existing checkpoint is never replaced.
    os.rename(tmp, target)


def write_checkpoint(
    target: Union[str, Path],
    *,
    spec: RunSpec,
    stage: int,
    step: int,
    tokens_seen: int,
    model_state: Mapping[str, torch.Tensor],
    key_paths: Sequence[Union[str, Path]],
    optimizer_state: Optional[Mapping[str, Any]] = None,
    parent_digest: Optional[str] = None,
    created: Optional[float] = None,
) -> WrittenCheckpoint:
    """Write, sign (once per key) and publish a checkpoint directory at ``target``, atomically."""
    target = Path(target)
    if not key_paths:
        raise ValueError(
            "a checkpoint needs at least one signing key: readers ignore unsigned directories "
            "(create one with `swarmtrain keygen`)"
        )
    if not 0 <= stage < spec.num_stages:
        raise ValueError(f"stage {stage} does not exist: the spec has {spec.num_stages} stage(s)")
    if target.exists():
        raise FileExistsError(f"{target} already exists; checkpoints are never overwritten")
    meta = CheckpointMeta(
        run_id=spec.run_id,
        spec_digest=spec.digest(),
        stage=stage,
        step=step,
        tokens_seen=tokens_seen,
        parent_digest=parent_digest,
        created=time.time() if created is None else created,
    )
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    outer = target.parent / f"{TEMP_PREFIX}{target.name}-{secrets.token_hex(4)}"
    outer.mkdir()
    # Built one level down under its final name, so the name recorded in the signature (the
    # directory's name) is the published one, not the temporary one.
    inner = outer / target.name
    try:
        inner.mkdir()
        save_file(unaliased(model_state), inner / MODEL_FILE, metadata=_MODEL_METADATA)
        fsync_file(inner / MODEL_FILE)
        if optimizer_state is not None:
            tensors, metadata = optimizer_state_to_tensors(optimizer_state)
            save_file(unaliased(tensors), inner / OPTIMIZER_FILE, metadata=metadata)
            fsync_file(inner / OPTIMIZER_FILE)
        (inner / META_FILE).write_bytes(meta.to_json_bytes())
        fsync_file(inner / META_FILE)
        signers = []
        for key_path in key_paths:
            sig = signing.sign_dir(inner, key_path)
            signers.append(sig.name[: -len(signing.SIGNATURE_SUFFIX)])
        digest = _own_manifest_digest(inner, key_paths)
        signing.fsync_dir(inner / signing.SIGNATURES_DIR)
        signing.fsync_dir(inner)
        signing.fsync_dir(outer)
        _publish(inner, target)
        signing.fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(outer, ignore_errors=True)
        raise
    shutil.rmtree(outer, ignore_errors=True)  # empty by now
    return WrittenCheckpoint(path=target, meta=meta, manifest_digest=digest, signers=tuple(signers))


def _own_manifest_digest(directory: Path, key_paths) -> str:
    """Read back what each key signed and check it is every file written: a file changed by
    someone else while we signed would otherwise be published under our signature."""
    listing = signing.list_signed_dir(directory)
    actual = signing.hash_files(directory, listing.content)
    for key_path in key_paths:
        pub = signing.public_key_pem(signing.load_private_key(key_path))
        signed = signing.read_signed_manifest(signing.signature_path(directory, signing.fingerprint(pub)), pub)
        problems = signing.compare_files(signed.files, actual)
        if problems:
            raise RuntimeError(f"{directory}: files changed while signing: {'; '.join(problems)}")
    return manifest_digest(actual)


# ---------------------------------------------------------------------------------------------
# listing


def _looks_complete(path: Path) -> Optional[LocalCheckpoint]:
    meta_file = path / META_FILE
    sig_dir = path / signing.SIGNATURES_DIR
    if not meta_file.is_file() or not sig_dir.is_dir():
        return None
    signers = tuple(
        sorted(
            p.name[: -len(signing.SIGNATURE_SUFFIX)]
            for p in sig_dir.iterdir()
            if p.name.endswith(signing.SIGNATURE_SUFFIX)
            and not p.name.startswith(TEMP_PREFIX)
            and signing.FINGERPRINT_RE.match(p.name[: -len(signing.SIGNATURE_SUFFIX)])
        )
    )
    if not signers:
        return None
    try:
        meta = parse_meta(meta_file.read_bytes(), path)
    except (CheckpointRefused, OSError):
        return None
    return LocalCheckpoint(path=path, meta=meta, signers=signers)


def list_checkpoints(
    root: Union[str, Path],
    *,
    stage: Optional[int] = None,
    spec_digest: Optional[str] = None,
) -> list[LocalCheckpoint]:
    """Complete-looking checkpoints under ``root`` (itself, its children and grandchildren),
    newest step first. Temporary ``.tmp-*`` directories and incomplete ones are skipped."""
    root = Path(root)
    if not root.is_dir():
        return []
    found: list[LocalCheckpoint] = []
    frontier = [(root, 0)]
    while frontier:
        d, depth = frontier.pop()
        if d.name.startswith(TEMP_PREFIX) or d.is_symlink():
            continue
        entry = _looks_complete(d)
        if entry is not None:
            found.append(entry)
            continue
        if depth < 2:
            try:
                frontier.extend((c, depth + 1) for c in d.iterdir() if c.is_dir())
            except OSError:
                continue
    found = [
        c
        for c in found
        if (stage is None or c.meta.stage == stage) and (spec_digest is None or c.meta.spec_digest == spec_digest)
    ]
    found.sort(key=lambda c: (c.meta.step, c.meta.created, c.path.name), reverse=True)
    return found


# ---------------------------------------------------------------------------------------------
# loading


def expected_stage_shapes(spec: RunSpec, stage: int) -> dict[str, tuple[int, ...]]:
    from peer.model.llama import stage_param_shapes

    return stage_param_shapes(spec, stage)


def load_verified(
    directory: Union[str, Path],
    spec: RunSpec,
    stage: int,
    *,
    held_step: Optional[int] = None,
    trusted_keys: Optional[Sequence[str]] = None,
    min_signatures: Optional[int] = None,
    load_optimizer: bool = True,
) -> VerifiedCheckpoint:
    """Verify a checkpoint of ``stage`` against the spec's trust policy, the stage's parameter
    names and shapes, and ``held_step``; raise ``CheckpointRefused`` otherwise."""
    return verify_checkpoint(
        directory,
        spec,
        trusted_keys=trusted_keys,
        min_signatures=min_signatures,
        held_step=held_step,
        expected_stage=stage,
        expected_shapes=expected_stage_shapes(spec, stage),
        load_optimizer=load_optimizer,
    )


@torch.no_grad()
def load_into_module(verified: VerifiedCheckpoint, module: torch.nn.Module) -> None:
    """Copy a verified checkpoint's weights into ``module`` (names checked before any copy)."""
    module.load_parameters(verified.model_state, source=str(verified.path))


# ---------------------------------------------------------------------------------------------
# the store


HELD_STEP_FILE = "held-step"


class CheckpointStore:
    """Checkpoints of one spec under ``root``; keeps the newest ``keep`` of each stage."""

    def __init__(
        self,
        root: Union[str, Path],
        spec: RunSpec,
        *,
        key_paths: Sequence[Union[str, Path]] = (),
        keep: int = 3,
        stale_temp_s: float = 24 * 3600,
    ):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.root = Path(root)
        self.spec = spec
        self.key_paths = tuple(Path(k) for k in key_paths)
        self.keep = keep
        self.stale_temp_s = stale_temp_s
        self._digests: dict[Path, str] = {}
        self._verified: dict[tuple, bool] = {}

    def dir_for(self, stage: int, step: int) -> Path:
        return self.root / stage_dir_name(stage) / step_dir_name(step)

    # --- the newest step this peer ever loaded for a stage: no rollback, across restarts ------

    def held_step(self, stage: int) -> Optional[int]:
        path = self.root / stage_dir_name(stage) / HELD_STEP_FILE
        try:
            value = int(path.read_text().strip())
        except (OSError, ValueError):
            return None
        return value if 0 <= value <= MAX_EPOCH else None

    def hold(self, stage: int, step: int) -> None:
        """Remember that ``step`` of ``stage`` was loaded: an older signed checkpoint is refused
        from now on, by this process and by the next one that uses this directory."""
        held = self.held_step(stage)
        if held is not None and held >= step:
            return
        directory = self.root / stage_dir_name(stage)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f"{TEMP_PREFIX}{HELD_STEP_FILE}"
        tmp.write_text(f"{int(step)}\n")
        fsync_file(tmp)
        os.replace(tmp, directory / HELD_STEP_FILE)

    def list(self, stage: Optional[int] = None) -> list[LocalCheckpoint]:
        """This spec's complete-looking checkpoints, newest first (unverified)."""
        return list_checkpoints(self.root, stage=stage, spec_digest=self.spec.digest())

    def save(
        self,
        stage: int,
        step: int,
        model_state: Mapping[str, torch.Tensor],
        optimizer_state: Optional[Mapping[str, Any]] = None,
        *,
        tokens_seen: int = 0,
        parent_digest: Any = _AUTO,
        prune: bool = True,
    ) -> WrittenCheckpoint:
        """Write a signed checkpoint; ``parent_digest`` defaults to the newest older local one's."""
        if parent_digest is _AUTO:
            older = [c for c in self.list(stage) if c.meta.step < step]
            parent_digest = self.manifest_digest_of(older[0].path) if older else None
        written = write_checkpoint(
            self.dir_for(stage, step),
            spec=self.spec,
            stage=stage,
            step=step,
            tokens_seen=tokens_seen,
            model_state=model_state,
            key_paths=self.key_paths,
            optimizer_state=optimizer_state,
            parent_digest=parent_digest,
        )
        self._digests[written.path] = written.manifest_digest
        if prune:
            self.prune(stage)
        return written

    def manifest_digest_of(self, path: Union[str, Path]) -> str:
        """The manifest digest of a local checkpoint's files as they are (not a verification)."""
        path = Path(path)
        if path not in self._digests:
            listing = signing.list_signed_dir(path)
            self._digests[path] = manifest_digest(signing.hash_files(path, listing.content))
        return self._digests[path]

    def load(
        self, path: Union[str, Path], stage: int, *, held_step: Optional[int] = None, load_optimizer: bool = True
    ) -> VerifiedCheckpoint:
        return load_verified(path, self.spec, stage, held_step=held_step, load_optimizer=load_optimizer)

    def latest_verified(
        self, stage: int, *, held_step: Optional[int] = None, load_optimizer: bool = True
    ) -> Optional[VerifiedCheckpoint]:
        """The newest local checkpoint of ``stage`` that passes verification, or None."""
        for c in self.list(stage):
            if held_step is not None and c.meta.step < held_step:
                break
            try:
                return self.load(c.path, stage, held_step=held_step, load_optimizer=load_optimizer)
            except CheckpointRefused as err:
                log.warning("skipping local checkpoint: %s", err)
        return None

    def _is_verified(self, c: LocalCheckpoint) -> bool:
        try:
            stats = tuple(
                sorted(
                    (p.relative_to(c.path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                    for p in c.path.rglob("*")
                    if p.is_file()
                )
            )
        except OSError:
            return False
        key = (c.path, stats)
        if key not in self._verified:
            try:
                verify_checkpoint(c.path, self.spec, expected_stage=c.meta.stage, load_tensors=False)
                self._verified[key] = True
            except CheckpointRefused as err:
                log.info("not verified: %s", err)
                self._verified[key] = False
        return self._verified[key]

    def prune(self, stage: int, keep: Optional[int] = None) -> list[Path]:
        """Delete all but the newest ``keep`` checkpoints of ``stage``, never the newest one that
        verifies against the spec (which may be older than the ones kept). Checkpoints of other
        specs and incomplete directories are left alone. Returns the deleted paths."""
        keep = self.keep if keep is None else keep
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        entries = self.list(stage)
        kept = {c.path for c in entries[:keep]}
        if len(entries) > keep:
            # Only worth hashing when something would be deleted.
            newest_verified = next((c for c in entries if self._is_verified(c)), None)
            if newest_verified is not None:
                kept.add(newest_verified.path)
        removed = []
        for c in entries:
            if c.path not in kept:
                _remove_dir(c.path)
                self._digests.pop(c.path, None)
                removed.append(c.path)
        self._remove_stale_temp(self.root / stage_dir_name(stage))
        return removed

    def _remove_stale_temp(self, directory: Path) -> None:
        if not directory.is_dir():
            return
        cutoff = time.time() - self.stale_temp_s
        for d in directory.iterdir():
            try:
                if d.name.startswith(TEMP_PREFIX) and d.is_dir() and d.stat().st_mtime < cutoff:
                    shutil.rmtree(d, ignore_errors=True)
            except OSError:
                continue


def _remove_dir(path: Path) -> None:
    # Renamed away first: a crash mid-delete must not leave a checkpoint.json and a signature
    # beside half of the weights, which would look complete to a reader.
    doomed = path.parent / f"{TEMP_PREFIX}del-{path.name}-{secrets.token_hex(4)}"
    os.rename(path, doomed)
    signing.fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)
