"""Prometheus metrics of one peer (``swarmtrain run --metrics-port PORT``).

The peer already counts what matters (trainer stats, stage worker stats, wire counters, the
hivemind optimizer's epoch); ``PeerMetrics.update(peer)``, called from the peer's main loop,
copies those values into a plain dict under a lock, and a custom collector turns the dict into
metrics when Prometheus scrapes. So counters are the peer's own cumulative totals (a stage
move starts the stage worker's counters again: Prometheus' ``rate()`` treats that as a reset),
and a scrape never touches the training threads.

What is *observed* rather than counted by the peer:

- averaging rounds: each time the stage optimizer's ``local_epoch`` advances by one; a jump of
  more than one is a catch-up (state loaded from the group or the group's epoch joined);
- the outcome of each epoch's gradient averaging (averaged with the group, failed, skipped, or
  alone in the group), by wrapping three methods of *this peer's* hivemind optimizer instance
  (hivemind 1.1.12 logs the outcome and moves on; it keeps no count). A failed round still
  applies the local gradients, as hivemind does;
- failures to load state from peers: ``BoundedOptimizer.last_load_state_error``;
- bans: peers that became banned since the previous update (a ban lasts >= 2 s and updates
  come every ~0.2 s, so none is missed).

Bytes of the averaging all-reduce itself are not here: hivemind runs it in its averager
processes (``peer.averaging.wire_stats`` counts them for the benchmarks, opt-in).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Optional

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from peer.observe.events import close_server
from peer.observe.teaching import TEACHER_METRICS, read_teaching
from protocol.records import PEER_STATES, online_per_stage

log = logging.getLogger("swarmtrain.metrics")

PREFIX = "swarmtrain"

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


class _Collector:
    def __init__(self, owner: "PeerMetrics"):
        self.owner = owner

    def describe(self):
        return []  # values appear after the first update: no fixed description

    def collect(self):
        with self.owner._lock:
            values = {k: dict(v) for k, v in self.owner._values.items()}
        for name, (kind, help_text, labels) in METRICS.items():
            series = values.get(name)
            if not series:
                continue
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                f"{PREFIX}_{name}", help_text, labels=list(labels)
            )
            for label_values, value in series.items():
                family.add_metric(list(label_values), float(value))
            yield family


class AveragingObserver:
    """Counts the outcome of each gradient all-reduce of one hivemind optimizer instance."""

    def __init__(self):
        self.outcomes: dict[str, int] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def _count(self, outcome: str) -> None:
        with self._lock:
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def attach(self, optimizer) -> bool:
        begin = getattr(optimizer, "_begin_averaging_gradients", None)
        average = getattr(optimizer, "_average_gradients_and_load_into_optimizer", None)
        local = getattr(optimizer, "_load_local_gradients_into_optimizer", None)
        tracker = getattr(optimizer, "tracker", None)
        if begin is None or average is None or local is None or tracker is None:
            return False  # another hivemind version: no outcome counts rather than wrong ones
        observer = self

        def begin_averaging(*args, **kwargs):
            others = tracker.global_progress.num_peers > 1
            began = begin(*args, **kwargs)
            if not began:
                # Alone in the group: hivemind applies the local gradients. With others but no
                # round started (an internal error, or the pre-scheduled group was used up):
                # this epoch's update is local too.
                observer._count("skipped" if others else "alone")
            return began

        def load_local():
            observer._local.fell_back = True
            return local()

        def average_and_load(control):
            observer._local.fell_back = False
            try:
                return average(control)
            finally:
                if control is None:
                    observer._count("alone")  # hivemind: "Skipped averaging: there are no other peers"
                elif getattr(observer._local, "fell_back", False):
                    observer._count("failed")  # hivemind: "Averaging gradients failed ... local gradients"
                else:
                    observer._count("averaged")

        # Instance attributes: only this peer's optimizer object, looked up when hivemind calls them.
        optimizer._begin_averaging_gradients = begin_averaging
        optimizer._load_local_gradients_into_optimizer = load_local
        optimizer._average_gradients_and_load_into_optimizer = average_and_load
        return True


class PeerMetrics:
    """Metrics of one peer in their own registry; ``serve`` exposes them over HTTP."""

    def __init__(self, registry: Optional[CollectorRegistry] = None):
        self.registry = registry or CollectorRegistry(auto_describe=False)
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple, float]] = {}
        self.registry.register(_Collector(self))
        self.server = self._thread = None
        # observation state
        self._optimizer_id: Optional[int] = None
        self._averaging: Optional[AveragingObserver] = None
        self._allreduce_before: dict[str, int] = {}  # outcomes of optimizers of earlier stages
        self._last_epoch: Optional[int] = None
        self._last_epoch_time: Optional[float] = None
        self._step_seconds: Optional[float] = None
        self._rounds = self._catch_ups = 0
        self._load_errors = 0
        self._last_load_error: Optional[str] = None
        self._banned: set[str] = set()
        self._bans = 0
        self._window: list[tuple[float, int, int]] = []  # (time, tokens, microbatches)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Start the /metrics HTTP server; returns the port (useful with port 0)."""
        self.server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return self.server.server_address[1]

    def close(self) -> None:
        self.server = close_server(self.server)

    # --- reading the peer (main loop thread) --------------------------------------------------

    def update(self, peer) -> None:
        try:
            values = self._read(peer, time.monotonic())
        except Exception as err:  # metrics must never stop a peer
            log.debug("metrics update failed: %s", err)
            return
        self.set_values(values)

    def set_values(self, values: dict[str, dict[tuple, float]]) -> None:
        with self._lock:
            self._values = values

    def _read(self, peer, now: float) -> dict[str, dict[tuple, float]]:
        v: dict[str, dict[tuple, float]] = {}

        def put(name: str, value, *labels) -> None:
            if value is not None:
                v.setdefault(name, {})[tuple(str(x) for x in labels)] = float(value)

        spec, swarm = peer.spec, peer.swarm
        put(
            "info",
            1,
            swarm.peer_id if swarm else "",
            spec.run_id if spec else "",
            spec.digest()[:16] if spec else "",
            _version(),
        )
        put("up_seconds", time.time() - peer.started)
        status = peer.status
        put("stage", status.stage)
        for state in PEER_STATES:
            put("state", 1 if status.state == state else 0, state)
        if spec is not None:
            for k, n in enumerate(online_per_stage(list(peer.peers), spec.num_stages)):
                put("peers_online", n, k)

        trainer = peer.trainer
        loss = None
        if trainer is not None:
            t = trainer.stats
            put("tokens", t.tokens)
            put("samples", t.samples)
            put("microbatches", t.microbatches)
            put("trainer_retries", t.retries)
            put("trainer_failures", t.failures)
            put("trainer_inflight", sum(trainer.inflight.values()))
            loss = t.loss_ema
            self._window.append((now, t.tokens, t.microbatches))
            while len(self._window) > 2 and now - self._window[1][0] >= RATE_WINDOW:
                self._window.pop(0)
            (t0, tok0, mb0), (t1, tok1, mb1) = self._window[0], self._window[-1]
            if t1 > t0:
                put("tokens_per_second", max(0, tok1 - tok0) / (t1 - t0))
            if mb1 > mb0:
                put("microbatch_seconds", (t1 - t0) / (mb1 - mb0))
            banned = trainer.bans.banned(time.monotonic())
            self._bans += len(banned - self._banned)
            self._banned = banned
            put("banned_peers", len(banned))
            put("bans", self._bans)

        worker = peer.worker
        if worker is not None:
            s = worker.stats
            put("stage_forward", s.forward)
            put("stage_backward", s.backward)
            put("stage_samples", s.samples)
            put("stage_rejected", s.rejected)
            put("stage_discarded", s.discarded)
            put("stage_clipped", s.clipped)
            put("stage_compute_seconds", s.compute_s)
            put("stage_throughput", s.throughput)
            put("stage_queue_depth", worker.queue_depth)
            if loss is None:
                loss = s.loss_ema
        put("loss", loss)

        self._read_optimizer(peer.optimizer, now, put)

        counters = peer.counters
        for kind, n in list(counters.sent.items()):
            put("sent_bytes", n, kind)
        for kind, n in list(counters.received.items()):
            put("received_bytes", n, kind)
        for rpc, n in list(counters.rejected.items()):
            put("requests_rejected", n, rpc)
        for rpc, n in list(counters.busy.items()):
            put("requests_busy", n, rpc)
        for reason, n in list(peer.distrust.counts.items()):
            put("records_distrusted", n, reason)
        read_teaching(peer, put)
        return v

    def _read_optimizer(self, opt, now: float, put) -> None:
        if opt is None:
            return
        if id(opt) != self._optimizer_id:  # a new stage (or the first): observe its optimizer
            if self._averaging is not None:
                with self._averaging._lock:
                    for k, n in self._averaging.outcomes.items():
                        self._allreduce_before[k] = self._allreduce_before.get(k, 0) + n
            self._optimizer_id = id(opt)
            self._averaging = AveragingObserver()
            if not self._averaging.attach(opt):
                self._averaging = None
            self._last_epoch = None
        for outcome, n in dict(getattr(opt, "outcomes", {})).items():
            put("outer_rounds", n, outcome)
        for kind, n in dict(getattr(opt, "contributions", {})).items():
            put("outer_contributions", n, kind)
        for reason, n in dict(getattr(opt, "dropped", {})).items():
            put("outer_dropped", n, reason)
        epoch = int(opt.local_epoch)
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
        put("epoch", epoch)
        put("averaging_rounds", self._rounds)
        put("catch_ups", self._catch_ups)
        put("step_seconds", self._step_seconds)
        tracker = getattr(opt, "tracker", None)
        if tracker is not None:
            put("global_epoch", tracker.global_epoch)
            ignored = getattr(tracker, "ignored_signers", None)
            if ignored is not None:
                put("records_distrusted", ignored, "epoch")
        averager = getattr(opt, "grad_averager", None)
        if averager is not None:
            put("samples_accumulated", averager.local_samples_accumulated)
        outcomes = dict(self._allreduce_before)
        if self._averaging is not None:
            with self._averaging._lock:
                for k, n in self._averaging.outcomes.items():
                    outcomes[k] = outcomes.get(k, 0) + n
        for outcome in ("averaged", "failed", "skipped", "alone"):
            put("allreduce", outcomes.get(outcome, 0), outcome)
        error = getattr(opt, "last_load_state_error", None)
        if error is not None and error != self._last_load_error:
            self._load_errors += 1
        self._last_load_error = error
        put("load_state_failures", self._load_errors)
        put("load_state_error", 1 if error is not None else 0)


def _version() -> str:
    from peer import __version__

    return __version__
