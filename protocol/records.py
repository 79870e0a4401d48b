"""DHT keys and record schemas.

Every record lives under a key that carries the run id and the spec digest, so peers of
different specs never read each other's records. Per-peer records are stored under an
owner-signed subkey (hivemind's RSASignatureValidator), and every value is checked against a
schema (hivemind's SchemaValidator, pydantic v1 models, as hivemind requires).
"""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Dict, Optional

import pydantic.v1 as pydantic
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import SchemaValidator, conbytes

from protocol import PROTOCOL_VERSION

# Bounds of the numbers a peer reports about itself: claims, but never absurd ones (an epoch of
# 2^62 once hung every joiner; started=inf broke sorting).
MAX_EPOCH = 2**31  # epochs and checkpoint steps (peer.averaging.bounds uses the same)
MAX_TOKENS = 2**53
MAX_TIME = 4e9
MAX_LOSS = 1e6


class PeerState(str, Enum):
    """What a peer announces about its stage. ``joining``: loading it, visible to balancing but
    not routed to; ``online``: serving it; ``leaving``: finishing in-flight work."""

    JOINING = "joining"
    ONLINE = "online"
    LEAVING = "leaving"

    def __str__(self) -> str:
        return self.value


PEER_STATES = tuple(s.value for s in PeerState)
# States that count a peer on its stage (a joining peer will serve it soon).
ACTIVE_STATES = (PeerState.JOINING, PeerState.ONLINE)  # a tuple: str-enum members hash by name


def protocol_compatible(theirs: str, ours: str = PROTOCOL_VERSION) -> bool:
    """Whether a peer announcing protocol ``theirs`` can talk to one speaking ``ours``: the
    same major version (the same minor while the major is 0); a minor (0.x: patch) bump only
    adds fields that older peers ignore."""

    def parts(v: str) -> tuple[int, ...]:
        try:
            return tuple(int(x) for x in v.split(".")[:3])
        except ValueError:
            return ()

    a, b = parts(theirs), parts(ours)
    if len(a) < 2 or len(b) < 2:
        return False
    return a[:2] == b[:2] if b[0] == 0 else a[0] == b[0]


def run_prefix(run_id: str, digest: str) -> str:
    """The prefix of every per-run DHT key: peers of another spec never read these records."""
    return f"{run_id}.{digest[:16]}"


def peers_key(run_id: str, digest: str) -> str:
    return f"{run_prefix(run_id, digest)}_peers"


def outer_key(run_id: str, digest: str, *, holdings: bool = False) -> str:
    """Outer rounds' contributions (or holdings) of every stage; subkey ``b"<stage>:<round>"``
    plus the owner marker of the member."""
    return f"{run_prefix(run_id, digest)}_{'outerheld' if holdings else 'outer'}"


def teachers_key(run_id: str, digest: str, *, bans: bool = False) -> str:
    """Teacher peers' records (``teachers``), or the teachers each trainer has banned or set
    aside (``teacherbans``); subkey: the owner marker of the teacher (or the trainer)."""
    return f"{run_prefix(run_id, digest)}_{'teacherbans' if bans else 'teachers'}"


def checkpoints_key(run_id: str, digest: str) -> str:
    """One key for all stages; the subkey is ``b"<stage>" + owner marker`` of the announcer."""
    return f"{run_prefix(run_id, digest)}_checkpoints"


def spec_key(run_id: str) -> str:
    return f"{run_id}_spec"


def spec_signature_key(run_id: str) -> str:
    """Signatures of published specs by keys a user may trust (``swarmtrain run --trusted-key``)."""
    return f"{run_id}_specsig"


def spec_signed_message(run_id: str, digest: str) -> bytes:
    """What a spec signature signs: the run id and the spec's digest."""
    return f"swarmtrain-spec:{run_id}:{digest}".encode()


def averaging_run_id(run_id: str, digest: str, stage: int) -> str:
    """The hivemind.Optimizer run id of one stage group."""
    # hivemind averager prefixes may not contain dots.
    return f"{run_id}_{digest[:16]}_stage{stage}"


class PeerRecordModel(pydantic.BaseModel):
    """What a peer announces about itself (the value under its own subkey)."""

    stage: pydantic.conint(ge=0, le=10_000)
    state: pydantic.constr(regex=r"^(joining|online|leaving)$")
    throughput: pydantic.confloat(ge=0, le=1e9)  # samples/s this peer's stage can process
    version: pydantic.constr(max_length=32)
    epoch: pydantic.conint(ge=0, le=MAX_EPOCH)
    loss: Optional[pydantic.confloat(ge=0, le=MAX_LOSS)] = None
    tokens: pydantic.conint(ge=0, le=MAX_TOKENS) = 0  # tokens this peer has driven through the pipeline
    samples_per_s: pydantic.confloat(ge=0, le=1e9) = 0.0  # as a trainer
    has_data: bool = False
    started: pydantic.confloat(ge=0, le=MAX_TIME) = 0.0  # unix time: finite, before year 2096
    checkpoints: pydantic.conint(ge=0, le=MAX_EPOCH) = 0  # newest verified checkpoint step this peer serves
    # Outer rounds: the first 16 hex digits of the sha256 of this peer's round state (the same
    # on every member that completed the round ``epoch``); empty in per_step mode.
    state_digest: pydantic.constr(regex=r"^([0-9a-f]{16})?$") = ""
    # Behind a router nobody can dial through: the peer id of the relay that forwards streams to
    # this peer (``peer.net.relay``); empty when others dial it directly.
    via: pydantic.constr(regex=r"^([1-9A-HJ-NP-Za-km-z]{32,64})?$") = ""

    class Config:
        extra = pydantic.Extra.forbid


class CheckpointRecordModel(pydantic.BaseModel):
    """A verified checkpoint of one stage, announced by a peer that can serve it."""

    step: pydantic.conint(ge=0, le=MAX_EPOCH)
    manifest_digest: pydantic.constr(regex=r"^[0-9a-f]{64}$")
    signers: pydantic.conlist(pydantic.constr(regex=r"^[0-9a-f]{16,64}$"), max_items=16)
    files: pydantic.conint(ge=1, le=64)
    total_bytes: pydantic.conint(ge=0, le=2**50)

    class Config:
        extra = pydantic.Extra.forbid


class CheckpointAnnouncementModel(CheckpointRecordModel):
    stage: pydantic.conint(ge=0, le=10_000)


class SpecRecordModel(pydantic.BaseModel):
    spec_json: pydantic.constr(max_length=1_000_000)
    digest: pydantic.constr(regex=r"^[0-9a-f]{64}$")

    class Config:
        extra = pydantic.Extra.forbid


_OwnedSubkey = conbytes(regex=rb"^[0-9]{0,5}" + RSASignatureValidator.PUBLIC_KEY_REGEX + rb"$")
# "<stage>:<round>" + owner: one entry per member and round of a stage group's outer rounds.
_RoundSubkey = conbytes(regex=rb"^[0-9]{1,5}:[0-9]{1,10}" + RSASignatureValidator.PUBLIC_KEY_REGEX + rb"$")


class OuterContributionModel(pydantic.BaseModel):
    """A member's signed contribution to an outer round (``peer.averaging.contribution``)."""

    author: pydantic.constr(min_length=1, max_length=64)
    weight: pydantic.confloat(ge=0, le=1e12)
    digest: pydantic.constr(regex=r"^[0-9a-f]{64}$")
    nbytes: pydantic.conint(ge=1, le=2**31)
    public_key: pydantic.conbytes(min_length=16, max_length=2048)
    signature: pydantic.conbytes(min_length=16, max_length=1024)

    class Config:
        extra = pydantic.Extra.forbid


class OuterHoldingModel(pydantic.BaseModel):
    """The contribution digests a member held at a round's deadline, signed by it."""

    member: pydantic.constr(min_length=1, max_length=64)
    digests: pydantic.conlist(pydantic.constr(regex=r"^[0-9a-f]{64}$"), max_items=1024)
    public_key: pydantic.conbytes(min_length=16, max_length=2048)
    signature: pydantic.conbytes(min_length=16, max_length=1024)

    class Config:
        extra = pydantic.Extra.forbid


_PEER_ID = r"[1-9A-HJ-NP-Za-km-z]{32,64}"  # base58


class TeacherRecordModel(pydantic.BaseModel):
    """What a teacher peer (``swarmtrain teach``) announces about itself."""

    model_digest: pydantic.constr(regex=r"^[0-9a-f]{64}$")  # protocol.weights.weights_digest
    state: pydantic.constr(regex=r"^(online|leaving)$")
    throughput: pydantic.confloat(ge=0, le=1e9)  # samples/s of the spec's micro-batch, measured
    version: pydantic.constr(max_length=32)
    requests: pydantic.conint(ge=0, le=MAX_TOKENS) = 0  # requests answered
    tokens: pydantic.conint(ge=0, le=MAX_TOKENS) = 0  # tokens answered
    started: pydantic.confloat(ge=0, le=MAX_TIME) = 0.0
    via: pydantic.constr(regex=f"^({_PEER_ID})?$") = ""  # its relay, as PeerRecordModel.via

    class Config:
        extra = pydantic.Extra.forbid


class TeacherBansModel(pydantic.BaseModel):
    """The teachers one trainer caught returning targets other teachers of the same weights
    disagree with (``banned``: outvoted; ``suspended``: two disagree and no third has decided)."""

    banned: pydantic.conlist(pydantic.constr(regex=f"^{_PEER_ID}$"), max_items=64) = []
    suspended: pydantic.conlist(pydantic.constr(regex=f"^{_PEER_ID}$"), max_items=64) = []

    class Config:
        extra = pydantic.Extra.forbid


class RunSchema(pydantic.BaseModel):
    """Keys under ``run_prefix``: each peer writes only its own owner-marked subkeys."""

    peers: Dict[_OwnedSubkey, Optional[PeerRecordModel]]
    checkpoints: Dict[_OwnedSubkey, Optional[CheckpointAnnouncementModel]]
    outer: Dict[_RoundSubkey, Optional[OuterContributionModel]]
    outerheld: Dict[_RoundSubkey, Optional[OuterHoldingModel]]
    teachers: Dict[_OwnedSubkey, Optional[TeacherRecordModel]]
    teacherbans: Dict[_OwnedSubkey, Optional[TeacherBansModel]]


class SpecSignatureModel(pydantic.BaseModel):
    digest: pydantic.constr(regex=r"^[0-9a-f]{64}$")
    fingerprint: pydantic.constr(regex=r"^[0-9a-f]{16,64}$")
    signature: pydantic.conbytes(min_length=8, max_length=160)  # DER ECDSA P-256: at most 72

    class Config:
        extra = pydantic.Extra.forbid


class SpecSchema(pydantic.BaseModel):
    """Key ``<run_id>_spec``: the spec as published by a bootstrap; ``<run_id>_specsig``: its
    signatures by trusted keys (owner-marked subkeys)."""

    spec: Dict[_OwnedSubkey, Optional[SpecRecordModel]]
    specsig: Dict[_OwnedSubkey, Optional[SpecSignatureModel]]


@dataclasses.dataclass(frozen=True)
class CheckpointAnnouncement:
    """A verified checkpoint of one stage as a peer announces it: claims, until fetched and
    verified (``protocol.checkpoint.verify_checkpoint``)."""

    stage: int
    step: int
    manifest_digest: str
    signers: tuple[str, ...] = ()
    files: int = 1
    total_bytes: int = 0

    @classmethod
    def from_record(cls, record: dict) -> "CheckpointAnnouncement":
        """A record read from the DHT, checked against ``CheckpointAnnouncementModel``."""
        parsed = CheckpointAnnouncementModel.parse_obj(record).dict()
        return cls(**{**parsed, "signers": tuple(parsed["signers"])})

    def to_record(self) -> dict:
        return CheckpointAnnouncementModel(**{**dataclasses.asdict(self), "signers": list(self.signers)}).dict()


def run_validators(run_id: str, digest: str) -> list:
    return [SchemaValidator(RunSchema, prefix=run_prefix(run_id, digest)), SchemaValidator(SpecSchema, prefix=run_id)]


@dataclasses.dataclass(frozen=True)
class PeerInfo:
    """One peer as a snapshot of the DHT shows it: the input of the stage policies."""

    peer_id: str
    stage: int
    state: PeerState
    throughput: float
    epoch: int = 0
    loss: Optional[float] = None
    tokens: int = 0
    samples_per_s: float = 0.0
    has_data: bool = False
    version: str = ""
    started: float = 0.0
    checkpoints: int = 0
    state_digest: str = ""
    via: str = ""
    expiration: float = 0.0

    @classmethod
    def from_record(cls, peer_id: str, record: dict, expiration: float = 0.0) -> "PeerInfo":
        parsed = PeerRecordModel.parse_obj(record)
        fields = parsed.dict()
        fields["state"] = PeerState(fields["state"])
        return cls(peer_id=peer_id, expiration=expiration, **fields)

    def to_record(self) -> dict:
        return PeerRecordModel(
            **{
                f.name: getattr(self, f.name)
                for f in dataclasses.fields(self)
                if f.name not in ("peer_id", "expiration")
            }
        ).dict()


def online_per_stage(peers, num_stages: int) -> list[int]:
    """How many peers of a snapshot are online on each stage (records of other stages ignored)."""
    counts = [0] * num_stages
    for p in peers:
        if p.state == PeerState.ONLINE and 0 <= p.stage < num_stages:
            counts[p.stage] += 1
    return counts


@dataclasses.dataclass(frozen=True)
class TeacherInfo:
    """One teacher as a snapshot of the DHT shows it: the input of teacher routing."""

    peer_id: str
    model_digest: str
    state: str
    throughput: float
    version: str = ""
    requests: int = 0
    tokens: int = 0
    started: float = 0.0
    via: str = ""
    expiration: float = 0.0

    @classmethod
    def from_record(cls, peer_id: str, record: dict, expiration: float = 0.0) -> "TeacherInfo":
        return cls(peer_id=peer_id, expiration=expiration, **TeacherRecordModel.parse_obj(record).dict())

    def to_record(self) -> dict:
        return TeacherRecordModel(
            **{
                f.name: getattr(self, f.name)
                for f in dataclasses.fields(self)
                if f.name not in ("peer_id", "expiration")
            }
        ).dict()
