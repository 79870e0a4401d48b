"""Signed contributions and holdings of an outer round, and the rule that agrees on a round's set.

A member's contribution (its compressed pseudo-gradient, ``peer.averaging.sparse``) is named by
the SHA-256 of its bytes and signed, with the round it belongs to and the sample weight it
claims, by the member's peer key: the RSA key whose hash is its libp2p peer id. So a
contribution may come from anyone who holds it: the signature, not the sender, says whose it is.

At the round's deadline each member signs the set of contribution digests it holds (a
``Holding``). Members' views of the DHT differ, so "what I saw" is not agreement;
``agreed_set`` is: a deterministic function of the holdings, the same on every member that
reads the same holdings. (A member that read other holdings computes another state, sees its
state digest differ from the one its group announces, and loads the state its group announces:
``docs/churn.md``.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from typing import Sequence

from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from peer.swarm.identity import peer_id_of_ssh_public_key

__all__ = ["Contribution", "ContributionRejected", "Holding", "NoQuorum", "agreed_set", "blob_digest"]

_DIGEST = re.compile(r"[0-9a-f]{64}")
MAX_HOLDING = 1024  # contributions one holding may list: a stage group is far smaller


class ContributionRejected(ValueError):
    """A contribution or holding that must not be used; the message says why."""


class NoQuorum(ValueError):
    """Fewer than half of a round's contributors said what they hold."""


def blob_digest(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _public_key(key: RSAPrivateKey) -> bytes:
    return key.get_public_key().to_bytes()


def _check_signed(public_key: bytes, author: str, message: bytes, signature: bytes, what: str) -> None:
    try:
        owner = peer_id_of_ssh_public_key(public_key)
        valid = RSAPublicKey.from_bytes(public_key).verify(message, signature)
    except Exception as err:
        raise ContributionRejected(f"{what}: unreadable public key or signature ({type(err).__name__})") from None
    if owner != author:
        raise ContributionRejected(f"{what}: signed by {owner[:16]}, not by its author {author[:16]}")
    if not valid:
        raise ContributionRejected(f"{what}: the signature does not verify")


@dataclasses.dataclass(frozen=True)
class Contribution:
    run: str  # the run prefix (run id and spec digest): a signature never carries over to another run
    stage: int
    round: int
    author: str  # peer id (base58)
    weight: float  # samples the author claims this round's pseudo-gradient is made of
    digest: str  # SHA-256 of the encoded update
    public_key: bytes
    signature: bytes

    @staticmethod
    def message(run: str, stage: int, round_: int, author: str, weight: float, digest: str) -> bytes:
        return f"swarmtrain-outer-contribution-v1\n{run}\n{stage}\n{round_}\n{author}\n{weight!r}\n{digest}".encode()

    @classmethod
    def sign(
        cls, key: RSAPrivateKey, *, run: str, stage: int, round_: int, author: str, weight: float, blob: bytes
    ) -> "Contribution":
        digest = blob_digest(blob)
        signature = key.sign(cls.message(run, stage, round_, author, float(weight), digest))
        return cls(run, stage, round_, author, float(weight), digest, _public_key(key), signature)

    def verify(self, *, run: str, stage: int, round_: int, blob: bytes | None = None) -> None:
        """Raise ContributionRejected unless this is the author's signed contribution to this
        run, stage and round (and ``blob``, when given, is its content)."""
        what = f"contribution of {self.author[:16]}"
        if (self.run, self.stage, self.round) != (run, stage, round_):
            raise ContributionRejected(f"{what}: for {self.run} stage {self.stage} round {self.round}, not this round")
        if not _DIGEST.fullmatch(self.digest):
            raise ContributionRejected(f"{what}: the digest is not 64 hex digits")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ContributionRejected(f"{what}: weight {self.weight!r} is not a number >= 0")
        message = self.message(self.run, self.stage, self.round, self.author, self.weight, self.digest)
        _check_signed(self.public_key, self.author, message, self.signature, what)
        if blob is not None and blob_digest(blob) != self.digest:
            raise ContributionRejected(f"{what}: the bytes do not match the signed digest")


@dataclasses.dataclass(frozen=True)
class Holding:
    """The contribution digests a member held at a round's deadline, signed by it."""

    run: str
    stage: int
    round: int
    member: str
    digests: tuple[str, ...]  # sorted, distinct
    public_key: bytes
    signature: bytes

    @staticmethod
    def message(run: str, stage: int, round_: int, member: str, digests: Sequence[str]) -> bytes:
        return f"swarmtrain-outer-holding-v1\n{run}\n{stage}\n{round_}\n{member}\n{','.join(digests)}".encode()

    @classmethod
    def sign(cls, key: RSAPrivateKey, *, run: str, stage: int, round_: int, member: str, digests) -> "Holding":
        held = tuple(sorted(set(digests)))
        signature = key.sign(cls.message(run, stage, round_, member, held))
        return cls(run, stage, round_, member, held, _public_key(key), signature)

    def verify(self, *, run: str, stage: int, round_: int) -> None:
        what = f"holding of {self.member[:16]}"
        if (self.run, self.stage, self.round) != (run, stage, round_):
            raise ContributionRejected(f"{what}: for {self.run} stage {self.stage} round {self.round}, not this round")
        if len(self.digests) > MAX_HOLDING:
            raise ContributionRejected(f"{what}: lists {len(self.digests)} contributions, at most {MAX_HOLDING}")
        if list(self.digests) != sorted(set(self.digests)) or not all(_DIGEST.fullmatch(d) for d in self.digests):
            raise ContributionRejected(f"{what}: digests must be distinct, sorted, 64 hex digits each")
        message = self.message(self.run, self.stage, self.round, self.member, self.digests)
        _check_signed(self.public_key, self.member, message, self.signature, what)


def agreed_set(holdings: Sequence[Holding], contributors: Sequence[str]) -> frozenset[str]:
    """The round's contributions: those held by more than half of the contributors that
    published a (verified) holding. Only contributors' holdings count, one per member (a
    stranger's holdings cannot outvote them), and more than half of the contributors must have
    published one (``NoQuorum`` otherwise: the round is not decided)."""
    members = set(contributors)
    by_member: dict[str, Holding] = {}
    for h in holdings:
        if h.member in members:
            by_member.setdefault(h.member, h)
    if 2 * len(by_member) <= len(members):
        raise NoQuorum(f"{len(by_member)} of {len(members)} contributors published what they hold")
    counts: dict[str, int] = {}
    for h in by_member.values():
        for d in h.digests:
            counts[d] = counts.get(d, 0) + 1
    return frozenset(d for d, n in counts.items() if 2 * n > len(by_member))
