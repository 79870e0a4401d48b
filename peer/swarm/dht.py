"""The DHT, behind one thin object: announcing this peer, reading a snapshot of the swarm,
publishing the spec and checkpoint records.

Records are owner-signed (hivemind's RSASignatureValidator, keyed by the peer's identity)
and schema-checked, so no peer can write or overwrite another's announcement; a reader also
checks that each record's signer is the peer id the record describes.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Callable, Iterator, Optional, Sequence

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time

from peer.net.routes import ROUTES
from peer.net.timeouts import dht_wait_timeout
from peer.swarm.identity import Identity, peer_id_of_ssh_public_key
from protocol import PROTOCOL_VERSION, records, signing
from protocol.spec import RunSpec, SpecError, spec_from_json

log = logging.getLogger("swarmtrain.dht")

DIGEST_RE = re.compile(r"[0-9a-f]{64}")

_OWNER_RE = re.compile(rb"^([0-9]{0,5}(?::[0-9]{1,10})?)\[owner:(.+?)\]$")


def owner_of(subkey) -> Optional[tuple[str, str]]:
    """(prefix, peer id) of an owner-marked subkey, or None if it is not one."""
    if not isinstance(subkey, bytes):
        return None
    match = _OWNER_RE.match(subkey)
    if match is None:
        return None
    try:
        return match.group(1).decode(), peer_id_of_ssh_public_key(match.group(2))
    except Exception:
        return None


def owned_values(value) -> Iterator[tuple[tuple[str, str], object, float]]:
    """((subkey prefix, owner peer id), value, expiration) of each owner-signed entry of a DHT
    dictionary value; entries whose subkey names no owner, or that are empty, are skipped."""
    if not isinstance(value, dict):
        return
    for subkey, item in value.items():
        owner = owner_of(subkey)
        if owner is not None and item is not None and item.value is not None:
            yield owner, item.value, item.expiration_time


def _get_value(dht: hivemind.DHT, key: str):
    found = dht.get(key, latest=True)
    return found.value if found is not None else None


# The largest DHT reply a peer waits for: a run's peer records (a few hundred, under 1 KiB each).
DHT_REPLY_BYTES = 256 * 1024


def start_dht(
    identity: Identity,
    *,
    initial_peers: Sequence[str] = (),
    host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
    announce_maddrs: Sequence[str] = (),
    client_mode: bool = False,
    validators: Sequence = (),
    startup_timeout: float = 30.0,
) -> hivemind.DHT:
    identity.install_as_process_key()
    kwargs = {}
    if announce_maddrs:
        kwargs["announce_maddrs"] = list(announce_maddrs)
    return hivemind.DHT(
        initial_peers=list(initial_peers),
        start=True,
        host_maddrs=list(host_maddrs),
        identity_path=str(identity.path),
        client_mode=client_mode,
        record_validators=[RSASignatureValidator(identity.private_key), *validators],
        startup_timeout=startup_timeout,
        # Several initial peers and a short wait avoid the split swarms seen at start (#624).
        ensure_bootstrap_success=bool(initial_peers),
        wait_timeout=dht_wait_timeout(DHT_REPLY_BYTES),
        **kwargs,
    )


def visible_maddrs(dht: hivemind.DHT) -> list[str]:
    return [str(m) for m in dht.get_visible_maddrs()]


class SwarmDHT:
    """The records of one run, read and written through a running hivemind.DHT."""

    def __init__(self, dht: hivemind.DHT, spec: RunSpec, identity: Identity):
        self.dht, self.spec, self.identity = dht, spec, identity
        self.digest = spec.digest()
        self.peer_id = identity.peer_id.to_base58()
        dht.add_validators(records.run_validators(spec.run_id, self.digest))
        self._owner = RSASignatureValidator(identity.private_key).local_public_key
        self.peers_key = records.peers_key(spec.run_id, self.digest)
        self.checkpoints_key = records.checkpoints_key(spec.run_id, self.digest)
        self._refused: set[str] = set()  # peer ids of incompatible versions, warned about once

    # --- peers -----------------------------------------------------------------------------

    def announce(self, info: records.PeerInfo, ttl: float) -> bool:
        record = info.to_record()
        record["version"] = record["version"] or PROTOCOL_VERSION
        return bool(self.dht.store(self.peers_key, record, get_dht_time() + ttl, subkey=self._owner))

    def snapshot(self) -> list[records.PeerInfo]:
        """Live peers of this run; records that fail validation or whose signer is not the
        peer they describe are dropped."""
        peers = self._compatible(parse_peer_records(_get_value(self.dht, self.peers_key)))
        ROUTES.learn("peers", ((p.peer_id, p.via) for p in peers))  # every RPC of this process dials through it
        return peers

    def _compatible(self, peers: list[records.PeerInfo]) -> list[records.PeerInfo]:
        """Peers of another protocol version cannot talk to this one: left out of routing and
        balancing, with one warning per peer."""
        out = []
        for p in peers:
            if records.protocol_compatible(p.version):
                out.append(p)
            elif p.peer_id not in self._refused:
                self._refused.add(p.peer_id)
                log.warning(
                    "ignoring peer %s: it speaks swarmtrain protocol %r, this peer %s (one of you needs "
                    "another version of swarmtrain)",
                    p.peer_id,
                    p.version[:32],
                    PROTOCOL_VERSION,
                )
        return out

    # --- teachers --------------------------------------------------------------------------

    def announce_teacher(self, info: records.TeacherInfo, ttl: float) -> bool:
        record = info.to_record()
        record["version"] = record["version"] or PROTOCOL_VERSION
        key = records.teachers_key(self.spec.run_id, self.digest)
        return bool(self.dht.store(key, record, get_dht_time() + ttl, subkey=self._owner))

    def teachers(self) -> list[records.TeacherInfo]:
        """Live teachers of this run (compatible versions only), as their signed records say."""
        found = []
        for owner, value, expiration in owned_values(
            _get_value(self.dht, records.teachers_key(self.spec.run_id, self.digest))
        ):
            if owner[0]:
                continue
            try:
                info = records.TeacherInfo.from_record(owner[1], value, expiration=expiration)
            except Exception as err:
                log.debug("dropping malformed teacher record from %s: %s", owner[1], err)
                continue
            if records.protocol_compatible(info.version):
                found.append(info)
        ROUTES.learn("teachers", ((t.peer_id, t.via) for t in found))
        return sorted(found, key=lambda t: t.peer_id)

    def announce_teacher_bans(self, record: dict, ttl: float) -> bool:
        """This trainer's verdicts on teachers (``records.TeacherBansModel``)."""
        value = records.TeacherBansModel(**record).dict()
        key = records.teachers_key(self.spec.run_id, self.digest, bans=True)
        return bool(self.dht.store(key, value, get_dht_time() + ttl, subkey=self._owner))

    def teacher_bans(self) -> dict[str, dict]:
        """Trainer peer id -> its ``TeacherBansModel`` record (banned and suspended teachers)."""
        out = {}
        key = records.teachers_key(self.spec.run_id, self.digest, bans=True)
        for owner, value, _ in owned_values(_get_value(self.dht, key)):
            try:
                if not owner[0]:
                    out[owner[1]] = records.TeacherBansModel.parse_obj(value).dict()
            except Exception:
                continue
        return out

    # --- checkpoints -----------------------------------------------------------------------

    def announce_checkpoint(self, stage: int, record: dict, ttl: float) -> bool:
        value = records.CheckpointAnnouncementModel(stage=stage, **record).dict()
        subkey = str(stage).encode() + self._owner
        return bool(self.dht.store(self.checkpoints_key, value, get_dht_time() + ttl, subkey=subkey))

    def checkpoint_announcements(self, stage: Optional[int] = None) -> list[tuple[str, records.CheckpointAnnouncement]]:
        """(peer id, announcement) for every valid checkpoint announcement, newest step first."""
        out = []
        for owner, value, _ in owned_values(_get_value(self.dht, self.checkpoints_key)):
            try:
                parsed = records.CheckpointAnnouncement.from_record(value)
            except Exception:
                continue
            if owner[0] != str(parsed.stage) or (stage is not None and parsed.stage != stage):
                continue
            out.append((owner[1], parsed))
        out.sort(key=lambda pr: -pr[1].step)
        return out


def parse_peer_records(value) -> list[records.PeerInfo]:
    peers: dict[str, records.PeerInfo] = {}
    for owner, record, expiration in owned_values(value):
        if owner[0]:
            continue
        try:
            info = records.PeerInfo.from_record(owner[1], record, expiration=expiration)
        except Exception as err:
            log.debug("dropping malformed peer record from %s: %s", owner[1], err)
            continue
        peers[info.peer_id] = info
    return sorted(peers.values(), key=lambda p: (p.stage, p.peer_id))


# --- the spec, for peers that join by run id --------------------------------------------------


def publish_spec(dht: hivemind.DHT, identity: Identity, spec: RunSpec, ttl: float, *, signing_key=None) -> bool:
    """Publish ``spec`` for peers that join by run id; with ``signing_key`` (an ECDSA P-256
    private key, e.g. the keeper's) also its signature, for peers that trust that key."""
    owner = RSASignatureValidator(identity.private_key).local_public_key
    expiration = get_dht_time() + ttl
    value = records.SpecRecordModel(spec_json=spec.canonical_json(), digest=spec.digest()).dict()
    stored = bool(dht.store(records.spec_key(spec.run_id), value, expiration, subkey=owner))
    if signing_key is not None:
        message = records.spec_signed_message(spec.run_id, spec.digest())
        signature = records.SpecSignatureModel(
            digest=spec.digest(),
            fingerprint=signing.fingerprint(signing_key),
            signature=signing.sign_message(signing_key, message),
        ).dict()
        stored &= bool(dht.store(records.spec_signature_key(spec.run_id), signature, expiration, subkey=owner))
    return stored


def fetch_spec_signers(dht: hivemind.DHT, run_id: str, trusted_keys: Sequence[str]) -> dict[str, set[str]]:
    """Spec digest -> fingerprints of the ``trusted_keys`` (PEM) whose signature of it verifies."""
    trusted = {signing.fingerprint(k): k for k in trusted_keys}
    signers: dict[str, set[str]] = {}
    for _, value, _ in owned_values(_get_value(dht, records.spec_signature_key(run_id))):
        try:
            parsed = records.SpecSignatureModel.parse_obj(value)
        except Exception:
            continue
        key = trusted.get(parsed.fingerprint)
        message = records.spec_signed_message(run_id, parsed.digest)
        if key is not None and signing.verify_message(key, message, parsed.signature):
            signers.setdefault(parsed.digest, set()).add(parsed.fingerprint)
    return signers


def fetch_specs(dht: hivemind.DHT, run_id: str) -> list[tuple[str, RunSpec]]:
    """(publisher peer id, spec) for every valid published spec of run_id."""
    dht.add_validators([records.SchemaValidator(records.SpecSchema, prefix=run_id)])
    out = []
    for owner, value, _ in owned_values(_get_value(dht, records.spec_key(run_id))):
        try:
            parsed = records.SpecRecordModel.parse_obj(value)
            spec = spec_from_json(parsed.spec_json)
        except Exception as err:
            log.warning("ignoring an invalid spec published by %s: %s", owner[1], err)
            continue
        if spec.digest() != parsed.digest or spec.run_id != run_id:
            log.warning("ignoring a spec from %s whose digest or run id does not match", owner[1])
            continue
        out.append((owner[1], spec))
    return out


def resolve_spec(
    dht: hivemind.DHT,
    run_id: str,
    *,
    pinned_digest: Optional[str] = None,
    trusted_keys: Sequence[str] = (),
    require_trust: bool = True,
    timeout: float = 30.0,
    report_ignored: Optional[Callable[[str, str], None]] = None,
) -> RunSpec:
    """The spec of ``run_id`` from the DHT. Anyone can publish a spec under a run id, so a peer
    takes one only when it is pinned by its full digest or signed by one of ``trusted_keys``
    (PEM public keys); observers (``require_trust=False``) take the only one published.

    ``report_ignored(publisher peer id, text)`` is told of every other spec published under the
    run id once one is chosen (default: a warning in the log)."""
    if pinned_digest is not None and not DIGEST_RE.fullmatch(pinned_digest.lower()):
        raise SpecError(f"--spec-digest must be the spec's whole digest (64 hex digits), not {pinned_digest[:80]!r}")
    if require_trust and pinned_digest is None and not trusted_keys:
        raise SpecError(
            f"joining run {run_id!r} by its id needs --spec-digest DIGEST (the 64 hex digits the bootstrap prints) "
            "or --trusted-key KEY.pub (a key that signs the run's spec): anyone can publish a spec under a run id"
        )
    deadline = time.monotonic() + timeout

    def chosen(digest: str) -> RunSpec:
        for publisher, other in published:
            if other.digest() != digest:
                text = f"ignoring spec {other.digest()[:16]} of run {run_id!r} published by peer {publisher}: " + (
                    "not the pinned digest" if pinned_digest is not None else "not signed by a trusted key"
                )
                (report_ignored or (lambda _, t: log.warning("%s", t)))(publisher, text)
        return specs[digest]

    while True:
        published = fetch_specs(dht, run_id)
        specs = {spec.digest(): spec for _, spec in published}
        digest = _chosen_digest(dht, run_id, specs, pinned_digest, trusted_keys)
        if digest is not None:
            return chosen(digest)
        if time.monotonic() > deadline:
            if pinned_digest is not None:
                what = f"with digest {pinned_digest}"
            elif trusted_keys:
                what = "signed by a trusted key (--trusted-key)"
            else:
                what = "at all"
            raise SpecError(
                f"no spec for run {run_id!r} {what} was found in the DHT within {timeout:.0f}s "
                f"({len(specs)} published); is the bootstrap started with --spec"
                + (" and --signing-key?" if trusted_keys and pinned_digest is None else "?")
            )
        time.sleep(1.0)


def _chosen_digest(
    dht: hivemind.DHT, run_id: str, specs: dict[str, RunSpec], pinned_digest: Optional[str], trusted_keys
) -> Optional[str]:
    """The digest of the spec to take among ``specs`` (published under ``run_id``), None while
    there is none yet; SpecError when several qualify."""
    if pinned_digest is not None:
        return pinned_digest.lower() if pinned_digest.lower() in specs else None
    if trusted_keys:
        signed = {d: fps for d, fps in fetch_spec_signers(dht, run_id, trusted_keys).items() if d in specs}
        if len(signed) > 1:
            raise SpecError(
                f"run {run_id!r} has {len(signed)} specs signed by trusted keys "
                f"({', '.join(d[:16] for d in signed)}); pass --spec-digest to choose one"
            )
        return next(iter(signed)) if signed else None
    if len(specs) > 1:
        raise SpecError(
            f"run {run_id!r} has {len(specs)} different published specs ({', '.join(d[:16] for d in specs)}); "
            "pass --spec-digest to choose one or --spec FILE"
        )
    return next(iter(specs)) if specs else None


def resolve_run_spec(
    dht: hivemind.DHT,
    spec: Optional[RunSpec],
    run_id: Optional[str],
    spec_digest: Optional[str],
    *,
    trusted_keys: Sequence[str] = (),
    require_trust: bool = True,
    timeout: float = 30.0,
    report_ignored: Optional[Callable[[str, str], None]] = None,
) -> RunSpec:
    """The run's spec from ``--spec`` (a loaded file) or ``--run`` (the DHT), checked against
    ``--spec-digest`` when given: the one place the three options meet."""
    if spec is None:
        if not run_id:
            raise SpecError("pass --spec FILE or --run RUN_ID")
        spec = resolve_spec(
            dht,
            run_id,
            pinned_digest=spec_digest,
            trusted_keys=trusted_keys,
            require_trust=require_trust,
            timeout=timeout,
            report_ignored=report_ignored,
        )
    if spec_digest and spec.digest() != spec_digest.lower():
        raise SystemExit(f"the spec's digest {spec.digest()} does not match --spec-digest {spec_digest}")
    return spec
