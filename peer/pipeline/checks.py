"""What a trainer checks of its own requests and of a stage's answers (pure).

A request is checked before it leaves, so that a ``bad_request`` answer is provably not the
trainer's fault (the router then bans the peer that sent it). An answer is checked before any
of it is used: a stage that returns a tensor of another shape, a non-finite or absurd loss,
or a missing gradient would otherwise make the next honest stage compute too much, or turn
the trainer's loss (and every DHT record it announces) into NaN.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from peer.net import RemoteError
from protocol.rpc import ErrorCode
from protocol.spec import RunSpec

MAX_LOSS = 1e4  # a cross-entropy loss per token; ln(vocab) is at most about 12 for real vocabularies


def check_request(spec: RunSpec, stage: int, named: Mapping[str, torch.Tensor]) -> None:
    """Our own request of ``stage``: at most one micro-batch of the spec's shape, finite values."""
    training = spec.training
    for name, t in named.items():
        if (
            t.dim() < 2
            or not (1 <= t.shape[0] <= training.micro_batch_size)
            or not (2 <= t.shape[1] <= training.seq_len)
        ):
            raise RemoteError(ErrorCode.BAD_REQUEST, f"our own {name} of shape {list(t.shape)} does not fit the spec")
        if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            raise RemoteError(ErrorCode.BAD_REQUEST, f"our own {name} is not finite")


def check_response(
    spec: RunSpec,
    stage: int,
    *,
    backward: bool,
    sent: Mapping[str, torch.Tensor],
    loss: float,
    received: Mapping[str, torch.Tensor],
    label_loss: float = 0.0,
) -> None:
    """An answer of ``stage`` to ``sent``; raises RemoteError(bad_response) naming what is wrong."""
    last = stage == spec.num_stages - 1
    inputs = sent.get("inputs")
    if not backward and not last:
        want = (sent["inputs"].shape[0], sent["inputs"].shape[1], spec.model.hidden_size)
        _expect(received, "outputs", want)
        return
    if not backward and last:
        for what, value in (("loss", loss), ("label loss", label_loss)):
            if not (math.isfinite(value) and 0.0 <= value <= MAX_LOSS):
                raise RemoteError(
                    ErrorCode.BAD_RESPONSE, f"{what} {value!r} is not a loss (finite, in [0, {MAX_LOSS:g}])"
                )
    if stage == 0:
        if received:
            raise RemoteError(ErrorCode.BAD_RESPONSE, f"stage 0 returned tensors {sorted(received)}")
        return
    like = inputs if inputs is not None else sent["grad_outputs"]
    _expect(received, "grad_inputs", tuple(like.shape))


def _expect(received: Mapping[str, torch.Tensor], name: str, shape: tuple) -> None:
    if set(received) != {name}:
        raise RemoteError(ErrorCode.BAD_RESPONSE, f"expected {name}, got {sorted(received)}")
    if tuple(received[name].shape) != tuple(shape):
        raise RemoteError(ErrorCode.BAD_RESPONSE, f"{name} has shape {list(received[name].shape)}, not {list(shape)}")
