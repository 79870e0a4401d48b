"""Prometheus metrics of one peer (``swarmtrain run --metrics-port PORT``).

The peer's main loop hands ``PeerMetrics.update`` an immutable ``PeerSnapshot`` of its parts'
own counters every ~0.2 s; the values are copied under a lock, and a scrape reads only that copy
(``peer.observe.prom``). So counters are the peer's own cumulative totals (a stage move starts
the stage worker's counters again: Prometheus' ``rate()`` treats that as a reset), and a scrape
never touches the training threads.

What is *observed* across snapshots rather than counted by the peer: averaging rounds (each time
the stage optimizer's epoch advances by one; a jump of more than one is a catch-up), failures to
load state from peers (each new error), bans (peers that became banned since the previous
snapshot: a ban lasts >= 2 s, snapshots come every ~0.2 s), and tokens/s over a window. The
outcome of each per_step gradient all-reduce is counted by the optimizer itself
(``peer.averaging.optimizer.BoundedOptimizer``); those of earlier stages are kept across moves.

Bytes of the averaging all-reduce itself are not here: hivemind runs it in its averager
processes (``peer.averaging.wire_stats`` counts them for the benchmarks, opt-in).
"""

from __future__ import annotations

import logging
import time
from typing import Optional

from peer.averaging.stage_optimizer import OptimizerFigures
from peer.observe.prom import Values, putter
from peer.observe.snapshot import PeerSnapshot
from peer.observe.teaching import TEACHER_METRICS, read_teaching
from protocol.records import PEER_STATES

log = logging.getLogger("swarmtrain.metrics")

# name: (type, help, label names); the values come from PeerMetrics.update.
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "info": ("gauge", "Always 1; the labels describe the peer.", ("peer_id", "run_id", "digest", "version")),
    "up_seconds": ("gauge", "Seconds since the peer started.", ()),
    "stage": ("gauge", "Pipeline stage this peer serves.", ()),
    "state": ("gauge", "1 for the peer's current state (joining, online, leaving).", ("state",)),
    "peers_online": ("gauge", "Online peers per stage in this peer's latest DHT snapshot.", ("stage",)),
    # the trainer (peers with --data)
    "tokens": ("counter", "Tokens this peer drove through the whole pipeline.", ()),
    "samples": ("counter", "Samples (sequences) this peer drove through the whole pipeline.", ()),
    "microbatches": ("counter", "Micro-batches completed by this peer's trainer.", ()),
    "trainer_retries": ("counter", "Stage calls retried on another peer after an error or timeout.", ()),
    "trainer_failures": ("counter", "Micro-batches that failed (no peer for a stage, or an error).", ()),
    "trainer_inflight": ("gauge", "Micro-batches in flight.", ()),
    "tokens_per_second": ("gauge", "Tokens/s driven by this peer, averaged over the last ~20 s.", ()),
    "loss": ("gauge", "Recent training loss (EMA) of this peer's micro-batches, or of the last stage's.", ()),
    "microbatch_seconds": ("gauge", "Mean wall time of one micro-batch over the last ~20 s.", ()),
    "banned_peers": ("gauge", "Peers banned by this peer's router right now.", ()),
    "bans": ("counter", "Peers banned by this peer's router after failures (observed).", ()),
    # the stage this peer serves
    "stage_forward": ("counter", "Forward passes computed by this peer's stage.", ()),
    "stage_backward": ("counter", "Backward passes computed by this peer's stage.", ()),
    "stage_samples": ("counter", "Samples whose gradients this peer's stage accumulated.", ()),
    "stage_rejected": ("counter", "Stage requests rejected by validation.", ()),
    "stage_discarded": ("counter", "Stage results discarded (past their deadline, or duplicates).", ()),
    "stage_clipped": (
        "counter",
        "Micro-batches whose gradient this stage scaled down to 3x the running median norm before accumulating.",
        (),
    ),
    "stage_compute_seconds": ("counter", "Seconds spent computing forward/backward in this stage.", ()),
    "stage_throughput": (
        "gauge",
        "Samples/s through forward+backward of this stage, as announced (measured when the stage opened).",
        (),
    ),
    "stage_queue_depth": ("gauge", "Requests waiting for this peer's stage worker.", ()),
    # averaging (the stage group's hivemind optimizer)
    "epoch": ("gauge", "The stage optimizer's local epoch (averaged updates applied).", ()),
    "global_epoch": ("gauge", "The stage group's epoch as the optimizer's progress tracker sees it.", ()),
    "samples_accumulated": ("gauge", "Samples accumulated by this peer towards the group's next update.", ()),
    "averaging_rounds": ("counter", "Stage optimizer epochs advanced by one (observed).", ()),
    "catch_ups": ("counter", "Stage optimizer epoch jumps of more than one (state loaded or epoch joined).", ()),
    "step_seconds": ("gauge", "Wall time between the last two optimizer epochs of this peer.", ()),
    "allreduce": (
        "counter",
        "Gradient averaging per optimizer epoch by outcome: averaged (with the group), failed "
        "(local gradients used), skipped (not started), alone (no other peer in the group); "
        "observed on the optimizer.",
        ("outcome",),
    ),
    "load_state_failures": (
        "counter",
        "Failures to load state from peers (observed: each new error of the optimizer).",
        (),
    ),
    "load_state_error": ("gauge", "1 while the last attempt to load state from peers failed.", ()),
    # the wire
    "sent_bytes": ("counter", "Bytes of payload sent, by kind (activations, state, checkpoint).", ("kind",)),
    "received_bytes": ("counter", "Bytes of payload received, by kind.", ("kind",)),
    "requests_rejected": (
        "counter",
        "Requests refused before any work (malformed, oversized, stalled, wrong spec or stage), by RPC handler.",
        ("rpc",),
    ),
    "records_distrusted": (
        "counter",
        "Peers whose DHT record was not taken at its word: a capped throughput claim (claim_capped), "
        "a stage-mate with no server behind its record (no_server), a checkpoint announced beyond its "
        "group's progress (checkpoint_step), a spec under the run id neither pinned nor trusted (spec), "
        "a progress record claiming an epoch far ahead (epoch; counted per stage opened).",
        ("reason",),
    ),
    "outer_rounds": (
        "counter",
        "Outer rounds of this peer's stage group, by outcome (applied, undecided, failed).",
        ("outcome",),
    ),
    "outer_contributions": (
        "counter",
        "Contributions in this peer's applied outer rounds: used, clipped to the median norm, dropped.",
        ("kind",),
    ),
    "outer_dropped": (
        "counter",
        "Contributions left out of this peer's applied outer rounds, by reason: not_agreed (announced, "
        "not held by most members: undelivered or malformed), not_finite, bad_weight, opposed (points "
        "against most of the others).",
        ("reason",),
    ),
    "requests_busy": (
        "counter",
        "Requests answered 'busy' at once: too many streams open, in all or from one remote peer.",
        ("rpc",),
    ),
}

METRICS.update(TEACHER_METRICS)

RATE_WINDOW = 20.0


class PeerMetrics:
    """Metrics of one peer; ``values`` is the collector that ``serve_metrics`` serves."""

    def __init__(self):
        self.values = Values(METRICS)
        # observation state
        self._slot: Optional[int] = None
        self._allreduce_before: dict[str, int] = {}  # outcomes of the optimizers of earlier stages
        self._allreduce_last: dict[str, int] = {}
        self._last_epoch: Optional[int] = None
        self._last_epoch_time: Optional[float] = None
        self._step_seconds: Optional[float] = None
        self._rounds = self._catch_ups = 0
        self._load_errors = 0
        self._last_load_error: Optional[str] = None
        self._banned: frozenset = frozenset()
        self._bans = 0
        self._window: list[tuple[float, int, int]] = []  # (time, tokens, microbatches)

    def update(self, snapshot: PeerSnapshot) -> None:
        try:
            values = self._read(snapshot, time.monotonic())
        except Exception as err:  # metrics must never stop a peer
            log.debug("metrics update failed: %s", err)
            return
        self.values.set(values)

    def _read(self, snap: PeerSnapshot, now: float) -> dict[str, dict[tuple, float]]:
        v: dict[str, dict[tuple, float]] = {}
        put = putter(v)
        put("info", 1, snap.peer_id, snap.run_id, snap.digest[:16], _version())
        put("up_seconds", time.time() - snap.started)
        put("stage", snap.stage)
        for state in PEER_STATES:
            put("state", 1 if snap.state == state else 0, state)
        if snap.num_stages:
            for k, n in enumerate(snap.online_per_stage()):
                put("peers_online", n, k)
        self._read_trainer(snap, now, put)
        worker = snap.worker
        if worker is not None:
            put("stage_forward", worker.forward)
            put("stage_backward", worker.backward)
            put("stage_samples", worker.samples)
            put("stage_rejected", worker.rejected)
            put("stage_discarded", worker.discarded)
            put("stage_clipped", worker.clipped)
            put("stage_compute_seconds", worker.compute_s)
            put("stage_throughput", worker.throughput)
            put("stage_queue_depth", worker.queue_depth)
        put("loss", snap.loss)
        if snap.optimizer is not None:
            self._read_optimizer(snap.optimizer, snap.slot_serial, now, put)
        for kind, n in snap.sent.items():
            put("sent_bytes", n, kind)
        for kind, n in snap.received.items():
            put("received_bytes", n, kind)
        for rpc, n in snap.rejected.items():
            put("requests_rejected", n, rpc)
        for rpc, n in snap.busy.items():
            put("requests_busy", n, rpc)
        for reason, n in snap.distrusted.items():
            put("records_distrusted", n, reason)
        read_teaching(snap, put)
        return v

    def _read_trainer(self, snap: PeerSnapshot, now: float, put) -> None:
        t = snap.trainer
        if t is None:
            return
        put("tokens", t.tokens)
        put("samples", t.samples)
        put("microbatches", t.microbatches)
        put("trainer_retries", t.retries)
        put("trainer_failures", t.failures)
        put("trainer_inflight", t.inflight)
        self._window.append((now, t.tokens, t.microbatches))
        while len(self._window) > 2 and now - self._window[1][0] >= RATE_WINDOW:
            self._window.pop(0)
        (t0, tok0, mb0), (t1, tok1, mb1) = self._window[0], self._window[-1]
        if t1 > t0:
            put("tokens_per_second", max(0, tok1 - tok0) / (t1 - t0))
        if mb1 > mb0:
            put("microbatch_seconds", (t1 - t0) / (mb1 - mb0))
        self._bans += len(t.banned - self._banned)
        self._banned = t.banned
        put("banned_peers", len(t.banned))
        put("bans", self._bans)

    def _read_optimizer(self, opt: OptimizerFigures, slot: int, now: float, put) -> None:
        if slot != self._slot:  # a new stage (or the first): its optimizer counts from zero
            for k, n in self._allreduce_last.items():
                self._allreduce_before[k] = self._allreduce_before.get(k, 0) + n
            self._slot, self._last_epoch = slot, None
        self._allreduce_last = dict(opt.allreduce)
        for outcome, n in opt.rounds.items():
            put("outer_rounds", n, outcome)
        for kind, n in opt.contributions.items():
            put("outer_contributions", n, kind)
        for reason, n in opt.dropped.items():
            put("outer_dropped", n, reason)
        self._observe_epoch(opt.epoch, now)
        put("epoch", opt.epoch)
        put("averaging_rounds", self._rounds)
        put("catch_ups", self._catch_ups)
        put("step_seconds", self._step_seconds)
        put("global_epoch", opt.global_epoch)
        put("records_distrusted", opt.epoch_claims_ignored, "epoch")
        put("samples_accumulated", opt.samples_accumulated)
        if opt.global_epoch is not None:  # per_step: hivemind's all-reduce outcomes
            for outcome in ("averaged", "failed", "skipped", "alone"):
                before = self._allreduce_before.get(outcome, 0)
                put("allreduce", before + opt.allreduce.get(outcome, 0), outcome)
        error = opt.load_state_error
        if error is not None and error != self._last_load_error:
            self._load_errors += 1
        self._last_load_error = error
        put("load_state_failures", self._load_errors)
        put("load_state_error", 1 if error is not None else 0)

    def _observe_epoch(self, epoch: int, now: float) -> None:
        if self._last_epoch is not None and epoch != self._last_epoch:
            if epoch == self._last_epoch + 1:
                self._rounds += 1
                if self._last_epoch_time is not None:
                    self._step_seconds = now - self._last_epoch_time
            elif epoch > self._last_epoch:
                self._catch_ups += 1
            self._last_epoch_time = now
        elif self._last_epoch is None:
            self._last_epoch_time = now
        self._last_epoch = epoch


class TeacherMetrics:
    """``/metrics`` of a teacher peer (``swarmtrain teach --metrics-port``): its own figures, the
    bytes it moved, refused requests. ``values`` is the collector ``serve_metrics`` serves."""

    def __init__(self):
        self.values = Values(METRICS)

    def update(self, teacher) -> None:
        values: dict = {}
        put = putter(values)
        put("up_seconds", time.time() - teacher.started)
        stats = teacher.server.stats
        put("teacher_answered_requests", stats.requests)
        put("teacher_answered_tokens", stats.tokens)
        put("teacher_batches", stats.batches)
        put("teacher_expired", stats.expired)
        put("teacher_queue_depth", teacher.server.queued)
        put("teacher_throughput", teacher.throughput)
        counters = teacher.counters
        for kind, n in list(counters.sent.items()):
            put("sent_bytes", n, kind)
        for kind, n in list(counters.received.items()):
            put("received_bytes", n, kind)
        for rpc, n in list(counters.rejected.items()):
            put("requests_rejected", n, rpc)
        for rpc, n in list(counters.busy.items()):
            put("requests_busy", n, rpc)
        self.values.set(values)


def _version() -> str:
    from peer import __version__

    return __version__
