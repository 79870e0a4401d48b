"""``swarmtrain checkpoint`` with other processes: a checkpoint it signs verifies with the stock
model-signing CLI, and the installed entry point verifies and signs in a subprocess."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from peer.checkpoints.store import write_checkpoint
from peer.cli.main import main
from peer.model.llama import LlamaStage
from protocol import signing
from protocol.spec import load_spec

SWARMTRAIN = Path(sys.executable).parent / "swarmtrain"


MODEL_SIGNING = Path(sys.executable).parent / "model_signing"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Two keys (a trusted by the spec, b not), a spec file, one signed checkpoint per stage."""
    d = tmp_path_factory.mktemp("cli")
    for name in ("a", "b"):
        r = run("keygen", d / f"{name}.pem")
        assert r.exit_code == 0, r.output
    r = run("spec", "init", d / "spec.toml", "--preset", "tiny", "--stages", "2", "--trusted-key", d / "a.pub")
    assert r.exit_code == 0, r.output
    spec = load_spec(d / "spec.toml")
    stages = [LlamaStage.from_spec(spec, k) for k in range(spec.num_stages)]
    with torch.no_grad():  # away from the deterministic init, so the export is checked for real
        g = torch.Generator().manual_seed(1)
        for s in stages:
            for p in s.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    ckpts = []
    for k, s in enumerate(stages):
        ckpts.append(
            write_checkpoint(
                d / "ckpt" / f"stage-{k}",
                spec=spec,
                stage=k,
                step=12,
                tokens_seen=4096,
                model_state=s.state_dict(),
                key_paths=[d / "a.pem"],
            ).path
        )
    return dict(
        dir=d,
        spec=spec,
        spec_path=d / "spec.toml",
        stages=stages,
        ckpts=ckpts,
        a=d / "a.pem",
        a_pub=d / "a.pub",
        b=d / "b.pem",
        b_pub=d / "b.pub",
        fp_a=signing.fingerprint((d / "a.pub").read_text()),
        fp_b=signing.fingerprint((d / "b.pub").read_text()),
    )


@pytest.fixture
def ckpt(env, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(env["ckpts"][0], d)
    return d


def test_sign_then_stock_cli(env, ckpt):
    shutil.rmtree(ckpt / "signatures")
    r = run("checkpoint", "sign", ckpt, "--key", env["a"])
    assert r.exit_code == 0, r.output
    stock = next(line for line in r.output.splitlines() if "model_signing verify key" in line)
    argv = stock.split(": ", 1)[1].split()
    p = subprocess.run([str(MODEL_SIGNING), *argv[1:]], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    (ckpt / "extra.bin").write_bytes(b"x")
    p = subprocess.run([str(MODEL_SIGNING), *argv[1:]], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0


def test_entry_point_subprocess(env, ckpt):
    assert SWARMTRAIN.exists(), SWARMTRAIN
    ok = subprocess.run(
        [str(SWARMTRAIN), "checkpoint", "verify", str(ckpt), "--spec", str(env["spec_path"])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    (ckpt / "model.safetensors").unlink()
    bad = subprocess.run(
        [str(SWARMTRAIN), "checkpoint", "verify", str(ckpt), "--spec", str(env["spec_path"])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1 and "signed file(s) missing: model.safetensors" in bad.stderr
