"""The stage optimizer of per_step averaging: a ``BoundedOptimizer`` (hivemind.Optimizer) with
what a stage slot needs of it (``peer.averaging.stage_optimizer.StageOptimizer``): catching up
with the group's live state as far as the spec's trust allows, resuming a group whose peers are
gone, handing accumulated gradients back before leaving, and its figures.
"""

from __future__ import annotations

import functools
import time
from typing import Callable, Optional

import hivemind
import torch
from hivemind.optim.power_sgd_averager import PowerSGDGradientAverager

from peer.averaging import guards, wire_stats
from peer.averaging.bounds import MAX_EPOCH
from peer.averaging.optimizer import BoundedOptimizer, lr_lambda, make_torch_optimizer
from peer.averaging.stage_optimizer import OptimizerFigures
from peer.checkpoints.policy import live_state_verdict
from peer.net.timeouts import transfer_timeout
from protocol.codecs import gradient_compression
from protocol.records import averaging_run_id
from protocol.spec import RunSpec

__all__ = ["PerStepOptimizer", "make_stage_optimizer"]


class PerStepOptimizer(BoundedOptimizer):
    """One stage group's optimizer. ``trust``: the spec's trust section (``join``);
    ``event(name, text, **fields)``: what the slot's user is told (catch-ups, refusals)."""

    def __init__(self, *args, stage: int, trust, event: Callable, **kwargs):
        self.stage, self.trust, self.event = stage, trust, event
        self.worker = None
        super().__init__(*args, **kwargs)

    def join(self, restored_step: Optional[int]) -> None:
        """Join the stage group at its current epoch, as far as the spec's trust policy allows.

        - A restored checkpoint's step becomes this peer's epoch first, so that live state
          older than the trusted checkpoint is never loaded over it (hivemind refuses state
          from peers behind its local epoch).
        - When the group is ahead, its live state (unsigned, from one peer of the group) is
          loaded only if ``trust.accept_untrusted_live_state`` and, when the spec trusts
          checkpoint keys, the group is at most ``trust.max_live_state_lag`` epochs ahead of
          the restored checkpoint (or of the spec's init when there is none); see
          ``peer.checkpoints.policy.live_state_verdict``.
        - Otherwise the peer keeps its trusted weights (event ``live_state_refused`` says
          why), takes the group's epoch number so that it trains in step with the group, and
          stops accepting live state for this stage: its parameters converge through the
          group's periodic parameter averaging, not by copying one untrusted peer.
        """
        trust = self.trust
        if restored_step is not None and self.local_epoch < restored_step:
            self.set_local_epoch(restored_step)
        self.tracker.fetched_global_progress_this_epoch.wait(timeout=5.0)
        group = self.tracker.global_epoch
        load, why = live_state_verdict(
            group_epoch=group,
            local_epoch=self.local_epoch,
            trusted_step=restored_step,
            has_trusted_keys=bool(trust.trusted_keys),
            accept_untrusted=trust.accept_untrusted_live_state,
            max_lag=trust.max_live_state_lag,
        )
        if load:
            self.event(
                "catch_up",
                f"stage group is at epoch {group}: loading its state ({why})",
                epoch=group,
                restored_step=restored_step,
            )
            self.load_state_from_peers()
        elif group > self.local_epoch:
            weights = "checkpoint" if restored_step is not None else "initial"
            self.event(
                "live_state_refused",
                f"not loading the stage group's live state: {why}; keeping the {weights} "
                f"weights and joining at epoch {group}",
                epoch=group,
                restored_step=restored_step,
                reason=why,
            )
            self.accept_live_state = False
            self.set_local_epoch(group)

    def attach(self, worker) -> None:
        self.worker = worker

    def round_state(self, momentum: bool = False) -> None:
        return None  # the stage's own parameters, at the peer's epoch

    def resume_if_alone(self, others_online: bool) -> Optional[int]:
        """If this peer is the only one left on its stage, continue the stage's epoch count
        with the weights it has (restored or initial); returns that epoch, or None.

        The stage's previous peers may be gone while their training-progress records outlive
        them (about a minute): the optimizer would count itself epochs behind, try to load
        state from dead peers on every step and never step. Only done when the live-state
        catch-up left this peer behind *and* the signed peer records show no other online
        peer on the stage (``others_online``)."""
        group = int(self.tracker.global_epoch)
        if group <= self.local_epoch or others_online:
            return None
        self.worker.call(lambda: self.set_local_epoch(group), timeout=60)
        if self.use_gradient_averaging and self.grad_averager is not None:
            self.worker.call(self.grad_averager.reset_accumulated_grads_, timeout=60)
        return group

    def hand_back(self, *, partners: bool, budget: float, give_up: Callable[[], bool], event: Callable) -> None:
        """Let the stage group's next round take the samples this peer accumulated, instead of
        dropping them; waits up to ``budget`` seconds."""
        averager = self.grad_averager
        if averager is None or averager.local_samples_accumulated == 0:
            return
        # Alone in the stage group: nobody to hand the samples to. The progress tracker alone
        # cannot tell: a peer that started seconds ago may not have fetched its partners'
        # progress yet (the parity test's trainer left with its samples that way, and its
        # partner waited for them forever), so the signed peer records count too.
        if self.tracker.global_progress.num_peers <= 1 and not partners:
            return
        samples, epoch = averager.local_samples_accumulated, self.local_epoch
        event(
            "handing_back",
            f"waiting up to {budget:.0f}s for stage {self.stage}'s averaging round to take {samples} accumulated "
            "samples",
            samples=samples,
            epoch=epoch,
        )
        deadline = time.monotonic() + budget
        while time.monotonic() < deadline and self.local_epoch == epoch and not give_up():
            time.sleep(0.2)
        event(
            "handed_back" if self.local_epoch != epoch else "hand_back_timeout",
            f"epoch {self.local_epoch}" + ("" if self.local_epoch != epoch else ": samples dropped"),
            epoch=self.local_epoch,
        )

    def figures(self) -> OptimizerFigures:
        tracker, averager = self.tracker, self.grad_averager
        return OptimizerFigures(
            epoch=int(self.local_epoch),
            global_epoch=int(tracker.global_epoch),
            samples_accumulated=averager.local_samples_accumulated if averager is not None else None,
            allreduce=dict(self.allreduce),
            load_state_error=self.last_load_state_error,
            epoch_claims_ignored=tracker.ignored_signers,
        )


# Bytes per gradient value on the wire by codec (the 8-bit codecs' scales and PowerSGD's
# factors are small beside these).
WIRE_BYTES_PER_VALUE = {"none": 4, "fp16": 2, "uniform8bit": 1, "blockwise8bit": 1, "powersgd": 1}


def make_stage_optimizer(
    spec: RunSpec,
    stage: int,
    module: torch.nn.Module,
    dht: hivemind.DHT,
    *,
    event: Callable = lambda *a, **kw: None,
    verbose: bool = False,
) -> PerStepOptimizer:
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
    return PerStepOptimizer(
        stage=stage,
        trust=spec.trust,
        event=event,
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
