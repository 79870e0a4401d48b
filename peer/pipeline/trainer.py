"""Driving local data through the pipeline: SWARM-style routing of micro-batches.

For every micro-batch and stage the trainer picks one peer, weighted by measured throughput
and load, computes the stage it holds itself without a network hop, and keeps several
micro-batches in flight so that every stage works at once.

Exactly-once accounting per stage: a forward changes nothing on a server, so a failed forward
is retried on another peer; the last stage accumulates with its forward, and each earlier
stage with its backward, so a failed backward is retried *only at that stage* (on another
peer, re-sending the cached input so it can recompute). A micro-batch is done when every
stage accumulated it once; it is never dropped while a peer of each stage exists.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import time
import uuid
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional, Sequence

import torch
from hivemind.p2p import P2P

from peer.net import WireCounters
from peer.net.timeouts import CallTimer, transfer_timeout
from peer.pipeline.checks import check_request, check_response
from peer.pipeline.client import RemoteError, call_stage
from peer.pipeline.routing import BanList, ThroughputEMA, announced_prior, capped_priors, choose_peer
from peer.pipeline.server import Limits
from peer.pipeline.worker import StageError, StageWorker
from protocol.messages_pb2 import StageRequest
from protocol.records import PeerInfo, PeerState
from protocol.rpc import ErrorCode
from protocol.soft_targets import SoftTargets
from protocol.spec import RunSpec

log = logging.getLogger("swarmtrain.trainer")

LOCAL = "local"


@dataclass
class TrainerStats:
    microbatches: int = 0
    samples: int = 0
    tokens: int = 0
    retries: int = 0
    failures: int = 0
    loss_ema: Optional[float] = None  # of the label cross-entropy, with or without a teacher
    last_loss: Optional[float] = None
    started: float = 0.0
    distilled: int = 0  # micro-batches that reached the last stage with a teacher's soft targets

    def record(self, loss: float, samples: int, tokens: int) -> None:
        self.microbatches += 1
        self.samples += samples
        self.tokens += tokens
        self.last_loss = loss
        if not math.isfinite(loss):  # a diverged local stage: never into the EMA (records bound the loss)
            return
        self.loss_ema = loss if self.loss_ema is None else 0.95 * self.loss_ema + 0.05 * loss


class NoPeerForStage(RuntimeError):
    pass


@dataclass(frozen=True)
class LocalStage:
    """The stage this peer serves itself and its worker: one value, replaced whole when the peer
    opens, moves or closes its stage, so a reader never sees one stage with another's worker."""

    stage: int
    worker: StageWorker


class Trainer:
    def __init__(
        self,
        spec: RunSpec,
        p2p: P2P,
        my_peer_id: str,
        *,
        snapshot: Callable[[], Sequence[PeerInfo]],
        local: Optional[LocalStage] = None,
        request_timeout: float = 30.0,
        max_inflight: Optional[int] = None,
        wait_for_peers: float = 60.0,
        counters: Optional[WireCounters] = None,
        seed: int = 0,
        soft_targets: Optional[Callable[[torch.Tensor], Awaitable[Optional[SoftTargets]]]] = None,
    ):
        """``soft_targets``: when the run distills, what fetches a teacher's soft targets for a
        micro-batch's token ids (None when no teacher answered: the micro-batch trains on its
        labels alone)."""
        self.spec, self.p2p, self.my_peer_id = spec, p2p, my_peer_id
        self.soft_targets = soft_targets
        self.digest = spec.digest()
        self.snapshot = snapshot
        # Swapped by the peer's main thread on a move, read here on the event loop: read it once
        # per use (``local = self.local``), never twice.
        self.local: Optional[LocalStage] = local
        self.request_timeout = request_timeout
        self.max_inflight = max_inflight or spec.num_stages + 1
        self.wait_for_peers = wait_for_peers
        self.counters = counters or WireCounters()
        # What any stage may answer: one micro-batch of hidden states, plus the codecs' tables.
        self.max_response_bytes = Limits.for_stage(spec, 0).hidden_bytes + (1 << 20)
        # A stage call's timeout (peer.net.timeouts): never below request_timeout; before a peer
        # was measured, what a micro-batch of hidden states each way needs on the slowest link.
        self.timer = CallTimer(floor=request_timeout)
        self.first_call_timeout = transfer_timeout(2 * self.max_response_bytes)
        self.bans = BanList()
        self.ema = ThroughputEMA()
        self.inflight: dict[str, int] = {}
        self.rng = random.Random(seed)
        self.stats = TrainerStats(started=time.monotonic())
        self._ids = itertools.count()
        self._tag = uuid.uuid4().hex[:8]
        self.codec = spec.compression.activations
        self._stopping = False  # set on shutdown: no waiting for peers that may be leaving too
        self.stop_grace = 15.0

    # --- routing ---------------------------------------------------------------------------

    def _candidates(self, stage: int) -> list[tuple[str, float, int]]:
        out = []
        for p in self.snapshot():
            if p.stage != stage or p.state != PeerState.ONLINE:
                continue
            if p.peer_id == self.my_peer_id:
                continue  # our own stage is served by the local worker, never over the network
            out.append((p.peer_id, announced_prior(p.throughput, bool(p.via)), self.inflight.get(p.peer_id, 0)))
        out = [(p, self.ema.get(p, prior), load) for p, prior, load in capped_priors(out, self.ema.known())]
        local = self.local
        if local is not None and local.stage == stage:
            out.append((LOCAL, self.ema.get(LOCAL, local.worker.stats.throughput), local.worker.queue_depth))
        return out

    async def _pick(self, stage: int, exclude: Sequence[str] = ()) -> str:
        deadline = time.monotonic() + self.wait_for_peers
        while True:
            now = time.monotonic()
            banned = self.bans.banned(now) | set(exclude)
            choice = choose_peer(self._candidates(stage), banned=banned, rng=self.rng)
            if choice is not None:
                return choice
            if exclude and choose_peer(self._candidates(stage), banned=self.bans.banned(now), rng=self.rng):
                exclude = ()  # the only live peer is the one that just failed: try it again
                continue
            if now > deadline or self._stopping:
                raise NoPeerForStage(f"no reachable peer serves stage {stage} (waited {self.wait_for_peers:.0f}s)")
            await asyncio.sleep(0.5)

    def _header(self, stage: int, mb_id: str, accumulate: bool = True) -> StageRequest:
        return StageRequest(spec_digest=self.digest, stage=stage, microbatch_id=mb_id, accumulate=accumulate)

    # --- one hop -----------------------------------------------------------------------------

    async def _hop(
        self, peer: str, stage: int, mb_id: str, *, backward: bool, names, tensors, soft: Optional[SoftTargets] = None
    ):
        """One forward or backward at one peer; returns (response loss, tensors by name). With
        ``soft`` targets (the last stage's forward) the loss is the label cross-entropy part."""
        start = time.monotonic()
        samples = tensors[0].shape[0]
        self.inflight[peer] = self.inflight.get(peer, 0) + 1
        try:
            if peer == LOCAL:
                result = await self._local(stage, mb_id, backward, dict(zip(names, tensors)), soft)
            else:
                check_request(self.spec, stage, dict(zip(names, tensors)))
                timer_key = (peer, backward)
                try:
                    head, out = await call_stage(
                        self.p2p,
                        peer,
                        backward=backward,
                        header=self._header(stage, mb_id),
                        names=names,
                        tensors=tensors,
                        codec=self.codec,
                        timeout=self.timer.timeout(timer_key, self.first_call_timeout),
                        counters=self.counters,
                        max_bytes=self.max_response_bytes,
                        soft_targets=soft.data if soft is not None else b"",
                    )
                except RemoteError as err:
                    if err.code == ErrorCode.TIMEOUT:
                        self.timer.expired(timer_key)
                    raise
                self.timer.observe(timer_key, time.monotonic() - start)
                label_loss = head.label_loss if soft is not None else head.loss
                result = (label_loss, out)
                check_response(
                    self.spec,
                    stage,
                    backward=backward,
                    sent=dict(zip(names, tensors)),
                    loss=head.loss,
                    received=out,
                    label_loss=label_loss,
                )
            self.ema.update(peer, samples, time.monotonic() - start)
            self.bans.record_success(peer)
            return result
        finally:
            self.inflight[peer] -= 1

    async def _local(self, stage, mb_id, backward, named, soft: Optional[SoftTargets] = None):
        local = self.local
        if local is None or local.stage != stage:
            # The peer moved (or is closing) its stage since this hop was routed here: a failure
            # like any other peer's, retried on another peer of the stage.
            raise RemoteError(ErrorCode.BUSY, f"this peer no longer serves stage {stage} itself")
        return await local_hop(local.worker, mb_id, backward, named, soft, time.monotonic() + self.request_timeout)

    async def _with_retries(self, stage: int, first: Optional[str], attempt_fn):
        """Run attempt_fn(peer) until it succeeds, moving to another peer after a failure."""
        peer = first or await self._pick(stage)
        failed: list[str] = []
        while True:
            try:
                return peer, await attempt_fn(peer)
            except RemoteError as err:
                # Any failure bans the peer, bad_request included: our own requests are checked
                # before they leave (check_request), so a refusal is not provably our fault.
                self.stats.retries += 1
                if peer != LOCAL:
                    duration = self.bans.ban(peer, time.monotonic())
                    log.warning(
                        "stage %d peer %s failed (%s); banned for %.0fs, retrying elsewhere",
                        stage,
                        peer[:12],
                        err,
                        duration,
                    )
                failed.append(peer)
                peer = await self._pick(stage, exclude=failed[-1:])

    # --- one micro-batch -------------------------------------------------------------------

    async def train_microbatch(self, input_ids: torch.Tensor) -> float:
        """Returns the micro-batch's label cross-entropy."""
        mb_id = f"{self._tag}-{next(self._ids)}"
        # A teacher's soft targets are fetched while the micro-batch goes through the earlier stages.
        teacher = asyncio.create_task(self.soft_targets(input_ids)) if self.soft_targets is not None else None
        try:
            return await self._train_microbatch(mb_id, input_ids, teacher)
        finally:
            if teacher is not None and not teacher.done():
                teacher.cancel()

    async def _train_microbatch(self, mb_id: str, input_ids: torch.Tensor, teacher: Optional[asyncio.Task]) -> float:
        last = self.spec.num_stages - 1
        hops: list[tuple[str, torch.Tensor]] = []  # (peer, input) per non-last stage
        x = input_ids
        for stage in range(last):

            async def forward(peer, stage=stage, x=x):
                _, out = await self._hop(peer, stage, mb_id, backward=False, names=["inputs"], tensors=[x])
                if "outputs" not in out:
                    raise RemoteError(ErrorCode.BAD_RESPONSE, "forward returned no outputs")
                return out["outputs"]

            peer, out = await self._with_retries(stage, None, forward)
            hops.append((peer, x))
            x = out

        soft = await teacher if teacher is not None else None

        async def forward_last(peer, x=x):
            loss, out = await self._hop(
                peer, last, mb_id, backward=False, names=["inputs", "labels"], tensors=[x, input_ids], soft=soft
            )
            if last > 0 and "grad_inputs" not in out:
                raise RemoteError(ErrorCode.BAD_RESPONSE, "last stage returned no input gradient")
            return loss, out.get("grad_inputs")

        _, (loss, grad) = await self._with_retries(last, None, forward_last)

        for stage in reversed(range(last)):
            first_peer, inputs = hops[stage]

            async def backward(peer, stage=stage, grad=grad, inputs=inputs, first_peer=first_peer):
                if peer == first_peer:
                    try:
                        _, out = await self._hop(
                            peer, stage, mb_id, backward=True, names=["grad_outputs"], tensors=[grad]
                        )
                        return out.get("grad_inputs")
                    except RemoteError as err:
                        if err.code != ErrorCode.CACHE_MISS:
                            raise
                # Another peer (or a cache miss): re-send the input so it can recompute forward.
                _, out = await self._hop(
                    peer, stage, mb_id, backward=True, names=["grad_outputs", "inputs"], tensors=[grad, inputs]
                )
                return out.get("grad_inputs")

            _, grad = await self._with_retries(stage, first_peer, backward)
            if stage > 0 and grad is None:
                raise RemoteError(ErrorCode.BAD_RESPONSE, f"stage {stage} returned no input gradient")

        self.stats.record(loss, input_ids.shape[0], input_ids.numel())
        self.stats.distilled += soft is not None
        return loss

    # --- the loop ----------------------------------------------------------------------------

    async def run(self, batches, *, stop: asyncio.Event, max_microbatches: Optional[int] = None) -> None:
        """Feed batches until stop is set; waits for in-flight micro-batches before returning."""
        slots = asyncio.Semaphore(self.max_inflight)
        tasks: set[asyncio.Task] = set()
        started = 0

        async def one(batch):
            try:
                while True:
                    try:
                        await self.train_microbatch(batch)
                        return
                    except NoPeerForStage as err:
                        # Nothing was accumulated anywhere for a micro-batch that failed in forward.
                        self.stats.failures += 1
                        log.warning("%s; retrying the micro-batch", err)
                        if stop.is_set():
                            return
                    except RemoteError as err:
                        self.stats.failures += 1
                        log.warning("micro-batch failed: %s", err)
                        return
            finally:
                slots.release()

        loop = asyncio.get_running_loop()
        batches = iter(batches)
        while not stop.is_set() and (max_microbatches is None or started < max_microbatches):
            await slots.acquire()
            # Reading and tokenizing files can take a while: keep the event loop serving meanwhile.
            batch = await loop.run_in_executor(None, next, batches, None)
            if batch is None:
                slots.release()
                break
            if stop.is_set():
                slots.release()
                break
            task = asyncio.create_task(one(batch))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            started += 1
            await asyncio.sleep(0)
        if tasks:
            # In-flight micro-batches get a short grace: their peers may be shutting down too.
            self._stopping = True
            _done, pending = await asyncio.wait(tasks, timeout=self.stop_grace)
            for task in pending:
                task.cancel()
            if pending:
                log.info("%d in-flight micro-batches abandoned at shutdown", len(pending))


async def local_hop(worker: StageWorker, mb_id: str, backward: bool, named, soft: Optional[SoftTargets], deadline):
    """One forward or backward on this peer's own stage worker, answered as a remote stage would."""
    try:
        if backward:
            grad = await asyncio.wrap_future(
                worker.backward(mb_id, named["grad_outputs"], named.get("inputs"), deadline=deadline)
            )
            return 0.0, ({} if grad is None else {"grad_inputs": grad})
        if "labels" in named:
            pair = (soft.ids, soft.logprobs) if soft is not None else None
            result = await asyncio.wrap_future(
                worker.forward(mb_id, named["inputs"], named["labels"], deadline=deadline, soft=pair)
            )
            grad = result.grad_inputs
            return result.label_loss, ({} if grad is None else {"grad_inputs": grad})
        out = await asyncio.wrap_future(worker.forward(mb_id, named["inputs"]))
        return 0.0, {"outputs": out}
    except StageError as err:
        raise RemoteError(err.code, str(err)) from None
