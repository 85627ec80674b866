"""Fixtures of the calibration tests: a tiny fused-step ONNX with a manifest, and rainy images.

``tiny_fp32`` exports ``FusedStep(MultiScaleEstimator)`` of a 38k-parameter estimator (base 8,
two levels, size multiple 8) with seeded random weights (parameters that start at zero are
perturbed so the network is not trivially zero).

Its manifest uses a **gentle schedule** (beta_end 5e-4): with the default schedule and random
weights the DDIM loop amplifies every error by 1/sqrt(alpha_bar_901) ~ 58 per step (|x_0| ~ 200),
so INT8-vs-FP32 numbers would measure chaos, not quantization. With alpha_bar_901 ~ 0.78 the
loop is stable and end-to-end PSNR is a meaningful regression number for the pipeline. The
real model is measured by benchmarks/int8_vs_fp32.py.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TINY_PROFILE = dict(min_batch=1, opt_batch=1, max_batch=2, min_size=(16, 16), opt_size=(32, 32), max_size=(64, 64))
GENTLE_SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=5e-4)
STEPS = 4


@dataclass
class TinyArtifact:
    onnx: Path
    size_multiple: int


def export_tiny(dest: Path, *, seed: int = 0, steps: int = STEPS) -> TinyArtifact:
    import torch

    from runtime.descriptor import ShapeProfile, StepDescriptor
    from runtime.manifest import Manifest, sha256_file
    from training.multiscale import EstimatorConfig, FusedStep, MultiScaleEstimator
    from training.unet import UNetConfig

    torch.manual_seed(seed)
    est = MultiScaleEstimator(EstimatorConfig(unet=UNetConfig(base_channels=8, channel_mult=(1, 2), groups=4)))
    with torch.no_grad():
        for p in est.parameters():
            if not p.abs().sum():
                p.normal_(0.0, 0.05)
    est.eval()
    desc = StepDescriptor(size_multiple=est.size_multiple, profile=ShapeProfile(**TINY_PROFILE))
    x = torch.zeros(1, 3, 16, 16)
    dest.parent.mkdir(parents=True, exist_ok=True)
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(FusedStep(est), (x, x, torch.tensor([500.0]), torch.tensor([[1.0, 0.5, 1.0, 0.0]])),
                          str(dest), input_names=desc.input_names, output_names=desc.output_names,
                          dynamic_axes=desc.dynamic_axes(), opset_version=17, dynamo=False)
    Manifest(artifact=dest.name, format="onnx", precision="fp32", model="derain", sha256=sha256_file(dest),
             descriptor=desc.to_dict(), schedule=dict(GENTLE_SCHEDULE, default_steps=steps),
             model_config=est.config.to_dict(), toolkit_version="test",
             extra={"source": {"checkpoint": "random-init", "seed": seed}}).save(dest.with_suffix(".json"))
    return TinyArtifact(onnx=dest, size_multiple=est.size_multiple)


def write_rainy_images(folder: Path, *, n: int, size: tuple[int, int] = (40, 48), seed: int = 0) -> Path:
    """Synthetic rainy photos (smooth scene + rendered streaks), PNG."""
    from tests.conftest import make_scene
    from training.synthrain import render_rain

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.Generator(np.random.PCG64(seed))
    for i in range(n):
        Image.fromarray(render_rain(make_scene(rng, *size), seed=seed + i)).save(folder / f"rain{i:02d}.png")
    return folder


@pytest.fixture(scope="session")
def rainy_images():
    """The ``write_rainy_images(folder, n=..., size=(40, 48), seed=0)`` helper."""
    return write_rainy_images


@pytest.fixture(scope="session")
def steps() -> int:
    """DDIM steps of the tiny artifact's manifest (its default_steps)."""
    return STEPS


@pytest.fixture(scope="session")
def tiny_fp32(tmp_path_factory) -> TinyArtifact:
    return export_tiny(tmp_path_factory.mktemp("tiny_fp32") / "model.onnx")


@pytest.fixture(scope="session")
def rainy_dir(tmp_path_factory) -> Path:
    """6 synthetic rainy images, 40x48."""
    return write_rainy_images(tmp_path_factory.mktemp("rainy"), n=6)


@pytest.fixture(scope="session")
def tiny_int8(tiny_fp32, rainy_dir, tmp_path_factory) -> Path:
    """One INT8 build of the tiny model shared by the read-only tests (s8 + the u8r CPU variant)."""
    from calibration.api import build_int8

    out = tmp_path_factory.mktemp("tiny_int8")
    return build_int8(tiny_fp32.onnx, rainy_dir, out=out, calib_images=4, eval_images=2, seed=0,
                      cpu_variant=True, min_psnr_db=None, latency=True, latency_repeats=1)
