"""Swarm benchmarks, side by side in one run: pipeline efficiency and bytes on the wire.

1. Pipeline efficiency: tokens/s of a swarm (bootstrap + 2 stages x 1 peer, 1 torch thread
   each, the stage-0 peer drives the data) / tokens/s of one process training the same model
   on the same data, micro-batch and optimizer with 2 torch threads (``peer.dev.local_train``).
   Both rates leave out the first seconds after tokens start to flow (the same rule for both).

2. Bytes on the wire per trained token, per codec, against no compression, with the final loss
   at the same number of tokens. A swarm of 2 stages x 2 peers (averaging needs a partner) where
   one peer drives exactly ``--steps`` micro-batches of the same data in the same order in every
   run (a fixed driver identity). Activation codecs are swept with gradient averaging
   uncompressed, gradient codecs with activations uncompressed; the all-"none" run is the
   baseline of both sweeps.
   - activations: the stage servers' and the trainer's own counters (``bytes_sent``, key
     "activations" of every peer's last status event: each message counted once, by its
     sender; token ids and labels included);
   - averaging: measured inside hivemind's averager processes (``peer.averaging.wire_stats``, enabled
     with SWARMTRAIN_WIRE_STATS): the serialized size of every all-reduce message each peer
     sends (parts out, averaged deltas back), gradients and state averaging separately;
   - loss: the driver's training-loss EMA after the last micro-batch (same batches in every
     run), and the loss of the final weights (stage 0 from the driver, stage 1 from a stage-1
     peer) on fixed held-out batches.

Every process is started through ``peer.dev.launcher.Cluster`` and waited on through its JSON
events; everything is killed on exit, Ctrl-C and SIGTERM included. Output: one JSON object per
measurement on stdout (``bench: "swarm"``), progress on stderr.

    .venv/bin/python scripts/bench_swarm.py            # full run (~12-15 min on 2 quiet cores; --budget-s 1200 caps it)
    .venv/bin/python scripts/bench_swarm.py --quick    # a smoke run: not for figures

The second part is in ``peer.dev.bench.swarm_codecs``; ``python -m peer.dev.bench.swarm`` runs the same.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from peer.dev.bench.common import (
    default_text_data,
    emit,
    graceful_stop,
    machine,
    peer_args,
    say,
    sigterm_as_interrupt,
    status_points,
    steady_rate,
)
from peer.dev.bench.swarm_codecs import (
    ACTIVATION_CODECS,
    BENCH,
    GRADIENT_CODECS,
    READY_TIMEOUT,
    bench_compression,
    swarm_spec,
)
from peer.dev.launcher import Cluster
from peer.swarm.identity import load_or_create_identity

# --- 1. pipeline efficiency ------------------------------------------------------------------


def run_swarm_throughput(args, work: Path, spec_path: Path, driver_id: Path, seconds: float) -> dict:
    with Cluster(work) as cluster:
        _boot, maddr = cluster.bootstrap(spec_path=spec_path, timeout=READY_TIMEOUT)
        # Stage 1 first, so that the driver finds its partner at once.
        s1 = cluster.peer(
            "s1", [maddr], spec_path=spec_path, stage=1, extra=peer_args(args.data_suffix, seconds=seconds + 120)
        )
        s1.wait_event("ready", READY_TIMEOUT)
        s0 = cluster.peer(
            "s0-driver",
            [maddr],
            spec_path=spec_path,
            stage=0,
            data=args.data,
            extra=peer_args(args.data_suffix, seconds=seconds, identity=driver_id),
        )
        s0.wait_event("ready", READY_TIMEOUT)
        s0.wait_event("stopped", seconds + 120)
        graceful_stop([s1], timeout=30)
        rate = steady_rate(status_points(s0.events), args.warmup_s)
        last = s0.last_event("status") or {}
    if rate is None:
        raise RuntimeError(f"the swarm trained no tokens; see the logs in {work}")
    return {
        **rate,
        "loss": last.get("loss"),
        "retries": last.get("retries"),
        "activation_bytes_sent_by_driver": (last.get("bytes_sent") or {}).get("activations"),
    }


def run_local_throughput(args, work: Path, spec_path: Path, peer_key: str, seconds: float) -> dict:
    with Cluster(work) as cluster:
        cmd = [sys.executable, "-m", "peer.dev.local_train"]
        proc = cluster.start(
            "local",
            [
                "--spec",
                str(spec_path),
                "--data",
                args.data,
                "--threads",
                str(args.local_threads),
                "--steps",
                str(10**9),
                "--max-seconds",
                f"{seconds:.0f}",
                "--status-every",
                "1",
                "--warmup",
                "0",
                "--peer-key",
                peer_key,
                "--log-json",
                *(["--data-suffix", args.data_suffix] if args.data_suffix else []),
            ],
            command=cmd,
        )
        done = proc.wait_event("done", seconds + 180)
        rate = steady_rate(status_points(proc.events, ("status", "done")), args.warmup_s)
    if rate is None:
        raise RuntimeError(f"the single process trained no tokens; see {work}")
    return {**rate, "loss": done.get("loss_ema")}


def bench_efficiency(args, work: Path, driver_id: Path, driver_key: str) -> None:
    spec = swarm_spec(args, "bench-eff")
    spec_path = work / "eff-spec.toml"
    spec.save(spec_path)
    common = dict(
        preset=args.preset,
        micro_batch_size=spec.training.micro_batch_size,
        seq_len=spec.training.seq_len,
        activations=spec.compression.activations,
        seconds=args.seconds,
    )
    swarm_rates, local_rates = [], []
    for rep in range(args.repeats):
        say(f"[efficiency {rep + 1}/{args.repeats}] single process, {args.local_threads} threads, {args.seconds:.0f}s")
        local = run_local_throughput(args, work / f"eff-local-{rep}", spec_path, driver_key, args.seconds)
        emit(BENCH, "tokens_per_s", setup="single_process", threads=args.local_threads, repeat=rep, **common, **local)
        local_rates.append(local["tokens_per_s"])
        say(f"  {local['tokens_per_s']:,.0f} tok/s")
        say(
            f"[efficiency {rep + 1}/{args.repeats}] swarm: bootstrap + 2 stages x 1 peer (1 thread each), {args.seconds:.0f}s"
        )
        swarm = run_swarm_throughput(args, work / f"eff-swarm-{rep}", spec_path, driver_id, args.seconds)
        emit(BENCH, "tokens_per_s", setup="swarm_2x1", threads="1 per peer", repeat=rep, **common, **swarm)
        swarm_rates.append(swarm["tokens_per_s"])
        say(f"  {swarm['tokens_per_s']:,.0f} tok/s")
    value = median(swarm_rates) / median(local_rates)
    emit(
        BENCH,
        "pipeline_efficiency",
        value=value,
        goal=">= 0.9",
        meets_goal=value >= 0.9,
        swarm_tokens_per_s=median(swarm_rates),
        single_tokens_per_s=median(local_rates),
        repeats=args.repeats,
        **common,
        machine=machine(),
    )
    say(f"pipeline efficiency: {value:.3f} (goal >= 0.9)")


# --- main ------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="short runs: for development, not for figures")
    p.add_argument("--only", choices=("efficiency", "compression"), default=None)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--micro-batch-size", type=int, default=None, help="override the preset's micro-batch")
    p.add_argument("--seq-len", type=int, default=None, help="override the preset's sequence length")
    p.add_argument(
        "--target-batch-size",
        type=int,
        default=None,
        help="override the preset's samples per averaging round (tiny: 32, i.e. 4 micro-batches)",
    )
    p.add_argument("--data", default=None, help="text directory (default: the Python stdlib's .py files)")
    p.add_argument("--data-suffix", default=None, help="only files with this suffix (default .py with the stdlib)")
    p.add_argument("--seconds", type=float, default=None, help="efficiency: seconds per run (full 60, quick 25)")
    p.add_argument(
        "--warmup-s", type=float, default=None, help="efficiency: seconds left out of each rate (full 10, quick 5)"
    )
    p.add_argument("--repeats", type=int, default=1, help="efficiency: alternate single/swarm this many times (median)")
    p.add_argument(
        "--local-threads", type=int, default=2, help="torch threads of the single process (2 = the swarm's total)"
    )
    p.add_argument("--steps", type=int, default=None, help="codecs: micro-batches per run (full 96, quick 24)")
    p.add_argument(
        "--codec-timeout", type=float, default=None, help="codecs: seconds a run may train (full 150, quick 90)"
    )
    p.add_argument("--activation-codecs", default=",".join(ACTIVATION_CODECS))
    p.add_argument("--gradient-codecs", default=",".join(GRADIENT_CODECS))
    p.add_argument(
        "--baseline-repeat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the all-'none' baseline twice to show the loss noise (default: on, off with --quick)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="skip codec runs that would end after this many seconds from the start (full 1200, quick 900)",
    )
    p.add_argument("--workdir", default=None, help="logs and states (default: a new temp dir)")
    args = p.parse_args(argv)
    args.seconds = args.seconds or (25.0 if args.quick else 60.0)
    args.warmup_s = args.warmup_s if args.warmup_s is not None else (5.0 if args.quick else 10.0)
    args.steps = args.steps or (24 if args.quick else 96)
    args.codec_timeout = args.codec_timeout or (90.0 if args.quick else 150.0)
    args.baseline_repeat = (not args.quick) if args.baseline_repeat is None else args.baseline_repeat
    args.budget_s = args.budget_s or (900.0 if args.quick else 1200.0)
    args.deadline = time.monotonic() + args.budget_s
    default_text_data(args)
    args.activation_codecs = [c for c in args.activation_codecs.split(",") if c]
    args.gradient_codecs = [c for c in args.gradient_codecs.split(",") if c]
    for c in args.activation_codecs:
        if c not in ACTIVATION_CODECS:
            p.error(f"unknown activation codec {c!r}; choose from {', '.join(ACTIVATION_CODECS)}")
    for c in args.gradient_codecs:
        if c not in GRADIENT_CODECS:
            p.error(f"unknown gradient codec {c!r}; choose from {', '.join(GRADIENT_CODECS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sigterm_as_interrupt()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="swarmtrain-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    # One driver identity for every run: its peer id keys the data order, so every run (and the
    # single process, through --peer-key) trains on the same batches in the same order.
    driver_id = work / "driver.id"
    driver_key = load_or_create_identity(driver_id).peer_id.to_base58()
    say(
        f"swarm benchmarks ({'quick' if args.quick else 'full'}), preset {args.preset}, data {args.data}; logs in {work}"
    )
    emit(
        BENCH,
        "config",
        quick=args.quick,
        preset=args.preset,
        data=args.data,
        workdir=str(work),
        seconds=args.seconds,
        steps=args.steps,
        machine=machine(),
    )
    started = time.monotonic()
    try:
        if args.only in (None, "efficiency"):
            try:
                bench_efficiency(args, work, driver_id, driver_key)
            except Exception as err:
                emit(BENCH, "efficiency_failed", error=f"{type(err).__name__}: {str(err)[-2000:]}")
                say(f"efficiency FAILED: {str(err)[:500]}")
        if args.only in (None, "compression"):
            bench_compression(args, work, driver_id)
    except KeyboardInterrupt:
        say("interrupted: every process was stopped")
        return 130
    say(f"done in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
