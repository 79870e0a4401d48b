"""A teacher peer (``swarmtrain teach``): a frozen model that serves soft targets to the trainers
of one run. Start order: the model and its checks (a vocabulary that does not match, or weights
the spec does not accept, stop it before it joins anything), then ``joined`` (reachability, the
DHT, the run's spec, a relay when others cannot dial it), the ``swarmtrain.teach`` handler, then
its record every period until Ctrl-C. It trains nothing and holds no stage.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Optional

import torch

from peer.base import Output
from peer.base.config import TeacherConfig
from peer.net import WireCounters
from peer.node.joined import Joined, StopSignals, joined
from peer.observe.prom import close_server, serve_metrics
from peer.swarm import visible_maddrs
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
        self.signals = StopSignals(self.out.event, "announcing 'leaving'")
        self.counters = WireCounters()
        self.started = time.time()
        self.model: Optional[TeacherModel] = None
        self.server: Optional[TeacherServer] = None
        self.node: Optional[Joined] = None
        self.metrics = None
        self.throughput = 0.0

    def run(self) -> int:
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        cfg = self.config
        with contextlib.ExitStack() as stack:
            stack.callback(self.out.event, "stopped", "stopped cleanly")
            if cfg.output.metrics_port is not None:
                from peer.observe.metrics import TeacherMetrics

                self.metrics = TeacherMetrics()
                server = serve_metrics(
                    self.metrics.values,
                    host=cfg.output.metrics_host,
                    port=cfg.output.metrics_port,
                    event=self.out.event,
                )
                stack.callback(close_server, server)
            if cfg.run.spec is not None:  # a spec file: check the model before joining anything
                self._load(cfg.run.spec)
            try:
                self.node = stack.enter_context(joined(cfg.network, self.out.event, run=cfg.run))
            except SpecError as err:
                raise SystemExit(f"swarmtrain teach: {err}") from None
            stack.callback(self._shutdown)
            self._start()
            self._serve()
        return 0

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
        node = self.node
        if self.model is None:
            self._load(node.spec)
        self.server = TeacherServer(
            node.spec, self.model, counters=self.counters, max_batch_samples=self.config.max_batch_samples
        )
        node.loop.run(self.server.start(node.p2p), timeout=30)
        self._announce()
        self.out.event(
            "ready",
            f"teaching run {node.spec.run_id} as {node.peer_id} with weights {self.model.digest[:16]}",
            peer_id=node.peer_id,
            digest=node.spec.digest(),
            model_digest=self.model.digest,
            maddrs=visible_maddrs(node.dht),
        )

    def record(self, state: str = "online") -> TeacherInfo:
        stats = self.server.stats
        return TeacherInfo(
            peer_id=self.node.peer_id,
            model_digest=self.model.digest,
            state=state,
            throughput=self.throughput,
            version=PROTOCOL_VERSION,
            requests=stats.requests,
            tokens=stats.tokens,
            started=self.started,
            via=self.node.via,
        )

    def _announce(self, state: str = "online", ttl: Optional[float] = None) -> None:
        try:
            self.node.swarm.announce_teacher(self.record(state), ttl=ttl or 3 * self.config.network.announce_period)
        except Exception as err:
            log.warning("announce failed: %s", err)

    def _serve(self) -> None:
        cfg = self.config
        deadline = time.monotonic() + cfg.max_seconds if cfg.max_seconds else None
        next_announce = next_status = time.monotonic()
        while not self.signals.stop.wait(0.2):
            now = time.monotonic()
            if deadline is not None and now > deadline:
                self.out.event("deadline", "--max-seconds reached", seconds=cfg.max_seconds)
                break
            if now >= next_announce:
                next_announce = now + cfg.network.announce_period
                self._announce()
            if self.node.relayed is not None:
                self.node.relayed.renew_if_due()
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
        if self.server is None:
            return
        self._announce("leaving", ttl=max(5.0, self.config.network.announce_period))
        try:
            self.node.loop.run(self.server.stop(), timeout=15)
        except Exception:
            pass


def run_teacher(config: TeacherConfig) -> int:
    teacher = Teacher(config)
    teacher.signals.install()
    try:
        return teacher.run()
    except KeyboardInterrupt:
        return 130
