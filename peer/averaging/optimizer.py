"""Averaging inside a stage group: one hivemind.Optimizer per stage, built from the spec.

Gradients accumulate until the group reaches the spec's target batch size, are all-reduced
with the spec's codec, and every member applies the same update. With
``training.delay_optimizer_step`` the all-reduce and the update run in the background
(delayed parameter updates), so the stage keeps serving while its group averages.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import signal
import threading
import time
import types
from typing import Optional

import hivemind
import torch
from hivemind.optim.power_sgd_averager import PowerSGDGradientAverager

from peer.averaging import guards, wire_stats
from peer.averaging.bounds import MAX_EPOCH, BoundedProgressTracker, update_scheduler_fast
from peer.averaging.staleness import left_out_of_round, missed_round
from peer.net.timeouts import transfer_timeout
from protocol.codecs import gradient_compression
from protocol.records import averaging_run_id
from protocol.spec import RunSpec, TrainingSpec

log = logging.getLogger("swarmtrain.averaging")


def make_torch_optimizer(params, training: TrainingSpec) -> torch.optim.Optimizer:
    if training.optimizer == "adamw":
        opt = torch.optim.AdamW(
            params, lr=training.lr, betas=training.betas, eps=training.eps, weight_decay=training.weight_decay
        )
    elif training.optimizer == "adamw8bit":
        import bitsandbytes as bnb  # optional optimizer-memory saver; works on CPU from 0.50

        opt = bnb.optim.AdamW8bit(
            params, lr=training.lr, betas=training.betas, eps=training.eps, weight_decay=training.weight_decay
        )
    else:
        opt = torch.optim.SGD(params, lr=training.lr, weight_decay=training.weight_decay)
    _clip_before_step(opt, training.grad_clip)
    return opt


def _clip_before_step(opt: torch.optim.Optimizer, max_norm: float) -> None:
    """Clip the (averaged) gradients the optimizer is about to apply (``max_norm`` 0: no clip).
    The clip is per stage: each stage group only sees its own gradients.

    A step whose gradients are not finite is skipped: hivemind's all-reduce divides by the
    total weight it received, so a partial round in which only zero-weight parts arrived
    (a peer tagging along, the other sender timed out) yields 0/0 = NaN gradients, and one
    such step would make every weight of the stage NaN for good."""
    step = opt.step

    def clipped_step(self, *args, **kwargs):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
        if not torch.isfinite(norm):
            log.warning("skipping an optimizer step: the averaged gradients are not finite (norm %s)", float(norm))
            return None
        return step(*args, **kwargs)

    # A bound method: torch's LR scheduler wraps optimizer.step and needs __func__/__self__.
    opt.step = types.MethodType(clipped_step, opt)


def lr_lambda(training: TrainingSpec):
    warmup, total, kind = training.warmup_steps, training.total_steps, training.lr_schedule

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@contextlib.contextmanager
def _keeping_sigint_handler():
    """hivemind's averagers set SIGINT to SIG_IGN in the *calling* process before they fork
    (``DecentralizedAverager.run_in_background``): the peer would then ignore Ctrl-C and
    ``Cluster.stop``'s SIGINT and only die by SIGKILL, without its clean shutdown. Keep the
    caller's handler; the forked averagers still ignore SIGINT, as hivemind intends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if handler is not None:
            signal.signal(signal.SIGINT, handler)


class BoundedOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer whose catch-up gives up after a few tries instead of retrying
    forever (hivemind 1.1.12 loops until it succeeds), and which can be told not to take
    live state from untrusted peers at all."""

    def __init__(
        self,
        *args,
        load_state_attempts: int = 3,
        accept_live_state: bool = True,
        max_epoch_lead: int = MAX_EPOCH,
        **kwargs,
    ):
        self.max_epoch_lead = max_epoch_lead  # peer.averaging.bounds
        self.load_state_attempts = load_state_attempts
        self.accept_live_state = accept_live_state
        self.last_load_state_error: Optional[str] = None
        # Set when this peer's gradient round failed while its group had other members: the
        # others may have applied the averaged update, this peer did not (see
        # _load_local_gradients_into_optimizer); it catches up from them at its next tick.
        self.missed_group_update = False
        with _keeping_sigint_handler():
            super().__init__(*args, **kwargs)

    def _make_progress_tracker(self, target_batch_size: int, **kwargs) -> BoundedProgressTracker:
        return BoundedProgressTracker(
            dht=self.dht,
            prefix=self.run_id,
            target_batch_size=target_batch_size,
            client_mode=self.client_mode,
            status_loglevel=self.status_loglevel,
            start=True,
            max_epoch_lead=self.max_epoch_lead,
            **kwargs,
        )

    def _make_state_averager(self, **kwargs):
        averager = super()._make_state_averager(**kwargs)
        averager._update_scheduler = types.MethodType(update_scheduler_fast, averager)
        return averager

    def tick(self) -> None:
        """What ``step`` does besides accumulating: catch up when behind, and join the group's
        round once the group reached its target batch size.

        hivemind advances an epoch only inside ``step``; a stage peer that got no micro-batch
        lately would otherwise miss its group's round and fall behind."""
        if self.auxiliary:
            return
        if self._should_load_state_from_peers():
            self.load_state_from_peers()
            return
        # No pre-scheduling here (an idle peer would open a matchmaking round every tick), and
        # no time-based transition either: hivemind's ETA rule would make an idle group step
        # on empty gradients. Only real progress counts: the group reached its target batch,
        # or others already moved to the next epoch.
        tracker = self.tracker
        why = left_out_of_round(
            local_epoch=tracker.local_progress.epoch,
            group_epoch=tracker.global_epoch,
            local_samples=tracker.local_progress.samples_accumulated,
        )
        if why is not None:
            log.info("%s; loading its state", why)
            self.load_state_from_peers()
            return
        if (
            tracker.global_epoch > tracker.local_progress.epoch
            or tracker.global_progress.samples_accumulated >= self.target_batch_size
        ):
            self._update_global_epoch(None)

    def _load_local_gradients_into_optimizer(self):
        """hivemind's fallback when a gradient round fails. In hivemind 1.1.12 it applies
        *zero* gradients, not the local ones: the round already moved the accumulators into
        the averager and reset them, and the fallback reloads the (now empty) accumulators.
        Meanwhile the group members whose round succeeded applied the averaged update, so this
        peer now holds other weights at the same epoch, and nothing but the next parameter
        averaging would reconcile them (or never, if it fails too). So remember it, and load
        the group's state at the next tick. Alone in the group there is nobody to differ from."""
        if self.tracker.global_progress.num_peers > 1:
            self.missed_group_update = True
        super()._load_local_gradients_into_optimizer()

    def _should_load_state_from_peers(self) -> bool:
        """hivemind's rule (exact sync once per epoch, else catch up when 2+ epochs behind),
        plus: a peer one epoch behind whose group already has a whole batch for its next round
        missed its own round; its gradients are stale and must not join the next one
        (``peer.averaging.staleness.missed_round``). Loading state drops them."""
        if super()._should_load_state_from_peers():
            return True
        if self.missed_group_update:
            self.missed_group_update = False
            if self.tracker.global_progress.num_peers > 1:
                log.warning("this peer's gradient round failed while its group went on; loading the group's state")
                return True
        tracker = self.tracker
        why = missed_round(
            local_epoch=self.local_epoch,
            group_epoch=tracker.global_epoch,
            group_samples=tracker.global_progress.samples_accumulated,
            target=self.target_batch_size,
        )
        if why is not None:
            log.info(
                "out of sync with the stage group: %s; dropping %d accumulated samples and catching up",
                why,
                self.tracker.local_progress.samples_accumulated,
            )
            return True
        return False

    def _join_epoch_without_state(self) -> None:
        """The trust policy forbids copying unsigned state from a peer: keep our parameters
        and take the group's epoch, so that we train in step with the group instead of asking
        again on every step; the group's parameter averaging reconciles the weights."""
        if self.tracker.global_epoch <= self.local_epoch:
            return
        log.info(
            "not loading live state from peers (the spec's trust policy forbids it): joining epoch %d with "
            "this peer's own parameters",
            self.tracker.global_epoch,
        )
        self.state_averager.step(wait_for_delayed_updates=True)
        self.set_local_epoch(self.tracker.global_epoch)
        self._drop_accumulated_gradients()

    def set_local_epoch(self, epoch: int) -> None:
        """Move to ``epoch`` (LR schedule included) without loading anyone's state: after a
        restored checkpoint, or to train in step with a group whose state is not trusted."""
        self.state_averager.local_epoch = epoch
        self.state_averager._update_scheduler()
        self.tracker.report_local_progress(epoch, samples_accumulated=0)
        if not self.client_mode:
            self.state_averager.state_sharing_priority = epoch
            if self.use_gradient_averaging and self.grad_averager is not None:
                self.grad_averager.state_sharing_priority = epoch

    def _drop_accumulated_gradients(self) -> None:
        """Gradients computed on parameters the group has moved past: never averaged in."""
        if self.use_gradient_averaging and self.grad_averager is not None:
            self.grad_averager.reset_accumulated_grads_()
        self.tracker.report_local_progress(local_epoch=self.local_epoch, samples_accumulated=0)

    def load_state_from_peers(self, **kwargs):
        if not self.accept_live_state:
            self._join_epoch_without_state()
            return
        if self.scheduled_grads is not None and not self.scheduled_grads.done():
            self._tag_along_with_zero_weight(self.scheduled_grads)
            self.scheduled_grads = None
        self.state_averager.step(wait_for_delayed_updates=True)
        with self.tracker.pause_updates():
            for attempt in range(1, self.load_state_attempts + 1):
                try:
                    self.state_averager.load_state_from_peers(timeout=self.load_state_timeout, **kwargs)
                    if self.grad_averager is not None:
                        self.grad_averager.load_state_from_peers(timeout=self.load_state_timeout, **kwargs)
                    self.last_load_state_error = None
                    break
                except KeyboardInterrupt:
                    raise
                except BaseException as err:
                    self.last_load_state_error = f"{type(err).__name__}: {err}"
                    log.warning(
                        "loading state from peers failed (attempt %d/%d): %s",
                        attempt,
                        self.load_state_attempts,
                        self.last_load_state_error,
                    )
                    time.sleep(min(2.0 * attempt, 5.0))
            else:
                # Behind and unable to catch up: the accumulated gradients are stale all the same.
                self._drop_accumulated_gradients()
                return
            if self.tracker.global_epoch - 1 <= self.local_epoch < self.tracker.global_epoch:
                self.state_averager.local_epoch = self.tracker.global_epoch
            self.tracker.report_local_progress(local_epoch=self.local_epoch, samples_accumulated=0)
            if not self.client_mode:
                self.state_averager.state_sharing_priority = self.local_epoch
            if self.use_gradient_averaging:
                self.grad_averager.reset_accumulated_grads_()
                if not self.client_mode:
                    self.grad_averager.state_sharing_priority = self.local_epoch


# Bytes per gradient value on the wire by codec (the 8-bit codecs' scales and PowerSGD's
# factors are small beside these).
WIRE_BYTES_PER_VALUE = {"none": 4, "fp16": 2, "uniform8bit": 1, "blockwise8bit": 1, "powersgd": 1}


def make_stage_optimizer(
    spec: RunSpec, stage: int, module: torch.nn.Module, dht: hivemind.DHT, *, verbose: bool = False
) -> BoundedOptimizer:
    wire_stats.install_from_env()  # opt-in byte counts for benchmarks; before the averagers fork
    guards.install(max_weight=spec.training.target_batch_size)  # hostile parts; before the fork too
    training, compression = spec.training, spec.compression
    params = [p for p in module.parameters() if p.requires_grad]
    grad_averager_factory = None
    if compression.gradients == "powersgd":
        # hivemind 1.1.12 has no PowerSGDGradientAverager.get_factory: the factory is any callable.
        grad_averager_factory = functools.partial(PowerSGDGradientAverager, averager_rank=compression.powersgd_rank)
    delayed = training.delay_optimizer_step
    # With trusted checkpoints a joiner restores one near the group first; a group claiming
    # to be further ahead than live state may be (trust.max_live_state_lag) is lying.
    lead = spec.trust.max_live_state_lag if spec.trust.trusted_keys else MAX_EPOCH
    # The spec's timings, lengthened to what this stage's bytes need on a slow line
    # (peer.net.timeouts): an all-reduce sends and receives about the gradients' wire size, and
    # a joiner downloads weights and the two Adam moments in float32.
    numel = sum(p.numel() for p in params)
    averaging_timeout = max(
        training.averaging_timeout, transfer_timeout(2 * numel * WIRE_BYTES_PER_VALUE[compression.gradients])
    )
    load_state_timeout = max(30.0, averaging_timeout, transfer_timeout(3 * 4 * numel))
    return BoundedOptimizer(
        max_epoch_lead=lead,
        dht=dht,
        run_id=averaging_run_id(spec.run_id, spec.digest(), stage),
        target_batch_size=training.target_batch_size,
        batch_size_per_step=training.micro_batch_size,
        params=params,
        optimizer=lambda ps: make_torch_optimizer(ps, training),
        scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(training)),
        matchmaking_time=training.matchmaking_time,
        averaging_timeout=averaging_timeout,
        # A group member that starts its part of the all-reduce a few seconds late (it learns
        # that the group reached the target at its next progress refresh, or after the request
        # it is serving) is waited for, not dropped after matchmaking_time: a dropped part is a
        # partial round in which the two sides apply different updates.
        next_chunk_timeout=max(training.matchmaking_time, averaging_timeout / 2),
        load_state_timeout=load_state_timeout,
        delay_optimizer_step=delayed,
        delay_grad_averaging=delayed and grad_averager_factory is None,
        average_state_every=training.average_state_every,
        grad_compression=gradient_compression(
            compression.gradients, min_compressed_size=compression.min_compressed_size
        ),
        grad_averager_factory=grad_averager_factory,
        state_averaging_compression=gradient_compression("fp16"),
        load_state_compression=hivemind.compression.NoCompression(),
        accept_live_state=spec.trust.accept_untrusted_live_state,
        verbose=verbose,
        tracker_opts=dict(
            min_refresh_period=0.5, max_refresh_period=min(1.0, training.matchmaking_time), default_refresh_period=1.0
        ),
    )
