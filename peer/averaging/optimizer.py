"""Averaging inside a stage group: one hivemind.Optimizer per stage, built from the spec.

Gradients accumulate until the group reaches the spec's target batch size, are all-reduced
with the spec's codec, and every member applies the same update. With
``training.delay_optimizer_step`` the all-reduce and the update run in the background
(delayed parameter updates), so the stage keeps serving while its group averages.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
import types
from typing import Optional

import hivemind
import torch

from peer.averaging.bounds import MAX_EPOCH, BoundedProgressTracker, update_scheduler_fast
from peer.averaging.staleness import left_out_of_round, missed_round
from protocol.spec import TrainingSpec

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
        # Gradient averaging per epoch by outcome (averaged, failed, skipped, alone): hivemind
        # 1.1.12 logs the outcome and moves on; these overrides count it for /metrics.
        self.allreduce = {"averaged": 0, "failed": 0, "skipped": 0, "alone": 0}
        self._fell_back = threading.local()
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

    def _count(self, outcome: str) -> None:
        self.allreduce[outcome] += 1

    def _begin_averaging_gradients(self, grad_scaler):
        others = self.tracker.global_progress.num_peers > 1
        began = super()._begin_averaging_gradients(grad_scaler)
        if not began:
            # Alone in the group: hivemind applies the local gradients. With others but no round
            # started (an internal error, or the pre-scheduled group was used up): this epoch's
            # update is local too.
            self._count("skipped" if others else "alone")
        return began

    def _average_gradients_and_load_into_optimizer(self, maybe_step_control):
        self._fell_back.value = False
        try:
            return super()._average_gradients_and_load_into_optimizer(maybe_step_control)
        finally:
            if maybe_step_control is None:
                self._count("alone")  # hivemind: "Skipped averaging: there are no other peers"
            elif self._fell_back.value:
                self._count("failed")  # hivemind: "Averaging gradients failed ... local gradients"
            else:
                self._count("averaged")

    def _load_local_gradients_into_optimizer(self):
        """hivemind's fallback when a gradient round fails. In hivemind 1.1.12 it applies
        *zero* gradients, not the local ones: the round already moved the accumulators into
        the averager and reset them, and the fallback reloads the (now empty) accumulators.
        Meanwhile the group members whose round succeeded applied the averaged update, so this
        peer now holds other weights at the same epoch, and nothing but the next parameter
        averaging would reconcile them (or never, if it fails too). So remember it, and load
        the group's state at the next tick. Alone in the group there is nobody to differ from."""
        self._fell_back.value = True
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
