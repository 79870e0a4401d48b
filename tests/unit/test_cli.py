"""The ``swarmtrain`` command line: its commands, and usage errors that stop before any
network or model work. (The installed entry point is run in tests/integration/test_cli_entry_point.py,
``status --json`` against a live swarm in tests/integration/test_swarm.py.)"""

from __future__ import annotations

import pytest

from cli_helpers import COMMANDS, invoke


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    r = invoke(command, "--help")
    assert r.exit_code == 0, r.output
    assert "Usage:" in r.output


def test_version():
    r = invoke("--version")
    assert r.exit_code == 0 and "swarmtrain" in r.output


def test_run_needs_initial_peers(spec_path):
    r = invoke("run", "--spec", spec_path)
    assert r.exit_code == 2, r.output
    assert "--initial-peers is required" in r.output


def test_run_needs_exactly_one_of_spec_and_run(spec_path):
    peer = "/ip4/127.0.0.1/tcp/31337/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
    r = invoke("run", "--initial-peers", peer, "--spec", spec_path, "--run", "swarm")
    assert r.exit_code == 2 and "exactly one of --spec" in r.output, r.output
    r = invoke("run", "--initial-peers", peer)
    assert r.exit_code == 2 and "exactly one of --spec" in r.output, r.output


def test_run_rejects_a_bad_stage_and_keeper_options(spec_path, tmp_path):
    peer = "/ip4/127.0.0.1/tcp/31337/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
    r = invoke("run", "--initial-peers", peer, "--spec", spec_path, "--stage", "first")
    assert r.exit_code == 2 and "--stage must be 'auto' or a stage index" in r.output, r.output
    r = invoke("run", "--initial-peers", peer, "--spec", spec_path, "--keeper")
    assert r.exit_code == 2 and "--keeper needs --signing-key" in r.output, r.output


@pytest.mark.parametrize(
    "value, message",
    [
        ("nan", "nan is not a number of samples/s"),
        ("0", "not in the range"),
        ("-5", "not in the range"),
        ("2e9", "not in the range"),
        ("fast", "not a valid float"),
    ],
)
def test_run_rejects_a_bad_throughput(spec_path, value, message):
    peer = "/ip4/127.0.0.1/tcp/31337/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
    r = invoke("run", "--initial-peers", peer, "--spec", spec_path, "--throughput", value)
    assert r.exit_code == 2 and "--throughput" in r.output and message in r.output, r.output


def test_run_reports_an_invalid_spec_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('run_id = "x"\n[model]\nhidden_size = 3\n')
    peer = "/ip4/127.0.0.1/tcp/31337/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
    r = invoke("run", "--initial-peers", peer, "--spec", bad)
    assert r.exit_code == 1 and "invalid run spec" in r.output and "model.vocab_size" in r.output, r.output


def test_status_usage_errors(spec_path):
    r = invoke("status", "--spec", spec_path)
    assert r.exit_code == 2 and "--initial-peers is required" in r.output, r.output
    r = invoke("status", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N")
    assert r.exit_code == 2 and "exactly one of --run" in r.output, r.output


def test_bootstrap_keeper_needs_a_spec(tmp_path):
    key = tmp_path / "k.pem"
    key.write_text("x")
    r = invoke("bootstrap", "--keeper", "--signing-key", key, "--checkpoint-dir", tmp_path / "ck")
    assert r.exit_code == 2 and "--keeper needs --spec" in r.output, r.output


def test_run_refuses_a_trusted_key_that_is_not_one(tmp_path):
    peer = "/ip4/127.0.0.1/tcp/31337/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
    bad = tmp_path / "keeper.pub"
    bad.write_text("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")
    r = invoke("run", "--initial-peers", peer, "--run", "swarm", "--trusted-key", bad)
    assert r.exit_code == 2 and "--trusted-key" in r.output and str(bad) in r.output, r.output
