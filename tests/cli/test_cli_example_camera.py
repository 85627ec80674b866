"""examples/camera_pipeline.py runs as written (with a FAKE derainer standing in for the model)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2", reason="OpenCV (the [stream] extra) is not installed")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "camera_pipeline.py"


def test_camera_pipeline_example(tmp_path, fake_cls, capsys):
    spec = importlib.util.spec_from_file_location("camera_pipeline_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    src = tmp_path / "in.mp4"
    w = cv2.VideoWriter(str(src), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (32, 24))
    for i in range(6):
        w.write(np.full((24, 32, 3), 30 * i, np.uint8))
    w.release()
    fake = fake_cls()
    n = example.run(str(src), fake, out=str(tmp_path / "out.mp4"), max_frames=4)
    assert n == 4 and fake.frames == 4
    assert (tmp_path / "out.mp4").stat().st_size > 0
    assert "4 frames in" in capsys.readouterr().out
