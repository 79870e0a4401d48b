"""Stage serving over hivemind's P2P: forward, backward, info and state handlers.

Every request is untrusted: the spec digest, the stage, tensor names, dtypes, shapes, sizes
and values are checked before any compute, and a bad request gets an error reply while the
server keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from hivemind.p2p import P2P

from peer.stage_worker import StageError, StageWorker
from peer.wire import FrameError, error_response, join_tensors, read_frame, split_message, write_frame
from protocol.codecs import TensorRejected, activation_codec, decode, encode
from protocol.messages_pb2 import InfoRequest, InfoResponse, StageRequest, StageResponse, StateRequest, StateResponse
from protocol.spec import RunSpec

log = logging.getLogger("swarmtrain.server")

FORWARD, BACKWARD, INFO = "swarmtrain.forward", "swarmtrain.backward", "swarmtrain.info"
STATE = "swarmtrain.state"  # the stage's current parameters, for the keeper (peer.keeper)
MAX_FRAMES = 1024
MAX_TIMEOUT = 600.0


@dataclass
class WireCounters:
    """Bytes of tensor payload on the wire, by kind, for metrics and benchmarks."""

    sent: dict = field(default_factory=dict)
    received: dict = field(default_factory=dict)

    def add(self, direction: str, kind: str, n: int) -> None:
        table = self.sent if direction == "sent" else self.received
        table[kind] = table.get(kind, 0) + n


@dataclass
class Limits:
    """What a request to stage ``stage`` of ``spec`` may contain."""

    spec: RunSpec
    stage: int
    max_batch: int

    @classmethod
    def for_stage(cls, spec: RunSpec, stage: int) -> "Limits":
        return cls(spec, stage, max_batch=max(64, 4 * spec.training.micro_batch_size))

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.spec.num_stages - 1

    @property
    def max_bytes(self) -> int:
        m = self.spec.model
        # inputs and grad_outputs or labels, float32, uncompressed, plus framing slack
        return 2 * self.max_batch * m.max_position_embeddings * m.hidden_size * 4 + (1 << 20)

    def check_ids(self, name: str, proto) -> torch.Tensor:
        m = self.spec.model
        ids = decode(proto, name=name, dtype=torch.int64, max_elements=self.max_batch * m.max_position_embeddings)
        if ids.dim() != 2 or not (1 <= ids.shape[0] <= self.max_batch) or not (2 <= ids.shape[1] <= m.max_position_embeddings):
            raise TensorRejected(f"{name}: shape {list(ids.shape)} where [batch<={self.max_batch}, "
                                 f"2<=length<={m.max_position_embeddings}] was expected")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= m.vocab_size):
            raise TensorRejected(f"{name}: token ids must be in [0, {m.vocab_size})")
        return ids

    def check_hidden(self, name: str, proto, like: Optional[tuple] = None) -> torch.Tensor:
        m = self.spec.model
        shape = [None, None, m.hidden_size] if like is None else list(like)
        x = decode(proto, name=name, dtype=torch.float32, shape=shape,
                   max_elements=self.max_batch * m.max_position_embeddings * m.hidden_size)
        if not (1 <= x.shape[0] <= self.max_batch) or not (2 <= x.shape[1] <= m.max_position_embeddings):
            raise TensorRejected(f"{name}: shape {list(x.shape)} exceeds batch {self.max_batch} or length "
                                 f"{m.max_position_embeddings}")
        return x

    def check_inputs(self, proto) -> torch.Tensor:
        return self.check_ids("inputs", proto) if self.is_first else self.check_hidden("inputs", proto)


class StageServer:
    """Registers this stage's handlers on a P2P instance (a replica of the DHT's daemon)."""

    def __init__(self, spec: RunSpec, stage: int, worker: StageWorker, *, info: Callable[[], dict],
                 counters: Optional[WireCounters] = None):
        self.spec, self.stage, self.worker = spec, stage, worker
        self.digest = spec.digest()
        self.limits = Limits.for_stage(spec, stage)
        self.codec = activation_codec(spec.compression.activations)
        self.info = info
        self.counters = counters or WireCounters()
        self.requests_rejected = 0
        self.p2p: Optional[P2P] = None
        # A state request copies and serializes the whole stage: one at a time, others get "busy".
        self._state_busy = False

    async def start(self, p2p: P2P) -> None:
        self.p2p = p2p
        await p2p.add_binary_stream_handler(FORWARD, self._serve(self._forward))
        await p2p.add_binary_stream_handler(BACKWARD, self._serve(self._backward))
        await p2p.add_binary_stream_handler(INFO, self._serve_info)
        await p2p.add_binary_stream_handler(STATE, self._serve_state)

    async def stop(self) -> None:
        if self.p2p is None:
            return
        for name in (FORWARD, BACKWARD, INFO, STATE):
            try:
                await self.p2p.remove_binary_stream_handler(name)
            except Exception:
                pass

    # --- framing ---------------------------------------------------------------------------

    def _serve(self, handle):
        async def handler(_stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                frames, error = await self._read_request(reader)
                if error is not None:
                    response = [error]
                else:
                    response = await handle(frames)
                for frame in response:
                    self.counters.add("sent", "activations", frame.ByteSize())
                    await write_frame(writer, frame)
                await write_frame(writer, None)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass  # the caller hung up; nothing was changed for it
            except Exception:
                log.exception("stage handler failed")
            finally:
                writer.close()

        return handler

    async def _read_request(self, reader) -> tuple[list[StageRequest], Optional[StageResponse]]:
        frames: list[StageRequest] = []
        total = 0
        while True:
            try:
                frame = await asyncio.wait_for(read_frame(reader, StageRequest), timeout=60.0)
            except FrameError as err:
                self.requests_rejected += 1
                return [], error_response("bad_request", f"malformed request: {err}")
            except asyncio.TimeoutError:
                self.requests_rejected += 1
                return [], error_response("bad_request", "request stream stalled")
            if frame is None:
                break
            frames.append(frame)
            total += frame.ByteSize()
            self.counters.add("received", "activations", frame.ByteSize())
            if len(frames) > MAX_FRAMES or total > self.limits.max_bytes:
                self.requests_rejected += 1
                return [], error_response("bad_request", f"request exceeds {self.limits.max_bytes} bytes "
                                                         f"or {MAX_FRAMES} frames")
        if not frames:
            self.requests_rejected += 1
            return [], error_response("bad_request", "empty request")
        header = frames[0]
        if header.spec_digest != self.digest:
            self.requests_rejected += 1
            return [], error_response("wrong_spec", f"spec digest {header.spec_digest[:16]!r} does not match this "
                                                    f"server's {self.digest[:16]!r}")
        if header.stage != self.stage:
            self.requests_rejected += 1
            return [], error_response("wrong_stage", f"this peer serves stage {self.stage}, not {header.stage}")
        if not (0 < len(header.microbatch_id) <= 128):
            self.requests_rejected += 1
            return [], error_response("bad_request", "microbatch_id must be 1..128 characters")
        if not (0 < header.timeout <= MAX_TIMEOUT):
            self.requests_rejected += 1
            return [], error_response("bad_request", f"timeout must be in (0, {MAX_TIMEOUT}] seconds")
        return frames, None

    def _tensors(self, frames, required: set, optional: set = frozenset()) -> dict:
        tensors = join_tensors(frames, self.limits.max_bytes)
        missing, unknown = required - tensors.keys(), tensors.keys() - required - optional
        if missing or unknown:
            raise TensorRejected(f"expected tensors {sorted(required)} (optional {sorted(optional)}), "
                                 f"got {sorted(tensors)}")
        return tensors

    async def _run(self, future) -> object:
        return await asyncio.wrap_future(future)

    def _reply(self, names, tensors, **fields) -> list[StageResponse]:
        protos = [encode(t, self.codec) for t in tensors]
        return split_message(StageResponse(**fields), names, protos)

    # --- handlers --------------------------------------------------------------------------

    async def _forward(self, frames: list[StageRequest]) -> list[StageResponse]:
        header = frames[0]
        # Server-side deadline a little shorter than the trainer's: late work is discarded.
        deadline = time.monotonic() + 0.8 * header.timeout
        try:
            if self.limits.is_last:
                tensors = self._tensors(frames, {"inputs", "labels"})
                inputs = self.limits.check_inputs(tensors["inputs"])
                labels = self.limits.check_ids("labels", tensors["labels"])
                if labels.shape != inputs.shape[:2]:
                    raise TensorRejected(f"labels shape {list(labels.shape)} does not match inputs {list(inputs.shape[:2])}")
                loss, grad_in = await self._run(self.worker.forward(header.microbatch_id, inputs, labels,
                                                                    deadline=deadline))
                if grad_in is None:
                    return [StageResponse(loss=loss)]
                return self._reply(["grad_inputs"], [grad_in], loss=loss)
            tensors = self._tensors(frames, {"inputs"})
            inputs = self.limits.check_inputs(tensors["inputs"])
            outputs = await self._run(self.worker.forward(header.microbatch_id, inputs))
            return self._reply(["outputs"], [outputs])
        except TensorRejected as err:
            self.requests_rejected += 1
            return [error_response("bad_request", str(err))]
        except FrameError as err:
            self.requests_rejected += 1
            return [error_response("bad_request", f"malformed request: {err}")]
        except StageError as err:
            return [error_response(err.code, str(err))]

    async def _backward(self, frames: list[StageRequest]) -> list[StageResponse]:
        header = frames[0]
        deadline = time.monotonic() + 0.8 * header.timeout
        try:
            if self.limits.is_last:
                raise TensorRejected("the last stage runs its backward with the forward; send labels there")
            tensors = self._tensors(frames, {"grad_outputs"}, {"inputs"})
            inputs = self.limits.check_inputs(tensors["inputs"]) if "inputs" in tensors else None
            grad_outputs = self.limits.check_hidden("grad_outputs", tensors["grad_outputs"])
            if inputs is not None and tuple(grad_outputs.shape[:2]) != tuple(inputs.shape[:2]):
                raise TensorRejected(f"grad_outputs shape {list(grad_outputs.shape)} does not match inputs "
                                     f"{list(inputs.shape)}")
            grad_in = await self._run(self.worker.backward(header.microbatch_id, grad_outputs, inputs,
                                                           deadline=deadline, accumulate=header.accumulate))
            if grad_in is None:
                return [StageResponse()]
            return self._reply(["grad_inputs"], [grad_in])
        except TensorRejected as err:
            self.requests_rejected += 1
            return [error_response("bad_request", str(err))]
        except FrameError as err:
            self.requests_rejected += 1
            return [error_response("bad_request", f"malformed request: {err}")]
        except StageError as err:
            return [error_response(err.code, str(err))]

    async def _serve_info(self, _stream_info, reader, writer) -> None:
        try:
            try:
                request = await asyncio.wait_for(read_frame(reader, InfoRequest), timeout=10.0)
                if request is None:
                    raise FrameError("empty request")
                # Up to the end marker: closing with unread input resets the stream and loses the answer.
                if await asyncio.wait_for(read_frame(reader, InfoRequest), timeout=10.0) is not None:
                    raise FrameError("one request per stream")
                info = self.info()
                response = InfoResponse(spec_digest=self.digest, stage=self.stage, state=info.get("state", "online"),
                                        throughput=float(info.get("throughput", 0.0)), epoch=int(info.get("epoch", 0)),
                                        version=str(info.get("version", "")), queue_depth=self.worker.queue_depth)
                if request.spec_digest != self.digest:
                    response.error = f"spec digest {request.spec_digest[:16]!r} does not match {self.digest[:16]!r}"
            except FrameError as err:
                response = InfoResponse(error=f"malformed request: {err}")
            await write_frame(writer, response)
            await write_frame(writer, None)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()

    # --- state (for the keeper) ---------------------------------------------------------------

    def _state_snapshot(self) -> tuple[list[str], list[torch.Tensor], int]:
        """Runs in the worker thread, between requests and optimizer steps: the parameters and
        the epoch they belong to are read together. Distinct parameters only (a tied head is
        sent once, under the embedding's name), as in ``peer.model.stage_param_shapes``."""
        params = dict(self.worker.module.named_parameters())
        epoch = int(self.info().get("epoch", 0))
        return list(params), [p.detach().clone() for p in params.values()], epoch

    async def _serve_state(self, _stream_info, reader, writer) -> None:
        try:
            frames = await self._state_response(reader)
            for frame in frames:
                self.counters.add("sent", "state", frame.ByteSize())
                await write_frame(writer, frame)
            await write_frame(writer, None)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            pass  # the caller hung up
        except Exception:
            log.exception("state handler failed")
        finally:
            writer.close()

    async def _state_response(self, reader) -> list[StateResponse]:
        def fail(code: str, message: str) -> list[StateResponse]:
            self.requests_rejected += 1
            return [StateResponse(error=message, error_code=code)]

        try:
            request = await asyncio.wait_for(read_frame(reader, StateRequest), timeout=10.0)
            # Read up to the end marker before answering: closing a stream with unread input
            # resets it, and the caller would lose the answer.
            extra = None if request is None else await asyncio.wait_for(read_frame(reader, StateRequest), timeout=10.0)
        except FrameError as err:
            return fail("bad_request", f"malformed request: {err}")
        if request is None:
            return fail("bad_request", "empty request")
        if extra is not None:
            return fail("bad_request", "one request per stream")
        if request.spec_digest != self.digest:
            return fail("wrong_spec", f"spec digest {request.spec_digest[:16]!r} does not match this server's "
                                      f"{self.digest[:16]!r}")
        if request.stage != self.stage:
            return fail("wrong_stage", f"this peer serves stage {self.stage}, not {request.stage}")
        if self._state_busy:
            return [StateResponse(error="another state request is being served", error_code="busy")]
        self._state_busy = True
        try:
            try:
                names, tensors, epoch = await asyncio.wrap_future(self.worker.submit(self._state_snapshot, priority=0))
            except StageError as err:
                return [StateResponse(error=str(err), error_code=err.code)]
            # Serializing a large stage takes a while: off the event loop, which serves forward/backward.
            protos = await asyncio.to_thread(lambda: [encode(t, "none") for t in tensors])
            header = StateResponse(spec_digest=self.digest, stage=self.stage, epoch=epoch)
            return split_message(header, names, protos)
        finally:
            self._state_busy = False
