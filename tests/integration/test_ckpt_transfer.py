"""Checkpoint transfer over real p2pd daemons on 127.0.0.1: chunked download, resume from a
second source after the first dies, refusal of tampered or substituted files, the server's
request validation, and a restore that refuses a tampered local copy and fetches one. The
loading policy without a network is in tests/unit/test_ckpt_restore_policy.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from peer.checkpoints import CheckpointFetcher, CheckpointServer, CheckpointService, FetchFailed, SourceFailed
from peer.checkpoints.fetch import list_remote, read_remote
from peer.checkpoints.limits import MAX_READ_BYTES
from peer.checkpoints.store import CheckpointStore, write_checkpoint
from peer.model.llama import LlamaStage
from protocol import signing
from protocol.checkpoint import META_FILE, MODEL_FILE, CheckpointRefused

from checkpoint_helpers import (
    Events,
    FakeSwarm,
    announcement,
    copy_checkpoint,
    flip_byte,
    keeper_checkpoint,
    peer_id,
)

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, spec, keys):
    """A signed checkpoint of stage 0, step 7 (about 1.7 MB), and its module."""
    return keeper_checkpoint(tmp_path_factory.mktemp("src"), spec, keys)


def _serve(host, spec, path: Path, manifest: str, client) -> tuple:
    node = host.new(client)
    server = CheckpointServer(spec)
    server.add(manifest, path, 0, 7)
    host.run(server.start(node))
    return node, server


# --- the server ----------------------------------------------------------------------------------


def test_server_validates_requests(host, client, spec, ckpt, tmp_path):
    written, _ = ckpt
    path = copy_checkpoint(written.path, tmp_path)
    node, _ = _serve(host, spec, path, written.manifest_digest, client)
    src, d, m = peer_id(node), spec.digest(), written.manifest_digest
    files, stage, step = host.run(list_remote(client, src, d, m))
    assert (stage, step) == (0, 7)
    assert set(files) == {META_FILE, MODEL_FILE, f"signatures/{written.signers[0]}.sig"}
    assert files[MODEL_FILE] == (path / MODEL_FILE).stat().st_size
    head = host.run(read_remote(client, src, d, m, META_FILE, 0, 20))
    assert head == (path / META_FILE).read_bytes()[:20]
    with pytest.raises(SourceFailed, match="bad_request: '../../../etc/passwd' is not a file of this checkpoint"):
        host.run(read_remote(client, src, d, m, "../../../etc/passwd", 0, 10))
    with pytest.raises(SourceFailed, match="not_found"):
        host.run(list_remote(client, src, d, "f" * 64))
    with pytest.raises(SourceFailed, match="wrong_spec"):
        host.run(list_remote(client, src, "0" * 64, m))
    with pytest.raises(SourceFailed, match="bad_request: bad range"):
        host.run(read_remote(client, src, d, m, MODEL_FILE, 0, MAX_READ_BYTES + 1))
    # A checkpoint deleted (pruned) after it was registered is reported gone, not served.
    shutil.rmtree(path)
    with pytest.raises(SourceFailed, match="gone"):
        host.run(list_remote(client, src, d, m))


# --- fetching -------------------------------------------------------------------------------------


def test_fetch_resumes_from_second_source_after_first_dies(host, client, spec, ckpt, tmp_path):
    written, module = ckpt
    m = written.manifest_digest
    first, _ = _serve(host, spec, copy_checkpoint(written.path, tmp_path / "a"), m, client)
    second, _ = _serve(host, spec, copy_checkpoint(written.path, tmp_path / "b"), m, client)
    reads = {"n": 0}

    def run(coro, timeout=None):
        # The first source dies after a few chunks of model.safetensors have arrived.
        if getattr(coro, "cr_code", None) is not None and "wait_for" in coro.cr_code.co_name:
            reads["n"] += 1
            if reads["n"] == 8:
                host.kill(first)
        return host.run(coro, timeout)

    fetcher = CheckpointFetcher(spec, client, run, read_bytes=64 << 10, request_timeout=20)
    result = fetcher.fetch(0, m, [peer_id(first), peer_id(second)], tmp_path / "dest")
    assert result.sources == [peer_id(first), peer_id(second)]
    total = sum(p.stat().st_size for p in written.path.rglob("*") if p.is_file())
    assert result.bytes_fetched == total  # resumed at the byte where the first source stopped
    v = result.verified
    assert v.manifest_digest == m and v.meta.step == 7
    assert v.path == tmp_path / "dest" / "stage-0" / "step-0000000007"
    assert not [p for p in v.path.parent.iterdir() if p.name.startswith(".tmp-")]
    for name, p in module.named_parameters():
        assert torch.equal(v.model_state[name], p.detach())


def test_tampered_chunk_is_refused_and_fetched_again_elsewhere(host, client, spec, ckpt, tmp_path):
    written, _ = ckpt
    m = written.manifest_digest
    bad_path = copy_checkpoint(written.path, tmp_path / "bad")
    flip_byte(bad_path / MODEL_FILE, (bad_path / MODEL_FILE).stat().st_size // 2)
    bad, _ = _serve(host, spec, bad_path, m, client)
    good, _ = _serve(host, spec, copy_checkpoint(written.path, tmp_path / "good"), m, client)
    fetcher = CheckpointFetcher(spec, client, host.run, read_bytes=256 << 10)

    with pytest.raises(FetchFailed, match=r"model\.safetensors does not match its signed sha256"):
        fetcher.fetch(0, m, [peer_id(bad)], tmp_path / "only-bad")
    assert not list((tmp_path / "only-bad" / "stage-0").iterdir())  # nothing published, temp removed

    result = fetcher.fetch(0, m, [peer_id(bad), peer_id(good)], tmp_path / "dest")
    assert result.sources == [peer_id(bad), peer_id(good)]
    assert signing.sha256_file(result.verified.path / MODEL_FILE) == signing.sha256_file(written.path / MODEL_FILE)


def test_substituted_or_untrusted_checkpoint_is_refused(host, client, spec, keys, ckpt, tmp_path):
    written, module = ckpt
    # A source that answers for our digest with another checkpoint, properly signed by the keeper.
    other = write_checkpoint(
        tmp_path / "other" / "stage-0" / "step-0000000099",
        spec=spec,
        stage=0,
        step=99,
        tokens_seen=0,
        model_state=module.state_dict(),
        key_paths=[keys["keeper"][0]],
    )
    liar, _ = _serve(host, spec, other.path, written.manifest_digest, client)
    fetcher = CheckpointFetcher(spec, client, host.run)
    with pytest.raises(
        CheckpointRefused,
        match=f"the signatures cover checkpoint {other.manifest_digest}, not the requested {written.manifest_digest}",
    ):
        fetcher.fetch(0, written.manifest_digest, [peer_id(liar)], tmp_path / "d1")
    # A checkpoint signed by a key the spec does not trust.
    forged = write_checkpoint(
        tmp_path / "forged" / "stage-0" / "step-0000000100",
        spec=spec,
        stage=0,
        step=100,
        tokens_seen=0,
        model_state=module.state_dict(),
        key_paths=[keys["mallory"][0]],
    )
    mallory, _ = _serve(host, spec, forged.path, forged.manifest_digest, client)
    fp = signing.fingerprint(keys["mallory"][1].read_text())
    with pytest.raises(CheckpointRefused, match=f"signatures/{fp}.sig is by key {fp}, which is not trusted"):
        fetcher.fetch(0, forged.manifest_digest, [peer_id(mallory)], tmp_path / "d2")
    # Rollback: older than what the peer holds.
    good, _ = _serve(host, spec, copy_checkpoint(written.path, tmp_path / "g"), written.manifest_digest, client)
    with pytest.raises(
        CheckpointRefused, match="step is 7, older than the step already held \\(8\\): rollback refused"
    ):
        fetcher.fetch(0, written.manifest_digest, [peer_id(good)], tmp_path / "d3", held_step=8)


# --- the loading policy -----------------------------------------------------------------------------


def test_restore_refuses_tampered_local_then_fetches_and_announces(host, client, spec, ckpt, tmp_path):
    written, module = ckpt
    good, _ = _serve(host, spec, copy_checkpoint(written.path, tmp_path / "good"), written.manifest_digest, client)
    root = tmp_path / "mine"
    tampered = copy_checkpoint(written.path, root)
    flip_byte(tampered / MODEL_FILE, 200)
    record = {**announcement(7, written.manifest_digest), "signers": list(written.signers)}
    swarm = FakeSwarm(peer_id=peer_id(client), announcements=[(peer_id(good), record)])
    events = Events()
    service = CheckpointService(
        spec, CheckpointStore(root, spec), swarm=swarm, p2p=client, run=host.run, event=events, announce_period=0.5
    )

    fresh = LlamaStage.from_spec(spec, 0)
    restored = service.restore(0, fresh)
    service.stop()
    ((text, refused),) = events.named("checkpoint_refused")
    assert refused["path"] == str(tampered) and refused["source"] == "local"
    assert "model.safetensors: content does not match the signed digest" in refused["reason"]
    ((_, got),) = events.named("restored")
    assert got["step"] == 7 and got["source"] == peer_id(good) and got["manifest_digest"] == written.manifest_digest
    assert restored.verified.path != tampered
    for name, p in module.named_parameters():
        assert torch.equal(dict(fresh.named_parameters())[name], p)
    # It now serves and announces the checkpoint it verified.
    assert written.manifest_digest in service.server.served()
    assert (0, restored.verified.to_record()) in swarm.announced
