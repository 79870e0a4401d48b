"""Sparse low-bit pseudo-gradients for outer rounds (SparseLoCo-style), encoded and decoded.

A member's pseudo-gradient (its weights at the round's start minus its weights now) is added to
the error it kept from earlier rounds; of each fixed chunk of ``chunk`` elements only the ``k``
largest in magnitude are sent, each as a signed ``bits``-bit integer times one float32 scale per
chunk; the part not sent (everything unselected, and the quantization error of what was) stays
in the error buffer for the next round. Indices are packed at ``log2(chunk)`` bits each.

Everything here is deterministic: the selection breaks ties by index, quantization is plain
rounding, so the same input gives the same bytes on any machine. ``SparseUpdate.from_bytes``
is written for hostile input: every length is checked against the header before anything is
allocated or decoded.
"""

from __future__ import annotations

import dataclasses
import math
import struct

import numpy as np

__all__ = ["SparseConfig", "SparseUpdate", "SparseRejected", "compress", "decode_dense"]

MAGIC = b"STSP1"
_HEADER = struct.Struct("<5sQIIB")  # magic, numel, chunk, k, bits
MAX_NUMEL = 1 << 31


class SparseRejected(ValueError):
    """Bytes that are not a well-formed sparse update of the expected size."""


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    chunk: int = 4096  # elements per chunk (a power of two: indices pack at log2(chunk) bits)
    k: int = 32  # values kept per chunk
    bits: int = 2  # per value: a signed integer in [-(2^(bits-1) - 1), 2^(bits-1) - 1]

    def __post_init__(self) -> None:
        if self.chunk < 2 or self.chunk & (self.chunk - 1) or self.chunk > 1 << 16:
            raise ValueError(f"chunk must be a power of two in [2, 65536], got {self.chunk}")
        if not 1 <= self.k <= self.chunk:
            raise ValueError(f"k must be in [1, chunk], got {self.k}")
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be 2, 3, 4 or 8, got {self.bits}")

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def index_bits(self) -> int:
        return int(math.log2(self.chunk))


@dataclasses.dataclass(frozen=True)
class SparseUpdate:
    """One member's compressed pseudo-gradient of ``numel`` elements."""

    numel: int
    config: SparseConfig
    scales: np.ndarray  # float32 [chunks]: the magnitude a quantized value of qmax stands for
    indices: np.ndarray  # int64 [chunks, k]: positions within each chunk, ascending
    values: np.ndarray  # int8 [chunks, k]: quantized values in [-qmax, qmax]

    @property
    def chunks(self) -> int:
        return -(-self.numel // self.config.chunk)

    def to_bytes(self) -> bytes:
        c = self.config
        head = _HEADER.pack(MAGIC, self.numel, c.chunk, c.k, c.bits)
        return b"".join(
            (
                head,
                self.scales.astype("<f4").tobytes(),
                _pack(self.indices.reshape(-1), c.index_bits),
                _pack((self.values.reshape(-1).astype(np.int64) + c.qmax), c.bits),
            )
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, numel: int, config: SparseConfig) -> "SparseUpdate":
        """Decode bytes a stranger sent; ``numel`` and ``config`` are what the round expects."""
        if len(data) < _HEADER.size:
            raise SparseRejected(f"{len(data)} bytes: shorter than the header")
        magic, n, chunk, k, bits = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise SparseRejected("not a sparse update (bad magic)")
        if (n, chunk, k, bits) != (numel, config.chunk, config.k, config.bits):
            raise SparseRejected(
                f"an update of {n} elements, chunk {chunk}, k {k}, {bits} bits; expected {numel}, "
                f"{config.chunk}, {config.k}, {config.bits}"
            )
        expected = encoded_size(numel, config)
        if len(data) != expected:
            raise SparseRejected(f"{len(data)} bytes, expected exactly {expected}")
        chunks = -(-numel // config.chunk)
        off = _HEADER.size
        scales = np.frombuffer(data, dtype="<f4", count=chunks, offset=off).astype(np.float32)
        off += 4 * chunks
        if not np.isfinite(scales).all() or (scales < 0).any():
            raise SparseRejected("a chunk scale is negative or not finite")
        n_idx = _packed_len(chunks * k, config.index_bits)
        indices = _unpack(data[off : off + n_idx], chunks * k, config.index_bits).reshape(chunks, k)
        off += n_idx
        raw = _unpack(data[off:], chunks * k, config.bits).reshape(chunks, k)
        if (raw > 2 * config.qmax).any():
            raise SparseRejected(f"a value is outside [-{config.qmax}, {config.qmax}]")
        if (np.diff(indices, axis=1) <= 0).any():
            raise SparseRejected("indices within a chunk must be strictly ascending")
        last = numel - (chunks - 1) * config.chunk  # the last chunk may be short
        if ((indices[-1] >= last) & (raw[-1] != config.qmax)).any():
            # Only padding (value 0) may sit there: a last chunk shorter than k is padded.
            raise SparseRejected("an index of the last chunk is past the end of the tensor")
        return cls(numel, config, scales, indices.astype(np.int64), (raw - config.qmax).astype(np.int8))


def encoded_size(numel: int, config: SparseConfig) -> int:
    chunks = -(-numel // config.chunk)
    return (
        _HEADER.size
        + 4 * chunks
        + _packed_len(chunks * config.k, config.index_bits)
        + _packed_len(chunks * config.k, config.bits)
    )


def compress(delta: np.ndarray, error: np.ndarray, config: SparseConfig) -> tuple[SparseUpdate, np.ndarray]:
    """(update, new error buffer) for a flat float32 pseudo-gradient and the error kept so far.

    The last chunk is zero-padded; a chunk shorter than ``k`` (only possible for the last one)
    still sends ``k`` positions, the padding ones with value 0."""
    if delta.ndim != 1 or delta.shape != error.shape:
        raise ValueError(f"delta {delta.shape} and error {error.shape} must be flat and alike")
    numel, chunk, k = delta.size, config.chunk, config.k
    if not 0 < numel <= MAX_NUMEL:
        raise ValueError(f"numel must be in [1, 2^31], got {numel}")
    chunks = -(-numel // chunk)
    acc = np.zeros(chunks * chunk, dtype=np.float32)
    acc[:numel] = error.astype(np.float32) + delta.astype(np.float32)
    acc = acc.reshape(chunks, chunk)
    # Top-k by magnitude, ties to the lower index (a stable sort of -|x|), then ascending positions.
    order = np.argsort(-np.abs(acc), axis=1, kind="stable")[:, :k]
    indices = np.sort(order, axis=1)
    picked = np.take_along_axis(acc, indices, axis=1)
    scales = np.abs(picked).max(axis=1).astype(np.float32)
    qmax = config.qmax
    safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
    values = np.clip(np.rint(picked / safe[:, None] * qmax), -qmax, qmax).astype(np.int8)
    update = SparseUpdate(numel, config, scales, indices.astype(np.int64), values)
    sent = np.zeros_like(acc)
    np.put_along_axis(sent, indices, dequantize(update), axis=1)
    new_error = (acc - sent).reshape(-1)[:numel]
    return update, new_error


def dequantize(update: SparseUpdate) -> np.ndarray:
    """float32 [chunks, k]: the values the update stands for."""
    return (update.values.astype(np.float32) * (update.scales / update.config.qmax)[:, None]).astype(np.float32)


def decode_dense(update: SparseUpdate) -> np.ndarray:
    """The update as a dense float64 vector of ``numel`` elements (exact: each value is a small
    integer times a float32 scale over qmax, all representable in float64)."""
    c = update.config
    dense = np.zeros(update.chunks * c.chunk, dtype=np.float64).reshape(update.chunks, c.chunk)
    vals = update.values.astype(np.float64) * (update.scales.astype(np.float64) / c.qmax)[:, None]
    np.put_along_axis(dense, update.indices, vals, axis=1)
    return dense.reshape(-1)[: update.numel]


def _packed_len(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def _pack(values: np.ndarray, bits: int) -> bytes:
    """Unsigned integers below 2^bits, ``bits`` bits each, most significant bit first."""
    v = values.astype(">u4").view(np.uint8).reshape(-1, 4)
    matrix = np.unpackbits(v, axis=1)[:, 32 - bits :]
    return np.packbits(matrix.reshape(-1)).tobytes()


def _unpack(data: bytes, count: int, bits: int) -> np.ndarray:
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: count * bits]
    matrix = flat.reshape(count, bits)
    weights = (1 << np.arange(bits - 1, -1, -1)).astype(np.int64)
    return matrix.astype(np.int64) @ weights
