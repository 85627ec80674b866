"""Ctrl-C / SIGTERM in a real process: exit 130 / 143, no partial or temporary file, resumable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.batch import RECORD_NAME

LAUNCHER = Path(__file__).with_name("rd_run_fake.py")


def _start(args: list, delay: float) -> subprocess.Popen:
    env = dict(os.environ, RD_FAKE_DELAY=str(delay))
    # A shell's background job starts with SIGINT ignored, and Python keeps an inherited SIG_IGN
    # (no KeyboardInterrupt): restore the default so the test does not depend on how pytest runs.
    return subprocess.Popen([sys.executable, str(LAUNCHER), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"rd-run ended early ({proc.returncode}): {out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for rd-run to start working")
        time.sleep(0.02)


def _leftovers(folder: Path) -> list[str]:
    """Temporary or lock files left behind (rd-run's record of its outputs is not a leftover)."""
    return sorted(p.name for p in folder.rglob("*") if (p.name.startswith(".") or ".tmp" in p.name)
                  and p.name != RECORD_NAME)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_image_batch_then_resume(tmp_path, sig, code, rd_run):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(12):
        Image.fromarray(np.full((8, 8, 3), i * 10, np.uint8)).save(src / f"{i:02d}.png")
    proc = _start(["derain", src, "-o", out, "--json"], delay=0.15)
    _wait_for(lambda: out.is_dir() and any(p.suffix == ".png" and not p.name.startswith(".") for p in out.iterdir()),
              proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == code, stderr
    assert "rd-run: error: interrupted" in stderr or "rd-run: error: terminated" in stderr
    report = json.loads(stdout)
    assert report["interrupted"] is True and report["exit_code"] == code
    assert _leftovers(out) == []
    done = sorted(p.name for p in out.iterdir() if p.name != RECORD_NAME)
    assert 1 <= len(done) < 12
    for name in done:  # every output present is complete
        with Image.open(out / name) as img:
            assert (np.asarray(img) == 255 - int(name[:2]) * 10).all()
    # resume: only the rest is derained
    r = rd_run("derain", src, "-o", out, "--skip-existing", "--json")
    assert r.code == 0, r
    assert r.json["totals"]["skipped"] == len(done) and r.json["totals"]["ok"] == 12 - len(done)


def test_sigint_during_video_leaves_no_temp_file(tmp_path, make_video):
    src = make_video(tmp_path / "in" / "clip.mp4", frames=40, fps=10, audio=True)
    out = tmp_path / "out"
    proc = _start(["derain", src, "-o", out], delay=0.05)
    _wait_for(lambda: out.is_dir() and any(".tmp" in p.name for p in out.iterdir()), proc)  # mid-encode
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert _leftovers(out) == [] and [p.name for p in out.iterdir() if p.name != RECORD_NAME] == []  # no partial



def test_sigint_stops_a_stream_and_keeps_the_recording(tmp_path):
    cv2 = pytest.importorskip("cv2", reason="OpenCV (the [stream] extra) is not installed")
    src = tmp_path / "long.mp4"
    w = cv2.VideoWriter(str(src), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (32, 24))
    for i in range(200):
        w.write(np.full((24, 32, 3), i % 250, np.uint8))
    w.release()
    rec = tmp_path / "rec"
    proc = _start(["stream", "--source", src, "--out", rec / "out.mp4", "--json"], delay=0.05)
    _wait_for(lambda: rec.is_dir() and any(".tmp" in p.name for p in rec.iterdir()), proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    report = json.loads(stdout)
    assert report["interrupted"] is True and 1 <= report["frames"] < 200
    assert sorted(p.name for p in rec.iterdir()) == ["out.mp4"]  # finalised, temp renamed
    cap = cv2.VideoCapture(str(rec / "out.mp4"))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    assert n == report["frames"]


def test_an_interrupt_as_the_lock_is_taken_leaves_no_lock_file(tmp_path, rd_run, fake_factory, monkeypatch):
    """An interrupt the lock's bookkeeping deferred is raised as acquire() returns; the batch's
    cleanup must still know the lock (it used to be tracked only after acquire returned)."""
    import runtime.batch as batch

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "a.png")
    real = batch.OutputLock.acquire

    def acquire_then_interrupt(self):
        assert real(self) is None and self.path.exists()
        raise KeyboardInterrupt

    monkeypatch.setattr(batch.OutputLock, "acquire", acquire_then_interrupt)
    r = rd_run("derain", src, "-o", out)
    assert r.code == 130, r
    assert _leftovers(out) == []
