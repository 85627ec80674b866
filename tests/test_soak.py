"""Memory soak (issue 7): one Derainer over a 500-frame stream keeps its RSS flat after warm-up.

Runs ``benchmarks/memory_soak.py`` (the same check the benchmark prints) in a fresh process,
so the RSS measured is the runtime's alone (numpy + onnxruntime, no torch from this test
process), on the tiny model exported by the shipping exporter.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "memory_soak.py"
FRAMES = 500
LIMIT_PCT = 5.0


@pytest.fixture(scope="module")
def tiny_onnx(tiny_checkpoint, tmp_path_factory) -> Path:
    from rd_export.export import export_onnx

    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("soak_model"), steps=2)


@pytest.mark.slow
def test_rss_growth_after_warmup_under_5_percent(tiny_onnx):
    cmd = [sys.executable, str(SCRIPT), "--onnx", str(tiny_onnx), "--frames", str(FRAMES), "--size", "64",
           "--steps", "2", "--every", "50", "--warmup-frames", "50", "--threads", "1",
           "--limit", str(LIMIT_PCT), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode in (0, 1), f"memory_soak.py failed ({proc.returncode}):\n{proc.stderr[-2000:]}"
    res = json.loads(proc.stdout)
    assert res["frames"] == FRAMES and res["samples"][-1]["frame"] == FRAMES
    curve = ", ".join(f"{s['frame']}:{s['rss_mib']:.1f}" for s in res["samples"])
    assert res["growth_after_warmup_pct"] < LIMIT_PCT, (
        f"RSS grew {res['growth_after_warmup_pct']:.2f}% after warm-up over {FRAMES} frames "
        f"(slope {res['slope_kib_per_frame']:.2f} KiB/frame); curve frame:MiB {curve}"
    )
