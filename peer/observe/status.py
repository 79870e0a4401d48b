"""The swarm as the DHT sees it: per stage, its peers with state, throughput, epoch, loss."""

from __future__ import annotations

import time
from typing import Optional, Sequence

from peer.swarm.dht import SwarmDHT, resolve_run_spec, start_dht
from peer.swarm.identity import cleanup_identity, load_or_create_identity
from protocol.records import PeerState
from protocol.spec import RunSpec


def swarm_snapshot(swarm: SwarmDHT) -> dict:
    """A JSON-ready view of one run: stages, peers and checkpoint announcements."""
    spec = swarm.spec
    peers = swarm.snapshot()
    stages = []
    for k, s in enumerate(spec.stages):
        members = [p for p in peers if p.stage == k]
        online = [p for p in members if p.state == PeerState.ONLINE]
        stages.append(
            {
                "stage": k,
                "layers": [s.start, s.end],
                "peers": [
                    {
                        "peer_id": p.peer_id,
                        "state": str(p.state),
                        "throughput": round(p.throughput, 3),
                        "epoch": p.epoch,
                        "loss": p.loss,
                        "tokens": p.tokens,
                        "samples_per_s": round(p.samples_per_s, 3),
                        "has_data": p.has_data,
                        "version": p.version,
                        "state_digest": p.state_digest,
                    }
                    for p in members
                ],
                "online": len(online),
                "throughput": round(sum(p.throughput for p in online), 3),
                "epoch": max((p.epoch for p in members), default=0),
            }
        )
    losses = [p.loss for p in peers if p.loss is not None and p.has_data]
    try:
        checkpoints = [{"peer_id": pid, **rec.to_record()} for pid, rec in swarm.checkpoint_announcements()]
    except Exception:
        checkpoints = []
    try:
        teachers = teacher_rows(spec, swarm.teachers(), swarm.teacher_bans())
    except Exception:
        teachers = []
    return {
        "run_id": spec.run_id,
        "digest": swarm.digest,
        "time": time.time(),
        "num_peers": len(peers),
        "stages": stages,
        "loss": (sum(losses) / len(losses)) if losses else None,
        "tokens_per_s": round(sum(p.samples_per_s for p in peers) * spec.training.seq_len, 1),
        "checkpoints": checkpoints,
        "teachers": teachers,
    }


def teacher_rows(spec: RunSpec, teachers, bans: dict[str, dict]) -> list[dict]:
    """One row per teacher: its record, whether the spec accepts its weights, and how many
    trainers banned it or set it aside (``teacherbans`` records)."""
    rows = []
    for t in teachers:
        rows.append(
            {
                "peer_id": t.peer_id,
                "model_digest": t.model_digest,
                "state": t.state,
                "throughput": round(t.throughput, 3),
                "requests": t.requests,
                "tokens": t.tokens,
                "relayed": bool(t.via),
                "accepted": spec.distill is not None and spec.distill.accepts(t.model_digest),
                "banned_by": sum(t.peer_id in b.get("banned", ()) for b in bans.values()),
                "suspended_by": sum(t.peer_id in b.get("suspended", ()) for b in bans.values()),
            }
        )
    return rows


def format_snapshot(view: dict) -> str:
    lines = [
        f"run {view['run_id']}  digest {view['digest'][:16]}  peers {view['num_peers']}  loss {view['loss']:.3f}"
        if view["loss"] is not None
        else f"run {view['run_id']}  digest {view['digest'][:16]}  peers {view['num_peers']}"
    ]
    for st in view["stages"]:
        lines.append(
            f"stage {st['stage']} layers [{st['layers'][0]}, {st['layers'][1]})  online {st['online']}  "
            f"throughput {st['throughput']:.1f} samples/s  epoch {st['epoch']}"
            + ("   <-- NO PEERS" if st["online"] == 0 else "")
        )
        for p in st["peers"]:
            loss = f"{p['loss']:.3f}" if p["loss"] is not None else "-"
            lines.append(
                f"    {p['peer_id'][:20]:20}  {p['state']:8}  {p['throughput']:8.1f}/s  epoch {p['epoch']:4}  "
                f"loss {loss:>7}  {'trains' if p['has_data'] else 'serves'}"
                + (f"  round state {p['state_digest']}" if p.get("state_digest") else "")
            )
    for t in view.get("teachers", []):
        verdicts = (f"  BANNED by {t['banned_by']} trainer(s)" if t["banned_by"] else "") + (
            f"  set aside by {t['suspended_by']}" if t["suspended_by"] else ""
        )
        lines.append(
            f"teacher {t['peer_id'][:20]:20}  {t['state']:8}  weights {t['model_digest'][:16]}"
            + ("" if t["accepted"] else " (not accepted by the spec)")
            + f"  {t['throughput']:8.1f}/s  answered {t['requests']} requests, {t['tokens']} tokens{verdicts}"
        )
    for c in view.get("checkpoints", []):
        lines.append(
            f"checkpoint stage {c['stage']} step {c['step']} digest {c['manifest_digest'][:16]} "
            f"signers {','.join(c['signers'])} at {c['peer_id'][:16]}"
        )
    return "\n".join(lines)


def open_observer(
    initial_peers: Sequence[str],
    *,
    spec: Optional[RunSpec] = None,
    run_id: Optional[str] = None,
    spec_digest: Optional[str] = None,
):
    """A client-mode DHT for reading the swarm; returns (swarm, closer)."""
    ident = load_or_create_identity(None)
    dht = start_dht(ident, initial_peers=initial_peers, host_maddrs=("/ip4/127.0.0.1/tcp/0",), client_mode=True)
    try:
        # An observer only reads: it shows the run's only published spec without a pin.
        spec = resolve_run_spec(dht, spec, run_id, spec_digest, require_trust=False, timeout=15.0)
    except Exception:
        dht.shutdown()
        cleanup_identity(ident)
        raise

    def close():
        dht.shutdown()
        cleanup_identity(ident)

    return SwarmDHT(dht, spec, ident), close
