"""Signed stage checkpoints with other processes: the stock model-signing CLI verifies one and
detects tampering, and a writer killed before its rename leaves nothing a reader takes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from peer.checkpoints.store import CheckpointStore, list_checkpoints

from checkpoint_helpers import flip_byte, trained_stage, write_signed
from conftest import spec_trusting

MODEL_SIGNING = Path(sys.executable).parent / "model_signing"


REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def spec(keys):
    return spec_trusting(keys, "a", "b")


@pytest.fixture
def ckpt(tmp_path, spec, keys):
    """A checkpoint of stage 0, step 5, signed by trusted key a, for the test to tamper with."""
    module, opt = trained_stage(spec, 0)
    return write_signed(tmp_path / "ckpt", spec, module, opt, keys).path


def test_stock_cli_verifies_a_checkpoint_and_detects_tampering(ckpt, keys):
    _, pub, fp = keys["a"]
    sig = ckpt / "signatures" / f"{fp}.sig"
    cmd = [str(MODEL_SIGNING), "verify", "key", str(ckpt), "--signature", str(sig), "--public_key", str(pub)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    flip_byte(ckpt / "model.safetensors")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "model.safetensors" in r.stderr


def test_hard_crash_mid_write(tmp_path, spec, keys):
    """A process killed between writing and rename (no cleanup runs): the temporary directory
    stays, holding a complete-looking checkpoint, and every reader ignores it."""
    root = tmp_path / "store"
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from peer.checkpoints import store as cs
        from peer.model.llama import LlamaStage
        from protocol.spec import spec_from_json
        spec = spec_from_json({spec.canonical_json()!r})
        cs._publish = lambda tmp, target: os._exit(9)
        store = cs.CheckpointStore({str(root)!r}, spec, key_paths=[{str(keys["a"][0])!r}])
        store.save(0, 7, LlamaStage.from_spec(spec, 0).state_dict())
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 9, r.stderr
    stage_dir = root / "stage-0"
    leftovers = list(stage_dir.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".tmp-step-0000000007-")
    inner = leftovers[0] / "step-0000000007"
    assert (inner / "checkpoint.json").is_file() and list((inner / "signatures").glob("*.sig"))
    assert list_checkpoints(root) == []
    store = CheckpointStore(root, spec, key_paths=[keys["a"][0]], stale_temp_s=0)
    assert store.list() == [] and store.latest_verified(0) is None
    store.prune(0)
    assert list(stage_dir.iterdir()) == []  # stale temporary directories are swept
