"""Relaying at the application level (peer.net.relay, peer.net.reach): three real P2P daemons on
loopback (a relay, a peer it relays for, a caller) exchanging real RPCs through the relay, with
what a stranger must not get. The policies as pure functions are in tests/unit/test_relay_policy.py."""

from __future__ import annotations

import asyncio

import pytest
from hivemind.p2p import P2P

from peer.base import LoopThread
from peer.net.reach import check_reachability
from peer.net.relay import RelayedEndpoint, RelayService, ask_relay
from peer.net.routes import ROUTES
from peer.net.rpc import RemoteError, RequestLimits, RpcServer, call
from protocol.messages_pb2 import OuterRequest, OuterResponse

pytestmark = pytest.mark.timeout(240)

ECHO = "swarmtrain.outer"  # any swarmtrain handler name: the relay forwards only those


class Trio:
    """A relay, a target that dialed it, a caller that dialed it; nobody dialed the target."""

    def __init__(self):
        self.loop = LoopThread()
        run = self.loop.run
        self.relay_p2p = run(P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"]), 60)
        relay_addrs = [str(m) for m in run(self.relay_p2p.get_visible_maddrs(), 10)]
        self.relay_addr = relay_addrs[0]
        self.relay = self.relay_p2p.peer_id.to_base58()
        self.service = RelayService(max_reservations=1)
        run(self.service.start(self.relay_p2p), 10)
        self.target_p2p = run(P2P.create(initial_peers=relay_addrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"]), 60)
        self.target = self.target_p2p.peer_id.to_base58()
        self.caller_p2p = run(P2P.create(initial_peers=relay_addrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"]), 60)
        self.caller = self.caller_p2p.peer_id.to_base58()
        self.seen: list[str] = []
        self.server = RpcServer()

        async def echo(frames, remote):
            self.seen.append(remote)
            return [OuterResponse(data=frames[0].digest.encode() * 1000)]

        limits = RequestLimits(max_bytes=1 << 20)
        run(self.server.add(self.target_p2p, ECHO, echo, OuterRequest, _error, limits, kind="averaging"), 10)

    def call(self, p2p, digest="abc", timeout=30.0):
        request = [OuterRequest(run="r", digest=digest)]
        return self.loop.run(
            call(p2p, self.target, ECHO, request, OuterResponse, timeout=timeout, max_bytes=1 << 24), 60
        )

    def close(self):
        ROUTES.set(self.target, None)
        for p2p in (self.caller_p2p, self.target_p2p):
            self.loop.run(p2p.shutdown(), 30)
        self.loop.run(self.service.stop(), 30)
        self.loop.run(self.relay_p2p.shutdown(), 30)
        self.loop.stop()


def _error(code, message):
    return OuterResponse(error=message, error_code=str(code))


@pytest.fixture
def trio():
    t = Trio()
    try:
        yield t
    finally:
        t.close()


def test_calls_reach_a_relayed_peer_through_its_relay_and_strangers_get_nothing(trio):
    run = trio.loop.run
    ROUTES.set(trio.target, trio.relay)
    with pytest.raises(RemoteError, match="through relay") as refused:
        trio.call(trio.caller_p2p)  # no reservation yet: the relay forwards nothing
    assert refused.value.code == "unreachable" and trio.seen == []

    granted = run(ask_relay(trio.target_p2p, trio.relay, reserve=True), 30)
    assert granted.reserved_s > 0 and granted.observed.startswith("/ip4/127.0.0.1/")
    endpoint = RelayedEndpoint(trio.target_p2p, [trio.relay])
    run(endpoint.start(), 10)
    (answer,) = trio.call(trio.caller_p2p, digest="x" * 3000)  # 3 MB back: far over circuit v2's 128 KiB
    assert answer.data == b"x" * 3_000_000
    assert trio.seen == [trio.caller]  # the target's handler sees who called, not the relay
    assert trio.service.forwarded == 1

    with pytest.raises(RemoteError, match="holds 1 reservations") as busy:  # the only one is held
        run(ask_relay(trio.caller_p2p, trio.relay, reserve=True), 30)
    assert busy.value.code == "busy"

    # A stream to the relayed endpoint from anyone but its relay is closed unanswered.
    ROUTES.set(trio.target, None)
    with pytest.raises(RemoteError):
        run(_raw_relayed(trio.caller_p2p, trio.target), 30)
    assert trio.seen == [trio.caller]
    run(endpoint.stop(), 10)


async def _raw_relayed(p2p, target):
    from hivemind.p2p import PeerID

    from peer.net.framing import read_frame, write_frame
    from protocol.messages_pb2 import Route
    from protocol.rpc import RELAYED

    _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(target), RELAYED)
    await write_frame(writer, Route(target=target, handler=ECHO, caller="QmFake"))
    await write_frame(writer, OuterRequest(digest="y"))
    await write_frame(writer, None)
    try:
        got = await read_frame(reader, OuterResponse)
    except (asyncio.IncompleteReadError, ConnectionError) as err:
        raise RemoteError("unreachable", str(err)) from None
    return got


def test_the_relay_dials_back_a_reachable_peer(trio):
    got = trio.loop.run(check_reachability([trio.relay_addr], ["/ip4/127.0.0.1/tcp/0"]), 60)
    assert got.reachable is True and got.observed.startswith("/ip4/127.0.0.1/"), got
    # Addresses off the one its connection comes from: unreachable, and nothing was dialed.
    off = trio.loop.run(ask_relay(trio.target_p2p, trio.relay, addrs=["/ip4/10.9.9.9/tcp/4001"], dial=True), 30)
    assert off.reachable is False and off.error == ""
    addrs = [str(m).split("/p2p/")[0] for m in trio.loop.run(trio.caller_p2p.get_visible_maddrs(), 10)]
    first = trio.loop.run(ask_relay(trio.caller_p2p, trio.relay, addrs=addrs, dial=True), 30)
    assert first.reachable is True
    with pytest.raises(RemoteError, match="less than 30 s ago"):  # one dial-back per asker every 30 s
        trio.loop.run(ask_relay(trio.caller_p2p, trio.relay, addrs=addrs, dial=True), 30)
