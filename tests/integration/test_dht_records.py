"""Forged and malformed DHT records are rejected, with two real DHTs on 127.0.0.1 running our
validators: a peer cannot overwrite or forge another peer's announcement, schema-violating
records are not stored, and readers attribute a record to the key that signed it."""

from __future__ import annotations

import dataclasses

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord
from hivemind.utils import get_dht_time
from hivemind.utils.serializer import MSGPackSerializer

from peer.swarm.dht import SwarmDHT, owner_of, parse_peer_records, start_dht, visible_maddrs
from peer.swarm.identity import cleanup_identity, load_or_create_identity
from protocol import records
from protocol.spec import preset_spec

from records_helpers import peer_info

pytestmark = pytest.mark.timeout(240)

SPEC = preset_spec("tiny", stages=2, run_id="recordtest")


@pytest.fixture(scope="module")
def swarms(tmp_path_factory):
    """Two DHT nodes (A, then B joining through A), each with its own identity and a SwarmDHT."""
    d = tmp_path_factory.mktemp("dht")
    ids = [load_or_create_identity(d / f"{name}.id") for name in ("a", "b")]
    validators = records.run_validators(SPEC.run_id, SPEC.digest())
    dht_a = start_dht(ids[0], validators=validators)
    dhts = [dht_a]
    try:
        dhts.append(start_dht(ids[1], initial_peers=visible_maddrs(dht_a), validators=validators))
        yield [SwarmDHT(dht, SPEC, ident) for dht, ident in zip(dhts, ids)]
    finally:
        for dht in dhts:
            dht.shutdown()
        for ident in ids:
            cleanup_identity(ident)


def owner_subkey(swarm: SwarmDHT) -> bytes:
    return RSASignatureValidator(swarm.identity.private_key).local_public_key


def record_of(swarm: SwarmDHT, reader: SwarmDHT) -> dict | None:
    found = reader.dht.get(reader.peers_key, latest=True)
    if found is None:
        return None
    item = found.value.get(owner_subkey(swarm))
    return None if item is None else item.value


def test_announcements_are_attributed_to_their_signers(swarms):
    a, b = swarms
    assert a.announce(peer_info(a.peer_id, stage=0), ttl=60)
    assert b.announce(peer_info(b.peer_id, stage=1), ttl=60)
    for reader in (a, b):
        snap = {p.peer_id: p for p in reader.snapshot()}
        assert snap[a.peer_id].stage == 0 and snap[b.peer_id].stage == 1
        assert set(snap) == {a.peer_id, b.peer_id}
    # The peer id of a record is the one of the key in its subkey, i.e. its signer's identity.
    assert owner_of(owner_subkey(a)) == ("", str(a.identity.peer_id))
    assert owner_of(owner_subkey(b)) == ("", str(b.identity.peer_id))


def test_peer_cannot_overwrite_another_peers_record(swarms):
    a, b = swarms
    assert a.announce(peer_info(a.peer_id, stage=0, throughput=5.0), ttl=120)
    original = record_of(a, a)
    assert original is not None and original["throughput"] == 5.0
    # B stores under A's owner subkey with a later expiration: B cannot sign it as A, so every
    # node refuses it.
    forged = peer_info(a.peer_id, stage=1, throughput=1e6, state="online").to_record()
    stored = b.dht.store(b.peers_key, forged, get_dht_time() + 300, subkey=owner_subkey(a))
    assert not stored
    for reader in (a, b):
        assert record_of(a, reader) == original
        snap = {p.peer_id: p for p in reader.snapshot()}
        assert snap[a.peer_id].stage == 0 and snap[a.peer_id].throughput == 5.0


def test_forged_signature_does_not_validate(swarms):
    """B signs a record for A's subkey with its own key: the signature check names A's key."""
    a, b = swarms
    record = DHTRecord(
        key=b"k", subkey=owner_subkey(a), value=MSGPackSerializer.dumps({"x": 1}), expiration_time=get_dht_time() + 60
    )
    signed_by_b = b.identity.private_key.sign(MSGPackSerializer.dumps(dataclasses.astuple(record)))
    forged = dataclasses.replace(record, value=record.value + b"[signature:" + signed_by_b + b"]")
    validator = RSASignatureValidator(a.identity.private_key)
    assert not validator.validate(forged)
    assert not validator.validate(record)  # unsigned
    # The same record, signed by A's key, is accepted: the check is the key, not the format.
    genuine = dataclasses.replace(record, value=validator.sign_value(record))
    assert validator.validate(genuine)


@pytest.mark.parametrize(
    "bad",
    [
        dict(unknown_field=1),
        dict(throughput=-1.0),
        dict(stage="zero"),
        dict(state="hijacked"),
        dict(epoch=-5),
        dict(version="v" * 100),
        dict(loss=float("inf")),
    ],
)
def test_schema_violations_are_rejected(swarms, bad):
    a, b = swarms
    assert b.announce(peer_info(b.peer_id, stage=1, throughput=2.0), ttl=120)
    good = record_of(b, a)
    record = {**peer_info(b.peer_id, stage=1).to_record(), **bad}
    # Signed by its owner and under its own subkey, but not a valid peer record: refused.
    assert not b.dht.store(b.peers_key, record, get_dht_time() + 300, subkey=owner_subkey(b))
    for reader in (a, b):
        assert record_of(b, reader) == good


def test_records_under_foreign_keys_or_odd_subkeys_are_refused(swarms):
    a, b = swarms
    record = peer_info(b.peer_id).to_record()
    # Not owner-marked: the run's schema requires an owner subkey.
    assert not b.dht.store(b.peers_key, record, get_dht_time() + 60, subkey=b"plain")
    # A spec record in a peers key, and a peer record with the wrong value type.
    assert not b.dht.store(
        b.peers_key, {"spec_json": "{}", "digest": "0" * 64}, get_dht_time() + 60, subkey=owner_subkey(b)
    )
    assert not b.dht.store(b.peers_key, "online", get_dht_time() + 60, subkey=owner_subkey(b))


class _Item:
    def __init__(self, value, expiration_time=0.0):
        self.value, self.expiration_time = value, expiration_time


def test_parse_peer_records_reports_only_signers(swarms):
    a, b = swarms
    good = peer_info("ignored").to_record()
    value = {
        owner_subkey(a): _Item(good),
        # A record that names another peer id inside: not a field of the schema, dropped.
        owner_subkey(b): _Item({**good, "peer_id": a.peer_id}),
        # Checkpoint-style subkeys (a stage prefix) and plain subkeys are not peer records.
        b"0" + owner_subkey(b): _Item(good),
        b"mallory": _Item(good),
        "text": _Item(good),
        owner_subkey(b) + b"x": _Item(good),
        # A deleted record.
        b"[owner:garbage]": _Item(None),
    }
    peers = parse_peer_records(value)
    assert [p.peer_id for p in peers] == [str(a.identity.peer_id)]
    # Garbage at the top level is no swarm at all.
    assert parse_peer_records(None) == [] and parse_peer_records([1, 2]) == []
    # Each peer id that is reported is derived from the subkey's key, whatever the value says.
    value = {owner_subkey(b): _Item(good)}
    assert [p.peer_id for p in parse_peer_records(value)] == [str(b.identity.peer_id)]


def test_checkpoint_announcements_must_match_their_stage_prefix(swarms):
    a, b = swarms
    record = dict(step=3, manifest_digest="ab" * 32, signers=["0123456789abcdef"], files=2, total_bytes=10)
    assert a.announce_checkpoint(1, record, ttl=60)
    # B writes a stage-1 announcement under the stage-0 prefix of its own subkey: readers skip it.
    value = records.CheckpointAnnouncementModel(stage=1, **record).dict()
    b.dht.store(b.checkpoints_key, value, get_dht_time() + 60, subkey=b"0" + owner_subkey(b))
    # And cannot announce under A's subkey at all.
    assert not b.dht.store(b.checkpoints_key, value, get_dht_time() + 60, subkey=b"1" + owner_subkey(a))
    got = b.checkpoint_announcements()
    assert [(pid, r.stage, r.step) for pid, r in got] == [(str(a.identity.peer_id), 1, 3)]


def test_a_peer_of_an_incompatible_protocol_is_left_out_with_a_warning(swarms, caplog):
    a, b = swarms
    assert b.announce(peer_info(b.peer_id, stage=1, version="9.0.0"), ttl=3600)  # newer than earlier tests' records
    with caplog.at_level("WARNING", logger="swarmtrain.dht"):
        assert b.peer_id not in {p.peer_id for p in a.snapshot()}
        a.snapshot()
    warnings = [r.getMessage() for r in caplog.records if b.peer_id in r.getMessage()]
    assert len(warnings) == 1 and "protocol '9.0.0'" in warnings[0]
    assert b.announce(peer_info(b.peer_id, stage=1), ttl=3700)  # back to this version: seen again
    assert b.peer_id in {p.peer_id for p in a.snapshot()}
