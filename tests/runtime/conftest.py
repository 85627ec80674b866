"""Fixtures of the runtime tests: a tiny exported fused-step model and its torch reference.

The tests may import torch (to build the model and run the reference sampler); the runtime
package may not (see test_runtime_imports.py).

``tiny_model`` exports ``FusedStep(MultiScaleEstimator)`` of a 38k-parameter estimator
(base_channels 8, two levels, size multiple 8) with seeded random weights; the parameters that
start at zero (GroupNorm biases, the final convolution, the attention head's last layer) are
perturbed so the network is not trivially zero. With random weights the sampler's x_0 has a
large range (|x| up to ~200), so parity tests compare the float outputs with a PSNR whose peak
is the reference's range, which is stricter than comparing saturated uint8 images.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `pytest` run without installing the package
    sys.path.insert(0, str(ROOT))
FAKES = ROOT / "tests" / "fakes"
if str(FAKES) not in sys.path:  # fake_cuda, fake_tensorrt (FAKE cuda-python / TensorRT for CPU tests)
    sys.path.insert(0, str(FAKES))

TINY_PROFILE = dict(min_batch=1, opt_batch=1, max_batch=4, min_size=(8, 8), opt_size=(32, 32), max_size=(128, 128))


def psnr_range(x: np.ndarray, ref: np.ndarray) -> float:
    """PSNR of x against ref with the peak set to ref's value range (inf when identical)."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    mse = float(np.mean((x - ref) ** 2))
    peak = float(ref.max() - ref.min()) or 1.0
    return float("inf") if mse == 0 else 10.0 * np.log10(peak**2 / mse)


@dataclass
class TinyModel:
    onnx: Path
    estimator: object  # training.multiscale.MultiScaleEstimator (eval mode)
    size_multiple: int

    def reference(self, cond: np.ndarray, *, steps: int, seed: int) -> np.ndarray:
        """x_0 of the torch DDIM reference sampler for cond [N, 3, H, W] float32 (any H, W)."""
        import torch

        from training.diffusion import ddim_sample

        with torch_one_thread():
            return ddim_sample(self.estimator, torch.from_numpy(cond), steps=steps, seed=seed).numpy()

    def fused_step(self, x_t: np.ndarray, cond: np.ndarray, t: np.ndarray, coef: np.ndarray) -> np.ndarray:
        """One torch fused step (training.multiscale.fused_step) on numpy inputs."""
        import torch

        from training.multiscale import fused_step

        with torch_one_thread(), torch.no_grad():
            return fused_step(self.estimator, *(torch.from_numpy(a) for a in (x_t, cond, t, coef))).numpy()


@contextlib.contextmanager
def torch_one_thread():
    """Tiny convolutions run far faster on one torch thread on the shared 2-core CI box (OpenMP
    threads spin while other processes hold the cores); the previous setting is restored."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_tiny_estimator(seed: int = 0):
    import torch

    from training.multiscale import EstimatorConfig, MultiScaleEstimator
    from training.unet import UNetConfig

    torch.manual_seed(seed)
    est = MultiScaleEstimator(EstimatorConfig(unet=UNetConfig(base_channels=8, channel_mult=(1, 2), groups=4)))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in est.parameters():
            if not bool(p.abs().sum()):  # zero-initialised: GroupNorm biases, final conv, attention head
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return est.eval()


def export_tiny(estimator, out_dir: Path, *, name: str = "model", profile: dict | None = None) -> Path:
    """Export FusedStep(estimator) to ``out_dir/<name>.onnx`` and write its manifest.

    Uses the exporter that ships (``rd_export.export.export_estimator_onnx``: TorchScript
    export, node naming, onnxslim, checker) when it is importable, else ``torch.onnx.export``
    directly with the descriptor's names and dynamic axes. Verification against torch is left
    to the tests themselves.
    """
    import io
    import warnings

    import torch

    from runtime.descriptor import ShapeProfile, StepDescriptor
    from runtime.manifest import Manifest, manifest_path_for, sha256_file
    from runtime.schedule import ScheduleConfig

    desc = StepDescriptor(size_multiple=estimator.size_multiple, profile=ShapeProfile(**(profile or TINY_PROFILE)))
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / f"{name}.onnx"
    try:
        from rd_export.export import export_estimator_onnx
    except ImportError:
        export_estimator_onnx = None
    if export_estimator_onnx is not None:
        export_estimator_onnx(estimator, dest, desc)
        exporter = "rd_export.export.export_estimator_onnx"
    else:
        from training.multiscale import FusedStep

        m = desc.size_multiple
        args = (torch.zeros(1, 3, 2 * m, 2 * m), torch.zeros(1, 3, 2 * m, 2 * m), torch.full((1,), 500.0),
                torch.tensor([[1.0, 0.5, 1.0, 0.0]]))
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            buf = io.BytesIO()
            torch.onnx.export(FusedStep(estimator).eval(), args, buf, input_names=desc.input_names,
                              output_names=desc.output_names, dynamic_axes=desc.dynamic_axes(),
                              opset_version=desc.opset, dynamo=False)
        dest.write_bytes(buf.getvalue())
        exporter = "torch.onnx.export"
    sc = ScheduleConfig()
    Manifest(
        artifact=dest.name, format="onnx", precision="fp32", model="derain", sha256=sha256_file(dest),
        descriptor=desc.to_dict(),
        schedule={"num_train_timesteps": sc.num_train_timesteps, "beta_start": sc.beta_start,
                  "beta_end": sc.beta_end, "default_steps": 4},
        model_config=estimator.config.to_dict(), toolkit_version="test", extra={"source": {"exporter": exporter}},
    ).save(manifest_path_for(dest))
    return dest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> TinyModel:
    pytest.importorskip("torch")
    with torch_one_thread():
        est = build_tiny_estimator()
        path = export_tiny(est, tmp_path_factory.mktemp("tiny_model"))
    return TinyModel(onnx=path, estimator=est, size_multiple=est.size_multiple)


@pytest.fixture(scope="session")
def tiny_derainer(tiny_model):
    """One shared CPU Derainer (1 thread, 3 steps) for the cheap tests; do not close it."""
    from runtime.derainer import Derainer

    d = Derainer(tiny_model.onnx, steps=3, seed=0, threads=1)
    yield d
    d.close()


@pytest.fixture(scope="session")
def psnr():
    """psnr(x, ref) -> dB, with the peak set to ref's value range."""
    return psnr_range


@pytest.fixture
def fake_gpu(monkeypatch):
    """FAKE cuda-python + TensorRT runtime in sys.modules (CPU only): .cudart, .trt (both record calls)."""
    from types import SimpleNamespace

    import fake_cuda
    import fake_tensorrt

    cudart = fake_cuda.install(monkeypatch)
    trt = fake_tensorrt.install(monkeypatch, "10.9.0", cudart=cudart)
    return SimpleNamespace(cudart=cudart, trt=trt)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
