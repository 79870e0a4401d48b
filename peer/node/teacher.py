"""A teacher peer (``swarmtrain teach``): a frozen model that serves soft targets to the trainers
of one run. Start order: the model and its checks (a vocabulary that does not match, or weights
the spec does not accept, stop it before it joins anything), reachability, the DHT, the run's
spec, the ``swarmtrain.teach`` handler (through a relay when others cannot dial it), then its
record every period until Ctrl-C. It trains nothing and holds no stage.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Optional

import torch

from peer.base import LoopThread, Output
from peer.base.config import TeacherConfig
from peer.net import WireCounters
from peer.node.relaying import RelayedSide, check_at_start, relays_of
from peer.swarm import SwarmDHT, cleanup_identity, load_or_create_identity, start_dht, visible_maddrs
from peer.swarm.dht import resolve_run_spec
from peer.teach.model import TeacherError, TeacherModel
from peer.teach.server import TeacherServer
from protocol import PROTOCOL_VERSION
from protocol.records import TeacherInfo
from protocol.spec import SpecError

log = logging.getLogger("swarmtrain.teacher")


class Teacher:
    def __init__(self, config: TeacherConfig):
        self.config = config
        self.out = Output(config.output.log_json)
        self.stop_event = threading.Event()
        self.counters = WireCounters()
        self.started = time.time()
        self.model: Optional[TeacherModel] = None
        self.server: Optional[TeacherServer] = None
        self.spec = self.swarm = self.dht = self.loop = self.identity = self.relayed = None
        self.metrics = None
        self.throughput = 0.0
        self.via = ""

    def run(self) -> int:
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        try:
            self._start()
            self._serve()
            return 0
        finally:
            self._shutdown()

    def _load(self, spec) -> None:
        self.out.event("loading", f"loading the teacher model {self.config.model_dir}", model=self.config.model_dir)
        try:
            self.model = TeacherModel.load(self.config.model_dir, spec)
        except TeacherError as err:
            raise SystemExit(f"swarmtrain teach: {err}") from None
        t = spec.training
        self.throughput = self.model.measure(t.micro_batch_size, t.seq_len)
        self.out.event(
            "teacher_model",
            f"weights {self.model.digest} answer {self.throughput:.1f} samples/s "
            f"(top-{self.model.k} of {self.model.vocab} tokens at temperature {self.model.temperature:g})",
            digest=self.model.digest,
            throughput=self.throughput,
        )

    def _start(self) -> None:
        cfg, net = self.config, self.config.network
        if cfg.output.metrics_port is not None:
            from peer.observe.teaching import TeacherMetrics

            self.metrics = TeacherMetrics.start(cfg.output, self.out)
        if cfg.run.spec is not None:  # a spec file: check the model before joining anything
            self._load(cfg.run.spec)
        self.identity = load_or_create_identity(net.identity)
        reach = check_at_start(net, self.out.event)
        self.dht = start_dht(
            self.identity,
            initial_peers=net.initial_peers,
            host_maddrs=net.host_maddrs,
            announce_maddrs=net.announce_maddrs,
            client_mode=net.client_mode or reach.reachable is False,
        )
        try:
            self.spec = resolve_run_spec(
                self.dht, cfg.run.spec, cfg.run.run_id, cfg.run.spec_digest, trusted_keys=cfg.run.trusted_keys
            )
        except SpecError as err:
            raise SystemExit(f"swarmtrain teach: {err}") from None
        if self.model is None:
            self._load(self.spec)
        self.swarm = SwarmDHT(self.dht, self.spec, self.identity)
        self.loop = LoopThread()
        p2p = self.loop.run(self.dht.replicate_p2p(), timeout=30)
        self.server = TeacherServer(
            self.spec, self.model, counters=self.counters, max_batch_samples=cfg.max_batch_samples
        )
        self.loop.run(self.server.start(p2p), timeout=30)
        if reach.reachable is False and net.use_relay:
            self.relayed = RelayedSide(p2p, self.loop, relays_of(net), self.out.event)
            self.via = self.relayed.start() or ""
        self._announce()
        self.out.event(
            "ready",
            f"teaching run {self.spec.run_id} as {self.swarm.peer_id} with weights {self.model.digest[:16]}",
            peer_id=self.swarm.peer_id,
            digest=self.spec.digest(),
            model_digest=self.model.digest,
            maddrs=visible_maddrs(self.dht),
        )

    def record(self, state: str = "online") -> TeacherInfo:
        stats = self.server.stats
        return TeacherInfo(
            peer_id=self.swarm.peer_id,
            model_digest=self.model.digest,
            state=state,
            throughput=self.throughput,
            version=PROTOCOL_VERSION,
            requests=stats.requests,
            tokens=stats.tokens,
            started=self.started,
            via=self.via,
        )

    def _announce(self, state: str = "online", ttl: Optional[float] = None) -> None:
        try:
            self.swarm.announce_teacher(self.record(state), ttl=ttl or 3 * self.config.network.announce_period)
        except Exception as err:
            log.warning("announce failed: %s", err)

    def _serve(self) -> None:
        cfg = self.config
        deadline = time.monotonic() + cfg.max_seconds if cfg.max_seconds else None
        next_announce = next_status = time.monotonic()
        while not self.stop_event.wait(0.2):
            now = time.monotonic()
            if deadline is not None and now > deadline:
                self.out.event("deadline", "--max-seconds reached", seconds=cfg.max_seconds)
                break
            if now >= next_announce:
                next_announce = now + cfg.network.announce_period
                self._announce()
            if self.relayed is not None:
                self.relayed.renew_if_due()
            if self.metrics is not None:
                self.metrics.update(self)
            if now >= next_status:
                next_status = now + cfg.output.status_every
                self._status()
        self._status()

    def _status(self) -> None:
        s = self.server.stats
        elapsed = max(1e-6, time.time() - self.started)
        self.out.event(
            "status",
            f"teacher | answered {s.requests} requests, {s.tokens:,} tokens ({s.tokens / elapsed:,.0f} tok/s) | "
            f"queued {self.server.queued} | sent {sum(self.counters.sent.values()) / 1e6:.1f} MB",
            requests=s.requests,
            tokens=s.tokens,
            batches=s.batches,
            queued=self.server.queued,
            bytes_sent=dict(self.counters.sent),
            bytes_received=dict(self.counters.received),
        )

    def _shutdown(self) -> None:
        if self.swarm is not None and self.server is not None:
            self._announce("leaving", ttl=max(5.0, self.config.network.announce_period))
        if self.relayed is not None:
            self.relayed.stop()
        if self.server is not None and self.loop is not None:
            try:
                self.loop.run(self.server.stop(), timeout=15)
            except Exception:
                pass
        if self.loop is not None:
            self.loop.stop()
        if self.dht is not None:
            try:
                self.dht.shutdown()
            except Exception:
                pass
        if self.identity is not None:
            cleanup_identity(self.identity)
        if self.metrics is not None:
            self.metrics.close()
        self.out.event("stopped", "stopped cleanly")


def run_teacher(config: TeacherConfig) -> int:
    teacher = Teacher(config)

    def request_stop(signum, _frame):
        if teacher.stop_event.is_set():
            return
        teacher.out.event("stopping", f"{signal.Signals(signum).name}: announcing 'leaving'")
        teacher.stop_event.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        return teacher.run()
    except KeyboardInterrupt:
        return 130
