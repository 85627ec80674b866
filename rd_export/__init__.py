"""Export RainDiffusion checkpoints to verified ONNX and TensorRT engines.

    export_onnx(checkpoint, out_dir, model="derain") -> Path     (torch; verified vs the torch sampler)
    make_fp16(model.onnx) -> Path                                  (onnx + onnxruntime; verified vs FP32)
    build_engine(model.onnx, descriptor=None, ...) -> Path         (tensorrt + cuda-python)

Names resolve lazily, so ``import rd_export`` (and the ONNX -> engine path) never imports torch.
"""

from __future__ import annotations

import importlib

__all__ = ["export_onnx", "verify_onnx", "make_fp16", "build_engine", "build", "BuildOptions"]

_WHERE = {"export_onnx": "rd_export.export", "verify_onnx": "rd_export.export", "make_fp16": "rd_export.fp16",
          "build_engine": "rd_export.tensorrt", "build": "rd_export.pipeline", "BuildOptions": "rd_export.pipeline"}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'rd_export' has no attribute {name!r}")
