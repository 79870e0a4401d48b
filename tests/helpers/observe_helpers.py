"""Helpers of the observer tests (peer.observe): Prometheus text read back as numbers, and a
swarm snapshot as the dashboard's poller gets it."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def parse(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value}"""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted((k, str(v)) for k, v in labels.items())))
    assert key in metrics, f"{name}{labels} not exposed; have: {sorted(n for n, _ in metrics)}"
    return metrics[key]


def fake_snapshot(t: float, tokens: int, loss) -> dict:
    """A run of two stages with one peer each (QmA trains on stage 0, QmB serves stage 1) at time ``t``."""
    return {
        "run_id": "r",
        "digest": "d" * 64,
        "time": t,
        "num_peers": 2,
        "loss": loss,
        "tokens_per_s": 10.0,
        "checkpoints": [],
        "stages": [
            {
                "stage": 0,
                "layers": [0, 2],
                "online": 1,
                "throughput": 3.0,
                "epoch": 4,
                "peers": [
                    {
                        "peer_id": "QmA",
                        "state": "online",
                        "throughput": 3.0,
                        "epoch": 4,
                        "loss": loss,
                        "tokens": tokens,
                        "samples_per_s": 1.0,
                        "has_data": True,
                        "version": "0.1.0",
                    }
                ],
            },
            {
                "stage": 1,
                "layers": [2, 4],
                "online": 1,
                "throughput": 5.0,
                "epoch": 4,
                "peers": [
                    {
                        "peer_id": "QmB",
                        "state": "online",
                        "throughput": 5.0,
                        "epoch": 4,
                        "loss": None,
                        "tokens": 0,
                        "samples_per_s": 0.0,
                        "has_data": False,
                        "version": "0.1.0",
                    }
                ],
            },
        ],
    }
