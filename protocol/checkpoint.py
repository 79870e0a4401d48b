"""Stage checkpoints: the ``checkpoint.json`` schema, the manifest digest and the trust policy.

A checkpoint of one stage is a directory::

    checkpoint.json            run_id, spec_digest, stage, step, tokens_seen, parent_digest, ...
    model.safetensors          the stage's weights, Hugging Face names
    optimizer.safetensors      optional: the optimizer state, flattened (see below)
    signatures/<fp>.sig        one OpenSSF Model Signing bundle per signer (protocol.signing)

``verify_checkpoint`` is the only way to get tensors out of a checkpoint: it checks the
signatures against the trusted keys, the file set and every digest, the metadata against the
spec, and the tensors themselves, and only then returns them. The tensors are parsed from the
very bytes whose digests were checked, so a file swapped after verification is never loaded.
The policy checks are pure functions, reused by the network code that receives checkpoints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol import signing
from protocol.records import CheckpointAnnouncement
from protocol.spec import RunSpec

CHECKPOINT_FORMAT_VERSION = 1
META_FILE = "checkpoint.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
REQUIRED_FILES = (META_FILE, MODEL_FILE)
CHECKPOINT_FILES = (META_FILE, MODEL_FILE, OPTIMIZER_FILE)
_HEX64 = r"^[0-9a-f]{64}$"


class CheckpointRefused(ValueError):
    """A checkpoint that must not be loaded. ``reason`` says exactly why."""

    def __init__(self, path: Union[str, Path, None], reason: str):
        self.path = None if path is None else Path(path)
        self.reason = reason
        super().__init__(
            f"checkpoint {path} refused: {reason}" if path is not None else f"checkpoint refused: {reason}"
        )


# ---------------------------------------------------------------------------------------------
# checkpoint.json


class CheckpointMeta(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = CHECKPOINT_FORMAT_VERSION
    run_id: str = Field(min_length=1, max_length=64)
    spec_digest: str = Field(pattern=_HEX64)
    stage: int = Field(ge=0)
    step: int = Field(ge=0)
    tokens_seen: int = Field(ge=0)
    parent_digest: Optional[str] = Field(
        default=None, pattern=_HEX64, description="manifest digest of the previous checkpoint of this stage"
    )
    created: float = Field(ge=0, description="unix time")

    def to_json_bytes(self) -> bytes:
        return (json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()


def parse_meta(data: bytes, path: Union[str, Path, None] = None) -> CheckpointMeta:
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointRefused(path, f"{META_FILE}: not valid JSON ({err})") from None
    if not isinstance(obj, dict):
        raise CheckpointRefused(path, f"{META_FILE}: expected a JSON object")
    if "format_version" not in obj:
        raise CheckpointRefused(path, f"{META_FILE}: format_version is missing")
    version = obj["format_version"]
    if version != CHECKPOINT_FORMAT_VERSION:
        # Checked first: a newer format fails every other field, and this message says why.
        raise CheckpointRefused(
            path, f"{META_FILE}: format_version is {version!r}, this swarmtrain reads {CHECKPOINT_FORMAT_VERSION}"
        )
    try:
        return CheckpointMeta.model_validate(obj)
    except ValidationError as err:
        fields = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "checkpoint"
            msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
            fields.append(f"{loc}: {msg}")
        raise CheckpointRefused(path, f"{META_FILE}: " + "; ".join(fields)) from None


# ---------------------------------------------------------------------------------------------
# manifest digest


def manifest_digest(files: Mapping[str, str]) -> str:
    """A checkpoint's id: SHA-256 over the sorted (name, sha256) pairs it is signed over.

    Names are part of it (unlike model-signing's subject digest, which covers only the digests),
    so two checkpoints whose files differ only by name get different ids. It does not depend on
    who signed, so co-signing a checkpoint keeps its id.
    """
    canonical = json.dumps([[name, "sha256", files[name]] for name in sorted(files)], separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# optimizer state <-> flat tensors (safetensors holds only named tensors and string metadata)


def optimizer_state_to_tensors(state_dict: Mapping[str, Any]) -> tuple[dict, dict[str, str]]:
    """Flatten ``torch.optim.Optimizer.state_dict()`` to ``state.<param>.<key>`` tensors plus
    JSON metadata (param groups and non-tensor per-parameter values)."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for param_id, per_param in state_dict.get("state", {}).items():
        for key, value in per_param.items():
            name = f"state.{param_id}.{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = value
            else:
                scalars[name] = value
    try:
        groups = json.dumps(state_dict.get("param_groups", []))
        scalars_json = json.dumps(scalars)
    except TypeError as err:
        raise ValueError(f"optimizer state holds a value that is neither a tensor nor JSON: {err}") from None
    return tensors, {"format": "pt", "swarmtrain": "optimizer-v1", "param_groups": groups, "scalars": scalars_json}


def optimizer_state_from_tensors(tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> dict:
    if metadata.get("swarmtrain") != "optimizer-v1":
        raise ValueError(f"not a swarmtrain optimizer file (metadata swarmtrain={metadata.get('swarmtrain')!r})")
    state: dict[Any, dict] = {}

    def put(name: str, value) -> None:
        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "state":
            raise ValueError(f"unexpected entry {name!r} (expected state.<param>.<key>)")
        param_id = int(parts[1]) if parts[1].lstrip("-").isdigit() else parts[1]
        state.setdefault(param_id, {})[parts[2]] = value

    for name, t in tensors.items():
        put(name, t)
    for name, v in json.loads(metadata.get("scalars", "{}")).items():
        put(name, v)
    return {"state": state, "param_groups": json.loads(metadata.get("param_groups", "[]"))}


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    return dict(header.get("__metadata__") or {})


# ---------------------------------------------------------------------------------------------
# policy checks (pure)


def trusted_key_map(keys: Iterable[str], *, path=None) -> dict[str, str]:
    """fingerprint -> PEM of every trusted key."""
    out = {}
    for i, pem in enumerate(keys):
        try:
            out[signing.fingerprint(pem)] = pem
        except signing.SigningError as err:
            raise CheckpointRefused(path, f"trusted key #{i + 1} is unusable: {err}") from None
    return out


def signed_manifest(
    path: Path, signatures: Mapping[str, Path], trusted: Mapping[str, object], *, min_signatures: int
) -> tuple[signing.SignedManifest, list[str], list[str]]:
    """Sort a checkpoint's signatures into valid, invalid (by a trusted key, not verifying) and
    untrusted, and apply ``check_signature_set``; returns the agreed manifest, the trusted
    signers whose signatures verified, and the untrusted signers (present, not counted)."""
    valid: dict[str, signing.SignedManifest] = {}
    invalid: dict[str, str] = {}
    untrusted: list[str] = []
    for fp, sig_file in signatures.items():
        if fp not in trusted:
            untrusted.append(fp)
            continue
        try:
            valid[fp] = signing.read_signed_manifest(sig_file, trusted[fp])
        except signing.SigningError as err:
            invalid[fp] = str(err)
    manifest = check_signature_set(
        path, valid=valid, invalid=invalid, untrusted=untrusted, trusted=trusted, min_signatures=min_signatures
    )
    return manifest, sorted(valid), untrusted


def check_signature_set(
    path,
    *,
    valid: Mapping[str, signing.SignedManifest],
    invalid: Mapping[str, str],
    untrusted: Sequence[str],
    trusted: Iterable[str],
    min_signatures: int,
) -> signing.SignedManifest:
    """Decide on the signatures of one checkpoint; return the manifest they agree on.

    valid: trusted fingerprint -> manifest of a signature that verified; invalid: trusted
    fingerprint -> why its signature did not; untrusted: fingerprints of signatures by keys
    the spec does not trust (ignored, never counted).
    """
    trusted = sorted(trusted)
    if invalid:
        # A bad signature in a trusted key's name means the directory was tampered with or
        # damaged; the other signatures do not vouch for whoever wrote it.
        fp, why = sorted(invalid.items())[0]
        raise CheckpointRefused(path, f"signatures/{fp}.sig: invalid signature for trusted key {fp}: {why}")
    if len(valid) < min_signatures:
        detail = [f"signatures/{fp}.sig is by key {fp}, which is not trusted" for fp in untrusted]
        trusted_txt = ", ".join(trusted) if trusted else "none"
        raise CheckpointRefused(
            path,
            f"{len(valid)} valid signature(s) from trusted keys, {min_signatures} required"
            + (f" (signed by {', '.join(sorted(valid))})" if valid else "")
            + ("; " + "; ".join(detail) if detail else "")
            + f"; trusted keys: {trusted_txt}",
        )
    items = sorted(valid.items())
    first_fp, first = items[0]
    for fp, other in items[1:]:
        if other.files != first.files:
            diff = signing.compare_files(first.files, other.files)
            raise CheckpointRefused(
                path,
                f"signatures disagree: key {fp} signs different files than key "
                f"{first_fp} ({diff[0]}, taking {first_fp}'s as the reference)",
            )
    return first


def check_file_set(path, signed: Mapping[str, str], content: Sequence[str], stray: Sequence[str] = ()) -> None:
    """The signed files are exactly a v1 checkpoint's, and exactly the files present."""
    if stray:
        raise CheckpointRefused(
            path, f"unexpected file(s) in signatures/: {', '.join(stray)} (only <fingerprint>.sig files belong there)"
        )
    for name in REQUIRED_FILES:
        if name not in signed:
            raise CheckpointRefused(path, f"the signature does not cover {name}, which every checkpoint has")
    unknown = sorted(set(signed) - set(CHECKPOINT_FILES))
    if unknown:
        raise CheckpointRefused(
            path,
            f"signed file(s) {', '.join(unknown)} are not part of a checkpoint "
            f"(format {CHECKPOINT_FORMAT_VERSION} holds {', '.join(CHECKPOINT_FILES)})",
        )
    present = set(content)
    extra = sorted(present - set(signed))
    if extra:
        raise CheckpointRefused(path, f"extra unsigned file(s): {', '.join(extra)}")
    missing = sorted(set(signed) - present)
    if missing:
        raise CheckpointRefused(path, f"signed file(s) missing: {', '.join(missing)}")


def check_digest(path, name: str, signed: Mapping[str, str], actual_sha256: str, size: Optional[int] = None) -> None:
    if signed[name] != actual_sha256:
        size_txt = f", {size} bytes" if size is not None else ""
        raise CheckpointRefused(
            path,
            f"{name}: content does not match the signed digest (signed sha256 "
            f"{signed[name]}, file has {actual_sha256}{size_txt}): the file was "
            "modified, truncated or replaced",
        )


def check_meta(
    path,
    meta: CheckpointMeta,
    spec: Optional[RunSpec],
    *,
    expected_stage: Optional[int] = None,
    held_step: Optional[int] = None,
) -> None:
    if spec is not None:
        if meta.spec_digest != spec.digest():
            raise CheckpointRefused(
                path,
                f"{META_FILE}: spec_digest is {meta.spec_digest} but the spec's digest is "
                f"{spec.digest()} (a checkpoint of another spec)",
            )
        if meta.run_id != spec.run_id:
            raise CheckpointRefused(path, f"{META_FILE}: run_id is {meta.run_id!r}, expected {spec.run_id!r}")
        if meta.stage >= spec.num_stages:
            raise CheckpointRefused(
                path,
                f"{META_FILE}: stage is {meta.stage} but the spec has {spec.num_stages} "
                f"stage(s) (0..{spec.num_stages - 1})",
            )
    if expected_stage is not None and meta.stage != expected_stage:
        raise CheckpointRefused(path, f"{META_FILE}: stage is {meta.stage}, expected {expected_stage}")
    if held_step is not None and meta.step < held_step:
        raise CheckpointRefused(
            path, f"{META_FILE}: step is {meta.step}, older than the step already held ({held_step}): rollback refused"
        )


def check_tensors(
    path,
    name: str,
    tensors: Mapping[str, Any],
    expected_shapes: Optional[Mapping[str, Sequence[int]]] = None,
) -> None:
    """Names and shapes as expected (when given) and every floating-point value finite."""
    import torch

    if expected_shapes is not None:
        missing = sorted(set(expected_shapes) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected_shapes))
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing tensor(s) {', '.join(missing)}")
            if unexpected:
                parts.append(f"unexpected tensor(s) {', '.join(unexpected)}")
            raise CheckpointRefused(path, f"{name}: " + "; ".join(parts))
        for key, shape in expected_shapes.items():
            if tuple(tensors[key].shape) != tuple(shape):
                raise CheckpointRefused(
                    path, f"{name}: tensor {key} has shape {tuple(tensors[key].shape)}, expected {tuple(shape)}"
                )
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        shown = ", ".join(sorted(bad)[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CheckpointRefused(path, f"{name}: non-finite values (NaN or inf) in {shown}")


# ---------------------------------------------------------------------------------------------
# verification


@dataclasses.dataclass(frozen=True)
class VerifiedCheckpoint:
    """A checkpoint that passed every check; the only holder of its tensors."""

    path: Path
    meta: CheckpointMeta
    manifest_digest: str
    files: Mapping[str, str]  # name -> sha256, as signed
    total_bytes: int
    signers: tuple[str, ...]  # trusted fingerprints whose signatures verified
    untrusted_signers: tuple[str, ...]  # signatures present but not counted
    tensors_loaded: bool
    _model_state: Optional[dict] = dataclasses.field(default=None, repr=False)
    _optimizer_state: Optional[dict] = dataclasses.field(default=None, repr=False)

    @property
    def has_optimizer(self) -> bool:
        return OPTIMIZER_FILE in self.files

    @property
    def model_state(self) -> dict:
        if self._model_state is None:
            raise RuntimeError(
                f"{self.path} was verified without loading its tensors; "
                "verify it again with load_tensors=True to get them"
            )
        return self._model_state

    @property
    def optimizer_state(self) -> Optional[dict]:
        """The optimizer state dict, or None when the checkpoint has none or it was not loaded."""
        return self._optimizer_state

    def announcement(self) -> CheckpointAnnouncement:
        """How this checkpoint is announced in the DHT."""
        return CheckpointAnnouncement(
            stage=self.meta.stage,
            step=self.meta.step,
            manifest_digest=self.manifest_digest,
            signers=tuple(self.signers),
            files=len(self.files),
            total_bytes=self.total_bytes,
        )

    def to_record(self) -> dict:
        """The DHT value announcing this checkpoint under its stage's subkey
        (``protocol.records.CheckpointRecordModel``: the announcement less its stage)."""
        record = self.announcement().to_record()
        del record["stage"]
        return record


def _read_verified(directory: Path, name: str, signed: Mapping[str, str]) -> bytes:
    try:
        data = (directory / name).read_bytes()
    except OSError as err:
        raise CheckpointRefused(directory, f"{name}: cannot read ({err.strerror})") from None
    check_digest(directory, name, signed, hashlib.sha256(data).hexdigest(), len(data))
    return data


def _check_streamed(directory: Path, name: str, signed: Mapping[str, str]) -> int:
    p = directory / name
    try:
        digest, size = signing.sha256_file(p), p.stat().st_size
    except OSError as err:
        raise CheckpointRefused(directory, f"{name}: cannot read ({err.strerror})") from None
    check_digest(directory, name, signed, digest, size)
    return size


def _parse_safetensors(directory: Path, name: str, data: bytes) -> dict:
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as err:  # SafetensorError, or a header that is not JSON
        raise CheckpointRefused(directory, f"{name}: not a loadable safetensors file ({err})") from None


def verify_checkpoint(
    directory: Union[str, Path],
    spec: Optional[RunSpec],
    *,
    trusted_keys: Optional[Iterable[str]] = None,
    min_signatures: Optional[int] = None,
    held_step: Optional[int] = None,
    expected_stage: Optional[int] = None,
    expected_shapes: Optional[Mapping[str, Sequence[int]]] = None,
    load_tensors: bool = True,
    load_optimizer: bool = True,
) -> VerifiedCheckpoint:
    """Check a checkpoint directory completely; raise ``CheckpointRefused`` saying why not.

    ``trusted_keys`` (PEM) and ``min_signatures`` default to the spec's ``trust`` section.
    ``spec`` may be None only with explicit ``trusted_keys``: then the spec digest, run id and
    stage range are not checked. ``expected_shapes`` (HF name -> shape) checks the model
    tensors' names and shapes. With ``load_tensors=False`` the large files are only hashed
    (for listing and pruning) and the result holds no tensors.
    """
    directory = Path(directory)
    if spec is None and trusted_keys is None:
        raise CheckpointRefused(directory, "no trusted keys: give a spec or explicit trusted keys")
    keys = tuple(trusted_keys) if trusted_keys is not None else spec.trust.trusted_keys
    trusted = trusted_key_map(keys, path=directory)
    if not trusted:
        raise CheckpointRefused(
            directory,
            "no trusted keys: the spec's trust.trusted_keys is empty and none were "
            "given, so no signature can be trusted",
        )
    needed = min_signatures if min_signatures is not None else (spec.trust.min_signatures if spec else 1)
    if needed < 1:
        raise ValueError(f"min_signatures must be at least 1, got {needed}")

    try:
        listing = signing.list_signed_dir(directory)
    except signing.SigningError as err:
        raise CheckpointRefused(directory, str(err)) from None
    if not listing.signatures:
        raise CheckpointRefused(
            directory,
            "no signature: signatures/<fingerprint>.sig is missing (an unsigned or incompletely written checkpoint)",
        )

    manifest, signers, untrusted = signed_manifest(directory, listing.signatures, trusted, min_signatures=needed)
    signed = dict(manifest.files)
    check_file_set(directory, signed, listing.content, listing.stray)

    # checkpoint.json first: it is small, and a wrong spec or an old step is refused before
    # gigabytes of weights are hashed.
    meta_bytes = _read_verified(directory, META_FILE, signed)
    meta = parse_meta(meta_bytes, directory)
    check_meta(directory, meta, spec, expected_stage=expected_stage, held_step=held_step)
    total = len(meta_bytes)

    model_state = optimizer_state = None
    if load_tensors:
        data = _read_verified(directory, MODEL_FILE, signed)
        total += len(data)
        model_state = _parse_safetensors(directory, MODEL_FILE, data)
        del data
        check_tensors(directory, MODEL_FILE, model_state, expected_shapes)
    else:
        total += _check_streamed(directory, MODEL_FILE, signed)

    if OPTIMIZER_FILE in signed:
        if load_tensors and load_optimizer:
            data = _read_verified(directory, OPTIMIZER_FILE, signed)
            total += len(data)
            flat = _parse_safetensors(directory, OPTIMIZER_FILE, data)
            check_tensors(directory, OPTIMIZER_FILE, flat)
            try:
                optimizer_state = optimizer_state_from_tensors(flat, _safetensors_metadata(data))
            except (ValueError, json.JSONDecodeError) as err:
                raise CheckpointRefused(directory, f"{OPTIMIZER_FILE}: {err}") from None
            del data
        else:
            total += _check_streamed(directory, OPTIMIZER_FILE, signed)

    return VerifiedCheckpoint(
        path=directory,
        meta=meta,
        manifest_digest=manifest_digest(signed),
        files=signed,
        total_bytes=total,
        signers=tuple(signers),
        untrusted_signers=tuple(untrusted),
        tensors_loaded=load_tensors,
        _model_state=model_state,
        _optimizer_state=optimizer_state,
    )
