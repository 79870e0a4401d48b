"""The network lab: volunteers behind home routers and on thin, far links, on one machine.

A ``Lab`` makes Linux network namespaces: one switch (a bridge, the "internet"), one per host,
and one router per host behind NAT. Each host's uplink is a link profile:

- ``lan``: a veth pair into the bridge, ``tbf`` at 1 Gbit/s each way, no added delay (kernel
  only: the round-trip is the kernel's, well under 1 ms);
- ``broadband``: 50 Mbit/s down, 10 up, 20 ms each way, 0.1% loss each way;
- ``far``: 10 Mbit/s each way, 75 ms each way with 5 ms jitter, 1% loss each way.

A shaped link is two TAP devices (one in the host or its router, one a port of the bridge)
joined by a ``wire.py`` process that adds the delay, jitter and loss (this kernel has no
``netem``), with ``tbf`` shaping the rate on each TAP's egress. A host behind NAT sits on a
private LAN behind its router namespace, whose uplink is the profile's link; the router
masquerades and drops every connection that does not start inside (no port forwarding).

Addresses: the switch's subnet is 10.77.0.0/24, the LAN behind router i 192.168.<i>.0/24, only
on interfaces the lab creates inside its own namespaces; nothing outside them is addressed.
Every namespace name starts with ``stl<pid>-`` (the pid of the process that made it), so a lab
left behind by a killed process is found and removed by name (``netlab.py cleanup``), and
``Lab.close`` (also on failure and Ctrl-C) kills every process it started by pid and deletes
every namespace it made.

    sudo .venv/bin/python scripts/netlab.py check --profile broadband   # measures a profile
    sudo .venv/bin/python scripts/netlab.py cleanup                     # removes stale labs

Needs root, ``ip`` and ``tc`` (iproute2) and ``nft`` (nftables); ``missing()`` says what is not
there, for tests to skip with the reason.
"""

from peer.dev.lab.check import check_profile
from peer.dev.lab.netns import (
    PREFIX,
    SWITCH_NET,
    Host,
    Lab,
    cleanup_stale,
    kill_group,
    lab_namespaces,
    missing,
)
from peer.dev.lab.profiles import PROFILES, Profile

__all__ = [
    "PREFIX",
    "PROFILES",
    "SWITCH_NET",
    "Host",
    "Lab",
    "Profile",
    "check_profile",
    "cleanup_stale",
    "kill_group",
    "lab_namespaces",
    "missing",
]
