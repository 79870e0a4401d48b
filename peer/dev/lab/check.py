"""Measuring a link profile of the network lab against what it claims."""

from __future__ import annotations

from peer.dev.lab.netns import Lab
from peer.dev.lab.profiles import PROFILES

TOLERANCE = 0.10  # a profile whose measured round-trip or rate is further off fails its check


def check_profile(name: str, *, seconds: float = 3.0) -> dict:
    """Measure a profile against a ``lan`` host in a fresh lab: the round-trip and the rate each
    way, compared with what the profile claims (a rate after the profile's loss)."""
    profile = PROFILES[name]
    with Lab() as lab:
        host, ref = lab.add_host("h", profile), lab.add_host("ref", "lan")
        up, down = lab.measure(host, ref, seconds=seconds), lab.measure(ref, host, seconds=seconds, port=5301)
    delivered = 1 - profile.loss
    want_up, want_down = profile.up_mbit * delivered, profile.down_mbit * delivered
    rtt = up["rtt_ms"]
    rtt_ok = rtt is not None and (
        rtt <= 1.0 if profile.kernel_only else abs(rtt - profile.rtt_ms) <= TOLERANCE * profile.rtt_ms
    )
    up_ok = abs(up["rate"]["mbit"] - want_up) <= TOLERANCE * want_up
    down_ok = abs(down["rate"]["mbit"] - want_down) <= TOLERANCE * want_down
    return dict(
        profile=name,
        claimed=dict(
            up_mbit=profile.up_mbit,
            down_mbit=profile.down_mbit,
            rtt_ms=profile.rtt_ms,
            loss=profile.loss,
            jitter_ms=profile.jitter_ms,
        ),
        measured=dict(
            up_mbit=up["rate"]["mbit"], down_mbit=down["rate"]["mbit"], rtt_ms=rtt, rtt_down_ms=down["rtt_ms"]
        ),
        ok=bool(rtt_ok and up_ok and down_ok),
        rtt_ok=rtt_ok,
        up_ok=up_ok,
        down_ok=down_ok,
    )
