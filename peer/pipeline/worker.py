"""One stage's compute: a single thread owns the stage module and its optimizer.

Forward and backward requests, from the network and from this peer's own trainer, run one at
a time in this thread, and so does the optimizer's step: hivemind writes updated parameters
in the thread that calls ``step``, so nothing races with a forward pass.

Accounting: a micro-batch's gradients count toward the stage optimizer at most once per
peer (deduplicated by id) and only if the backward finished before the trainer's deadline;
work finished after the trainer gave up is discarded, because the trainer will have retried
it on another peer of the stage.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

from peer.model.distill import combined_loss
from peer.model.llama import LlamaStage
from peer.pipeline.clipping import MicroBatchClip, grad_norm
from protocol.rpc import ErrorCode

log = logging.getLogger("swarmtrain.stage")


# The forward cache always has room for this many micro-batches of the spec's shape, whatever
# its byte budget: a stage of a larger preset (one small-preset forward holds about 380 MiB)
# would otherwise recompute every forward on backward.
MIN_CACHED_FORWARDS = 8


class StageError(RuntimeError):
    """A request the stage cannot serve; ``code`` is the wire error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class _Cached:
    inputs: torch.Tensor  # requires grad for float inputs
    outputs: torch.Tensor
    created: float
    params_version: int  # see StageWorker._params_version
    cost: int = 0  # estimated bytes held (inputs, outputs and the autograd graph between them)


class LastStageResult(NamedTuple):
    """What the last stage's forward (with its backward) gives back."""

    loss: float  # the loss its gradients are of (with soft targets: the combined loss)
    grad_inputs: Optional[torch.Tensor]  # None on a single-stage run (token ids have no gradient)
    label_loss: float  # the label cross-entropy part of ``loss``


@dataclass
class StageStats:
    forward: int = 0
    backward: int = 0
    samples: int = 0  # samples whose gradients were accumulated
    discarded: int = 0  # finished after the deadline or duplicates
    rejected: int = 0
    compute_s: float = 0.0
    throughput: float = 0.0  # samples/s through forward+backward, an EMA
    loss_ema: Optional[float] = None
    optimizer_steps: int = 0
    clipped: int = 0  # micro-batches whose gradient was scaled down to the running bound
    distilled: int = 0  # last stage: micro-batches that came with a teacher's soft targets


class StageWorker:
    """Runs one stage's forward/backward and optimizer in one thread."""

    def __init__(
        self,
        module: LlamaStage,
        *,
        is_last: bool,
        optimizer=None,
        cache_ttl: float = 120.0,
        cache_max: int = 256,
        cache_bytes: int = 192 << 20,
        clip: Optional[MicroBatchClip] = None,
        distill=None,
    ):
        """``distill``: the spec's ``DistillSpec`` (the loss weight and temperature of soft
        targets), or None: soft targets are refused."""
        self.module, self.is_last, self.optimizer = module, is_last, optimizer
        self.distill = distill
        self.cache_ttl, self.cache_max, self.cache_bytes = cache_ttl, cache_max, cache_bytes
        self._cache_cost = 0
        # What one cached forward holds, per byte of its output: the output, the input, and what
        # autograd saves in each block (attention scores, MLP activations). Measured on the tiny
        # preset: 12.8 MB for a 0.26 MB output of two blocks (docs/security.md).
        blocks = getattr(module, "layer_end", 1) - getattr(module, "layer_start", 0)
        self._cost_factor = 4 + 24 * max(1, blocks)
        self.stats = StageStats()
        self.clip = clip  # None: micro-batch gradients accumulate unclipped
        self._cache: "collections.OrderedDict[str, _Cached]" = collections.OrderedDict()
        self._accumulated: "collections.OrderedDict[str, None]" = collections.OrderedDict()
        self._tasks: "queue.PriorityQueue" = queue.PriorityQueue()
        self._seq = 0
        self._lock = threading.Lock()
        self.idle_tick = 0.5  # seconds without work before the optimizer gets a tick
        self._thread = threading.Thread(target=self._run, name="stage-worker", daemon=True)
        self._stopped = threading.Event()
        self._thread.start()

    # --- submission (any thread) ------------------------------------------------------------

    def submit(self, fn: Callable, *args, priority: int = 1) -> concurrent.futures.Future:
        """Run fn(*args) in the worker thread; backward (priority 0) goes before forward so
        that activations are released early."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._stopped.is_set():
            future.set_exception(StageError(ErrorCode.BUSY, "stage is shutting down"))
            return future
        with self._lock:
            self._seq += 1
            self._tasks.put((priority, self._seq, fn, args, future))
        return future

    def forward(
        self,
        mb_id: str,
        inputs: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        *,
        deadline: float = float("inf"),
        accumulate: bool = True,
        soft: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> concurrent.futures.Future:
        """Not the last stage: a future of the outputs. The last stage: of a ``LastStageResult``
        (``soft``: a teacher's (ids, log-probabilities), ``protocol.soft_targets``)."""
        if self.is_last:
            if labels is None:
                raise StageError(ErrorCode.BAD_REQUEST, "the last stage needs labels with its inputs")
            if soft is not None and self.distill is None:
                raise StageError(ErrorCode.BAD_REQUEST, "soft targets, but the run's spec has no [distill] section")
            return self.submit(
                self._forward_backward_last, mb_id, inputs, labels, deadline, accumulate, soft, priority=1
            )
        return self.submit(self._forward, mb_id, inputs, priority=1)

    def backward(
        self,
        mb_id: str,
        grad_outputs: torch.Tensor,
        inputs: Optional[torch.Tensor] = None,
        *,
        deadline: float = float("inf"),
        accumulate: bool = True,
    ) -> concurrent.futures.Future:
        return self.submit(self._backward, mb_id, grad_outputs, inputs, deadline, accumulate, priority=0)

    @property
    def queue_depth(self) -> int:
        return self._tasks.qsize()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopped.set()
        self._tasks.put((-1, -1, None, (), None))
        self._thread.join(timeout)

    # --- the worker thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                _, _, fn, args, future = self._tasks.get(timeout=self.idle_tick)
            except queue.Empty:
                self._tick()
                continue
            if fn is None:
                break
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except StageError as err:
                self.stats.rejected += 1
                future.set_exception(err)
            except Exception as err:  # a failed request must not kill the stage
                log.exception("stage task failed")
                future.set_exception(StageError(ErrorCode.INTERNAL, f"{type(err).__name__}: {err}"))
        # Fail whatever is still queued so that no caller waits forever.
        while not self._tasks.empty():
            _, _, fn, _, future = self._tasks.get_nowait()
            if future is not None and not future.done():
                future.set_exception(StageError(ErrorCode.BUSY, "stage is shutting down"))

    def _tick(self) -> None:
        if self.optimizer is None:
            return
        try:
            self.optimizer.tick()
        except Exception:
            log.exception("optimizer tick failed")

    def _expire_cache(self, incoming: int = 0) -> None:
        """Drop the oldest cached forwards while the cache is over its count or byte budget (with
        ``incoming`` bytes about to be added; the budget holds ``MIN_CACHED_FORWARDS`` at least) or they are older than ``cache_ttl``. A dropped
        forward costs its backward a recomputation (``cache_miss``: the trainer re-sends it)."""
        now = time.monotonic()
        while self._cache and (
            len(self._cache) >= self.cache_max
            or self._cache_cost + incoming > max(self.cache_bytes, MIN_CACHED_FORWARDS * incoming)
            or now - next(iter(self._cache.values())).created > self.cache_ttl
        ):
            _, dropped = self._cache.popitem(last=False)
            self._cache_cost -= dropped.cost

    def _prepare_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.dtype.is_floating_point:
            return inputs.detach().requires_grad_(True)
        return inputs

    def _forward(self, mb_id: str, inputs: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        inputs = self._prepare_inputs(inputs)
        with torch.enable_grad():
            outputs = self.module(inputs)
        cost = outputs.numel() * outputs.element_size() * self._cost_factor
        self._expire_cache(cost)
        if mb_id in self._cache:
            self._cache_cost -= self._cache.pop(mb_id).cost
        self._cache[mb_id] = _Cached(inputs, outputs, time.monotonic(), self._params_version(), cost)
        self._cache_cost += cost
        self.stats.forward += 1
        self.stats.compute_s += time.perf_counter() - start
        return outputs.detach()

    def _params_version(self) -> int:
        """Changes whenever a parameter is modified in place (autograd's version counters)."""
        return sum(p._version for p in self.module.parameters())

    def _forward_backward_last(self, mb_id, inputs, labels, deadline, accumulate, soft) -> LastStageResult:
        start = time.perf_counter()
        inputs = self._prepare_inputs(inputs)
        weight = self.distill.weight if self.distill is not None else 0.0
        temperature = self.distill.temperature if self.distill is not None else 1.0
        with torch.enable_grad():
            logits = self.module(inputs)
            loss, label_loss = combined_loss(logits, labels, soft, weight=weight, temperature=temperature)
        grad_in = self._accumulate(mb_id, loss, inputs, None, inputs.shape[0], deadline, accumulate, start)
        self.stats.forward += 1
        self.stats.distilled += soft is not None
        label = float(label_loss.detach())
        self.stats.loss_ema = label if self.stats.loss_ema is None else 0.9 * self.stats.loss_ema + 0.1 * label
        return LastStageResult(float(loss.detach()), grad_in, label)

    def _backward(self, mb_id, grad_outputs, inputs, deadline, accumulate):
        start = time.perf_counter()
        cached = self._cache.pop(mb_id, None)
        if cached is not None:
            self._cache_cost -= cached.cost
        if cached is None:
            if inputs is None:
                raise StageError(ErrorCode.CACHE_MISS, f"no cached forward for micro-batch {mb_id}; re-send the inputs")
            # Backward landed on another peer of the stage (the first died): recompute forward.
            inputs = self._prepare_inputs(inputs)
            with torch.enable_grad():
                outputs = self.module(inputs)
        elif cached.params_version != self._params_version():
            # An optimizer step (or a state load) wrote the parameters in place since this
            # forward: its graph can no longer be differentiated. Recompute from the cached input.
            inputs = cached.inputs
            with torch.enable_grad():
                outputs = self.module(inputs)
        else:
            inputs, outputs = cached.inputs, cached.outputs
        if grad_outputs.shape != outputs.shape:
            raise StageError(
                ErrorCode.BAD_REQUEST,
                f"grad_outputs shape {list(grad_outputs.shape)} does not match outputs {list(outputs.shape)}",
            )
        return self._accumulate(mb_id, outputs, inputs, grad_outputs, inputs.shape[0], deadline, accumulate, start)

    def _accumulate(self, mb_id, outputs, inputs, grad_outputs, batch, deadline, accumulate, start):
        params = [p for p in self.module.parameters() if p.requires_grad]
        wants_input_grad = inputs.dtype.is_floating_point
        targets = ([inputs] if wants_input_grad else []) + params
        grads = torch.autograd.grad(outputs, targets, grad_outputs=grad_outputs, allow_unused=True)
        grad_in = grads[0] if wants_input_grad else None
        param_grads = grads[1:] if wants_input_grad else grads
        elapsed = time.perf_counter() - start
        self.stats.backward += 1
        self.stats.compute_s += elapsed
        rate = batch / max(elapsed, 1e-6)
        self.stats.throughput = rate if self.stats.throughput == 0 else 0.8 * self.stats.throughput + 0.2 * rate
        if not all(g is None or torch.isfinite(g).all() for g in param_grads):
            raise StageError(ErrorCode.BAD_REQUEST, "gradients are not finite; micro-batch not accumulated")
        if grad_in is not None and not torch.isfinite(grad_in).all():
            raise StageError(ErrorCode.BAD_REQUEST, "input gradients are not finite; micro-batch not accumulated")
        if accumulate and self.clip is not None:
            param_grads = self._clipped(param_grads)
        if accumulate:
            if mb_id in self._accumulated or time.monotonic() > deadline:
                # Duplicate or too late: the trainer has counted (or retried) it elsewhere.
                self.stats.discarded += 1
            else:
                self._accumulated[mb_id] = None
                while len(self._accumulated) > 4096:
                    self._accumulated.popitem(last=False)
                self._apply(params, param_grads, batch)
        return None if grad_in is None else grad_in.detach()

    def _clipped(self, param_grads):
        """The micro-batch's gradients, scaled down to the running bound (``MicroBatchClip``)."""
        scale = self.clip.admit(grad_norm(param_grads))
        if scale >= 1.0:
            return param_grads
        self.stats.clipped += 1
        return [None if g is None else g * scale for g in param_grads]

    def _apply(self, params, param_grads, batch: int) -> None:
        for p, g in zip(params, param_grads):
            p.grad = None if g is None else g.detach().clone()
        self.stats.samples += batch
        if self.optimizer is not None:
            self.optimizer.step(batch_size=batch)
            self.optimizer.zero_grad(set_to_none=True)
            self.stats.optimizer_steps += 1

    # --- state, for checkpoints and tests ---------------------------------------------------

    def call(self, fn: Callable, *args, timeout: Optional[float] = None):
        """Run fn in the worker thread and wait: the way to read or replace parameters safely."""
        return self.submit(fn, *args, priority=0).result(timeout)

    def state_dict(self, timeout: Optional[float] = 60.0) -> dict[str, torch.Tensor]:
        return self.call(lambda: {k: v.detach().clone() for k, v in self.module.state_dict().items()}, timeout=timeout)
