"""A peer whose spec's rounds are too short for its link says so and exits before it joins (a peer
process)."""

import pytest


@pytest.mark.timeout(300)
def test_a_peer_with_rounds_too_short_says_so_and_exits_before_it_joins(tmp_path, cluster):
    from conftest import make_tiny_spec

    spec_path = tmp_path / "short.toml"
    make_tiny_spec(averaging="outer", outer=dict(round_seconds=4.0, gather_seconds=1.0, agree_seconds=1.0)).save(
        spec_path
    )
    _, addr = cluster.bootstrap(spec_path=spec_path, timeout=120)
    peer = cluster.peer("short", [addr], spec_path=spec_path, stage=0)
    assert peer.popen.wait(timeout=180) == 1
    said = "".join(peer.lines)
    assert "this run's outer rounds are too short" in said and "round_seconds above 6" in said, said[-2000:]
    assert not any(e.get("event") == "stage" for e in peer.events), said[-2000:]  # it never took a stage
