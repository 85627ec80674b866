"""The runtime never imports torch: checked in a fresh interpreter, including a real derain."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_runtime_imports_without_torch():
    proc = _run("""
        import sys
        import runtime, runtime.derainer, runtime.tiling, runtime.backends
        import runtime.backends.onnxruntime, runtime.backends.tensorrt
        from runtime import Derainer
        heavy = sorted(m for m in ("torch", "tensorrt", "cuda", "onnxruntime") if m in sys.modules)
        print(",".join(heavy))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"imported at module scope: {proc.stdout.strip()}"


def test_derain_runs_without_torch(tiny_model):
    proc = _run(f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now fails
        import numpy as np
        from runtime import Derainer
        d = Derainer({str(tiny_model.onnx)!r}, steps=2, threads=1)
        out = d.derain(np.zeros((9, 11, 3), np.uint8))
        assert out.shape == (9, 11, 3)
        print("ok", "onnxruntime" in sys.modules)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ok", "True"]
