"""Fixtures of the ``gpu`` tests: real CUDA through cuda-python, kernels from the torch stand-in.

They skip, with the reason, where there is no CUDA GPU, no CUDA build of PyTorch or no
cuda-python (``cuda.bindings``). benchmarks/gpu_checks.py runs them in one call on a lent GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

HERE = Path(__file__).resolve().parent
for p in (HERE, HERE.parent / "fakes", HERE.parents[1]):  # standin, fake_tensorrt (the numpy references), repo
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def gpu_skip_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "no GPU this session: PyTorch is not installed"
    if not torch.cuda.is_available():
        return (f"no GPU this session: torch {torch.__version__} sees no CUDA device "
                f"(torch.cuda.is_available() is False)")
    try:
        import cuda.bindings.runtime  # noqa: F401
    except ImportError:
        return "cuda-python (cuda.bindings) is not installed: pip install cuda-python"
    return None


@pytest.fixture(scope="session")
def gpu():
    """What the gpu tests touch of the hardware: the real cuda-python runtime (``cudart``), a
    counting CudaDevice class on it (``device``), the stand-in's memory (``memory()``: torch CUDA
    tensors in place, kernels on the executor's stream), a long kernel on the legacy default
    stream (``sleep_on_default_stream``: torch.cuda._sleep on torch's default stream, which is
    the legacy one) and ``synchronize`` (the whole device). tests/runtime/test_gpu_tests_on_fakes.py
    builds the same namespace over the fakes."""
    reason = gpu_skip_reason()
    if reason:
        pytest.skip(reason)
    import standin
    import torch
    from cuda.bindings import runtime as cudart

    torch.cuda.init()
    return SimpleNamespace(cudart=cudart, device=standin.counting_device_class(cudart),
                           memory=lambda: standin.TorchCuda(0),
                           sleep_on_default_stream=lambda cycles: torch.cuda._sleep(int(cycles)),
                           synchronize=torch.cuda.synchronize, name=torch.cuda.get_device_name(0))
