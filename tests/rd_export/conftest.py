"""Fixtures of the exporter tests: a tiny random checkpoint and its verified exports.

``random_checkpoint`` is a real checkpoint file written with ``training.checkpoint.save_checkpoint``
(tiny preset: estimator U-Net base 8, channel_mult (1, 2), groups 4, size multiple 8) whose EMA
estimators have seeded random weights; the parameters that start at zero (GroupNorm biases, the
final convolution, the attention head's last layer) are perturbed, otherwise eps_hat == 0 and
every numeric comparison would be trivially exact. ``tiny_checkpoint`` (tests/conftest.py, a
3-step trained run) is used where the real training output matters (the CLI test).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rdx_helpers import TEST_PROFILE, TEST_STEPS, one_torch_thread, write_random_checkpoint  # noqa: E402


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


@dataclass
class Exported:
    checkpoint: Path
    onnx: Path
    fp16: Path
    out_dir: Path


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    with one_torch_thread():
        return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


@pytest.fixture(scope="session")
def exported(tmp_path_factory, random_checkpoint) -> Exported:
    """FP32 + FP16 exports of ``random_checkpoint`` (verified), shared read-only by the tests."""
    from rd_export.export import export_onnx
    from rd_export.fp16 import make_fp16
    from runtime.descriptor import ShapeProfile

    out = tmp_path_factory.mktemp("exported")
    with one_torch_thread():
        onnx_path = export_onnx(random_checkpoint, out, steps=TEST_STEPS, profile=ShapeProfile(**TEST_PROFILE))
        fp16 = make_fp16(onnx_path)
    return Exported(checkpoint=random_checkpoint, onnx=onnx_path, fp16=fp16, out_dir=out)


@pytest.fixture
def estimator_of():
    """estimator_of(checkpoint, model) -> the torch EMA estimator (eval)."""
    def load(ckpt: Path, model: str = "derain"):
        from training.checkpoint import build_estimator, load_checkpoint

        return build_estimator(load_checkpoint(ckpt), model=model, ema=True)

    return load
