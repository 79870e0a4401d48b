#!/usr/bin/env python
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
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, when run from anywhere

from peer.averaging.wire_stats import ENV as WIRE_STATS_ENV
from peer.averaging.wire_stats import read_totals
from peer.dev.launcher import Cluster
from peer.model.llama import stage_param_shapes
from peer.swarm.identity import load_or_create_identity
from protocol.spec import preset_spec

from bench_common import (
    default_text_data,
    emit,
    eval_batches,
    eval_loss,
    machine,
    say,
    sigterm_as_interrupt,
    status_points,
    steady_rate,
    weights_finite,
)

BENCH = "swarm"
ACTIVATION_CODECS = ("none", "fp16", "uniform8bit", "blockwise8bit")
GRADIENT_CODECS = ("none", "fp16", "uniform8bit", "blockwise8bit", "powersgd")
READY_TIMEOUT = 180.0  # a loaded 2-core machine takes a while to start hivemind and p2pd


def make_spec(args, run_id: str, *, activations: str = "fp16", gradients: str = "blockwise8bit"):
    training = {}
    if args.micro_batch_size:
        training["micro_batch_size"] = args.micro_batch_size
    if args.seq_len:
        training["seq_len"] = args.seq_len
    if args.target_batch_size:
        training["target_batch_size"] = args.target_batch_size
    return preset_spec(
        args.preset,
        stages=2,
        run_id=run_id,
        training=training,
        compression=dict(activations=activations, gradients=gradients),
    )


def peer_args(
    args,
    *,
    seconds: Optional[float] = None,
    steps: Optional[int] = None,
    identity: Optional[Path] = None,
    final_state: Optional[Path] = None,
) -> list[str]:
    extra = ["--status-every", "1"]
    if args.data_suffix:
        extra += ["--data-suffix", args.data_suffix]
    if seconds is not None:
        extra += ["--max-seconds", f"{seconds:.0f}"]
    if steps is not None:
        extra += ["--max-steps", str(steps)]
    if identity is not None:
        extra += ["--identity", str(identity)]
    if final_state is not None:
        extra += ["--final-state", str(final_state)]
    return extra


def graceful_stop(procs, timeout: float = 90.0) -> None:
    """SIGINT to each peer itself (not its group, where p2pd would die first), and a second one
    a moment later so that it does not wait for a last averaging round: it finishes in-flight
    work, writes its final state and exits. Cluster kills whatever is left."""
    for second in (False, True):
        if second:
            time.sleep(1.0)
        for proc in procs:
            if proc.alive() and not (second and proc.last_event("stopped")):
                try:
                    os.kill(proc.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
    for proc in procs:
        try:
            proc.wait_event("stopped", timeout)
        except (TimeoutError, RuntimeError) as err:
            say(f"  {proc.name} did not stop cleanly: {str(err).splitlines()[0]}")


# --- 1. pipeline efficiency ------------------------------------------------------------------


def run_swarm_throughput(args, work: Path, spec_path: Path, driver_id: Path, seconds: float) -> dict:
    with Cluster(work) as cluster:
        _boot, maddr = cluster.bootstrap(spec_path=spec_path, timeout=READY_TIMEOUT)
        # Stage 1 first, so that the driver finds its partner at once.
        s1 = cluster.peer("s1", [maddr], spec_path=spec_path, stage=1, extra=peer_args(args, seconds=seconds + 120))
        s1.wait_event("ready", READY_TIMEOUT)
        s0 = cluster.peer(
            "s0-driver",
            [maddr],
            spec_path=spec_path,
            stage=0,
            data=args.data,
            extra=peer_args(args, seconds=seconds, identity=driver_id),
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
    spec = make_spec(args, "bench-eff")
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


# --- 2. bytes on the wire per codec ----------------------------------------------------------


def averaged_values_per_round(spec) -> tuple[int, int]:
    """(values all-reduced per round summed over stages, parameters summed over stages).

    Equal, except with PowerSGD, which all-reduces the rank-r factors P (m x r) and Q (n x r)
    of each gradient it compresses (hivemind's rule: a matrix, and at least a 2x saving) and
    the other gradients as they are, in two phases."""
    values = numel = 0
    rank = spec.compression.powersgd_rank
    for k in range(spec.num_stages):
        for shape in stage_param_shapes(spec, k).values():
            n = _prod(shape)
            numel += n
            dims = _greedy_2d(list(shape))
            if spec.compression.gradients == "powersgd" and len(shape) > 1 and 1 - rank * sum(dims) / n >= 0.5:
                values += rank * sum(dims)
            else:
                values += n
    return values, numel


def _greedy_2d(dims: list[int]) -> list[int]:
    # hivemind.utils.math.get_flatten_greedy_dims, on a shape
    while len(dims) > 2:
        i = min(range(len(dims) - 1), key=lambda j: dims[j] * dims[j + 1])
        dims[i] *= dims.pop(i + 1)
    return dims


def expected_uncompressed_grad_bytes(spec, rounds_per_stage: float) -> float:
    """Float32 bytes a 2-peer all-reduce moves per stage round: each peer sends the half the
    other reduces and gets the averaged half back, so 2 x values in all."""
    values, _ = averaged_values_per_round(spec)
    return 2 * 4 * values * rounds_per_stage


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def run_codec(args, work: Path, driver_id: Path, activations: str, gradients: str, batches) -> dict:
    run_id = f"bench-a-{activations}-g-{gradients}"
    spec = make_spec(args, run_id, activations=activations, gradients=gradients)
    work.mkdir(parents=True, exist_ok=True)
    spec_path = work / "spec.toml"
    spec.save(spec_path)
    wire_dir = work / "wire"
    states = work / "states"
    env = {WIRE_STATS_ENV: str(wire_dir), "PYTHONHASHSEED": "0"}  # PYTHONHASHSEED: the trainer's routing seed
    started = time.monotonic()
    with Cluster(work, env=env) as cluster:
        _boot, maddr = cluster.bootstrap(spec_path=spec_path, timeout=READY_TIMEOUT)
        safety = args.codec_timeout + 60
        # The driver starts once every helper serves: from its first micro-batch on, both
        # stage groups have their averaging partner, in every run alike.
        helpers = [
            cluster.peer(
                name,
                [maddr],
                spec_path=spec_path,
                stage=stage,
                extra=peer_args(args, seconds=safety, final_state=states / f"{name}.safetensors"),
            )
            for name, stage in (("s1-a", 1), ("s1-b", 1), ("s0-b", 0))
        ]
        for proc in helpers:
            proc.wait_event("ready", READY_TIMEOUT)
        driver = cluster.peer(
            "s0-driver",
            [maddr],
            spec_path=spec_path,
            stage=0,
            data=args.data,
            extra=peer_args(
                args,
                steps=args.steps,
                seconds=args.codec_timeout,
                identity=driver_id,
                final_state=states / "s0-driver.safetensors",
            ),
        )
        ready = driver.wait_event("ready", READY_TIMEOUT)
        driver.wait_event("stopped", args.codec_timeout + 60)
        graceful_stop(helpers)
        peers = [driver, *helpers]
        last = {p.name: (p.last_event("status") or {}) for p in peers}
        epochs = {p.name: last[p.name].get("epoch") for p in peers}
    tokens = last["s0-driver"].get("tokens") or 0
    train_s = last["s0-driver"].get("time", ready["time"]) - ready["time"]
    if tokens == 0:
        raise RuntimeError(f"{run_id}: the driver trained no tokens; see the logs in {work}")
    activation_bytes = sum((s.get("bytes_sent") or {}).get("activations", 0) for s in last.values())
    # Routing varies between runs: a micro-batch whose stage 0 ran on the other stage-0 peer
    # crosses the wire 4 times with codec tensors instead of 2. Normalised to one crossing
    # each way per micro-batch (the driver's own stage 0), codecs compare independently of it.
    microbatches = last["s0-driver"].get("microbatches") or 0
    remote_s0 = (last["s0-b"].get("samples_accumulated") or 0) / spec.training.micro_batch_size
    transfers = 2 * microbatches + 2 * remote_s0
    one_crossing = activation_bytes / transfers * 2 * microbatches / tokens if transfers else None
    wire = read_totals(wire_dir)
    grad, state = wire.get("grad", {}), wire.get("state", {})
    rounds_per_stage = tokens / (spec.training.target_batch_size * spec.training.seq_len)
    phases = 2 if gradients == "powersgd" else 1  # PowerSGD all-reduces P, then Q: two group ids a round
    loss_eval = eval_loss(spec, [states / "s0-driver.safetensors", states / "s1-a.safetensors"], batches)
    finite = {p.name: weights_finite(states / f"{p.name}.safetensors") for p in peers}
    return dict(
        activations=activations,
        gradients=gradients,
        tokens=tokens,
        microbatches=last["s0-driver"].get("microbatches"),
        microbatches_planned=args.steps,
        train_seconds=train_s,
        run_seconds=time.monotonic() - started,
        activation_bytes=activation_bytes,
        activation_bytes_per_token=activation_bytes / tokens,
        activation_bytes_per_token_one_crossing=one_crossing,
        microbatches_via_other_stage0_peer=remote_s0,
        grad_averaging_bytes=grad.get("sent_bytes", 0),
        grad_averaging_bytes_per_token=grad.get("sent_bytes", 0) / tokens,
        grad_averaging_bytes_by_compression=grad.get("bytes_by_compression", {}),
        grad_averaging_float32_equivalent_bytes=grad.get("float32_bytes", 0),
        grad_averaging_processes=grad.get("processes", 0),
        grad_allreduce_participations=grad.get("allreduce_groups", 0),
        # Under load some rounds find no partner in time (each peer then applies its own
        # gradients): bytes per token count only the rounds that happened, so check this.
        grad_averaging_completeness=grad.get("allreduce_groups", 0)
        / max(1.0, 2 * spec.num_stages * rounds_per_stage * phases),
        # Bytes per value on the wire, from the same messages: independent of completeness.
        grad_averaging_wire_ratio=(grad.get("float32_bytes", 0) / grad["sent_bytes"])
        if grad.get("sent_bytes")
        else None,
        grad_averaging_bytes_per_token_all_rounds=(
            expected_uncompressed_grad_bytes(spec, rounds_per_stage)
            / tokens
            * grad["sent_bytes"]
            / grad["float32_bytes"]
            if grad.get("float32_bytes")
            else None
        ),
        state_averaging_bytes_per_token=state.get("sent_bytes", 0) / tokens,
        averaging_bytes_per_token=(grad.get("sent_bytes", 0) + state.get("sent_bytes", 0)) / tokens,
        expected_grad_rounds_per_stage=rounds_per_stage,
        expected_uncompressed_grad_bytes_per_token=expected_uncompressed_grad_bytes(spec, rounds_per_stage) / tokens,
        averaging_measurement="measured" if grad else "missing",
        epochs=epochs,
        final_train_loss=last["s0-driver"].get("loss"),
        final_eval_loss=loss_eval,
        retries=last["s0-driver"].get("retries"),
        final_weights_finite=finite,
    )


def _compare(row: dict, base: dict, bytes_key: str, robust_key: str, noise_pct: Optional[float]) -> dict:
    out = {"bytes_reduction_vs_none": base[bytes_key] / row[bytes_key] if row[bytes_key] and base[bytes_key] else None}
    if row.get(robust_key) and base.get(robust_key):
        out["normalized_bytes_reduction_vs_none"] = base[robust_key] / row[robust_key]
    for loss_key in ("final_train_loss", "final_eval_loss"):
        if row.get(loss_key) is not None and base.get(loss_key):
            out[f"{loss_key}_increase_pct_vs_none"] = 100.0 * (row[loss_key] - base[loss_key]) / base[loss_key]
    pct = out.get("final_eval_loss_increase_pct_vs_none", out.get("final_train_loss_increase_pct_vs_none"))
    reduction = out.get("normalized_bytes_reduction_vs_none", out["bytes_reduction_vs_none"])
    is_baseline = row is base
    out["meets_goal"] = (
        None if is_baseline else bool(reduction is not None and reduction >= 4.0 and pct is not None and pct <= 1.0)
    )
    if noise_pct is not None:
        out["baseline_loss_noise_pct"] = noise_pct  # two all-"none" runs: the resolution of the loss figures
    return out


def bench_compression(args, work: Path, driver_id: Path) -> None:
    batches = eval_batches(
        make_spec(args, "bench-eval"), args.data, suffixes=[args.data_suffix] if args.data_suffix else None
    )
    configs = [("none", "none", "")]
    configs += [(a, "none", "") for a in args.activation_codecs if a != "none"]
    configs += [("none", g, "") for g in args.gradient_codecs if g != "none"]
    if args.baseline_repeat:
        configs.append(("none", "none", "-repeat"))  # how far two identical runs land apart
    results: dict[tuple[str, str, str], dict] = {}
    last_run_s = 0.0
    for i, (a, g, tag) in enumerate(configs):
        label = f"activations={a} gradients={g}{' (baseline again)' if tag else ''}"
        left = args.deadline - time.monotonic()
        if left < last_run_s:
            emit(
                BENCH,
                "codec_run_skipped",
                activations=a,
                gradients=g,
                repeat=bool(tag),
                reason=f"--budget-s: {left:.0f}s left, the last run took {last_run_s:.0f}s",
            )
            say(f"[codecs {i + 1}/{len(configs)}] {label}: skipped (time budget)")
            continue
        run_started = time.monotonic()
        say(f"[codecs {i + 1}/{len(configs)}] {label}: 2 stages x 2 peers, {args.steps} micro-batches")
        try:
            row = run_codec(args, work / f"codec-a-{a}-g-{g}{tag}", driver_id, a, g, batches)
        except Exception as err:  # one failed codec must not cost the others their figures
            emit(
                BENCH,
                "codec_run_failed",
                activations=a,
                gradients=g,
                repeat=bool(tag),
                error=f"{type(err).__name__}: {str(err)[-2000:]}",
            )
            say(f"  FAILED: {str(err)[:500]}")
            continue
        finally:
            last_run_s = time.monotonic() - run_started
        results[(a, g, tag)] = row
        say(
            f"  {row['tokens']} tokens in {row['train_seconds']:.0f}s | act {row['activation_bytes_per_token']:,.0f} B/tok"
            f" | grad avg {row['grad_averaging_bytes_per_token']:,.0f} B/tok (completeness "
            f"{row['grad_averaging_completeness']:.2f}) | loss train {row['final_train_loss']:.4f}"
            + (f" eval {row['final_eval_loss']:.4f}" if row["final_eval_loss"] is not None else "")
        )
    base, again = results.get(("none", "none", "")), results.get(("none", "none", "-repeat"))
    noise = None
    if base and again:
        noise = {}
        for key in ("final_eval_loss", "final_train_loss"):
            if base.get(key) and again.get(key):
                noise[key] = 100.0 * abs(again[key] - base[key]) / base[key]
        emit(BENCH, "baseline_repeat", **{f"{k}_difference_pct": v for k, v in noise.items()}, first=base, again=again)
        noise = noise.get("final_eval_loss", noise.get("final_train_loss"))
    for (a, g, tag), row in results.items():
        if tag:
            continue
        common = dict(preset=args.preset, steps=args.steps, **row)
        goal = ">= 4x fewer bytes at <= 1% higher loss"
        if a != "none" or g == "none":
            extra = (
                _compare(row, base, "activation_bytes_per_token", "activation_bytes_per_token_one_crossing", noise)
                if base
                else {}
            )
            emit(
                BENCH,
                "activation_bytes_per_token",
                value=row["activation_bytes_per_token"],
                codec=a,
                goal=goal,
                **extra,
                **common,
            )
        if g != "none" or a == "none":
            extra = (
                _compare(
                    row, base, "grad_averaging_bytes_per_token", "grad_averaging_bytes_per_token_all_rounds", noise
                )
                if base
                else {}
            )
            emit(
                BENCH,
                "grad_averaging_bytes_per_token",
                value=row["grad_averaging_bytes_per_token"],
                codec=g,
                goal=goal,
                **extra,
                **common,
            )
    emit(BENCH, "codec_sweep_done", runs=len(results), planned=len(configs), machine=machine())


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
