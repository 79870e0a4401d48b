"""Prometheus metrics of a peer: the collector on a fake peer (counters, observed epochs, bans,
averaging outcomes). Live peers scraped over HTTP: tests/integration/test_metrics_http.py."""

from __future__ import annotations

import time
from types import SimpleNamespace

from prometheus_client import generate_latest

from peer.observe.metrics import AveragingObserver, PeerMetrics
from peer.pipeline.routing import BanList
from protocol.records import PeerInfo

from observe_helpers import parse, value

# --- the collector, no network ----------------------------------------------------------------------


class FakeOptimizer:
    """The parts of hivemind.Optimizer that PeerMetrics reads or wraps."""

    def __init__(self):
        self.local_epoch = 0
        self.last_load_state_error = None
        self.tracker = SimpleNamespace(global_epoch=0, global_progress=SimpleNamespace(num_peers=1))
        self.grad_averager = SimpleNamespace(local_samples_accumulated=0)

    def _begin_averaging_gradients(self, grad_scaler):
        return self.tracker.global_progress.num_peers > 1

    def _average_gradients_and_load_into_optimizer(self, control):
        if control == "fail":
            self._load_local_gradients_into_optimizer()

    def _load_local_gradients_into_optimizer(self):
        pass

    def round(self, control="ok"):
        """What hivemind does per epoch: begin, then (if begun) average."""
        if self._begin_averaging_gradients(None):
            self._average_gradients_and_load_into_optimizer(control)


def fake_peer():
    trainer = SimpleNamespace(
        stats=SimpleNamespace(tokens=0, samples=0, microbatches=0, retries=0, failures=0, loss_ema=None),
        inflight={"x": 2},
        bans=BanList(),
    )
    worker = SimpleNamespace(
        stats=SimpleNamespace(
            forward=0,
            backward=0,
            samples=0,
            rejected=0,
            discarded=0,
            clipped=0,
            compute_s=0.0,
            throughput=0.0,
            loss_ema=None,
        ),
        queue_depth=3,
    )
    spec = SimpleNamespace(run_id="r", num_stages=2, digest=lambda: "ab" * 32)
    return SimpleNamespace(
        spec=spec,
        swarm=SimpleNamespace(peer_id="QmMe"),
        started=time.time() - 5,
        status=SimpleNamespace(stage=0, state="online"),
        trainer=trainer,
        worker=worker,
        optimizer=FakeOptimizer(),
        counters=SimpleNamespace(sent={"activations": 10}, received={}, rejected={}, busy={}),
        distrust=SimpleNamespace(counts={"no_server": 2}),
        peers=[
            PeerInfo("QmMe", 0, "online", 1.0),
            PeerInfo("QmB", 1, "online", 1.0),
            PeerInfo("QmC", 1, "joining", 1.0),
        ],
    )


def test_collector_reads_the_peer():
    m = PeerMetrics()
    peer = fake_peer()
    m.update(peer)
    first = parse(generate_latest(m.registry).decode())
    assert value(first, "swarmtrain_tokens_total") == 0
    assert value(first, "swarmtrain_peers_online", stage=1) == 1
    assert value(first, "swarmtrain_state", state="online") == 1
    assert value(first, "swarmtrain_trainer_inflight") == 2 and value(first, "swarmtrain_stage_queue_depth") == 3
    assert value(first, "swarmtrain_sent_bytes_total", kind="activations") == 10
    assert value(first, "swarmtrain_records_distrusted_total", reason="no_server") == 2
    assert ("swarmtrain_loss", ()) not in first  # no loss yet: absent, not a made-up 0

    opt = peer.optimizer
    peer.trainer.stats.tokens, peer.trainer.stats.microbatches, peer.trainer.stats.loss_ema = 4096, 8, 4.5
    opt.round()  # alone in the group
    opt.local_epoch = 1
    m.update(peer)
    opt.tracker.global_progress.num_peers = 3
    opt.round("ok")
    opt.round("fail")
    opt.local_epoch = 2
    peer.trainer.bans.ban("QmB", time.monotonic())
    opt.last_load_state_error = "TimeoutError: no peer answered"
    m.update(peer)
    opt.local_epoch = 7  # a catch-up
    m.update(peer)
    after = parse(generate_latest(m.registry).decode())
    assert value(after, "swarmtrain_tokens_total") == 4096 and value(after, "swarmtrain_loss") == 4.5
    assert value(after, "swarmtrain_averaging_rounds_total") == 2
    assert value(after, "swarmtrain_catch_ups_total") == 1 and value(after, "swarmtrain_epoch") == 7
    assert value(after, "swarmtrain_step_seconds") >= 0
    assert value(after, "swarmtrain_allreduce_total", outcome="alone") == 1
    assert value(after, "swarmtrain_allreduce_total", outcome="averaged") == 1
    assert value(after, "swarmtrain_allreduce_total", outcome="failed") == 1
    assert value(after, "swarmtrain_bans_total") == 1 and value(after, "swarmtrain_banned_peers") == 1
    assert value(after, "swarmtrain_load_state_failures_total") == 1
    assert value(after, "swarmtrain_load_state_error") == 1
    assert value(after, "swarmtrain_tokens_per_second") > 0


def test_observer_leaves_unknown_optimizers_alone():
    assert AveragingObserver().attach(SimpleNamespace(local_epoch=0)) is False


def test_update_never_raises():
    m = PeerMetrics()
    m.update(SimpleNamespace())  # a peer missing everything: metrics must not stop it
    assert generate_latest(m.registry) == b""
