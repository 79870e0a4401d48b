"""The ``swarmtrain.teach`` RPC between real hivemind DHTs and P2P daemons, in one process:
teachers announce themselves in the DHT, a trainer's ``TeacherClient`` finds them there, gets
the soft targets a local computation gives, batches them, and its spot checks ban a teacher
that lies (outvoted by two of the same weights) or set two aside until a third decides. The
multi-process version, with real peer processes and the last stage's loss, is
tests/integration/test_teach_swarm.py."""

from __future__ import annotations

import asyncio

import pytest
import torch

from peer.base import LoopThread
from peer.model.hf_io import export_hf_dir
from peer.model.llama import LlamaStage
from peer.net import RemoteError, call, split_message
from peer.swarm.dht import SwarmDHT, start_dht, visible_maddrs
from peer.swarm.identity import cleanup_identity, load_or_create_identity
from peer.teach.client import TeacherClient
from peer.teach.model import TeacherModel
from peer.teach.server import TeacherServer
from protocol import PROTOCOL_VERSION
from protocol.codecs import encode
from protocol.messages_pb2 import TeachRequest, TeachResponse
from protocol.records import TeacherInfo
from protocol.rpc import TEACH
from protocol.spec import preset_spec

from teach_liar import LyingTeacher

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def spec():
    return preset_spec("tiny", run_id="teachnet", distill=dict(spot_check=1.0))


@pytest.fixture(scope="module")
def hf_dir(spec, tmp_path_factory):
    torch.manual_seed(0)
    stages = [LlamaStage.from_spec(spec, k) for k in range(spec.num_stages)]
    with torch.no_grad():  # sharper than the initial weights, so that answers differ clearly
        for s in stages:
            for p in s.parameters():
                p.mul_(4.0)
    out = tmp_path_factory.mktemp("teachnet") / "hf"
    export_hf_dir(spec, [s.state_dict() for s in stages], out)
    return out


class Net:
    """DHT nodes and P2P daemons of this process, all shut down at the end."""

    def __init__(self, spec):
        self.spec, self.loop = spec, LoopThread()
        self.dhts, self.idents, self.servers, self.p2ps = [], [], [], []

    def node(self):
        ident = load_or_create_identity(None)
        self.idents.append(ident)
        dht = start_dht(ident, initial_peers=visible_maddrs(self.dhts[0]) if self.dhts else ())
        self.dhts.append(dht)
        swarm = SwarmDHT(dht, self.spec, ident)
        self.p2ps.append(self.loop.run(dht.replicate_p2p(), timeout=30))
        return swarm, self.p2ps[-1]

    def teacher(self, model: TeacherModel) -> tuple[str, TeacherServer]:
        swarm, p2p = self.node()
        server = TeacherServer(self.spec, model)
        self.loop.run(server.start(p2p), timeout=30)
        self.servers.append(server)
        info = TeacherInfo(swarm.peer_id, model.digest, "online", 50.0, PROTOCOL_VERSION)
        assert swarm.announce_teacher(info, ttl=300)
        return swarm.peer_id, server

    def close(self):
        for server in self.servers:
            self.loop.run(server.stop(), timeout=15)
        for p2p in self.p2ps:
            self.loop.run(p2p.shutdown(), timeout=15)
        for dht in self.dhts:
            dht.shutdown()
        for ident in self.idents:
            cleanup_identity(ident)
        self.loop.stop()


@pytest.fixture
def net(spec):
    n = Net(spec)
    try:
        yield n
    finally:
        n.close()


def trainer(net, spec, teachers_filter=lambda t: True):
    swarm, p2p = net.node()
    events = []
    client = TeacherClient(
        spec,
        p2p,
        teachers=lambda: [t for t in swarm.teachers() if teachers_filter(t)],
        event=lambda name, text, **f: events.append((name, f)),
        timeout=20.0,
    )
    return client, p2p, events


def batch(seed: int) -> torch.Tensor:
    return torch.randint(0, 257, (8, 64), generator=torch.Generator().manual_seed(seed))


def test_a_trainer_gets_the_teachers_soft_targets_and_bad_requests_are_refused(net, spec, hf_dir):
    model = TeacherModel.load(hf_dir, spec)
    peer_id, server = net.teacher(model)
    client, p2p, _ = trainer(net, spec)  # one teacher: nobody to spot-check it against
    ids = batch(0)
    got = net.loop.run(client(ids), timeout=60)
    want_ids, want_lp = model.soft_targets(ids)
    assert torch.equal(got.ids, want_ids)
    torch.testing.assert_close(got.logprobs, want_lp, atol=5e-3, rtol=2e-3)
    assert client.stats.bytes == len(got.data) and client.stats.bytes / ids.numel() == 25.0

    # several trainers' requests waiting at once run as fewer forwards
    async def many():
        return await asyncio.gather(*(client(batch(i)) for i in range(6)))

    before = server.stats.batches
    assert all(r is not None for r in net.loop.run(many(), timeout=120))
    assert server.stats.batches - before < 6

    def ask(**fields):
        header = TeachRequest(spec_digest=spec.digest(), model_digest=model.digest, timeout=10.0)
        for k, v in fields.items():
            setattr(header, k, v)
        tensor = fields.pop("_tensor", None)
        frames = split_message(header, ["inputs"], [encode(tensor if tensor is not None else ids)])
        return net.loop.run(call(p2p, peer_id, TEACH, frames, TeachResponse, timeout=20, max_bytes=1 << 20), timeout=30)

    with pytest.raises(RemoteError, match="wrong_spec"):
        ask(spec_digest="f" * 64)
    with pytest.raises(RemoteError, match="bad_request.*holds weights"):
        ask(model_digest="0" * 64)
    with pytest.raises(RemoteError, match="bad_request.*timeout"):
        ask(timeout=0.0)
    for bad in (torch.full((8, 64), 300), torch.zeros(9, 64, dtype=torch.int64), torch.zeros(8, 65, dtype=torch.int64)):
        header = TeachRequest(spec_digest=spec.digest(), model_digest=model.digest, timeout=10.0)
        frames = split_message(header, ["inputs"], [encode(bad)])
        with pytest.raises(RemoteError, match="bad_request"):
            net.loop.run(call(p2p, peer_id, TEACH, frames, TeachResponse, timeout=20, max_bytes=1 << 20), timeout=30)
    assert server.counters.rejected.get(TEACH, 0) >= 6
    assert net.loop.run(client(ids), timeout=60) is not None  # still serving


def test_spot_checks_ban_a_teacher_two_others_outvote(net, spec, hf_dir):
    liar, _ = net.teacher(LyingTeacher.load(hf_dir, spec))
    honest = [net.teacher(TeacherModel.load(hf_dir, spec))[0] for _ in range(2)]
    client, _, events = trainer(net, spec)
    reference = TeacherModel.load(hf_dir, spec)
    for i in range(12):
        ids = batch(i)
        got = net.loop.run(client(ids), timeout=60)
        assert got is not None and torch.equal(got.ids, reference.soft_targets(ids)[0])
        if liar in client.banned:
            break
    assert liar in client.banned and not set(honest) & set(client.banned)
    assert ("teacher_banned", liar) in [(name, f.get("peer_id")) for name, f in events]
    assert client.stats.spot_checks.get("disagree", 0) >= 1
    assert client.bans_record() == {"banned": [liar], "suspended": []}


def test_two_teachers_that_disagree_are_set_aside_until_a_third_decides(net, spec, hf_dir):
    liar, _ = net.teacher(LyingTeacher.load(hf_dir, spec))
    honest, _ = net.teacher(TeacherModel.load(hf_dir, spec))
    visible = {liar, honest}
    client, _, events = trainer(net, spec, teachers_filter=lambda t: t.peer_id in visible)
    assert net.loop.run(client(batch(0)), timeout=60) is None  # nobody to believe
    assert client.suspended == {liar, honest} and len(client.disputes) == 1
    assert net.loop.run(client(batch(1)), timeout=60) is None  # both set aside: no teacher
    third, _ = net.teacher(TeacherModel.load(hf_dir, spec))
    visible.add(third)
    got = net.loop.run(client(batch(2)), timeout=60)  # the third settles the dispute first
    assert got is not None
    assert liar in client.banned and honest not in client.suspended and not client.disputes
    names = [name for name, _ in events]
    assert names.count("teacher_suspended") == 2 and "teacher_banned" in names and "teacher_restored" in names
