"""The node's parts with fakes for the network: presence, the mover's order of steps, shutdown.

The multi-peer tests (test_swarm, test_churn, test_parity) run the same code for real; these
pin down what a reader of the peer's status can observe, which those cannot do reliably."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from peer.base.config import ChurnConfig, PeerConfig
from peer.base.distrust import DistrustTally
from peer.model.llama import LlamaStage
from peer.node import Peer
from peer.node.holder import StageHolder
from peer.node.mover import Mover
from peer.node.presence import PeerStatus, Presence, TrainingFigures
from peer.node.slot import SlotContext
from peer.pipeline import StageWorker
from protocol.records import PeerInfo, PeerState
from protocol.spec import preset_spec


class FakeSwarm:
    """The swarm view a peer writes its record to; remembers every record with the stage that
    was open on the peer at that moment."""

    def __init__(self, peer_id="QmMe", open_stage=lambda: None):
        self.peer_id, self.open_stage = peer_id, open_stage
        self.announced: list[tuple[int, str, object]] = []
        self.peers: list[PeerInfo] = []

    def announce(self, info: PeerInfo, ttl: float) -> bool:
        self.announced.append((info.stage, str(info.state), self.open_stage()))
        return True

    def snapshot(self) -> list[PeerInfo]:
        return list(self.peers)

    def announce_checkpoint(self, stage, record, ttl):
        return True

    def checkpoint_announcements(self, stage=None):
        return []


class Events:
    def __init__(self):
        self.names: list[str] = []

    def event(self, name, text, **fields):
        self.names.append(name)


def fake_slot(stage: int):
    return SimpleNamespace(
        stage=stage, restored_step=None, epoch=7, capacity=50.0, worker=None, optimizer=None, closed=False
    )


class FakeHolder:
    """The stage holder with fake slots: opening a stage records it (or fails for ``fail_on``)."""

    def __init__(self):
        self.slot, self.open_stage = None, None
        self.fail_on: set[int] = set()
        self.opened: list[int] = []
        self.closed: list[tuple[object, bool]] = []

    def open(self, stage):
        if stage in self.fail_on:
            raise RuntimeError(f"stage {stage} cannot be opened")
        self.slot, self.open_stage = fake_slot(stage), stage
        self.opened.append(stage)
        return self.slot

    def close(self, *, for_move):
        self.closed.append((self.open_stage, for_move))
        self.open_stage = None

    def hand_back(self, *, give_up):
        pass

    def resume_if_group_gone(self):
        return None

    def checkpoints_announced(self, stage):
        return False


@pytest.fixture
def peer():
    """A Peer whose stage holder opens fake slots; its presence, mover and shutdown are its own."""
    p = Peer(PeerConfig(churn=ChurnConfig(rebalance_period=0.0)))
    p.out = Events()
    spec = preset_spec("tiny", stages=3)
    p.node = SimpleNamespace(spec=spec, peer_id="QmMe")
    holder = p.holder = FakeHolder()
    swarm = FakeSwarm(open_stage=lambda: holder.open_stage)
    p.mover = Mover(
        spec,
        holder,
        p.presence,
        swarm,
        p2p=None,
        run=None,
        distrust=DistrustTally(p.out.event),
        event=p.out.event,
        stopping=p.signals.stop,
        give_up=lambda: False,
        period=0.0,
        cooldown=120.0,
    )
    p.presence.peer_id, p.presence.swarm = swarm.peer_id, swarm
    holder.open(0)
    p.presence.update(stage=0, state=PeerState.ONLINE)
    p.swarm = swarm
    return p


def observe(peer) -> list[tuple[int, str, object]]:
    """Every status a reader of the peer (announcer, info RPC, metrics) could see, with the
    stage that was open at that moment."""
    seen: list[tuple[int, str, object]] = []
    peer.presence.on_update = lambda status: seen.append((status.stage, str(status.state), peer.holder.open_stage))
    return seen


def test_a_move_never_shows_online_at_a_stage_that_is_not_open(peer):
    seen = observe(peer)
    assert peer.mover.move_to(2, recovery=False)
    # Under the old code the stage and the state were two stores: a reader could see stage 2
    # with the old 'online' while stage 0 was still open.
    for stage, state, open_stage in seen + peer.swarm.announced:
        if state == "online":
            assert stage == open_stage, (stage, state, open_stage, seen)
    assert seen[0] == (2, "joining", 0)  # one update: the target and 'joining' together
    assert seen[-1] == (2, "online", 2)
    assert peer.holder.closed == [(0, True)] and peer.holder.opened == [0, 2]
    assert "moved" in peer.out.names


def test_announcer_racing_a_move_never_announces_online_at_an_unopened_stage(peer):
    """The same with the real announcer thread calling announce() as fast as it can."""
    stop = threading.Event()

    def spam():
        while not stop.is_set():
            peer.presence.announce()

    threads = [threading.Thread(target=spam) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for target in (1, 2, 0, 1):
            peer.mover.move_to(target, recovery=False)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert len(peer.swarm.announced) > 10
    for stage, state, open_stage in peer.swarm.announced:
        if state == "online":
            assert stage == open_stage


def test_a_failed_open_goes_back_and_is_never_online_at_the_target(peer):
    peer.holder.fail_on = {2}
    seen = observe(peer)
    assert not peer.mover.move_to(2, recovery=False)
    assert peer.status == PeerStatus(stage=0, state=PeerState.ONLINE, throughput=1.0)
    assert ("move_failed" in peer.out.names) and "moved" not in peer.out.names
    assert not [s for s in seen if s[0] == 2 and s[1] == "online"]
    assert peer.holder.opened == [0, 0]  # the failed open of 2 raised before it was recorded


def test_presence_updates_are_whole_snapshots():
    presence = Presence("QmMe", "0.1.0", 0.0, period=1.0)
    stop = threading.Event()
    torn = []

    def reader():
        while not stop.is_set():
            s = presence.status
            if (s.stage, s.state) not in {(0, PeerState.ONLINE), (1, PeerState.JOINING)}:
                torn.append(s)

    presence.update(stage=0, state=PeerState.ONLINE)
    t = threading.Thread(target=reader)
    t.start()
    for _ in range(20_000):
        presence.update(stage=1, state=PeerState.JOINING)
        presence.update(stage=0, state=PeerState.ONLINE)
    stop.set()
    t.join()
    assert not torn


def test_the_record_carries_the_status_and_the_live_figures():
    presence = Presence(
        "QmMe", "0.1.0", 12.0, period=1.0, figures=lambda: TrainingFigures(epoch=4, loss=2.5, tokens=100, has_data=True)
    )
    presence.update(stage=1, state=PeerState.ONLINE, throughput=30.0)
    record = presence.record()
    assert (record.stage, record.state, record.throughput, record.epoch, record.loss, record.tokens) == (
        1,
        PeerState.ONLINE,
        30.0,
        4,
        2.5,
        100,
    )
    assert PeerInfo.from_record("QmMe", record.to_record()).state == PeerState.ONLINE


def test_a_failing_announce_is_logged_not_raised():
    class Broken(FakeSwarm):
        def announce(self, info, ttl):
            raise ValueError("schema says no")

    presence = Presence("QmMe", "0.1.0", 0.0, period=1.0)
    presence.swarm = Broken()
    presence.update(stage=0)
    assert presence.announce() is False


def test_served_info_follows_the_status():
    presence = Presence("QmMe", "0.1.0", 0.0, period=1.0)
    context = SlotContext(None, None, None, None, None, None, checkpoints=None, records=list)
    holder = StageHolder(context, ckpt=None, presence=presence)
    holder.slot = fake_slot(0)
    presence.update(state=PeerState.JOINING, throughput=12.5)
    info = holder.served_info()
    assert (info.state, info.throughput, info.epoch) == (PeerState.JOINING, 12.5, 7)
    assert holder.ctx.info == holder.served_info  # what the stage's info RPC answers


def test_shutdown_announces_leaving_and_saves_tied_weights_once(peer, tmp_path):
    spec = preset_spec("tiny", stages=1, model={"tie_word_embeddings": True})
    module = LlamaStage.from_spec(spec, 0)
    assert (
        module.state_dict()["lm_head.weight"].data_ptr() == module.state_dict()["model.embed_tokens.weight"].data_ptr()
    )
    out = tmp_path / "final" / "stage.safetensors"
    peer.config = PeerConfig(final_state=str(out))
    worker = StageWorker(module, is_last=True)
    peer.holder.slot = SimpleNamespace(stage=0, epoch=3, worker=worker, optimizer=None)
    try:
        peer._shutdown()
    finally:
        worker.shutdown()
    assert peer.swarm.announced[-1][:2] == (0, "leaving")
    assert peer.holder.closed[-1] == (0, False)  # a shutdown waits for the group's pending update
    with safe_open(str(out), "pt") as f:
        names = set(f.keys())
        assert f.metadata()["epoch"] == "3"
        embed = f.get_tensor("model.embed_tokens.weight")
    assert names == set(module.state_dict()) - {"lm_head.weight"}  # the tied head once, under the embedding
    assert torch.equal(embed, module.model.embed_tokens.weight.detach())
