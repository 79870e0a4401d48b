"""Signing keys and directory signatures in the OpenSSF Model Signing format.

Keys are ECDSA P-256 (PEM: PKCS#8 private, SubjectPublicKeyInfo public). A key is named by its
fingerprint, the first 16 hex digits of the SHA-256 of its DER public key; the spec's trusted
keys and the signature file names use it.

A signed directory keeps one signature per signer in ``signatures/<fingerprint>.sig``: a
Sigstore bundle (DSSE envelope, in-toto statement) written by the ``model-signing`` package
over the SHA-256 of every other file. The signed manifest records ``signatures`` as an ignored
path, so the stock CLI verifies the layout as it is::

    model_signing verify key DIR --signature DIR/signatures/<fingerprint>.sig --public_key KEY.pub

Everything here is offline: keys only, no Sigstore, no transparency log.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import secrets
import tempfile
from pathlib import Path
from typing import Mapping, Optional, Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

SIGNATURES_DIR = "signatures"
SIGNATURE_SUFFIX = ".sig"
TEMP_PREFIX = ".tmp-"
FINGERPRINT_RE = re.compile(r"^[0-9a-f]{16}$")
_CHUNK = 1 << 20

PublicKeyLike = Union[str, bytes, ec.EllipticCurvePublicKey]


class SigningError(ValueError):
    """A key or signature that cannot be used; the message names the file and the reason."""


# ---------------------------------------------------------------------------------------------
# keys


def _check_p256(key, what: str) -> None:
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        raise SigningError(f"{what}: not an elliptic-curve key (swarmtrain uses ECDSA P-256)")
    if not isinstance(key.curve, ec.SECP256R1):
        raise SigningError(f"{what}: an EC key on curve {key.curve.name}, but swarmtrain uses ECDSA P-256 (secp256r1)")


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted like an ssh key: the file mode (0600) protects it, and signing must be unattended.
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_pem(key: Union[ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey]) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        key = key.public_key()
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def load_public_key(key: PublicKeyLike, *, what: str = "public key") -> ec.EllipticCurvePublicKey:
    """A P-256 public key from PEM text or bytes (or a key object, checked and returned)."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        _check_p256(key, what)
        return key
    data = key.encode() if isinstance(key, str) else bytes(key)
    try:
        loaded = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as err:
        raise SigningError(f"{what}: not a PEM public key ({err})") from None
    _check_p256(loaded, what)
    return loaded


def load_public_key_file(path: Union[str, Path]) -> ec.EllipticCurvePublicKey:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SigningError(f"cannot read public key {path}: {err.strerror}") from None
    return load_public_key(data, what=str(path))


def load_private_key(path: Union[str, Path], password: Optional[bytes] = None) -> ec.EllipticCurvePrivateKey:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SigningError(f"cannot read private key {path}: {err.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password)
    except TypeError as err:
        # cryptography says TypeError both for "needs a password" and "password given, none needed".
        raise SigningError(f"{path}: {err}") from None
    except ValueError as err:
        raise SigningError(f"{path}: not a usable PEM private key ({err})") from None
    _check_p256(key, str(path))
    return key


def fingerprint(key: Union[PublicKeyLike, ec.EllipticCurvePrivateKey]) -> str:
    """First 16 hex digits of SHA-256 over the DER SubjectPublicKeyInfo."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        key = key.public_key()
    public = load_public_key(key)
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


def sign_message(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    """ECDSA P-256 over SHA-256 of ``message`` (DER): for small records, not directories."""
    _check_p256(key, "signing key")
    return key.sign(message, ec.ECDSA(hashes.SHA256()))


def verify_message(key: PublicKeyLike, message: bytes, signature: bytes) -> bool:
    try:
        load_public_key(key).verify(bytes(signature), message, ec.ECDSA(hashes.SHA256()))
        return True
    except (InvalidSignature, ValueError, SigningError):
        return False


def public_key_path_for(private_path: Union[str, Path]) -> Path:
    """``key.pem`` -> ``key.pub``; any other name gets ``.pub`` appended."""
    private_path = Path(private_path)
    if private_path.suffix == ".pem":
        return private_path.with_suffix(".pub")
    return private_path.with_name(private_path.name + ".pub")


def _write_file_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}-{secrets.token_hex(4)}")
    # O_EXCL with the final mode: the secret is never readable by others, not even briefly.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # the umask may have removed bits we want (0644 pub)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_keypair(private_path: Union[str, Path], *, force: bool = False) -> tuple[Path, Path, str]:
    """Generate a key; write it (mode 0600) and its public key. Returns (private, public, fingerprint)."""
    private_path = Path(private_path)
    public_path = public_key_path_for(private_path)
    if not force:
        for p in (private_path, public_path):
            if p.exists() or p.is_symlink():
                raise FileExistsError(f"{p} exists; pass --force to overwrite it")
    key = generate_private_key()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    _write_file_atomic(private_path, private_key_pem(key), 0o600)
    _write_file_atomic(public_path, public_key_pem(key).encode(), 0o644)
    return private_path, public_path, fingerprint(key)


# ---------------------------------------------------------------------------------------------
# files


def fsync_dir(path: Union[str, Path]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Union[str, Path]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class DirListing:
    """What a signed directory holds: content files (signed) and signature files (not signed)."""

    content: tuple[str, ...]  # POSIX paths relative to the directory, sorted
    signatures: Mapping[str, Path]  # fingerprint -> signature file
    stray: tuple[str, ...]  # entries of signatures/ that are neither <fingerprint>.sig nor .tmp-*


def list_signed_dir(directory: Union[str, Path]) -> DirListing:
    """Walk a directory without following links; a symlink or special file is an error,
    since what is signed must be exactly what is read back."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SigningError(f"{directory} is not a directory")
    content: list[str] = []
    signatures: dict[str, Path] = {}
    stray: list[str] = []
    for root, dirs, files in os.walk(directory, followlinks=False):
        rel_root = Path(root).relative_to(directory)
        for name in list(dirs):
            if (Path(root) / name).is_symlink():
                raise SigningError(f"{directory}: {(rel_root / name).as_posix()} is a symbolic link")
        in_sigs = rel_root.parts[:1] == (SIGNATURES_DIR,)
        for name in files:
            full = Path(root) / name
            rel = (rel_root / name).as_posix()
            if full.is_symlink():
                raise SigningError(f"{directory}: {rel} is a symbolic link")
            if not full.is_file():
                raise SigningError(f"{directory}: {rel} is not a regular file")
            if not in_sigs:
                content.append(rel)
                continue
            stem = name[: -len(SIGNATURE_SUFFIX)] if name.endswith(SIGNATURE_SUFFIX) else None
            if rel_root == Path(SIGNATURES_DIR) and stem is not None and FINGERPRINT_RE.match(stem):
                signatures[stem] = full
            elif not name.startswith(TEMP_PREFIX):  # a signer that crashed mid-write
                stray.append(rel)
    return DirListing(tuple(sorted(content)), dict(sorted(signatures.items())), tuple(sorted(stray)))


def hash_files(directory: Union[str, Path], names) -> dict[str, str]:
    directory = Path(directory)
    return {name: sha256_file(directory / name) for name in names}


# ---------------------------------------------------------------------------------------------
# signing and verifying


def signature_path(directory: Union[str, Path], key_fingerprint: str) -> Path:
    return Path(directory) / SIGNATURES_DIR / f"{key_fingerprint}{SIGNATURE_SUFFIX}"


def stock_verify_command(
    directory: Union[str, Path], key_fingerprint: str, public_key_file: Union[str, Path]
) -> list[str]:
    """The stock ``model_signing`` command line that checks one signature of a directory."""
    return [
        "model_signing",
        "verify",
        "key",
        str(directory),
        "--signature",
        str(signature_path(directory, key_fingerprint)),
        "--public_key",
        str(public_key_file),
    ]


def sign_dir(
    directory: Union[str, Path], private_key_path: Union[str, Path], *, password: Optional[bytes] = None
) -> Path:
    """Sign every file of ``directory`` except ``signatures/``; write ``signatures/<fp>.sig``.

    Re-signing with the same key replaces that key's signature; other signatures are kept.
    """
    import model_signing

    directory = Path(directory)
    key = load_private_key(private_key_path, password)
    fp = fingerprint(key)
    listing = list_signed_dir(directory)  # refuses symlinks before model-signing sees them
    if not listing.content:
        raise SigningError(f"{directory}: nothing to sign (no files outside {SIGNATURES_DIR}/)")
    sig_dir = directory / SIGNATURES_DIR
    sig_dir.mkdir(exist_ok=True)
    final = signature_path(directory, fp)
    # Inside signatures/, so excluded from the manifest even while being written.
    tmp = sig_dir / f"{TEMP_PREFIX}{fp}-{secrets.token_hex(4)}{SIGNATURE_SUFFIX}"
    # Only signatures/ is ignored (not .git & co.): every other file is part of the checkpoint.
    hashing_config = model_signing.hashing.Config().set_ignored_paths(paths=[SIGNATURES_DIR], ignore_git_paths=False)
    try:
        (
            model_signing.signing.Config()
            .use_elliptic_key_signer(private_key=Path(private_key_path), password=password)
            .set_hashing_config(hashing_config)
            .sign(directory, tmp)
        )
        fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(sig_dir)
    return final


@dataclasses.dataclass(frozen=True)
class SignedManifest:
    """The content of a signature whose envelope verified: file name -> SHA-256 (hex)."""

    files: Mapping[str, str]
    ignore_paths: tuple[str, ...]
    model_name: str


def read_signed_manifest(signature_file: Union[str, Path], public_key: PublicKeyLike) -> SignedManifest:
    """Check one signature's envelope against ``public_key`` and return what it signs.

    This checks the signature, not the files: compare ``files`` with the directory afterwards
    (``verify_files``). Raises ``SigningError`` saying why the signature is not valid.
    """
    from model_signing._signing import sign_ec_key, sign_sigstore_pb

    signature_file = Path(signature_file)
    pem = public_key_pem(load_public_key(public_key))
    # model-signing's key verifier only takes a path; a public key on disk is harmless.
    with tempfile.NamedTemporaryFile("w", suffix=".pub", prefix="swarmtrain-") as f:
        f.write(pem)
        f.flush()
        verifier = sign_ec_key.Verifier(Path(f.name))
    try:
        bundle = sign_sigstore_pb.Signature.read(signature_file)
    except Exception as err:  # JSON, protobuf and key errors alike mean "not a bundle"
        raise SigningError(
            f"{signature_file}: not a model-signing signature bundle ({type(err).__name__}: {err})"
        ) from None
    try:
        manifest = verifier.verify(bundle)
    except Exception as err:  # InvalidSignature carries no message
        detail = str(err) or "the ECDSA signature does not match the signed statement"
        raise SigningError(
            f"{signature_file}: signature does not verify with key {fingerprint(pem)}: {detail}"
        ) from None
    params = manifest.serialization_type
    if params.get("method") != "files":
        raise SigningError(
            f"{signature_file}: signed with serialization method {params.get('method')!r}; "
            "swarmtrain checkpoints are signed per file ('files')"
        )
    files: dict[str, str] = {}
    for rd in manifest.resource_descriptors():
        if rd.digest.algorithm != "sha256":
            raise SigningError(
                f"{signature_file}: {rd.identifier} is signed with {rd.digest.algorithm}; "
                "swarmtrain checkpoints use sha256"
            )
        files[rd.identifier] = rd.digest.digest_hex
    return SignedManifest(
        files=files, ignore_paths=tuple(params.get("ignore_paths", ())), model_name=manifest.model_name
    )


def compare_files(signed: Mapping[str, str], actual: Mapping[str, str]) -> list[str]:
    """Every difference between signed and actual digests, one sentence each (empty: equal)."""
    problems = []
    for name in sorted(actual.keys() - signed.keys()):
        problems.append(f"{name}: extra file, not covered by the signature")
    for name in sorted(signed.keys() - actual.keys()):
        problems.append(f"{name}: signed file is missing")
    for name in sorted(signed.keys() & actual.keys()):
        if signed[name] != actual[name]:
            problems.append(
                f"{name}: content does not match the signature (signed sha256 {signed[name]}, file has {actual[name]})"
            )
    return problems
