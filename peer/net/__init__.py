"""The wire: framing (``protocol.rpc``'s contract) and the one RPC layer every handler uses."""

from peer.net.counters import WireCounters
from peer.net.framing import FrameError, join_tensors, read_frame, split_message, write_frame
from peer.net.rpc import Rejected, RemoteError, RequestLimits, RpcServer, call

__all__ = [
    "FrameError",
    "Rejected",
    "RemoteError",
    "RequestLimits",
    "RpcServer",
    "WireCounters",
    "call",
    "join_tensors",
    "read_frame",
    "split_message",
    "write_frame",
]
