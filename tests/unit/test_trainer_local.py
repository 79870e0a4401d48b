"""The trainer's own stage while the peer moves it: one ``LocalStage`` value swapped whole, and a
hop routed to a stage the peer no longer holds fails like any other peer's (retried elsewhere),
never with an AttributeError the trainer's retries do not catch. Real stage workers (their
threads), no network: a one-stage pipeline that the trainer computes itself."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from peer.model.llama import LlamaStage
from peer.pipeline import RemoteError, StageWorker, Trainer
from peer.pipeline.trainer import LOCAL, LocalStage
from protocol.rpc import ErrorCode
from protocol.spec import preset_spec

pytestmark = pytest.mark.timeout(120)


def one_stage():
    spec = preset_spec("tiny", stages=1, training=dict(micro_batch_size=2, seq_len=16))
    torch.manual_seed(0)
    return spec, LlamaStage.from_spec(spec, 0)


def batch(spec):
    return torch.randint(0, spec.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))


def test_a_hop_to_a_stage_this_peer_no_longer_holds_fails_like_a_remote_one():
    spec, module = one_stage()
    trainer = Trainer(spec, None, "QmMe", snapshot=list, local=None)
    inputs = {"inputs": batch(spec), "labels": batch(spec)}
    with pytest.raises(RemoteError) as gone:
        asyncio.run(trainer._hop(LOCAL, 0, "mb-1", backward=False, names=list(inputs), tensors=list(inputs.values())))
    assert gone.value.code == ErrorCode.BUSY
    worker = StageWorker(module, is_last=True)
    try:
        trainer.local = LocalStage(1, worker)  # another stage than the one routed: the same
        with pytest.raises(RemoteError):
            asyncio.run(
                trainer._hop(LOCAL, 0, "mb-2", backward=False, names=list(inputs), tensors=list(inputs.values()))
            )
    finally:
        worker.shutdown()


def test_a_stage_moved_while_the_trainer_is_mid_hop_is_retried_on_the_new_worker():
    spec, module = one_stage()
    old = StageWorker(module, is_last=True)
    gate = threading.Event()
    old.submit(gate.wait, 30)  # the old worker is busy: the trainer's hop waits in its queue
    trainer = Trainer(spec, None, "QmMe", snapshot=list, local=LocalStage(0, old), wait_for_peers=30.0)
    new = StageWorker(LlamaStage.from_spec(spec, 0), is_last=True)

    async def train_while_moving():
        hop = asyncio.create_task(trainer.train_microbatch(batch(spec)))
        while old.queue_depth == 0:  # the hop reached the old worker's queue
            await asyncio.sleep(0.01)
        # A move, in the order the stage holder makes it: the trainer stops routing here, the old
        # worker shuts down (its queued hop fails 'busy'), the new stage opens.
        trainer.local = None
        await asyncio.to_thread(old.shutdown, 0.1)
        gate.set()  # the old worker finishes what it was doing, then fails what is queued
        await asyncio.sleep(0.3)
        trainer.local = LocalStage(0, new)
        return await asyncio.wait_for(hop, 60)

    try:
        loss = asyncio.run(train_while_moving())
    finally:
        gate.set()
        old.shutdown()
        new.shutdown()
    assert torch.isfinite(torch.tensor(loss))
    assert trainer.stats.microbatches == 1 and trainer.stats.retries >= 1 and trainer.stats.failures == 0
    assert new.stats.forward == 1  # the micro-batch was computed once, on the new worker
