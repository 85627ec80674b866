"""``rd-run serve`` as a user runs it: one command starts it, it answers, Ctrl-C / SIGTERM stop it cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.serve.serve_helpers import SEED, STEPS, frames, free_port_triple

pytestmark = pytest.mark.serve

ROOT = Path(__file__).resolve().parents[2]


def _children(pid: int) -> dict[int, str]:
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return {int(line.split(None, 1)[0]): line.split(None, 1)[1][:80] for line in out.strip().splitlines()}


def _leftovers() -> set[str]:
    """Shared-memory segments and PyTriton workspaces that exist now."""
    found = set()
    for root in (Path("/dev/shm"), Path.home() / ".cache" / "pytriton"):
        if root.is_dir():
            found |= {str(p) for p in root.iterdir()}
    return found


def _default_sigint() -> None:
    # a background job of a non-interactive shell starts with SIGINT ignored, and Python keeps that;
    # give the server what a foreground process in a terminal has, where Ctrl-C is pressed
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().split()[2] == "Z")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_rd_run_serve_answers_and_stops_cleanly(serve_available, reference, tmp_path, sig, code):
    from runtime.serving.client import DerainClient

    port = free_port_triple()
    log = tmp_path / "triton.log"
    before = _leftovers()
    cmd = [sys.executable, "-m", "runtime.cli", "serve", "--steps", str(STEPS), "--seed", str(SEED),
           "--port", str(port), "--threads", "1", "--log-file", str(log)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    try:
        with DerainClient(f"http://127.0.0.1:{port}") as client:
            deadline = time.monotonic() + 120
            while not client.is_ready():
                assert proc.poll() is None, f"rd-run serve exited early: {proc.communicate()[1][-2000:]}"
                assert time.monotonic() < deadline, "rd-run serve was not ready within 120 s"
                time.sleep(0.25)
            f = frames(7, (40, 48))[0]
            np.testing.assert_array_equal(client.derain(f), reference.derain(f))
        servers = _children(proc.pid)
        assert servers, "no tritonserver process under rd-run serve"
        t0 = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        seconds = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, err[-2000:]
    assert "rd-run: ready: serving 'derain'" in err
    assert "Traceback" not in err
    assert seconds < 30
    # The children get their parent's exit through their pipes, so they go a moment later: under
    # load (a full test run beside a training job) that moment was seconds.
    deadline = time.monotonic() + 15
    left = {p: what for p, what in servers.items() if _alive(p)}
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = {p: what for p, what in left.items() if _alive(p)}
    assert not left, f"outlived rd-run serve by 15 s: {left}"
    assert log.is_file() and "successfully loaded 'derain'" in log.read_text()
    assert _leftovers() - before == set(), "shared memory or a PyTriton workspace was left behind"


def test_rd_run_serve_port_in_use_is_a_usage_error(serve_available):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "runtime.cli", "serve", "--port", str(port)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert f"http port {port} on 127.0.0.1 is not available" in proc.stderr
    assert "Traceback" not in proc.stderr
