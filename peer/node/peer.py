"""A peer: joins the DHT, takes a stage, serves it, trains on local data, announces itself.

``Peer`` is the start order, the main loop and the shutdown. The parts own their state:
``StageSlot`` (one stage's module, optimizer, worker and server), ``Mover`` (rebalancing and
recovery moves), ``Presence`` (the status snapshot, the announcer, the swarm's records), the
checkpoint service and keeper (``peer.node.checkpointing``), and the trainer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from typing import Optional

import torch

from peer.averaging.deadlines import check_rounds_fit
from peer.base import LoopThread, Output
from peer.base.config import OutputConfig, PeerConfig
from peer.base.distrust import DistrustTally
from peer.model.tensor_files import save_tensors
from peer.net import WireCounters
from peer.net.reach import Reachability
from peer.net.timeouts import RoundTooShort
from peer.node.checkpointing import CheckpointSide
from peer.node.mover import Mover
from peer.node.presence import PeerStatus, Presence
from peer.node.relaying import RelayedSide, check_at_start, relays_of
from peer.node.report import FirstContribution, print_status, training_figures
from peer.node.slot import NoStartingWeights, SlotContext, StageSlot
from peer.node.teaching import TeacherSide
from peer.pipeline import ServedInfo, Trainer
from peer.swarm import Identity, SwarmDHT, cleanup_identity, load_or_create_identity, start_dht, visible_maddrs
from peer.swarm.balancing import choose_stage
from peer.swarm.dht import resolve_run_spec
from protocol import PROTOCOL_VERSION
from protocol.records import ACTIVE_STATES, PeerState
from protocol.spec import RunSpec

log = logging.getLogger("swarmtrain.peer")


class Peer:
    def __init__(self, config: PeerConfig):
        self.config = config
        self.out = Output(config.output.log_json)
        self.stop_event = threading.Event()
        self.counters = WireCounters()
        self.distrust = DistrustTally(self.out.event)
        self.started = time.time()
        self.presence = Presence(
            "",
            PROTOCOL_VERSION,
            self.started,
            period=config.network.announce_period,
            figures=lambda: training_figures(self),
        )
        self.mover = Mover(self, period=config.churn.rebalance_period, cooldown=config.churn.rebalance_cooldown)
        self.identity: Optional[Identity] = None
        self.dht = self.swarm = self.p2p = None
        self.loop: Optional[LoopThread] = None
        self.spec: Optional[RunSpec] = None
        self.slot: Optional[StageSlot] = None
        self.trainer: Optional[Trainer] = None
        self.teaching: Optional[TeacherSide] = None  # a trainer of a run that distills
        self.ckpt: Optional[CheckpointSide] = None
        self.metrics = None  # a peer.observe.metrics object when --metrics-port is given
        self.reach = Reachability(None, "", "not checked yet")
        self.relayed: Optional[RelayedSide] = None  # when others cannot dial this peer
        self.second_signal = False
        self._first_contribution = FirstContribution()

    # --- what others read (metrics, the status line): public, never private fields ---------

    @property
    def status(self) -> PeerStatus:
        return self.presence.status

    @property
    def peers(self):
        return self.presence.peers

    @property
    def worker(self):
        return self.slot.worker if self.slot is not None else None

    @property
    def optimizer(self):
        return self.slot.optimizer if self.slot is not None else None

    @property
    def epoch(self) -> int:
        return self.slot.epoch if self.slot is not None else 0

    # --- lifecycle ---------------------------------------------------------------------------

    def run(self) -> int:
        torch.set_num_threads(max(1, self.config.threads))
        try:
            self._start()
            self._main_loop()
            return 0
        finally:
            self._shutdown()

    def _start(self) -> None:
        cfg, net = self.config, self.config.network
        if cfg.output.metrics_port is not None:
            self.metrics = start_metrics(cfg.output, self.out)
        self.identity = load_or_create_identity(net.identity)
        self.reach = check_at_start(net, self.out.event)
        self.out.event("starting", f"peer {self.identity.peer_id} starting the DHT", peer_id=str(self.identity.peer_id))
        self.dht = start_dht(
            self.identity,
            initial_peers=net.initial_peers,
            host_maddrs=net.host_maddrs,
            announce_maddrs=net.announce_maddrs,
            client_mode=net.client_mode or self.reach.reachable is False,  # nobody waits on an undialable server
        )
        self.spec = spec = resolve_run_spec(
            self.dht,
            cfg.run.spec,
            cfg.run.run_id,
            cfg.run.spec_digest,
            trusted_keys=cfg.run.trusted_keys,
            report_ignored=lambda publisher, text: self.distrust.report(publisher, "spec", text),
        )
        try:
            check_rounds_fit(spec)
        except RoundTooShort as err:  # every member would fail its rounds alike: said before it joins
            raise SystemExit(f"this run's outer rounds are too short: {err}") from None
        self.swarm = SwarmDHT(self.dht, spec, self.identity)
        self.presence.peer_id = self.swarm.peer_id
        self.presence.swarm = self.swarm
        self.presence.refresh()
        stage = cfg.churn.stage if cfg.churn.stage is not None else self._choose_stage()
        if not 0 <= stage < spec.num_stages:
            raise SystemExit(f"--stage {stage} is out of range: the spec has {spec.num_stages} stages")
        stage_spec = spec.stages[stage]
        self.out.event(
            "stage",
            f"taking stage {stage} of {spec.num_stages} (layers {stage_spec.start}..{stage_spec.end - 1})",
            stage=stage,
        )
        self.presence.update(stage=stage, state=PeerState.JOINING)
        self.presence.announce()  # 'joining': visible to status, not yet routed to
        self.presence.start(self.swarm)

        self.loop = LoopThread()
        self.p2p = self.loop.run(self.dht.replicate_p2p(), timeout=30)
        if self.reach.reachable is False and net.use_relay:
            self.relayed = RelayedSide(self.p2p, self.loop, relays_of(net), self.out.event)
            self.presence.update(via=self.relayed.start() or "")
        self.ckpt = CheckpointSide(
            self.spec,
            cfg.checkpoints,
            net,
            swarm=self.swarm,
            p2p=self.p2p,
            loop=self.loop,
            event=self.out.event,
            counters=self.counters,
            distrust=self.distrust,
        )
        try:
            self.open_slot(stage)
        except NoStartingWeights as err:  # the run's setup, not a crash: said in one line
            raise SystemExit(str(err)) from None
        resumed = self.resume_if_group_gone()
        if resumed is not None:
            restored = self.slot.restored_step
            self.out.event(
                "resumed_alone",
                f"no other peer serves stage {stage}: continuing its epoch count at "
                f"{resumed} with the {'restored' if restored is not None else 'initial'} weights",
                stage=stage,
                epoch=resumed,
                restored_step=restored,
            )
        if cfg.data.path:
            self.teaching, self.trainer = start_training(self, stage)
        self.presence.update(state=PeerState.ONLINE)
        self.presence.announce()
        self.mover.joined()
        self.out.event(
            "ready",
            f"serving stage {stage} as {self.swarm.peer_id}"
            + (" and training on " + cfg.data.path if cfg.data.path else " (no --data: serving only)"),
            peer_id=self.swarm.peer_id,
            stage=stage,
            maddrs=visible_maddrs(self.dht),
            digest=spec.digest(),
        )

    def _choose_stage(self) -> int:
        # Records appear within an announce period; a short wait avoids herding into stage 0.
        deadline = time.monotonic() + min(3.0, self.config.network.announce_period)
        while time.monotonic() < deadline and not self.presence.peers:
            time.sleep(0.5)
            self.presence.refresh()
        return choose_stage(self.presence.peers, self.spec.num_stages, my_throughput=1.0, my_peer_id=self.swarm.peer_id)

    def _main_loop(self) -> None:
        cfg = self.config
        deadline = time.monotonic() + cfg.max_seconds if cfg.max_seconds else None
        train_future = None
        if self.trainer is not None:
            from peer.data import PackedDataset, load_tokenizer

            tokenizer = load_tokenizer(self.spec.tokenizer)
            dataset = PackedDataset(
                cfg.data.path,
                tokenizer,
                seq_len=self.spec.training.seq_len,
                batch_size=self.spec.training.micro_batch_size,
                seed=self.spec.seed,
                peer_key=self.swarm.peer_id,
                suffixes=cfg.data.suffixes,
            )
            self._async_stop = asyncio.Event()
            train_future = self.loop.submit(
                self.trainer.run(dataset, stop=self._async_stop, max_microbatches=cfg.max_microbatches)
            )
        last_status = time.monotonic()
        while not self.stop_event.is_set():
            time.sleep(0.2)
            if deadline is not None and time.monotonic() > deadline:
                self.out.event("deadline", "--max-seconds reached", seconds=cfg.max_seconds)
                break
            if train_future is not None and train_future.done():
                exc = train_future.exception()
                if exc is not None:
                    raise exc
                break
            if self.metrics is not None:
                self.metrics.update(self)
            self._periodic()
            if time.monotonic() - last_status >= cfg.output.status_every:
                last_status = time.monotonic()
                print_status(self)
        if train_future is not None:
            self.loop.loop.call_soon_threadsafe(self._async_stop.set)
            try:
                train_future.result(timeout=cfg.network.request_timeout * (self.spec.num_stages + 1))
            except Exception as err:
                log.warning("trainer stopped with %s", err)
        print_status(self)

    def _periodic(self) -> None:
        """Called every ~0.2 s from the main loop: the place for rebalancing and keeper work."""
        if self.config.checkpoints.keeper is not None and self.ckpt.keeper is None:
            self.ckpt.start_keeper(local_state=self._local_stage_state)
        self._first_contribution.check(self)
        self.mover.maybe_move()
        if self.relayed is not None:
            self.relayed.renew_if_due()

    def _shutdown(self) -> None:
        for part in (self.teaching, self.ckpt, self.relayed):
            if part is not None:
                part.stop()
        self.hand_back_gradients()
        if self.swarm is not None and self.status.stage is not None:
            self.presence.update(state=PeerState.LEAVING)
            self.presence.announce(ttl=max(5.0, self.config.network.announce_period))
        self.presence.stop()
        slot = self.slot
        self.close_slot(for_move=False)
        if slot is not None and slot.worker is not None and self.config.final_state:
            save_tensors(slot.worker.module.state_dict(), self.config.final_state, metadata={"epoch": str(slot.epoch)})
        if self.loop is not None:
            self.loop.stop()
        if self.dht is not None:
            try:
                self.dht.shutdown()
            except Exception:
                pass
        if self.identity is not None:
            cleanup_identity(self.identity)
        self.out.event("stopped", "stopped cleanly")

    # --- the stage slot (opened on start, swapped on a move) --------------------------------

    def open_slot(self, stage: int) -> None:
        ctx = SlotContext(
            spec=self.spec,
            dht=self.dht,
            p2p=self.p2p,
            loop=self.loop,
            counters=self.counters,
            event=self.out.event,
            info=self._served_info,
            checkpoints=self.ckpt.service,
            throughput=self.config.churn.throughput,
        )
        slot = StageSlot.open(ctx, stage, held_step=self.ckpt.held_step(stage))
        if slot.restored_step is not None:
            self.ckpt.hold(stage, slot.restored_step)
        self.slot = slot
        # Before its first stage opens, a new peer's small positive figure (PeerStatus's 1.0)
        # only lets routers try it. While a moving peer loads its target stage it announces the
        # old stage's figure: a placeholder made the target still look starved, and the other
        # peers of the source stage followed one by one until they emptied it (test_churn.py).
        if slot.capacity:
            self.presence.update(throughput=slot.capacity)
        if self.trainer is not None:
            self.trainer.local_stage, self.trainer.local_worker = stage, slot.worker

    def close_slot(self, *, for_move: bool) -> None:
        if self.trainer is not None:
            self.trainer.local_stage, self.trainer.local_worker = None, None
        if self.slot is not None:
            self.slot.close(wait_for_optimizer=not for_move)

    def resume_if_group_gone(self) -> Optional[int]:
        others = self.presence.others_on(self.status.stage, (PeerState.ONLINE,))
        return self.slot.resume_if_group_gone(others)

    def hand_back_gradients(self) -> None:
        if self.slot is None or self.spec is None:
            return
        training = self.spec.training
        try:
            self.slot.hand_back_gradients(
                partners=self.presence.others_on(self.slot.stage, ACTIVE_STATES),
                budget=training.matchmaking_time + training.averaging_timeout,
                give_up=lambda: self.second_signal,
            )
        except Exception as err:
            log.warning("could not hand back gradients: %s", err)

    def checkpoints_announced(self, stage: int) -> bool:
        return self.ckpt.announced(stage)

    def _local_stage_state(self, stage: int):
        """(epoch, parameters) of the stage this peer serves, for ``run --keeper``."""
        slot = self.slot
        if slot is None or slot.worker is None or slot.stage != stage:
            return None
        return slot.parameters()

    # --- what this peer reports ------------------------------------------------------------

    def _served_info(self) -> ServedInfo:
        status = self.status
        return ServedInfo(state=status.state, throughput=status.throughput, epoch=self.epoch, version=PROTOCOL_VERSION)


def start_training(peer: Peer, stage: int) -> tuple[Optional[TeacherSide], Trainer]:
    """The trainer of a peer with ``--data`` and, when its run distills, its side of teachers."""
    spec, net = peer.spec, peer.config.network
    seed = hash(peer.swarm.peer_id) & 0xFFFF
    teaching = None
    if spec.distill is not None:
        teaching = TeacherSide(
            spec,
            peer.p2p,
            peer.swarm,
            counters=peer.counters,
            event=peer.out.event,
            timeout=net.request_timeout,
            period=net.announce_period,
            seed=seed,
        ).start()
    trainer = Trainer(
        spec,
        peer.p2p,
        peer.swarm.peer_id,
        snapshot=lambda: peer.presence.peers,
        local_stage=stage,
        local_worker=peer.worker,
        request_timeout=net.request_timeout,
        counters=peer.counters,
        seed=seed,
        soft_targets=teaching.client if teaching is not None else None,
    )
    return teaching, trainer


def run_peer(config: PeerConfig) -> int:
    peer = Peer(config)
    install_signal_handlers(peer)
    try:
        return peer.run()
    except KeyboardInterrupt:
        return 130


def install_signal_handlers(peer: Peer) -> None:
    """Ctrl-C or SIGTERM: announce 'leaving' and finish in-flight work; a second one: stop
    waiting for anything."""
    peer_pid = os.getpid()

    def request_stop(signum, _frame):
        if os.getpid() != peer_pid:
            # A process hivemind forked from this one (an averager) inherited the handler:
            # it must die on the reaper's SIGTERM, not print a 'stopping' of the peer.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if peer.stop_event.is_set():
            peer.second_signal = True  # a second Ctrl-C: stop waiting for anything
            return
        peer.out.event(
            "stopping",
            f"{signal.Signals(signum).name}: announcing 'leaving' and finishing in-flight work",
            signal=signal.Signals(signum).name,
        )
        peer.stop_event.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)


def start_metrics(config: OutputConfig, out: Output):
    """Prometheus /metrics, started first: a port that is taken fails before joining the swarm."""
    from peer.observe.metrics import PeerMetrics

    cfg = config
    metrics = PeerMetrics()
    try:
        port = metrics.serve(cfg.metrics_port, host=cfg.metrics_host)
    except OSError as err:
        raise SystemExit(f"--metrics-port {cfg.metrics_port}: cannot listen on {cfg.metrics_host}: {err}")
    url = f"http://{cfg.metrics_host}:{port}/metrics"
    out.event("metrics", f"Prometheus metrics at {url}", port=port, url=url)
    return metrics
