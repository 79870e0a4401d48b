"""Helpers shared by the benchmarks of ``peer.dev.bench``: JSON output, the benchmarks' specs,
peer options and graceful stops, steady-state rates, held-out loss.

Every benchmark prints one JSON object per measurement on stdout and its progress on stderr,
so that ``bench_x.py > results.jsonl`` keeps only the figures.
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from peer.data import fixed_batch
from peer.data.tokenizer import load_tokenizer
from peer.model.llama import build_stages, causal_lm_loss, chain_forward
from protocol.spec import RunSpec, preset_spec


def say(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def default_text_data(args) -> None:
    """``--data`` unset: train on this Python's standard library sources (always there, offline)."""
    if args.data is None:
        from peer.data.files import stdlib_text_path

        args.data = str(stdlib_text_path())
        args.data_suffix = args.data_suffix or ".py"


def check_choices(parser, values, allowed, what: str) -> None:
    """A clear usage error for a value of a comma-separated option that is not one of ``allowed``."""
    for v in values:
        if v not in allowed:
            parser.error(f"unknown {what} {v!r}; choose from {', '.join(allowed)}")


def make_spec(
    preset: str, run_id: str, *, stages: int = 2, seed: int = 0, compression: Optional[dict] = None, **training
) -> RunSpec:
    """A benchmark's spec: ``preset`` in ``stages`` stages with these ``training`` values (a value
    of None, also inside a dict ``outer``, leaves the preset's or the spec's default)."""
    training = {k: v for k, v in training.items() if v is not None}
    if isinstance(training.get("outer"), dict):
        training["outer"] = {k: v for k, v in training["outer"].items() if v is not None}
    sections = {"compression": compression} if compression is not None else {}
    return preset_spec(preset, stages=stages, run_id=run_id, seed=seed, training=training, **sections)


def peer_args(
    data_suffix: Optional[str],
    *,
    seconds: Optional[float] = None,
    steps: Optional[int] = None,
    identity: Optional[Path] = None,
    final_state: Optional[Path] = None,
) -> list[str]:
    """``swarmtrain run`` options of a benchmark's peer: a status event every second, and the
    data suffix, time or step limit, identity and final-state file given."""
    extra = ["--status-every", "1"]
    if data_suffix:
        extra += ["--data-suffix", data_suffix]
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


def emit(bench: str, metric: str, **fields) -> dict:
    """One measurement as one JSON line on stdout."""
    record = _finite_or_none({"bench": bench, "metric": metric, **fields})
    print(json.dumps(record, default=_jsonable, allow_nan=False), flush=True)
    return record


def _finite_or_none(value):
    """NaN and infinities are not JSON: a diverged figure is reported as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def _jsonable(value):
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, Path):
        return str(value)
    return str(value)


def machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpus": os.cpu_count(),
        "loadavg_1m": load[0] if load else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host": platform.node(),
    }


def sigterm_as_interrupt() -> None:
    """SIGTERM (a CI timeout) unwinds like Ctrl-C, so every Cluster's ``with`` block kills its
    processes on the way out."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def steady_rate(points: Sequence[tuple[float, int]], warmup_s: float) -> Optional[dict]:
    """Tokens/s between the first point at least ``warmup_s`` after tokens started to flow and
    the last point. ``points`` are (wall time, cumulative tokens), in time order.

    The first seconds of any run pay for connection set-up, allocator warm-up and the first
    data reads; both sides of a comparison go through the same rule."""
    points = [(t, n) for t, n in points if n is not None]
    flowing = [i for i, (_, n) in enumerate(points) if n > 0]
    if not flowing:
        return None
    t_first = points[flowing[0]][0]
    start = next((i for i in flowing if points[i][0] >= t_first + warmup_s), None)
    if start is None or start >= len(points) - 1:
        start = flowing[0]  # a run too short for the warm-up: measure what there is
    (t0, n0), (t1, n1) = points[start], points[-1]
    if t1 <= t0:
        return None
    return {
        "tokens_per_s": (n1 - n0) / (t1 - t0),
        "window_s": t1 - t0,
        "window_tokens": n1 - n0,
        "tokens": n1,
        "warmup_s": t0 - t_first,
    }


def status_points(events: Iterable[dict], names: Sequence[str] = ("status",)) -> list[tuple[float, int]]:
    return [(e["time"], e.get("tokens")) for e in events if e.get("event") in names and "time" in e]


def eval_batches(
    spec: RunSpec,
    data: str | Path,
    *,
    suffixes: Optional[Sequence[str]],
    batches: int = 4,
    batch_size: int = 32,
    seed: int = 424242,
) -> list[torch.Tensor]:
    """Fixed evaluation batches: the same tokens for every run of a benchmark."""
    tokenizer = load_tokenizer(spec.tokenizer)
    return [
        fixed_batch(
            data, tokenizer, seq_len=spec.training.seq_len, batch_size=batch_size, seed=seed + i, suffixes=suffixes
        )
        for i in range(batches)
    ]


@torch.no_grad()
def eval_loss(spec: RunSpec, stage_files: Sequence[Path], batches: Sequence[torch.Tensor]) -> Optional[float]:
    """Mean next-token loss of the model made of these stage weight files (safetensors, one per
    stage, HF names) on ``batches``; None when a file is missing."""
    from safetensors.torch import load_file

    if any(not Path(f).is_file() for f in stage_files):
        return None
    stages = build_stages(spec)
    for stage, path in zip(stages, stage_files):
        stage.load_state_dict(load_file(str(path)))
        stage.eval()
    losses = [float(causal_lm_loss(chain_forward(stages, b), b)) for b in batches]
    return sum(losses) / len(losses)


def weights_finite(path: Path) -> Optional[bool]:
    """Whether every tensor of a safetensors file is finite; None when the file is missing."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        return None
    return all(bool(torch.isfinite(t).all()) for t in load_file(str(path)).values())
