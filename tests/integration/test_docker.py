"""The Docker image, built and run without a Docker engine (buildah, chroot isolation).

Run with ``pytest -m docker tests/integration/test_docker.py`` as root on a machine with buildah and
debootstrap (``apt-get install -y buildah debootstrap``). The first build takes several
minutes (debootstrap base, torch, dependencies); later builds reuse the cached layers.
Set SWARMTRAIN_TEST_SKIP_BUILD=1 to test the image already built instead of rebuilding, and
STORAGE_DRIVER=overlay (where the kernel allows it) for a much faster build and start than the
default vfs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "scripts" / "build_image.sh"
RUN_IMAGE = ROOT / "scripts" / "run_image.sh"
IMAGE = os.environ.get("SWARMTRAIN_TEST_IMAGE", "swarmtrain:latest")
BUILD_TIMEOUT_S = 40 * 60
MADDR_RE = re.compile(r"/ip4/127\.0\.0\.1/tcp/\d+/p2p/[1-9A-HJ-NP-Za-km-z]+")

pytestmark = [pytest.mark.docker, pytest.mark.timeout(BUILD_TIMEOUT_S + 15 * 60)]


def _missing_tools() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (debootstrap and buildah's chroot isolation)"
    missing = [tool for tool in ("buildah", "debootstrap") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (apt-get install -y buildah debootstrap)"
    return None


def _host_swarmtrain() -> Path:
    here = Path(sys.executable).parent / "swarmtrain"
    return here if here.exists() else ROOT / ".venv" / "bin" / "swarmtrain"


def _tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _buildah(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    driver = os.environ.get("STORAGE_DRIVER", "vfs")  # the same store as scripts/build_image.sh
    store = (
        []
        if driver == "vfs"
        else ["--root", f"/var/lib/containers/storage-{driver}", "--runroot", f"/run/containers/storage-{driver}"]
    )
    return subprocess.run(
        ["buildah", "--storage-driver", driver, *store, *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    reason = _missing_tools()
    if reason:
        pytest.skip(reason)
    if os.environ.get("SWARMTRAIN_TEST_SKIP_BUILD") == "1":
        if _buildah("inspect", "--type", "image", IMAGE).returncode != 0:
            pytest.fail(f"SWARMTRAIN_TEST_SKIP_BUILD=1 but there is no image {IMAGE}")
        return IMAGE
    log = tmp_path_factory.mktemp("build") / "build.log"
    with open(log, "w") as out:
        try:
            proc = subprocess.run(
                ["bash", str(BUILD), "--tag", IMAGE],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=BUILD_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"build_image.sh ran past {BUILD_TIMEOUT_S}s; log {log}:\n{_tail(log)}")
    if proc.returncode != 0:
        pytest.fail(f"build_image.sh failed ({proc.returncode}); log {log}:\n{_tail(log)}")
    return IMAGE


def _run_image(image: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(RUN_IMAGE), "--image", image, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_image_help_lists_the_commands(image):
    proc = _run_image(image, "--help")  # through the image's ENTRYPOINT ["swarmtrain"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Usage: swarmtrain" in proc.stdout
    for command in ("bootstrap", "run", "spec", "status", "checkpoint"):
        assert re.search(rf"^\s+{command}\s", proc.stdout, re.M), f"{command} missing:\n{proc.stdout}"

    proc = _run_image(image)  # no arguments: the image's CMD ["--help"]
    assert proc.returncode == 0 and "Usage: swarmtrain" in proc.stdout, proc.stdout + proc.stderr


def test_image_runs_as_swarm_with_cpu_torch_and_p2pd(image):
    script = (
        "id -u; id -un; "
        "python -c 'import torch, hivemind; print(torch.__version__)'; "
        "test -x \"$(python -c 'import hivemind, os; print(os.path.dirname(hivemind.__file__))')/hivemind_cli/p2pd\" "
        "&& echo p2pd-ok; "
        "touch /checkpoints/w /home/swarm/.swarmtrain/w && echo volumes-writable"
    )
    proc = _run_image(image, "--entrypoint", "/bin/sh", "--", "-c", script)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.split()
    assert lines[:2] == ["1000", "swarm"], proc.stdout
    assert lines[2].endswith("+cpu"), f"not the CPU torch: {lines[2]}"
    assert "p2pd-ok" in lines and "volumes-writable" in lines, proc.stdout


def _swarm_commands_available() -> bool:
    try:
        out = subprocess.run(
            [str(_host_swarmtrain()), "run", "--help"], capture_output=True, text=True, timeout=120
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--initial-peers" in out


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    # A new session per started process: stopping it by its process group reaches everything
    # it started (p2pd, and with chroot isolation the program inside the container).
    with open(log, "w") as out:
        return subprocess.Popen(
            argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )


def _stop(proc: subprocess.Popen, grace: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group whose leader is this pid: only ours
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _wait_for(pattern: re.Pattern, log: Path, proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = pattern.search(log.read_text(errors="replace"))
        if match:
            return match.group(0)
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[:3]} exited ({proc.returncode}) before printing {pattern.pattern}:\n{_tail(log)}")
        time.sleep(1)
    pytest.fail(f"no {pattern.pattern} in {timeout:.0f}s:\n{_tail(log)}")


READY_RE = re.compile(r"serving stage 0 as ([1-9A-HJ-NP-Za-km-z]{20,})")


def _stage0_peers(view: dict) -> dict[str, str]:
    """peer id -> state of the stage-0 peers in a `swarmtrain status --json` view."""
    return {
        p["peer_id"]: p["state"] for st in view.get("stages", []) if st.get("stage") == 0 for p in st.get("peers", [])
    }


def test_peer_in_image_joins_a_host_bootstrap(image, tmp_path):
    if not _swarm_commands_available():
        pytest.skip("swarm commands not available yet (`swarmtrain run --help` has no --initial-peers)")
    swarmtrain = str(_host_swarmtrain())
    work = tmp_path / "work"
    work.mkdir()
    (work / "ckpt").mkdir()
    spec = work / "spec.toml"
    subprocess.run(
        [swarmtrain, "spec", "init", str(spec), "--preset", "tiny", "--stages", "2"], check=True, timeout=120
    )
    text = "\n".join(f"Volunteer {i} trains stage {i % 2} of a tiny transformer, peer to peer." for i in range(4000))
    (work / "data.txt").write_text(text)
    for path in [work, *work.iterdir()]:
        os.chmod(path, 0o777 if path.is_dir() else 0o666)  # the container runs as uid 1000

    boot_log, peer_log = tmp_path / "bootstrap.log", tmp_path / "peer.log"
    started: list[subprocess.Popen] = []
    try:
        boot = _start(
            [
                swarmtrain,
                "bootstrap",
                "--host-maddrs",
                "/ip4/127.0.0.1/tcp/0",
                "--identity",
                str(tmp_path / "bootstrap.key"),
                "--spec",
                str(spec),
            ],
            boot_log,
        )
        started.append(boot)
        maddr = _wait_for(MADDR_RE, boot_log, boot, timeout=120)

        run_args = [
            "run",
            "--initial-peers",
            maddr,
            "--spec",
            "/work/spec.toml",
            "--stage",
            "0",
            "--data",
            "/work/data.txt",
            "--host-maddrs",
            "/ip4/127.0.0.1/tcp/0",
            "--threads",
            "1",
            "--identity",
            "/home/swarm/.swarmtrain/identity.key",
        ]
        if (
            "--checkpoint-dir"
            in subprocess.run([swarmtrain, "run", "--help"], capture_output=True, text=True, timeout=120).stdout
        ):
            run_args += ["--checkpoint-dir", "/work/ckpt"]
        peer = _start(["bash", str(RUN_IMAGE), "--image", image, "-v", f"{work}:/work", "--", *run_args], peer_log)
        started.append(peer)

        # 1. the peer in the image says it serves stage 0 (it reached the host's bootstrap) ...
        peer_id = READY_RE.search(_wait_for(READY_RE, peer_log, peer, timeout=300)).group(1)

        # 2. ... and the swarm, as seen from the host, lists it online in stage 0.
        deadline = time.monotonic() + 120
        listed: dict[str, str] = {}
        status_out = ""
        while time.monotonic() < deadline:
            if peer.poll() is not None:
                pytest.fail(f"the peer in the image exited ({peer.returncode}):\n{_tail(peer_log)}")
            try:
                status = subprocess.run(
                    [swarmtrain, "status", "--initial-peers", maddr, "--spec", str(spec), "--json"],
                    capture_output=True,
                    text=True,
                    timeout=90,
                )
                status_out = status.stdout + status.stderr
                if status.returncode == 0:
                    listed = _stage0_peers(json.loads(status.stdout))
                    if listed.get(peer_id) == "online":
                        break
            except (subprocess.TimeoutExpired, json.JSONDecodeError):
                pass
            time.sleep(3)
        assert listed.get(peer_id) == "online", (
            f"status does not list peer {peer_id} online in stage 0: {listed}\n--- status:\n"
            f"{status_out[-3000:]}\n--- peer log:\n{_tail(peer_log)}"
        )

        # 3. SIGTERM to run_image.sh reaches the program in the container: a clean stop.
        peer.send_signal(signal.SIGTERM)
        try:
            peer.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the peer in the image ignored SIGTERM for 90s:\n{_tail(peer_log)}")
        assert re.search(r"stopped|leaving", peer_log.read_text(errors="replace")), _tail(peer_log)
    finally:
        for proc in reversed(started):
            _stop(proc)
        # A run_image.sh killed before its own cleanup leaves its container: remove it by name.
        names = _buildah("containers", "--format", "{{.ContainerName}}")
        for proc in started:
            for name in names.stdout.split():
                if name.startswith(f"swarmtrain-run-{proc.pid}-"):
                    _buildah("rm", name)
