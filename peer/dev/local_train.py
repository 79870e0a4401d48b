"""Single-process training of a run spec on local data: the baseline the swarm is measured against.

All stages of the spec are built and chained in one process (``peer.model.llama.build_stages`` /
``chain_forward``), and trained exactly as a swarm trains them, minus the network:

- the same data stream (``PackedDataset`` with the spec's seed; pass the swarm trainer's peer id
  as ``peer_key`` to see the very same batches in the same order);
- the same optimizer and LR schedule per stage (``peer.averaging.optimizer.make_torch_optimizer`` and
  ``lr_lambda``), with gradient clipping per stage as each stage group clips its own;
- one optimizer step per ``target_batch_size`` samples, on the mean gradient of the micro-batches
  (hivemind's sample-weighted average is that mean for equal micro-batches).

What it leaves out on purpose: delayed parameter updates (a swarm applies each update one step
late) and averaging noise from lossy codecs.

``python -m peer.dev.local_train --spec SPEC.toml --data DIR --steps N --threads 2 [--log-json]``
prints progress (JSON lines with ``--log-json``: ``status`` events with cumulative ``tokens``,
and a final ``done`` event); ``train_local`` is the same without the CLI.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import click
import torch

from peer.averaging.optimizer import lr_lambda, make_torch_optimizer
from peer.data import PackedDataset
from peer.data.tokenizer import load_tokenizer
from peer.model.llama import build_stages, causal_lm_loss, chain_forward
from protocol.spec import RunSpec, SpecError, load_spec, preset_spec


def train_local(
    spec: RunSpec,
    data_path,
    *,
    steps: int,
    threads: int = 2,
    suffixes: Optional[Sequence[str]] = None,
    peer_key: str = "local",
    warmup: Optional[int] = None,
    max_seconds: Optional[float] = None,
    status_every: float = 2.0,
    on_status: Optional[Callable[[dict], None]] = None,
    final_state: Optional[str] = None,
) -> dict:
    """Train all stages of ``spec`` in this process for ``steps`` micro-batches (or until
    ``max_seconds``) and return ``dict(tokens_per_s, losses, final_loss, ...)``.

    ``tokens_per_s`` leaves out the first ``warmup`` micro-batches (default: a tenth, at most 10),
    which pay for allocator warm-up and the first reads of the data; ``final_loss`` is the mean
    of the last ``min(10, steps)`` micro-batch losses. ``on_status`` receives a progress dict
    every ``status_every`` seconds. ``final_state``: a directory that gets ``stage<k>.safetensors``.
    """
    if steps < 1:
        raise ValueError("steps must be at least 1")
    if threads < 1:
        raise ValueError("threads must be at least 1")
    training = spec.training
    torch.set_num_threads(threads)
    torch.manual_seed(spec.seed)
    stages = build_stages(spec)
    # One optimizer and scheduler per stage, as in the swarm: each stage group clips its own norm.
    optimizers = [make_torch_optimizer([p for p in s.parameters() if p.requires_grad], training) for s in stages]
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(training)) for o in optimizers]
    accumulate = max(1, math.ceil(training.target_batch_size / training.micro_batch_size))
    dataset = PackedDataset(
        data_path,
        load_tokenizer(spec.tokenizer),
        seq_len=training.seq_len,
        batch_size=training.micro_batch_size,
        seed=spec.seed,
        peer_key=peer_key,
        suffixes=suffixes,
    )
    warmup = min(10, steps // 10) if warmup is None else max(0, warmup)

    losses: list[float] = []
    tokens = optimizer_steps = 0
    loss_ema: Optional[float] = None
    started = time.monotonic()
    measured_from, measured_tokens = (started, 0) if warmup == 0 else (None, 0)
    last_status = started

    def progress() -> dict:
        now = time.monotonic()
        return dict(
            microbatches=len(losses),
            tokens=tokens,
            optimizer_steps=optimizer_steps,
            loss=loss_ema,
            last_loss=losses[-1] if losses else None,
            tokens_per_s=tokens / max(1e-6, now - started),
            seconds=now - started,
        )

    for step in range(steps):
        batch = next(dataset)
        loss = causal_lm_loss(chain_forward(stages, batch), batch)
        (loss / accumulate).backward()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"loss became {value} at micro-batch {step}")
        losses.append(value)
        # The swarm trainer's EMA, so that the two "loss" figures are read the same way.
        loss_ema = value if loss_ema is None else 0.95 * loss_ema + 0.05 * value
        tokens += batch.numel()
        if (step + 1) % accumulate == 0:
            for opt, sched in zip(optimizers, schedulers):
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            optimizer_steps += 1
        now = time.monotonic()
        if step + 1 == warmup:
            measured_from, measured_tokens = now, tokens
        if on_status is not None and now - last_status >= status_every:
            last_status = now
            on_status(progress())
        if max_seconds is not None and now - started >= max_seconds:
            break

    ended = time.monotonic()
    if measured_from is None or tokens == measured_tokens:  # stopped inside the warm-up
        measured_from, measured_tokens = started, 0
    if final_state:
        from peer.model.tensor_files import save_tensors

        for k, stage in enumerate(stages):
            save_tensors(stage.state_dict(), Path(final_state) / f"stage{k}.safetensors")
    tail = losses[-min(10, len(losses)) :]
    return dict(
        tokens_per_s=(tokens - measured_tokens) / max(1e-6, ended - measured_from),
        tokens_per_s_total=tokens / max(1e-6, ended - started),
        losses=losses,
        final_loss=sum(tail) / len(tail),
        loss_ema=loss_ema,
        tokens=tokens,
        microbatches=len(losses),
        optimizer_steps=optimizer_steps,
        seconds=ended - started,
        threads=threads,
    )


@click.command()
@click.option("--spec", "spec_path", type=click.Path(exists=True, dir_okay=False), help="Run spec (TOML).")
@click.option("--preset", default="tiny", show_default=True, help="Used when no --spec is given.")
@click.option("--stages", type=int, default=None, help="Stages of the preset (the partition does not change the math).")
@click.option("--data", required=True, type=click.Path(exists=True), help="Local text: a file or a directory.")
@click.option("--data-suffix", "suffixes", multiple=True, help="Only read files with these suffixes (e.g. .py).")
@click.option("--steps", type=int, default=1000, show_default=True, help="Micro-batches to train.")
@click.option("--max-seconds", type=float, default=None, help="Stop after this long.")
@click.option("--threads", type=int, default=2, show_default=True, help="torch threads.")
@click.option(
    "--peer-key",
    default="local",
    show_default=True,
    help="Data-order key: a swarm trainer's peer id gives its exact batches.",
)
@click.option(
    "--warmup", type=int, default=None, help="Micro-batches left out of tokens/s (default: a tenth, at most 10)."
)
@click.option("--status-every", type=float, default=2.0, show_default=True)
@click.option(
    "--final-state", type=click.Path(file_okay=False), default=None, help="Directory for stage<k>.safetensors on exit."
)
@click.option("--log-json", is_flag=True, help="JSON lines: status events and a final 'done' event.")
def main(
    spec_path,
    preset,
    stages,
    data,
    suffixes,
    steps,
    max_seconds,
    threads,
    peer_key,
    warmup,
    status_every,
    final_state,
    log_json,
):
    """Train a spec's whole model in one process (the swarm benchmark's baseline)."""
    try:
        spec = load_spec(spec_path) if spec_path else preset_spec(preset, stages=stages, run_id="local")
    except SpecError as err:
        raise click.ClickException(str(err)) from None

    def emit(name: str, fields: dict, text: str) -> None:
        if log_json:
            print(json.dumps({"event": name, "time": round(time.time(), 3), **fields}), flush=True)
        else:
            print(f"[local] {text}", flush=True)

    def on_status(p: dict) -> None:
        loss = f"loss {p['loss']:.3f} | " if p["loss"] is not None else ""
        emit(
            "status",
            p,
            f"step {p['microbatches']} | {loss}{p['tokens_per_s']:,.0f} tok/s | optimizer step {p['optimizer_steps']}",
        )

    emit(
        "starting",
        dict(threads=threads, steps=steps, digest=spec.digest()),
        f"training {spec.model.num_hidden_layers} layers in one process, {threads} threads, {steps} micro-batches",
    )
    result = train_local(
        spec,
        data,
        steps=steps,
        threads=threads,
        suffixes=list(suffixes) or None,
        peer_key=peer_key,
        warmup=warmup,
        max_seconds=max_seconds,
        status_every=status_every,
        on_status=on_status,
        final_state=final_state,
    )
    summary = {k: v for k, v in result.items() if k != "losses"}
    emit(
        "done",
        summary,
        f"done: {result['tokens']} tokens, {result['tokens_per_s']:,.0f} tok/s, final loss {result['final_loss']:.3f}",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
