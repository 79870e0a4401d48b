"""Directory signatures (protocol.signing) checked by the stock model-signing CLI, run as a process."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from protocol import signing

MODEL_SIGNING = Path(sys.executable).parent / "model_signing"


def _stock_verify(directory: Path, sig: Path, pub: Path, *extra: str) -> subprocess.CompletedProcess:
    assert MODEL_SIGNING.exists(), f"the stock CLI is missing: {MODEL_SIGNING}"
    return subprocess.run(
        [
            str(MODEL_SIGNING),
            "verify",
            "key",
            str(directory),
            "--signature",
            str(sig),
            "--public_key",
            str(pub),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_stock_cli_accepts_layout_and_detects_tampering(keys, model_dir):
    (priv, pub, fp), (priv_b, pub_b, _) = keys["a"], keys["b"]
    sig = signing.sign_dir(model_dir, priv)
    signing.sign_dir(model_dir, priv_b)  # a second signature in signatures/ must not disturb the first
    r = _stock_verify(model_dir, sig, pub)
    assert r.returncode == 0, r.stdout + r.stderr
    # The command swarmtrain prints is the same one.
    cmd = signing.stock_verify_command(model_dir, fp, pub)
    assert cmd[:3] == ["model_signing", "verify", "key"]
    r = subprocess.run([str(MODEL_SIGNING), *cmd[1:]], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    # Also with the ignored directory given explicitly (as older model-signing releases need).
    r = _stock_verify(model_dir, sig, pub, "--ignore-paths", str(model_dir / "signatures"))
    assert r.returncode == 0, r.stdout + r.stderr
    r = _stock_verify(model_dir, sig, pub_b)
    assert r.returncode != 0

    data = bytearray((model_dir / "weights.bin").read_bytes())
    data[100] ^= 1
    (model_dir / "weights.bin").write_bytes(bytes(data))
    r = _stock_verify(model_dir, sig, pub)
    assert r.returncode != 0 and "weights.bin" in r.stderr


def test_stock_cli_rejects_extra_file(keys, model_dir):
    priv, pub, _ = keys["a"]
    sig = signing.sign_dir(model_dir, priv)
    (model_dir / "added.txt").write_text("x")
    r = _stock_verify(model_dir, sig, pub)
    assert r.returncode != 0 and "added.txt" in r.stderr


def test_copy_of_signed_dir_still_verifies(keys, model_dir, tmp_path):
    """The directory name is informative only: a checkpoint moves between peers and paths."""
    priv, pub, _ = keys["a"]
    sig = signing.sign_dir(model_dir, priv)
    moved = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(model_dir, moved)
    r = _stock_verify(moved, moved / "signatures" / sig.name, pub)
    assert r.returncode == 0, r.stdout + r.stderr
