"""peer.averaging.guards: what one member of a per_step group can no longer do to the average."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from hivemind.averaging import allreduce, averager, partition
from hivemind.proto import runtime_pb2

from peer.averaging import guards
from protocol.codecs import TensorRejected, encode


@pytest.fixture(autouse=True)
def installed():
    guards.install(max_weight=32)


def average(parts_and_weights):
    async def run():
        reducer = partition.TensorPartReducer([torch.Size([4])], num_senders=len(parts_and_weights))
        return await asyncio.gather(
            *(reducer.accumulate_part(i, 0, part, weight=w) for i, (part, w) in enumerate(parts_and_weights))
        )

    return asyncio.run(run())[0]


def test_a_nan_part_is_left_out_of_the_average():
    honest = [(torch.ones(4), 8.0), (3 * torch.ones(4), 8.0)]
    assert torch.equal(average([*honest, (torch.full((4,), float("nan")), 8.0)]), 2 * torch.ones(4))


def test_a_claimed_weight_counts_for_at_most_the_target_batch():
    got = average([(torch.zeros(4), 32.0), (torch.ones(4), 1e12)])  # the liar is capped at 32: half
    assert torch.allclose(got, 0.5 * torch.ones(4))
    for bad in (float("nan"), float("inf"), -5.0):
        assert torch.equal(average([(torch.zeros(4), 8.0), (torch.ones(4) * 100, bad)]), torch.zeros(4))


def test_a_round_of_refused_parts_averages_to_zero_not_nan():
    got = average([(torch.full((4,), float("nan")), 8.0), (torch.ones(4), 0.0)])
    assert torch.equal(got, torch.zeros(4)) and not math.isnan(float(got.sum()))


def test_parts_are_checked_before_hivemind_deserializes_them():
    bad = runtime_pb2.Tensor(compression=runtime_pb2.FLOAT16, dtype="(250000000,)f8", size=[1, 2, 16], buffer=bytes(16))
    with pytest.raises(TensorRejected):
        allreduce.deserialize_torch_tensor(bad)
    with pytest.raises(TensorRejected):  # the live state download decodes with the same check
        averager.deserialize_torch_tensor(bad)
    good = encode(torch.randn(8, 4096), "blockwise8bit")
    assert allreduce.deserialize_torch_tensor(good).shape == (8, 4096)
