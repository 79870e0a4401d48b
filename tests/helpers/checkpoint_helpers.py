"""Helpers of the checkpoint tests (store, transfer, keeper, the checkpoint CLI): real p2pd
instances on 127.0.0.1 in one asyncio loop thread, a fake DHT view (the network part is real,
the DHT is not needed to test one RPC), and the signed checkpoints the tests start from. Keys
are the ``keys`` fixture of conftest.py."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from pathlib import Path
from typing import Optional

import torch
from hivemind.p2p import P2P

from peer.base import LoopThread
from peer.checkpoints.store import WrittenCheckpoint, write_checkpoint
from peer.model.llama import LlamaStage
from protocol import signing
from protocol.records import CheckpointAnnouncement, PeerInfo
from protocol.spec import load_spec

from cli_helpers import run


class P2PHost:
    """A loop thread and the P2P daemons started on it; ``close`` stops them all."""

    def __init__(self):
        self.loop = LoopThread()
        self.nodes: list[P2P] = []

    def run(self, coro, timeout: Optional[float] = 60):
        return self.loop.run(coro, timeout)

    def new(self, *connect_to: P2P) -> P2P:
        async def create():
            initial = []
            for other in connect_to:
                initial += [str(m) for m in await other.get_visible_maddrs()]
            return await P2P.create(initial_peers=initial, host_maddrs=["/ip4/127.0.0.1/tcp/0"])

        node = self.run(create())
        self.nodes.append(node)
        return node

    def kill(self, node: P2P) -> None:
        """Stop a daemon, as a peer that dies would."""
        with contextlib.suppress(Exception):
            self.run(node.shutdown(), 20)

    def close(self) -> None:
        for node in reversed(self.nodes):
            self.kill(node)
        self.loop.stop()


def peer_id(node: P2P) -> str:
    return node.peer_id.to_base58()


@dataclasses.dataclass
class FakeSwarm:
    """What the keeper and the checkpoint service read from and write to the DHT."""

    peer_id: str
    peers: list = dataclasses.field(default_factory=list)
    announced: list = dataclasses.field(default_factory=list)
    announcements: list = dataclasses.field(default_factory=list)

    def snapshot(self) -> list[PeerInfo]:
        return list(self.peers)

    def announce_checkpoint(self, stage: int, record: dict, ttl: float) -> bool:
        self.announced.append((stage, dict(record)))
        return True

    def checkpoint_announcements(self, stage=None):
        """Typed, as SwarmDHT's: the fake's records are plain dicts."""
        typed = [(p, CheckpointAnnouncement.from_record(r)) for p, r in self.announcements]
        return [(p, r) for p, r in typed if stage is None or r.stage == stage]


class Events:
    """Collects ``Output.event`` calls."""

    def __init__(self):
        self.items: list[tuple[str, str, dict]] = []

    def __call__(self, name: str, text: str, **fields) -> None:
        self.items.append((name, text, fields))

    def named(self, name: str) -> list[tuple[str, dict]]:
        return [(text, fields) for n, text, fields in self.items if n == name]


# --- signed checkpoints ---------------------------------------------------------------------------


def flip_byte(path: Path, offset: int = -1) -> None:
    """Flip one bit of the byte at ``offset``: a tampered file of the same size."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def trained_stage(spec, stage: int, seed: int = 0):
    """A stage after one AdamW step, so the optimizer state is real: (module, optimizer)."""
    torch.manual_seed(seed)
    module = LlamaStage.from_spec(spec, stage)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    x = torch.randint(0, spec.model.vocab_size, (2, 8)) if stage == 0 else torch.randn(2, 8, spec.model.hidden_size)
    module(x).float().pow(2).mean().backward()
    opt.step()
    return module, opt


def write_signed(target, spec, stage_module, opt, keys, signers=("a",), *, step=5, stage=0, **kw) -> WrittenCheckpoint:
    """A checkpoint of ``stage_module`` (and ``opt``'s state, if any) signed by the named ``keys``."""
    return write_checkpoint(
        target,
        spec=spec,
        stage=stage,
        step=step,
        tokens_seen=1000 * step,
        model_state=stage_module.state_dict(),
        optimizer_state=None if opt is None else opt.state_dict(),
        key_paths=[keys[s][0] for s in signers],
        **kw,
    )


def perturbed_stage(spec, stage: int = 0, seed: int = 1) -> LlamaStage:
    """A stage moved a little away from its deterministic init."""
    torch.manual_seed(seed)
    module = LlamaStage.from_spec(spec, stage)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return module


def keeper_checkpoint(root: Path, spec, keys) -> tuple[WrittenCheckpoint, LlamaStage]:
    """A checkpoint of stage 0, step 7, signed by the keeper's key (about 1.7 MB), and its module."""
    module = perturbed_stage(spec)
    w = write_checkpoint(
        root / "stage-0" / "step-0000000007",
        spec=spec,
        stage=0,
        step=7,
        tokens_seen=7000,
        model_state=module.state_dict(),
        key_paths=[keys["keeper"][0]],
    )
    return w, module


def copy_checkpoint(ckpt_path: Path, dest: Path) -> Path:
    """A copy of a stage-0 checkpoint in ``dest``'s layout (``dest/stage-0/step-...``)."""
    target = dest / "stage-0" / ckpt_path.name
    shutil.copytree(ckpt_path, target)
    return target


def announcement(step: int, digest: str) -> dict:
    """A stage-0 checkpoint announcement record, as a peer puts it in the DHT."""
    return {"step": step, "manifest_digest": digest, "signers": ["a" * 16], "files": 2, "total_bytes": 10, "stage": 0}


def cli_env(d: Path) -> dict:
    """What the checkpoint CLI tests start from, made with the CLI: two keys (a trusted by the
    spec, b not), a spec file, one signed checkpoint per stage."""
    for name in ("a", "b"):
        r = run("keygen", d / f"{name}.pem")
        assert r.exit_code == 0, r.output
    r = run("spec", "init", d / "spec.toml", "--preset", "tiny", "--stages", "2", "--trusted-key", d / "a.pub")
    assert r.exit_code == 0, r.output
    spec = load_spec(d / "spec.toml")
    stages = [LlamaStage.from_spec(spec, k) for k in range(spec.num_stages)]
    with torch.no_grad():  # away from the deterministic init, so the export is checked for real
        g = torch.Generator().manual_seed(1)
        for s in stages:
            for p in s.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    ckpts = []
    for k, s in enumerate(stages):
        ckpts.append(
            write_checkpoint(
                d / "ckpt" / f"stage-{k}",
                spec=spec,
                stage=k,
                step=12,
                tokens_seen=4096,
                model_state=s.state_dict(),
                key_paths=[d / "a.pem"],
            ).path
        )
    return dict(
        dir=d,
        spec=spec,
        spec_path=d / "spec.toml",
        stages=stages,
        ckpts=ckpts,
        a=d / "a.pem",
        a_pub=d / "a.pub",
        b=d / "b.pem",
        b_pub=d / "b.pub",
        fp_a=signing.fingerprint((d / "a.pub").read_text()),
        fp_b=signing.fingerprint((d / "b.pub").read_text()),
    )
