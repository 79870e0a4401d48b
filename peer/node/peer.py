"""A peer: joins the DHT, takes a stage, serves it, trains on local data, announces itself.

``Peer`` is the start order, the main loop and the shutdown. The parts own their state:
``StageHolder`` (the stage slot: module, optimizer, worker and server), ``Mover`` (rebalancing
and recovery moves), ``Presence`` (the status, the announcer, the swarm's records), the
checkpoint side and keeper (``peer.node.checkpointing``), and the trainer. Readers (the status
line, the record's figures, /metrics) get one ``PeerSnapshot`` of them at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Optional

import torch

from peer.averaging.deadlines import check_rounds_fit
from peer.base import Output
from peer.base.config import PeerConfig
from peer.base.distrust import DistrustTally
from peer.model.tensor_files import save_tensors
from peer.net import WireCounters
from peer.net.timeouts import RoundTooShort
from peer.node.checkpointing import CheckpointSide
from peer.node.holder import StageHolder
from peer.node.joined import Joined, StopSignals, joined
from peer.node.mover import Mover
from peer.node.presence import PeerStatus, Presence
from peer.node.report import FirstContribution, print_status, training_figures
from peer.node.slot import NoStartingWeights, SlotContext
from peer.node.teaching import TeacherSide
from peer.observe.prom import close_server, serve_metrics
from peer.observe.snapshot import PeerSnapshot, StageFigures, TeachingFigures, TrainerFigures
from peer.pipeline import Trainer
from peer.swarm import visible_maddrs
from peer.swarm.balancing import choose_stage
from protocol import PROTOCOL_VERSION
from protocol.records import PeerState

log = logging.getLogger("swarmtrain.peer")


class Peer:
    def __init__(self, config: PeerConfig):
        self.config = config
        self.out = Output(config.output.log_json)
        self.signals = StopSignals(self.out.event, "announcing 'leaving' and finishing in-flight work")
        self.counters = WireCounters()
        self.distrust = DistrustTally(self.out.event)
        self.started = time.time()
        self.presence = Presence(
            "",
            PROTOCOL_VERSION,
            self.started,
            period=config.network.announce_period,
            figures=lambda: training_figures(self.snapshot()),
        )
        self.node: Optional[Joined] = None
        self.holder: Optional[StageHolder] = None
        self.mover: Optional[Mover] = None
        self.trainer: Optional[Trainer] = None
        self.teaching: Optional[TeacherSide] = None  # a trainer of a run that distills
        self.ckpt: Optional[CheckpointSide] = None
        self.metrics = None  # a peer.observe.metrics.PeerMetrics when --metrics-port is given
        self._metrics_server = None
        self._slots_opened = 0
        self._first_contribution = FirstContribution()

    @property
    def status(self) -> PeerStatus:
        return self.presence.status

    @property
    def spec(self):
        return self.node.spec if self.node is not None else None

    # --- what readers get ----------------------------------------------------------------------

    def snapshot(self) -> PeerSnapshot:
        """One immutable copy of what the status line, the record and /metrics read."""
        node, slot, trainer = self.node, self.holder.slot if self.holder else None, self.trainer
        spec, status = self.spec, self.presence.status
        now = time.monotonic()
        return PeerSnapshot(
            peer_id=node.peer_id if node is not None else "",
            run_id=spec.run_id if spec is not None else "",
            digest=spec.digest() if spec is not None else "",
            started=self.started,
            num_stages=spec.num_stages if spec is not None else 0,
            stage=status.stage,
            state=status.state,
            peers=tuple(self.presence.peers),
            epoch=slot.epoch if slot is not None else 0,
            slot_serial=self._slots_opened,
            trainer=TrainerFigures.of(trainer, now) if trainer is not None else None,
            worker=StageFigures.of(slot.worker) if slot is not None and slot.worker is not None else None,
            optimizer=slot.optimizer.figures() if slot is not None and slot.optimizer is not None else None,
            teaching=TeachingFigures.of(self.teaching.client) if self.teaching is not None else None,
            sent=dict(self.counters.sent),
            received=dict(self.counters.received),
            rejected=dict(self.counters.rejected),
            busy=dict(self.counters.busy),
            distrusted=dict(self.distrust.counts),
        )

    # --- lifecycle ---------------------------------------------------------------------------

    def run(self) -> int:
        torch.set_num_threads(max(1, self.config.threads))
        with contextlib.ExitStack() as stack:
            stack.callback(self.out.event, "stopped", "stopped cleanly")
            if self.config.output.metrics_port is not None:  # first: a port that is taken fails before joining
                from peer.observe.metrics import PeerMetrics

                self.metrics = PeerMetrics()
                out = self.config.output
                self._metrics_server = serve_metrics(
                    self.metrics.values, host=out.metrics_host, port=out.metrics_port, event=self.out.event
                )
                stack.callback(close_server, self._metrics_server)
            self.node = stack.enter_context(
                joined(
                    self.config.network,
                    self.out.event,
                    run=self.config.run,
                    report_ignored=lambda publisher, text: self.distrust.report(publisher, "spec", text),
                )
            )
            stack.callback(self._shutdown)
            self._start()
            self._main_loop()
        return 0

    def _start(self) -> None:
        cfg, node, spec = self.config, self.node, self.node.spec
        try:
            check_rounds_fit(spec)
        except RoundTooShort as err:  # every member would fail its rounds alike: said before it joins
            raise SystemExit(f"this run's outer rounds are too short: {err}") from None
        self.presence.peer_id, self.presence.swarm = node.peer_id, node.swarm
        self.presence.update(via=node.via)
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
        self.presence.start(node.swarm)
        self.ckpt = CheckpointSide(
            spec,
            cfg.checkpoints,
            cfg.network,
            swarm=node.swarm,
            p2p=node.p2p,
            loop=node.loop,
            event=self.out.event,
            counters=self.counters,
            distrust=self.distrust,
        )
        self.holder = StageHolder(self._slot_context(), self.ckpt, self.presence)
        self.holder.on_change = self._stage_changed
        try:
            self.holder.open(stage)
        except NoStartingWeights as err:  # the run's setup, not a crash: said in one line
            raise SystemExit(str(err)) from None
        self._resume_alone(stage)
        if cfg.data.path:
            self.teaching, self.trainer = start_training(self, stage)
        self.mover = Mover(
            spec,
            self.holder,
            self.presence,
            node.swarm,
            p2p=node.p2p,
            run=node.loop.run,
            distrust=self.distrust,
            event=self.out.event,
            stopping=self.signals.stop,
            give_up=lambda: self.signals.hurry,
            period=cfg.churn.rebalance_period,
            cooldown=cfg.churn.rebalance_cooldown,
        )
        self.presence.update(state=PeerState.ONLINE)
        self.presence.announce()
        self.mover.joined()
        self.out.event(
            "ready",
            f"serving stage {stage} as {node.peer_id}"
            + (" and training on " + cfg.data.path if cfg.data.path else " (no --data: serving only)"),
            peer_id=node.peer_id,
            stage=stage,
            maddrs=visible_maddrs(node.dht),
            digest=spec.digest(),
        )

    def _slot_context(self) -> SlotContext:
        node = self.node
        return SlotContext(
            spec=node.spec,
            dht=node.dht,
            p2p=node.p2p,
            loop=node.loop,
            counters=self.counters,
            event=self.out.event,
            checkpoints=self.ckpt.service,
            records=node.swarm.snapshot,
            throughput=self.config.churn.throughput,
        )

    def _stage_changed(self, local) -> None:
        if local is not None:
            self._slots_opened += 1
        if self.trainer is not None:
            self.trainer.local = local

    def _resume_alone(self, stage: int) -> None:
        resumed = self.holder.resume_if_group_gone()
        if resumed is None:
            return
        restored = self.holder.slot.restored_step
        self.out.event(
            "resumed_alone",
            f"no other peer serves stage {stage}: continuing its epoch count at "
            f"{resumed} with the {'restored' if restored is not None else 'initial'} weights",
            stage=stage,
            epoch=resumed,
            restored_step=restored,
        )

    def _choose_stage(self) -> int:
        # Records appear within an announce period; a short wait avoids herding into stage 0.
        deadline = time.monotonic() + min(3.0, self.config.network.announce_period)
        while time.monotonic() < deadline and not self.presence.peers:
            time.sleep(0.5)
            self.presence.refresh()
        return choose_stage(
            self.presence.peers, self.spec.num_stages, my_throughput=1.0, my_peer_id=self.presence.peer_id
        )

    def _main_loop(self) -> None:
        cfg = self.config
        deadline = time.monotonic() + cfg.max_seconds if cfg.max_seconds else None
        train = self._start_trainer()
        last_status = time.monotonic()
        while not self.signals.stop.is_set():
            time.sleep(0.2)
            if deadline is not None and time.monotonic() > deadline:
                self.out.event("deadline", "--max-seconds reached", seconds=cfg.max_seconds)
                break
            if train is not None and train[0].done():
                exc = train[0].exception()
                if exc is not None:
                    raise exc
                break
            snap = self.snapshot()
            if self.metrics is not None:
                self.metrics.update(snap)
            self._periodic(snap)
            if time.monotonic() - last_status >= cfg.output.status_every:
                last_status = time.monotonic()
                print_status(snap, self.out.event)
        if train is not None:
            future, stop = train
            self.node.loop.loop.call_soon_threadsafe(stop.set)
            try:
                future.result(timeout=cfg.network.request_timeout * (self.spec.num_stages + 1))
            except Exception as err:
                log.warning("trainer stopped with %s", err)
        print_status(self.snapshot(), self.out.event)

    def _start_trainer(self):
        """(future, stop event) of the trainer's run on the event loop, or None without --data."""
        if self.trainer is None:
            return None
        from peer.data import PackedDataset, load_tokenizer

        cfg, spec = self.config, self.spec
        dataset = PackedDataset(
            cfg.data.path,
            load_tokenizer(spec.tokenizer),
            seq_len=spec.training.seq_len,
            batch_size=spec.training.micro_batch_size,
            seed=spec.seed,
            peer_key=self.presence.peer_id,
            suffixes=cfg.data.suffixes,
        )
        stop = asyncio.Event()
        future = self.node.loop.submit(self.trainer.run(dataset, stop=stop, max_microbatches=cfg.max_microbatches))
        return future, stop

    def _periodic(self, snap: PeerSnapshot) -> None:
        """Called every ~0.2 s from the main loop: the place for rebalancing and keeper work."""
        if self.config.checkpoints.keeper is not None and self.ckpt.keeper is None:
            self.ckpt.start_keeper(local_state=self.holder.local_state)
        self._first_contribution.check(snap, self.out.event)
        self.mover.maybe_move()
        if self.node.relayed is not None:
            self.node.relayed.renew_if_due()

    def _shutdown(self) -> None:
        """Leaving, in order: stop the sides, hand back what the stage accumulated, announce
        'leaving', close the stage (saving its weights when asked); ``joined`` then leaves the DHT."""
        for part in (self.teaching, self.ckpt):
            if part is not None:
                part.stop()
        holder = self.holder
        if holder is not None:
            holder.hand_back(give_up=lambda: self.signals.hurry)
        if self.status.stage is not None:
            self.presence.update(state=PeerState.LEAVING)
            self.presence.announce(ttl=max(5.0, self.config.network.announce_period))
        self.presence.stop()
        slot = holder.slot if holder is not None else None
        if holder is not None:
            holder.close(for_move=False)
        if slot is not None and slot.worker is not None and self.config.final_state:
            save_tensors(slot.worker.module.state_dict(), self.config.final_state, metadata={"epoch": str(slot.epoch)})


def start_training(peer: Peer, stage: int) -> tuple[Optional[TeacherSide], Trainer]:
    """The trainer of a peer with ``--data`` and, when its run distills, its side of teachers."""
    from peer.pipeline.trainer import LocalStage

    spec, net, node = peer.spec, peer.config.network, peer.node
    seed = hash(node.peer_id) & 0xFFFF
    teaching = None
    if spec.distill is not None:
        teaching = TeacherSide(
            spec,
            node.p2p,
            node.swarm,
            counters=peer.counters,
            event=peer.out.event,
            timeout=net.request_timeout,
            period=net.announce_period,
            seed=seed,
        ).start()
    slot = peer.holder.slot
    trainer = Trainer(
        spec,
        node.p2p,
        node.peer_id,
        snapshot=lambda: peer.presence.peers,
        local=LocalStage(stage, slot.worker),
        request_timeout=net.request_timeout,
        counters=peer.counters,
        seed=seed,
        soft_targets=teaching.client if teaching is not None else None,
    )
    return teaching, trainer


def run_peer(config: PeerConfig) -> int:
    peer = Peer(config)
    peer.signals.install()
    try:
        return peer.run()
    except KeyboardInterrupt:
        return 130
