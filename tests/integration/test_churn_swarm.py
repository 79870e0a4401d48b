"""Churn: peers that join late, leave, crash, move to another stage, refill an empty stage and
restart.

Two stage-group members on real hivemind DHTs (a missed round, a failed round), then real peers
on 127.0.0.1 (``peer.dev.launcher.Cluster``), marked slow. The node-level move logic as pure
functions is in tests/unit/test_churn_policy.py.
"""

from __future__ import annotations

import signal

import pytest

from conftest import wait_until


@pytest.mark.timeout(300)
def test_a_peer_that_missed_its_round_drops_its_gradients():
    """Two stage-group members on real DHTs. A has accumulated (huge) gradients at epoch 0 and
    then stalls; B alone finishes epoch 0 and gathers a whole batch at epoch 1. When A wakes
    up, its gradients are stale: it must drop them and load B's state, not average them in
    (vanilla hivemind would average them into its next round, or apply them alone)."""
    import uuid

    import hivemind
    import torch

    from peer.averaging.optimizer import BoundedOptimizer

    run_id = f"lag{uuid.uuid4().hex[:8]}"
    dhts, opts = [], []
    try:
        dhts.append(hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
        dhts.append(
            hivemind.DHT(
                start=True,
                host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                initial_peers=[str(m) for m in dhts[0].get_visible_maddrs()],
            )
        )
        params = []
        for dht in dhts:
            param = torch.nn.Parameter(torch.zeros(8))
            params.append(param)
            opts.append(
                BoundedOptimizer(
                    dht=dht,
                    run_id=run_id,
                    target_batch_size=4,
                    batch_size_per_step=4,
                    params=[param],
                    optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0),
                    matchmaking_time=1.0,
                    averaging_timeout=10.0,
                    load_state_timeout=30.0,
                    delay_optimizer_step=False,
                    average_state_every=1000,
                    tracker_opts=dict(min_refresh_period=0.1, max_refresh_period=0.5, default_refresh_period=0.2),
                )
            )
        (pa, pb), (a, b) = params, opts
        # A accumulates one micro-batch of huge gradients at epoch 0, in step with the group.
        pa.grad = torch.full_like(pa, 1000.0)
        a.grad_averager.accumulate_grads_(batch_size=1)
        a.tracker.report_local_progress(0, 1)
        wait_until(
            lambda: (
                b.tracker.global_progress.samples_accumulated == 1
                and a.tracker.fetched_global_progress_this_epoch.is_set()
            ),
            60,
            "B to see A's progress",
            poll=0.1,
        )
        a.tick()  # hivemind's once-per-epoch exact sync check happens here, while in sync
        assert a.local_epoch == 0 and a.grad_averager.local_samples_accumulated == 1

        # B alone finishes epoch 0 (A is stalled and not in the round) ...
        pb.grad = torch.ones_like(pb)
        b.grad_averager.accumulate_grads_(batch_size=4)
        b.tracker.report_local_progress(0, 4)

        def b_ticks_to_epoch_1():
            b.tick()
            return b.local_epoch == 1

        wait_until(b_ticks_to_epoch_1, 90, "B's round for epoch 0", poll=0.1)
        after_round = pb.detach().clone()
        assert torch.allclose(after_round, torch.full_like(pb, -1.0)), after_round  # B's own update only
        # ... and gathers a whole batch at epoch 1.
        pb.grad = torch.ones_like(pb)
        b.grad_averager.accumulate_grads_(batch_size=4)
        b.tracker.report_local_progress(1, 4)
        wait_until(
            lambda: a.tracker.global_epoch == 1 and a.tracker.global_progress.samples_accumulated >= 4,
            60,
            "A to see the group at epoch 1 with a whole batch",
            poll=0.1,
        )

        # A wakes up one epoch behind. hivemind alone would let it keep its gradients.
        assert a.local_epoch == 0 and a.tracker.global_epoch == 1
        a.tick()
        assert a.local_epoch == 1, "A did not catch up with its group"
        assert a.grad_averager.local_samples_accumulated == 0
        assert all(float(g.abs().sum()) == 0.0 for g in a.grad_averager._grad_accumulators()), "stale grads kept"
        assert torch.equal(pa.detach(), after_round), f"A's weights {pa.detach()} are not the group's {after_round}"
        assert torch.equal(pb.detach(), after_round), "B's weights changed: A's stale gradients reached B"
    finally:
        for opt in opts:
            opt.shutdown()
        for dht in dhts:
            dht.shutdown()


@pytest.mark.timeout(180)
def test_a_peer_whose_gradient_round_failed_loads_its_groups_state():
    """hivemind 1.1.12's fallback after a failed gradient round applies *zero* gradients (the
    round already took and reset the accumulators). A member whose round failed while its
    group had other members thus holds other weights than those whose round went through,
    at the same epoch: it must load the group's state at its next tick, once."""
    import uuid

    import hivemind
    import torch

    from peer.averaging.optimizer import BoundedOptimizer

    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    param = torch.nn.Parameter(torch.zeros(8))
    opt = BoundedOptimizer(
        dht=dht,
        run_id=f"fail{uuid.uuid4().hex[:8]}",
        target_batch_size=4,
        batch_size_per_step=4,
        params=[param],
        optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0),
        matchmaking_time=1.0,
        averaging_timeout=3.0,
        load_state_timeout=5.0,
        delay_optimizer_step=False,
        average_state_every=1000,
    )
    try:
        # The group progress set below must not be refreshed from the DHT: stop the tracker's
        # background thread (the optimizer still reads and updates its fields).
        opt.tracker.shutdown(timeout=10)
        param.grad = torch.ones_like(param)
        opt.grad_averager.accumulate_grads_(batch_size=4)
        # The group as this peer sees it while a partner trains along; the partner never
        # shows up for the round, so matchmaking finds nobody and the round fails.
        opt.tracker.global_progress.num_peers = 2
        opt.tracker.global_progress.samples_accumulated = 8
        opt._update_global_epoch(None)
        assert opt.local_epoch == 1
        assert torch.equal(param.detach(), torch.zeros(8)), "hivemind's fallback applied gradients after all"
        assert opt.missed_group_update
        assert opt._should_load_state_from_peers(), "a peer that missed its group's update must catch up"
        assert not opt._should_load_state_from_peers(), "it catches up once, not on every step"
        # Alone in its group, a failed round leaves nobody to differ from.
        opt.tracker.global_progress.num_peers = 1
        opt._load_local_gradients_into_optimizer()
        assert not opt.missed_group_update
    finally:
        opt.shutdown()
        dht.shutdown()


# --- real peers on 127.0.0.1 (slow) ---------------------------------------------------------------

READY = 300.0  # a loaded 2-core machine takes a minute or more to start hivemind, p2pd and a stage


def _status(proc, timeout: float, predicate, what: str) -> dict:
    try:
        return proc.wait_event("status", timeout, predicate)
    except TimeoutError as err:
        raise AssertionError(f"{proc.name}: {what}\n{err}") from None


def _trained_more(proc, than: int, timeout: float = 240.0) -> dict:
    return _status(proc, timeout, lambda e: e["microbatches"] >= than, f"did not reach {than} micro-batches")


def _peer_args(*extra) -> list[str]:
    return ["--request-timeout", "20", *extra]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sigkill_is_absorbed_and_ctrl_c_leaves_cleanly(cluster, spec_path, text_data):
    """2 stages x 2 training peers. One of stage 1's peers is SIGKILLed: the others keep
    training and their loss keeps falling, its reaper kills everything it had started (p2pd,
    DHT and averager processes). Then a stage-0 peer gets Ctrl-C: it announces 'leaving',
    finishes, writes its final state and exits 0 with no process left; the rest train on."""
    from peer.base.procs import descendants

    from conftest import assert_all_gone, dump_logs

    boot, addr = cluster.bootstrap(spec_path=spec_path, timeout=READY)
    peers = {
        name: cluster.peer(
            name,
            [addr],
            spec_path=spec_path,
            stage=int(name[1]),
            data=str(text_data),
            extra=_peer_args("--final-state", str(cluster.workdir / f"{name}.safetensors")),
        )
        for name in ("s0a", "s0b", "s1a", "s1b")
    }
    for p in peers.values():
        p.wait_event("ready", READY)
    for p in peers.values():
        _status(
            p,
            READY,
            lambda e: e["microbatches"] >= 3 and e["peers_per_stage"] == [2, 2],
            "never trained with the whole swarm",
        )
    cluster.track()

    victim = peers.pop("s1a")
    children = descendants(victim.pid)
    assert children, "a peer runs p2pd and hivemind helpers: it should have child processes"
    at_kill = {name: p.last_event("status") for name, p in peers.items()}
    cluster.kill(victim)
    assert_all_gone(children, timeout=30)  # the reaper's sweep, not the test's

    try:
        for name, p in peers.items():
            before = at_kill[name]
            _status(
                p,
                300,
                lambda e, b=before: (
                    e["microbatches"] >= b["microbatches"] + 10 and e["loss"] is not None and e["loss"] < b["loss"]
                ),
                f"stopped training or its loss stopped falling after the kill (at kill: {before})",
            )
        # The dead peer's record expired: everyone sees one peer left on stage 1.
        for p in peers.values():
            _status(p, 120, lambda e: e["peers_per_stage"] == [2, 1], "still counts the dead peer")

        leaver = peers.pop("s0b")
        leaver_children = descendants(leaver.pid)
        at_leave = {name: p.last_event("status")["microbatches"] for name, p in peers.items()}
        leaver.popen.send_signal(signal.SIGINT)
        assert leaver.popen.wait(timeout=180) == 0
        names = [e["event"] for e in leaver.events]
        assert "stopping" in names and names[-1] == "stopped", names[-5:]
        assert (cluster.workdir / "s0b.safetensors").is_file()
        assert_all_gone([leaver.pid, *leaver_children], timeout=30)
        for name, p in peers.items():
            _trained_more(p, at_leave[name] + 5)
    except Exception as err:
        raise AssertionError(f"{type(err).__name__}: {err}\n{dump_logs(cluster)}") from None


def _settled_epochs(procs, since: float, timeout: float) -> int:
    """Wait until every process's last two status events (printed after ``since``) show one
    and the same epoch; return it."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        epochs = set()
        for p in procs:
            recent = [e for e in p.events if e.get("event") == "status" and e["time"] > since][-2:]
            epochs |= {e["epoch"] for e in recent} if len(recent) == 2 else {None}
        if len(epochs) == 1 and None not in epochs:
            return epochs.pop()
        if time.monotonic() > deadline:
            raise AssertionError(
                f"the stage group did not settle on one epoch: {[(p.name, p.last_event('status')) for p in procs]}"
            )
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_late_joiner_catches_up_and_ends_with_its_groups_weights(cluster, tmp_path, text_data):
    """A stage-1 peer that joins after its group trained several epochs loads the group's live
    state, trains along, and ends with the same weights as the peer that was there from the
    start (compared at the same epoch, within the averaging codecs' error).

    Gradients are averaged uncompressed here: with an 8-bit codec every peer gets a slightly
    different average (hivemind sends each peer the compressed difference to its own part),
    Adam turns that into per-parameter steps of up to the learning rate, and the group's
    weights agree only as well as its periodic (fp16) state averaging makes them."""
    import time

    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from peer.model.llama import LlamaStage
    from protocol.spec import preset_spec

    from conftest import TEST_TRAINING, dump_logs

    spec = preset_spec(
        "tiny", stages=2, run_id="churnlate", training=dict(TEST_TRAINING), compression=dict(gradients="none")
    )
    spec_path = tmp_path / "spec.toml"
    spec.save(spec_path)
    every = spec.training.average_state_every
    final = {name: cluster.workdir / f"{name}.safetensors" for name in ("early", "late")}
    boot, addr = cluster.bootstrap(spec_path=spec_path, timeout=READY)
    trainer = cluster.peer("trainer", [addr], spec_path=spec_path, stage=0, data=str(text_data), extra=_peer_args())
    early = cluster.peer(
        "early", [addr], spec_path=spec_path, stage=1, extra=_peer_args("--final-state", str(final["early"]))
    )
    try:
        for p in (trainer, early):
            p.wait_event("ready", READY)
        _status(early, 600, lambda e: e["epoch"] >= 3, "the group never reached epoch 3")
        late = cluster.peer(
            "late", [addr], spec_path=spec_path, stage=1, extra=_peer_args("--final-state", str(final["late"]))
        )
        caught = late.wait_event("catch_up", READY)
        assert caught["epoch"] >= 3
        late.wait_event("ready", READY)
        # Its first losses are the group's, not a fresh model's (~5.5 for bytes): it took the
        # group's weights. (Final weights alone would not show it: the group's periodic state
        # averaging pulls any member's weights together, trained or not.)
        group_loss = early.last_event("status")["loss"]
        first = _status(late, 300, lambda e: e["loss"] is not None, "the late joiner reports no loss")
        assert first["loss"] < group_loss + 0.5 < 5.0, (first["loss"], group_loss)
        # It trains along: its stage accumulates micro-batches and it follows the group's epochs
        # through two rounds of state averaging.
        _status(
            late,
            600,
            lambda e: e["samples_accumulated"] > 0 and e["epoch"] >= caught["epoch"] + 2 * every + 1,
            "the late joiner did not train along with its group",
        )

        # The only trainer leaves: no more work, the group settles on one epoch.
        cluster.stop(trainer)
        stopped_at = time.time()
        epoch = _settled_epochs([early, late], stopped_at, timeout=180)
        for p in (early, late):
            p.popen.send_signal(signal.SIGINT)
        for p in (early, late):
            assert p.popen.wait(timeout=180) == 0
    except Exception as err:
        raise AssertionError(f"{type(err).__name__}: {err}\n{dump_logs(cluster)}") from None

    states = {name: load_file(str(path)) for name, path in final.items()}
    for name, path in final.items():
        with safe_open(str(path), "pt") as f:
            assert int(f.metadata()["epoch"]) == epoch, f"{name} ended at another epoch"
    init = LlamaStage.from_spec(spec, 1).state_dict()
    diff = torch.sqrt(sum(((states["early"][k] - states["late"][k]) ** 2).sum() for k in init))
    moved = torch.sqrt(sum(((states["early"][k] - init[k]) ** 2).sum() for k in init))
    assert moved > 0
    print(f"final weights: late vs early differ by {diff:.4g}, training moved them {moved:.4g} (epoch {epoch})")
    # Same updates from the same state: what differs is the fp16 state averaging's rounding, the
    # one update hivemind lets a joiner skip when its group moves on during the download (and
    # the Adam statistics behind it), and all-reduce rounds a loaded machine finishes partially:
    # measured ~2.6% on a loaded 2-core machine, about one optimizer step out of fifty.
    assert diff <= 0.05 * moved, f"the late joiner's weights differ by {diff:.4g}; training moved them {moved:.4g}"


def _first_event(procs, name: str, timeout: float):
    """(process, event) of the first of ``procs`` to print event ``name``."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            e = p.last_event(name)
            if e is not None:
                return p, e
        time.sleep(0.5)
    raise TimeoutError(f"none of {[p.name for p in procs]} printed {name!r} within {timeout:.0f}s")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_emptied_stage_is_recovered_from_the_signed_checkpoint_and_restart_resumes_from_disk(
    cluster, tmp_path, text_data
):
    """A keeper signs checkpoints of a 2-stage swarm (stage 0: two peers, stage 1: one). The
    stage-1 peer is SIGKILLed: one stage-0 peer moves there, restores stage 1 from the newest
    signed checkpoint, reports the work lost (event ``recovered``), and training resumes.
    Then that peer is restarted with the same --identity and --checkpoint-dir while the keeper
    is gone: it loads the verified checkpoint it kept on disk, without a download."""
    import subprocess

    from peer.dev.launcher import SWARMTRAIN
    from protocol.spec import preset_spec

    from conftest import TEST_TRAINING, dump_logs

    key = tmp_path / "keeper.pem"
    subprocess.run([*SWARMTRAIN, "keygen", str(key)], capture_output=True, text=True, check=True, timeout=120)
    spec = preset_spec(
        "tiny",
        stages=2,
        run_id="churnrecovery",
        trusted_keys=(key.with_suffix(".pub").read_text(),),
        training=dict(TEST_TRAINING),
    )
    spec_path = tmp_path / "spec.toml"
    spec.save(spec_path)

    boot, addr = cluster.bootstrap(
        spec_path=spec_path,
        timeout=READY,
        extra=[
            "--keeper",
            "--signing-key",
            str(key),
            "--checkpoint-dir",
            str(tmp_path / "keeper-ckpts"),
            "--every",
            "3",
            "--keep",
            "50",
            "--announce-period",
            "1",
        ],
    )
    keeper_id = boot.wait_event("ready", 10)["peer_id"]

    def own(name):  # a persistent identity and checkpoint dir per peer name
        return ["--identity", str(tmp_path / f"{name}.id"), "--checkpoint-dir", str(tmp_path / f"{name}-ckpts")]

    stage0 = [
        cluster.peer(
            name,
            [addr],
            spec_path=spec_path,
            stage=0,
            data=str(text_data),
            extra=_peer_args("--rebalance-period", "2", *own(name)),
        )
        for name in ("a", "b")
    ]
    victim = cluster.peer("c", [addr], spec_path=spec_path, stage=1, data=str(text_data), extra=_peer_args())
    try:
        for p in (*stage0, victim):
            p.wait_event("ready", READY)
        for p in (*stage0, victim):
            _status(
                p,
                READY,
                lambda e: e["microbatches"] >= 2 and e["peers_per_stage"] == [2, 1],
                "never trained with the whole swarm",
            )
        signed = boot.wait_event("checkpoint_signed", 600, lambda e: e["step"] >= 2)
        assert not any(p.last_event("moved") for p in stage0), "a peer moved while every stage was served"

        cluster.kill(victim)
        mover, recovered = _first_event(stage0, "recovered", 300)
        other = next(p for p in stage0 if p is not mover)
        moved = mover.last_event("moved")
        assert moved["from"] == 0 and moved["to"] == 1 and moved["reason"] == "recovery"
        restored = mover.wait_event("restored", 1, lambda e: e["stage"] == 1)
        assert restored["source"] == keeper_id
        assert recovered["stage"] == 1 and recovered["restored_step"] == restored["step"] >= signed["step"]
        assert isinstance(recovered["epoch_lost"], int) and recovered["epoch_lost"] >= 0
        assert recovered["epoch_lost"] == max(0, recovered["last_seen_epoch"] - recovered["restored_step"])
        assert not other.last_event("moved"), "both stage-0 peers moved: stage 0 was left empty"
        # Training resumes through the refilled stage.
        for p in stage0:
            _status(p, 300, lambda e: e["peers_per_stage"] == [1, 1], "does not see the refilled stage")
        for p in stage0:
            _trained_more(p, p.last_event("status")["microbatches"] + 5)
        epoch = mover.last_event("status")["epoch"]
        _status(mover, 300, lambda e: e["epoch"] > epoch, "the recovered stage does not step")

        # Restart: the keeper is gone, and so are its announcements (they expire in 3 s).
        cluster.stop(boot)
        cluster.stop(mover)
        again = cluster.peer(
            "again",
            [other.last_event("ready")["maddrs"][0]],
            spec_path=spec_path,
            stage=1,
            data=str(text_data),
            extra=_peer_args(*own(mover.name)),
        )
        reloaded = again.wait_event("restored", READY)
        assert reloaded["source"] == "local" and reloaded["stage"] == 1
        assert reloaded["step"] == restored["step"] and reloaded["manifest_digest"] == restored["manifest_digest"]
        assert again.last_event("checkpoint_fetched") is None
        assert again.wait_event("ready", READY)["peer_id"] == mover.last_event("ready")["peer_id"]
        _trained_more(again, 3)
        _trained_more(other, other.last_event("status")["microbatches"] + 3)
    except Exception as err:
        raise AssertionError(f"{type(err).__name__}: {err}\n{dump_logs(cluster)}") from None


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_peer_moves_to_the_slower_stage_and_trains_there(cluster, spec_path, text_data):
    """Three peers on stage 0 and one on stage 1: stage 1 is the bottleneck. Exactly one
    stage-0 peer moves there (reason ``rebalance``), after loading stage 1's live state, and
    the swarm keeps training at 2 + 2; nobody moves back (the cool-down and the margin).

    Every peer announces the same ``--throughput``, so that 2 + 2 is the balance to expect.
    Measured figures (peer.model.capacity) depend on the stage (the last one runs the head and the
    loss) and on the moment: on this 2-core machine a peer measuring during its move, with
    the old stage's optimizer still shutting down, got 67 samples/s where its neighbour on
    the same stage had 152, and the policy then rightly moved a second peer to stage 1.
    tests/unit/test_balancing.py covers measured figures on stages of unequal cost."""
    from conftest import dump_logs

    rebalancing = _peer_args("--rebalance-period", "2", "--rebalance-cooldown", "10", "--throughput", "100")
    _, addr = cluster.bootstrap(spec_path=spec_path, timeout=READY)
    stage0 = [
        cluster.peer(f"s0{x}", [addr], spec_path=spec_path, stage=0, data=str(text_data), extra=rebalancing)
        for x in "abc"
    ]
    s1 = cluster.peer(
        "s1", [addr], spec_path=spec_path, stage=1, data=str(text_data), extra=_peer_args("--throughput", "100")
    )
    try:
        for p in (*stage0, s1):
            p.wait_event("ready", READY)
        mover, moved = _first_event(stage0, "moved", 600)
        assert moved["from"] == 0 and moved["to"] == 1 and moved["reason"] == "rebalance"
        # It took stage 1's live state before serving it (the group was ahead of a fresh init).
        caught = [
            e
            for e in mover.events
            if e["event"] in ("catch_up", "live_state_refused") and e["time"] > mover.last_event("moving")["time"]
        ]
        assert caught and caught[0]["event"] == "catch_up", [e["event"] for e in mover.events][-12:]
        for p in (*stage0, s1):
            _status(p, 300, lambda e: e["peers_per_stage"] == [2, 2], "does not see the swarm at 2 + 2")
        epoch = mover.last_event("status")["epoch"]
        _status(
            mover,
            300,
            lambda e: e["epoch"] >= epoch + 2 and e["stage"] == 1,
            "the mover does not train with stage 1's group",
        )
        for p in (*stage0, s1):
            _trained_more(p, p.last_event("status")["microbatches"] + 3)
        assert sum(1 for p in stage0 if p.last_event("moved")) == 1, "more than one peer moved"
    except Exception as err:
        raise AssertionError(f"{type(err).__name__}: {err}\n{dump_logs(cluster)}") from None
