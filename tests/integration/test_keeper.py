"""The keeper: the stage state RPC, keeper rounds against real stage servers (p2pd on 127.0.0.1),
and (slow) the whole story with real processes. Its checks without a network are in
tests/unit/test_keeper_checks.py."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from peer.checkpoints import CheckpointService
from peer.checkpoints.keeper import Keeper, KeeperConfig
from peer.checkpoints.state_pull import StateRejected, pull_stage_state
from peer.checkpoints.store import CheckpointStore
from peer.model.llama import LlamaStage, stage_param_shapes
from peer.net.framing import read_frame, split_message, write_frame
from peer.pipeline.server import ServedInfo, StageServer
from peer.pipeline.worker import StageWorker
from protocol.checkpoint import verify_checkpoint
from protocol.codecs import encode
from protocol.messages_pb2 import StateRequest, StateResponse
from protocol.records import PeerInfo
from protocol.rpc import STATE
from protocol.spec import preset_spec

from checkpoint_helpers import Events, FakeSwarm, flip_byte, peer_id

pytestmark = pytest.mark.timeout(300)


class StagePeer:
    """A real StageServer on its own p2pd, with an epoch the test sets."""

    def __init__(self, host, client, spec, stage):
        self.module = LlamaStage.from_spec(spec, stage)
        self.epoch = 0
        self.worker = StageWorker(self.module, is_last=stage == spec.num_stages - 1)
        self.server = StageServer(
            spec,
            stage,
            self.worker,
            info=lambda: ServedInfo(state="online", throughput=0.0, epoch=self.epoch, version=""),
        )
        self.node = host.new(client)
        host.run(self.server.start(self.node))
        self.peer_id = peer_id(self.node)
        self.stage = stage

    def info(self, epoch=None) -> PeerInfo:
        return PeerInfo(
            peer_id=self.peer_id,
            stage=self.stage,
            state="online",
            throughput=1.0,
            epoch=self.epoch if epoch is None else epoch,
            tokens=1000,
            has_data=True,
        )


@pytest.fixture(scope="module")
def stages(host, client, spec):
    peers = [StagePeer(host, client, spec, k) for k in range(spec.num_stages)]
    yield peers
    for p in peers:
        p.worker.shutdown()


# --- the state RPC -----------------------------------------------------------------------------------


def test_state_rpc_returns_consistent_state(host, client, spec, stages):
    peer = stages[1]
    peer.epoch = 5
    epoch, tensors = host.run(pull_stage_state(client, peer.peer_id, spec, 1))
    assert epoch == 5
    params = dict(peer.module.named_parameters())
    assert set(tensors) == set(params) and all(torch.equal(tensors[k], params[k].detach()) for k in params)
    with pytest.raises(StateRejected, match="wrong_stage: this peer serves stage 1, not 0"):
        host.run(pull_stage_state(client, peer.peer_id, spec, 0))
    other = preset_spec("tiny", stages=2, run_id="other")
    with pytest.raises(StateRejected, match="wrong_spec"):
        host.run(pull_stage_state(client, peer.peer_id, other, 1))


def _evil_server(host, client, spec, frames_for):
    node = host.new(client)

    async def handler(_info, reader, writer):
        while await read_frame(reader, StateRequest) is not None:  # the request, up to its end marker
            pass
        for frame in frames_for():
            await write_frame(writer, frame)
        await write_frame(writer, None)
        writer.close()

    host.run(node.add_binary_stream_handler(STATE, handler))
    return peer_id(node)


def test_state_rpc_rejects_bad_replies(host, client, spec):
    good = {k: p.detach() for k, p in LlamaStage.from_spec(spec, 1).named_parameters()}

    def reply(tensors, **header):
        fields = {"spec_digest": spec.digest(), "stage": 1, "epoch": 3, **header}
        return lambda: split_message(
            StateResponse(**fields), list(tensors), [encode(t, "none") for t in tensors.values()]
        )

    cases = [
        (reply({**good, "model.norm.weight": torch.full((128,), float("inf"))}), "model.norm.weight: contains NaN"),
        (reply({**good, "model.norm.weight": torch.ones(64)}), r"model.norm.weight: shape \[64\]"),
        (reply({k: v for k, v in good.items() if k != "lm_head.weight"}), "missing lm_head.weight"),
        (reply(good, stage=0), "state of stage 0, not 1"),
        (reply({**good, "model.layers.0.evil": torch.zeros(1 << 22)}), "exceeds .* bytes"),
    ]
    for frames_for, message in cases:
        pid = _evil_server(host, client, spec, frames_for)
        with pytest.raises(StateRejected, match=message):
            host.run(pull_stage_state(client, pid, spec, 1, timeout=20))


def test_state_pull_asks_again_when_a_stream_breaks(host, client, spec):
    """A stream that breaks mid-answer (as on a far link) is asked again; one that always breaks
    is rejected with the reason and the attempts; a wrong answer is not asked again."""
    good = {k: p.detach() for k, p in LlamaStage.from_spec(spec, 1).named_parameters()}
    frames = split_message(
        StateResponse(spec_digest=spec.digest(), stage=1, epoch=3),
        list(good),
        [encode(t, "none") for t in good.values()],
    )

    def server(break_first: int):
        node, calls = host.new(client), []

        async def handler(_info, reader, writer):
            while await read_frame(reader, StateRequest) is not None:
                pass
            calls.append(1)
            if len(calls) <= break_first:
                payload = frames[1].SerializeToString()
                writer.write(len(payload).to_bytes(4, "big") + payload[: len(payload) // 2])
                await writer.drain()
            else:
                for frame in frames:
                    await write_frame(writer, frame)
                await write_frame(writer, None)
            writer.close()

        host.run(node.add_binary_stream_handler(STATE, handler))
        return peer_id(node), calls

    pid, calls = server(break_first=1)
    epoch, tensors = host.run(pull_stage_state(client, pid, spec, 1, timeout=30))
    assert epoch == 3 and len(calls) == 2 and all(torch.equal(tensors[k], good[k]) for k in good)

    pid, calls = server(break_first=99)
    with pytest.raises(StateRejected, match=r"unreachable: .*IncompleteReadError.*\(after 3 attempts\)"):
        host.run(pull_stage_state(client, pid, spec, 1, timeout=30))
    assert len(calls) == 3

    pid = _evil_server(host, client, spec, lambda: [StateResponse(spec_digest=spec.digest(), stage=0, epoch=3)])
    with pytest.raises(StateRejected, match="state of stage 0, not 1"):
        host.run(pull_stage_state(client, pid, spec, 1, timeout=30))


# --- keeper rounds ----------------------------------------------------------------------------------


def _keeper(host, client, spec, keys, stages, tmp_path, **kw):
    swarm = FakeSwarm(peer_id=peer_id(client), peers=[p.info() for p in stages])
    events = Events()
    store = CheckpointStore(tmp_path / "ckpts", spec)
    service = CheckpointService(spec, store, swarm=swarm, p2p=client, run=host.run, event=events, announce_period=0.2)
    config = KeeperConfig(signing_key=keys["keeper"][0], checkpoint_dir=tmp_path / "ckpts", every=3600, **kw)
    keeper = Keeper(spec, config, swarm=swarm, p2p=client, run=host.run, service=service, event=events)
    return keeper, swarm, events, service


def test_keeper_round_signs_skips_and_refuses(host, client, spec, keys, stages, tmp_path):
    for p in stages:
        p.epoch = 0
    keeper, swarm, events, service = _keeper(host, client, spec, keys, stages, tmp_path, keep=2)
    assert keeper.run_round() is None  # epoch 0 is the spec's init: nothing to sign
    assert "no stage group has advanced past step 0" in events.named("keeper_skip")[-1][0]

    with torch.no_grad():  # a little training
        for p in stages:
            for param in p.module.parameters():
                param.add_(0.001 * torch.randn_like(param))
    stages[0].epoch, stages[1].epoch = 4, 3
    swarm.peers = [p.info() for p in stages]
    result = keeper.run_round()
    assert result is not None and result.step == 4  # the most advanced stage group's epoch, for all stages
    assert result.sources == {0: stages[0].peer_id, 1: stages[1].peer_id}
    ((_, signed),) = events.named("checkpoint_signed")
    assert signed["step"] == 4 and math.isfinite(signed["loss"]) and signed["tokens_seen"] == 2000
    for k, w in enumerate(result.written):
        v = verify_checkpoint(w.path, spec, expected_stage=k, expected_shapes=stage_param_shapes(spec, k))
        assert v.meta.step == 4 and v.signers == (keeper.fingerprint,)
        params = dict(stages[k].module.named_parameters())
        assert all(torch.equal(v.model_state[n], params[n].detach()) for n in params)
        assert w.manifest_digest in service.server.served()
    service.announcer.stop()
    assert {(s, r["step"]) for s, r in swarm.announced} == {(0, 4), (1, 4)}

    assert keeper.run_round() is None  # nothing new
    assert "past step 4" in events.named("keeper_skip")[-1][0]

    # An exploded stage is refused and nothing is signed.
    saved = {k: v.clone() for k, v in stages[1].module.state_dict().items()}
    with torch.no_grad():
        stages[1].module.lm_head.weight.mul_(300.0)
    stages[0].epoch = stages[1].epoch = 5
    swarm.peers = [p.info() for p in stages]
    assert keeper.run_round() is None
    ((text, refused),) = events.named("keeper_refused")
    assert refused["step"] == 5 and "exploded" in refused["reason"]
    assert [c.meta.step for c in keeper.store.list(1)] == [4]

    # A stage that serves NaN is rejected at the state RPC.
    with torch.no_grad():
        stages[1].module.load_state_dict(saved)
        stages[1].module.model.norm.weight[0] = float("nan")
    assert keeper.run_round() is None
    assert "contains NaN" in events.named("state_rejected")[-1][1]["reason"]
    assert "stage 1: no usable state" in events.named("keeper_skip")[-1][0]

    # Healthy again: signed, and only the newest `keep` per stage remain.
    with torch.no_grad():
        stages[1].module.load_state_dict(saved)
    for step in (6, 7):
        stages[0].epoch = stages[1].epoch = step
        swarm.peers = [p.info() for p in stages]
        assert keeper.run_round().step == step
    assert [c.meta.step for c in keeper.store.list(0)] == [7, 6]
    assert len(service.server.served()) == 4  # pruned ones are no longer served


def test_keeper_inside_a_peer_reads_its_own_stage_locally(host, client, spec, keys, stages, tmp_path):
    for p in stages:
        p.epoch = 3
    keeper, swarm, events, service = _keeper(host, client, spec, keys, stages, tmp_path)
    swarm.peer_id = stages[1].peer_id  # the keeper runs inside stage 1's peer: no RPC to itself
    calls = []

    def local_state(stage):
        calls.append(stage)
        return 9, {k: v.detach().clone() for k, v in stages[1].module.named_parameters()}

    keeper.local_state = local_state
    result = keeper.run_round()
    service.announcer.stop()
    assert calls == [1] and result.step == 9 and result.sources == {0: stages[0].peer_id, 1: stages[1].peer_id}


def test_keeper_resumes_numbering_and_announces_existing(host, client, spec, keys, stages, tmp_path):
    for p in stages:
        p.epoch = 2
    keeper, swarm, events, service = _keeper(host, client, spec, keys, stages, tmp_path)
    result = keeper.run_round()
    # It returned None once in a clean-clone CI run (399 other tests passed; 9 runs here did
    # not repeat it): the keeper's events say which stage it skipped and why.
    assert result is not None and result.step == 2, events.items
    # A restarted keeper serves what it has and continues after it.
    keeper2, swarm2, events2, service2 = _keeper(host, client, spec, keys, stages, tmp_path)
    keeper2._offer_existing()
    assert keeper2.last_step == 2 and keeper2.reference_loss is not None
    assert len(service2.server.served()) == 2
    assert keeper2.run_round() is None
    service.announcer.stop()
    service2.announcer.stop()


def test_refused_live_state_joins_the_group_epoch_with_own_weights():
    """trust.accept_untrusted_live_state = false: a peer behind its group keeps its (trusted)
    parameters and takes the group's epoch instead of staying out of sync forever."""
    import dataclasses

    import hivemind

    from peer.averaging.per_step import make_stage_optimizer

    spec = preset_spec("tiny", stages=2, trust=dict(accept_untrusted_live_state=False))
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        module = LlamaStage.from_spec(spec, 1)
        opt = make_stage_optimizer(spec, 1, module, dht)
        before = {k: v.clone() for k, v in module.state_dict().items()}
        with opt.tracker.pause_updates():
            opt.tracker.global_progress = dataclasses.replace(opt.tracker.global_progress, epoch=5)
            opt.load_state_from_peers()
            assert opt.local_epoch == 5
        assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
        opt.shutdown()
    finally:
        dht.shutdown()


# --- the whole story, real processes (slow) ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_keeper_signs_and_a_new_peer_joins_from_another_peer(tmp_path):
    """bootstrap --keeper + two training peers; the keeper signs; peer C fetches the checkpoint
    from the keeper and announces it; the keeper stops; peer D fetches it from C, verifies it
    and joins; peer E, given a tampered copy in its --checkpoint-dir, refuses it and does not
    load it; `checkpoint list` shows who serves what."""
    import json
    import subprocess

    from peer.data import stdlib_text_path
    from peer.dev.launcher import SWARMTRAIN, Cluster

    key = tmp_path / "keeper.pem"
    out = subprocess.run([*SWARMTRAIN, "keygen", str(key)], capture_output=True, text=True, check=True)
    fingerprint = out.stdout.split("fingerprint ")[1].split()[0]
    spec = preset_spec("tiny", stages=2, run_id="keepertest", trusted_keys=(key.with_suffix(".pub").read_text(),))
    spec_path = tmp_path / "spec.toml"
    spec.save(spec_path)
    keeper_dir = tmp_path / "keeper-ckpts"
    data = ["--data", str(stdlib_text_path()), "--data-suffix", ".py"]

    with Cluster(tmp_path / "run") as cluster:
        boot, boot_addr = cluster.bootstrap(
            spec_path=spec_path,
            timeout=120,
            extra=[
                "--keeper",
                "--signing-key",
                str(key),
                "--checkpoint-dir",
                str(keeper_dir),
                "--every",
                "3",
                "--keep",
                "20",
                "--announce-period",
                "1",
            ],
        )
        boot_id = boot.wait_event("ready", 10)["peer_id"]
        a = cluster.peer("a", [boot_addr], spec_path=spec_path, stage=0, extra=data)
        b = cluster.peer("b", [boot_addr], spec_path=spec_path, stage=1, extra=data)
        a_ready = a.wait_event("ready", 180)
        b.wait_event("ready", 180)
        assert a.wait_event("restore_none", 1)["stage"] == 0  # nothing signed yet
        signed = boot.wait_event("checkpoint_signed", 300, lambda e: e["step"] >= 1)
        assert signed["fingerprint"] == fingerprint and len(signed["manifest_digests"]) == 2

        # C joins stage 0 and fetches the keeper's checkpoint.
        c = cluster.peer(
            "c", [boot_addr], spec_path=spec_path, stage=0, extra=["--checkpoint-dir", str(tmp_path / "c-ckpts")]
        )
        c_restored = c.wait_event("restored", 180)
        c_ready = c.wait_event("ready", 180)
        assert c_restored["source"] == boot_id and c_restored["step"] >= signed["step"]
        c_id = c_ready["peer_id"]

        # `checkpoint list` sees C serving it (besides the keeper).
        listing = subprocess.run(
            [
                *SWARMTRAIN,
                "checkpoint",
                "list",
                "--initial-peers",
                a_ready["maddrs"][0],
                "--spec",
                str(spec_path),
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert listing.returncode == 0, listing.stderr
        rows = json.loads(listing.stdout)["checkpoints"]
        served = [r for r in rows if r["manifest_digest"] == c_restored["manifest_digest"]]
        assert served and c_id in served[0]["served_by"] and served[0]["signers"] == [fingerprint]

        # A tampered copy of a signed checkpoint for E's --checkpoint-dir.
        e_dir = tmp_path / "e-ckpts"
        shutil.copytree(Path(c_restored["path"]), e_dir / "stage-0" / Path(c_restored["path"]).name)
        tampered = e_dir / "stage-0" / Path(c_restored["path"]).name
        flip_byte(tampered / "model.safetensors", 1000)

        cluster.stop(boot)  # the keeper is gone: only C (and its DHT neighbours) remain

        d = cluster.peer("d", [a_ready["maddrs"][0]], spec_path=spec_path, stage=0)
        e = cluster.peer(
            "e", [a_ready["maddrs"][0]], spec_path=spec_path, stage=0, extra=["--checkpoint-dir", str(e_dir)]
        )
        d_restored = d.wait_event("restored", 240)
        assert d_restored["source"] == c_id and d_restored["step"] == c_restored["step"]
        assert d_restored["manifest_digest"] == c_restored["manifest_digest"]
        d.wait_event("ready", 180)

        refused = e.wait_event("checkpoint_refused", 240, lambda ev: ev.get("source") == "local")
        assert refused["path"] == str(tampered)
        assert "model.safetensors: content does not match the signed digest" in refused["reason"]
        e_restored = e.wait_event("restored", 240)
        assert e_restored["path"] != str(tampered) and e_restored["source"] == c_id
        e.wait_event("ready", 180)
        # Training went on meanwhile.
        a.wait_event("status", 60, lambda ev: ev["microbatches"] > 0)


def test_cli_refuses_unusable_keeper_setups(tmp_path, spec, keys):
    import subprocess

    from peer.dev.launcher import SWARMTRAIN

    spec_path = tmp_path / "spec.toml"
    spec.save(spec_path)

    def cli(*args):
        return subprocess.run([*SWARMTRAIN, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)

    r = cli(
        "bootstrap",
        "--keeper",
        "--spec",
        str(spec_path),
        "--signing-key",
        str(keys["mallory"][0]),
        "--checkpoint-dir",
        str(tmp_path / "c"),
        "--host-maddrs",
        "/ip4/127.0.0.1/tcp/0",
        "--identity",
        str(tmp_path / "id"),
    )
    assert r.returncode != 0 and "is not among the spec's trusted keys" in r.stderr
    r = cli("run", "--keeper", "--spec", str(spec_path), "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/x")
    assert r.returncode == 2 and "--keeper needs --signing-key KEY.pem and --checkpoint-dir DIR" in r.stderr
    r = cli("checkpoint", "list", "--spec", str(spec_path))
    assert r.returncode == 2 and "--initial-peers is required" in r.stderr


# --- a member that lies to the keeper (hostile-peer finding 12) ---------------------------------------


def test_keeper_signs_only_what_two_members_agree_on(host, client, spec, keys, stages, tmp_path):
    """Stage 1 gets two more members: an honest copy and a liar whose weights are shifted.
    The liar claims the highest epoch, then an absurd one: the keeper never signs its state."""
    honest, liar = StagePeer(host, client, spec, 1), StagePeer(host, client, spec, 1)
    try:
        with torch.no_grad():
            for p in stages:
                for param in p.module.parameters():
                    param.add_(0.001 * torch.randn_like(param))
            for dst in (honest, liar):
                for mine, theirs in zip(dst.module.parameters(), stages[1].module.parameters()):
                    mine.copy_(theirs)
            for param in liar.module.parameters():
                param.add_(0.5)  # a backdoor, far more than one update
        stages[0].epoch, stages[1].epoch, honest.epoch = 5, 5, 5
        for claim in (6, 2**40):
            liar.epoch = claim
            keeper, swarm, events, service = _keeper(
                host, client, spec, keys, [*stages, honest, liar], tmp_path / str(claim)
            )
            result = keeper.run_round()
            assert result is not None, events.items
            assert result.sources[1] in {stages[1].peer_id, honest.peer_id}
            assert result.step == 5
            if claim == 2**40:
                assert any("beyond its group's" in text for text, _ in events.named("state_rejected"))
        # Two members that disagree: nothing is signed.
        keeper, swarm, events, service = _keeper(
            host, client, spec, keys, [stages[0], stages[1], liar], tmp_path / "two"
        )
        liar.epoch = 5
        swarm.peers = [p.info() for p in (stages[0], stages[1], liar)]
        assert keeper.run_round() is None
        assert "no two of 2 members' states agree" in events.named("keeper_skip")[-1][0]
        # A lower claim puts the honest member's beyond a two-member group's median: the liar is
        # then the only member asked, and one member of two is not enough.
        liar.epoch = 3
        swarm.peers = [p.info() for p in (stages[0], stages[1], liar)]
        assert keeper.run_round() is None
        assert "1 of 2 online members' states to compare" in events.named("keeper_skip")[-1][0]
    finally:
        for p in (honest, liar):
            p.worker.shutdown()


def test_keeper_in_outer_mode_signs_only_a_round_state_two_members_hold_bit_for_bit(host, client, keys, tmp_path):
    """Outer rounds: members that completed a round hold the same bits, so the keeper asks for
    exactly that. A member one millionth off (well inside per_step's tolerance) is not vouched
    for by another; a member claiming a round beyond the group's view is not asked; two
    identical states are signed, at their round."""
    ospec = preset_spec(
        "tiny", stages=2, trusted_keys=(keys["keeper"][1].read_text(),), training=dict(averaging="outer")
    )
    s0, a, b, near = (StagePeer(host, client, ospec, k) for k in (0, 1, 1, 1))
    try:
        with torch.no_grad():
            for p in (s0, a):
                for param in p.module.parameters():
                    param.add_(0.001 * torch.randn_like(param))
            for mine, theirs in zip(b.module.parameters(), a.module.parameters()):
                mine.copy_(theirs)
            for mine, theirs in zip(near.module.parameters(), a.module.parameters()):
                mine.copy_(theirs + 1e-6)
        for p in (s0, a, b, near):
            p.epoch = 3

        keeper, swarm, events, _ = _keeper(host, client, ospec, keys, [s0, a, near], tmp_path / "near")
        assert keeper.run_round() is None  # one member's digest only: nobody else holds those bits
        assert "agree bit for bit (outer rounds)" in events.named("keeper_skip")[-1][0]

        near.epoch = 2**40  # and then beyond the group's progress: not even asked
        keeper, swarm, events, _ = _keeper(host, client, ospec, keys, [s0, a, b, near], tmp_path / "two")
        result = keeper.run_round()
        assert result is not None and result.step == 3, events.items
        assert result.sources[1] in {a.peer_id, b.peer_id}
        assert any("beyond its group's" in text for text, _ in events.named("state_rejected"))
        signed = verify_checkpoint(result.written[1].path, ospec, expected_stage=1)
        assert all(torch.equal(signed.model_state[n], t) for n, t in a.module.state_dict().items())
    finally:
        for p in (s0, a, b, near):
            p.worker.shutdown()
