"""A stage's optimizer in outer mode: local inner steps, and a round every ``round_seconds``.

The stage worker calls ``step``/``zero_grad`` as it does hivemind's optimizer: each micro-batch
is one inner step of the spec's optimizer on this peer's own weights. A background thread runs
the rounds: at each boundary of the shared clock (DHT time, a multiple of ``round_seconds``) it
reads the weights in the worker thread, sends the round's pseudo-gradient (the round's base
weights minus the weights now, plus the error kept from earlier rounds, compressed), and applies
the agreed aggregate to the base with Nesterov momentum. Training goes on meanwhile: the
progress made since the snapshot is kept on top of the new base. So the base weights are the
same bits on every member that completed the round, and those are what the state RPC serves
and the keeper signs (``round_state``).
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Callable, Optional

import numpy as np
import torch
from hivemind.utils import get_dht_time

from peer.averaging.contribution import NoQuorum
from peer.averaging.flat import FlatParams, round_digest
from peer.averaging.group import OuterGroup, RoundState
from peer.averaging.outer_step import OuterNesterov
from peer.averaging.rounds import RoundNet, RoundResult, run_round
from peer.averaging.sparse import SparseConfig, compress, encoded_size
from peer.averaging.stage_optimizer import OptimizerFigures, StateSnapshot
from peer.net.timeouts import outer_round_times
from protocol.rpc import MOMENTUM_PREFIX
from protocol.spec import RunSpec

log = logging.getLogger("swarmtrain.averaging")

__all__ = ["OuterOptimizer", "inner_optimizer", "DROP_REASONS"]

# Why a contribution of an applied round was left out, as /metrics labels it.
DROP_REASONS = {
    "not agreed": "not_agreed",  # announced, but not held by most members (undelivered, malformed)
    "not finite": "not_finite",
    "weight": "bad_weight",
    "points against": "opposed",
}


def drop_reason(why: str) -> str:
    return next((label for prefix, label in DROP_REASONS.items() if why.startswith(prefix)), "other")


def inner_optimizer(spec: RunSpec, params) -> torch.optim.Optimizer:
    t = spec.training
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)


class RoundCounts:
    """For /metrics: rounds by outcome, and what happened to the contributions of applied rounds."""

    def __init__(self):
        self.outcomes = {"applied": 0, "undecided": 0, "failed": 0}
        self.contributions = {"used": 0, "clipped": 0, "dropped": 0}
        self.dropped = {reason: 0 for reason in DROP_REASONS.values()}

    def applied(self, result: RoundResult) -> None:
        agg = result.aggregate
        self.outcomes["applied"] += 1
        self.contributions["used"] += len(agg.used)
        self.contributions["clipped"] += len(agg.clipped)
        self.contributions["dropped"] += len(agg.dropped)
        self.dropped["not_agreed"] += max(0, result.announced - len(result.agreed))
        for why in agg.dropped.values():
            reason = drop_reason(why)
            self.dropped[reason] = self.dropped.get(reason, 0) + 1


class OuterOptimizer:
    """The stage optimizer of outer rounds (``StageOptimizer``). ``group`` is the stage group as
    this member sees and reads it (``peer.averaging.group.OuterGroup``); None: a member on its own
    that never reads another's state (tests)."""

    def __init__(
        self,
        spec: RunSpec,
        stage: int,
        module: torch.nn.Module,
        net: Optional[RoundNet],
        *,
        group: Optional[OuterGroup] = None,
        event: Callable,
    ):
        self.spec, self.stage, self.module, self.net, self.group, self.event = spec, stage, module, net, group, event
        o = spec.training.outer
        self.config = SparseConfig(chunk=o.chunk, k=o.k, bits=o.bits)
        numel = sum(p.numel() for p in module.parameters() if p.requires_grad)
        # The spec's deadlines, lengthened to what this stage's contributions need on a slow
        # line (peer.net.timeouts): the same on every member, since they follow from the spec.
        self.gather_s, self.agree_s = outer_round_times(
            o.round_seconds, o.gather_seconds, o.agree_seconds, encoded_size(numel, self.config)
        )
        self.outer = OuterNesterov(lr=o.outer_lr, momentum=o.outer_momentum)
        self.flat = FlatParams(module)
        self.params, self.names = self.flat.params, self.flat.names
        self.inner = inner_optimizer(spec, self.params)
        self.base = self.flat.read()  # the round's starting weights: the same on every member
        self.error = np.zeros_like(self.base)
        self.local_epoch = 0  # rounds applied
        self.digest = round_digest(self.base)
        self.samples = 0  # samples of inner steps since the last snapshot
        self.counts = RoundCounts()
        self.worker = None
        self.history = {0: self.digest[:16]}  # round -> base digest (16 hex) after it
        self._missed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # --- the stage worker's side (its thread) --------------------------------------------------

    def step(self, batch_size: int = 1, **_) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, self.spec.training.grad_clip or math.inf)
        self.inner.step()
        with self._lock:
            self.samples += int(batch_size)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def tick(self) -> None:
        """Rounds run on their own thread: an idle worker has nothing to do here."""

    def round_state(self, momentum: bool = False) -> StateSnapshot:
        """(names, tensors, round) of the base weights, and with ``momentum`` the outer
        momentum as ``outer_momentum/<name>``: what the state RPC serves."""
        with self._lock:
            base, epoch = self.base.copy(), self.local_epoch
            buffer = self.outer.buffer.copy() if self.outer.buffer is not None else np.zeros_like(base)
        names, tensors = list(self.names), self.flat.split(base)
        if momentum:
            names += [MOMENTUM_PREFIX + n for n in self.names]
            tensors += self.flat.split(buffer)
        return names, tensors, epoch

    def adopt(self, state: RoundState) -> None:
        """Take the group's round state (base weights, and outer momentum when the group serves
        it; without, the buffer starts empty, as it does not enter a step with momentum 0): from
        here on this peer holds the group's bits. Its own progress since its last base is dropped
        (after a missed round it may already be in the group's update)."""
        base = state.base.copy()
        if self.worker is not None:  # training: the weights change in the worker's thread only
            self.worker.call(lambda: self.flat.write(base), timeout=60)
        else:
            self.flat.write(base)
        with self._lock:
            self.base, self.local_epoch = base, int(state.round)
            self.outer.buffer = None if state.momentum is None else state.momentum.copy()
            self.error = np.zeros_like(base)
            self.samples = 0
            self.digest = round_digest(base)
            self.history = {}
            self._remember()

    # --- the group: joining, catching up --------------------------------------------------------

    def join(self, restored_step: Optional[int] = None) -> None:
        """Take the round state the group serves before training: a member that trained elsewhere
        would never hold the group's bits. A group that already holds this member's bits (peers
        that start together from the spec's init or one checkpoint) is joined by taking its round
        count, without a read. Outer rounds start from the restored (or initial) weights: the
        restored step is the checkpoint's, not a round count."""
        if self.group is None:
            return
        skipped = self.group.rounds_behind_on_same_bits(self.history)
        if skipped is not None:
            self.count_rounds_as_group(skipped)
            self.event(
                "outer_joined",
                f"stage {self.stage}: the group holds this peer's bits (round {self.local_epoch}, base "
                f"{self.digest[:16]}); nothing to read",
                stage=self.stage,
                epoch=self.local_epoch,
                digest=self.digest,
                sources=[],
            )
            return
        got = self.group.read("join", round_busy_s=self.gather_s + self.agree_s)
        if got is None:
            return
        self.adopt(got)
        self.event(
            "outer_joined",
            f"stage {self.stage}: joined the group at round state {got.round} (base {got.digest[:16]}, from "
            f"{', '.join(pid[:16] for pid in got.sources)})",
            stage=self.stage,
            epoch=got.round,
            digest=got.digest,
            sources=list(got.sources),
        )

    def _why_behind(self) -> Optional[str]:
        """Why this member holds other bits than its group (``OuterGroup.behind`` on its mates'
        records), or None; a group that holds its bits at a later count is followed in count."""
        if self.group is None:
            return None
        try:
            skipped = self.group.rounds_behind_on_same_bits(self.history)
            if skipped:
                self.count_rounds_as_group(skipped)
                self.event(
                    "outer_recounted",
                    f"stage {self.stage}: the group holds this peer's bits {skipped} round(s) later; now at round "
                    f"{self.local_epoch}",
                    stage=self.stage,
                    epoch=self.local_epoch,
                    rounds=skipped,
                )
            return self.group.behind(self.history, self.local_epoch)
        except Exception as err:  # the DHT may be unreachable for a while: ask again next round
            log.debug("stage %d: reading the members' records failed: %s", self.stage, err)
            return None

    def catch_up(self, why: str = "a missed round") -> None:
        """After a missed round, or when the members' records show this member holds other bits:
        adopt the group's round state when it is ahead of this member's (the others applied a
        round it did not), or of its round with other bits; otherwise keep its own."""
        try:
            got = self.group.read("resync", round_busy_s=self.gather_s + self.agree_s) if self.group else None
        except Exception as err:
            log.warning("stage %d: reading the group's round state failed: %s", self.stage, err)
            return
        self._missed = False
        if got is None or got.round < self.local_epoch:
            return
        if got.round == self.local_epoch and got.digest == self.digest:
            return
        self.adopt(got)
        self.event(
            "outer_resynced",
            f"stage {self.stage}: took the group's round state {got.round} (base {self.digest[:16]}) after {why}",
            epoch=got.round,
            digest=self.digest,
            why=why,
        )

    def count_rounds_as_group(self, behind: int) -> None:
        """Count ``behind`` more rounds without changing a bit: the group holds this member's bits
        but counts rounds that applied nothing, or it joined late
        (``peer.averaging.group.rounds_behind_on_same_bits``)."""
        if behind <= 0:
            return
        with self._lock:
            self.local_epoch += behind
            self.history = {r + behind: d for r, d in self.history.items()}

    def _remember(self) -> None:
        """Keep the last rounds' digests: the mates' records may lag this member by a round."""
        self.history[self.local_epoch] = self.digest[:16]
        for old in sorted(self.history)[:-8]:
            del self.history[old]

    # --- rounds (a background thread) ------------------------------------------------------------

    def attach(self, worker) -> None:
        self.worker = worker
        self._thread = threading.Thread(target=self._loop, name=f"outer-rounds-{self.stage}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        period = self.spec.training.outer.round_seconds
        while not self._stop.is_set():
            round_ = int(get_dht_time() // period) + 1
            if self._stop.wait(max(0.0, round_ * period - get_dht_time())):
                return
            try:
                self._round(round_)
            except Exception as err:  # a round that fails is skipped; the next one comes
                self.counts.outcomes["failed"] += 1
                self._missed = True
                log.exception("outer round %d failed", round_)
                self.event(
                    "outer_round_failed", f"stage {self.stage}: outer round {round_} failed: {err}", round=round_
                )
            why = "a missed round" if self._missed else self._why_behind()
            if why:
                self.catch_up(why)

    def _round(self, round_: int) -> None:
        snapshot = self.worker.call(self.flat.read, timeout=60)
        with self._lock:
            weight, self.samples = self.samples, 0
        delta = self.base - snapshot
        update, error = compress(delta, self.error, self.config)
        try:
            result = run_round(
                self.net,
                round_,
                update.to_bytes(),
                float(max(weight, 1)),
                numel=self.base.size,
                config=self.config,
                max_weight=None,
                gather_s=self.gather_s,
                agree_s=self.agree_s,
            )
        except NoQuorum as err:
            self.counts.outcomes["undecided"] += 1
            self._missed = True
            with self._lock:
                self.samples += weight
            self.event("outer_round_undecided", f"stage {self.stage}: round {round_} undecided: {err}", round=round_)
            return
        self.error = error
        new_base = self.outer.step(self.base, result.aggregate.update)

        def apply() -> None:
            # Progress made since the snapshot stays on top of the new base.
            self.flat.write(new_base + (self.flat.read() - snapshot))

        self.worker.call(apply, timeout=60)
        with self._lock:
            self.base, self.local_epoch = new_base, self.local_epoch + 1
            self.digest = round_digest(new_base)
            self._remember()
        self.counts.applied(result)
        agg = result.aggregate
        self.event(
            "outer_round",
            f"stage {self.stage}: round {round_} applied ({len(result.agreed)} contributions, "
            f"{len(agg.clipped)} clipped, {len(agg.dropped)} dropped), base {self.digest[:16]}",
            round=round_,
            epoch=self.local_epoch,
            contributions=len(result.agreed),
            clipped=len(agg.clipped),
            dropped=len(agg.dropped),
            digest=self.digest,
        )

    # --- what others read, and leaving ------------------------------------------------------------

    def figures(self) -> OptimizerFigures:
        counts = self.counts
        return OptimizerFigures(
            epoch=self.local_epoch,
            state_digest=self.digest[:16],
            rounds=dict(counts.outcomes),
            contributions=dict(counts.contributions),
            dropped=dict(counts.dropped),
        )

    def resume_if_alone(self, others_online: bool) -> Optional[int]:
        """Outer rounds keep no group progress records to outlive their members: nothing to resume."""
        return None

    def hand_back(self, *, partners: bool, budget: float, give_up: Callable[[], bool], event: Callable) -> None:
        """Progress since the last round leaves with this peer: the group's rounds go on without it."""

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.net is None:
            return
        try:
            self.net.run(self.net.stop(), 10)
        except Exception as err:
            log.debug("outer rounds: stopping the RPC: %s", err)
