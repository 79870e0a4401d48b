"""A trainer's side of teachers: whom to ask for a micro-batch's soft targets, and whom to trust.

Routing is a stage's: teachers are drawn weighted by throughput (announced, capped, then
measured) over their load, a teacher that fails is banned for a growing time and the request
goes to another, and the whole fetch has one deadline. Without a usable teacher the answer is
None: the micro-batch trains on its labels alone, as a run without a teacher does.

Trust (``peer.teach.trust``): a ``distill.spot_check`` fraction of micro-batches also goes to a
second teacher holding the same weights; two answers that disagree go to a third, and a
teacher outvoted there is banned for good and reported (an event, ``/metrics``, and this
trainer's ``teacherbans`` DHT record that ``status`` and the dashboard show). With no third
teacher online the two are both set aside, their dispute kept, until a third can decide.
Every answer is decoded with the hostile-input rules (``protocol.soft_targets.decode``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from hivemind.p2p import P2P

from peer.net import RemoteError, WireCounters, call, split_message
from peer.pipeline.routing import BanList, ThroughputEMA, announced_prior, capped_priors, choose_peer
from peer.teach.trust import AGREE_DISTANCE, distance, verdict
from protocol import soft_targets
from protocol.codecs import TensorRejected, encode
from protocol.messages_pb2 import TeachRequest, TeachResponse
from protocol.records import TeacherInfo
from protocol.rpc import TEACH, ErrorCode
from protocol.soft_targets import SoftTargets
from protocol.spec import RunSpec

log = logging.getLogger("swarmtrain.teach")

__all__ = ["Dispute", "TeacherClient", "TeacherClientStats"]

# Disputes kept while they wait for a third teacher (each holds one micro-batch of ids and two answers).
MAX_DISPUTES = 16


@dataclass
class TeacherClientStats:
    requests: dict = field(default_factory=dict)  # outcome ("ok", "failed") -> count
    spot_checks: dict = field(default_factory=dict)  # result ("agree", "disagree", "incomplete") -> count
    no_teacher: int = 0  # micro-batches that found no usable teacher
    bytes: int = 0  # soft-target bytes received (the answers' payload)
    tokens: int = 0  # tokens those bytes cover

    def count(self, table: dict, key: str) -> None:
        table[key] = table.get(key, 0) + 1


@dataclass
class Dispute:
    """Two teachers of one weights digest that answered the same ids differently."""

    digest: str
    ids: torch.Tensor
    answers: dict  # peer id -> (ids, logprobs)


class TeacherClient:
    """Called once per micro-batch by the trainer (``Trainer(soft_targets=...)``)."""

    def __init__(
        self,
        spec: RunSpec,
        p2p: P2P,
        *,
        teachers: Callable[[], Sequence[TeacherInfo]],
        counters: Optional[WireCounters] = None,
        event: Callable = lambda *a, **k: None,
        timeout: float = 30.0,
        seed: int = 0,
    ):
        if spec.distill is None:
            raise ValueError("a TeacherClient needs a spec with a [distill] section")
        self.spec, self.p2p, self.teachers = spec, p2p, teachers
        self.distill = spec.distill
        self.digest = spec.digest()
        self.counters = counters or WireCounters()
        self.event, self.timeout = event, timeout
        self.rng = random.Random(seed)
        self.failures = BanList()
        self.ema = ThroughputEMA()
        self.inflight: dict[str, int] = {}
        self.stats = TeacherClientStats()
        self.banned: dict[str, str] = {}  # peer id -> why (outvoted in a spot check: never asked again)
        self.suspended: set[str] = set()  # in a dispute no third teacher has decided yet
        self.disputes: list[Dispute] = []

    # --- the trainer's call ------------------------------------------------------------------

    async def __call__(self, ids: torch.Tensor) -> Optional[SoftTargets]:
        try:
            return await asyncio.wait_for(self._soft_targets(ids), self.timeout)
        except asyncio.TimeoutError:
            self.stats.no_teacher += 1
            return None
        except asyncio.CancelledError:
            raise
        except Exception:  # a micro-batch never fails for its teacher: it trains on its labels
            log.exception("fetching soft targets failed")
            self.stats.no_teacher += 1
            return None

    async def _soft_targets(self, ids: torch.Tensor) -> Optional[SoftTargets]:
        await self._settle_disputes()
        tried: list[str] = []
        while True:
            primary = self._pick(exclude=tried)
            if primary is None:
                self.stats.no_teacher += 1
                return None
            checker = None
            if self.distill.spot_check > 0 and self.rng.random() < self.distill.spot_check:
                checker = self._pick(digest=primary.model_digest, exclude=[primary.peer_id, *tried])
            if checker is None:
                got = await self._ask(primary, ids)
                if got is not None:
                    return got
                tried.append(primary.peer_id)
                continue
            a, b = await asyncio.gather(self._ask(primary, ids), self._ask(checker, ids))
            if a is None or b is None:
                self.stats.count(self.stats.spot_checks, "incomplete")
                if a is not None or b is not None:
                    return a if a is not None else b
                tried += [primary.peer_id, checker.peer_id]
                continue
            if distance(_pair(a), _pair(b)) <= AGREE_DISTANCE:
                self.stats.count(self.stats.spot_checks, "agree")
                return a
            self.stats.count(self.stats.spot_checks, "disagree")
            dispute = Dispute(primary.model_digest, ids, {primary.peer_id: a, checker.peer_id: b})
            return await self._decide(dispute)

    # --- disputes ----------------------------------------------------------------------------

    async def _decide(self, dispute: Dispute) -> Optional[SoftTargets]:
        """Ask a third teacher of the same weights; without one, set the two aside."""
        third = self._pick(digest=dispute.digest, exclude=list(dispute.answers))
        answer = await self._ask(third, dispute.ids) if third is not None else None
        if answer is None:
            for peer in dispute.answers:
                if peer not in self.suspended:
                    self.suspended.add(peer)
                    self.event(
                        "teacher_suspended",
                        f"teacher {peer} disagrees with another of weights {dispute.digest[:16]} and no third "
                        "teacher can decide yet: both set aside",
                        peer_id=peer,
                        digest=dispute.digest,
                    )
            self.disputes = [dispute, *self.disputes][:MAX_DISPUTES]
            return None
        dispute.answers[third.peer_id] = answer
        return self._apply(dispute)

    def _apply(self, dispute: Dispute) -> Optional[SoftTargets]:
        found = verdict({p: _pair(a) for p, a in dispute.answers.items()})
        for peer in found.outvoted:
            self.suspended.discard(peer)
            self._ban(peer, dispute.digest, f"outvoted by {len(found.trusted)} teachers of the same weights")
        for peer in found.trusted:
            if peer in self.suspended:
                self.suspended.discard(peer)
                self.event("teacher_restored", f"teacher {peer} was right: in use again", peer_id=peer)
        if found.undecided:
            self.suspended |= set(found.undecided)
            self.disputes = [dispute, *self.disputes][:MAX_DISPUTES]
            return None
        return dispute.answers[sorted(found.trusted)[0]]

    async def _settle_disputes(self) -> None:
        """A dispute waiting for a third teacher gets one as soon as one is usable."""
        for dispute in list(self.disputes):
            third = self._pick(digest=dispute.digest, exclude=list(dispute.answers))
            if third is None:
                continue
            answer = await self._ask(third, dispute.ids)
            if answer is None:
                continue
            self.disputes.remove(dispute)
            dispute.answers[third.peer_id] = answer
            self._apply(dispute)

    def _ban(self, peer: str, digest: str, why: str) -> None:
        if peer in self.banned:
            return
        self.banned[peer] = why
        log.warning("teacher %s banned: its soft targets for weights %s were %s", peer, digest[:16], why)
        self.event("teacher_banned", f"teacher {peer} banned: {why}", peer_id=peer, digest=digest, reason=why)

    # --- routing and one request -------------------------------------------------------------

    def usable(self) -> list[TeacherInfo]:
        return [
            t
            for t in self.teachers()
            if t.state == "online"
            and self.distill.accepts(t.model_digest)
            and t.peer_id not in self.banned
            and t.peer_id not in self.suspended
        ]

    def _pick(self, *, digest: Optional[str] = None, exclude: Sequence[str] = ()) -> Optional[TeacherInfo]:
        now = time.monotonic()
        by_id = {t.peer_id: t for t in self.usable() if digest is None or t.model_digest == digest}
        candidates = [
            (p, announced_prior(t.throughput, bool(t.via)), self.inflight.get(p, 0))
            for p, t in by_id.items()
            if p not in exclude
        ]
        candidates = [
            (p, self.ema.get(p, prior), load) for p, prior, load in capped_priors(candidates, self.ema.known())
        ]
        choice = choose_peer(candidates, banned=self.failures.banned(now), rng=self.rng)
        return by_id[choice] if choice is not None else None

    async def _ask(self, teacher: TeacherInfo, ids: torch.Tensor) -> Optional[SoftTargets]:
        """One teacher's decoded answer, or None (it failed, and is banned for a while)."""
        peer = teacher.peer_id
        batch, length = ids.shape
        expected = soft_targets.encoded_size(batch, length, self.distill.k, self.spec.model.vocab_size)
        header = TeachRequest(spec_digest=self.digest, model_digest=teacher.model_digest, timeout=self.timeout)
        start = time.monotonic()
        self.inflight[peer] = self.inflight.get(peer, 0) + 1
        try:
            frames = await call(
                self.p2p,
                peer,
                TEACH,
                split_message(header, ["inputs"], [encode(ids)]),
                TeachResponse,
                timeout=self.timeout,
                max_bytes=expected + (64 << 10),
                counters=self.counters,
                kind="teacher",
            )
            data = b"".join(f.soft_targets for f in frames)
            top, lp = soft_targets.decode(
                data, batch=batch, length=length, k=self.distill.k, vocab_size=self.spec.model.vocab_size
            )
        except (RemoteError, TensorRejected) as err:
            self.stats.count(self.stats.requests, "failed")
            duration = self.failures.ban(peer, time.monotonic())
            code = err.code if isinstance(err, RemoteError) else ErrorCode.BAD_RESPONSE
            log.warning("teacher %s failed (%s: %s); banned for %.0fs", peer[:12], code, err, duration)
            return None
        finally:
            self.inflight[peer] -= 1
        self.ema.update(peer, batch, time.monotonic() - start)
        self.failures.record_success(peer)
        self.stats.count(self.stats.requests, "ok")
        self.stats.bytes += len(data)
        self.stats.tokens += ids.numel()
        return SoftTargets(top, lp, data)

    def bans_record(self) -> dict:
        """This trainer's ``teacherbans`` DHT record (``protocol.records.TeacherBansModel``)."""
        return {"banned": sorted(self.banned)[:64], "suspended": sorted(self.suspended)[:64]}


def _pair(targets: SoftTargets) -> tuple[torch.Tensor, torch.Tensor]:
    return targets.ids, targets.logprobs
