"""Ctrl-C / SIGTERM during rd-train fit: the step in flight finishes, last.pt is saved at that step
(not only at the last --ckpt-every), the exit is 130 / 143, and the run resumes from there."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch


def _logged_steps(run) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize(("sig", "code", "word"), [(signal.SIGINT, 130, "interrupted"),
                                                   (signal.SIGTERM, 143, "terminated")])
def test_signal_saves_the_current_step_then_resumes(tmp_path, image_dirs, sig, code, word):
    clean, rainy = image_dirs
    run = tmp_path / "run"
    args = ["fit", "--clean", str(clean), "--rainy", str(rainy), "--out", str(run), "--config", "tiny",
            "--steps", "100000", "--ckpt-every", "100000", "--log-every", "1", "--crop", "16", "--batch", "2",
            "--threads", "1", "--quiet"]
    # A background job inherits SIGINT as ignored, which fit keeps: restore the default in the child.
    proc = subprocess.Popen([sys.executable, "-m", "training.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while len(_logged_steps(run)) < 3:
        if proc.poll() is not None:
            pytest.fail(f"rd-train ended early ({proc.returncode}): {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("rd-train did not log 3 steps in 120 s")
        time.sleep(0.05)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert f"error: {word}" in stderr and "Traceback" not in stderr
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["step"] == _logged_steps(run)[-1] >= 3  # the step in flight was finished and saved
    assert last["ema_updates"] == last["step"]
    assert torch.load(run / "model.pt", weights_only=True)["step"] == last["step"]
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name or p.name.startswith(".")]
    if sig == signal.SIGINT:  # resumes from the saved step (in-process: one torch start-up less)
        from training.train import fit, resolve_train_config

        cfg = resolve_train_config(run / "last.pt", {"steps": last["step"] + 1})
        assert fit(clean, rainy, run, train=cfg, resume=run / "last.pt").step == last["step"] + 1
