"""Teacher peers in real swarms: every peer, teacher and bootstrap its own process, speaking the
real wire. The teachers are models this module trains (or builds) and exports with
``swarmtrain checkpoint export``.

- the last stage of a 2-stage swarm receives a teacher's soft targets, and the loss it answers
  equals the test's own computation of the combined loss on the same batch; a trainer peer's
  micro-batches reach the last stage with soft targets;
- a student trained on the distillation term alone, from a teacher that always puts its mass on
  one token, learns to predict that token;
- of three teachers of the same weights, the one that returns wrong targets is caught by the
  trainer's spot checks and banned, and the ban shows in the DHT (``status``);
- one trainer uses a teacher and a stage peer that both serve through the bootstrap's relay:
  reading the teacher records never drops the stage peer's route, nor the reverse.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from peer.base import LoopThread
from peer.checkpoints.state_pull import pull_stage_state
from peer.data import PackedDataset, load_tokenizer
from peer.model.llama import LlamaStage, chain_forward
from peer.pipeline.client import call_stage
from peer.swarm.dht import SwarmDHT, start_dht
from peer.swarm.identity import cleanup_identity, load_or_create_identity
from peer.teach.client import TeacherClient
from peer.teach.model import TeacherModel
from protocol import records
from protocol.messages_pb2 import StageRequest
from protocol.spec import preset_spec

from conftest import dump_logs, write_text_data
from outer_helpers import metric
from teach_helpers import one_token_teacher, trained_teacher

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

LIAR = Path(__file__).resolve().parents[1] / "helpers" / "teach_liar.py"


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, text_data):
    work = tmp_path_factory.mktemp("teachers")
    return {"trained": trained_teacher(work, text_data, steps=60), "one_token": one_token_teacher(work, ord("a"))}


def write_spec(tmp_path, training=None, **distill):
    training = {"target_batch_size": 32, **(training or {})}
    spec = preset_spec("tiny", run_id="teachswarm", training=training, distill=distill)
    path = tmp_path / "spec.toml"
    spec.save(path)
    return spec, path


def start_teacher(cluster, name, hf, spec_path, maddr, *, command=None, extra=()):
    args = ["teach", "--model", str(hf), "--spec", str(spec_path), "--initial-peers", maddr]
    args += ["--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--threads", "1", "--announce-period", "2", "--log-json"]
    args += list(extra)
    proc = cluster.start(name, args, command=command)
    return proc, proc.wait_event("ready", 120)["peer_id"]


class Observer:
    """The test's own DHT node and P2P daemon, to speak to the swarm as a trainer would."""

    def __init__(self, maddr, spec):
        self.ident = load_or_create_identity(None)
        self.loop = LoopThread()
        self.dht = start_dht(
            self.ident, initial_peers=[maddr], validators=records.run_validators(spec.run_id, spec.digest())
        )
        self.swarm = SwarmDHT(self.dht, spec, self.ident)
        self.p2p = self.loop.run(self.dht.replicate_p2p(), timeout=30)

    def wait_for_teachers(self, n, timeout=60.0):
        deadline = time.monotonic() + timeout
        while len(found := self.swarm.teachers()) < n:
            assert time.monotonic() < deadline, f"{len(found)} teacher records after {timeout:.0f}s"
            time.sleep(0.5)
        return found

    def close(self):
        self.loop.run(self.p2p.shutdown(), timeout=15)
        self.dht.shutdown()
        self.loop.stop()
        cleanup_identity(self.ident)


def reference_loss(logits, labels, soft, weight, temperature):
    """The combined loss written out here, independently of peer.model.distill."""
    vocab = logits.shape[-1]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1))
    top, teacher_lp = soft.ids[:, :-1], soft.logprobs[:, :-1].double()
    student_lp = torch.log_softmax(logits[:, :-1].double() / temperature, dim=-1)
    p, q = teacher_lp.exp(), student_lp.gather(-1, top).exp()
    p_rest, q_rest = 1 - p.sum(-1), 1 - q.sum(-1)
    kl = (p * (teacher_lp - q.log())).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
    return float((1 - weight) * ce.double() + weight * temperature**2 * kl.mean()), float(ce)


def test_the_last_stage_adds_the_teachers_term_to_its_loss(cluster, tmp_path, teachers, text_data):
    weight, temperature = 0.5, 2.0
    spec, spec_path = write_spec(tmp_path, weight=weight, temperature=temperature, k=8, spot_check=0.0)
    _, maddr = cluster.bootstrap(spec_path=spec_path)
    start_teacher(cluster, "teacher", teachers["trained"], spec_path, maddr)
    last = cluster.peer("s1", [maddr], spec_path=spec_path, stage=1, extra=["--metrics-port", "0"])
    last_id = last.wait_event("ready", 120)["peer_id"]
    observer = Observer(maddr, spec)
    try:
        observer.wait_for_teachers(1)
        client = TeacherClient(spec, observer.p2p, teachers=observer.swarm.teachers, timeout=30.0)
        ids = next(PackedDataset(text_data, load_tokenizer(spec.tokenizer), seq_len=64, batch_size=8, seed=5))
        soft = observer.loop.run(client(ids), timeout=60)
        assert soft is not None, dump_logs(cluster)
        local = TeacherModel.load(teachers["trained"], spec).soft_targets(ids)
        assert torch.equal(soft.ids, local[0])  # what the teacher process computed, over the wire

        _, state = observer.loop.run(pull_stage_state(observer.p2p, last_id, spec, 1), timeout=90)
        stage = LlamaStage.from_spec(spec, 1, init=False)
        stage.load_parameters(state)
        hidden = torch.randn(8, 64, spec.model.hidden_size, generator=torch.Generator().manual_seed(7))
        header = StageRequest(spec_digest=spec.digest(), stage=1, microbatch_id="reference-1")
        head, _ = observer.loop.run(
            call_stage(
                observer.p2p,
                last_id,
                backward=False,
                header=header,
                names=["inputs", "labels"],
                tensors=[hidden, ids],
                codec="none",  # the hidden states arrive bit for bit
                timeout=60.0,
                soft_targets=soft.data,
            ),
            timeout=90,
        )
        with torch.no_grad():
            want, want_ce = reference_loss(stage(hidden), ids, soft, weight, temperature)
        assert head.loss == pytest.approx(want, rel=1e-4), (head.loss, want)
        assert head.label_loss == pytest.approx(want_ce, rel=1e-4)
        assert abs(head.loss - head.label_loss) > 1e-3  # the teacher's term is in it
    finally:
        observer.close()

    # a trainer peer's micro-batches reach the last stage with soft targets
    first = cluster.peer("s0", [maddr], spec_path=spec_path, stage=0, data=str(text_data), extra=["--max-steps", "12"])
    status = first.wait_event("status", 180, lambda e: e.get("distilled", 0) >= 4)
    assert status["teachers"] == 1
    import urllib.request

    port = last.wait_event("metrics", 5)["port"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert metric(text, "swarmtrain_stage_distilled_total") >= 4, text[-2000:]


def test_a_student_trained_on_the_teachers_term_alone_learns_its_answer(cluster, tmp_path, teachers, text_data):
    spec, spec_path = write_spec(tmp_path, weight=1.0, temperature=1.0, k=4, spot_check=0.0)
    _, maddr = cluster.bootstrap(spec_path=spec_path)
    start_teacher(cluster, "teacher", teachers["one_token"], spec_path, maddr)
    final = tmp_path / "final"
    last = cluster.peer("s1", [maddr], spec_path=spec_path, stage=1, extra=["--final-state", str(final / "s1.st")])
    last.wait_event("ready", 120)
    first = cluster.peer(
        "s0",
        [maddr],
        spec_path=spec_path,
        stage=0,
        data=str(text_data),
        extra=["--max-steps", "100", "--final-state", str(final / "s0.st")],
    )
    first.wait_event("stopped", 480)
    cluster.stop(last)
    stages = []
    for k, name in enumerate(("s0.st", "s1.st")):
        module = LlamaStage.from_spec(spec, k, init=False)
        module.load_parameters(load_file(final / name))
        stages.append(module)
    heldout = write_text_data(tmp_path / "heldout", files=1, lines=50, seed=9)
    ids = next(PackedDataset(heldout, load_tokenizer(spec.tokenizer), seq_len=64, batch_size=8, seed=1))
    with torch.no_grad():
        predicted = chain_forward(stages, ids).argmax(-1)
        untrained = chain_forward([LlamaStage.from_spec(spec, k) for k in range(2)], ids).argmax(-1)
    share = float((predicted == ord("a")).float().mean())
    assert share > 0.9, (share, dump_logs(cluster))
    assert float((untrained == ord("a")).float().mean()) < 0.2


def test_the_spot_check_bans_the_teacher_that_returns_wrong_targets(cluster, tmp_path, teachers, text_data):
    spec, spec_path = write_spec(tmp_path, weight=0.5, temperature=1.0, k=8, spot_check=1.0)
    _, maddr = cluster.bootstrap(spec_path=spec_path)
    honest = [start_teacher(cluster, f"teacher{i}", teachers["trained"], spec_path, maddr)[1] for i in range(2)]
    _, liar = start_teacher(cluster, "liar", teachers["trained"], spec_path, maddr, command=[sys.executable, str(LIAR)])
    observer = Observer(maddr, spec)
    try:
        observer.wait_for_teachers(3)
        cluster.peer("s1", [maddr], spec_path=spec_path, stage=1).wait_event("ready", 120)
        trainer = cluster.peer("s0", [maddr], spec_path=spec_path, stage=0, data=str(text_data))
        banned = trainer.wait_event("teacher_banned", 300)
        assert banned["peer_id"] == liar, dump_logs(cluster)
        deadline = time.monotonic() + 60
        while not any(liar in b["banned"] for b in observer.swarm.teacher_bans().values()):
            assert time.monotonic() < deadline, "the ban never reached the DHT"
            time.sleep(1.0)
        from peer.observe.status import swarm_snapshot

        rows = {t["peer_id"]: t for t in swarm_snapshot(observer.swarm)["teachers"]}
        assert rows[liar]["banned_by"] == 1 and all(rows[h]["banned_by"] == 0 for h in honest)
        trainer.wait_event("status", 60, lambda e: e.get("distilled", 0) >= 3)
        assert not [e for e in trainer.events if e.get("event") == "teacher_banned" and e["peer_id"] in honest]
    finally:
        observer.close()


def undialable() -> list[str]:
    """Options that make a node on loopback one that others cannot dial: it announces a port
    nothing listens on, so the relay's dial-back fails and it serves through the relay, as a
    node behind a home router does."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return ["--announce-maddrs", f"/ip4/127.0.0.1/tcp/{port}"]


def test_one_trainer_uses_a_relayed_teacher_and_a_relayed_stage_peer(cluster, tmp_path, teachers, text_data):
    # Outer rounds: a stage peer that others cannot dial cannot average per_step (hivemind's
    # averager in client mode fails every step).
    outer = dict(averaging="outer", outer=dict(round_seconds=20.0, gather_seconds=6.0, agree_seconds=4.0))
    spec, spec_path = write_spec(tmp_path, outer, weight=0.5, temperature=1.0, k=8, spot_check=0.0)
    boot, maddr = cluster.bootstrap(spec_path=spec_path)
    boot_id = maddr.rsplit("/", 1)[-1]
    teacher, _ = start_teacher(cluster, "teacher", teachers["trained"], spec_path, maddr, extra=undialable())
    assert teacher.wait_event("relayed", 5)["via"] == boot_id
    last = cluster.peer("s1", [maddr], spec_path=spec_path, stage=1, extra=undialable())
    assert last.wait_event("relayed", 120)["via"] == boot_id
    last.wait_event("ready", 120)
    # The trainer in client mode: nobody's DHT queries open a connection to it, so the only way to
    # the relayed peers is through the relay (on loopback a connection they opened would let the
    # trainer's streams reach them directly, routes or not).
    first = cluster.peer(
        "s0", [maddr], spec_path=spec_path, stage=0, data=str(text_data), extra=["--max-steps", "40", "--client-mode"]
    )
    # The trainer reads the teacher records every 2 s and the peer records every second: over the
    # run each read happens many times, and every micro-batch needs both relayed peers.
    done = first.wait_event("stopped", 400)
    assert done is not None, dump_logs(cluster)
    status = first.last_event("status")
    logs = dump_logs(cluster, 80)
    # With one process-wide table of relays, each read of the teacher records dropped the stage
    # peer's route (and each read of the peer records the teacher's): most calls then went to
    # addresses nobody can dial, and failed.
    assert status["microbatches"] >= 30, logs
    assert status["distilled"] >= 0.8 * status["microbatches"], logs
    assert status["retries"] <= 2, logs  # a stream a loaded machine resets now and then, at most
    assert not [e for e in first.events if e.get("event") == "teacher_banned"], logs
