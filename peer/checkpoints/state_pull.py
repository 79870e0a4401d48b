"""Pulling a stage's live parameters from a peer (the ``swarmtrain.state`` RPC) and checking
them: the right names, shapes and dtypes, finite, within the stage's byte budget."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Callable, Mapping, Sequence, Union

import torch
from hivemind.p2p import P2P

from peer.model.llama import stage_param_shapes
from peer.net import FrameError, RemoteError, call, join_tensors
from protocol.codecs import TensorRejected, decode
from protocol.messages_pb2 import StateRequest, StateResponse
from protocol.rpc import CHUNK_BYTES, MAX_FRAMES, MOMENTUM_PREFIX, STATE, ErrorCode
from protocol.spec import RunSpec


class StateRejected(ValueError):
    """A stage state that must not be used; the message names the peer, tensor and check."""


# ---------------------------------------------------------------------------------------------
# pulling a stage's state (client of peer.pipeline.server's swarmtrain.state)


def expected_state(spec: RunSpec, stage: int, *, momentum: bool = False) -> dict[str, tuple[int, ...]]:
    """Name -> shape of a state reply: the stage's parameters, and with ``momentum`` the outer
    optimizer's momentum of each (``outer_momentum/<name>``)."""
    shapes = stage_param_shapes(spec, stage)
    if momentum:
        shapes = {**shapes, **{MOMENTUM_PREFIX + n: s for n, s in shapes.items()}}
    return shapes


def state_byte_limit(spec: RunSpec, stage: int, *, momentum: bool = False) -> int:
    shapes = expected_state(spec, stage, momentum=momentum)
    # float32 payload plus per-tensor protobuf and framing overhead
    return 4 * sum(math.prod(s) for s in shapes.values()) + 4096 * (len(shapes) + 16)


def check_stage_state(
    spec: RunSpec, stage: int, raw: Mapping, *, source: str = "peer", momentum: bool = False
) -> dict[str, torch.Tensor]:
    """Decode and check the tensors of a state reply: exactly the stage's parameter names (and
    momentum names with ``momentum``), their shapes, floating point and finite. ``raw``: name ->
    hivemind Tensor proto."""
    expected = expected_state(spec, stage, momentum=momentum)
    missing = sorted(set(expected) - set(raw))
    unexpected = sorted(set(raw) - set(expected))
    if missing or unexpected:
        parts = (
            [f"missing {', '.join(missing[:5])}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")]
            if missing
            else []
        ) + ([f"unexpected {', '.join(unexpected[:5])}"] if unexpected else [])
        raise StateRejected(f"{source}: stage {stage} state has the wrong tensors: {'; '.join(parts)}")
    out = {}
    for name, shape in expected.items():
        try:
            out[name] = decode(
                raw[name], name=name, dtype=torch.float32, shape=list(shape), max_elements=max(1, math.prod(shape))
            )
        except TensorRejected as err:
            raise StateRejected(f"{source}: stage {stage}: {err}") from None
    return out


STATE_ATTEMPTS = 3  # a state is megabytes: one dropped stream should not cost a checkpoint or a join


async def pull_stage_state(
    p2p: P2P,
    peer_id: str,
    spec: RunSpec,
    stage: int,
    *,
    timeout: float = 60.0,
    momentum: bool = False,
    attempts: int = STATE_ATTEMPTS,
) -> tuple[int, dict[str, torch.Tensor]]:
    """(epoch, parameters) of ``stage`` from ``peer_id``; raises StateRejected with the reason.
    ``momentum``: also the outer optimizer's momentum (outer rounds), as ``outer_momentum/<name>``.
    A stream that breaks before the whole answer is asked again, up to ``attempts`` times, all
    within ``timeout``; an answer that arrives and is wrong is not asked again."""

    limit = state_byte_limit(spec, stage, momentum=momentum)
    deadline = time.monotonic() + timeout
    for attempt in range(1, attempts + 1):
        try:
            frames = await call(
                p2p,
                peer_id,
                STATE,
                [StateRequest(spec_digest=spec.digest(), stage=stage, outer_momentum=momentum)],
                StateResponse,
                timeout=max(0.1, deadline - time.monotonic()),
                max_bytes=limit,
                max_frames=MAX_FRAMES + limit // CHUNK_BYTES,
                kind="state",
            )
            break
        except RemoteError as err:
            broken = err.code == ErrorCode.UNREACHABLE
            if not broken or attempt == attempts or deadline - time.monotonic() < 1.0:
                tries = f" (after {attempt} attempts)" if attempt > 1 else ""
                raise StateRejected(f"{peer_id}: {err}{tries}") from None
            await asyncio.sleep(min(0.5 * attempt, deadline - time.monotonic() - 0.5))
    head = frames[0]
    if head.spec_digest != spec.digest():
        raise StateRejected(f"{peer_id}: state of spec {head.spec_digest[:16]!r}, not {spec.digest()[:16]!r}")
    if head.stage != stage:
        raise StateRejected(f"{peer_id}: state of stage {head.stage}, not {stage}")
    try:
        raw = join_tensors(frames, limit)
    except FrameError as err:
        raise StateRejected(f"{peer_id}: malformed state ({err})") from None
    tensors = await asyncio.to_thread(check_stage_state, spec, stage, raw, source=peer_id, momentum=momentum)
    return int(head.epoch), tensors


class StateReader:
    """Reads one stage's state from other peers, from any thread: the calls run on the event loop
    that owns ``p2p`` (``run(coroutine, timeout)``, the peer's ``LoopThread.run``)."""

    def __init__(self, p2p: P2P, run: Callable, spec: RunSpec, stage: int):
        self.p2p, self.run, self.spec, self.stage = p2p, run, spec, stage

    def one(self, peer_id: str, *, timeout: float, momentum: bool = False) -> tuple[int, dict[str, torch.Tensor]]:
        """(epoch, tensors) that ``peer_id`` serves; raises what ``pull_stage_state`` raises."""
        pull = pull_stage_state(self.p2p, peer_id, self.spec, self.stage, timeout=timeout, momentum=momentum)
        return self.run(pull, timeout + 10)

    def each(
        self, peer_ids: Sequence[str], *, timeout: float, momentum: bool = False
    ) -> list[Union[tuple[int, dict[str, torch.Tensor]], BaseException]]:
        """What each of ``peer_ids`` serves, read at once (an exception in the place of a failed read)."""

        async def pull_all():
            pulls = [
                pull_stage_state(self.p2p, pid, self.spec, self.stage, momentum=momentum, timeout=timeout)
                for pid in peer_ids
            ]
            return await asyncio.gather(*pulls, return_exceptions=True)

        return self.run(pull_all(), timeout + 10)
