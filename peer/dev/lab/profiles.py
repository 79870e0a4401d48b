"""The network lab's link profiles: what each host's uplink claims to deliver."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    up_mbit: float
    down_mbit: float
    delay_ms: float = 0.0  # one way
    jitter_ms: float = 0.0
    loss: float = 0.0  # probability, each way

    @property
    def kernel_only(self) -> bool:
        return not (self.delay_ms or self.jitter_ms or self.loss)

    @property
    def rtt_ms(self) -> float:
        """Round-trip to a host on ``lan`` (which adds nothing)."""
        return 2 * self.delay_ms


PROFILES = {
    "lan": Profile("lan", 1000.0, 1000.0),
    "broadband": Profile("broadband", up_mbit=10.0, down_mbit=50.0, delay_ms=20.0, loss=0.001),
    "far": Profile("far", up_mbit=10.0, down_mbit=10.0, delay_ms=75.0, jitter_ms=5.0, loss=0.01),
}
