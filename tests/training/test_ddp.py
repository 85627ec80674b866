"""DDP: ``torchrun --nproc_per_node=2 -m training.cli fit`` on CPU (gloo), tiny config, 2 steps,
with the discriminators of --lambda-adv (wrapped in DDP like the main model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch


def test_torchrun_two_cpu_processes(tmp_path, image_dirs):
    clean, rainy = image_dirs
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "training.cli", "fit", "--clean", str(clean), "--rainy", str(rainy), "--out", str(run),
           "--config", "tiny", "--steps", "2", "--crop", "16", "--batch", "2", "--log-every", "1", "--threads", "1",
           "--lambda-adv", "0.1"]  # the discriminators run under DDP too
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "cpu x2" in res.stderr
    ck = torch.load(run / "last.pt", weights_only=True)
    assert ck["step"] == 2 and "disc" in ck["state"] and "optimizer_disc" in ck
    assert len(ck["rng"]) == 2  # every rank's RNG state, for an exact resume
    assert not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])  # each rank its own stream
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["step"] for s in lines] == [1, 2]  # rank 0 writes alone
