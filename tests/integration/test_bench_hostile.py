"""scripts/bench_hostile.py --quick runs end to end: validation figures for every codec, and a
2x2 swarm on this code and on the code before the hostile-peer defences (a git worktree)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(900)


def test_quick_mode_measures_both_sides():
    if (
        subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--verify", "4860bf6^{commit}"], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("the base commit is not in this clone's history")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_hostile.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=840,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    validation = [r for r in records if r["metric"] == "validation"]
    assert {r["codec"] for r in validation} == {"fp16", "blockwise8bit", "none"}
    assert all(r["validate_ms"] > 0 and r["compute_ms"] > 0 for r in validation)
    (swarm,) = [r for r in records if r["metric"] == "swarm"]
    assert swarm["new_tokens_per_s"][0] > 0 and swarm["base_tokens_per_s"][0] > 0, result.stderr[-3000:]
