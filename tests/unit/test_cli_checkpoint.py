"""``swarmtrain keygen`` and ``swarmtrain checkpoint sign|verify|export``."""

from __future__ import annotations

import os
import shutil
import stat

import pytest
import torch

from peer.checkpoints.store import write_checkpoint
from peer.model.llama import chain_forward
from protocol import signing

from checkpoint_helpers import cli_env
from cli_helpers import run


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Two keys (a trusted by the spec, b not), a spec file, one signed checkpoint per stage."""
    return cli_env(tmp_path_factory.mktemp("cli"))


@pytest.fixture
def ckpt(env, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(env["ckpts"][0], d)
    return d


# ---------------------------------------------------------------------------------------------
# keygen


def test_keygen_mode_and_overwrite(tmp_path):
    r = run("keygen", tmp_path / "k.pem")
    assert r.exit_code == 0, r.output
    priv, pub = tmp_path / "k.pem", tmp_path / "k.pub"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert "BEGIN PRIVATE KEY" in priv.read_text() and "BEGIN PUBLIC KEY" in pub.read_text()
    fp = signing.fingerprint(pub.read_text())
    assert fp in r.output
    before = priv.read_bytes()
    r = run("keygen", tmp_path / "k.pem")
    assert r.exit_code != 0 and "exists" in r.output and "--force" in r.output
    assert priv.read_bytes() == before
    r = run("keygen", tmp_path / "k.pem", "--force")
    assert r.exit_code == 0 and priv.read_bytes() != before
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert signing.fingerprint(pub.read_text()) == signing.fingerprint(signing.load_private_key(priv))


def test_keygen_refuses_when_only_the_public_key_exists(tmp_path):
    (tmp_path / "k.pub").write_text("someone else's")
    r = run("keygen", tmp_path / "k.pem")
    assert r.exit_code != 0 and "k.pub exists" in r.output
    assert not (tmp_path / "k.pem").exists()


# ---------------------------------------------------------------------------------------------
# verify


def test_verify_ok_prints_summary(env):
    r = run("checkpoint", "verify", env["ckpts"][1], "--spec", env["spec_path"])
    assert r.exit_code == 0, r.output
    for text in (
        "run       swarm",
        "stage     1",
        "step      12",
        "tokens    4096",
        f"signers   {env['fp_a']}",
        f"spec      {env['spec'].digest()}",
    ):
        assert text in r.output


def test_verify_with_explicit_keys_and_no_spec(env):
    r = run("checkpoint", "verify", env["ckpts"][0], "--trusted-key", env["a_pub"])
    assert r.exit_code == 0 and "not checked" in r.output
    r = run("checkpoint", "verify", env["ckpts"][0], "--spec", env["spec_path"], "--trusted-key", env["b_pub"])
    assert r.exit_code == 1 and "0 valid signature" in r.output and env["fp_b"] in r.output
    r = run("checkpoint", "verify", env["ckpts"][0])
    assert r.exit_code == 1 and "--trusted-key" in r.output


@pytest.mark.parametrize("name", ["model.safetensors", "checkpoint.json"])
def test_verify_tampered_fails_with_reason(env, ckpt, name):
    data = bytearray((ckpt / name).read_bytes())
    data[-2] ^= 1
    (ckpt / name).write_bytes(bytes(data))
    r = run("checkpoint", "verify", ckpt, "--spec", env["spec_path"])
    assert r.exit_code == 1
    assert f"{name}: content does not match the signed digest" in r.output


def test_verify_rollback_and_stage(env):
    r = run("checkpoint", "verify", env["ckpts"][0], "--spec", env["spec_path"], "--held-step", 13)
    assert r.exit_code == 1 and "rollback refused" in r.output
    r = run("checkpoint", "verify", env["ckpts"][0], "--spec", env["spec_path"], "--stage", 1)
    assert r.exit_code == 1 and "stage is 0, expected 1" in r.output


def test_sign_cosign_and_min_signatures(env, ckpt):
    r = run(
        "checkpoint",
        "verify",
        ckpt,
        "--trusted-key",
        env["a_pub"],
        "--trusted-key",
        env["b_pub"],
        "--min-signatures",
        2,
    )
    assert r.exit_code == 1 and "1 valid signature(s) from trusted keys, 2 required" in r.output
    r = run("checkpoint", "sign", ckpt, "--key", env["b"])
    assert r.exit_code == 0, r.output
    assert f"signatures/{env['fp_b']}.sig" in r.output and "model_signing verify key" in r.output
    r = run(
        "checkpoint",
        "verify",
        ckpt,
        "--trusted-key",
        env["a_pub"],
        "--trusted-key",
        env["b_pub"],
        "--min-signatures",
        2,
    )
    assert r.exit_code == 0, r.output
    assert f"signers   {', '.join(sorted([env['fp_a'], env['fp_b']]))}" in r.output
    # b is not in the spec: counted only when trusted explicitly, listed as ignored otherwise.
    r = run("checkpoint", "verify", ckpt, "--spec", env["spec_path"])
    assert r.exit_code == 0 and f"ignored   {env['fp_b']}" in r.output


def test_sign_refuses_a_non_checkpoint(env, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "model.safetensors").write_bytes(b"")
    r = run("checkpoint", "sign", tmp_path / "x", "--key", env["a"])
    assert r.exit_code == 1 and "checkpoint.json missing" in r.output


# ---------------------------------------------------------------------------------------------
# export


def test_export_matches_the_pipeline(env, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    r = run("checkpoint", "export", *env["ckpts"], "--out", out, "--spec", env["spec_path"])
    assert r.exit_code == 0, r.output
    assert "step 12" in r.output
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, env["spec"].model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf_logits = model(ids).logits
        ours = chain_forward(env["stages"], ids)
    torch.testing.assert_close(hf_logits, ours, rtol=1e-4, atol=1e-4)


def test_export_refusals(env, tmp_path):
    spec_path, ckpts = env["spec_path"], env["ckpts"]
    r = run("checkpoint", "export", ckpts[0], "--out", tmp_path / "o1", "--spec", spec_path)
    assert r.exit_code == 1 and "stage(s) 1 missing" in r.output
    r = run("checkpoint", "export", ckpts[0], ckpts[0], ckpts[1], "--out", tmp_path / "o2", "--spec", spec_path)
    assert r.exit_code == 1 and "stage 0 given twice" in r.output
    r = run("checkpoint", "export", *ckpts, "--out", tmp_path / "o3")
    assert r.exit_code == 1 and "--spec" in r.output

    # Stage 1 of another step.
    spec = env["spec"]
    later = write_checkpoint(
        tmp_path / "later",
        spec=spec,
        stage=1,
        step=13,
        tokens_seen=0,
        model_state=env["stages"][1].state_dict(),
        key_paths=[env["a"]],
    ).path
    r = run("checkpoint", "export", ckpts[0], later, "--out", tmp_path / "o4", "--spec", spec_path)
    assert r.exit_code == 1 and "different steps" in r.output and "stage 1: step 13" in r.output

    # A tampered stage stops the whole export, and nothing is written.
    bad = tmp_path / "bad"
    shutil.copytree(ckpts[1], bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    r = run("checkpoint", "export", ckpts[0], bad, "--out", tmp_path / "o5", "--spec", spec_path)
    assert r.exit_code == 1 and "model.safetensors: content does not match" in r.output
    for name in ("o1", "o2", "o3", "o4", "o5"):
        assert not (tmp_path / name).exists()
