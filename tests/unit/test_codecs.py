"""protocol.codecs: what a sender declares is checked before hivemind's deserializer sees it."""

from __future__ import annotations

import resource

import pytest
import torch
from hivemind.proto import runtime_pb2

from protocol.codecs import ACTIVATION_CODECS, TensorRejected, check_buffer, decode, encode

C = runtime_pb2.CompressionType


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("codec", sorted(ACTIVATION_CODECS))
@pytest.mark.parametrize("shape", [(1, 2, 16), (3, 64, 128), (4097,), (2, 5000)])
def test_every_codec_round_trips_through_the_checks(codec, shape):
    x = torch.randn(*shape)
    proto = encode(x, codec)
    check_buffer(proto)
    y = decode(proto, dtype=torch.float32, shape=list(shape))
    assert y.shape == x.shape and torch.isfinite(y).all()
    ids = torch.randint(0, 100, shape)
    assert torch.equal(decode(encode(ids, codec), dtype=torch.int64), ids)


def test_a_dtype_string_that_declares_a_huge_array_is_refused_before_any_allocation():
    # The measured attack, scaled down to be safe if it regressed: each "element" a 1M-float64
    # subarray, 32 elements declared: 256 MB from a 64-byte buffer (the real one asked 16 GB).
    proto = runtime_pb2.Tensor(compression=C.FLOAT16, dtype="(1000000,)f8", size=[1, 2, 16], buffer=bytes(64))
    before = peak_rss_mb()
    with pytest.raises(TensorRejected, match="dtype .* is not accepted"):
        decode(proto)
    assert peak_rss_mb() - before < 50


@pytest.mark.parametrize(
    "compression,dtype",
    [
        (C.NONE, "float64"),
        (C.NONE, "object"),
        (C.NONE, "<U8"),
        (C.FLOAT16, "int64"),
        (C.MEANSTD_16BIT, "float16"),
        (C.BLOCKWISE_8BIT, "bfloat16"),
        (99, "float32"),
    ],
)
def test_pairs_swarmtrain_never_sends_are_refused(compression, dtype):
    proto = runtime_pb2.Tensor(compression=compression, dtype=dtype, size=[2, 2], buffer=bytes(16))
    with pytest.raises(TensorRejected, match="not accepted"):
        decode(proto)


@pytest.mark.parametrize("codec", ["none", "fp16", "uniform8bit", "blockwise8bit"])
@pytest.mark.parametrize("delta", [-1, 1, -10_000])
def test_a_buffer_of_the_wrong_length_is_refused(codec, delta):
    proto = encode(torch.randn(2, 4096), codec)
    buffer = bytes(proto.buffer)
    proto.buffer = buffer[:delta] if delta < 0 else buffer + bytes(delta)
    with pytest.raises(TensorRejected, match="buffer of"):
        decode(proto)


def test_8bit_tables_must_have_their_real_sizes():
    """Short or empty absmax/code tables reached bitsandbytes' unchecked CPU kernel."""
    proto = encode(torch.randn(3, 5000), "blockwise8bit")
    good = bytes(proto.buffer)
    for offset, value, what in [(0, 1, "absmax"), (0, 0, "absmax"), (8, 0, "codebook"), (8, 255, "codebook")]:
        bad = bytearray(good)
        bad[offset : offset + 8] = value.to_bytes(8, "little", signed=True)
        proto.buffer = bytes(bad)
        with pytest.raises(TensorRejected, match=what):
            decode(proto)
    proto = encode(torch.randn(8, 8), "uniform8bit")
    bad = bytearray(proto.buffer)
    bad[0:8] = (2**40).to_bytes(8, "little", signed=True)
    proto.buffer = bytes(bad)
    with pytest.raises(TensorRejected, match="codebook"):
        decode(proto)


def test_declared_shapes_are_bounded():
    with pytest.raises(TensorRejected, match="dimensions"):
        decode(runtime_pb2.Tensor(compression=C.NONE, dtype="float32", size=[1] * 9, buffer=bytes(4)))
    with pytest.raises(TensorRejected, match="exceeds the limit"):
        decode(runtime_pb2.Tensor(compression=C.NONE, dtype="float32", size=[2**20, 2**20], buffer=b""))
