"""One outer round of a stage group over the DHT and P2P: publish, gather, agree, aggregate.

1. A member publishes its signed contribution (``peer.averaging.contribution``) in the DHT and
   serves its bytes by digest (``swarmtrain.outer``).
2. Until the round's gather deadline it reads the group's announcements and fetches each
   contribution it does not hold, from its author or from any member whose holding lists it;
   it keeps only bytes that match the signed digest and decode as a sparse update of the
   stage's size. A member that does not deliver delays nobody past the deadline.
3. It signs and publishes what it holds, waits the agreement window, and takes the round's set
   from the holdings it reads (``agreed_set``), fetching what it lacks of that set.
4. ``aggregate`` turns the set into the round's update: the same bits on every member that
   agreed on the same set.

The network sits behind ``RoundNet`` (the DHT and one RPC); the steps are ``run_round``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable, Optional

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from peer.averaging.contribution import (
    Contribution,
    ContributionRejected,
    Holding,
    NoQuorum,
    agreed_set,
)
from peer.averaging.robust import Aggregate, aggregate
from peer.averaging.sparse import SparseConfig, SparseRejected, SparseUpdate, encoded_size
from peer.net import Rejected, RequestLimits, RpcServer, call
from peer.net.timeouts import transfer_timeout
from peer.swarm.dht import owned_values
from protocol import records
from protocol.messages_pb2 import OuterRequest, OuterResponse
from protocol.rpc import OUTER, ErrorCode

log = logging.getLogger("swarmtrain.averaging")

__all__ = ["RoundNet", "RoundResult", "run_round", "POLL_S"]

DATA_FRAME_BYTES = 1 << 20
REQUEST_LIMITS = RequestLimits(max_bytes=4 << 10, max_frames=1, deadline=10.0)
KEPT_ROUNDS = 2  # contributions served: this round's and the previous one's (for late members)
# How often a member reads the round's DHT entries while it gathers and agrees. Each read returns
# every member's signed record (~0.7 kB each): on a small stage these reads are most of a round's
# bytes (scripts/bench_outer.py counts them).
POLL_S = 1.0


@dataclasses.dataclass(frozen=True)
class RoundResult:
    round: int
    aggregate: Aggregate
    agreed: frozenset[str]
    contributions: int  # verified contributions this member held at the gather deadline
    announced: int = 0  # contributions announced for the round (signed, of the expected size or not)


class RoundNet:
    """A member's side of outer rounds: its DHT entries and the ``swarmtrain.outer`` RPC.

    ``run(coro, timeout)`` runs a coroutine on the loop that owns ``p2p`` (the peer's
    ``LoopThread.run``)."""

    def __init__(
        self,
        dht,
        p2p: P2P,
        run: Callable,
        *,
        run_id: str,
        spec_digest: str,
        stage: int,
        key: RSAPrivateKey,
        peer_id: str,
        counters=None,
    ):
        self.dht, self.p2p, self.run = dht, p2p, run
        self.run_prefix = records.run_prefix(run_id, spec_digest)
        self.key_contrib = records.outer_key(run_id, spec_digest)
        self.key_held = records.outer_key(run_id, spec_digest, holdings=True)
        self.stage, self.key, self.peer_id = stage, key, peer_id
        self._owner = RSASignatureValidator(key).local_public_key
        self._blobs: dict[tuple[int, str], bytes] = {}  # (round, digest) -> bytes this member holds
        self._lock = threading.Lock()
        self.rpc = RpcServer(counters, max_streams=32, max_streams_per_peer=4)

    # --- serving -----------------------------------------------------------------------------

    async def start(self) -> None:
        await self.rpc.add(self.p2p, OUTER, self._handle, OuterRequest, _error, REQUEST_LIMITS, kind="averaging")

    async def stop(self) -> None:
        await self.rpc.remove_all()

    def hold(self, round_: int, digest: str, blob: bytes) -> None:
        with self._lock:
            self._blobs[(round_, digest)] = blob
            for r, d in [k for k in self._blobs if k[0] <= round_ - KEPT_ROUNDS]:
                del self._blobs[(r, d)]

    def held(self, round_: int) -> dict[str, bytes]:
        with self._lock:
            return {d: b for (r, d), b in self._blobs.items() if r == round_}

    async def _handle(self, frames: list[OuterRequest], _remote: str) -> list[OuterResponse]:
        request = frames[0]
        if request.run != self.run_prefix or request.stage != self.stage:
            raise Rejected(ErrorCode.WRONG_SPEC, f"this peer serves {self.run_prefix} stage {self.stage}")
        with self._lock:
            blob = self._blobs.get((int(request.round), request.digest))
        if blob is None:
            raise Rejected(
                ErrorCode.NOT_FOUND, f"no contribution {request.digest[:16]!r} of round {request.round} here"
            )
        return [OuterResponse(data=blob[i : i + DATA_FRAME_BYTES]) for i in range(0, len(blob), DATA_FRAME_BYTES)]

    # --- the DHT -------------------------------------------------------------------------------

    def _subkey(self, round_: int) -> bytes:
        return f"{self.stage}:{round_}".encode() + self._owner

    def publish(self, c: Contribution, nbytes: int, ttl: float) -> bool:
        value = records.OuterContributionModel(
            author=c.author,
            weight=c.weight,
            digest=c.digest,
            nbytes=nbytes,
            public_key=c.public_key,
            signature=c.signature,
        ).dict()
        return bool(self.dht.store(self.key_contrib, value, get_dht_time() + ttl, subkey=self._subkey(c.round)))

    def publish_holding(self, h: Holding, ttl: float) -> bool:
        value = records.OuterHoldingModel(
            member=h.member, digests=list(h.digests), public_key=h.public_key, signature=h.signature
        ).dict()
        return bool(self.dht.store(self.key_held, value, get_dht_time() + ttl, subkey=self._subkey(h.round)))

    def _entries(self, key: str, round_: int):
        found = self.dht.get(key, latest=True)
        for (prefix, owner), value, _ in owned_values(found.value if found is not None else None):
            if prefix == f"{self.stage}:{round_}":
                yield owner, value

    def _verified(self, key: str, round_: int, build: Callable, what: str):
        """``build(owner, value)`` of each entry of this round that parses and verifies."""
        for owner, value in self._entries(key, round_):
            try:
                yield build(owner, value)
            except Exception as err:
                log.info("ignoring a %s published by %s: %s", what, owner, err)

    def contributions(self, round_: int) -> dict[str, tuple[Contribution, int]]:
        """digest -> (verified contribution, its size) announced for this round, one per author."""

        def build(owner: str, value) -> tuple[Contribution, int]:
            rec = records.OuterContributionModel.parse_obj(value)
            c = Contribution(
                self.run_prefix, self.stage, round_, rec.author, rec.weight, rec.digest, rec.public_key, rec.signature
            )
            _same_owner(owner, c.author)
            c.verify(run=self.run_prefix, stage=self.stage, round_=round_)
            return c, rec.nbytes

        return {c.digest: (c, n) for c, n in self._verified(self.key_contrib, round_, build, "contribution")}

    def holdings(self, round_: int) -> list[Holding]:
        def build(owner: str, value) -> Holding:
            rec = records.OuterHoldingModel.parse_obj(value)
            h = Holding(
                self.run_prefix, self.stage, round_, rec.member, tuple(rec.digests), rec.public_key, rec.signature
            )
            _same_owner(owner, h.member)
            h.verify(run=self.run_prefix, stage=self.stage, round_=round_)
            return h

        return list(self._verified(self.key_held, round_, build, "holding"))

    # --- fetching ------------------------------------------------------------------------------

    async def _fetch_from(self, source: str, c: Contribution, nbytes: int, timeout: float) -> bytes:
        frames = await call(
            self.p2p,
            source,
            OUTER,
            [OuterRequest(run=self.run_prefix, stage=self.stage, round=c.round, digest=c.digest)],
            OuterResponse,
            timeout=timeout,
            max_bytes=nbytes + 4096,
            max_frames=2 + nbytes // DATA_FRAME_BYTES,
            kind="averaging",
        )
        return b"".join(f.data for f in frames)

    def fetch(self, c: Contribution, nbytes: int, sources: list[str], timeout: float) -> Optional[bytes]:
        """The contribution's bytes from the first source that delivers bytes matching its signed
        digest; None when none does."""
        for source in sources:
            if source == self.peer_id:
                continue
            try:
                blob = self.run(self._fetch_from(source, c, nbytes, timeout), timeout + 5)
                c.verify(run=self.run_prefix, stage=self.stage, round_=c.round, blob=blob)
                return blob
            except Exception as err:  # whatever a source did wrong, the next one may deliver
                log.info("contribution %s from %s: %s", c.digest[:12], source[:16], err)
        return None


def _same_owner(owner: str, named: str) -> None:
    # The DHT entry is signed by its owner; the record must name the same peer.
    if owner != named:
        raise ContributionRejected(f"stored by {owner[:16]} in {named[:16]}'s name")


def _error(code: str, message: str) -> OuterResponse:
    return OuterResponse(error=message, error_code=str(code))


def _decodes(blob: bytes, numel: int, config: SparseConfig) -> Optional[SparseUpdate]:
    try:
        return SparseUpdate.from_bytes(blob, numel=numel, config=config)
    except SparseRejected as err:
        log.info("a contribution does not decode: %s", err)
        return None


def run_round(
    net: RoundNet,
    round_: int,
    blob: bytes,
    weight: float,
    *,
    numel: int,
    config: SparseConfig,
    max_weight: Optional[float],
    gather_s: float,
    agree_s: float,
    expected: Optional[int] = None,
    request_timeout: Optional[float] = None,
) -> RoundResult:
    """This member's round: publish ``blob`` (its encoded update) with ``weight``, gather until
    ``gather_s`` after the start (sooner when ``expected`` contributions are all held), read
    holdings until every contributor's is in or ``gather_s + agree_s`` after the start, and
    aggregate. ``max_weight`` None: twice the lower median of the agreed set's claimed weights.
    Raises NoQuorum when the round cannot be decided. ``request_timeout``: one fetch's, by
    default what a contribution's bytes need on a slow line (``peer.net.timeouts``)."""
    size = encoded_size(numel, config)
    if request_timeout is None:
        request_timeout = transfer_timeout(size)
    if len(blob) != size:
        raise ValueError(f"this member's update is {len(blob)} bytes, a round of {numel} elements has {size}")
    ttl = 4 * (gather_s + agree_s) + 60
    mine = Contribution.sign(
        net.key, run=net.run_prefix, stage=net.stage, round_=round_, author=net.peer_id, weight=weight, blob=blob
    )
    started = time.monotonic()
    net.hold(round_, mine.digest, blob)
    net.publish(mine, len(blob), ttl)
    updates: dict[str, SparseUpdate] = {}
    own = _decodes(blob, numel, config)
    if own is not None:  # a member holds what decodes, its own bytes included
        updates[mine.digest] = own
    announced: dict[str, tuple[Contribution, int]] = {mine.digest: (mine, len(blob))}
    deadline = started + gather_s
    while True:
        announced.update(net.contributions(round_))
        for digest, (c, nbytes) in announced.items():
            if digest in updates or nbytes != size:
                continue
            got = net.fetch(c, nbytes, [c.author], request_timeout)
            update = _decodes(got, numel, config) if got is not None else None
            if update is not None:
                net.hold(round_, digest, got)
                updates[digest] = update
        if time.monotonic() >= deadline or (expected is not None and len(updates) >= expected):
            break
        time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
    held = Holding.sign(
        net.key, run=net.run_prefix, stage=net.stage, round_=round_, member=net.peer_id, digests=list(updates)
    )
    net.publish_holding(held, ttl)
    gathered = len(updates)
    # One deadline for the whole group (counted from the round's start, not from when this
    # member finished gathering): a member that gathered early waits for the others' holdings.
    agree_deadline = started + gather_s + agree_s
    while True:
        # Announcements keep being read: the contributors whose holdings count must be the same
        # set on every member, and one may have seen an announcement late that others saw in time.
        announced.update(net.contributions(round_))
        contributors = sorted({c.author for c, _ in announced.values()})
        holdings = net.holdings(round_)
        members_heard = {h.member for h in holdings} & set(contributors)
        if len(members_heard) == len(contributors) or time.monotonic() >= agree_deadline:
            break
        time.sleep(min(POLL_S, max(0.0, agree_deadline - time.monotonic())))
    agreed = agreed_set(holdings, contributors)  # NoQuorum propagates: the round is undecided
    holders = {d: [h.member for h in holdings if d in h.digests] for d in agreed}
    for digest in sorted(agreed - set(updates)):
        c, nbytes = announced.get(digest, (None, 0))
        got = net.fetch(c, nbytes, holders[digest], request_timeout) if c is not None else None
        update = _decodes(got, numel, config) if got is not None else None
        if update is None:
            raise NoQuorum(f"contribution {digest[:12]} was agreed on but could not be fetched")
        net.hold(round_, digest, got)
        updates[digest] = update
    chosen = {d: updates[d] for d in agreed}
    weights = {d: announced[d][0].weight for d in agreed}
    if max_weight is None:  # twice the lower median claim: the same cap on every member of the set
        claims = sorted(weights.values())
        max_weight = 2.0 * claims[(len(claims) - 1) // 2]
    result = aggregate(chosen, weights, max_weight=max_weight)
    return RoundResult(round_, result, frozenset(agreed), gathered, len(announced))
