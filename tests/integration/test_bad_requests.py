"""A live stage server under bad requests.

A bootstrap, a peer serving stage 0 that also trains (its trainer sends every micro-batch to
the stage 1 peer), and a peer serving stage 1 (the last stage) run as real processes. The test
process opens its own P2P daemon and talks to the stage handlers with ``peer.net.framing`` framing:
wrong shape, wrong dtype, oversized, NaN, wrong spec digest, wrong stage, garbage bytes,
truncated tensors, out-of-range token ids. Each gets an error reply with the right code, and
afterwards the server still answers a valid request and the trainer's micro-batches keep going
through it.
"""

from __future__ import annotations

import asyncio
import struct
import time

import pytest
import torch
from hivemind.p2p import P2P, PeerID
from hivemind.utils.streaming import split_for_streaming

from peer.base import LoopThread
from peer.net.framing import read_frame
from peer.pipeline.client import RemoteError, call_info, call_stage
from protocol.codecs import encode
from protocol.messages_pb2 import StageRequest, StageResponse
from protocol.rpc import BACKWARD, FORWARD, INFO, MAX_FRAME_BYTES, MAX_FRAMES

from conftest import TrackedCluster, assert_all_gone, dump_logs, make_tiny_spec, write_text_data

pytestmark = pytest.mark.timeout(600)

END = struct.pack(">I", 0xFFFFFFFF)


def frame(message) -> bytes:
    payload = message if isinstance(message, bytes) else message.SerializeToString()
    return struct.pack(">I", len(payload)) + payload


class Swarm:
    def __init__(self, tmp_path):
        self.spec = make_tiny_spec(run_id="badreq")
        self.digest = self.spec.digest()
        spec_path = tmp_path / "spec.toml"
        self.spec.save(spec_path)
        data = write_text_data(tmp_path / "data", files=2)
        self.cluster = TrackedCluster(tmp_path / "cluster")
        _, addr = self.cluster.bootstrap(spec_path=spec_path, timeout=240)
        self.s1 = self.cluster.peer("s1", [addr], spec_path=spec_path, stage=1)
        self.s0 = self.cluster.peer("s0", [addr], spec_path=spec_path, stage=0, data=str(data))
        self.ready1 = self.s1.wait_event("ready", 240)
        self.ready0 = self.s0.wait_event("ready", 240)
        self.cluster.track()
        self.loop = LoopThread()
        maddrs = [*self.ready0["maddrs"], *self.ready1["maddrs"]]
        self.p2p = self.loop.run(P2P.create(initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"]), 120)

    def run(self, coro, timeout=120):
        return self.loop.run(coro, timeout)

    # The stream to a peer is occasionally reset before any byte of the reply arrives (seen in
    # about one full-suite run in three on a 2-core machine, with no error logged by the
    # server; the cause is not pinned down). The trainer retries such a failure on
    # another peer; here the request is sent again on a new stream, at most twice. An error
    # *reply* is never retried, and every retry is counted and printed.
    transport_retries = 0

    def exchange(self, make_coro, timeout=120):
        for attempt in range(3):
            try:
                return self.run(make_coro(), timeout)
            except (asyncio.IncompleteReadError, ConnectionError) as err:
                failure = err
            except RemoteError as err:
                if err.code != "unreachable":
                    raise
                failure = err
            Swarm.transport_retries += 1
            print(f"transport failure, sending again on a new stream ({attempt + 1}/2): {failure}")
        raise failure

    def header(self, stage=1, **fields) -> StageRequest:
        return StageRequest(
            **{
                **dict(spec_digest=self.digest, stage=stage, microbatch_id=f"attack-{time.time_ns()}", timeout=30.0),
                **fields,
            }
        )

    def raw(self, peer_id: str, chunks, *, handler=FORWARD, end=True) -> list[StageResponse]:
        """Write raw bytes on a stage stream; return the response frames."""

        async def exchange():
            _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), handler)
            try:
                for chunk in chunks:
                    writer.write(chunk)
                    await writer.drain()
                if end:
                    writer.write(END)
                    await writer.drain()
                out = []
                while True:
                    response = await asyncio.wait_for(read_frame(reader, StageResponse), 60)
                    if response is None:
                        return out
                    out.append(response)
            finally:
                writer.close()

        return self.exchange(exchange)

    def request(self, peer_id, header, names, protos, **kw) -> list[StageResponse]:
        frames = [header]
        first = True
        for name, proto in zip(names, protos):
            for part in split_for_streaming(proto, 2 * 1024 * 1024):
                f = header if first else StageRequest()
                f.tensor_names.append(name)
                f.tensors.append(part)
                if not first:
                    frames.append(f)
                first = False
        return self.raw(peer_id, [frame(f) for f in frames], **kw)

    def valid_last_stage_forward(self) -> float:
        m = self.spec.model
        x = torch.randn(2, 16, m.hidden_size)
        ids = torch.randint(0, m.vocab_size, (2, 16))
        head, tensors = self.exchange(
            lambda: call_stage(
                self.p2p,
                self.ready1["peer_id"],
                backward=False,
                header=self.header(microbatch_id=f"valid-{time.time_ns()}"),
                names=["inputs", "labels"],
                tensors=[x, ids],
                codec="fp16",
                timeout=60,
            )
        )
        assert tensors["grad_inputs"].shape == x.shape
        return head.loss

    def close(self):
        try:
            self.run(self.p2p.shutdown(), 30)
        finally:
            self.loop.stop()
            self.cluster.close()


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    s = Swarm(tmp_path_factory.mktemp("badreq"))
    try:
        yield s
    finally:
        s.close()
        assert_all_gone(s.cluster.seen)


def microbatches(swarm) -> int:
    event = swarm.s0.last_event("status")
    return event["microbatches"] if event else 0


def rejected(responses, code: str, text: str = "") -> StageResponse:
    assert len(responses) == 1, responses
    r = responses[0]
    assert r.error_code == code, (r.error_code, r.error)
    assert text in r.error, r.error
    assert not r.tensors
    return r


def test_valid_requests_are_served(swarm):
    assert swarm.valid_last_stage_forward() > 0
    info = swarm.run(call_info(swarm.p2p, swarm.ready1["peer_id"], swarm.digest))
    assert info.stage == 1 and not info.error and info.spec_digest == swarm.digest
    # The stage 0 trainer drives micro-batches through the stage 1 server.
    swarm.s0.wait_event("status", 240, lambda e: e["microbatches"] >= 1)


def hidden(shape=(2, 16, 128), dtype=torch.float32, fill=None):
    t = torch.randn(*shape).to(dtype) if fill is None else torch.full(shape, fill, dtype=dtype)
    return encode(t, "none")


def labels(shape=(2, 16), high=257):
    return encode(torch.randint(0, high, shape), "none")


# Each case: (name, build(swarm) -> responses, expected error code, text in the message).
CASES = {
    "wrong shape": (
        lambda s: s.request(s.ready1["peer_id"], s.header(), ["inputs", "labels"], [hidden((2, 16, 64)), labels()]),
        "bad_request",
        "inputs: shape [2, 16, 64] where [*, *, 128] was expected",
    ),
    "labels shape mismatch": (
        lambda s: s.request(s.ready1["peer_id"], s.header(), ["inputs", "labels"], [hidden(), labels((2, 8))]),
        "bad_request",
        "labels shape [2, 8] does not match inputs [2, 16]",
    ),
    "wrong dtype (int hidden states)": (
        lambda s: s.request(
            s.ready1["peer_id"],
            s.header(),
            ["inputs", "labels"],
            [encode(torch.ones(2, 16, 128, dtype=torch.int64)), labels()],
        ),
        "bad_request",
        "inputs: dtype torch.int64 where torch.float32 was expected",
    ),
    "wrong dtype (float labels)": (
        lambda s: s.request(
            s.ready1["peer_id"], s.header(), ["inputs", "labels"], [hidden(), encode(torch.ones(2, 16))]
        ),
        "bad_request",
        "labels: dtype torch.float32 where torch.int64 was expected",
    ),
    "NaN values": (
        lambda s: s.request(
            s.ready1["peer_id"], s.header(), ["inputs", "labels"], [hidden(fill=float("nan")), labels()]
        ),
        "bad_request",
        "inputs: contains NaN or infinite values",
    ),
    "infinite values": (
        lambda s: s.request(
            s.ready1["peer_id"], s.header(), ["inputs", "labels"], [hidden(fill=float("inf")), labels()]
        ),
        "bad_request",
        "contains NaN or infinite values",
    ),
    "declared elements over the limit": (
        lambda s: s.request(
            s.ready1["peer_id"], s.header(), ["inputs", "labels"], [_declared((4096, 4096, 128)), labels()]
        ),
        "bad_request",
        "exceeds the limit",
    ),
    "empty batch": (
        lambda s: s.request(
            s.ready1["peer_id"], s.header(), ["inputs", "labels"], [hidden((0, 16, 128)), labels((0, 16))]
        ),
        "bad_request",
        "inputs",
    ),
    "batch over the limit": (
        lambda s: s.request(
            s.ready1["peer_id"], s.header(), ["inputs", "labels"], [hidden((9, 2, 128)), labels((9, 2))]
        ),
        "bad_request",
        "exceeds batch 8",  # the spec's micro-batch: what an honest trainer sends
    ),
    "sequence over max positions": (
        lambda s: s.request(
            s.ready1["peer_id"], s.header(), ["inputs", "labels"], [hidden((1, 65, 128)), labels((1, 65))]
        ),
        "bad_request",
        "length 64",  # the spec's seq_len
    ),
    "frame over 4 MiB": (
        lambda s: s.raw(s.ready1["peer_id"], [struct.pack(">I", MAX_FRAME_BYTES + 1)], end=False),
        "bad_request",
        "exceeds the 4194304-byte limit",
    ),
    "too many frames": (
        lambda s: s.raw(s.ready1["peer_id"], [frame(s.header())] * (MAX_FRAMES + 1), end=False),
        "bad_request",
        f"or {MAX_FRAMES} frames",
    ),
    "empty request": (lambda s: s.raw(s.ready1["peer_id"], []), "bad_request", "empty request"),
    "wrong spec digest": (
        lambda s: s.request(
            s.ready1["peer_id"], s.header(spec_digest="0" * 64), ["inputs", "labels"], [hidden(), labels()]
        ),
        "wrong_spec",
        "does not match",
    ),
    "wrong stage": (
        lambda s: s.request(s.ready1["peer_id"], s.header(stage=0), ["inputs", "labels"], [hidden(), labels()]),
        "wrong_stage",
        "this peer serves stage 1, not 0",
    ),
    "stage out of range": (
        lambda s: s.request(s.ready1["peer_id"], s.header(stage=99), ["inputs"], [hidden()]),
        "wrong_stage",
        "not 99",
    ),
    "missing microbatch id": (
        lambda s: s.request(
            s.ready1["peer_id"], s.header(microbatch_id=""), ["inputs", "labels"], [hidden(), labels()]
        ),
        "bad_request",
        "microbatch_id",
    ),
    "bad timeout": (
        lambda s: s.request(s.ready1["peer_id"], s.header(timeout=1e9), ["inputs", "labels"], [hidden(), labels()]),
        "bad_request",
        "timeout must be in",
    ),
    "garbage bytes (not a protobuf)": (
        lambda s: s.raw(s.ready1["peer_id"], [frame(b"\x0f" * 32)], end=False),
        "bad_request",
        "not a valid StageRequest",
    ),
    "garbage tensor bytes": (
        lambda s: s.request(s.ready1["peer_id"], s.header(), ["inputs", "labels"], [_garbage_buffer(), labels()]),
        "bad_request",
        "inputs: buffer of 3 bytes where 16384 were expected",  # checked before hivemind deserializes it
    ),
    "truncated tensor (missing chunks)": (lambda s: _truncated(s), "bad_request", "truncated"),
    "unknown tensor name": (
        lambda s: s.request(
            s.ready1["peer_id"], s.header(), ["inputs", "labels", "extra"], [hidden(), labels(), hidden()]
        ),
        "bad_request",
        "expected tensors",
    ),
    "tensor sent twice": (
        lambda s: s.request(
            s.ready1["peer_id"], s.header(), ["inputs", "inputs", "labels"], [hidden(), hidden(), labels()]
        ),
        "bad_request",
        "sent twice",
    ),
    "label ids out of range": (
        lambda s: s.request(
            s.ready1["peer_id"], s.header(), ["inputs", "labels"], [hidden(), encode(torch.full((2, 16), 300))]
        ),
        "bad_request",
        "labels: token ids must be in [0, 257)",
    ),
    "negative token ids (stage 0)": (
        lambda s: s.request(s.ready0["peer_id"], s.header(stage=0), ["inputs"], [encode(torch.full((2, 16), -1))]),
        "bad_request",
        "inputs: token ids must be in [0, 257)",
    ),
    "token ids out of range (stage 0)": (
        lambda s: s.request(s.ready0["peer_id"], s.header(stage=0), ["inputs"], [encode(torch.full((2, 16), 257))]),
        "bad_request",
        "inputs: token ids must be in [0, 257)",
    ),
    "backward to the last stage": (
        lambda s: s.request(s.ready1["peer_id"], s.header(), ["grad_outputs"], [hidden()], handler=BACKWARD),
        "bad_request",
        "the last stage runs its backward with the forward",
    ),
    "backward without a forward": (
        lambda s: s.request(s.ready0["peer_id"], s.header(stage=0), ["grad_outputs"], [hidden()], handler=BACKWARD),
        "cache_miss",
        "re-send the inputs",
    ),
    "backward with mismatched grad shape": (
        lambda s: s.request(
            s.ready0["peer_id"],
            s.header(stage=0),
            ["grad_outputs", "inputs"],
            [hidden((2, 8, 128)), labels()],
            handler=BACKWARD,
        ),
        "bad_request",
        "does not match inputs",
    ),
}


def _declared(shape):
    """A tensor that declares ``shape`` but carries a few bytes: rejected before any decoding."""
    proto = encode(torch.zeros(4))
    del proto.size[:]
    proto.size.extend(shape)
    return proto


def _garbage_buffer():
    proto = encode(torch.zeros(2, 16, 128))
    proto.buffer = b"\x01\x02\x03"  # far fewer bytes than the declared shape needs
    return proto


def _truncated(s):
    """A tensor split into 3 chunks of which only the first is sent."""
    proto = encode(torch.randn(8, 256, 128))  # 1 MiB, in 256 KiB parts
    parts = list(split_for_streaming(proto, 256 * 1024))
    assert len(parts) > 2
    header = s.header()
    header.tensor_names.append("inputs")
    header.tensors.append(parts[0])
    return s.raw(s.ready1["peer_id"], [frame(header)])


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_gets_an_error_and_the_server_keeps_serving(swarm, case):
    build, code, text = CASES[case]
    rejected(build(swarm), code, text)
    assert swarm.s1.alive() and swarm.s0.alive()
    assert swarm.valid_last_stage_forward() > 0


def test_hung_up_and_stalled_callers_change_nothing(swarm):
    """A caller that sends half a frame and hangs up gets nothing (there is nobody to answer);
    the server carries on."""

    async def half_frame():
        _, reader, writer = await swarm.p2p.call_binary_stream_handler(
            PeerID.from_base58(swarm.ready1["peer_id"]), FORWARD
        )
        writer.write(struct.pack(">I", 1000) + b"\x00" * 10)
        await writer.drain()
        writer.close()

    swarm.run(half_frame())
    assert swarm.valid_last_stage_forward() > 0


def test_info_handler_rejects_a_wrong_digest_and_garbage(swarm):
    assert "does not match" in swarm.run(call_info(swarm.p2p, swarm.ready1["peer_id"], "f" * 64)).error

    async def garbage_info():
        _, reader, writer = await swarm.p2p.call_binary_stream_handler(
            PeerID.from_base58(swarm.ready1["peer_id"]), INFO
        )
        try:
            writer.write(frame(b"\x0f" * 8))
            await writer.drain()
            from protocol.messages_pb2 import InfoResponse

            return await asyncio.wait_for(read_frame(reader, InfoResponse), 60)
        finally:
            writer.close()

    response = swarm.run(garbage_info())
    assert response is not None and "malformed request" in response.error
    assert not swarm.run(call_info(swarm.p2p, swarm.ready1["peer_id"], swarm.digest)).error


def test_remote_errors_reach_the_client_as_codes(swarm):
    with pytest.raises(RemoteError) as err:
        swarm.run(
            call_stage(
                swarm.p2p,
                swarm.ready1["peer_id"],
                backward=False,
                header=swarm.header(stage=0),
                names=["inputs", "labels"],
                tensors=[torch.randn(2, 16, 128), torch.zeros(2, 16).long()],
                codec="fp16",
                timeout=60,
            )
        )
    assert err.value.code == "wrong_stage"


def test_training_went_on_through_the_attacks(swarm):
    """Runs last: the stage 0 trainer's micro-batches (each through the attacked stage 1
    server) kept increasing, and nothing was rejected by the servers for the trainer."""
    before = microbatches(swarm)
    swarm.s0.wait_event("status", 300, lambda e: e["microbatches"] >= before + 2)
    assert swarm.s1.alive() and swarm.s0.alive(), dump_logs(swarm.cluster)
    failures = [line for line in swarm.s0.lines if "micro-batch failed" in line]
    assert not failures, failures[:5]
