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
    if any(d < 0 for d in declared):
        raise TensorRejected(f"{name}: negative dimension in declared shape {declared}")
    numel = 1
    for d in declared:
        numel *= d
    if numel > max_elements:
        raise TensorRejected(f"{name}: {numel} elements exceeds the limit of {max_elements}")
    if shape is not None:
        _check_shape(name, declared, shape)
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


def _check_shape(name: str, got: Sequence[int], expected: Sequence[Optional[int]]) -> None:
    if len(got) != len(expected) or any(e is not None and g != e for g, e in zip(got, expected)):
        pretty = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise TensorRejected(f"{name}: shape {list(got)} where {pretty} was expected")


def wire_bytes(protos: Sequence[runtime_pb2.Tensor]) -> int:
    return sum(p.ByteSize() for p in protos)
