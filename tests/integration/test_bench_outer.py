"""scripts/bench_outer.py --quick runs end to end: the simulated stage group (loss, bytes,
identical weights, poisoned members) in the default suite; the real 2x2 swarms of both modes
(slow, run by .ci/run)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "scripts" / "bench_outer.py"
pytestmark = pytest.mark.timeout(900)


def run_bench(*args: str, timeout: float) -> list[dict]:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_quick_simulation_compares_both_modes():
    records = run_bench(
        "--only", "sim", "--rounds", "2", "--inner-steps", "2", "--attacks", "sign_flip_x10,nan", timeout=600
    )
    by = {}
    for r in records:
        by.setdefault(r["metric"], []).append(r)
    (loss,) = by["heldout_loss"]
    assert math.isfinite(loss["per_step"]["mean"]) and math.isfinite(loss["outer"]["mean"])
    assert loss["identical_per_step_runs_pct"] == 0.0  # one process, one thread: the same bits
    (sent,) = by["averaging_bytes_per_token"]
    assert sent["per_step_none"] > sent["per_step_blockwise8bit"] > sent["outer"] > 0
    assert {r["attack"] for r in by["poisoned"]} == {"sign_flip_x10", "nan"}
    assert all(r["outer_finite"] for r in by["poisoned"])
    nan = next(r for r in by["poisoned"] if r["attack"] == "nan")
    assert nan["outer_dropped"] >= 2  # the poisoned member's bytes, in each of the two stages
    assert all(r["outer_vs_honest_members_only_pct"]["n"] == 1 for r in by["poisoned"])
    assert [r.get("members") for r in by["run"] if r.get("members")] == [3]  # the group without the poisoned one
    (same,) = by["identical_weights"]
    assert same["rounds"] == 4 * 2 and same["fraction"] == 1.0  # clean, honest members only, 2 attacks


@pytest.mark.slow
def test_quick_swarms_of_both_modes():
    records = run_bench("--only", "swarm", "--swarm-seconds", "45", timeout=840)
    runs = {r["mode"]: r for r in records if r["metric"] == "swarm_run"}
    assert set(runs) == {"per_step", "outer"}, records
    assert all(r["tokens_per_s"] > 0 and r["averaging_bytes"] > 0 for r in runs.values())
    assert runs["outer"]["rounds_both_members"] >= 1 and runs["outer"]["identical_fraction"] == 1.0
    (cmp,) = [r for r in records if r["metric"] == "swarm_comparison"]
    assert cmp["averaging_bytes_reduction"] > 1
