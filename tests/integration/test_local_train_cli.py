"""Single-process training from the command line, in a subprocess: JSON progress and the final state."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from peer.model.llama import stage_param_names
from protocol.spec import preset_spec


def _spec():
    # A tiny model on short sequences: a few hundred milliseconds per optimizer step on one core.
    return preset_spec(
        "tiny",
        stages=2,
        run_id="local-test",
        training=dict(micro_batch_size=4, seq_len=32, target_batch_size=8, lr=3e-3),
    )


@pytest.fixture()
def corpus(tmp_path):
    rng = random.Random(0)
    words = "the swarm trains one model together and every peer holds a stage of it".split()
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(4):
        (root / f"doc{i}.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(60)))
    return root


def test_cli_json_progress_and_final_state(corpus, tmp_path):
    spec_path = tmp_path / "spec.toml"
    _spec().save(spec_path)
    out = tmp_path / "state"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "peer.dev.local_train",
            "--spec",
            str(spec_path),
            "--data",
            str(corpus),
            "--steps",
            "8",
            "--threads",
            "1",
            "--status-every",
            "0",
            "--log-json",
            "--final-state",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert events[0]["event"] == "starting" and events[-1]["event"] == "done"
    statuses = [e for e in events if e["event"] == "status"]
    assert statuses and all("tokens" in e and "time" in e for e in statuses)
    assert events[-1]["tokens"] == 8 * 4 * 32
    for k in range(2):
        assert set(load_file(str(out / f"stage{k}.safetensors"))) == set(stage_param_names(_spec(), k))
