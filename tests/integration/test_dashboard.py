"""The dashboard: its HTTP API and page over a fake swarm in this process, then a real swarm (bootstrap with
``--dashboard-port``, a trainer on stage 0, a server on stage 1, ``swarmtrain dashboard`` joined
by run id) read over HTTP and rendered by headless Chromium, which must record no JavaScript
error and draw the loss chart from the swarm's own records.

Chromium comes from the distribution (``apt-get install chromium``, done by ``.ci/run`` when
root); without it the browser checks are skipped with the reason. With
``SWARMTRAIN_DASHBOARD_SCREENSHOT=PATH`` a copy of the screenshot is written to PATH.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from peer.observe.dashboard import Poller, _handler_for, page_html

from conftest import dump_logs, wait_until
from observe_helpers import fake_snapshot

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


def chromium_path():
    for path in CHROMIUM_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("chromium")


def need_chromium() -> str:
    path = chromium_path()
    if path is None:
        pytest.skip("headless browser checks need Chromium: apt-get install -y chromium (.ci/run does it as root)")
    return path


def run_chromium(url: str, tmp: Path, *extra: str, timeout: float = 120.0) -> str:
    """One headless Chromium run on ``url``; returns its stdout. Killed by process group on timeout."""
    profile = tmp / f"chromium-profile-{time.monotonic_ns()}"
    profile.mkdir(parents=True)
    args = [
        need_chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=8000",
        *extra,
        url,
    ]
    env = {**os.environ, "HOME": str(profile)}
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"chromium did not finish within {timeout:.0f}s on {url}")
    finally:
        try:  # chromium's helpers (zygote, GPU process) must not outlive the test
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, f"chromium exited with {proc.returncode}:\n{err[-3000:]}"
    return out


class DomFacts(HTMLParser):
    """What the tests need from a dumped DOM: attributes by element id, rows by peer."""

    def __init__(self):
        super().__init__()
        self.by_id: dict[str, dict] = {}
        self.peers: list[str] = []
        self.series_points: dict[str, list[int]] = {}
        self.body: dict = {}
        self.error_items: list[str] = []
        self.checkpoint_rows: list[tuple[str, str]] = []
        self.teacher_rows: dict[str, str] = {}  # teacher peer id -> trainers that banned it
        self.badges: list[str] = []
        self.stage_cards: dict[str, str] = {}  # stage -> data-online
        self._svg = None
        self._in_errors = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.by_id[a["id"]] = a
        if tag == "body":
            self.body = a
        if tag == "svg":
            self._svg = a.get("id")
        if tag == "path" and "series" in (a.get("class") or "") and self._svg:
            self.series_points.setdefault(self._svg, []).append(int(a.get("data-points", "0")))
        if tag == "tr" and "data-peer" in a:
            self.peers.append(a["data-peer"])
        if tag == "tr" and "data-teacher" in a:
            self.teacher_rows[a["data-teacher"]] = a.get("data-banned")
        if tag == "tr" and "data-step" in a:
            self.checkpoint_rows.append((a["data-stage"], a["data-step"]))
        if tag == "span" and "badge" in (a.get("class") or ""):
            self.badges.append(a["class"].split()[-1])
        if tag == "div" and "stage" in (a.get("class") or "").split() and "data-stage" in a:
            self.stage_cards[a["data-stage"]] = a.get("data-online")
        if a.get("id") == "js-errors":
            self._in_errors = 1
        elif self._in_errors and tag == "li":
            self.error_items.append("")

    def handle_endtag(self, tag):
        if tag == "svg":
            self._svg = None
        if tag == "div" and self._in_errors:
            self._in_errors = 0

    def handle_data(self, data):
        if self._in_errors and self.error_items:
            self.error_items[-1] += data


def dom_facts(html: str) -> DomFacts:
    facts = DomFacts()
    facts.feed(html)
    return facts


def get_json(url: str, timeout: float = 30.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        assert resp.headers["Content-Type"].startswith("application/json")
        return json.loads(resp.read())


# --- the HTTP API and the page over a fake swarm, in this process --------------------------------


class _LocalServer:
    """The dashboard's HTTP handler over a fake swarm, in this process."""

    def __init__(self, read, period: float = 2.0, decorate=lambda s: s):
        import threading
        from http.server import ThreadingHTTPServer

        self.poller = Poller(read, period=period, decorate=decorate)
        self.poller.poll_once()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self.poller, page_html()))
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_http_api_and_page_without_network():
    t0 = time.time() - 30
    snaps = iter([fake_snapshot(t0 + 2 * i, 500 * i, 5.0 - 0.1 * i) for i in range(100)])
    server = _LocalServer(lambda: next(snaps))
    try:
        for _ in range(4):
            server.poller.poll_once()
        page = urllib.request.urlopen(server.url, timeout=10)
        html = page.read().decode()
        assert page.headers["Content-Type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["Content-Security-Policy"]
        # Self-contained: nothing is loaded from another origin.
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "the page must load nothing external"
        swarm = get_json(server.url + "api/swarm")
        assert swarm["run_id"] == "r" and len(swarm["stages"]) == 2 and swarm["observer"]["polls"] == 5
        history = get_json(server.url + "api/history")
        assert len(history["points"]) == 5 and history["points"][-1]["loss"] == pytest.approx(4.6)
        short = get_json(server.url + "api/history?max=2")
        assert [p["time"] for p in short["points"]] == [history["points"][0]["time"], history["points"][-1]["time"]]
        assert short["total_points"] == 5
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(server.url + "etc/passwd", timeout=10)
        assert err.value.code == 404
        req = urllib.request.Request(server.url + "api/swarm", data=b"x", method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 501
    finally:
        server.close()


def _eventful_snapshot(t: float, i: int) -> dict:
    """A swarm with a bit of everything: a joining peer, an empty stage, signed checkpoints."""
    snap = fake_snapshot(t, 800 * i, 5.0 - 0.05 * i)
    snap["stages"][0]["peers"].append(
        {
            "peer_id": "QmJoiner",
            "state": "joining",
            "throughput": 1.0,
            "epoch": 0,
            "loss": None,
            "tokens": 0,
            "samples_per_s": 0.0,
            "has_data": True,
            "version": "0.1.0",
        }
    )
    snap["stages"][1].update(online=0, throughput=0.0, peers=[])
    trusted, other = "a" * 16, "b" * 16
    snap["checkpoints"] = [
        {
            "peer_id": "QmA",
            "stage": 0,
            "step": 120,
            "manifest_digest": "1" * 64,
            "signers": [trusted],
            "files": 3,
            "total_bytes": 5_000_000,
        },
        {
            "peer_id": "QmKeeper",
            "stage": 0,
            "step": 120,
            "manifest_digest": "1" * 64,
            "signers": [trusted],
            "files": 3,
            "total_bytes": 5_000_000,
        },
        {
            "peer_id": "QmB",
            "stage": 1,
            "step": 100,
            "manifest_digest": "2" * 64,
            "signers": [other],
            "files": 3,
            "total_bytes": 4_000_000,
        },
    ]
    return snap


def test_page_renders_checkpoints_and_empty_stages(tmp_path):
    """The parts the live swarm below does not show: checkpoint rows with trusted and untrusted
    signers (grouped by digest: two announcers, one row), a joining peer, a stage with no peer."""
    need_chromium()
    from peer.observe.dashboard import checkpoint_decorator

    t0 = time.time() - 20
    snaps = iter([_eventful_snapshot(t0 + 2 * i, i) for i in range(100)])
    server = _LocalServer(lambda: next(snaps), decorate=checkpoint_decorator({"a" * 16}))
    try:
        for _ in range(5):
            server.poller.poll_once()
        rows = get_json(server.url + "api/swarm")["checkpoint_rows"]
        assert [(r["stage"], r["step"], len(r["served_by"])) for r in rows] == [(0, 120, 2), (1, 100, 1)]
        shot = tmp_path / "eventful.png"
        facts = dom_facts(
            run_chromium(
                server.url,
                tmp_path,
                "--dump-dom",
                f"--screenshot={shot}",
                "--window-size=1280,900",
                "--hide-scrollbars",
            )
        )
    finally:
        server.close()
    assert facts.by_id["js-errors"]["data-count"] == "0", facts.error_items
    assert facts.checkpoint_rows == [("0", "120"), ("1", "100")]
    assert facts.badges.count("trusted") == 1 and facts.badges.count("untrusted") == 1
    assert "joining" in facts.badges and "empty" in facts.badges  # the NO PEERS badge of stage 1
    assert facts.stage_cards == {"0": "1", "1": "0"}
    assert int(facts.by_id["loss-chart"]["data-points"]) == 6
    print(f"dashboard screenshot (fake swarm): {shot}")


def test_page_renders_teachers_and_their_bans(tmp_path):
    """Teachers of a run that distills: one that two trainers banned, one set aside, one whose
    weights the spec does not accept, one with no complaints (``status.teacher_rows``)."""
    need_chromium()
    from peer.observe.status import teacher_rows
    from protocol.records import TeacherInfo
    from protocol.spec import preset_spec

    weights = "ab" * 32
    spec = preset_spec("tiny", distill=dict(teacher_digests=[weights]))
    teachers = [
        TeacherInfo("QmLiar", weights, "online", 40.0, requests=12, tokens=6144),
        TeacherInfo("QmDisputed", weights, "online", 40.0, requests=30, tokens=15360),
        TeacherInfo("QmOther", "cd" * 32, "online", 90.0),
        TeacherInfo("QmGood", weights, "online", 50.0, requests=400, tokens=204800, via="QmRelay"),
    ]
    bans = {
        "QmT1": {"banned": ["QmLiar"], "suspended": []},
        "QmT2": {"banned": ["QmLiar"], "suspended": ["QmDisputed"]},
    }
    rows = teacher_rows(spec, teachers, bans)
    assert [(r["peer_id"], r["banned_by"], r["suspended_by"], r["accepted"]) for r in rows] == [
        ("QmLiar", 2, 0, True),
        ("QmDisputed", 0, 1, True),
        ("QmOther", 0, 0, False),
        ("QmGood", 0, 0, True),
    ]
    snapshot = {**fake_snapshot(time.time(), 100, 3.0), "teachers": rows}
    server = _LocalServer(lambda: snapshot)
    try:
        server.poller.poll_once()
        assert get_json(server.url + "api/swarm")["teachers"] == rows
        facts = dom_facts(run_chromium(server.url, tmp_path, "--dump-dom"))
    finally:
        server.close()
    assert facts.by_id["js-errors"]["data-count"] == "0", facts.error_items
    assert facts.teacher_rows == {"QmLiar": "2", "QmDisputed": "0", "QmOther": "0", "QmGood": "0"}
    assert facts.badges.count("untrusted") == 2  # banned by 2; weights not accepted
    assert facts.badges.count("trusted") == 2 and facts.badges.count("leaving") == 1


def test_page_records_javascript_errors(tmp_path):
    """The error box is no formality: a snapshot the page cannot render (a stage without its
    layer range) must show up there, or 'no recorded errors' below would prove nothing."""
    need_chromium()
    broken = fake_snapshot(time.time(), 10, 4.0)
    del broken["stages"][0]["layers"]
    server = _LocalServer(lambda: broken)
    try:
        facts = dom_facts(run_chromium(server.url, tmp_path, "--dump-dom"))
    finally:
        server.close()
    assert int(facts.by_id["js-errors"]["data-count"]) >= 1, "a rendering error went unrecorded"
    assert "hidden" not in facts.by_id["js-errors"]
    assert any("layers" in e or "undefined" in e for e in facts.error_items), facts.error_items


# --- a real swarm ------------------------------------------------------------------------------------


def test_dashboard_on_a_live_swarm(cluster, spec_path, text_data, tmp_path):
    boot, maddr = cluster.bootstrap(spec_path=spec_path, extra=["--dashboard-port", "0"])
    boot_board = boot.last_event("dashboard")
    assert boot_board is not None, dump_logs(cluster)
    s0 = cluster.peer("s0", [maddr], spec_path=spec_path, stage=0, data=str(text_data))
    s1 = cluster.peer("s1", [maddr], spec_path=spec_path, stage=1)
    dash = cluster.start(
        "dashboard",
        [
            "dashboard",
            "--initial-peers",
            maddr,
            "--run",
            "swarmtest",
            "--port",
            "0",
            "--poll-period",
            "1",
            "--log-json",
        ],
    )
    ids = {s0.wait_event("ready", 120)["peer_id"], s1.wait_event("ready", 120)["peer_id"]}
    url = dash.wait_event("ready", 120)["url"]
    cluster.track()
    # A few status lines of the trainer with a loss: its DHT record carries the loss too.
    s0.wait_event("status", 120, lambda e: e.get("loss") is not None and e.get("microbatches", 0) >= 4)

    def enough_history():
        points = get_json(url + "api/history")["points"]
        with_loss = [p for p in points if p["loss"] is not None]
        rated = [p for p in points if p["tokens_per_s"]]
        return points if len(with_loss) >= 3 and rated else None

    points = wait_until(enough_history, 90, "three history points with a loss")
    assert all(0 < p["loss"] < 10 for p in points if p["loss"] is not None)
    assert points[-1]["tokens"] > 0 and points[-1]["tokens_per_s"] > 0

    swarm = get_json(url + "api/swarm")
    assert swarm["run_id"] == "swarmtest" and swarm["observer"]["error"] is None
    assert [st["online"] for st in swarm["stages"]] == [1, 1]
    seen = {p["peer_id"]: p for st in swarm["stages"] for p in st["peers"]}
    assert set(seen) == ids
    assert seen[s0.last_event("ready")["peer_id"]]["has_data"] is True
    assert swarm["checkpoints"] == [] and swarm["checkpoint_rows"] == []  # no keeper in this swarm

    # The bootstrap's own dashboard (--dashboard-port) sees the same peers.
    boot_swarm = get_json(boot_board["url"] + "api/swarm")
    assert {p["peer_id"] for st in boot_swarm["stages"] for p in st["peers"]} == ids

    # The page, rendered by a real browser from the live data.
    if chromium_path() is None:
        pytest.skip("headless browser checks need Chromium: apt-get install -y chromium (.ci/run does it as root)")
    # One browser run: the DOM it prints is the page of the screenshot.
    shot = tmp_path / "dashboard.png"
    facts = dom_facts(
        run_chromium(url, tmp_path, "--dump-dom", f"--screenshot={shot}", "--window-size=1280,900", "--hide-scrollbars")
    )
    assert facts.by_id["js-errors"]["data-count"] == "0", f"JavaScript errors: {facts.error_items}"
    assert facts.body.get("data-loaded") == "1", "the page never rendered a snapshot"
    loss_points = int(facts.by_id["loss-chart"]["data-points"])
    assert loss_points >= 3 and max(facts.series_points["loss-chart"]) >= 2, facts.series_points
    assert int(facts.by_id["tps-chart"]["data-points"]) >= 1
    assert set(facts.peers) == ids, "both peers are listed under their stages"

    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, "an empty or blank screenshot"
    print(f"dashboard screenshot: {shot}")
    copy_to = os.environ.get("SWARMTRAIN_DASHBOARD_SCREENSHOT")
    if copy_to:
        shutil.copyfile(shot, copy_to)
        print(f"dashboard screenshot copied to {copy_to}")

    cluster.stop(dash)
    assert dash.last_event("stopped") is not None, "".join(dash.lines[-20:])
    # The peers' clean shutdown is tested elsewhere; a crash-stop is quicker (their reapers clean up).
    for proc in (s0, s1, boot):
        cluster.kill(proc)
