"""peer.averaging.bounds: an epoch another member claims cannot hang or mislead this peer."""

from __future__ import annotations

import time

import pytest
import torch

from peer.averaging.bounds import update_scheduler_fast
from peer.averaging.optimizer import lr_lambda
from protocol.spec import TrainingSpec


class FakeStateAverager:
    def __init__(self, training: TrainingSpec):
        param = torch.nn.Parameter(torch.zeros(1))
        self.optimizer = torch.optim.SGD([param], lr=training.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(training))
        self.local_epoch = 0


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_the_fast_scheduler_update_matches_hivemind_loop(schedule):
    training = TrainingSpec(lr_schedule=schedule, warmup_steps=5, total_steps=40)
    fast, slow = FakeStateAverager(training), FakeStateAverager(training)
    for epoch in [0, 1, 3, 4, 5, 17, 39, 40, 41, 60]:
        fast.local_epoch = slow.local_epoch = epoch
        update_scheduler_fast(fast)
        while slow.scheduler._step_count <= slow.local_epoch:  # hivemind's _update_scheduler
            slow.scheduler.step()
        assert fast.optimizer.param_groups[0]["lr"] == pytest.approx(slow.optimizer.param_groups[0]["lr"])
        assert fast.scheduler.get_last_lr() == pytest.approx(slow.scheduler.get_last_lr())
        assert fast.scheduler._step_count == slow.scheduler._step_count


def test_a_huge_epoch_costs_no_loop():
    state = FakeStateAverager(TrainingSpec(lr_schedule="cosine", warmup_steps=5, total_steps=40))
    state.local_epoch = 2**40
    started = time.monotonic()
    update_scheduler_fast(state)
    assert time.monotonic() - started < 1.0  # hivemind's loop would step 2**40 times
    assert state.scheduler.last_epoch == 2**40
