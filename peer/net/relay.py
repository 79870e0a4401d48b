"""Relaying at the application level: a public peer forwards swarmtrain streams to peers behind
home routers, which nobody can dial.

Measured in the network lab (``docs/network.md``): libp2p's circuit relay in hivemind's daemon
lets 100 KB through and resets the relayed connection on the next 1 MB message (circuit v2's
default limit of 128 KiB per connection), and its auto-relay announces no relayed address when
the relay's own addresses are private. A stage's activations are megabytes, so swarmtrain
forwards its own RPCs instead, over connections that already exist: the relayed peer dialed its
relay when it joined the DHT, and the relay opens streams back over that connection.

- ``RelayService`` (on a relay; the bootstrap runs one by default) answers ``swarmtrain.reach``:
  it dials the asker back with a fresh connection of its own (only the asker's addresses on the
  address its connection comes from: the relay is no port scanner) and takes reservations; and
  it passes ``swarmtrain.relay`` streams on to peers that hold a reservation, byte for byte.
- ``RelayedEndpoint`` (on a relayed peer) serves ``swarmtrain.relayed``: streams from its own
  relays only, answered by the handler a direct stream would reach (``peer.net.routes.LOCAL``).
  The caller's peer id is its relay's word: the peer chose that relay and trusts it as far.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from types import SimpleNamespace
from typing import Optional, Sequence

from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr

from peer.net.counters import WireCounters
from peer.net.framing import FrameError, read_frame, write_frame
from peer.net.routes import local_handler
from peer.net.rpc import Rejected, RequestLimits, RpcServer, call, printable
from protocol.messages_pb2 import ReachRequest, ReachResponse, Route
from protocol.rpc import MAX_TIMEOUT, REACH, RELAY, RELAYED, ErrorCode

log = logging.getLogger("swarmtrain.relay")

RESERVATION_S = 180.0  # a relayed peer renews every RESERVATION_S / 3
DIAL_TIMEOUT = 8.0
ROUTE_TIMEOUT = 10.0  # for the first frame of a forwarded stream
MAX_RELAYED_BYTES = 1 << 30  # per direction of one forwarded stream (a stage answer is far less)
REACH_LIMITS = RequestLimits(max_bytes=8192, max_frames=1, deadline=10.0)


def ip_of(maddr: str) -> Optional[str]:
    """The IP address of a /ip4/ or /ip6/ multiaddr, or None."""
    parts = str(maddr).split("/")
    if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
        try:
            return str(ipaddress.ip_address(parts[2]))
        except ValueError:
            return None
    return None


def dialable(addrs: Sequence[str], observed: str, limit: int = 8) -> list[str]:
    """Of the addresses a peer says it listens on, those on the address its connection comes
    from, as TCP multiaddrs without /p2p/: what a relay may dial back (never another host)."""
    seen = ip_of(observed)
    out = []
    for a in addrs[:64]:
        a = str(a).split("/p2p/")[0]
        parts = a.split("/")
        if seen is None or ip_of(a) != seen or len(parts) != 5 or parts[3] != "tcp":
            continue
        if parts[4].isdigit() and 0 < int(parts[4]) < 65536 and a not in out:
            out.append(a)
    return out[:limit]


def split_maddr(maddr: str) -> tuple[str, str]:
    """(/ip4/.../tcp/N, peer id) of a full multiaddr: hivemind's Multiaddr writes /p2p/ in a
    form the daemon's connect refuses, so the peer id travels apart."""
    base, _, peer = str(maddr).partition("/p2p/")
    if not peer:
        raise ValueError(f"{maddr!r} names no peer (/p2p/...)")
    return base, peer.split("/")[0]


class RelayService:
    """Dials askers back, keeps reservations, forwards streams to peers that hold one."""

    def __init__(self, counters: Optional[WireCounters] = None, *, max_reservations: int = 128, max_streams: int = 256):
        self.counters = counters or WireCounters()
        self.rpc = RpcServer(self.counters, max_streams=64, max_streams_per_peer=4)
        self.max_reservations = max_reservations
        self.reservations: dict[str, float] = {}  # peer id -> monotonic expiry
        self.max_streams = max_streams
        self.streams: dict[str, int] = {}  # target -> forwarded streams open now
        self.forwarded = 0  # streams passed on, for logs and tests
        self._probe: Optional[P2P] = None
        self._probe_lock = asyncio.Lock()
        self._dialed: dict[str, float] = {}
        self.p2p: Optional[P2P] = None

    async def start(self, p2p: P2P) -> None:
        self.p2p = p2p
        await self.rpc.add(p2p, REACH, self._reach, ReachRequest, _reach_error, REACH_LIMITS, kind="relay")
        await p2p.add_binary_stream_handler(RELAY, self._relay)

    async def stop(self) -> None:
        await self.rpc.remove_all()
        if self.p2p is not None:
            try:
                await self.p2p.remove_binary_stream_handler(RELAY)
            except Exception:
                pass
        if self._probe is not None:
            await self._probe.shutdown()
            self._probe = None

    def reserved(self, peer_id: str) -> bool:
        expiry = self.reservations.get(peer_id)
        return expiry is not None and expiry > time.monotonic()

    # --- swarmtrain.reach --------------------------------------------------------------------

    async def _reach(self, frames, remote: str) -> list[ReachResponse]:
        req = frames[0]
        observed = await self._observed(remote)
        answer = ReachResponse(observed=observed)
        if req.dial:
            answer.reachable = await self._dial_back(remote, dialable(list(req.addrs), observed))
        if req.reserve:
            now = time.monotonic()
            for peer, expiry in list(self.reservations.items()):
                if expiry <= now:
                    del self.reservations[peer]
            if remote not in self.reservations and len(self.reservations) >= self.max_reservations:
                raise Rejected(ErrorCode.BUSY, f"this relay holds {self.max_reservations} reservations")
            if remote not in self.reservations:
                log.info("relaying for %s (its connection comes from %s)", remote, observed or "?")
            self.reservations[remote] = now + RESERVATION_S
            answer.reserved_s = RESERVATION_S
        return [answer]

    async def _observed(self, remote: str) -> str:
        try:
            for info in await self.p2p.list_peers():
                if str(info.peer_id) == remote and info.addrs:
                    return str(info.addrs[0])
        except Exception as err:
            log.debug("list_peers failed: %s", err)
        return ""

    async def _dial_back(self, remote: str, addrs: list[str]) -> bool:
        """Can a connection of our own reach ``remote`` at ``addrs``? One dial at a time, one
        per asker every 30 s: a stranger cannot turn the relay into a dialing machine."""
        if not addrs:
            return False
        now = time.monotonic()
        if now - self._dialed.get(remote, -1e9) < 30.0:
            raise Rejected(ErrorCode.BUSY, "asked to dial back less than 30 s ago")
        if len(self._dialed) > 4096:
            self._dialed.clear()
        self._dialed[remote] = now
        async with self._probe_lock:
            if self._probe is None:
                # Its own daemon and identity: no connection of this relay's can be reused.
                self._probe = await P2P.create(host_maddrs=[], no_listen=True, dht_mode="client", auto_nat=False)
            peer = PeerID.from_base58(remote)
            try:
                await asyncio.wait_for(self._probe._client.connect(peer, [Multiaddr(a) for a in addrs]), DIAL_TIMEOUT)
            except Exception as err:
                log.debug("dialing %s back at %s failed: %s", remote, addrs, err)
                return False
            try:
                await self._probe._client.disconnect(peer)
            except Exception:
                pass
            return True

    # --- swarmtrain.relay ----------------------------------------------------------------------

    async def _relay(self, stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        caller = str(getattr(stream_info, "peer_id", "") or "?")
        target = ""
        try:
            try:
                route = await asyncio.wait_for(read_frame(reader, Route), ROUTE_TIMEOUT)
            except (asyncio.TimeoutError, FrameError, asyncio.IncompleteReadError):
                self.counters.reject(RELAY)
                return
            target = route.target if route is not None else ""
            if (
                not target
                or not self.reserved(target)
                or not route.handler.startswith("swarmtrain.")
                or route.handler in (RELAY, RELAYED, REACH)
                or sum(self.streams.values()) >= self.max_streams
                or self.streams.get(target, 0) >= 32
            ):
                self.counters.reject(RELAY)  # the caller sees a stream closed without an answer
                target = ""
                return
            self.streams[target] = self.streams.get(target, 0) + 1
            _, up_reader, up_writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(target), RELAYED)
            try:
                await write_frame(up_writer, Route(target=target, handler=route.handler, caller=caller))
                self.forwarded += 1
                there = asyncio.ensure_future(self._pump(reader, up_writer, "received"))
                try:
                    await asyncio.wait_for(self._pump(up_reader, writer, "sent"), MAX_TIMEOUT + 60)
                finally:
                    there.cancel()
            finally:
                up_writer.close()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass
        except Exception as err:
            log.debug("forwarding %s -> %s failed: %s", caller, target, printable(str(err)))
        finally:
            if target:
                left = self.streams.get(target, 1) - 1
                if left > 0:
                    self.streams[target] = left
                else:
                    self.streams.pop(target, None)
            writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        moved = 0
        while moved < MAX_RELAYED_BYTES:
            data = await reader.read(1 << 16)
            if not data:
                return
            moved += len(data)
            self.counters.add(direction, "relay", len(data))
            writer.write(data)
            await writer.drain()


def _reach_error(code: str, message: str) -> ReachResponse:
    return ReachResponse(error=message, error_code=str(code))


class RelayedEndpoint:
    """Serves streams that this peer's relays forward, with this peer's own handlers."""

    def __init__(self, p2p: P2P, relays: Sequence[str]):
        self.p2p, self.relays = p2p, set(relays)
        self.received = 0

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(RELAYED, self._relayed)

    async def stop(self) -> None:
        try:
            await self.p2p.remove_binary_stream_handler(RELAYED)
        except Exception:
            pass

    async def _relayed(self, stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        remote = str(getattr(stream_info, "peer_id", "") or "?")
        handler = None
        try:
            if remote in self.relays:  # anyone else gets a closed stream and nothing more
                route = await asyncio.wait_for(read_frame(reader, Route), ROUTE_TIMEOUT)
                if route is not None and PeerID.from_base58(route.caller):
                    handler = local_handler(self.p2p, route.handler)
        except Exception:
            handler = None
        if handler is None:
            writer.close()
            return
        self.received += 1
        await handler(SimpleNamespace(peer_id=route.caller), reader, writer)


async def ask_relay(
    p2p: P2P, relay: str, *, addrs: Sequence[str] = (), dial: bool = False, reserve: bool = False, timeout: float = 20.0
) -> ReachResponse:
    """One ``swarmtrain.reach`` request; raises RemoteError when the relay does not answer it."""
    (answer,) = await call(
        p2p,
        relay,
        REACH,
        [ReachRequest(addrs=list(addrs), dial=dial, reserve=reserve)],
        ReachResponse,
        timeout=timeout,
        max_bytes=4096,
        max_frames=1,
        kind="relay",
    )
    return answer
