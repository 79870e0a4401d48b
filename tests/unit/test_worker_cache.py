"""The stage worker's forward cache is bounded in bytes, and always holds a few micro-batches."""

from __future__ import annotations

import pytest
import torch

from peer.model.llama import LlamaStage
from peer.pipeline.worker import MIN_CACHED_FORWARDS, StageError, StageWorker
from protocol.spec import preset_spec


@pytest.fixture
def stage0():
    spec = preset_spec("tiny", stages=2)
    return spec, LlamaStage.from_spec(spec, 0)


def fill(worker, spec, n):
    ids = torch.randint(0, spec.model.vocab_size, (spec.training.micro_batch_size, spec.training.seq_len))
    for i in range(n):
        worker.forward(f"mb-{i}", ids).result(timeout=60)


def test_the_byte_budget_evicts_the_oldest_forwards(stage0):
    spec, module = stage0
    worker = StageWorker(module, is_last=False, cache_bytes=1)  # no budget at all
    try:
        fill(worker, spec, MIN_CACHED_FORWARDS + 4)
        assert len(worker._cache) == MIN_CACHED_FORWARDS  # the floor, not one entry
        # An evicted forward costs its backward a cache miss (the trainer re-sends the inputs).
        grad = torch.zeros(spec.training.micro_batch_size, spec.training.seq_len, spec.model.hidden_size)
        with pytest.raises(StageError) as err:
            worker.backward("mb-0", grad).result(timeout=60)
        assert err.value.code == "cache_miss"
        worker.backward(f"mb-{MIN_CACHED_FORWARDS + 3}", grad).result(timeout=60)  # the newest is there
        assert worker._cache_cost == sum(c.cost for c in worker._cache.values())
    finally:
        worker.shutdown()


def test_a_larger_budget_holds_more(stage0):
    spec, module = stage0
    worker = StageWorker(module, is_last=False)
    try:
        fill(worker, spec, 3)
        one = next(iter(worker._cache.values())).cost
        worker.cache_bytes = 12 * one
        fill(worker, spec, 20)
        assert len(worker._cache) == 12 and worker._cache_cost <= worker.cache_bytes
    finally:
        worker.shutdown()
