"""Signed stage checkpoints with other processes: the stock model-signing CLI verifies one and
detects tampering, and a writer killed before its rename leaves nothing a reader takes."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from peer.checkpoints.store import CheckpointStore, list_checkpoints, write_checkpoint
from peer.model.llama import LlamaStage
from protocol import signing
from protocol.spec import preset_spec

MODEL_SIGNING = Path(sys.executable).parent / "model_signing"


REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return {name: signing.write_keypair(d / f"{name}.pem") for name in ("a", "b", "mallory")}


def _pub(keys, name) -> str:
    return keys[name][1].read_text()


@pytest.fixture(scope="module")
def spec(keys):
    return preset_spec("tiny", stages=2, trusted_keys=(_pub(keys, "a"), _pub(keys, "b")))


def _trained_stage(spec, stage: int, seed: int = 0):
    """A stage after one AdamW step, so the optimizer state is real."""
    torch.manual_seed(seed)
    module = LlamaStage.from_spec(spec, stage)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    x = torch.randint(0, spec.model.vocab_size, (2, 8)) if stage == 0 else torch.randn(2, 8, spec.model.hidden_size)
    module(x).float().pow(2).mean().backward()
    opt.step()
    return module, opt


@pytest.fixture(scope="module")
def stage0(spec):
    return _trained_stage(spec, 0)


def _write(target, spec, stage_module, opt, keys, signers=("a",), *, step=5, stage=0, **kw):
    return write_checkpoint(
        target,
        spec=spec,
        stage=stage,
        step=step,
        tokens_seen=1000 * step,
        model_state=stage_module.state_dict(),
        optimizer_state=None if opt is None else opt.state_dict(),
        key_paths=[keys[s][0] for s in signers],
        **kw,
    )


@pytest.fixture(scope="module")
def good(tmp_path_factory, spec, stage0, keys):
    """A pristine checkpoint of stage 0, step 5, signed by trusted key a; tests copy it."""
    module, opt = stage0
    return _write(tmp_path_factory.mktemp("good") / "step-5", spec, module, opt, keys)


@pytest.fixture
def ckpt(good, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(good.path, d)
    return d


def _flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_stock_cli_verifies_a_checkpoint_and_detects_tampering(ckpt, keys):
    _, pub, fp = keys["a"]
    sig = ckpt / "signatures" / f"{fp}.sig"
    cmd = [str(MODEL_SIGNING), "verify", "key", str(ckpt), "--signature", str(sig), "--public_key", str(pub)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    _flip_byte(ckpt / "model.safetensors")
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
