"""The capacity a peer announces for its stage (peer.model.capacity)."""

import itertools

import pytest
import torch

from peer.model.capacity import best_rate, measure_stage_capacity
from peer.model.llama import LlamaStage
from protocol.spec import preset_spec


@pytest.fixture(scope="module")
def spec():
    return preset_spec("tiny", stages=3, training=dict(micro_batch_size=2, seq_len=16))


def test_the_fastest_pass_counts():
    # A busy machine can only slow a pass down: 4 samples in 0.5 s at best is 8 samples/s.
    assert best_rate(4, [2.0, 0.5, 1.0]) == 8.0


@pytest.mark.parametrize(
    "samples, seconds, message",
    [
        (0, [1.0], "samples must be > 0"),
        (4, [], "no timed pass"),
        (4, [float("nan"), -1.0], "no timed pass"),
    ],
)
def test_a_rate_needs_samples_and_a_timed_pass(samples, seconds, message):
    with pytest.raises(ValueError, match=message):
        best_rate(samples, seconds)


@pytest.mark.parametrize("stage", [0, 1, 2])  # embedding, middle, head and loss
def test_measuring_leaves_the_stage_untouched(spec, stage):
    module = LlamaStage.from_spec(spec, stage)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    capacity = measure_stage_capacity(spec, module, max_passes=2)
    assert capacity.samples_per_s > 0 and capacity.passes == 2
    assert all(p.grad is None for p in module.parameters())
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_a_slow_stage_stops_at_the_time_budget(spec):
    # A fake clock where every reading is 1 s later: the warm-up takes 1 s, the first timed
    # pass 1 s, and then the 1.5 s budget is spent.
    ticks = itertools.count()
    capacity = measure_stage_capacity(
        spec, LlamaStage.from_spec(spec, 1), max_passes=10, budget_s=1.5, clock=lambda: float(next(ticks))
    )
    assert capacity.passes == 1
    assert capacity.samples_per_s == pytest.approx(spec.training.micro_batch_size / 1.0)


def test_at_least_one_pass_is_asked_for(spec):
    with pytest.raises(ValueError, match="max_passes"):
        measure_stage_capacity(spec, LlamaStage.from_spec(spec, 0), max_passes=0)
