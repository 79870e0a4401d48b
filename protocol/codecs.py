"""Tensor codecs on the wire: activations between stages and gradients inside a stage group.

The codecs themselves are hivemind's (one class per codec behind ``CompressionBase``); this
module maps the spec's codec names onto them and decodes untrusted bytes defensively: every
tensor that arrives from another peer is checked for dtype, shape, size and finiteness before
any code touches it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from hivemind.compression import (
    BlockwiseQuantization,
    CompressionBase,
    Float16Compression,
    NoCompression,
    SizeAdaptiveCompression,
    Uniform8BitQuantization,
    deserialize_torch_tensor,
    serialize_torch_tensor,
)
from hivemind.proto import runtime_pb2

ACTIVATION_CODECS: dict[str, CompressionBase] = {
    "none": NoCompression(),
    "fp16": Float16Compression(),
    "uniform8bit": Uniform8BitQuantization(),
    "blockwise8bit": BlockwiseQuantization(),
}

# Hard ceiling for one decoded tensor, whatever the spec says: 2**28 float32 elements is 1 GiB.
MAX_TENSOR_ELEMENTS = 2**28
MAX_DIMS = 8

# What swarmtrain sends: float tensors as float32 through any codec, integer ids uncompressed.
# hivemind's deserializer trusts the sender's dtype string and buffer (a 16-byte FLOAT16 tensor
# declaring dtype "(250000000,)f8" allocated 16 GB; short 8-bit buffers reach bitsandbytes'
# unchecked kernel), so a tensor must match one of these pairs and its buffer must have the
# exact length its codec writes for the declared shape before any byte is deserialized.
_C = runtime_pb2.CompressionType
ALLOWED_DTYPES: dict[int, frozenset[str]] = {
    _C.NONE: frozenset({"float32", "int64"}),
    _C.FLOAT16: frozenset({"float32"}),
    _C.MEANSTD_16BIT: frozenset({"float32"}),
    _C.UNIFORM_8BIT: frozenset({"float32"}),
    _C.QUANTILE_8BIT: frozenset({"float32"}),
    _C.BLOCKWISE_8BIT: frozenset({"float32"}),
}
_ITEMSIZE = {"float32": 4, "int64": 8}
_BLOCKSIZE = 4096  # hivemind's blockwise quantization block
_CODEBOOK = 256  # entries of an 8-bit codebook


class TensorRejected(ValueError):
    """A tensor from the wire that must not be used; the message says why."""


def activation_codec(name: str) -> CompressionBase:
    try:
        return ACTIVATION_CODECS[name]
    except KeyError:
        raise ValueError(f"unknown activation codec {name!r}; choose one of {', '.join(ACTIVATION_CODECS)}") from None


def gradient_compression(name: str, *, min_compressed_size: int = 4096) -> CompressionBase:
    """The compression hivemind's averager applies to gradients.

    Small tensors (norms) go as fp16 even with an 8-bit codec: 8-bit's per-block overhead
    outweighs the saving and their precision matters more. PowerSGD is not a codec but a
    different averager (see ``peer.averaging``); its leftover tensors go as fp16.
    """
    if name == "none":
        return NoCompression()
    if name in ("fp16", "powersgd"):
        return Float16Compression()
    codec = activation_codec(name)
    return SizeAdaptiveCompression(threshold=min_compressed_size, less=Float16Compression(), greater_equal=codec)


def encode(tensor: torch.Tensor, codec: CompressionBase | str = "none") -> runtime_pb2.Tensor:
    """Serialize a tensor; integer tensors (token ids, labels) are never lossy-compressed."""
    if isinstance(codec, str):
        codec = activation_codec(codec)
    if not tensor.dtype.is_floating_point:
        codec = NoCompression()
    tensor = tensor.detach()
    if tensor.dtype == torch.float32 or not tensor.dtype.is_floating_point:
        return serialize_torch_tensor(tensor, codec.compression_type)
    return serialize_torch_tensor(tensor.float(), codec.compression_type)


def decode(
    proto: runtime_pb2.Tensor,
    *,
    name: str = "tensor",
    dtype: Optional[torch.dtype] = None,
    shape: Optional[Sequence[Optional[int]]] = None,
    max_elements: int = MAX_TENSOR_ELEMENTS,
    finite: bool = True,
) -> torch.Tensor:
    """Deserialize an untrusted tensor and check it; raises TensorRejected with the reason.

    ``shape`` may hold None for a free dimension. Floating tensors come back as float32.
    """
    declared = list(proto.size)
    if len(declared) > MAX_DIMS:
        raise TensorRejected(f"{name}: {len(declared)} dimensions (at most {MAX_DIMS})")
    if any(d < 0 for d in declared):
        raise TensorRejected(f"{name}: negative dimension in declared shape {declared}")
    numel = 1
    for d in declared:
        numel *= d
    if numel > max_elements:
        raise TensorRejected(f"{name}: {numel} elements exceeds the limit of {max_elements}")
    if shape is not None:
        _check_shape(name, declared, shape)
    check_buffer(proto, name=name)
    try:
        tensor = deserialize_torch_tensor(proto)
    except Exception as err:  # garbage bytes surface as many different exception types
        raise TensorRejected(f"{name}: cannot decode ({type(err).__name__}: {err})") from None
    if list(tensor.shape) != declared:
        raise TensorRejected(f"{name}: decoded shape {list(tensor.shape)} differs from declared {declared}")
    if dtype is not None:
        if dtype.is_floating_point != tensor.dtype.is_floating_point or (
            not dtype.is_floating_point and tensor.dtype != dtype
        ):
            raise TensorRejected(f"{name}: dtype {tensor.dtype} where {dtype} was expected")
    if tensor.dtype.is_floating_point:
        tensor = tensor.float()
        if finite and not torch.isfinite(tensor).all():
            raise TensorRejected(f"{name}: contains NaN or infinite values")
    return tensor


def expected_buffer_bytes(compression: int, dtype: str, shape: Sequence[int]) -> int:
    """The exact length of the buffer hivemind's codec writes for ``shape``; raises
    TensorRejected for a (compression, dtype) pair swarmtrain never sends."""
    if compression not in ALLOWED_DTYPES:
        raise TensorRejected(f"compression {compression} is not accepted")
    if dtype not in ALLOWED_DTYPES[compression]:
        raise TensorRejected(
            f"dtype {dtype[:32]!r} is not accepted with compression "
            f"{_C.Name(compression)} (only {sorted(ALLOWED_DTYPES[compression])})"
        )
    numel = 1
    for d in shape:
        numel *= d
    if compression == _C.NONE:
        return numel * _ITEMSIZE[dtype]
    if compression == _C.FLOAT16:
        return numel * 2
    if compression == _C.MEANSTD_16BIT:
        if not shape or shape[-1] == 0:
            raise TensorRejected("MEANSTD_16BIT needs a non-empty last dimension")
        return numel * 2 + 2 * 4 * (numel // shape[-1])
    if compression in (_C.UNIFORM_8BIT, _C.QUANTILE_8BIT):
        return 8 + 4 * _CODEBOOK + numel
    # BLOCKWISE_8BIT: absmax per block, a 256-entry codebook, one byte per element
    if numel == 0:
        raise TensorRejected("BLOCKWISE_8BIT of an empty tensor")
    return 16 + 4 * -(-numel // _BLOCKSIZE) + 4 * _CODEBOOK + numel


def check_buffer(proto: runtime_pb2.Tensor, *, name: str = "tensor") -> None:
    """Refuse a tensor whose codec, dtype or buffer length is not what its declared shape
    needs, before hivemind's deserializer sees it (it trusts all three)."""
    try:
        expected = expected_buffer_bytes(proto.compression, proto.dtype, list(proto.size))
    except TensorRejected as err:
        raise TensorRejected(f"{name}: {err}") from None
    if len(proto.buffer) != expected:
        raise TensorRejected(
            f"{name}: buffer of {len(proto.buffer)} bytes where {expected} were expected for shape {list(proto.size)}"
        )
    # The 8-bit formats start with their table sizes (int64): they must be the ones whose
    # lengths were counted above, or the deserializer reads past them.
    numel = 1
    for d in proto.size:
        numel *= d
    if proto.compression in (_C.UNIFORM_8BIT, _C.QUANTILE_8BIT):
        sizes = [("codebook", 0, _CODEBOOK)]
    elif proto.compression == _C.BLOCKWISE_8BIT:
        sizes = [("absmax", 0, -(-numel // _BLOCKSIZE)), ("codebook", 8, _CODEBOOK)]
    else:
        sizes = []
    for what, offset, want in sizes:
        got = int.from_bytes(proto.buffer[offset : offset + 8], "little", signed=True)
        if got != want:
            raise TensorRejected(f"{name}: {what} of {got} entries where {want} were expected")


def _check_shape(name: str, got: Sequence[int], expected: Sequence[Optional[int]]) -> None:
    if len(got) != len(expected) or any(e is not None and g != e for g, e in zip(got, expected)):
        pretty = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise TensorRejected(f"{name}: shape {list(got)} where {pretty} was expected")


def wire_bytes(protos: Sequence[runtime_pb2.Tensor]) -> int:
    return sum(p.ByteSize() for p in protos)
