"""The second part of ``peer.dev.bench.outer``: outer vs per_step in a real swarm on this machine.

Per mode: a bootstrap and 2 stages x 2 peers, each in its own process with one torch thread;
both stage-0 peers train on their own data for ``--swarm-seconds``. Reported per mode:
tokens/s (both trainers, steady state as bench_swarm measures it), averaging bytes per trained
token as the peers counted them, and for outer the rounds after which both members of a stage
reported the same base digest.
"""

from __future__ import annotations

import time
from pathlib import Path

from peer.averaging.wire_stats import ENV as WIRE_STATS_ENV
from peer.averaging.wire_stats import read_totals
from peer.dev.bench.common import emit, graceful_stop, peer_args, say, status_points, steady_rate
from peer.dev.launcher import Cluster
from protocol.spec import RunSpec

BENCH = "outer"
READY_TIMEOUT = 180.0
WARMUP_S = 10.0


def run_mode(args, work: Path, averaging: str, spec: RunSpec) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    spec_path = work / "spec.toml"
    spec.save(spec_path)
    wire = work / "wire"
    extra = peer_args(args.data_suffix, seconds=args.swarm_seconds + 120)
    with Cluster(work, env={WIRE_STATS_ENV: str(wire), "OMP_NUM_THREADS": "1"}) as cluster:
        _boot, maddr = cluster.bootstrap(spec_path=spec_path, timeout=READY_TIMEOUT)
        servers = [cluster.peer(n, [maddr], spec_path=spec_path, stage=1, extra=extra) for n in ("b0", "b1")]
        for p in servers:
            p.wait_event("ready", READY_TIMEOUT)
        trainers = [
            cluster.peer(n, [maddr], spec_path=spec_path, stage=0, data=args.data, extra=extra) for n in ("a0", "a1")
        ]
        for p in trainers:
            p.wait_event("ready", READY_TIMEOUT)
        started = time.monotonic()
        while time.monotonic() - started < args.swarm_seconds:
            time.sleep(2.0)
            dead = [p.name for p in trainers + servers if not p.alive()]
            if dead:
                raise RuntimeError(f"{averaging}: {dead} exited early; see the logs in {work}")
        peers = trainers + servers
        graceful_stop(peers)
        events = {p.name: list(p.events) for p in peers}
        last = {p.name: (p.last_event("status") or {}) for p in peers}
    rates = [steady_rate(status_points(events[p.name]), WARMUP_S) for p in trainers]
    tokens = sum((last[p.name].get("tokens") or 0) for p in trainers)
    if not tokens or any(r is None for r in rates):
        raise RuntimeError(f"{averaging}: no tokens trained; see the logs in {work}")
    if averaging == "outer":
        sent = sum((last[n].get("bytes_sent") or {}).get("averaging", 0) for n in last)
    else:
        totals = read_totals(wire)
        sent = sum(totals.get(role, {}).get("sent_bytes", 0) for role in ("grad", "state"))
    row = dict(
        mode=averaging,
        seconds=args.swarm_seconds,
        tokens=tokens,
        tokens_per_s=sum(r["tokens_per_s"] for r in rates),
        averaging_bytes=sent,
        averaging_bytes_per_token=sent / tokens,
        trainer_loss=[last[p.name].get("loss") for p in trainers],
    )
    if averaging == "outer":
        row.update(_rounds(events))
    return row


def _rounds(events: dict[str, list[dict]]) -> dict:
    """Rounds both members of a stage applied, and those after which they held the same bits."""
    both = same = 0
    for pair in (("a0", "a1"), ("b0", "b1")):
        logged = [{e["round"]: e["digest"] for e in events[n] if e.get("event") == "outer_round"} for n in pair]
        common = set(logged[0]) & set(logged[1])
        both += len(common)
        same += sum(logged[0][r] == logged[1][r] for r in common)
    return dict(rounds_both_members=both, rounds_identical=same, identical_fraction=same / both if both else None)


def bench_swarm(args, work: Path, specs: dict[str, RunSpec]) -> None:
    """Both modes, one swarm each; ``specs``: the spec of each mode."""
    rows = {}
    for mode in ("per_step", "outer"):
        say(f"swarm: {mode}, {args.swarm_seconds:.0f} s")
        try:
            rows[mode] = run_mode(args, work / f"swarm-{mode}", mode, specs[mode])
            emit(BENCH, "swarm_run", **rows[mode])
        except Exception as err:
            emit(BENCH, "swarm_run_failed", mode=mode, error=f"{type(err).__name__}: {str(err)[-2000:]}")
            say(f"swarm {mode} FAILED: {str(err)[:500]}")
    if len(rows) == 2:
        ps, outer = rows["per_step"], rows["outer"]
        emit(
            BENCH,
            "swarm_comparison",
            tokens_per_s_ratio_outer_vs_per_step=outer["tokens_per_s"] / ps["tokens_per_s"],
            averaging_bytes_reduction=ps["averaging_bytes_per_token"] / max(1e-9, outer["averaging_bytes_per_token"]),
            per_step_codec="blockwise8bit (the spec default)",
            identical_fraction=outer.get("identical_fraction"),
        )
