"""scripts/bench_teach.py --quick: a teacher trained for seconds, one student run with and one
without it, and a real swarm with and without a teacher process; every figure is printed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_teach.py"


def test_quick_run_prints_every_figure(tmp_path):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in out.stdout.splitlines()]
    by_metric = {}
    for r in records:
        by_metric.setdefault(r["metric"], []).append(r)
    assert not by_metric.get("swarm_run_failed"), by_metric.get("swarm_run_failed")
    assert by_metric["teacher"][0]["heldout_loss"] > 0
    runs = by_metric["student_run"]
    assert {r["teacher"] for r in runs} == {False, True}
    assert all(r["curve"][-1][0] == r["tokens"] for r in runs)
    assert by_metric["soft_target_bytes_per_token"][0]["value"] == 25.0  # k = 8, 9-bit ids, float16 values
    assert "speedup" in by_metric["tokens_to_reach"][0]
    sides = {r["side"]: r for r in by_metric["swarm_run"]}
    assert sides["teacher"]["distilled_microbatches"] > 0 and sides["no_teacher"]["distilled_microbatches"] == 0
    assert 20 < sides["teacher"]["soft_target_bytes_per_token"] < 40  # 25 of payload plus framing
    assert by_metric["swarm_comparison"][0]["tokens_per_s_ratio_teacher_vs_none"] > 0
