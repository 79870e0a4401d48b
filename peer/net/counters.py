"""What crossed the wire: bytes by direction and kind, and refused requests by RPC."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class WireCounters:
    """Bytes of messages on the wire by kind, and requests refused by handler name, for
    metrics and benchmarks. One per peer, shared by every server and client it runs."""

    sent: dict = field(default_factory=dict)
    received: dict = field(default_factory=dict)
    rejected: dict = field(default_factory=dict)
    busy: dict = field(default_factory=dict)

    def add(self, direction: str, kind: str, n: int) -> None:
        table = self.sent if direction == "sent" else self.received
        table[kind] = table.get(kind, 0) + n

    def reject(self, handler: str) -> None:
        self.rejected[handler] = self.rejected.get(handler, 0) + 1

    def refuse_busy(self, handler: str) -> None:
        self.busy[handler] = self.busy.get(handler, 0) + 1
