"""The network lab itself (peer/dev/lab): profiles deliver what they claim, a host behind
NAT dials out but nobody dials in, and every namespace and process it made is gone afterwards,
also when the process that made it was killed. Needs root, iproute2 and nftables: without
them each test skips and says why (``.ci/run`` installs them, so in CI they run)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from peer.base.procs import alive
from peer.dev import lab as netlab

from labkit import lab_marks

pytestmark = lab_marks(300)


def _ping(lab, src, dst, port: int, count: int = 10) -> dict:
    echo = lab.echo(dst, port, seconds=20)
    try:
        out = lab.run(
            src,
            lab.probe(
                src, ["ping", "--to", dst.public_addr, "--port", str(port), "--count", str(count), "--timeout", "0.5"]
            ),
        )
    finally:
        netlab.kill_group(echo)
    return json.loads(out)


@pytest.mark.parametrize("profile", ["broadband", "far", "lan"])
def test_a_profile_delivers_its_round_trip_and_rates(profile):
    result = netlab.check_profile(profile, seconds=2.0)
    assert result["ok"], result


def test_a_host_behind_nat_dials_out_and_nobody_dials_in():
    with netlab.Lab() as lab:
        public = lab.add_host("pub", "lan")
        home = lab.add_host("home", "lan", nat=True)
        assert home.addr.startswith("192.168.") and home.public_addr.startswith(netlab.SWITCH_NET)
        out = _ping(lab, home, public, 6000)
        assert out["lost"] == 0 and len(out["rtt_ms"]) == 10, out
        inbound = _ping(lab, public, home, 6001, count=4)
        assert inbound["rtt_ms"] == [] and inbound["lost"] == 4, inbound
        # TCP to the router's address: no port forwarding, so no connection.
        code = "import socket,sys; s=socket.socket(); s.settimeout(2); sys.exit(s.connect_ex((sys.argv[1], 22)) == 0)"
        rc = lab.spawn(public.ns, [sys.executable, "-c", code, home.public_addr]).wait(timeout=30)
        assert rc == 0


def test_close_removes_every_namespace_and_process():
    lab = netlab.Lab()
    try:
        lab.add_host("a", "broadband")
        lab.add_host("b", "far", nat=True)
        pids = [p.pid for p in lab.procs]
        names = list(lab.namespaces)
        assert len(pids) == 2 and alive(pids) == pids  # the two links' wires
    finally:
        lab.close()
    assert not set(names) & set(netlab.lab_namespaces())
    assert not alive(pids)


def test_a_lab_left_by_a_killed_process_is_removed_by_name():
    code = (
        "from peer.dev import lab as netlab; import time; "
        "lab = netlab.Lab(); lab.add_host('x', 'broadband'); print('up', flush=True); time.sleep(600)"
    )
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert owner.stdout.readline().strip() == "up"
        left = [ns for ns in netlab.lab_namespaces() if ns.startswith(f"{netlab.PREFIX}{owner.pid}-")]
        assert len(left) == 2  # the switch and the host
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(timeout=10)
        removed = netlab.cleanup_stale()
        assert set(left) <= set(removed)
        assert not set(left) & set(netlab.lab_namespaces())
    finally:
        if owner.poll() is None:
            os.killpg(owner.pid, signal.SIGKILL)
        netlab.cleanup_stale()
