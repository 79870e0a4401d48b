"""peer.averaging.wire_stats: the benchmark's averaging byte counts (pure parts; the live path runs in
scripts/bench_swarm.py, where hivemind's averager processes write the files)."""

from __future__ import annotations

import json

from peer.averaging import wire_stats


def test_role_of_hivemind_prefixes():
    assert wire_stats.role_of("run.abc.stage0_grad_averager") == "grad"
    assert wire_stats.role_of("run.abc.stage0_state_averager") == "state"
    assert wire_stats.role_of("something") == "other"


def test_not_installed_without_the_variable(monkeypatch):
    monkeypatch.delenv(wire_stats.ENV, raising=False)
    assert wire_stats.install_from_env() is False


def test_read_totals_sums_processes_by_role(tmp_path):
    files = {
        "grad-1.json": dict(
            role="grad",
            pid=1,
            sent_bytes=100,
            messages=2,
            allreduce_groups=3,
            bytes_by_compression={"FLOAT16": 60, "BLOCKWISE_8BIT": 40},
        ),
        "grad-2.json": dict(
            role="grad", pid=2, sent_bytes=50, messages=1, allreduce_groups=2, bytes_by_compression={"FLOAT16": 50}
        ),
        "state-3.json": dict(role="state", pid=3, sent_bytes=7, messages=1, allreduce_groups=1),
    }
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    (tmp_path / "grad-4.json").write_text("{half a file")  # a torn write is skipped, not fatal
    totals = wire_stats.read_totals(tmp_path)
    assert totals["grad"]["sent_bytes"] == 150 and totals["grad"]["processes"] == 2
    assert totals["grad"]["allreduce_groups"] == 5
    assert totals["grad"]["bytes_by_compression"] == {"FLOAT16": 110, "BLOCKWISE_8BIT": 40}
    assert totals["state"]["sent_bytes"] == 7
    assert wire_stats.read_totals(tmp_path / "missing") == {}
