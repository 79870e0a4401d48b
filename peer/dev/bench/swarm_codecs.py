"""``peer.dev.bench.swarm``'s second part: bytes on the wire per trained token, per codec, against
no compression, with the final loss at the same number of tokens (the module ``swarm`` says how)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from peer.averaging.wire_stats import ENV as WIRE_STATS_ENV
from peer.averaging.wire_stats import read_totals
from peer.dev.bench.common import (
    emit,
    eval_batches,
    eval_loss,
    graceful_stop,
    machine,
    make_spec,
    peer_args,
    say,
    weights_finite,
)
from peer.dev.launcher import Cluster
from peer.model.llama import stage_param_shapes
from protocol.spec import RunSpec

BENCH = "swarm"
ACTIVATION_CODECS = ("none", "fp16", "uniform8bit", "blockwise8bit")
GRADIENT_CODECS = ("none", "fp16", "uniform8bit", "blockwise8bit", "powersgd")
READY_TIMEOUT = 180.0  # a loaded 2-core machine takes a while to start hivemind and p2pd


def swarm_spec(args, run_id: str, *, activations: str = "fp16", gradients: str = "blockwise8bit") -> RunSpec:
    """The swarm benchmark's spec: ``--preset`` in 2 stages with its overrides and these codecs."""
    return make_spec(
        args.preset,
        run_id,
        compression=dict(activations=activations, gradients=gradients),
        micro_batch_size=args.micro_batch_size or None,
        seq_len=args.seq_len or None,
        target_batch_size=args.target_batch_size or None,
    )


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
    spec = swarm_spec(args, run_id, activations=activations, gradients=gradients)
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
                extra=peer_args(args.data_suffix, seconds=safety, final_state=states / f"{name}.safetensors"),
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
                args.data_suffix,
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
        swarm_spec(args, "bench-eval"), args.data, suffixes=[args.data_suffix] if args.data_suffix else None
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
