"""A peer's identity: one RSA key that is both its libp2p identity (the peer id) and the key
that signs its DHT records, so that a record's owner is provably the peer it describes."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Optional

import multihash
from cryptography.hazmat.primitives import serialization
from hivemind.p2p import P2P, PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey


@dataclasses.dataclass
class Identity:
    path: Path
    private_key: RSAPrivateKey
    peer_id: PeerID
    ephemeral: bool = False

    def install_as_process_key(self) -> None:
        """hivemind's own signed records (optimizer progress) use the process-wide key: make
        it ours so that every record this peer writes is signed by its identity."""
        RSAPrivateKey._process_wide_key = self.private_key


def load_or_create_identity(path: Optional[str | Path]) -> Identity:
    """Load the identity at path, creating it (mode 0400) if missing. Without a path, a fresh
    identity lives in a temporary file: the peer gets a new id on every start."""
    ephemeral = path is None
    if ephemeral:
        path = Path(tempfile.mkdtemp(prefix="swarmtrain-id-")) / "identity.key"
    path = Path(path).expanduser()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        P2P.generate_identity(str(path))
    data = path.read_bytes()
    try:
        key_proto = crypto_pb2.PrivateKey.FromString(data)
        if key_proto.key_type != crypto_pb2.KeyType.RSA:
            raise ValueError("not an RSA key")
        der = serialization.load_der_private_key(key_proto.data, password=None)
    except Exception as err:
        raise ValueError(f"{path} is not a swarmtrain/hivemind identity file ({err})") from None
    private_key = RSAPrivateKey.__new__(RSAPrivateKey)
    private_key._private_key = der
    return Identity(path=path, private_key=private_key, peer_id=PeerID.from_identity(data), ephemeral=ephemeral)


def peer_id_of_ssh_public_key(ssh_public_key: bytes) -> str:
    """The libp2p peer id (base58) of an RSA public key in OpenSSH form, as found in the
    ``[owner:...]`` marker of a signed DHT subkey."""
    key = serialization.load_ssh_public_key(ssh_public_key)
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))
    return PeerID(digest).to_base58()


def cleanup_identity(identity: Identity) -> None:
    if identity.ephemeral:
        try:
            os.chmod(identity.path, 0o600)
            identity.path.unlink()
            identity.path.parent.rmdir()
        except OSError:
            pass
