"""Serving soft targets: the ``swarmtrain.teach`` handler and the thread that batches requests.

A request is checked as a stage checks one (``peer.pipeline.server.Limits``: at most one
micro-batch of the spec's shape, token ids inside the vocabulary), for this run's spec and this
teacher's weights only. Requests waiting at the same moment with sequences of one length run as
one forward (without gradients); the answer is the soft targets' bytes in data frames.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Optional

import torch
from hivemind.p2p import P2P

from peer.net import FrameError, Rejected, RequestLimits, RpcServer, WireCounters, join_tensors
from peer.pipeline.server import Limits
from peer.teach.model import TeacherModel
from protocol import soft_targets
from protocol.codecs import TensorRejected
from protocol.messages_pb2 import TeachRequest, TeachResponse
from protocol.rpc import CHUNK_BYTES, MAX_TIMEOUT, TEACH, ErrorCode
from protocol.spec import RunSpec

log = logging.getLogger("swarmtrain.teach")

__all__ = ["TeacherServer", "TeacherStats"]

# Requests queued at once; more are answered "busy" (the trainer asks another teacher).
MAX_QUEUED = 64


@dataclass
class TeacherStats:
    requests: int = 0  # answered
    tokens: int = 0  # answered
    batches: int = 0  # forwards run (one per group of requests batched together)
    expired: int = 0  # requests whose trainer had given up before their turn
    compute_s: float = 0.0


class _Batcher:
    """One thread owns the model: it takes every request waiting, groups those of one sequence
    length into one forward of at most ``max_samples`` sequences, and answers each."""

    def __init__(self, teacher: TeacherModel, stats: TeacherStats, max_samples: int):
        self.teacher, self.stats, self.max_samples = teacher, stats, max_samples
        self._queue: "queue.Queue" = queue.Queue()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="teacher", daemon=True)
        self._thread.start()

    def submit(self, ids: torch.Tensor, deadline: float) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._stopped.is_set():
            future.set_exception(Rejected(ErrorCode.BUSY, "the teacher is stopping"))
        elif self._queue.qsize() >= MAX_QUEUED:
            future.set_exception(Rejected(ErrorCode.BUSY, f"{MAX_QUEUED} requests queued"))
        else:
            self._queue.put((ids, deadline, future))
        return future

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def stop(self) -> None:
        self._stopped.set()
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stopped.is_set():
            item = self._queue.get()
            if item is None:
                break
            waiting = [item]
            while True:  # whatever else is already waiting
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._stopped.set()
                    break
                waiting.append(more)
            self._answer(waiting)
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None and not item[2].done():
                item[2].set_exception(Rejected(ErrorCode.BUSY, "the teacher is stopping"))

    def _answer(self, waiting: list) -> None:
        now = time.monotonic()
        live = []
        for ids, deadline, future in waiting:
            if now > deadline or not future.set_running_or_notify_cancel():
                self.stats.expired += 1
                if not future.done():
                    future.set_exception(Rejected(ErrorCode.BUSY, "the request waited past its deadline"))
                continue
            live.append((ids, future))
        by_length: dict[int, list] = {}
        for ids, future in live:
            by_length.setdefault(ids.shape[1], []).append((ids, future))
        for group in by_length.values():
            while group:
                batch, size = [], 0
                while group and (not batch or size + group[0][0].shape[0] <= self.max_samples):
                    batch.append(group.pop(0))
                    size += batch[-1][0].shape[0]
                self._forward(batch)

    def _forward(self, batch: list) -> None:
        start = time.perf_counter()
        try:
            top, values = self.teacher.soft_targets(torch.cat([ids for ids, _ in batch]))
        except Exception as err:  # a failed forward must not kill the teacher
            log.exception("teacher forward failed")
            for _, future in batch:
                future.set_exception(Rejected(ErrorCode.INTERNAL, f"{type(err).__name__}: {err}"))
            return
        self.stats.compute_s += time.perf_counter() - start
        self.stats.batches += 1
        row = 0
        for ids, future in batch:
            n = ids.shape[0]
            future.set_result((top[row : row + n], values[row : row + n]))
            row += n


class TeacherServer:
    """Registers ``swarmtrain.teach`` on a P2P instance (a replica of the DHT's daemon)."""

    def __init__(
        self,
        spec: RunSpec,
        teacher: TeacherModel,
        *,
        counters: Optional[WireCounters] = None,
        max_batch_samples: Optional[int] = None,
    ):
        self.spec, self.teacher = spec, teacher
        self.digest = spec.digest()
        self.limits = Limits.for_stage(spec, 0)  # token ids, as the first stage takes them
        self.rpc = RpcServer(counters)
        self.counters = self.rpc.counters
        self.stats = TeacherStats()
        self._batcher = _Batcher(teacher, self.stats, max_batch_samples or 4 * spec.training.micro_batch_size)
        ids_bytes = self.limits.max_batch * self.limits.max_len * 8
        self._request_limits = RequestLimits(max_bytes=ids_bytes + (64 << 10), max_frames=8, deadline=10.0)

    async def start(self, p2p: P2P) -> None:
        await self.rpc.add(p2p, TEACH, self._serve, TeachRequest, _error, self._request_limits, kind="teacher")

    async def stop(self) -> None:
        await self.rpc.remove_all()
        await asyncio.to_thread(self._batcher.stop)

    @property
    def queued(self) -> int:
        return self._batcher.queued

    async def _serve(self, frames: list[TeachRequest], _remote: str) -> list[TeachResponse]:
        header = frames[0]
        if header.spec_digest != self.digest:
            raise Rejected(
                ErrorCode.WRONG_SPEC,
                f"spec digest {header.spec_digest[:16]!r} does not match this teacher's {self.digest[:16]!r}",
            )
        if header.model_digest != self.teacher.digest:
            raise Rejected(
                ErrorCode.BAD_REQUEST,
                f"this teacher holds weights {self.teacher.digest[:16]}, not {header.model_digest[:16]!r}",
            )
        if not (0 < header.timeout <= MAX_TIMEOUT):
            raise Rejected(ErrorCode.BAD_REQUEST, f"timeout must be in (0, {MAX_TIMEOUT}] seconds")
        try:
            tensors = join_tensors(frames, self._request_limits.max_bytes)
            if set(tensors) != {"inputs"}:
                raise TensorRejected(f"expected the tensor 'inputs', got {sorted(tensors)}")
            ids = self.limits.check_ids("inputs", tensors["inputs"])
        except (TensorRejected, FrameError) as err:
            raise Rejected(ErrorCode.BAD_REQUEST, str(err)) from None
        if int(ids.max()) >= self.teacher.model_vocab:
            raise Rejected(ErrorCode.BAD_REQUEST, f"token ids must be below the model's {self.teacher.model_vocab}")
        deadline = time.monotonic() + 0.8 * header.timeout
        top, values = await asyncio.wrap_future(self._batcher.submit(ids, deadline))
        data = await asyncio.to_thread(soft_targets.encode, top, values, self.spec.model.vocab_size)
        self.stats.requests += 1
        self.stats.tokens += ids.numel()
        return [TeachResponse(soft_targets=data[i : i + CHUNK_BYTES]) for i in range(0, len(data), CHUNK_BYTES)] or [
            TeachResponse()
        ]


def _error(code: str, message: str) -> TeachResponse:
    return TeachResponse(error=message, error_code=str(code))
