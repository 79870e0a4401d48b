"""What the hostile-peer defences cost: validation time next to compute time per request, and
a 2x2 swarm's tokens/s on this code against the code before the defences, side by side.

    .venv/bin/python scripts/bench_hostile.py > hostile.jsonl            # 3 repeats x 120 s per side
    .venv/bin/python scripts/bench_hostile.py --quick                     # 1 repeat x 30 s: a smoke run

- ``validation``: per preset (tiny, small) and activation codec, one micro-batch of the spec's
  shape arriving at a stage: the time to check and decode it (``Limits.check_inputs``: the
  buffer checks, hivemind's deserializer, shape and finiteness) against hivemind's bare
  deserializer alone and against the stage's forward+backward on it (median of repeats).
  Also the per micro-batch gradient clip (``pipeline.clipping.grad_norm`` over the stage's
  parameter gradients) next to the same compute.
- ``cache_entry``: the memory one cached forward holds on stage 0 (RSS growth over kept
  forwards) next to the estimate the worker's forward-cache byte budget counts.
- ``swarm``: a bootstrap and 2 stages x 2 peers (both stage-0 peers train) on the tiny preset,
  once with this checkout and once with ``--base`` (a git worktree), alternating, ``--repeats``
  times each; tokens/s is the sum of the trainers' steady rates. Every process is started
  through ``peer.dev.launcher.Cluster`` with ``PYTHONPATH`` pointing at the code under test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hivemind.compression import deserialize_torch_tensor

from peer.data import stdlib_text_path
from peer.dev.bench.common import emit, machine, make_spec, say, sigterm_as_interrupt, status_points, steady_rate
from peer.dev.launcher import SWARMTRAIN, Cluster
from peer.model.llama import LlamaStage, causal_lm_loss
from peer.pipeline.clipping import grad_norm
from peer.pipeline.server import Limits
from protocol.codecs import encode
from protocol.spec import preset_spec

ROOT = Path(__file__).resolve().parents[3]  # this checkout: the code under test, and its git repository

# The last commit before the hostile-peer defences (the house issue's last commit).
DEFAULT_BASE = "4860bf6"


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def validation(preset: str, codec: str, repeats: int) -> dict:
    spec = preset_spec(preset, stages=2)
    torch.manual_seed(0)
    mb, seq, hidden = spec.training.micro_batch_size, spec.training.seq_len, spec.model.hidden_size
    x = torch.randn(mb, seq, hidden)
    proto = encode(x, codec)
    limits = Limits.for_stage(spec, 1)
    module = LlamaStage.from_spec(spec, 1)
    labels = torch.randint(0, spec.model.vocab_size, (mb, seq))

    def compute():
        inputs = x.detach().requires_grad_(True)
        loss = causal_lm_loss(module(inputs), labels)
        loss.backward()

    compute()  # warm-up
    checked = _median_ms(lambda: limits.check_inputs(proto), repeats)
    bare = _median_ms(lambda: deserialize_torch_tensor(proto), repeats)
    compute_ms = _median_ms(compute, max(3, repeats // 4))
    grads = [p.grad for p in module.parameters()]
    clip_ms = _median_ms(lambda: grad_norm(grads), repeats)  # the per micro-batch clip's cost
    return dict(
        preset=preset,
        codec=codec,
        request_bytes=proto.ByteSize(),
        validate_ms=checked,
        bare_deserialize_ms=bare,
        compute_ms=compute_ms,
        validate_over_compute=checked / compute_ms,
        checks_over_bare=(checked - bare) / compute_ms,
        clip_ms=clip_ms,
        clip_over_compute=clip_ms / compute_ms,
    )


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cache_entry(preset: str, entries: int) -> dict:
    """Memory one cached forward holds on stage 0 (what the worker's forward-cache budget counts),
    measured as RSS growth over ``entries`` kept forwards, next to the worker's estimate."""
    from peer.pipeline.worker import StageWorker

    spec = preset_spec(preset, stages=2)
    module = LlamaStage.from_spec(spec, 0)
    ids = torch.randint(0, spec.model.vocab_size, (spec.training.micro_batch_size, spec.training.seq_len))
    with torch.enable_grad():
        module(ids)  # allocator warm-up
    kept, before = [], _rss()
    for _ in range(entries):
        with torch.enable_grad():
            kept.append(module(ids))
    measured = (_rss() - before) / entries
    out = kept[-1]
    worker = StageWorker(module, is_last=False)
    estimate = out.numel() * out.element_size() * worker._cost_factor
    worker.shutdown()
    return dict(
        preset=preset,
        entries=entries,
        measured_bytes=measured,
        estimated_bytes=estimate,
        estimate_over_measured=estimate / measured if measured > 0 else None,
    )


def base_worktree(base: str, where: Path) -> Path:
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "-f", "--detach", str(where), base], check=True, capture_output=True
    )
    return where


def swarm_rate(code: Path, seconds: float, workdir: Path) -> dict:
    """tokens/s of a 2x2 tiny swarm running the code at ``code``."""
    spec = make_spec("tiny", "benchhostile", target_batch_size=32, matchmaking_time=2.0, averaging_timeout=15.0)
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path = workdir / "spec.toml"
    spec.save(spec_path)
    env = {"PYTHONPATH": str(code)}
    data = str(stdlib_text_path())
    with Cluster(workdir / "cluster", env=env) as cluster:
        _, addr = cluster.bootstrap(spec_path=spec_path, timeout=240)
        trainers = []
        for k, name in enumerate(("s0a", "s1a", "s0b", "s1b")):
            stage = k % 2
            extra = ["--data-suffix", ".py"] if stage == 0 else []
            proc = cluster.peer(
                name,
                [addr],
                spec_path=spec_path,
                stage=stage,
                data=data if stage == 0 else None,
                extra=extra,
                command=SWARMTRAIN,
            )
            if stage == 0:
                trainers.append(proc)
        for proc in cluster.procs[1:]:
            proc.wait_event("ready", 240)
        time.sleep(seconds)
        rates = [steady_rate(status_points(p.events), warmup_s=min(20.0, seconds / 3)) for p in trainers]
    total = sum(r["tokens_per_s"] for r in rates if r)
    return dict(tokens_per_s=total, trainers=[r and round(r["tokens_per_s"], 1) for r in rates])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat x 30 s per side, tiny preset only")
    parser.add_argument("--repeats", type=int, default=3, help="swarm runs per side (alternating)")
    parser.add_argument("--seconds", type=float, default=120.0, help="length of one swarm run")
    parser.add_argument("--base", default=DEFAULT_BASE, help="the code before the defences (a git revision)")
    parser.add_argument("--no-swarm", action="store_true", help="only the validation figures")
    args = parser.parse_args()
    sigterm_as_interrupt()
    torch.set_num_threads(1)
    if args.quick:
        args.repeats, args.seconds = 1, 30.0
    emit("hostile", "machine", **machine())
    presets = ["tiny"] if args.quick else ["tiny", "small"]
    # First, in a fresh process: RSS growth is only a measure while freed memory cannot be reused.
    for preset in presets:
        fig = cache_entry(preset, entries=10 if args.quick else 30)
        say(
            f"cache entry {preset}: measured {fig['measured_bytes'] / 2**20:.1f} MiB, estimated "
            f"{fig['estimated_bytes'] / 2**20:.1f} MiB"
        )
        emit("hostile", "cache_entry", **fig)
    for preset in presets:
        for codec in ("fp16", "blockwise8bit", "none"):
            fig = validation(preset, codec, repeats=5 if args.quick else 50)
            say(
                f"validation {preset} {codec}: {fig['validate_ms']:.2f} ms checked, {fig['bare_deserialize_ms']:.2f} ms "
                f"bare, {fig['compute_ms']:.1f} ms compute ({100 * fig['validate_over_compute']:.1f}%); gradient "
                f"clip {fig['clip_ms']:.2f} ms ({100 * fig['clip_over_compute']:.1f}%)"
            )
            emit("hostile", "validation", **fig)
    if args.no_swarm:
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        tmp = Path(tmp)
        base = base_worktree(args.base, tmp / "base")
        try:
            rates = {"new": [], "base": []}
            for i in range(args.repeats):
                for side, code in (("new", ROOT), ("base", base)) if i % 2 == 0 else (("base", base), ("new", ROOT)):
                    say(f"swarm run {i + 1}/{args.repeats}: {side} ({args.seconds:.0f} s)")
                    fig = swarm_rate(code, args.seconds, tmp / f"{side}-{i}")
                    rates[side].append(fig["tokens_per_s"])
                    emit(
                        "hostile",
                        "swarm_run",
                        side=side,
                        repeat=i,
                        seconds=args.seconds,
                        **fig,
                        loadavg_1m=os.getloadavg()[0],
                    )
            new, old = statistics.mean(rates["new"]), statistics.mean(rates["base"])
            emit(
                "hostile",
                "swarm",
                base=args.base,
                repeats=args.repeats,
                seconds=args.seconds,
                new_tokens_per_s=rates["new"],
                base_tokens_per_s=rates["base"],
                ratio=new / old if old else None,
            )
            say(
                f"swarm: new {new:.0f} tokens/s, base {old:.0f} tokens/s, ratio {new / old if old else float('nan'):.3f}"
            )
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
