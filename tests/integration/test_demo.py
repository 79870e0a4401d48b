"""`swarmtrain demo` starts a real local swarm, the loss goes down, and nothing is left behind."""

from __future__ import annotations

import json
import subprocess
import sys

from peer.base.procs import descendants


def test_demo_trains_and_cleans_up(tmp_path):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "peer.cli",
            "demo",
            "--seconds",
            "45",
            "--peers-per-stage",
            "1",
            "--workdir",
            str(tmp_path),
            "--json-summary",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            from peer.base.procs import kill_process_tree

            kill_process_tree(proc)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["first_loss"] is not None and summary["final_loss"] is not None, err[-3000:]
    assert summary["final_loss"] < summary["first_loss"] - 0.2, summary
    assert "peer-s0-0 ready" in err and "peer-s1-0 ready" in err
    # Every peer, its p2pd and hivemind helpers are gone: the demo stops them by process id.
    assert descendants(proc.pid) == []
    for log in tmp_path.glob("peer-*.log"):
        assert '"event": "stopped"' in log.read_text(), f"{log.name} did not stop cleanly"
