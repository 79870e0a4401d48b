"""The swarm as a peer sees it: the DHT and its records, identity, and the stage policies
(balancing, churn)."""

from peer.swarm.dht import SwarmDHT, resolve_spec, start_dht, visible_maddrs
from peer.swarm.identity import Identity, cleanup_identity, load_or_create_identity
from peer.swarm.view import SwarmView

__all__ = [
    "Identity",
    "SwarmDHT",
    "SwarmView",
    "cleanup_identity",
    "load_or_create_identity",
    "resolve_spec",
    "start_dht",
    "visible_maddrs",
]
