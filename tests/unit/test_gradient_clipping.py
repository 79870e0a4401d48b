"""Per micro-batch gradient clipping at a stage (peer.pipeline.clipping): a trainer that sends
backward gradients scaled x1000 moves the stage by at most a few honest micro-batches."""

from __future__ import annotations

import math

import pytest
import torch

from peer.model.llama import LlamaStage
from peer.pipeline.clipping import MicroBatchClip
from peer.pipeline.worker import StageError, StageWorker
from protocol.spec import preset_spec


def test_the_bound_is_a_multiple_of_the_running_median():
    clip = MicroBatchClip(factor=3.0, window=8, warmup=4)
    assert [clip.admit(n) for n in (1.0, 2.0, 1.5, 1.0)] == [1.0] * 4  # warm-up: taken as they come
    assert clip.limit() == 3.0  # 3 x the lower median (1.0)
    assert clip.admit(2.9) == 1.0
    assert clip.admit(3000.0) == pytest.approx(4.5 / 3000.0)  # the median is now 1.5
    # What is remembered is the clipped norm: a run of poisoned micro-batches does not raise the bound.
    for _ in range(20):
        clip.admit(1e6)
    assert clip.limit() == 4.5
    with pytest.raises(ValueError):
        clip.admit(math.nan)
    with pytest.raises(ValueError):
        MicroBatchClip(factor=0.5)


@pytest.fixture
def stage0():
    torch.manual_seed(0)
    spec = preset_spec("tiny", stages=2)
    module = LlamaStage.from_spec(spec, 0)
    worker = StageWorker(module, is_last=False, clip=MicroBatchClip())  # no optimizer: p.grad holds the last one
    yield spec, module, worker
    worker.shutdown()


def _backward(spec, module, worker, i, scale):
    mb, seq = spec.training.micro_batch_size, spec.training.seq_len
    ids = torch.randint(0, spec.model.vocab_size, (mb, seq))
    out = worker.forward(f"mb-{i}", ids).result(timeout=60)
    grad = torch.randn_like(out) * 1e-3 * scale
    worker.backward(f"mb-{i}", grad).result(timeout=60)
    return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in module.parameters() if p.grad is not None))


def test_a_backward_scaled_x1000_is_clipped_at_the_stage(stage0):
    spec, module, worker = stage0
    honest = [_backward(spec, module, worker, i, 1.0) for i in range(10)]
    assert worker.stats.clipped == 0
    applied = _backward(spec, module, worker, 10, 1000.0)
    assert worker.stats.clipped == 1
    median = sorted(honest)[(len(honest) - 1) // 2]
    assert applied <= 3.0 * median * 1.001, (applied, median)
    # Honest micro-batches after it are taken as they are.
    _backward(spec, module, worker, 11, 1.0)
    assert worker.stats.clipped == 1


def test_a_non_finite_backward_is_refused_at_the_stage(stage0):
    spec, module, worker = stage0
    mb, seq = spec.training.micro_batch_size, spec.training.seq_len
    out = worker.forward("nan", torch.randint(0, spec.model.vocab_size, (mb, seq))).result(timeout=60)
    with pytest.raises(StageError, match="not finite"):
        worker.backward("nan", torch.full_like(out, float("nan"))).result(timeout=60)
    assert worker.stats.samples == 0
