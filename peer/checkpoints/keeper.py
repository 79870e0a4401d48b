"""The keeper: periodically pulls every stage's live parameters, checks them, signs a checkpoint.

One round:

1. From the DHT snapshot, for each stage the online peers, most advanced epoch first; an epoch
   claim beyond the group's own view (its median claim, plus one) is ignored.
2. Pull the stage's parameters over ``swarmtrain.state`` (``peer.checkpoints.state_pull``): from
   one peer when it is alone on its stage, else from members until two of them agree
   (``states_agree``; in outer mode ``states_identical``: the same round, the same bits). Everything received is checked: the spec digest and stage of the reply,
   parameter names and shapes against ``peer.model.llama.stage_param_shapes``, finite values,
   total size.
3. Chain all stages in this process on a fixed held-out batch and compute the loss; refuse the
   round when it is not finite or has exploded: more than ``loss_factor`` x the previous signed
   checkpoint's loss + ``loss_margin`` (the first round compares with the spec's
   initialisation, which every peer can recompute).
4. Sign one checkpoint per stage with ``CheckpointStore.save`` (all stages of a round get the
   same step: the most advanced stage group's epoch), keep the newest ``keep``, serve them
   (``peer.checkpoints``) and announce them in the DHT.

A round is skipped when no stage group has advanced past the last signed step, so an idle
swarm does not produce a stream of identical checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch
from hivemind.p2p import P2P

from peer.base.config import KeeperConfig
from peer.checkpoints.policy import group_epoch_bound
from peer.checkpoints.state_pull import StateRejected, pull_stage_state
from peer.checkpoints.store import CheckpointStore
from peer.model.llama import LlamaStage, causal_lm_loss
from peer.swarm.view import SwarmView
from protocol import signing
from protocol.checkpoint import CheckpointRefused, VerifiedCheckpoint, verify_checkpoint
from protocol.records import PeerState
from protocol.spec import RunSpec

log = logging.getLogger("swarmtrain.keeper")


# ---------------------------------------------------------------------------------------------
# the loss check (pure)


def states_agree(a: tuple[int, dict, str], b: tuple[int, dict, str], tolerance: float) -> bool:
    """Two members' (epoch, parameters, source) describe the same group state: epochs at most one
    apart and parameters within ``tolerance`` of each other (root mean square over every
    element; ``tolerance`` is stated in parameter units, a few optimizer updates)."""
    if abs(a[0] - b[0]) > 1 or a[1].keys() != b[1].keys():
        return False
    total, count = 0.0, 0
    for name, x in a[1].items():
        y = b[1][name]
        if x.shape != y.shape:
            return False
        total += float((x.double() - y.double()).pow(2).sum())
        count += x.numel()
    return count > 0 and math.sqrt(total / count) <= tolerance


def states_identical(a: tuple[int, dict, str], b: tuple[int, dict, str]) -> bool:
    """Outer rounds: members that completed the same round hold the same bits, so two states
    agree only when their round and every tensor are identical."""
    if a[0] != b[0] or a[1].keys() != b[1].keys():
        return False
    return all(a[1][n].shape == b[1][n].shape and torch.equal(a[1][n], b[1][n]) for n in a[1])


def loss_verdict(loss: float, reference: Optional[float], *, factor: float = 1.5, margin: float = 0.5) -> Optional[str]:
    """None when ``loss`` is acceptable, else why not. ``reference``: the previous signed
    checkpoint's loss (or the initialisation's)."""
    if not math.isfinite(loss):
        return f"held-out loss is {loss}"
    if reference is not None and loss > factor * reference + margin:
        return (
            f"held-out loss {loss:.4f} exploded: more than {factor} x {reference:.4f} + {margin} "
            f"= {factor * reference + margin:.4f} (the previous checkpoint's)"
        )
    return None


@torch.no_grad()
def evaluate_loss(spec: RunSpec, states: Sequence[Mapping[str, torch.Tensor]], batch: torch.Tensor) -> float:
    """Chain all stages with the given parameters on ``batch``; the mean next-token loss."""
    x = batch
    for k, state in enumerate(states):
        module = LlamaStage.from_spec(spec, k, init=False)
        module.load_parameters(state, source=f"stage {k} state")
        x = module(x)
    return float(causal_lm_loss(x, batch))


def eval_batch(spec: RunSpec, data: Optional[str] = None, suffixes: Optional[Sequence[str]] = None) -> torch.Tensor:
    """The held-out batch: ``fixed_batch`` of ``data`` (default: the Python standard library's
    sources, which every machine has), or seeded random tokens when no text is readable."""
    from peer.data import fixed_batch, stdlib_text_path
    from peer.data.tokenizer import load_tokenizer

    batch_size, seq_len = max(8, spec.training.micro_batch_size), spec.training.seq_len
    try:
        tokenizer = load_tokenizer(spec.tokenizer)
        path = data or stdlib_text_path()
        return fixed_batch(
            path,
            tokenizer,
            seq_len=seq_len,
            batch_size=batch_size,
            seed=spec.seed + 4242,
            suffixes=suffixes if data else (suffixes or [".py"]),
        )
    except Exception as err:
        if data:
            raise
        log.warning("no text for the keeper's held-out batch (%s): using seeded random tokens", err)
        g = torch.Generator().manual_seed(spec.seed + 4242)
        return torch.randint(0, spec.model.vocab_size, (batch_size, seq_len), generator=g)


# ---------------------------------------------------------------------------------------------
# the keeper


def check_signing_key(spec: RunSpec, key_path: Path) -> tuple[str, Optional[str]]:
    """(fingerprint, warning) of the keeper's key; raises ValueError when the spec does not
    trust it at all (its checkpoints would be refused by every peer)."""
    key = signing.load_private_key(key_path)
    fp = signing.fingerprint(key)
    trusted = {signing.fingerprint(k) for k in spec.trust.trusted_keys}
    if fp not in trusted:
        raise ValueError(
            f"--signing-key {key_path} (fingerprint {fp}) is not among the spec's trusted keys "
            f"({', '.join(sorted(trusted)) or 'none'}): peers would refuse every checkpoint it signs. "
            "Add its public key to trust.trusted_keys (swarmtrain spec init --trusted-key KEY.pub)"
        )
    warning = None
    if spec.trust.min_signatures > 1:
        warning = (
            f"the spec requires {spec.trust.min_signatures} signatures: checkpoints signed by this keeper "
            "alone are not announced until co-signed (swarmtrain checkpoint sign DIR --key ...)"
        )
    return fp, warning


@dataclasses.dataclass
class RoundResult:
    step: int
    loss: float
    written: list  # WrittenCheckpoint per stage
    sources: dict[int, str]


class Keeper:
    """Runs keeper rounds every ``config.every`` seconds in a background thread.

    ``swarm``: a ``SwarmDHT`` (snapshot, peer id); ``service``: the process's
    ``CheckpointService`` (serving and announcing); ``run(coro, timeout)``: runs a coroutine on
    the P2P loop; ``local_state(stage)``: (epoch, parameters) of a stage this process serves
    itself, or None (a keeper inside ``swarmtrain run``).
    """

    def __init__(
        self,
        spec: RunSpec,
        config: KeeperConfig,
        *,
        swarm: SwarmView,
        p2p: P2P,
        run: Callable,
        service,
        event: Callable,
        local_state: Optional[Callable[[int], Optional[tuple[int, dict]]]] = None,
    ):
        self.spec, self.config, self.swarm, self.p2p, self.run = spec, config, swarm, p2p, run
        self.service, self.event, self.local_state = service, event, local_state
        self.fingerprint, warning = check_signing_key(spec, config.signing_key)
        self.store = CheckpointStore(config.checkpoint_dir, spec, key_paths=[config.signing_key], keep=config.keep)
        if warning:
            self.event("keeper_warning", warning, reason=warning)
        self.last_step: Optional[int] = None
        self.reference_loss: Optional[float] = None
        self.rounds = 0
        self._batch: Optional[torch.Tensor] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._last_skip: Optional[str] = None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._offer_existing()
        self.event(
            "keeper_started",
            f"keeper signing with key {self.fingerprint} every {self.config.every:g}s into "
            f"{self.config.checkpoint_dir} (keeping {self.config.keep})",
            fingerprint=self.fingerprint,
            checkpoint_dir=str(self.config.checkpoint_dir),
            every=self.config.every,
            keep=self.config.keep,
            last_step=self.last_step,
        )
        self._thread = threading.Thread(target=self._loop, name="keeper", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.wait(self.config.every):
            try:
                self.run_round()
            except Exception as err:  # a failed round must not end the keeper
                log.exception("keeper round failed")
                self.event(
                    "keeper_error",
                    f"keeper round failed: {type(err).__name__}: {err}",
                    reason=f"{type(err).__name__}: {err}",
                )

    def _offer_existing(self) -> None:
        """Serve and announce the newest local checkpoint of each stage that verifies, and
        continue numbering (and the loss reference) from them."""
        newest: dict[int, VerifiedCheckpoint] = {}
        for stage in range(self.spec.num_stages):
            for c in self.store.list(stage):
                try:
                    v = verify_checkpoint(c.path, self.spec, expected_stage=stage, load_tensors=False)
                except CheckpointRefused as err:
                    self.event(
                        "checkpoint_refused",
                        f"keeper: local checkpoint refused: {err.reason}",
                        stage=stage,
                        path=str(c.path),
                        reason=err.reason,
                    )
                    continue
                newest[stage] = v
                self.service.offer(v)
                break
        if newest:
            self.last_step = max(v.meta.step for v in newest.values())
        steps = {v.meta.step for v in newest.values()}
        if len(newest) == self.spec.num_stages and len(steps) == 1:
            try:
                states = [
                    self.store.load(newest[k].path, k, load_optimizer=False).model_state
                    for k in range(self.spec.num_stages)
                ]
                self.reference_loss = evaluate_loss(self.spec, states, self._eval_batch())
            except CheckpointRefused as err:
                log.warning("cannot take the loss reference from local checkpoints: %s", err)

    def _eval_batch(self) -> torch.Tensor:
        if self._batch is None:
            self._batch = eval_batch(self.spec, self.config.eval_data, self.config.eval_suffixes)
        return self._batch

    def _skip(self, reason: str, **fields) -> None:
        # Reported when the reason changes, not every round: an idle swarm is not news.
        if reason != self._last_skip:
            self.event("keeper_skip", f"keeper: no checkpoint this round: {reason}", reason=reason, **fields)
        self._last_skip = reason

    # --- one round ---------------------------------------------------------------------------

    def run_round(self) -> Optional[RoundResult]:
        spec = self.spec
        self.rounds += 1
        snapshot = self.swarm.snapshot()
        by_stage = {
            k: sorted(
                (p for p in snapshot if p.stage == k and p.state == PeerState.ONLINE),
                key=lambda p: (-p.epoch, -p.throughput, p.peer_id),
            )
            for k in range(spec.num_stages)
        }
        epochs = [p.epoch for ps in by_stage.values() for p in ps]
        floor = self.last_step if self.last_step is not None else 0
        if epochs and max(epochs) <= floor:
            # Epoch 0 is the spec's initialisation: nothing worth signing yet.
            self._skip(f"no stage group has advanced past step {floor}", step=floor)
            return None
        pulled: dict[int, tuple[int, dict, str]] = {}
        for k in range(spec.num_stages):
            got = self._pull(k, by_stage[k])
            if got is None:
                return None
            pulled[k] = got
        step = max(e for e, _, _ in pulled.values())
        if step <= floor:
            self._skip(f"no stage group has advanced past step {floor}", step=floor)
            return None
        sources = {k: src for k, (_, _, src) in pulled.items()}
        states = [pulled[k][1] for k in range(spec.num_stages)]
        reference = self.reference_loss
        if reference is None:
            reference = evaluate_loss(
                spec, [LlamaStage.from_spec(spec, k).state_dict() for k in range(spec.num_stages)], self._eval_batch()
            )
            self.reference_loss = reference
        loss = evaluate_loss(spec, states, self._eval_batch())
        why = loss_verdict(loss, reference, factor=self.config.loss_factor, margin=self.config.loss_margin)
        if why is not None:
            self._last_skip = None
            self.event(
                "keeper_refused",
                f"keeper: not signing step {step}: {why}",
                step=step,
                loss=loss,
                reference_loss=reference,
                reason=why,
                sources=sources,
            )
            return None
        tokens = sum(p.tokens for p in snapshot if p.has_data)
        written = []
        for k in range(spec.num_stages):
            w = self.store.save(k, step, states[k], tokens_seen=tokens)
            written.append(w)
            try:
                v = verify_checkpoint(w.path, spec, expected_stage=k, load_tensors=False)
            except CheckpointRefused as err:
                # With min_signatures > 1 the keeper's signature alone is not enough: kept, not announced.
                log.info("not announcing %s: %s", w.path, err.reason)
                continue
            self.service.offer(v)
        self._forget_pruned()
        self.last_step, self.reference_loss, self._last_skip = step, loss, None
        self.event(
            "checkpoint_signed",
            f"keeper: signed step {step} of {spec.num_stages} stage(s), held-out loss "
            f"{loss:.4f} (reference {reference:.4f}), digests " + ", ".join(w.manifest_digest[:12] for w in written),
            step=step,
            loss=loss,
            reference_loss=reference,
            tokens_seen=tokens,
            manifest_digests=[w.manifest_digest for w in written],
            paths=[str(w.path) for w in written],
            sources={str(k): v for k, v in sources.items()},
            fingerprint=self.fingerprint,
        )
        return RoundResult(step, loss, written, sources)

    def _pull(self, stage: int, peers) -> Optional[tuple[int, dict, str]]:
        """(epoch, parameters, source) of ``stage``, as its group vouches for it.

        A peer whose epoch claim is beyond the group's own view (the median claim of the stage's
        online peers, plus one) is not asked, and a state's epoch counts for that bound at most.
        With two or more peers online, two states must agree (``states_agree``) before one is
        signed, however many could be asked: a member cannot get its own weights signed by
        claiming the highest epoch, nor by claiming a lower one that puts the others' claims
        beyond the bound (with two members the median is the lower claim)."""
        if not peers:
            self._skip(f"stage {stage} has no online peer", stage=stage)
            return None
        bound = group_epoch_bound([p.epoch for p in peers])
        for p in peers:
            if p.epoch > bound:
                self.event(
                    "state_rejected",
                    f"keeper: stage {stage} peer {p.peer_id[:16]} claims epoch {p.epoch}, beyond its group's {bound}",
                    stage=stage,
                    peer_id=p.peer_id,
                    reason=f"epoch claim {p.epoch} > {bound}",
                )
        candidates = [p for p in peers if p.epoch <= bound]
        need = 2 if len(peers) >= 2 else 1
        errors, pulled = [], []
        for p in candidates[:4]:
            got = self._pull_one(stage, p, errors)
            if got is None:
                continue
            if got[0] > bound and got[2] != self.swarm.peer_id:  # its own stage's epoch is its own view
                # The group steps while the keeper reads: a state may be some epochs past the
                # records read a moment ago (seen refused every round when epochs took a second).
                # Its epoch counts for the bound at most, so no state raises the signed step.
                got = (bound, got[1], got[2])
            if need == 1:
                return got
            for other in pulled:
                if self._agree(got, other):
                    return other if other[0] <= got[0] else got
            pulled.append(got)
        if need == 2 and len(pulled) >= 2:
            within = (
                "bit for bit (outer rounds)" if self._outer else f"within {self.config.agree_within_updates:g} updates"
            )
            errors.append(
                f"no two of {len(pulled)} members' states agree {within} ({', '.join(src for _, _, src in pulled)})"
            )
        elif need == 2:
            beyond = [p.peer_id for p in peers if p.epoch > bound]
            errors.append(
                f"{len(pulled)} of {len(peers)} online members' states to compare, two must agree"
                + (f" (claims beyond the group's view: {', '.join(beyond)})" if beyond else "")
            )
        self._skip(f"stage {stage}: no usable state ({'; '.join(errors) or 'no peer to ask'})", stage=stage)
        return None

    @property
    def _outer(self) -> bool:
        return self.spec.training.averaging == "outer"

    def _agree(self, a, b) -> bool:
        if self._outer:
            return states_identical(a, b)
        return states_agree(a, b, self.spec.training.lr * self.config.agree_within_updates)

    def _pull_one(self, stage: int, p, errors: list) -> Optional[tuple[int, dict, str]]:
        if p.peer_id == self.swarm.peer_id:
            got = self.local_state(stage) if self.local_state is not None else None
            return None if got is None else (got[0], got[1], p.peer_id)
        try:
            epoch, tensors = self.run(
                pull_stage_state(self.p2p, p.peer_id, self.spec, stage, timeout=self.config.request_timeout),
                self.config.request_timeout + 10,
            )
            return epoch, tensors, p.peer_id
        except StateRejected as err:
            if self._stop.is_set():
                return None  # shutting down: the P2P connection is going away, not the peer
            errors.append(str(err))
            self.event(
                "state_rejected",
                f"keeper: stage {stage} state from {p.peer_id[:16]} rejected: {err}",
                stage=stage,
                peer_id=p.peer_id,
                reason=str(err),
            )
            return None

    def _forget_pruned(self) -> None:
        present = {c.path for k in range(self.spec.num_stages) for c in self.store.list(k)}
        for digest, served in self.service.server.served().items():
            if served.path.is_relative_to(self.store.root) and served.path not in present:
                self.service.server.remove(digest)
