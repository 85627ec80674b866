"""INT8 calibration of the fused DDIM step (timestep-aware, explicit Q/DQ).

``build_int8(fp32_onnx, calib_dir, ...)`` turns a verified FP32 ONNX artifact and a folder of real
rainy photos into ``<stem>.int8.onnx`` (symmetric signed INT8 Q/DQ: TensorRT and any onnxruntime)
and ``<stem>.int8.cpu.onnx`` (UINT8 activations, 7-bit weights: onnxruntime on x86 CPUs), each
with its manifest. See calibration/README.md for the stages and the measurements behind them.
Never imports torch. The exporter calls this package (``rd_export.precision``'s INT8 row), not
the other way round: from a checkpoint, ``rd-export build model.pt --precision int8 --calib DIR``.
"""

from calibration.api import CPU_SUFFIX, DEFAULT_MIN_PSNR_DB, build_int8
from calibration.collect import CalibrationWarning

__all__ = ["CPU_SUFFIX", "DEFAULT_MIN_PSNR_DB", "CalibrationWarning", "build_int8"]
