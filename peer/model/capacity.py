"""A peer's capacity for a stage: samples/s through one forward and backward pass, measured
once when the stage opens and announced from then on.

Rebalancing compares the stages' summed figures (``peer.swarm.balancing``), so the figure must hold
still: a peer that announced its live compute rate (an EMA of each micro-batch's time) swung by
2x or more whenever the other processes on the machine were busy, and the peers of a
three-against-one swarm moved back and forth between the stages (tests/integration/test_churn_swarm.py). Petals
does the same: servers measure their throughput once at start-up, on synthetic inputs.

The passes run on synthetic inputs of the spec's micro-batch shape with
``torch.autograd.grad``, so they leave the module's ``.grad`` fields and weights untouched.
The best pass counts, not the mean: another process taking the CPU can only make a pass
slower, so the fastest pass is the closest to what the stage can do.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from peer.model.llama import LlamaStage, causal_lm_loss
from protocol.spec import RunSpec

__all__ = ["Capacity", "measure_stage_capacity", "best_rate"]


@dataclass(frozen=True)
class Capacity:
    samples_per_s: float
    passes: int  # timed passes (after one untimed warm-up pass)
    seconds: float  # wall time of the measurement, warm-up included


def best_rate(samples: int, pass_seconds: list[float]) -> float:
    """Samples/s of the fastest timed pass."""
    if samples <= 0:
        raise ValueError(f"samples must be > 0, got {samples}")
    finite = [s for s in pass_seconds if math.isfinite(s) and s >= 0]
    if not finite:
        raise ValueError("no timed pass to rate")
    return samples / max(min(finite), 1e-9)


def _synthetic_inputs(spec: RunSpec, module: LlamaStage, generator: torch.Generator) -> torch.Tensor:
    batch, seq = spec.training.micro_batch_size, spec.training.seq_len
    if module.has_embedding:
        return torch.randint(0, spec.model.vocab_size, (batch, seq), generator=generator)
    dtype = next(module.parameters()).dtype
    return torch.randn(batch, seq, spec.model.hidden_size, generator=generator).to(dtype).requires_grad_(True)


def _one_pass(module: LlamaStage, inputs: torch.Tensor, labels: torch.Tensor) -> None:
    params = [p for p in module.parameters() if p.requires_grad]
    targets = ([inputs] if inputs.dtype.is_floating_point else []) + params
    with torch.enable_grad():
        outputs = module(inputs)
        if module.has_head:
            outputs = causal_lm_loss(outputs, labels)
            grad_outputs = None
        else:
            grad_outputs = torch.ones_like(outputs)
        torch.autograd.grad(outputs, targets, grad_outputs=grad_outputs, allow_unused=True)


def measure_stage_capacity(
    spec: RunSpec,
    module: LlamaStage,
    *,
    max_passes: int = 10,
    budget_s: float = 2.0,
    clock: Callable[[], float] = time.perf_counter,
) -> Capacity:
    """Samples/s that ``module`` (a stage of ``spec``) runs forward and backward, best of up to
    ``max_passes`` timed passes; it stops early once ``budget_s`` is spent, after at least
    one timed pass (a big stage on a slow CPU takes seconds per pass)."""
    if max_passes < 1:
        raise ValueError(f"max_passes must be >= 1, got {max_passes}")
    generator = torch.Generator().manual_seed(0)
    inputs = _synthetic_inputs(spec, module, generator)
    labels = torch.randint(0, spec.model.vocab_size, (inputs.shape[0], inputs.shape[1]), generator=generator)
    started = clock()
    _one_pass(module, inputs, labels)  # warm-up: allocator and kernels
    times: list[float] = []
    while len(times) < max_passes:
        t0 = clock()
        _one_pass(module, inputs, labels)
        times.append(clock() - t0)
        if clock() - started >= budget_s:
            break
    return Capacity(best_rate(inputs.shape[0], times), len(times), clock() - started)
