"""The only package that wires the parts together: a peer's start order, main loop and
shutdown (``peer``), its stage slot, mover and presence, its checkpoint side; and the
bootstrap."""

from peer.base.config import PeerConfig
from peer.node.peer import Peer, run_peer

__all__ = ["Peer", "PeerConfig", "run_peer"]
