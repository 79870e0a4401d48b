"""DHT records without a DHT: the protocol compatibility rule, bounds on the numbers a peer
reports about itself, a round-state digest in the record and in status."""

from __future__ import annotations

import pytest

from protocol import records

from records_helpers import peer_info


def test_protocol_compatibility_rule():
    from protocol.records import protocol_compatible

    assert protocol_compatible("0.1.0", "0.1.0") and protocol_compatible("0.1.7", "0.1.0")
    assert not protocol_compatible("0.2.0", "0.1.0")  # 0.x: a minor bump may change the wire
    assert protocol_compatible("1.4.0", "1.0.2") and not protocol_compatible("2.0.0", "1.0.0")
    for junk in ("", "x", "1", "1.x.0", "9" * 40):
        assert not protocol_compatible(junk, "0.1.0")


@pytest.mark.parametrize(
    "bad",
    [
        dict(epoch=2**40),
        dict(tokens=2**60),
        dict(started=float("inf")),
        dict(checkpoints=2**62),
        dict(state_digest="ab" * 32),  # 16 hex digits or nothing: a record stays small
        dict(state_digest="\x1b[2J0123456789ab"),
    ],
)
def test_numbers_a_peer_reports_about_itself_are_bounded(bad):
    record = {**peer_info("x").to_record(), **bad}
    with pytest.raises(Exception):
        records.PeerRecordModel.parse_obj(record)


def test_a_round_state_digest_travels_in_the_record_and_shows_in_status():
    from peer.observe.status import format_snapshot

    rec = peer_info("x")
    rec = records.PeerInfo(**{**rec.__dict__, "state_digest": "0123456789abcdef"})
    back = records.PeerInfo.from_record("x", rec.to_record())
    assert back.state_digest == "0123456789abcdef"
    view = {
        "run_id": "r",
        "digest": "d" * 64,
        "num_peers": 1,
        "loss": None,
        "stages": [
            {
                "stage": 0,
                "layers": [0, 2],
                "online": 1,
                "throughput": 1.0,
                "epoch": 7,
                "peers": [
                    dict(
                        peer_id="x",
                        state="online",
                        throughput=1.0,
                        epoch=7,
                        loss=None,
                        has_data=False,
                        state_digest=back.state_digest,
                    )
                ],
            }
        ],
    }
    assert "epoch    7" in format_snapshot(view) and "round state 0123456789abcdef" in format_snapshot(view)
