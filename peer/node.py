"""A peer: joins the DHT, takes a stage, serves it, trains on local data, announces itself.

The parts (DHT, stage worker, server, trainer, optimizer) are started here in order and
stopped in reverse; everything else is in their own modules.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from peer import __version__
from peer.averaging import make_stage_optimizer
from peer.balancing import ACTIVE_STATES, RebalancePolicy, choose_stage
from peer.capacity import measure_stage_capacity
from peer.churn import EmptyStages, StageEpochs, check_move, epochs_lost, next_check_delay
from peer.identity import Identity, cleanup_identity, load_or_create_identity
from peer.model import LlamaStage
from peer.server import StageServer, WireCounters
from peer.stage_worker import StageWorker
from peer.swarm_dht import SwarmDHT, resolve_spec, start_dht, visible_maddrs
from peer.trainer import Trainer
from protocol.records import PeerInfo
from protocol.spec import RunSpec

log = logging.getLogger("swarmtrain.peer")


@dataclass
class PeerConfig:
    initial_peers: Sequence[str]
    spec: Optional[RunSpec] = None
    run_id: Optional[str] = None
    spec_digest: Optional[str] = None
    data: Optional[str] = None
    data_suffixes: Optional[Sequence[str]] = None
    stage: Optional[int] = None  # None: auto
    host_maddrs: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",)
    announce_maddrs: Sequence[str] = ()
    identity: Optional[str] = None
    threads: int = 1
    announce_period: float = 5.0
    status_every: float = 5.0
    request_timeout: float = 30.0
    max_seconds: Optional[float] = None
    max_microbatches: Optional[int] = None
    log_json: bool = False
    final_state: Optional[str] = None
    client_mode: bool = False
    # Checkpoints (peer.ckpt_transfer) and the keeper (peer.keeper).
    checkpoint_dir: Optional[str] = None  # None: fetched checkpoints go to a temporary dir
    keeper: bool = False
    signing_key: Optional[str] = None
    keeper_every: float = 300.0
    keeper_keep: int = 3
    eval_data: Optional[str] = None
    # Churn (peer.churn): seconds between rebalancing checks (randomised around it; 0: never
    # move) and the policy's cool-down after a join or a move.
    rebalance_period: float = 0.0
    rebalance_cooldown: float = 120.0
    # Samples/s this peer announces for its stage; None: measured when the stage opens
    # (peer.capacity). Rebalancing weighs the peers by it.
    throughput: Optional[float] = None
    metrics_port: Optional[int] = None  # Prometheus /metrics (peer.metrics); 0: any free port
    metrics_host: str = "127.0.0.1"


class Output:
    """Progress for people (one compact line) or machines (JSON lines)."""

    def __init__(self, as_json: bool):
        self.as_json = as_json
        # Events come from several threads (main loop, keeper, checkpoint service): one write
        # per line under a lock, so that two JSON lines never interleave. Reentrant: the
        # Ctrl-C handler prints 'stopping' on the main thread, possibly while that thread is
        # inside this method (a plain Lock deadlocked the peer there, Ctrl-C included).
        self._lock = threading.RLock()

    def event(self, name: str, text: str, **fields) -> None:
        if self.as_json:
            line = json.dumps({"event": name, "time": round(time.time(), 3), **fields})
        else:
            line = f"[swarmtrain] {text}"
        with self._lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()


class LoopThread:
    """An asyncio loop in a background thread: hivemind's P2P is async, the rest is not."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="p2p-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: Optional[float] = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Peer:
    def __init__(self, config: PeerConfig):
        self.config = config
        self.out = Output(config.log_json)
        self.stop_event = threading.Event()
        self.counters = WireCounters()
        self.state = "joining"
        self.started = time.time()
        self._snapshot: list[PeerInfo] = []
        self.identity: Optional[Identity] = None
        self.dht = self.swarm = self.worker = self.server = self.optimizer = self.trainer = self.p2p = None
        self._capacity: Optional[float] = None  # announced samples/s (peer.capacity), kept across a move
        self.restored_step: Optional[int] = None
        self.checkpoints = self.keeper = None  # peer.ckpt_transfer.CheckpointService, peer.keeper.Keeper
        self._ckpt_tmp: Optional[str] = None
        self._held_checkpoint_steps: dict[int, int] = {}
        self._second_signal = False
        self.metrics = None  # a peer.metrics object when --metrics-port is given
        self.loop: Optional[LoopThread] = None
        self.stage: Optional[int] = None
        self.spec: Optional[RunSpec] = None
        # Churn: when this peer last joined or moved (the policy's cool-down), when it next
        # looks for a move, and the highest epoch seen per stage (work lost on a recovery).
        self._last_move_at: Optional[float] = None
        self._next_rebalance_at: Optional[float] = None
        self._stage_epochs = StageEpochs()
        self._empty_stages = EmptyStages()
        self._rng = random.Random()
        self._contributed = False

    # --- lifecycle ---------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        import os

        peer_pid = os.getpid()

        def request_stop(signum, _frame):
            if os.getpid() != peer_pid:
                # A process hivemind forked from this one (an averager) inherited the handler:
                # it must die on the reaper's SIGTERM, not print a 'stopping' of the peer.
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            if self.stop_event.is_set():
                self._second_signal = True  # a second Ctrl-C: stop waiting for anything
                return
            self.out.event("stopping", f"{signal.Signals(signum).name}: announcing 'leaving' and finishing in-flight work",
                           signal=signal.Signals(signum).name)
            self.stop_event.set()

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)

    def run(self) -> int:
        torch.set_num_threads(max(1, self.config.threads))
        try:
            self._start()
            self._main_loop()
            return 0
        finally:
            self._shutdown()

    def _start(self) -> None:
        cfg = self.config
        if cfg.metrics_port is not None:
            self._start_metrics()  # first: a port that is taken fails before joining the swarm
        self.identity = load_or_create_identity(cfg.identity)
        self.out.event("starting", f"peer {self.identity.peer_id} starting the DHT", peer_id=str(self.identity.peer_id))
        self.dht = start_dht(self.identity, initial_peers=cfg.initial_peers, host_maddrs=cfg.host_maddrs,
                             announce_maddrs=cfg.announce_maddrs, client_mode=cfg.client_mode)
        self.spec = cfg.spec or resolve_spec(self.dht, cfg.run_id, pinned_digest=cfg.spec_digest)
        if cfg.spec_digest and not self.spec.digest().startswith(cfg.spec_digest.lower()):
            raise SystemExit(f"the spec's digest {self.spec.digest()} does not match --spec-digest {cfg.spec_digest}")
        self.swarm = SwarmDHT(self.dht, self.spec, self.identity)
        self._refresh_snapshot()
        self.stage = cfg.stage if cfg.stage is not None else self._choose_stage()
        if not 0 <= self.stage < self.spec.num_stages:
            raise SystemExit(f"--stage {self.stage} is out of range: the spec has {self.spec.num_stages} stages")
        spec = self.spec
        stage_spec = spec.stages[self.stage]
        self.out.event("stage", f"taking stage {self.stage} of {spec.num_stages} (layers {stage_spec.start}..{stage_spec.end - 1})",
                       stage=self.stage)
        self._announce()  # 'joining': visible to status, not yet routed to
        # Keep the 'joining' record alive while the stage loads (restore, catch-up): a record
        # that expires meanwhile makes the stage look empty to the others' balancing policy.
        threading.Thread(target=self._announcer, name="announcer", daemon=True).start()

        self.loop = LoopThread()
        self.p2p = self.loop.run(self.dht.replicate_p2p(), timeout=30)
        self._open_stage(self.stage)
        resumed = self._resume_if_group_gone()
        if resumed is not None:
            weights = "restored" if self.restored_step is not None else "initial"
            self.out.event("resumed_alone", f"no other peer serves stage {self.stage}: continuing its epoch count at "
                                            f"{resumed} with the {weights} weights",
                           stage=self.stage, epoch=resumed, restored_step=self.restored_step)
        if cfg.data:
            self.trainer = Trainer(spec, self.p2p, self.swarm.peer_id, snapshot=lambda: self._snapshot,
                                   local_stage=self.stage, local_worker=self.worker,
                                   request_timeout=cfg.request_timeout, counters=self.counters,
                                   seed=hash(self.swarm.peer_id) & 0xFFFF)
        self.state = "online"
        self._announce()
        self._last_move_at = time.monotonic()  # a join starts the cool-down, as a move does
        self._schedule_rebalance()
        maddrs = visible_maddrs(self.dht)
        self.out.event("ready", f"serving stage {self.stage} as {self.swarm.peer_id}"
                       + (" and training on " + cfg.data if cfg.data else " (no --data: serving only)"),
                       peer_id=self.swarm.peer_id, stage=self.stage, maddrs=maddrs, digest=spec.digest())

    def _start_metrics(self) -> None:
        from peer.metrics import PeerMetrics

        cfg = self.config
        self.metrics = PeerMetrics()
        try:
            port = self.metrics.serve(cfg.metrics_port, host=cfg.metrics_host)
        except OSError as err:
            raise SystemExit(f"--metrics-port {cfg.metrics_port}: cannot listen on {cfg.metrics_host}: {err}")
        url = f"http://{cfg.metrics_host}:{port}/metrics"
        self.out.event("metrics", f"Prometheus metrics at {url}", port=port, url=url)

    # --- one stage's parts: opened on start, closed on exit or on a move --------------------

    def _open_stage(self, stage: int) -> None:
        """Build stage ``stage``, restore its state, catch up with its group, start serving it."""
        spec = self.spec
        module = LlamaStage.from_spec(spec, stage)
        self.restored_step = self._restore_stage_state(stage, module)
        self._measure_capacity(stage, module)
        self.optimizer = make_stage_optimizer(spec, stage, module, self.dht)
        self._catch_up()
        self.worker = StageWorker(module, is_last=stage == spec.num_stages - 1, optimizer=self.optimizer)
        self.server = StageServer(spec, stage, self.worker, info=self._info, counters=self.counters)
        self.loop.run(self.server.start(self.p2p), timeout=30)
        self.stage = stage
        if self.trainer is not None:
            self.trainer.local_stage, self.trainer.local_worker = stage, self.worker

    def _measure_capacity(self, stage: int, module: LlamaStage) -> None:
        """The figure this peer announces for ``stage`` until it serves another one: measured
        here once (or given by --throughput), not the live rate, which swings with the load
        of the machine and made peers move back and forth (peer.capacity)."""
        if self.config.throughput is not None:
            self._capacity = float(self.config.throughput)
            return
        capacity = measure_stage_capacity(self.spec, module)
        self._capacity = capacity.samples_per_s
        self.out.event("capacity", f"stage {stage}: {capacity.samples_per_s:.1f} samples/s (best of "
                                   f"{capacity.passes} forward+backward passes, {capacity.seconds:.1f}s)",
                       stage=stage, samples_per_s=round(capacity.samples_per_s, 3), passes=capacity.passes,
                       seconds=round(capacity.seconds, 3))

    def _close_stage(self) -> None:
        """Stop serving the current stage; in-flight requests get 'busy' and are retried elsewhere."""
        if self.server is not None and self.loop is not None:
            try:
                self.loop.run(self.server.stop(), timeout=5)
            except Exception:
                pass
        if self.worker is not None:
            self.worker.shutdown()
        if self.optimizer is not None:
            try:
                self.optimizer.shutdown()
            except Exception as err:
                log.debug("optimizer shutdown: %s", err)
        self.server = None

    def _restore_stage_state(self, stage: int, module: LlamaStage) -> Optional[int]:
        """Load the newest trusted checkpoint of ``stage`` into ``module`` before it serves;
        returns its step, or None when the stage starts from the spec's init.

        Candidates are the checkpoints in ``--checkpoint-dir`` and those announced in the DHT
        (fetched over P2P from any announcer), newest step first. One is loaded only if it
        verifies: signed by the spec's trusted key(s) (trust.min_signatures), every file
        matching its signed digest, the spec digest, run id and stage matching, tensors of the
        stage's names and shapes and finite, and a step not older than one this peer held for
        the stage before (no rollback). Each refusal is an event naming the file and the check
        (``checkpoint_refused``) and leaves ``module`` untouched. The loaded checkpoint is then
        served and announced, so that later peers can fetch it from this one.
        """
        service = self._checkpoint_service()
        held = self._held_checkpoint_steps.get(stage)
        restored = service.restore(stage, module, held_step=held)
        if restored is None:
            return None
        step = restored.verified.meta.step
        self._held_checkpoint_steps[stage] = max(step, held or 0)
        return step

    def _checkpoint_service(self):
        """The peer's checkpoint side (store, server, announcer), created on first use."""
        if self.checkpoints is None:
            import tempfile

            from peer.checkpoint_store import CheckpointStore
            from peer.ckpt_transfer import CheckpointService

            root = self.config.checkpoint_dir
            if root is None:
                root = self._ckpt_tmp = tempfile.mkdtemp(prefix="swarmtrain-ckpt-")
            store = CheckpointStore(Path(root).expanduser(), self.spec)
            self.checkpoints = CheckpointService(self.spec, store, swarm=self.swarm, p2p=self.p2p, run=self.loop.run,
                                                 event=self.out.event, announce_period=self.config.announce_period,
                                                 request_timeout=self.config.request_timeout, counters=self.counters)
            self.checkpoints.start()
        return self.checkpoints

    def _start_keeper(self) -> None:
        """``run --keeper``: sign checkpoints of the whole pipeline from this peer (peer.keeper)."""
        from peer.keeper import Keeper, KeeperConfig

        cfg = self.config
        kcfg = KeeperConfig(signing_key=Path(cfg.signing_key), checkpoint_dir=Path(cfg.checkpoint_dir),
                            every=cfg.keeper_every, keep=cfg.keeper_keep, eval_data=cfg.eval_data,
                            request_timeout=max(60.0, cfg.request_timeout))
        self.keeper = Keeper(self.spec, kcfg, swarm=self.swarm, p2p=self.p2p, run=self.loop.run,
                             service=self._checkpoint_service(), event=self.out.event,
                             local_state=self._local_stage_state)
        self.keeper.start()

    def _local_stage_state(self, stage: int):
        """(epoch, parameters) of the stage this peer serves, read in its worker thread."""
        worker = self.worker
        if worker is None or self.stage != stage:
            return None
        return worker.call(lambda: (self._epoch(), {k: p.detach().clone() for k, p in worker.module.named_parameters()}),
                           timeout=60)

    def _stop_checkpoints(self) -> None:
        if self.keeper is not None:
            self.keeper.stop()
        if self.checkpoints is not None:
            self.checkpoints.stop()
        if self._ckpt_tmp is not None:
            import shutil

            shutil.rmtree(self._ckpt_tmp, ignore_errors=True)

    def _choose_stage(self) -> int:
        # Records appear within an announce period; a short wait avoids herding into stage 0.
        deadline = time.monotonic() + min(3.0, self.config.announce_period)
        while time.monotonic() < deadline and not self._snapshot:
            time.sleep(0.5)
            self._refresh_snapshot()
        return choose_stage(self._snapshot, self.spec.num_stages, my_throughput=1.0, my_peer_id=self.swarm.peer_id)

    def _catch_up(self) -> None:
        """Join the stage group at its current epoch, as far as the spec's trust policy allows.

        - A restored checkpoint's step becomes this peer's epoch first, so that live state
          older than the trusted checkpoint is never loaded over it (hivemind refuses state
          from peers behind its local epoch).
        - When the group is ahead, its live state (unsigned, from one peer of the group) is
          loaded only if ``trust.accept_untrusted_live_state`` and, when the spec trusts
          checkpoint keys, the group is at most ``trust.max_live_state_lag`` epochs ahead of
          the restored checkpoint (or of the spec's init when there is none); see
          ``peer.ckpt_transfer.live_state_verdict``.
        - Otherwise the peer keeps its trusted weights (event ``live_state_refused`` says
          why), takes the group's epoch number so that it trains in step with the group, and
          stops accepting live state for this stage: its parameters converge through the
          group's periodic parameter averaging, not by copying one untrusted peer.
        """
        from peer.ckpt_transfer import live_state_verdict

        opt, trust = self.optimizer, self.spec.trust
        tracker = opt.tracker
        if self.restored_step is not None and opt.local_epoch < self.restored_step:
            self._set_local_epoch(self.restored_step)
        tracker.fetched_global_progress_this_epoch.wait(timeout=5.0)
        group = tracker.global_epoch
        load, why = live_state_verdict(group_epoch=group, local_epoch=opt.local_epoch, trusted_step=self.restored_step,
                                       has_trusted_keys=bool(trust.trusted_keys),
                                       accept_untrusted=trust.accept_untrusted_live_state,
                                       max_lag=trust.max_live_state_lag)
        if load:
            self.out.event("catch_up", f"stage group is at epoch {group}: loading its state ({why})", epoch=group,
                           restored_step=self.restored_step)
            opt.load_state_from_peers()
        elif group > opt.local_epoch:
            self.out.event("live_state_refused", f"not loading the stage group's live state: {why}; keeping the "
                                                 f"{'checkpoint' if self.restored_step is not None else 'initial'} "
                                                 f"weights and joining at epoch {group}",
                           epoch=group, restored_step=self.restored_step, reason=why)
            opt.accept_live_state = False
            self._set_local_epoch(group)

    def _set_local_epoch(self, epoch: int) -> None:
        """Move the stage optimizer to ``epoch`` (LR schedule included) without loading state."""
        opt = self.optimizer
        opt.state_averager.local_epoch = epoch
        opt.state_averager._update_scheduler()
        opt.tracker.report_local_progress(epoch, samples_accumulated=0)
        if not opt.client_mode:
            opt.state_averager.state_sharing_priority = epoch
            if opt.use_gradient_averaging and opt.grad_averager is not None:
                opt.grad_averager.state_sharing_priority = epoch

    def _main_loop(self) -> None:
        cfg = self.config
        deadline = time.monotonic() + cfg.max_seconds if cfg.max_seconds else None
        train_future = None
        if self.trainer is not None:
            from peer.data import PackedDataset
            from peer.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(self.spec.tokenizer)
            dataset = PackedDataset(cfg.data, tokenizer, seq_len=self.spec.training.seq_len,
                                    batch_size=self.spec.training.micro_batch_size, seed=self.spec.seed,
                                    peer_key=self.swarm.peer_id, suffixes=cfg.data_suffixes)
            self._async_stop = asyncio.Event()
            train_future = self.loop.submit(self._train(dataset))
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
            if time.monotonic() - last_status >= cfg.status_every:
                last_status = time.monotonic()
                self._print_status()
        if train_future is not None:
            self.loop.loop.call_soon_threadsafe(self._async_stop.set)
            try:
                train_future.result(timeout=cfg.request_timeout * (self.spec.num_stages + 1))
            except Exception as err:
                log.warning("trainer stopped with %s", err)
        self._print_status()

    def _periodic(self) -> None:
        """Called every ~0.2 s from the main loop: the place for rebalancing and keeper work."""
        if self.config.keeper and self.keeper is None:
            self._start_keeper()
        self._note_first_contribution()
        self._maybe_rebalance()

    # --- churn: rebalancing moves and empty-stage recovery (peer.churn, peer.balancing) ------

    def _close_stage_for_move(self) -> None:
        """``_close_stage`` without waiting for the old stage group's pending update (hivemind's
        optimizer shutdown waits for its background averaging round, up to the averaging
        timeout): it would only change weights this peer is dropping. The old optimizer and its
        processes shut down in the background."""
        optimizer, self.optimizer = self.optimizer, None
        self._close_stage()
        if optimizer is not None:
            def shutdown():
                try:
                    optimizer.shutdown()
                except Exception as err:
                    log.debug("old optimizer shutdown: %s", err)

            threading.Thread(target=shutdown, name="old-stage-optimizer", daemon=True).start()

    def _checkpoints_announced(self, stage: int) -> bool:
        """Whether the swarm announces a checkpoint of ``stage`` (unverified: a hint to retry)."""
        if not self.spec.trust.trusted_keys:
            return False
        try:
            return bool(self._checkpoint_service().announcements(stage))
        except Exception:
            return False

    def _resume_if_group_gone(self) -> Optional[int]:
        """If this peer is the only one left on its stage, continue the stage's epoch count
        with the weights it has (restored or initial); returns that epoch, or None.

        The stage's previous peers may be gone while their training-progress records outlive
        them (about a minute): the optimizer would count itself epochs behind, try to load
        state from dead peers on every step and never step. Only done when the live-state
        catch-up left this peer behind *and* the signed peer records show no other online
        peer on the stage; the work lost is reported by the caller."""
        opt, worker = self.optimizer, self.worker
        group = int(opt.tracker.global_epoch)
        if group <= opt.local_epoch:
            return None
        others = [p for p in self._snapshot
                  if p.stage == self.stage and p.state == "online" and p.peer_id != self.swarm.peer_id]
        if others:
            return None  # the group is alive: hivemind's own catch-up goes on
        worker.call(lambda: self._set_local_epoch(group), timeout=60)
        if opt.use_gradient_averaging and opt.grad_averager is not None:
            worker.call(opt.grad_averager.reset_accumulated_grads_, timeout=60)
        return group

    def _note_first_contribution(self) -> None:
        """Event ``contributing``, once: the first micro-batch this peer's stage accumulated
        for its group (served) or its trainer finished (trained); how long a newcomer takes
        to become useful."""
        if self._contributed:
            return
        served = self.worker.stats.samples if self.worker is not None else 0
        trained = self.trainer.stats.microbatches if self.trainer is not None else 0
        if served or trained:
            self._contributed = True
            seconds = time.time() - self.started
            self.out.event("contributing", f"first contribution {seconds:.1f}s after start", seconds=round(seconds, 3),
                           served_samples=served, trained_microbatches=trained, stage=self.stage)

    def _rebalance_policy(self) -> RebalancePolicy:
        return RebalancePolicy(cooldown_s=self.config.rebalance_cooldown)

    def _schedule_rebalance(self) -> None:
        delay = next_check_delay(self.config.rebalance_period, self._rng)
        self._next_rebalance_at = None if delay is None else time.monotonic() + delay

    def _maybe_rebalance(self) -> None:
        """Every ~--rebalance-period seconds: move to another stage if the policy names this
        peer (a clear throughput gain, or a stage whose peers are all gone)."""
        if self.swarm is None:
            return
        snapshot = self._snapshot
        self._stage_epochs.observe(snapshot)
        if any(p.peer_id == self.swarm.peer_id for p in snapshot):  # a read that found the swarm
            self._empty_stages.observe(snapshot, self.spec.num_stages, time.monotonic())
        if self._next_rebalance_at is None or time.monotonic() < self._next_rebalance_at:
            return
        if self.stop_event.is_set() or self.state != "online":
            return
        self._schedule_rebalance()
        # A candidate's turn to refill an empty stage comes two check periods after the
        # previous one's: time enough for a mover's 'joining' record to be seen.
        turns = dict(empty_since=self._empty_stages.since, fallback_grace=2 * self.config.rebalance_period)
        planned = check_move(snapshot, self.spec.num_stages, my_peer_id=self.swarm.peer_id, my_stage=self.stage,
                             now=time.monotonic(), last_move_at=self._last_move_at, policy=self._rebalance_policy(),
                             **turns)
        if planned.target is None:
            return
        # Records may be a few seconds old: decide again on a fresh read right before moving,
        # so that a move planned on stale records never empties a stage.
        try:
            fresh = self.swarm.snapshot()
        except Exception as err:
            log.warning("not moving: the fresh snapshot failed: %s", err)
            return
        self._stage_epochs.observe(fresh)
        confirmed = check_move(fresh, self.spec.num_stages, my_peer_id=self.swarm.peer_id, my_stage=self.stage,
                               now=time.monotonic(), last_move_at=self._last_move_at, policy=self._rebalance_policy(),
                               planned=planned.target, **turns)
        if confirmed.target is None:
            self.out.event("move_cancelled", f"not moving to stage {planned.target}: {confirmed.why}",
                           to=planned.target, reason=confirmed.why)
            return
        self._move_to(confirmed.target, recovery=confirmed.recovery)

    def _move_to(self, target: int, *, recovery: bool) -> bool:
        """Serve ``target`` instead of the current stage: load its state (the newest trusted
        checkpoint, then the group's live state) before announcing it online there.

        The trainer keeps going: it routes the old stage to its other peers while this one
        closes it, and the new stage to this peer once it is open. Returns True if moved."""
        old, started = self.stage, time.monotonic()
        reason = "recovery" if recovery else "rebalance"
        last_seen = self._stage_epochs.last(target)
        self.out.event("moving", f"moving from stage {old} to stage {target} ({reason})",
                       **{"from": old, "to": target, "reason": reason})
        if not recovery:
            # The old group's next round may take this peer's accumulated samples; a recovery
            # does not wait: the pipeline is stalled until the empty stage is back.
            try:
                self._hand_back_gradients()
            except Exception as err:
                log.warning("could not hand back gradients: %s", err)
        # Announced at the target as 'joining': routers stop sending the old stage's work here
        # and send none of the new stage's yet, and the balancing policy of every other peer
        # counts this peer at the target (nobody else moves to refill the same stage).
        self.stage, self.state = target, "joining"
        self._announce()
        if self.trainer is not None:
            self.trainer.local_stage, self.trainer.local_worker = None, None
        self._close_stage_for_move()
        closed = time.monotonic()
        try:
            self._open_stage(target)
            if recovery and self.restored_step is None and self._checkpoints_announced(target):
                # The stage's signed checkpoint exists but this try failed (a broken transfer):
                # one more try before restarting a whole stage from the spec's init.
                self.out.event("restore_retry", f"stage {target} has signed checkpoints but none could be loaded; "
                                                "trying once more", stage=target)
                self._close_stage()
                self._open_stage(target)
        except Exception as err:
            log.exception("opening stage %d failed", target)
            self.out.event("move_failed", f"could not open stage {target} ({type(err).__name__}: {err}); "
                                          f"going back to stage {old}",
                           **{"from": old, "to": target, "reason": f"{type(err).__name__}: {err}"})
            self.stage = old
            self._announce()
            self._open_stage(old)
            target = old
        if recovery and target != old:
            # The group's progress records outlive its peers: the epoch they had reached.
            group_epoch = self._resume_if_group_gone()
            seen = [e for e in (last_seen, group_epoch) if e is not None]
            last_seen = max(seen) if seen else None
        self.state = "online"
        self._announce()
        self._last_move_at = time.monotonic()
        if target == old:
            return False
        seconds = time.monotonic() - started
        self.out.event("moved", f"now serving stage {target} (was {old}, {reason}) after {seconds:.1f}s, at epoch "
                                f"{self._epoch()}" + (f", restored from checkpoint step {self.restored_step}"
                                                      if self.restored_step is not None else ""),
                       **{"from": old, "to": target, "reason": reason, "seconds": round(seconds, 3),
                          "close_s": round(closed - started, 3), "open_s": round(time.monotonic() - closed, 3),
                          "epoch": self._epoch(), "restored_step": self.restored_step})
        if recovery:
            lost = epochs_lost(last_seen, self.restored_step)
            source = (f"checkpoint step {self.restored_step}" if self.restored_step is not None
                      else "the spec's initialisation (no trusted checkpoint)")
            self.out.event("recovered", f"stage {target} had no peer left: restored from {source}; "
                                        + (f"{lost} epoch(s) of its training lost (last seen at epoch {last_seen})"
                                           if lost is not None else "its last epoch was never seen"),
                           stage=target, restored_step=self.restored_step, epoch_lost=lost,
                           last_seen_epoch=last_seen, epoch=self._epoch())
        return True

    async def _train(self, dataset) -> None:
        await self.trainer.run(dataset, stop=self._async_stop, max_microbatches=self.config.max_microbatches)

    def _hand_back_gradients(self) -> None:
        """Before leaving, let the stage group's next round take the samples this peer
        accumulated, instead of dropping them; bounded by one matchmaking + averaging time."""
        opt = self.optimizer
        averager = getattr(opt, "grad_averager", None)
        if averager is None or averager.local_samples_accumulated == 0 or self.worker is None:
            return
        # Alone in the stage group: nobody to hand the samples to. The progress tracker alone
        # cannot tell: a peer that started seconds ago may not have fetched its partners'
        # progress yet (the parity test's trainer left with its samples that way, and its
        # partner waited for them forever), so the signed peer records count too.
        partners = [p for p in self._snapshot if p.stage == self.stage and p.peer_id != self.swarm.peer_id
                    and p.state in ACTIVE_STATES]
        if opt.tracker.global_progress.num_peers <= 1 and not partners:
            return
        samples, epoch = averager.local_samples_accumulated, opt.local_epoch
        budget = self.spec.training.matchmaking_time + self.spec.training.averaging_timeout
        self.out.event("handing_back", f"waiting up to {budget:.0f}s for stage {self.stage}'s averaging round to take "
                       f"{samples} accumulated samples", samples=samples, epoch=epoch)
        deadline = time.monotonic() + budget
        while time.monotonic() < deadline and opt.local_epoch == epoch and not self._second_signal:
            time.sleep(0.2)
        self.out.event("handed_back" if opt.local_epoch != epoch else "hand_back_timeout",
                       f"epoch {opt.local_epoch}" + ("" if opt.local_epoch != epoch else ": samples dropped"),
                       epoch=opt.local_epoch)

    def _shutdown(self) -> None:
        self._stop_checkpoints()
        try:
            self._hand_back_gradients()
        except Exception as err:
            log.warning("could not hand back gradients: %s", err)
        if self.swarm is not None and self.stage is not None:
            self.state = "leaving"
            try:
                self._announce(ttl=max(5.0, self.config.announce_period))
            except Exception:
                pass
        worker = self.worker
        self._close_stage()
        if worker is not None and self.config.final_state:
            from safetensors.torch import save_file

            state = {k: v.detach().contiguous() for k, v in worker.module.state_dict().items()}
            Path(self.config.final_state).parent.mkdir(parents=True, exist_ok=True)
            save_file(state, self.config.final_state, metadata={"epoch": str(self._epoch())})
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

    # --- announcements -----------------------------------------------------------------------

    def _epoch(self) -> int:
        return int(self.optimizer.local_epoch) if self.optimizer is not None else 0

    def _throughput(self) -> float:
        # Before its first stage opens, a new peer's small positive figure only lets routers
        # try it. While a moving peer loads its target stage it announces the old stage's
        # figure: the placeholder made the target still look starved, and the other peers of
        # the source stage followed one by one until they emptied it (tests/test_churn.py).
        return self._capacity or 1.0

    def _info(self) -> dict:
        return dict(state=self.state, throughput=self._throughput(), epoch=self._epoch(), version=__version__)

    def _record(self) -> PeerInfo:
        loss = None
        if self.trainer is not None and self.trainer.stats.loss_ema is not None:
            loss = float(self.trainer.stats.loss_ema)
        elif self.worker is not None and self.worker.stats.loss_ema is not None:
            loss = float(self.worker.stats.loss_ema)
        stats = self.trainer.stats if self.trainer is not None else None
        elapsed = max(1e-6, time.monotonic() - stats.started) if stats else 1.0
        return PeerInfo(peer_id=self.swarm.peer_id, stage=self.stage, state=self.state, throughput=self._throughput(),
                        epoch=self._epoch(), loss=loss, tokens=stats.tokens if stats else 0,
                        samples_per_s=(stats.samples / elapsed) if stats else 0.0, has_data=self.trainer is not None,
                        version=__version__, started=self.started)

    def _announce(self, ttl: Optional[float] = None) -> None:
        self.swarm.announce(self._record(), ttl=ttl or 3 * self.config.announce_period)

    def _refresh_snapshot(self) -> None:
        try:
            self._snapshot = self.swarm.snapshot()
        except Exception as err:
            log.debug("snapshot failed: %s", err)

    def _announcer(self) -> None:
        period = self.config.announce_period
        next_announce = 0.0
        while not self.stop_event.is_set() and self.state != "leaving":
            now = time.monotonic()
            if now >= next_announce:
                try:
                    self._announce()
                except Exception as err:
                    log.warning("announce failed: %s", err)
                next_announce = now + period
            self._refresh_snapshot()
            self.stop_event.wait(min(1.0, period / 2))

    def _print_status(self) -> None:
        per_stage = [0] * self.spec.num_stages
        for p in self._snapshot:
            if p.state == "online" and p.stage < len(per_stage):
                per_stage[p.stage] += 1
        t = self.trainer.stats if self.trainer is not None else None
        elapsed = max(1e-6, time.monotonic() - t.started) if t else 1.0
        tok_s = t.tokens / elapsed if t else 0.0
        loss = t.loss_ema if t else self.worker.stats.loss_ema
        sent = sum(self.counters.sent.values())
        text = (f"stage {self.stage} | epoch {self._epoch()} | "
                + (f"step {t.microbatches} | " if t else "")
                + (f"loss {loss:.3f} | " if loss is not None else "")
                + (f"{tok_s:,.0f} tok/s | " if t else "")
                + f"served {self.worker.stats.backward + (self.worker.stats.forward if self.worker.is_last else 0)} | "
                + f"peers/stage {per_stage} | sent {sent / 1e6:.1f} MB")
        self.out.event("status", text, stage=self.stage, epoch=self._epoch(), microbatches=t.microbatches if t else 0,
                       loss=loss, tokens=t.tokens if t else 0, tokens_per_s=tok_s, peers_per_stage=per_stage,
                       samples_accumulated=self.worker.stats.samples, retries=t.retries if t else 0,
                       bytes_sent=dict(self.counters.sent), bytes_received=dict(self.counters.received))


def run_peer(config: PeerConfig) -> int:
    peer = Peer(config)
    peer.install_signal_handlers()
    try:
        return peer.run()
    except KeyboardInterrupt:
        return 130
