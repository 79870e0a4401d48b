"""Prometheus metrics of a peer: the collector on peer snapshots (counters, observed epochs, bans,
averaging outcomes across stage moves, outer rounds). Live peers scraped over HTTP:
tests/integration/test_metrics_http.py."""

from __future__ import annotations

import dataclasses
import time
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest

from peer.averaging.stage_optimizer import OptimizerFigures
from peer.observe.metrics import PeerMetrics
from peer.observe.snapshot import PeerSnapshot, StageFigures, TrainerFigures
from protocol.records import PeerInfo, PeerState

from observe_helpers import parse, value


def snapshot(**changes) -> PeerSnapshot:
    """A peer's snapshot as its main loop takes it: a trainer, a stage, an optimizer, the wire."""
    base = dict(
        peer_id="QmMe",
        run_id="r",
        digest="ab" * 32,
        started=time.time() - 5,
        num_stages=2,
        stage=0,
        state=PeerState.ONLINE,
        peers=(
            PeerInfo("QmMe", 0, "online", 1.0),
            PeerInfo("QmB", 1, "online", 1.0),
            PeerInfo("QmC", 1, "joining", 1.0),
        ),
        trainer=TrainerFigures(inflight=2),
        worker=StageFigures(queue_depth=3),
        optimizer=OptimizerFigures(epoch=0, global_epoch=0, samples_accumulated=0, allreduce={}),
        sent={"activations": 10},
        distrusted={"no_server": 2},
    )
    return PeerSnapshot(**{**base, **changes})


def test_collector_reads_the_peer():
    m = PeerMetrics()
    m.update(snapshot())
    first = parse(generate_latest_of(m))
    assert value(first, "swarmtrain_tokens_total") == 0
    assert value(first, "swarmtrain_peers_online", stage=1) == 1
    assert value(first, "swarmtrain_state", state="online") == 1
    assert value(first, "swarmtrain_trainer_inflight") == 2 and value(first, "swarmtrain_stage_queue_depth") == 3
    assert value(first, "swarmtrain_sent_bytes_total", kind="activations") == 10
    assert value(first, "swarmtrain_records_distrusted_total", reason="no_server") == 2
    assert ("swarmtrain_loss", ()) not in first  # no loss yet: absent, not a made-up 0

    trainer = TrainerFigures(tokens=4096, microbatches=8, loss_ema=4.5, inflight=2)
    figures = OptimizerFigures(epoch=1, global_epoch=1, allreduce={"alone": 1})
    m.update(snapshot(trainer=trainer, optimizer=figures))
    banned = dataclasses.replace(trainer, banned=frozenset({"QmB"}), tokens=8192)
    figures = OptimizerFigures(
        epoch=2, global_epoch=2, allreduce={"alone": 1, "averaged": 1, "failed": 1}, load_state_error="Timeout"
    )
    m.update(snapshot(trainer=banned, optimizer=figures))
    m.update(snapshot(trainer=banned, optimizer=dataclasses.replace(figures, epoch=7)))  # a catch-up
    after = parse(generate_latest_of(m))
    assert value(after, "swarmtrain_tokens_total") == 8192 and value(after, "swarmtrain_loss") == 4.5
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


def test_a_move_keeps_the_earlier_stages_allreduce_counts_and_counts_no_catch_up():
    m = PeerMetrics()
    m.update(snapshot(optimizer=OptimizerFigures(epoch=4, global_epoch=4, allreduce={"averaged": 3}), slot_serial=1))
    # The new stage's optimizer counts from zero, at the new group's epoch: not a catch-up.
    m.update(snapshot(optimizer=OptimizerFigures(epoch=9, global_epoch=9, allreduce={"alone": 1}), slot_serial=2))
    scraped = parse(generate_latest_of(m))
    assert value(scraped, "swarmtrain_allreduce_total", outcome="averaged") == 3
    assert value(scraped, "swarmtrain_allreduce_total", outcome="alone") == 1
    assert value(scraped, "swarmtrain_catch_ups_total") == 0 and value(scraped, "swarmtrain_epoch") == 9


def test_outer_rounds_figures_are_exposed():
    m = PeerMetrics()
    figures = OptimizerFigures(
        epoch=3, state_digest="ab" * 8, rounds={"applied": 3, "undecided": 1}, dropped={"opposed": 2}
    )
    m.update(snapshot(optimizer=figures))
    scraped = parse(generate_latest_of(m))
    assert value(scraped, "swarmtrain_outer_rounds_total", outcome="applied") == 3
    assert value(scraped, "swarmtrain_outer_dropped_total", reason="opposed") == 2
    assert ("swarmtrain_allreduce_total", (("outcome", "alone"),)) not in scraped  # per_step only


def test_update_never_raises():
    m = PeerMetrics()
    m.update(SimpleNamespace())  # a snapshot missing everything: metrics must not stop a peer
    assert generate_latest_of(m) == ""


def generate_latest_of(metrics) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics.values)
    return generate_latest(registry).decode()
