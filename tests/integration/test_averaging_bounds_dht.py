"""peer.averaging.bounds against a real hivemind DHT: a progress record far ahead of the group is
dropped with one warning."""

from __future__ import annotations

import logging

import hivemind
import pytest
from hivemind.utils import ValueWithExpiration, get_dht_time

from peer.averaging.bounds import BoundedProgressTracker


@pytest.fixture(scope="module")
def dht():
    node = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    yield node
    node.shutdown()


def record(peer: bytes, epoch: int) -> ValueWithExpiration:
    value = dict(
        peer_id=peer,
        epoch=epoch,
        samples_accumulated=4,
        samples_per_second=10.0,
        time=get_dht_time(),
        client_mode=False,
    )
    return ValueWithExpiration(value, get_dht_time() + 60)


def test_a_record_far_ahead_is_dropped_with_one_warning(dht, caplog):
    tracker = BoundedProgressTracker(dht, "bounds_test", 32, start=False, max_epoch_lead=100)
    honest = {b"a": record(b"peer-a", 7), b"b": record(b"peer-b", 8)}
    assert tracker._parse_swarm_progress_data(honest).epoch == 8
    liar = {**honest, b"x": record(b"liar", 2**40)}
    with caplog.at_level(logging.WARNING, logger="swarmtrain.averaging"):
        assert tracker._parse_swarm_progress_data(liar).epoch == 8
        assert tracker._parse_swarm_progress_data(liar).epoch == 8
    warnings = [r.getMessage() for r in caplog.records if "claims epoch" in r.getMessage()]
    assert len(warnings) == 1 and str(2**40) in warnings[0]
    # Within the lead, a group ahead is the group: the peer catches up to it.
    assert tracker._parse_swarm_progress_data({**honest, b"c": record(b"peer-c", 100)}).epoch == 100
