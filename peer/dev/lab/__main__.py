"""``python -m peer.dev.lab``: measure the lab's link profiles (``check``), or remove labs left by
killed processes (``cleanup``)."""

from __future__ import annotations

import argparse
import json
import signal
import sys

import peer.dev.lab
from peer.dev.lab.check import check_profile
from peer.dev.lab.netns import cleanup_stale, missing
from peer.dev.lab.profiles import PROFILES


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=peer.dev.lab.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="measure link profiles; exit 1 if one is more than 10%% off")
    c.add_argument("--profile", action="append", choices=sorted(PROFILES), help="default: all")
    c.add_argument("--seconds", type=float, default=3.0)
    sub.add_parser("cleanup", help="remove the namespaces of labs whose process is gone")
    args = ap.parse_args(argv)
    why = missing()
    if why:
        print(f"netlab: {why}", file=sys.stderr)
        return 2
    if args.cmd == "cleanup":
        for ns in cleanup_stale():
            print(f"removed {ns}")
        return 0
    signal.signal(signal.SIGTERM, _interrupt)  # a killed check still removes its lab
    ok = True
    for name in args.profile or sorted(PROFILES):
        result = check_profile(name, seconds=args.seconds)
        print(json.dumps(result), flush=True)
        ok &= result["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
