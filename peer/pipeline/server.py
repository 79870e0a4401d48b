"""Stage serving over hivemind's P2P: forward, backward, info and state handlers.

Every request is untrusted: the spec digest, the stage, tensor names, dtypes, shapes, sizes
and values are checked before any compute, and a bad request gets an error reply while the
server keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from hivemind.p2p import P2P

from peer.net import FrameError, Rejected, RequestLimits, RpcServer, WireCounters, join_tensors, split_message
from peer.pipeline.worker import StageError, StageWorker
from protocol import soft_targets
from protocol.codecs import TensorRejected, activation_codec, decode, encode
from protocol.messages_pb2 import InfoRequest, InfoResponse, StageRequest, StageResponse, StateRequest, StateResponse
from protocol.records import PeerState
from protocol.rpc import BACKWARD, FORWARD, INFO, MAX_TIMEOUT, STATE, ErrorCode
from protocol.spec import RunSpec

log = logging.getLogger("swarmtrain.server")

SMALL_REQUEST = RequestLimits(max_bytes=64 << 10, max_frames=1, deadline=10.0)  # info and state requests


@dataclass(frozen=True)
class ServedInfo:
    """What the info RPC tells a caller about this peer; read once per request."""

    state: PeerState
    throughput: float
    epoch: int
    version: str


@dataclass
class Limits:
    """What a request to stage ``stage`` of ``spec`` may contain: at most what an honest trainer
    sends, one micro-batch of the spec's shape (``training.micro_batch_size`` sequences of at
    most ``training.seq_len`` tokens)."""

    spec: RunSpec
    stage: int

    @classmethod
    def for_stage(cls, spec: RunSpec, stage: int) -> "Limits":
        return cls(spec, stage)

    @property
    def max_batch(self) -> int:
        return self.spec.training.micro_batch_size

    @property
    def max_len(self) -> int:
        return self.spec.training.seq_len

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.spec.num_stages - 1

    @property
    def hidden_bytes(self) -> int:
        """One micro-batch of hidden states, float32 uncompressed (the largest any codec sends)."""
        return self.max_batch * self.max_len * self.spec.model.hidden_size * 4

    @property
    def soft_target_bytes(self) -> int:
        """One micro-batch of a teacher's soft targets (0 when the run has no [distill])."""
        d = self.spec.distill
        if d is None or not self.is_last:
            return 0
        return soft_targets.encoded_size(self.max_batch, self.max_len, d.k, self.spec.model.vocab_size)

    @property
    def max_bytes(self) -> int:
        # inputs and grad_outputs (or labels), soft targets, plus the codecs' tables and framing slack
        return 2 * self.hidden_bytes + self.soft_target_bytes + (1 << 20)

    def check_soft_targets(self, data: bytes, labels: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """A teacher's soft targets for ``labels`` sent by a trainer: (ids, log-probabilities),
        or None when none came."""
        if not data:
            return None
        d = self.spec.distill
        if d is None:
            raise TensorRejected("soft targets, but the run's spec has no [distill] section")
        if not self.is_last:
            raise TensorRejected("soft targets go to the last stage only")
        batch, length = labels.shape
        return soft_targets.decode(data, batch=batch, length=length, k=d.k, vocab_size=self.spec.model.vocab_size)

    def check_ids(self, name: str, proto) -> torch.Tensor:
        m = self.spec.model
        ids = decode(proto, name=name, dtype=torch.int64, max_elements=self.max_batch * self.max_len)
        if ids.dim() != 2 or not (1 <= ids.shape[0] <= self.max_batch) or not (2 <= ids.shape[1] <= self.max_len):
            raise TensorRejected(
                f"{name}: shape {list(ids.shape)} where [batch<={self.max_batch}, 2<=length<={self.max_len}] was expected"
            )
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= m.vocab_size):
            raise TensorRejected(f"{name}: token ids must be in [0, {m.vocab_size})")
        return ids

    def check_hidden(self, name: str, proto, like: Optional[tuple] = None) -> torch.Tensor:
        m = self.spec.model
        shape = [None, None, m.hidden_size] if like is None else list(like)
        x = decode(
            proto,
            name=name,
            dtype=torch.float32,
            shape=shape,
            max_elements=self.max_batch * self.max_len * m.hidden_size,
        )
        if not (1 <= x.shape[0] <= self.max_batch) or not (2 <= x.shape[1] <= self.max_len):
            raise TensorRejected(
                f"{name}: shape {list(x.shape)} exceeds batch {self.max_batch} or length {self.max_len}"
            )
        return x

    def check_inputs(self, proto) -> torch.Tensor:
        return self.check_ids("inputs", proto) if self.is_first else self.check_hidden("inputs", proto)


class StageServer:
    """Registers this stage's handlers on a P2P instance (a replica of the DHT's daemon)."""

    def __init__(
        self,
        spec: RunSpec,
        stage: int,
        worker: StageWorker,
        *,
        info: Callable[[], ServedInfo],
        counters: Optional[WireCounters] = None,
    ):
        self.spec, self.stage, self.worker = spec, stage, worker
        self.digest = spec.digest()
        self.limits = Limits.for_stage(spec, stage)
        self.codec = activation_codec(spec.compression.activations)
        self.info = info
        self.rpc = RpcServer(counters)
        self.counters = self.rpc.counters
        # A state request copies and serializes the whole stage: one at a time, others get "busy".
        self._state_busy = False

    async def start(self, p2p: P2P) -> None:
        stage_request = RequestLimits(max_bytes=self.limits.max_bytes)
        await self.rpc.add(
            p2p,
            FORWARD,
            self._stage_handler(self._forward),
            StageRequest,
            _stage_error,
            stage_request,
            kind="activations",
        )
        await self.rpc.add(
            p2p,
            BACKWARD,
            self._stage_handler(self._backward),
            StageRequest,
            _stage_error,
            stage_request,
            kind="activations",
        )
        await self.rpc.add(
            p2p,
            INFO,
            self._serve_info,
            InfoRequest,
            lambda _code, msg: InfoResponse(error=msg),
            SMALL_REQUEST,
            kind="info",
        )
        await self.rpc.add(p2p, STATE, self._serve_state, StateRequest, _state_error, SMALL_REQUEST, kind="state")

    async def stop(self) -> None:
        await self.rpc.remove_all()

    # --- requests ----------------------------------------------------------------------------

    def _stage_handler(self, handle):
        async def checked(frames: list[StageRequest], remote: str) -> list[StageResponse]:
            self._check_header(frames[0])
            try:
                return await handle(frames, remote)
            except TensorRejected as err:
                raise Rejected(ErrorCode.BAD_REQUEST, str(err)) from None
            except FrameError as err:
                raise Rejected(ErrorCode.BAD_REQUEST, f"malformed request: {err}") from None
            except StageError as err:
                return [_stage_error(err.code, str(err))]

        return checked

    def _check_header(self, header: StageRequest) -> None:
        if header.spec_digest != self.digest:
            raise Rejected(
                ErrorCode.WRONG_SPEC,
                f"spec digest {header.spec_digest[:16]!r} does not match this server's {self.digest[:16]!r}",
            )
        if header.stage != self.stage:
            raise Rejected(ErrorCode.WRONG_STAGE, f"this peer serves stage {self.stage}, not {header.stage}")
        if not (0 < len(header.microbatch_id) <= 128):
            raise Rejected(ErrorCode.BAD_REQUEST, "microbatch_id must be 1..128 characters")
        if not (0 < header.timeout <= MAX_TIMEOUT):
            raise Rejected(ErrorCode.BAD_REQUEST, f"timeout must be in (0, {MAX_TIMEOUT}] seconds")

    def _tensors(self, frames, required: set, optional: set = frozenset()) -> dict:
        tensors = join_tensors(frames, self.limits.max_bytes)
        missing, unknown = required - tensors.keys(), tensors.keys() - required - optional
        if missing or unknown:
            raise TensorRejected(
                f"expected tensors {sorted(required)} (optional {sorted(optional)}), got {sorted(tensors)}"
            )
        return tensors

    def _reply(self, names, tensors, **fields) -> list[StageResponse]:
        protos = [encode(t, self.codec) for t in tensors]
        return split_message(StageResponse(**fields), names, protos)

    # --- handlers --------------------------------------------------------------------------

    async def _forward(self, frames: list[StageRequest], remote: str) -> list[StageResponse]:
        header = frames[0]
        mb_id = _key(remote, header.microbatch_id)
        # Server-side deadline a little shorter than the trainer's: late work is discarded.
        deadline = time.monotonic() + 0.8 * header.timeout
        if self.limits.is_last:
            tensors = self._tensors(frames, {"inputs", "labels"})
            inputs = self.limits.check_inputs(tensors["inputs"])
            labels = self.limits.check_ids("labels", tensors["labels"])
            if labels.shape != inputs.shape[:2]:
                raise TensorRejected(
                    f"labels shape {list(labels.shape)} does not match inputs {list(inputs.shape[:2])}"
                )
            soft = self.limits.check_soft_targets(b"".join(f.soft_targets for f in frames), labels)
            result = await asyncio.wrap_future(self.worker.forward(mb_id, inputs, labels, deadline=deadline, soft=soft))
            if result.grad_inputs is None:
                return [StageResponse(loss=result.loss, label_loss=result.label_loss)]
            return self._reply(["grad_inputs"], [result.grad_inputs], loss=result.loss, label_loss=result.label_loss)
        if any(f.soft_targets for f in frames):
            raise TensorRejected("soft targets go to the last stage only")
        tensors = self._tensors(frames, {"inputs"})
        inputs = self.limits.check_inputs(tensors["inputs"])
        outputs = await asyncio.wrap_future(self.worker.forward(mb_id, inputs))
        return self._reply(["outputs"], [outputs])

    async def _backward(self, frames: list[StageRequest], remote: str) -> list[StageResponse]:
        header = frames[0]
        mb_id = _key(remote, header.microbatch_id)
        deadline = time.monotonic() + 0.8 * header.timeout
        if self.limits.is_last:
            raise TensorRejected("the last stage runs its backward with the forward; send labels there")
        tensors = self._tensors(frames, {"grad_outputs"}, {"inputs"})
        inputs = self.limits.check_inputs(tensors["inputs"]) if "inputs" in tensors else None
        grad_outputs = self.limits.check_hidden("grad_outputs", tensors["grad_outputs"])
        if inputs is not None and tuple(grad_outputs.shape[:2]) != tuple(inputs.shape[:2]):
            raise TensorRejected(
                f"grad_outputs shape {list(grad_outputs.shape)} does not match inputs {list(inputs.shape)}"
            )
        grad_in = await asyncio.wrap_future(
            self.worker.backward(mb_id, grad_outputs, inputs, deadline=deadline, accumulate=header.accumulate)
        )
        if grad_in is None:
            return [StageResponse()]
        return self._reply(["grad_inputs"], [grad_in])

    async def _serve_info(self, frames: list[InfoRequest], _remote: str) -> list[InfoResponse]:
        info = self.info()
        response = InfoResponse(
            spec_digest=self.digest,
            stage=self.stage,
            state=str(info.state),
            throughput=float(info.throughput),
            epoch=int(info.epoch),
            version=info.version,
            queue_depth=self.worker.queue_depth,
        )
        if frames[0].spec_digest != self.digest:
            response.error = f"spec digest {frames[0].spec_digest[:16]!r} does not match {self.digest[:16]!r}"
        return [response]

    # --- state (for the keeper) ---------------------------------------------------------------

    def _state_snapshot(self, momentum: bool = False) -> tuple[list[str], list[torch.Tensor], int]:
        """Runs in the worker thread, between requests and optimizer steps: the parameters and
        the epoch they belong to are read together. Distinct parameters only (a tied head is
        sent once, under the embedding's name), as in ``peer.model.llama.stage_param_shapes``."""
        optimizer = self.worker.optimizer
        served = optimizer.round_state(momentum=momentum) if optimizer is not None else None
        if served is not None:  # outer rounds: the round's base weights, the same on every member
            return served
        params = dict(self.worker.module.named_parameters())
        epoch = int(self.info().epoch)
        return list(params), [p.detach().clone() for p in params.values()], epoch

    async def _serve_state(self, frames: list[StateRequest], _remote: str) -> list[StateResponse]:
        request = frames[0]
        if request.spec_digest != self.digest:
            raise Rejected(
                ErrorCode.WRONG_SPEC,
                f"spec digest {request.spec_digest[:16]!r} does not match this server's {self.digest[:16]!r}",
            )
        if request.stage != self.stage:
            raise Rejected(ErrorCode.WRONG_STAGE, f"this peer serves stage {self.stage}, not {request.stage}")
        if self._state_busy:
            return [_state_error(ErrorCode.BUSY, "another state request is being served")]
        self._state_busy = True
        try:
            try:
                names, tensors, epoch = await asyncio.wrap_future(
                    self.worker.submit(self._state_snapshot, request.outer_momentum, priority=0)
                )
            except StageError as err:
                return [_state_error(err.code, str(err))]
            # Serializing a large stage takes a while: off the event loop, which serves forward/backward.
            protos = await asyncio.to_thread(lambda: [encode(t, "none") for t in tensors])
            header = StateResponse(spec_digest=self.digest, stage=self.stage, epoch=epoch)
            return split_message(header, names, protos)
        finally:
            self._state_busy = False


def _stage_error(code: str, message: str) -> StageResponse:
    return StageResponse(error=message, error_code=str(code))


def _state_error(code: str, message: str) -> StateResponse:
    return StateResponse(error=message, error_code=str(code))


def _key(remote: str, microbatch_id: str) -> str:
    """Micro-batches are the caller's: another peer cannot claim (or pre-claim) the ids of a
    trainer's micro-batches, since the worker keys its cache and its duplicate check by both."""
    return f"{remote}/{microbatch_id}"
