"""Sparse soft targets: what a teacher peer sends for a micro-batch of token ids.

For every position of every sequence, the teacher's ``k`` most likely next tokens and their
log-probabilities at the run's temperature (``distill.temperature``), sorted most likely
first. The rest of the vocabulary is one bucket whose probability is ``1 - sum(exp(logprobs))``;
the student is trained to match the ``k + 1`` buckets (``peer.model.distill``).

Why top-k with a rest bucket, and not sampled tokens: top-k is deterministic, so two honest
teachers holding the same weights answer the same (up to float rounding) and a trainer can
spot-check one against the other; sampled tokens differ between honest teachers and a
comparison would need many samples. Top-k alone is biased (it drops the tail and makes the
student over-confident); the rest bucket keeps the tail's total mass, so the student is not
pushed to put it on the top k. It costs ``k`` indices and ``k`` values a position: 25 bytes
at k = 8 with the byte tokenizer (9-bit indices), 31 with a 32,000-token vocabulary.

Wire format, with no header (the shape ``[batch, length, k]`` is the request's and the spec's):

- indices: ``batch * length * k`` values of ``index_bits(vocab_size)`` bits each, packed
  least significant bit first, the last byte padded with zeros;
- values: ``batch * length * k`` IEEE float16 log-probabilities, little-endian.

``decode`` checks the length before reading a byte and every value after: indices inside the
vocabulary and distinct within a position, log-probabilities finite, at most 0, and summing
(as probabilities) to at most 1 a position.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from protocol.codecs import TensorRejected

__all__ = ["SoftTargets", "decode", "encode", "encoded_size", "index_bits"]


class SoftTargets(NamedTuple):
    """One micro-batch's soft targets, decoded (``ids``, ``logprobs``) and as sent (``data``)."""

    ids: torch.Tensor  # int64 [batch, length, k]
    logprobs: torch.Tensor  # float32 [batch, length, k]
    data: bytes


# float16 rounding: exp of a log-probability near 0 may come back a little above the truth.
_SUM_SLACK = 1e-2
_LOGPROB_SLACK = 1e-3
_MIN_LOGPROB = -60000.0  # float16's range: smaller log-probabilities are sent as this


def index_bits(vocab_size: int) -> int:
    """Bits that hold any token id of the vocabulary."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return max(1, (vocab_size - 1).bit_length())


def encoded_size(batch: int, length: int, k: int, vocab_size: int) -> int:
    n = batch * length * k
    return (n * index_bits(vocab_size) + 7) // 8 + 2 * n


def encode(ids: torch.Tensor, logprobs: torch.Tensor, vocab_size: int) -> bytes:
    """``ids`` (integer) and ``logprobs`` (float) of shape ``[batch, length, k]`` as bytes."""
    if ids.shape != logprobs.shape or ids.dim() != 3:
        raise ValueError(
            f"ids {list(ids.shape)} and logprobs {list(logprobs.shape)} must share a [batch, length, k] shape"
        )
    flat = ids.reshape(-1).to(torch.int64).numpy()
    if flat.size and (flat.min() < 0 or flat.max() >= vocab_size):
        raise ValueError(f"token ids must be in [0, {vocab_size})")
    bits = index_bits(vocab_size)
    as_bits = np.unpackbits(flat.astype("<u4").view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")[:, :bits]
    packed = np.packbits(as_bits.reshape(-1), bitorder="little").tobytes()
    values = logprobs.detach().reshape(-1).float().clamp(min=_MIN_LOGPROB).numpy().astype("<f2").tobytes()
    return packed + values


def decode(data: bytes, *, batch: int, length: int, k: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int64, logprobs float32), each ``[batch, length, k]``, from untrusted bytes; raises
    ``TensorRejected`` with the reason."""
    expected = encoded_size(batch, length, k, vocab_size)
    if len(data) != expected:
        raise TensorRejected(
            f"soft targets: {len(data)} bytes where [{batch}, {length}, {k}] over {vocab_size} tokens take {expected}"
        )
    n, bits = batch * length * k, index_bits(vocab_size)
    index_bytes = (n * bits + 7) // 8
    raw = np.unpackbits(np.frombuffer(data, dtype=np.uint8, count=index_bytes), bitorder="little")[: n * bits]
    ids = (raw.reshape(n, bits).astype(np.int64) << np.arange(bits, dtype=np.int64)).sum(axis=1)
    values = np.frombuffer(data, dtype="<f2", offset=index_bytes, count=n).astype(np.float32)
    ids_t = torch.from_numpy(ids).reshape(batch, length, k)
    lp = torch.from_numpy(values.copy()).reshape(batch, length, k)
    if n and int(ids_t.max()) >= vocab_size:
        raise TensorRejected(f"soft targets: token ids must be in [0, {vocab_size})")
    if k > 1 and bool((ids_t.sort(dim=-1).values.diff(dim=-1) == 0).any()):
        raise TensorRejected("soft targets: a token appears twice at one position")
    if not bool(torch.isfinite(lp).all()):
        raise TensorRejected("soft targets: log-probabilities must be finite")
    if n and float(lp.max()) > _LOGPROB_SLACK:
        raise TensorRejected("soft targets: log-probabilities must be at most 0")
    if n and float(lp.exp().sum(dim=-1).max()) > 1 + _SUM_SLACK:
        raise TensorRejected("soft targets: the probabilities of one position sum to more than 1")
    return ids_t, lp
