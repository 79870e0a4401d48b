"""Start-up and shutdown that every kind of node shares (a peer, a teacher, a bootstrap).

``joined(...)`` is the one way in and out of a swarm: the identity, the reachability check, the
DHT, the run's spec, the event loop with its P2P handle, and the relay reservation of a node that
others cannot dial; on the way out, the same in reverse, whatever failed. ``StopSignals`` is the
one Ctrl-C/SIGTERM handler, and ``serve_metrics`` (``peer.observe.prom``) the one /metrics start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
from typing import Callable, Iterator, Optional, Sequence

import hivemind
from hivemind.p2p import P2P

from peer.base import LoopThread
from peer.base.config import NetworkConfig, RunConfig
from peer.net.reach import Reachability
from peer.node.relaying import RelayedSide, check_at_start, relays_of
from peer.swarm import Identity, SwarmDHT, cleanup_identity, load_or_create_identity, start_dht
from peer.swarm.dht import resolve_run_spec
from protocol.spec import RunSpec

__all__ = ["Joined", "StopSignals", "joined"]


@dataclasses.dataclass
class Joined:
    """A node's handles on the swarm while it runs."""

    identity: Identity
    reach: Reachability
    dht: hivemind.DHT
    loop: LoopThread
    p2p: P2P
    spec: Optional[RunSpec] = None
    swarm: Optional[SwarmDHT] = None  # the run's records (None: a bootstrap that publishes no spec)
    relayed: Optional[RelayedSide] = None  # the reservation, when others cannot dial this node

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id.to_base58()

    @property
    def via(self) -> str:
        """The relay that forwards to this node, as its record announces it ("" when dialled directly)."""
        return (self.relayed.via or "") if self.relayed is not None else ""


@contextlib.contextmanager
def joined(
    net: NetworkConfig,
    event: Callable,
    *,
    run: Optional[RunConfig] = None,
    spec: Optional[RunSpec] = None,
    default_identity: Optional[str] = None,
    check_reach: bool = True,
    validators: Sequence = (),
    report_ignored: Optional[Callable[[str, str], None]] = None,
) -> Iterator[Joined]:
    """Join the swarm for the ``with`` block. ``run``: which run (a loaded spec, or a run id whose
    spec the DHT publishes, checked as ``--spec-digest``/``--trusted-key`` say); or ``spec``: the
    node's own (a bootstrap's). ``check_reach``: ask the relays to dial this node back first and,
    when nobody can, join the DHT as a client and serve through a relay (a bootstrap does not)."""
    identity = load_or_create_identity(net.identity or default_identity)
    event("starting", f"{identity.peer_id} joining the swarm", peer_id=str(identity.peer_id))
    with contextlib.ExitStack() as stack:
        stack.callback(cleanup_identity, identity)
        reach = check_at_start(net, event) if check_reach else Reachability(None, "", "not checked")
        dht = start_dht(
            identity,
            initial_peers=net.initial_peers,
            host_maddrs=net.host_maddrs,
            announce_maddrs=net.announce_maddrs,
            client_mode=net.client_mode or reach.reachable is False,  # nobody waits on an undialable server
            validators=validators,
        )
        stack.callback(_quietly, dht.shutdown)
        if run is not None:
            spec = resolve_run_spec(
                dht,
                run.spec,
                run.run_id,
                run.spec_digest,
                trusted_keys=run.trusted_keys,
                report_ignored=report_ignored,
            )
        loop = LoopThread()
        stack.callback(loop.stop)
        node = Joined(identity, reach, dht, loop, loop.run(dht.replicate_p2p(), timeout=30), spec)
        if spec is not None:
            node.swarm = SwarmDHT(dht, spec, identity)
        if reach.reachable is False and net.use_relay:
            node.relayed = RelayedSide(node.p2p, loop, relays_of(net), event)
            stack.callback(node.relayed.stop)
            node.relayed.start()
        yield node


def _quietly(stop: Callable[[], None]) -> None:
    try:
        stop()
    except Exception:
        pass


class StopSignals:
    """Ctrl-C or SIGTERM: the first sets ``stop`` and says ``why`` in an event; a second sets
    ``hurry`` (stop waiting for anything). Installed in the node's own process only: a process
    hivemind forks from it (an averager) inherits the handler and must die on the reaper's SIGTERM,
    not stop the node."""

    def __init__(self, event: Callable, why: str):
        self.event, self.why = event, why
        self.stop = threading.Event()
        self.hurry = False
        self._pid = os.getpid()

    def install(self) -> "StopSignals":
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        if os.getpid() != self._pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.stop.is_set():
            self.hurry = True
            return
        name = signal.Signals(signum).name
        self.event("stopping", f"{name}: {self.why}", signal=name)
        self.stop.set()
