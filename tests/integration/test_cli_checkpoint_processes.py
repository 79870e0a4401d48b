"""``swarmtrain checkpoint`` with other processes: a checkpoint it signs verifies with the stock
model-signing CLI, and the installed entry point verifies and signs in a subprocess."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoint_helpers import cli_env
from cli_helpers import run

SWARMTRAIN = Path(sys.executable).parent / "swarmtrain"


MODEL_SIGNING = Path(sys.executable).parent / "model_signing"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Two keys (a trusted by the spec, b not), a spec file, one signed checkpoint per stage."""
    return cli_env(tmp_path_factory.mktemp("cli"))


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
