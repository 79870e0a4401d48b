"""The second part of ``peer.dev.bench.teach``: tokens/s of a real swarm with and without a teacher
online.

Per side: a bootstrap and 2 stages x 1 peer, each its own process with one torch thread; the
stage-0 peer trains on its data for ``--swarm-seconds``. Both sides run the same spec (with its
``[distill]`` section); on the ``teacher`` side a ``swarmtrain teach`` process (one thread)
serves the benchmark's teacher, on the other nobody does and the trainer trains on labels alone.
Reported: the trainer's steady tokens/s, the soft-target bytes it received per trained token
(``bytes_received["teacher"]``: the answers' frames) and the micro-batches that had them.
"""

from __future__ import annotations

import time
from pathlib import Path

from peer.dev.bench.common import emit, graceful_stop, peer_args, say, status_points, steady_rate
from peer.dev.launcher import Cluster
from protocol.spec import RunSpec

BENCH = "teach"
READY_TIMEOUT = 180.0
WARMUP_S = 10.0


def run_side(args, spec: RunSpec, hf_dir: Path, work: Path, *, teacher: bool) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    spec_path = work / "spec.toml"
    spec.save(spec_path)
    extra = peer_args(args.data_suffix, seconds=args.swarm_seconds + 120)
    with Cluster(work, env={"OMP_NUM_THREADS": "1"}) as cluster:
        _boot, maddr = cluster.bootstrap(spec_path=spec_path, timeout=READY_TIMEOUT)
        if teacher:
            t = cluster.start(
                "teacher",
                ["teach", "--model", str(hf_dir), "--spec", str(spec_path), "--initial-peers", maddr]
                + ["--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--threads", "1", "--announce-period", "2", "--log-json"],
            )
            t.wait_event("ready", READY_TIMEOUT)
        server = cluster.peer("s1", [maddr], spec_path=spec_path, stage=1, extra=extra)
        server.wait_event("ready", READY_TIMEOUT)
        trainer = cluster.peer("s0", [maddr], spec_path=spec_path, stage=0, data=args.train_dir, extra=extra)
        trainer.wait_event("ready", READY_TIMEOUT)
        started = time.monotonic()
        while time.monotonic() - started < args.swarm_seconds:
            time.sleep(2.0)
            dead = [p.name for p in cluster.procs if not p.alive()]
            if dead:
                raise RuntimeError(f"{dead} exited early; see the logs in {work}")
        # The rate is taken before the stop: a trainer's last micro-batches may wait for a stage
        # that is already leaving, which says nothing about training.
        stop_at = time.time()
        last = trainer.last_event("status") or {}
        graceful_stop([trainer, server])
        events = [e for e in trainer.events if e.get("time", 0) <= stop_at]
    rate = steady_rate(status_points(events), WARMUP_S)
    tokens = last.get("tokens") or 0
    if not tokens or rate is None:
        raise RuntimeError(f"no tokens trained; see the logs in {work}")
    soft_bytes = (last.get("bytes_received") or {}).get("teacher", 0)
    # Per token that trained with soft targets: a micro-batch whose teacher had not answered in
    # time trains on its labels and brings no soft-target bytes.
    distilled = last.get("distilled") or 0
    microbatches = last.get("microbatches") or 0
    distilled_tokens = distilled * tokens / microbatches if microbatches else 0
    return dict(
        side="teacher" if teacher else "no_teacher",
        seconds=args.swarm_seconds,
        tokens=tokens,
        tokens_per_s=rate["tokens_per_s"],
        microbatches=last.get("microbatches"),
        distilled_microbatches=last.get("distilled"),
        soft_target_bytes=soft_bytes,
        soft_target_bytes_per_token=soft_bytes / distilled_tokens if distilled_tokens else None,
        trainer_loss=last.get("loss"),
    )


def bench_swarm(args, spec: RunSpec, hf_dir: Path, work: Path) -> None:
    rows = {}
    for teacher in (False, True):
        side = "teacher" if teacher else "no_teacher"
        say(f"swarm: {side}, {args.swarm_seconds:.0f} s")
        try:
            rows[side] = run_side(args, spec, hf_dir, work / f"swarm-{side}", teacher=teacher)
            emit(BENCH, "swarm_run", **rows[side])
        except Exception as err:
            emit(BENCH, "swarm_run_failed", side=side, error=f"{type(err).__name__}: {str(err)[-2000:]}")
            say(f"swarm {side} FAILED: {str(err)[:500]}")
    if len(rows) == 2:
        emit(
            BENCH,
            "swarm_comparison",
            tokens_per_s_ratio_teacher_vs_none=rows["teacher"]["tokens_per_s"] / rows["no_teacher"]["tokens_per_s"],
            soft_target_bytes_per_token=rows["teacher"]["soft_target_bytes_per_token"],
        )
