"""Real TensorRT: build + parity vs onnxruntime (``pytest -m trt``; skipped without TensorRT / a GPU).

Written without access to TensorRT (no machine here has it, and the GPU machines lent so far
have CUDA and PyTorch but not TensorRT): these have not run yet.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.trt

trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install 'raindiffusion-edge[trt]')")
try:
    from cuda.bindings import runtime as _cudart
except ImportError:
    try:
        from cuda import cudart as _cudart  # noqa: F401
    except ImportError:
        pytest.skip("cuda-python is not installed", allow_module_level=True)

from rd_export.tensorrt import EngineStep, build_engine, gpu_info  # noqa: E402
from rd_export.verify import OnnxStep  # noqa: E402
from runtime.errors import RDError, UsageError  # noqa: E402
from runtime.manifest import Manifest, manifest_path_for  # noqa: E402

try:
    GPU = gpu_info()
except RDError as e:  # pragma: no cover - depends on the machine
    pytest.skip(f"no usable CUDA device: {e}", allow_module_level=True)


@pytest.fixture
def onnx_dir(exported, tmp_path):
    for p in (exported.onnx, manifest_path_for(exported.onnx), exported.fp16, manifest_path_for(exported.fp16)):
        shutil.copy(p, tmp_path / p.name)
    return tmp_path


def _args(n, h, w, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 3, h, w), dtype=np.float32), rng.uniform(-1, 1, (n, 3, h, w)).astype(np.float32),
            np.full((n,), 667.0, np.float32), np.tile(np.array([[4.1, 3.9, 0.3, 0.95]], np.float32), (n, 1)))


@pytest.mark.parametrize("name,tol", [("model.onnx", 5e-3), ("model.fp16.onnx", 5e-2)])
def test_real_build_and_parity(onnx_dir, name, tol):
    src = onnx_dir / name
    plan = build_engine(src, timing_cache=onnx_dir / "timing.cache", steps=3)  # verify=True: vs onnxruntime
    m = Manifest.for_artifact(plan)
    assert m.get("verification")["passed"] and m.get("tensorrt")["version"] == trt.__version__
    assert [p["at"] for p in m.get("verification")["profile_points"]] == ["max"]  # TEST_PROFILE: opt == min
    assert m.get("tensorrt")["compute_capability"] == GPU["compute_capability"]
    # the plan is raw: TensorRT's own runtime deserialises the file as written
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())
    assert engine is not None and engine.num_io_tensors == 5
    step = EngineStep(plan.read_bytes(), m.step_descriptor)
    try:
        for n, h, w in [(1, 32, 32), (2, 32, 64), (2, 64, 48)]:  # square, non-square, batch 2 (within profile)
            args = _args(n, h, w)
            got, want = step(*args), OnnxStep(src)(*args)
            assert got.shape == want.shape and np.isfinite(got).all()
            assert np.abs(got - want).max() < tol * max(1.0, float(np.abs(want).max()))
        with pytest.raises(UsageError, match="outside its optimisation profile"):
            step(*_args(4, 32, 32))  # batch 4 > the profile's max 2
    finally:
        step.close()


def test_real_version_compatible_build(onnx_dir):
    """BuilderFlag.VERSION_COMPATIBLE: the plan verifies (deserialised with host code allowed) and
    the runtime loads it."""
    from runtime.backends import open_backend

    plan = build_engine(onnx_dir / "model.onnx", version_compatible=True, steps=3)
    assert Manifest.for_artifact(plan).get("tensorrt")["version_compatible"] is True
    with open_backend(plan) as be:
        assert be.name == "tensorrt"
