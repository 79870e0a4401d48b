"""Keys and directory signatures (protocol.signing), with real keys and real model-signing."""

from __future__ import annotations

import hashlib
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from protocol import signing
from protocol.checkpoint import manifest_digest


def test_keypair_files_modes_and_fingerprint(tmp_path):
    priv, pub, fp = signing.write_keypair(tmp_path / "k.pem")
    assert priv == tmp_path / "k.pem" and pub == tmp_path / "k.pub"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(priv.read_bytes(), None)
    assert isinstance(key.curve, ec.SECP256R1)
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert fp == hashlib.sha256(der).hexdigest()[:16]
    assert (
        signing.fingerprint(pub.read_text()) == fp == signing.fingerprint(key) == signing.fingerprint(key.public_key())
    )
    assert not list(tmp_path.glob(".tmp-*"))


def test_keypair_refuses_overwrite_unless_forced(tmp_path):
    _, pub, fp = signing.write_keypair(tmp_path / "k.pem")
    with pytest.raises(FileExistsError, match="--force"):
        signing.write_keypair(tmp_path / "k.pem")
    assert signing.fingerprint(pub.read_text()) == fp  # untouched
    _, _, fp2 = signing.write_keypair(tmp_path / "k.pem", force=True)
    assert fp2 != fp and signing.fingerprint(pub.read_text()) == fp2
    assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o600


def test_public_key_name_without_pem_suffix(tmp_path):
    priv, pub, _ = signing.write_keypair(tmp_path / "signer")
    assert pub == tmp_path / "signer.pub"


def test_rejects_other_curves_and_non_keys(tmp_path):
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(signing.SigningError, match="P-256"):
        signing.load_public_key(signing.public_key_pem(p384))
    path = tmp_path / "p384.pem"
    path.write_bytes(
        p384.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    with pytest.raises(signing.SigningError, match="secp384r1"):
        signing.load_private_key(path)
    with pytest.raises(signing.SigningError, match="not a PEM public key"):
        signing.load_public_key("-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----\n")


def test_sign_and_read_manifest(keys, model_dir):
    priv, pub, fp = keys["a"]
    sig = signing.sign_dir(model_dir, priv)
    assert sig == model_dir / "signatures" / f"{fp}.sig"
    m = signing.read_signed_manifest(sig, pub.read_text())
    expected = {
        n: hashlib.sha256((model_dir / n).read_bytes()).hexdigest()
        for n in ("weights.bin", "config.json", "sub/extra.txt")
    }
    assert dict(m.files) == expected  # the signatures directory is not part of it
    assert "signatures" in m.ignore_paths and m.model_name == "model"
    listing = signing.list_signed_dir(model_dir)
    assert listing.content == tuple(sorted(expected)) and list(listing.signatures) == [fp]
    assert signing.compare_files(m.files, signing.hash_files(model_dir, listing.content)) == []


def test_wrong_key_and_garbage_signature(keys, model_dir):
    priv = keys["a"][0]
    _, pub_b, fp_b = keys["b"]
    sig = signing.sign_dir(model_dir, priv)
    with pytest.raises(signing.SigningError, match=f"does not verify with key {fp_b}"):
        signing.read_signed_manifest(sig, pub_b.read_text())
    sig.write_text("{not json")
    with pytest.raises(signing.SigningError, match="not a model-signing signature bundle"):
        signing.read_signed_manifest(sig, pub_b.read_text())


def test_forged_payload_fails(keys, model_dir):
    import base64
    import json

    priv, pub, _ = keys["a"]
    sig = signing.sign_dir(model_dir, priv)
    bundle = json.loads(sig.read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    statement["predicate"]["resources"][0]["digest"] = "00" * 32
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    sig.write_text(json.dumps(bundle))
    with pytest.raises(signing.SigningError):
        signing.read_signed_manifest(sig, pub.read_text())


def test_resign_replaces_and_cosign_adds(keys, model_dir):
    (priv_a, _, fp_a), (priv_b, _, fp_b) = keys["a"], keys["b"]
    signing.sign_dir(model_dir, priv_a)
    signing.sign_dir(model_dir, priv_a)
    signing.sign_dir(model_dir, priv_b)
    assert sorted(p.name for p in (model_dir / "signatures").iterdir()) == sorted([f"{fp_a}.sig", f"{fp_b}.sig"])


def test_symlink_refused(keys, model_dir):
    priv = keys["a"][0]
    (model_dir / "link").symlink_to(model_dir / "config.json")
    with pytest.raises(signing.SigningError, match="symbolic link"):
        signing.sign_dir(model_dir, priv)


def test_list_signed_dir_strays_and_temp(keys, model_dir):
    priv, _, fp = keys["a"]
    signing.sign_dir(model_dir, priv)
    (model_dir / "signatures" / ".tmp-abc-1234.sig").write_text("partial")
    (model_dir / "signatures" / "README").write_text("?")
    listing = signing.list_signed_dir(model_dir)
    assert list(listing.signatures) == [fp]
    assert listing.stray == ("signatures/README",)


def test_manifest_digest_stable_and_name_sensitive():
    a = {"x": "11" * 32, "y": "22" * 32}
    assert manifest_digest(a) == manifest_digest(dict(reversed(list(a.items()))))
    assert manifest_digest(a) != manifest_digest({"x": "22" * 32, "y": "11" * 32})
    assert manifest_digest(a) != manifest_digest({"x2": "11" * 32, "y": "22" * 32})
    assert len(manifest_digest(a)) == 64
