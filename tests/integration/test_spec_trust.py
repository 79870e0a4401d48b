"""Joining by run id (finding 10 of the hostile-peer audit): anyone can publish a spec under a
run id, so a peer takes one only when pinned by its whole digest or signed by a key it trusts.
Two real DHTs on 127.0.0.1: the bootstrap's (publishing the real spec, signed by the keeper key)
and an attacker's (publishing its own spec, with its own trusted key, under the same run id)."""

from __future__ import annotations

import pytest

from peer.swarm.dht import publish_spec, resolve_spec, start_dht, visible_maddrs
from peer.swarm.identity import cleanup_identity, load_or_create_identity
from protocol import records, signing
from protocol.spec import SpecError, preset_spec

pytestmark = pytest.mark.timeout(240)

RUN = "trusttest"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("trust")
    keeper, attacker_key = signing.generate_private_key(), signing.generate_private_key()
    real = preset_spec("tiny", stages=2, run_id=RUN, trusted_keys=(signing.public_key_pem(keeper),))
    fake = preset_spec("tiny", stages=2, run_id=RUN, trusted_keys=(signing.public_key_pem(attacker_key),))
    ids = [load_or_create_identity(d / f"{n}.id") for n in ("boot", "evil", "reader")]
    validators = records.run_validators(real.run_id, real.digest())
    boot = start_dht(ids[0], validators=validators)
    evil = start_dht(ids[1], initial_peers=visible_maddrs(boot), validators=validators)
    reader = start_dht(ids[2], initial_peers=visible_maddrs(boot), validators=validators)
    try:
        assert publish_spec(boot, ids[0], real, ttl=300, signing_key=keeper)
        yield dict(
            boot=boot,
            evil=evil,
            evil_id=ids[1],
            reader=reader,
            real=real,
            fake=fake,
            keeper=keeper,
            attacker_key=attacker_key,
        )
    finally:
        for dht in (boot, evil, reader):
            dht.shutdown()
        for ident in ids:
            cleanup_identity(ident)


def pem(key):
    return signing.public_key_pem(key)


def test_a_peer_does_not_join_an_unpinned_run(world):
    with pytest.raises(SpecError, match="needs --spec-digest DIGEST .* or --trusted-key"):
        resolve_spec(world["reader"], RUN, timeout=2)


def test_a_prefix_is_not_a_pin(world):
    with pytest.raises(SpecError, match="whole digest"):
        resolve_spec(world["reader"], RUN, pinned_digest=world["real"].digest()[:16], timeout=2)


def test_the_signed_spec_wins_over_a_competing_one(world):
    # The attacker publishes its spec under the same run id, signed by its own key.
    assert publish_spec(world["evil"], world["evil_id"], world["fake"], ttl=300, signing_key=world["attacker_key"])
    ignored = []
    got = resolve_spec(
        world["reader"],
        RUN,
        trusted_keys=[pem(world["keeper"])],
        timeout=10,
        report_ignored=lambda publisher, text: ignored.append((publisher, text)),
    )
    assert got.digest() == world["real"].digest()
    # The competing spec is reported with its publisher's peer id.
    evil_id = str(world["evil_id"].peer_id)
    assert [p for p, _ in ignored] == [evil_id] and "not signed by a trusted key" in ignored[0][1]
    # A full pin picks exactly that spec, whoever else publishes.
    assert resolve_spec(world["reader"], RUN, pinned_digest=world["real"].digest(), timeout=10) == world["real"]
    # Observers take the only published spec; with two they ask for a pin.
    with pytest.raises(SpecError, match="2 different published specs"):
        resolve_spec(world["reader"], RUN, require_trust=False, timeout=5)


def test_a_key_that_signed_nothing_finds_nothing(world):
    stranger = signing.generate_private_key()
    with pytest.raises(SpecError, match="signed by a trusted key"):
        resolve_spec(world["reader"], RUN, trusted_keys=[pem(stranger)], timeout=3)


def test_a_forged_signature_does_not_count(world):
    """A record that claims the keeper's fingerprint for the attacker's spec, signed by the
    attacker, does not verify against the keeper's key."""
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.utils import get_dht_time

    fake = world["fake"]
    forged = records.SpecSignatureModel(
        digest=fake.digest(),
        fingerprint=signing.fingerprint(world["keeper"]),
        signature=signing.sign_message(world["attacker_key"], records.spec_signed_message(RUN, fake.digest())),
    ).dict()
    owner = RSASignatureValidator(world["evil_id"].private_key).local_public_key
    assert world["evil"].store(records.spec_signature_key(RUN), forged, get_dht_time() + 300, subkey=owner)
    got = resolve_spec(world["reader"], RUN, trusted_keys=[pem(world["keeper"])], timeout=10)
    assert got.digest() == world["real"].digest()
