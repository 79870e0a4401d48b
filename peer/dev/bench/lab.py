"""swarmtrain in the network lab: tokens/s, bytes per token and time to a first contribution on
named link profiles, as a fraction of the same swarm on unshaped links.

Per preset (tiny, small) and averaging mode (per_step, outer): a bootstrap and 2 stages x 2
peers, each on its own lab host, one torch thread each, both stage-0 peers training on their own
data, with the defaults ``spec init`` writes except the outer round (30 s, so that a run holds
rounds). Each profile (``lan``, ``broadband``, ``far``) is one run; so is ``baseline``: the same
namespaces and links with no added delay, jitter, loss or rate limit (kernel only).
**utilization** = tokens/s on the profile / tokens/s on the baseline, in the same invocation.
One more run per preset, ``broadband`` in outer mode with three peers behind their own NATs (the
two stage-1 peers and one trainer), gives the NATed peers' time from start to a first
contributed step, served through the bootstrap's relay.

Before the swarms, every profile is measured in the lab (round-trip and rate each way); the
benchmark fails a profile more than 10% off what it claims. Needs root, ``ip``, ``tc``, ``nft``.

    sudo .venv/bin/python scripts/bench_lab.py [--quick] > lab.jsonl

``--quick`` (the test runs it): tiny preset, outer mode, ``baseline`` and ``broadband`` plus the
NAT run, 45 s each. Full: 31-33 minutes on 2 cores (2026-12-06). Each run also reports the share of
the machine's CPU the swarm and the lab's userspace links used while measuring.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from peer.averaging.wire_stats import ENV as WIRE_STATS_ENV
from peer.averaging.wire_stats import read_totals
from peer.dev import lab as netlab
from peer.dev.bench.common import (
    check_choices,
    default_text_data,
    emit,
    graceful_stop,
    machine,
    make_spec,
    say,
    sigterm_as_interrupt,
    status_points,
    steady_rate,
)
from peer.dev.launcher import SWARMTRAIN, Cluster

BENCH = "lab"
BASELINE = netlab.Profile("baseline", up_mbit=10000.0, down_mbit=10000.0)
READY_TIMEOUT = 300.0
WARMUP_S = 10.0
OUTER = dict(round_seconds=30.0, gather_seconds=6.0, agree_seconds=4.0)
GOAL_UTILIZATION = 0.8  # outer mode, small preset, broadband
GOAL_NAT_FIRST_S = 30.0  # a NATed peer's first contribution on broadband


def lab_spec(preset: str, averaging: str):
    outer = OUTER if averaging == "outer" else None
    return make_spec(preset, f"bench-lab-{preset}-{averaging}", averaging=averaging, outer=outer)


def cpu_seconds(pids) -> float:
    """User and system CPU seconds the live processes among ``pids`` have used so far."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def run_swarm(args, work: Path, preset: str, mode: str, profile, *, nat: bool = False) -> dict:
    """One swarm on ``profile``; with ``nat`` the stage-1 peers and trainer ``a1`` sit behind NATs."""
    work.mkdir(parents=True, exist_ok=True)
    spec_path = work / "spec.toml"
    lab_spec(preset, mode).save(spec_path)
    wire = work / "wire"
    natted = {"b0", "b1", "a1"} if nat else set()
    extra = ["--status-every", "1", "--max-seconds", f"{args.seconds + 240:.0f}", "--threads", "1"]
    if args.data_suffix:
        extra += ["--data-suffix", args.data_suffix]
    with netlab.Lab() as lab, Cluster(work, env={WIRE_STATS_ENV: str(wire), "OMP_NUM_THREADS": "1"}) as cluster:
        hosts = {n: lab.add_host(n, profile, nat=n in natted) for n in ("boot", "b0", "b1", "a0", "a1")}
        boot = cluster.start(
            "boot",
            ["bootstrap", "--host-maddrs", f"/ip4/{hosts['boot'].addr}/tcp/31337", "--identity",
             str(work / "boot.id"), "--log-json", "--spec", str(spec_path)],
            command=hosts["boot"].exec_prefix() + SWARMTRAIN,
        )  # fmt: skip
        addr = next(m for m in boot.wait_event("ready", READY_TIMEOUT)["maddrs"] if hosts["boot"].addr in m)
        peers = {}
        for name in ("b0", "b1", "a0", "a1"):
            args_ = ["run", "--log-json", "--initial-peers", addr, "--spec", str(spec_path),
                     "--stage", "1" if name[0] == "b" else "0", *extra]  # fmt: skip
            if name[0] == "a":
                args_ += ["--data", args.data]
            peers[name] = cluster.start(name, args_, command=hosts[name].exec_prefix() + SWARMTRAIN)
        for p in peers.values():
            p.wait_event("ready", READY_TIMEOUT)
        # Where the machine's CPU went while measuring: the swarm's processes (with their p2pd
        # daemons) and the lab's own userspace links (delay, jitter and loss).
        wires, swarm = [p.pid for p in lab.procs], cluster.all_pids()
        cpu = (cpu_seconds(wires), cpu_seconds(swarm))
        started = time.monotonic()
        while time.monotonic() - started < args.seconds:
            time.sleep(2.0)
            dead = [n for n, p in peers.items() if not p.alive()]
            if dead:
                raise RuntimeError(f"{dead} exited early; see the logs in {work}")
        capacity = (time.monotonic() - started) * (os.cpu_count() or 1)
        shares = dict(
            lab_links_cpu_share=(cpu_seconds(wires) - cpu[0]) / capacity,
            swarm_cpu_share=(cpu_seconds(swarm) - cpu[1]) / capacity,
        )
        graceful_stop(list(peers.values()))
        events = {n: list(p.events) for n, p in peers.items()}
    return {**summarize(events, wire, mode, natted), **shares}


def summarize(events: dict[str, list[dict]], wire: Path, mode: str, natted: set) -> dict:
    last = {n: next((e for e in reversed(ev) if e.get("event") == "status"), {}) for n, ev in events.items()}
    rates = [steady_rate(status_points(events[n]), WARMUP_S) for n in ("a0", "a1")]
    tokens = sum(last[n].get("tokens") or 0 for n in ("a0", "a1"))
    if not tokens or any(r is None for r in rates):
        raise RuntimeError("no tokens trained")
    sent = {n: last[n].get("bytes_sent") or {} for n in last}
    activations = sum(s.get("activations", 0) for s in sent.values())
    if mode == "outer":
        averaging = sum(s.get("averaging", 0) for s in sent.values())
    else:
        totals = read_totals(wire)
        averaging = sum(totals.get(role, {}).get("sent_bytes", 0) for role in ("grad", "state"))
    first = {n: next((e["seconds"] for e in ev if e.get("event") == "contributing"), None) for n, ev in events.items()}
    relayed = {n: any(e.get("event") == "relayed" for e in ev) for n, ev in events.items()}
    return dict(
        tokens=tokens,
        tokens_per_s=sum(r["tokens_per_s"] for r in rates),
        activation_bytes_per_token=activations / tokens,
        averaging_bytes_per_token=averaging / tokens,
        first_contribution_s=first,
        natted=sorted(natted),
        relayed=sorted(n for n, r in relayed.items() if r),
        trainer_loss=[last[n].get("loss") for n in ("a0", "a1")],
    )


def check_profiles(names) -> bool:
    ok = True
    for name in names:
        got = netlab.check_profile(name)
        emit(BENCH, "profile_check", **got)
        if not got["ok"]:
            say(f"profile {name} is more than 10% off what it claims: {got['measured']}")
            ok = False
    return ok


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny, outer, baseline + broadband + NAT, 45 s each")
    p.add_argument("--seconds", type=float, default=None, help="measured seconds per run (full 60, quick 45)")
    p.add_argument("--presets", default=None, help="comma-separated (full tiny,small; quick tiny)")
    p.add_argument("--modes", default=None, help="comma-separated (full per_step,outer; quick outer)")
    p.add_argument("--profiles", default=None, help="comma-separated (full lan,broadband,far; quick broadband)")
    p.add_argument("--data", default=None, help="text directory (default: the Python stdlib's .py files)")
    p.add_argument("--data-suffix", default=None)
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    q = args.quick
    args.seconds = args.seconds or (45.0 if q else 60.0)
    args.presets = (args.presets or ("tiny" if q else "tiny,small")).split(",")
    args.modes = (args.modes or ("outer" if q else "per_step,outer")).split(",")
    args.profiles = (args.profiles or ("broadband" if q else "lan,broadband,far")).split(",")
    check_choices(p, args.profiles, list(netlab.PROFILES), "profile")
    default_text_data(args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    why = netlab.missing()
    if why:
        say(f"the network lab cannot run here: {why}")
        return 2
    sigterm_as_interrupt()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="swarmtrain-bench-lab-"))
    say(f"lab benchmark ({'quick' if args.quick else 'full'}); logs in {work}")
    emit(BENCH, "config", **{**vars(args), "workdir": str(work)}, machine=machine())
    started = time.monotonic()
    failed = 0
    try:
        if not check_profiles(args.profiles):
            return 1
        for preset in args.presets:
            for mode in args.modes:
                rows = {}
                for profile in [BASELINE, *(netlab.PROFILES[n] for n in args.profiles)]:
                    say(f"{preset} {mode} on {profile.name}: {args.seconds:.0f} s")
                    try:
                        rows[profile.name] = row = run_swarm(
                            args, work / f"{preset}-{mode}-{profile.name}", preset, mode, profile
                        )
                    except Exception as err:
                        failed += 1
                        emit(
                            BENCH, "run_failed", preset=preset, mode=mode, profile=profile.name, error=str(err)[-1500:]
                        )
                        continue
                    base = rows.get(BASELINE.name)
                    util = row["tokens_per_s"] / base["tokens_per_s"] if base else None
                    emit(BENCH, "run", preset=preset, mode=mode, profile=profile.name, utilization=util, **row)
                if mode == "outer" and "broadband" in args.profiles:
                    say(f"{preset} outer on broadband, three peers behind NATs: {args.seconds:.0f} s")
                    try:
                        row = run_swarm(
                            args, work / f"{preset}-outer-nat", preset, "outer", netlab.PROFILES["broadband"], nat=True
                        )
                    except Exception as err:
                        failed += 1
                        emit(
                            BENCH,
                            "run_failed",
                            preset=preset,
                            mode=mode,
                            profile="broadband+nat",
                            error=str(err)[-1500:],
                        )
                        continue
                    base = rows.get(BASELINE.name)
                    nat_first = [row["first_contribution_s"].get(n) for n in row["natted"]]
                    emit(
                        BENCH,
                        "run",
                        preset=preset,
                        mode=mode,
                        profile="broadband+nat",
                        utilization=row["tokens_per_s"] / base["tokens_per_s"] if base else None,
                        nat_first_contribution_max_s=max((s for s in nat_first if s is not None), default=None),
                        nat_goal_s=GOAL_NAT_FIRST_S,
                        **row,
                    )
    except KeyboardInterrupt:
        say("interrupted: every process, namespace and interface was removed")
        return 130
    say(f"done in {time.monotonic() - started:.0f}s; {failed} run(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
