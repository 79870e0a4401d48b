"""The network lab's namespaces, links and processes: a ``Lab`` of ``Host``s on one switch, each on
its profile's link, optionally behind a NAT router of its own (the package ``peer.dev.lab`` says
how), and the removal of labs left by a killed process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from peer.base.procs import alive
from peer.dev.lab.profiles import PROFILES, Profile

# Run by path with this Python: standard library only, so nothing but the file is needed.
WIRE = Path(__file__).with_name("wire.py")
PROBE = Path(__file__).with_name("probe.py")
PREFIX = "stl"
SWITCH_NET = "10.77.0"
# A home router: masquerade out of wan0, nothing from outside gets in (no port forwarding).
NAT_RULES = """
table ip nat {
  chain post {
    type nat hook postrouting priority 100; policy accept;
    oifname "wan0" masquerade
  }
}
table inet filter {
  chain forward {
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    iifname "lan0" accept
  }
  chain input {
    type filter hook input priority 0; policy drop;
    ct state established,related accept
    iifname { "lan0", "lo" } accept
  }
}
"""


def missing() -> Optional[str]:
    """Why the lab cannot run here, or None."""
    if os.geteuid() != 0:
        return "the network lab needs root (network namespaces, tc, nft)"
    for tool in ("ip", "tc", "nft"):
        if shutil.which(tool) is None:
            return f"the network lab needs {tool!r} (apt-get install iproute2 nftables)"
    if not Path("/dev/net/tun").exists():
        return "the network lab needs /dev/net/tun (TAP devices carry its shaped links)"
    return None


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {result.stderr.strip() or result.stdout.strip()}")
    return result


def _tbf(ns: str, dev: str, mbit: float) -> None:
    # A burst of at least one tick's worth at the rate (HZ may be 100), and at least 64 KiB so
    # that a GSO super-frame passes; about 50 ms of queue, as a home router's buffer.
    burst = max(64 * 1024, int(mbit * 1e6 / 8 / 100))
    limit = max(burst * 2, int(mbit * 1e6 / 8 * 0.05))
    sh(
        "ip",
        "netns",
        "exec",
        ns,
        "tc",
        "qdisc",
        "replace",
        "dev",
        dev,
        "root",
        "tbf",
        "rate",
        f"{mbit}mbit",
        "burst",
        str(burst),
        "limit",
        str(limit),
    )


def lab_namespaces() -> list[str]:
    out = sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


def cleanup_stale() -> list[str]:
    """Delete the namespaces of labs whose owner (the pid in their name) is gone; returns them.
    The processes inside were started by that owner and died with it or are killed here, by
    the pids the kernel lists for the namespace."""
    removed = []
    for ns in lab_namespaces():
        owner = ns[len(PREFIX) :].split("-", 1)[0]
        if owner.isdigit() and not alive([int(owner)]):
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            sh("ip", "netns", "del", ns, check=False)
            removed.append(ns)
    return removed


@dataclass
class Host:
    name: str
    ns: str
    addr: str  # the host's own address (private when behind NAT)
    profile: Profile
    public_addr: str  # what others see: the host's, or its router's
    nat: bool = False
    router_ns: Optional[str] = None

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]


@dataclass
class Lab:
    """Namespaces, links and processes, all removed by ``close``."""

    owner: int = field(default_factory=os.getpid)
    hosts: dict[str, Host] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)
    _next: int = 10

    def __post_init__(self):
        why = missing()
        if why:
            raise RuntimeError(why)
        self.tag = f"{PREFIX}{self.owner}-"
        self.switch = self._netns("sw")
        sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.switch, "link", "set", "br0", "up")

    # --- namespaces and links --------------------------------------------------------------

    def _netns(self, short: str) -> str:
        name = self.tag + short
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def _uplink(self, ns: str, dev: str, port: str, profile: Profile, seed: int) -> None:
        """Join ``dev`` in ``ns`` to the bridge through the profile's link."""
        sw = self.switch
        if profile.kernel_only:
            sh("ip", "link", "add", "tmp-" + port, "netns", ns, "type", "veth", "peer", "name", port, "netns", sw)
            sh("ip", "-n", ns, "link", "set", "tmp-" + port, "name", dev)
        else:
            sh("ip", "-n", ns, "tuntap", "add", "dev", dev, "mode", "tap")
            sh("ip", "-n", sw, "tuntap", "add", "dev", port, "mode", "tap")
            direction = f"{profile.delay_ms},{profile.jitter_ms},{profile.loss}"
            wire = self.spawn(
                ns,
                [
                    sys.executable,
                    str(WIRE),
                    "--a",
                    dev,
                    "--b",
                    port,
                    "--b-ns",
                    f"/run/netns/{sw}",
                    "--a-to-b",
                    direction,
                    "--b-to-a",
                    direction,
                    "--seed",
                    str(seed),
                ],
                stdout=subprocess.PIPE,
            )
            line = wire.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"the link of {ns} did not start: {line or wire.poll()}")
        sh("ip", "-n", sw, "link", "set", port, "master", "br0")
        sh("ip", "-n", sw, "link", "set", port, "up")
        sh("ip", "-n", ns, "link", "set", dev, "up")
        _tbf(ns, dev, profile.up_mbit)
        _tbf(sw, port, profile.down_mbit)

    def add_host(self, name: str, profile: str | Profile = "lan", *, nat: bool = False) -> Host:
        """A host on the switch, or (``nat``) behind a router of its own whose uplink is the profile."""
        profile = PROFILES[profile] if isinstance(profile, str) else profile
        if name in self.hosts:
            raise ValueError(f"host {name!r} exists")
        i = self._next
        self._next += 1
        public = f"{SWITCH_NET}.{i}"
        ns = self._netns(name)
        if not nat:
            self._uplink(ns, "eth0", f"p{i}", profile, seed=i)
            sh("ip", "-n", ns, "addr", "add", f"{public}/24", "dev", "eth0")
            host = Host(name, ns, public, profile, public)
        else:
            gw = self._netns(name + "-gw")
            self._uplink(gw, "wan0", f"p{i}", profile, seed=i)
            sh("ip", "-n", gw, "addr", "add", f"{public}/24", "dev", "wan0")
            lan = f"192.168.{i}"
            sh("ip", "link", "add", "lan0", "netns", gw, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", gw, "addr", "add", f"{lan}.1/24", "dev", "lan0")
            sh("ip", "-n", gw, "link", "set", "lan0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{lan}.2/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "route", "add", "default", "via", f"{lan}.1")
            sh("ip", "netns", "exec", gw, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            subprocess.run(["ip", "netns", "exec", gw, "nft", "-f", "-"], input=NAT_RULES, text=True, check=True)
            host = Host(name, ns, f"{lan}.2", profile, public, nat=True, router_ns=gw)
        self.hosts[name] = host
        return host

    # --- processes ---------------------------------------------------------------------------

    def spawn(self, ns: str, cmd: Sequence[str], **popen) -> subprocess.Popen:
        """A process inside ``ns``, in its own session, killed by ``close``."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *cmd],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            text=True,
            **popen,
        )
        self.procs.append(proc)
        return proc

    def run(self, host: Host, cmd: Sequence[str], timeout: float = 60.0) -> str:
        proc = self.spawn(host.ns, cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} in {host.name}: rc {proc.returncode}: {err.strip()[-500:]}")
        return out

    def close(self) -> None:
        for proc in reversed(self.procs):
            kill_group(proc)
        for ns in reversed(self.namespaces):
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                try:  # a process some child started inside the namespace and left behind
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            sh("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()
        self.procs.clear()

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- measuring what a link delivers ---------------------------------------------------------

    def probe(self, host: Host, args: Sequence[str]) -> list[str]:
        return [sys.executable, str(PROBE), *args]

    def echo(self, host: Host, port: int, seconds: float = 30.0) -> subprocess.Popen:
        """A UDP echo on ``host``, returned once its socket is bound (a ping sent earlier is lost)."""
        proc = self.spawn(
            host.ns,
            self.probe(host, ["echo", "--bind", host.addr, "--port", str(port), "--seconds", str(seconds)]),
            stdout=subprocess.PIPE,
        )
        ready = proc.stdout.readline()
        if '"ready"' not in ready:
            kill_group(proc)
            raise RuntimeError(f"the echo on {host.name}:{port} did not start (rc {proc.poll()})")
        return proc

    def measure(self, a: Host, b: Host, *, seconds: float = 3.0, port: int = 5201) -> dict:
        """Round-trip a <-> b, and the rate a -> b as it arrived at b."""
        echo = self.echo(b, port)
        try:
            pings = json.loads(
                self.run(a, self.probe(a, ["ping", "--to", b.public_addr, "--port", str(port), "--count", "30"]))
            )
        finally:
            kill_group(echo)
        tcp = a.profile.kernel_only and b.profile.kernel_only
        sink = self.spawn(
            b.ns,
            self.probe(
                b,
                ["sink", "--bind", b.addr, "--port", str(port + 1), "--seconds", str(seconds + 3)]
                + (["--tcp"] if tcp else []),
            ),
            stdout=subprocess.PIPE,
        )
        time.sleep(0.3)
        expected = min(a.profile.up_mbit, b.profile.down_mbit)
        send = ["send", "--to", b.public_addr, "--port", str(port + 1), "--seconds", str(seconds)]
        self.run(
            a, self.probe(a, send + (["--tcp"] if tcp else ["--mbit", str(expected * 1.25)])), timeout=seconds + 30
        )
        out, _ = sink.communicate(timeout=seconds + 30)
        return {"rtt_ms": pings["median_ms"], "ping_lost": pings["lost"], "rate": json.loads(out), "tcp": tcp}


def kill_group(proc: subprocess.Popen, grace: float = 3.0) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
