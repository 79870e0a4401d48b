"""scripts/bench_lab.py --quick, as a user runs it: it measures the profile it uses, runs the
tiny preset in outer mode on unshaped lab links and on ``broadband`` (once with three peers
behind NATs), and reports tokens/s, bytes per token, utilization and the NATed peers' time to
a first contribution as JSON lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from labkit import lab_marks

pytestmark = lab_marks(1200)

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_lab.py"


def test_bench_lab_quick_reports_every_run(tmp_path):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1100,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    checks = [r for r in rows if r["metric"] == "profile_check"]
    assert [c["profile"] for c in checks] == ["broadband"] and all(c["ok"] for c in checks), checks
    runs = {r["profile"]: r for r in rows if r["metric"] == "run"}
    assert set(runs) == {"baseline", "broadband", "broadband+nat"}, rows
    assert runs["baseline"]["utilization"] == 1.0
    for name in ("broadband", "broadband+nat"):
        r = runs[name]
        assert 0.0 < r["utilization"] < 2.0 and r["tokens_per_s"] > 0, r
        assert r["activation_bytes_per_token"] > 0 and r["averaging_bytes_per_token"] > 0, r
    nat = runs["broadband+nat"]
    assert nat["relayed"] == nat["natted"] == ["a1", "b0", "b1"], nat
    assert nat["nat_first_contribution_max_s"] is not None, nat
