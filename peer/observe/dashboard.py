"""The dashboard: a small web page that shows one run of the swarm live.

A poller thread reads the DHT (``peer.observe.status.swarm_snapshot``) every couple of seconds and
keeps the latest snapshot and a bounded history (loss and tokens/s over time) in memory; a
stdlib ``ThreadingHTTPServer`` serves

- ``/``            the page (``peer/observe/static/dashboard.html``: self-contained, no CDN: the
                   volunteer's machine may have no internet);
- ``/api/swarm``   the latest snapshot as JSON, checkpoints grouped per stage and digest;
- ``/api/history`` the history as JSON (``?max=N``: at most N points, evenly spread).

The server only reads: it answers GET and nothing else, and listens on 127.0.0.1 unless told
otherwise. Everything it shows comes from DHT records, which are claims of the peers that
signed them (see ``docs`` on trust): the page shows them as such.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Callable, Optional

log = logging.getLogger("swarmtrain.dashboard")

POLL_PERIOD = 2.0
MAX_POINTS = 3600  # two hours at the default poll period; older points are dropped
RATE_WINDOW = 20.0  # seconds of token counters behind the live tokens/s figure


# --- history (pure: fed snapshots, no I/O) ----------------------------------------------------------


def peer_tokens(snapshot: dict) -> dict[str, int]:
    """Tokens each training peer says it has driven through the pipeline."""
    out = {}
    for stage in snapshot.get("stages", ()):
        for p in stage.get("peers", ()):
            if p.get("has_data"):
                out[p["peer_id"]] = int(p.get("tokens") or 0)
    return out


def windowed_rate(samples: "collections.deque[tuple[float, dict[str, int]]]") -> Optional[float]:
    """Tokens/s over the samples (time, {peer: tokens counter}), oldest first.

    Each peer contributes the growth of its own counter between the first and the last sample
    that saw it, so a peer that joins or leaves inside the window neither adds its whole
    counter nor makes the total drop; a counter that went backwards (a restarted peer with the
    same id) contributes nothing. None until the window spans some time."""
    if len(samples) < 2:
        return None
    span = samples[-1][0] - samples[0][0]
    if span <= 0:
        return None
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for _, counters in samples:
        for peer, tokens in counters.items():
            first.setdefault(peer, tokens)
            last[peer] = tokens
    grown = sum(max(0, last[p] - first[p]) for p in last)
    return grown / span


class History:
    """Loss, tokens/s and peer counts over time, as the dashboard's charts show them."""

    def __init__(self, max_points: int = MAX_POINTS, rate_window: float = RATE_WINDOW):
        self.points: "collections.deque[dict]" = collections.deque(maxlen=max_points)
        self.rate_window = rate_window
        self._counters: "collections.deque[tuple[float, dict[str, int]]]" = collections.deque()
        self._lock = threading.Lock()

    def add(self, snapshot: dict, now: Optional[float] = None) -> dict:
        now = snapshot.get("time", time.time()) if now is None else now
        with self._lock:
            self._counters.append((now, peer_tokens(snapshot)))
            while len(self._counters) > 2 and now - self._counters[1][0] >= self.rate_window:
                self._counters.popleft()
            stages = snapshot.get("stages", ())
            point = {
                "time": round(now, 3),
                "loss": snapshot.get("loss"),
                # Live: growth of the peers' token counters over the last RATE_WINDOW seconds.
                "tokens_per_s": _round(windowed_rate(self._counters)),
                # What the peers announce: their average since they started training.
                "announced_tokens_per_s": snapshot.get("tokens_per_s"),
                "tokens": sum(self._counters[-1][1].values()),
                "peers": snapshot.get("num_peers", 0),
                "online": [s.get("online", 0) for s in stages],
                "stage_throughput": [s.get("throughput", 0.0) for s in stages],
                "epochs": [s.get("epoch", 0) for s in stages],
            }
            self.points.append(point)
            return point

    def as_list(self) -> list[dict]:
        with self._lock:
            return list(self.points)


def downsample(points: list, limit: int) -> list:
    """At most ``limit`` points spread evenly over ``points``, the first and the last kept: a
    chart a few hundred pixels wide needs no more, and hours of history stay a small reply."""
    n = len(points)
    if limit <= 0 or n <= limit:
        return list(points)
    if limit == 1:
        return [points[-1]]
    return [points[round(i * (n - 1) / (limit - 1))] for i in range(limit)]


def _round(x: Optional[float], digits: int = 1) -> Optional[float]:
    return None if x is None else round(x, digits)


def finite(obj):
    """``obj`` with NaN and infinities replaced by None: JSON has no such numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


# --- the poller -------------------------------------------------------------------------------------


class Poller:
    """Calls ``read()`` (a snapshot of the swarm) every ``period`` seconds in a thread."""

    def __init__(
        self,
        read: Callable[[], dict],
        *,
        period: float = POLL_PERIOD,
        history: Optional[History] = None,
        decorate: Callable[[dict], dict] = lambda s: s,
    ):
        self.read, self.period, self.decorate = read, period, decorate
        self.history = history or History()
        self.latest: Optional[dict] = None
        self.last_error: Optional[str] = None
        self.last_poll: Optional[float] = None
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dashboard-poller", daemon=True)

    def start(self) -> "Poller":
        self._thread.start()
        return self

    def poll_once(self) -> None:
        try:
            snapshot = self.decorate(self.read())
        except Exception as err:  # the DHT may time out: keep the last snapshot and say so
            self.last_error = f"{type(err).__name__}: {err}"
            log.warning("dashboard: reading the swarm failed: %s", self.last_error)
            return
        self.history.add(snapshot)
        self.latest = snapshot
        self.last_error = None
        self.last_poll = time.time()
        self.polls += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.poll_once()
            self._stop.wait(max(0.1, self.period - (time.monotonic() - started)))

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def swarm_view(self) -> dict:
        view = dict(self.latest) if self.latest is not None else {"stages": [], "checkpoints": [], "run_id": None}
        view["observer"] = {
            "last_poll": self.last_poll,
            "error": self.last_error,
            "polls": self.polls,
            "poll_period": self.period,
        }
        return view


def checkpoint_decorator(trusted_fingerprints: set[str]) -> Callable[[dict], dict]:
    """Adds ``checkpoint_rows`` to a snapshot: its announcements grouped by (stage, digest),
    each signer marked trusted or not by the spec's trust keys."""
    from peer.checkpoints import announced_checkpoints
    from protocol.records import CheckpointAnnouncement

    def decorate(snapshot: dict) -> dict:
        announcements = [
            (c["peer_id"], CheckpointAnnouncement.from_record({k: v for k, v in c.items() if k != "peer_id"}))
            for c in snapshot.get("checkpoints", ())
        ]
        rows = announced_checkpoints(announcements)
        for row in rows:
            row["signers"] = [{"fingerprint": s, "trusted": s in trusted_fingerprints} for s in row["signers"]]
        return {**snapshot, "checkpoint_rows": rows}

    return decorate


def trusted_fingerprints(spec) -> set[str]:
    from protocol.checkpoint import trusted_key_map

    try:
        return set(trusted_key_map(spec.trust.trusted_keys))
    except Exception:
        return set()


# --- the HTTP server ---------------------------------------------------------------------------------


def page_html() -> bytes:
    return resources.files("peer.observe").joinpath("static/dashboard.html").read_bytes()


def _int_param(query: str, name: str) -> Optional[int]:
    from urllib.parse import parse_qs

    try:
        return max(0, int(parse_qs(query).get(name, [""])[0]))
    except ValueError:
        return None


def _handler_for(poller: Poller, page: bytes):
    class Handler(BaseHTTPRequestHandler):
        server_version = "swarmtrain-dashboard"

        def do_GET(self):  # noqa: N802 (http.server's naming)
            path, _, query = self.path.partition("?")
            if path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
            elif path == "/api/swarm":
                self._json(poller.swarm_view())
            elif path == "/api/history":
                points = poller.history.as_list()
                limit = _int_param(query, "max")
                self._json(
                    {
                        "points": downsample(points, limit) if limit else points,
                        "total_points": len(points),
                        "poll_period": poller.period,
                        "rate_window": poller.history.rate_window,
                    }
                )
            elif path == "/healthz":
                self._send(HTTPStatus.OK, b"ok\n", "text/plain")
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")

        def _json(self, obj) -> None:
            self._send(
                HTTPStatus.OK, json.dumps(finite(obj), allow_nan=False, default=str).encode(), "application/json"
            )

        def _send(self, status, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            # The page loads nothing from elsewhere; say so to the browser as well.
            self.send_header(
                "Content-Security-Policy",
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                "connect-src 'self'; img-src 'self' data:",
            )
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt, *args):  # requests are not worth a line each on the console
            log.debug("dashboard %s: " + fmt, self.address_string(), *args)

    return Handler


class Dashboard:
    """The poller and the HTTP server of one run; ``start`` then ``url``, ``close`` at the end."""

    def __init__(self, swarm, *, host: str = "127.0.0.1", port: int = 0, period: float = POLL_PERIOD):
        from peer.observe.status import swarm_snapshot

        self.swarm = swarm
        self.poller = Poller(
            lambda: swarm_snapshot(swarm),
            period=period,
            decorate=checkpoint_decorator(trusted_fingerprints(swarm.spec)),
        )
        self.httpd = ThreadingHTTPServer((host, port), _handler_for(self.poller, page_html()))
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="dashboard-http", daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        host = self.httpd.server_address[0]
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/"

    def start(self) -> "Dashboard":
        self.poller.poll_once()  # the first page load already has data
        self.poller.start()
        self._thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.poller.stop()


def run_dashboard(
    initial_peers,
    *,
    spec=None,
    run_id: Optional[str] = None,
    spec_digest: Optional[str] = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    period: float = POLL_PERIOD,
    log_json: bool = False,
    max_seconds: Optional[float] = None,
) -> int:
    """``swarmtrain dashboard``: observe the swarm through a client-mode DHT node and serve the page."""
    import signal

    from peer.base import Output
    from peer.observe.status import open_observer

    out = Output(log_json)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    swarm, close_observer = open_observer(list(initial_peers), spec=spec, run_id=run_id, spec_digest=spec_digest)
    dashboard = None
    try:
        try:
            dashboard = Dashboard(swarm, host=host, port=port, period=period)
        except OSError as err:
            raise SystemExit(f"--port {port}: cannot listen on {host}: {err}")
        dashboard.start()
        out.event(
            "ready",
            f"dashboard of run {swarm.spec.run_id!r} at {dashboard.url} (Ctrl-C to stop)",
            url=dashboard.url,
            port=dashboard.port,
            run_id=swarm.spec.run_id,
            digest=swarm.digest,
        )
        stop.wait(max_seconds)
    finally:
        if dashboard is not None:
            dashboard.close()
        close_observer()
        out.event("stopped", "dashboard stopped")
    return 0
