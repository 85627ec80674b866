"""Fixtures for the rd-run tests: a FAKE derainer (no model), tiny images and videos.

``FakeDerainer`` stands in for :class:`runtime.derainer.Derainer` (same constructor and methods);
it inverts the image (255 - x) so every test can tell a derained output from its input. It is
injected in-process by replacing ``runtime.cli.derainer_factory`` (see ``fake_factory``); the
subprocess tests use ``rd_run_fake.py``, a test-only launcher that does the same.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import runtime.cli as cli


class FakeDerainer:
    """Test double for runtime.derainer.Derainer: inverts the image. Not a model."""

    backend_name = "fake"
    manifest = None

    def __init__(self, artifact=None, *, steps=None, seed=0, tile=None, overlap=32, device="cpu", threads=None,
                 batch=None, fail_on_value: int | None = None, refine_strength=None, noise_scale=None,
                 refine_lowpass=None):
        self.artifact = artifact
        self.refine_strength = refine_strength  # passed only when --refine-strength is given
        self.noise_scale = noise_scale  # passed only when --noise-scale is given
        self.refine_lowpass = refine_lowpass  # passed only when --refine-lowpass is given
        self.steps = steps or 4
        self.device = device
        self.threads = threads
        self.options = {"steps": steps, "seed": seed, "tile": tile, "overlap": overlap, "device": device,
                        "threads": threads, "batch": batch}
        self.fail_on_value = fail_on_value  # raise on frames whose [0, 0, 0] pixel has this value
        self.frames = 0
        self.batch_calls = 0

    def derain(self, frame: np.ndarray, *, bgr: bool = False) -> np.ndarray:
        assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3, (frame.dtype, frame.shape)
        if self.fail_on_value is not None and frame[0, 0, 0] == self.fail_on_value:
            raise RuntimeError("fake engine failure")
        self.frames += 1
        return 255 - frame

    def derain_batch(self, frames):
        self.batch_calls += 1
        return [self.derain(f) for f in frames]


@pytest.fixture
def fake_cls() -> type[FakeDerainer]:
    return FakeDerainer


@pytest.fixture
def fake_factory(monkeypatch) -> list[FakeDerainer]:
    """Make rd-run use FakeDerainer; returns the list of instances it created."""
    created: list[FakeDerainer] = []

    def factory(artifact=None, **kw):
        d = FakeDerainer(artifact, **kw)
        created.append(d)
        return d

    monkeypatch.setattr(cli, "derainer_factory", factory)
    return created


class Run:
    def __init__(self, result):
        self.result = result
        self.code = result.exit_code
        self.stdout = result.stdout
        self.stderr = result.stderr

    @property
    def json(self) -> dict:
        return json.loads(self.stdout)

    def __repr__(self) -> str:
        return f"<exit {self.code}\nstdout: {self.stdout}\nstderr: {self.stderr}>"


@pytest.fixture
def rd_run(fake_factory) -> Callable[..., Run]:
    """Run ``rd-run ARGS`` in-process with the fake derainer."""
    runner = CliRunner()

    def run(*args: str | Path) -> Run:
        return Run(runner.invoke(cli.app, [str(a) for a in args], catch_exceptions=True))

    return run


def gradient(h: int = 24, w: int = 32, offset: int = 0) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 200 // max(w - 1, 1), y * 200 // max(h - 1, 1), (x + y) % 200], -1) + offset
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture
def make_image() -> Callable[..., Path]:
    def make(path: Path, array: np.ndarray | None = None, mode: str | None = None, **save_kw) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        arr = gradient() if array is None else array
        Image.fromarray(arr, mode).save(path, **save_kw)
        return path

    return make


def _make_video(path: Path, *, frames: int = 6, fps: int = 10, size: tuple[int, int] = (32, 48),
                audio: bool = True) -> Path:
    """A tiny H.264 (mp4/mkv/mov) or MPEG-4 (avi) video, with an AAC tone when ``audio``."""
    av = pytest.importorskip("av", reason="PyAV (the [video] extra) is not installed")
    h, w = size
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = "mpeg4" if path.suffix == ".avi" else "libx264"
    with av.open(str(path), "w") as c:
        v = c.add_stream(codec, rate=fps)
        v.width, v.height, v.pix_fmt = w, h, "yuv420p"
        if audio:
            a = c.add_stream("aac", rate=8000)
            a.layout = "mono"
        for i in range(frames):
            img = np.zeros((h, w, 3), np.uint8)
            img[:, : (i + 1) * w // frames] = (200, 60, 40)
            for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in v.encode(None):
            c.mux(p)
        if audio:
            n = int(8000 * frames / fps)
            tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / 8000)).astype(np.float32)[None]
            af = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
            af.sample_rate, af.pts = 8000, 0
            for p in a.encode(af):
                c.mux(p)
            for p in a.encode(None):
                c.mux(p)
    return path


@pytest.fixture
def make_video() -> Callable[..., Path]:
    return _make_video
