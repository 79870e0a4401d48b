"""Single-process training from the command line, in a subprocess: JSON progress and the final state."""

from __future__ import annotations

import json
import subprocess
import sys

from safetensors.torch import load_file

from peer.model.llama import stage_param_names

from conftest import local_train_spec


def test_cli_json_progress_and_final_state(corpus, tmp_path):
    spec_path = tmp_path / "spec.toml"
    local_train_spec().save(spec_path)
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
        assert set(load_file(str(out / f"stage{k}.safetensors"))) == set(stage_param_names(local_train_spec(), k))
