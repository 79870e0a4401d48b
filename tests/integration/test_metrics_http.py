"""Prometheus metrics over HTTP: live peers of a real swarm scraped twice, and the event counts a
bootstrap serves."""

from __future__ import annotations

import time
import urllib.request

from conftest import dump_logs
from observe_helpers import parse, value


def scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.status == 200
        return parse(resp.read().decode())


def test_live_peers_expose_moving_metrics(cluster, spec_path, text_data):
    _boot, maddr = cluster.bootstrap(spec_path=spec_path)
    s0 = cluster.peer("s0", [maddr], spec_path=spec_path, stage=0, data=str(text_data), extra=["--metrics-port", "0"])
    s1 = cluster.peer("s1", [maddr], spec_path=spec_path, stage=1, extra=["--metrics-port", "0"])
    url0 = s0.wait_event("metrics", 120)["url"]
    url1 = s1.wait_event("metrics", 120)["url"]
    me0 = s0.wait_event("ready", 120)["peer_id"]
    cluster.track()
    s0.wait_event("status", 120, lambda e: e.get("microbatches", 0) >= 2)

    a0, a1 = scrape(url0), scrape(url1)
    assert (
        value(
            a0,
            "swarmtrain_info",
            peer_id=me0,
            run_id="swarmtest",
            digest=s0.last_event("ready")["digest"][:16],
            version=value_label(a0, "swarmtrain_info", "version"),
        )
        == 1
    )
    assert value(a0, "swarmtrain_stage") == 0 and value(a1, "swarmtrain_stage") == 1
    # Wait on the trainer's own status events (every 2 s) rather than sleeping.
    mb = s0.last_event("status")["microbatches"]
    s0.wait_event("status", 120, lambda e: e.get("microbatches", 0) >= mb + 4)

    # Stage 1's status lines carry its optimizer epoch; its metrics follow within a loop tick.
    s1.wait_event("status", 120, lambda e: e.get("epoch", 0) >= 1)
    deadline = time.monotonic() + 15
    while True:
        b1 = scrape(url1)
        if value(b1, "swarmtrain_averaging_rounds_total") >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.5)  # the peer's main loop updates metrics every 0.2 s
    assert value(b1, "swarmtrain_averaging_rounds_total") >= 1, dump_logs(cluster)
    b0 = scrape(url0)

    # The trainer (stage 0, with data): tokens, samples, activations on the wire, a loss.
    for name in (
        "swarmtrain_tokens_total",
        "swarmtrain_samples_total",
        "swarmtrain_microbatches_total",
        "swarmtrain_stage_backward_total",
        "swarmtrain_stage_compute_seconds_total",
    ):
        assert value(b0, name) > value(a0, name), name
    assert value(b0, "swarmtrain_sent_bytes_total", kind="activations") > value(
        a0, "swarmtrain_sent_bytes_total", kind="activations"
    )
    assert value(b0, "swarmtrain_received_bytes_total", kind="activations") > 0
    assert 0 < value(b0, "swarmtrain_loss") < 10
    assert value(b0, "swarmtrain_tokens_per_second") > 0
    assert value(b0, "swarmtrain_microbatch_seconds") > 0
    assert value(b0, "swarmtrain_peers_online", stage=1) == 1

    # The server of the last stage: forward passes, received activations, an averaging round.
    assert value(b1, "swarmtrain_stage_forward_total") > value(a1, "swarmtrain_stage_forward_total")
    assert value(b1, "swarmtrain_received_bytes_total", kind="activations") > value(
        a1, "swarmtrain_received_bytes_total", kind="activations"
    )
    assert value(b1, "swarmtrain_epoch") >= 1
    # One peer per stage: each epoch's update is local, and counted as such.
    assert value(b1, "swarmtrain_allreduce_total", outcome="alone") >= 1
    assert value(b1, "swarmtrain_allreduce_total", outcome="failed") == 0
    assert value(b1, "swarmtrain_load_state_error") == 0
    assert ("swarmtrain_tokens_total", ()) not in b1  # a peer without data trains nothing itself

    for proc in cluster.procs:
        cluster.kill(proc)  # a crash-stop: the peers' reapers clean up (clean shutdown is tested elsewhere)


def value_label(metrics: dict, name: str, label: str) -> str:
    for (n, labels), _ in metrics.items():
        if n == name:
            return dict(labels)[label]
    raise AssertionError(f"{name} not exposed")


def test_event_counts_serve_what_a_bootstrap_reported():
    import urllib.request

    from peer.observe.events import EventCounts
    from peer.observe.prom import close_server, serve_metrics

    seen = []
    counts = EventCounts(lambda name, text, **fields: seen.append((name, text, fields)))
    counts("state_rejected", "keeper: ...", peer_id="QmX")
    counts("state_rejected", "keeper: ...", peer_id="QmY")
    counts("checkpoint_signed", "keeper: signed", step=3)
    assert [s[0] for s in seen] == ["state_rejected", "state_rejected", "checkpoint_signed"]
    said = []
    server = serve_metrics(counts, host="127.0.0.1", port=0, event=lambda name, text, **f: said.append(f))
    try:
        text = urllib.request.urlopen(said[0]["url"], timeout=10).read().decode()
    finally:
        close_server(server)
    scraped = parse(text)
    assert value(scraped, "swarmtrain_events_total", event="state_rejected") == 2
    assert value(scraped, "swarmtrain_events_total", event="checkpoint_signed") == 1
