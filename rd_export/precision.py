"""Precision table of the exporter: one row per precision, nothing precision-specific elsewhere.

Every precision is an ONNX artifact derived from the verified FP32 ONNX (precision lives in the
ONNX: TensorRT 11 builds strongly typed networks only, docs/ARCHITECTURE.md), plus the thresholds its
verification must meet. Each row names its derive function as a plain Python function; the FP16
and INT8 ones import their module when called (``onnx`` for FP16, the ``calibration`` package for
INT8), so reading the table costs nothing. The dependency runs one way: the exporter calls
``calibration.api.build_int8``; calibration uses only the exporter's comparisons
(``rd_export.verify``), never this table or the export (tests/test_layering.py).
:func:`register_precision` adds further rows, and the CLI picks them up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import UsageError

__all__ = ["PrecisionSpec", "PRECISIONS", "register_precision", "get_precision", "onnx_name", "plan_name",
           "derive_fp16", "derive_int8"]


@dataclass(frozen=True)
class PrecisionSpec:
    name: str
    #: inserted before ".onnx": model.onnx, model.fp16.onnx, model.int8.onnx
    suffix: str
    #: the function deriving this precision's ONNX from the verified FP32 ONNX, called as
    #: ``derive(fp32_onnx, out=path, steps=..., seed=..., progress=..., **options) -> Path``
    #: (it verifies before returning); None for fp32, which is the export itself.
    derive: Callable[..., Path] | None
    #: what verification compares against: "torch" (the checkpoint) or "fp32" (the FP32 ONNX)
    reference: str
    #: end-to-end PSNR of the derained image vs the reference (dB, peak 2 on [-1, 1])
    min_psnr_db: float
    #: per-step max |x_next - reference| at low/middle/high t; None = not checked
    max_step_abs: float | None
    #: extra options derive() requires (e.g. ("calib",) for INT8); the CLI checks them
    requires: tuple[str, ...] = ()
    #: optional options derive() accepts (e.g. ("calib_images", "method") for INT8)
    accepts: tuple[str, ...] = ()
    description: str = ""

    def derive_fn(self) -> Callable[..., Path]:
        if self.derive is None:
            raise UsageError(f"precision {self.name} is the export itself; nothing to derive")
        return self.derive


PRECISIONS: dict[str, PrecisionSpec] = {}


def register_precision(spec: PrecisionSpec) -> None:
    PRECISIONS[spec.name] = spec


def derive_fp16(fp32_onnx: str | Path, out: str | Path | None = None, **options) -> Path:
    """FP16's row: :func:`rd_export.fp16.make_fp16` (needs ``onnx``, imported here)."""
    from rd_export.fp16 import make_fp16

    return make_fp16(fp32_onnx, out, **options)


def derive_int8(fp32_onnx: str | Path, out: str | Path | None = None, *, calib: str | Path,
                steps: int | None = None, seed: int = 0, progress: Callable[[str], None] | None = None,
                **options) -> Path:
    """INT8's row: :func:`calibration.api.build_int8` on the folder ``calib``, gated by this row's
    ``min_psnr_db`` unless the caller gives one."""
    from calibration.api import build_int8

    options.setdefault("min_psnr_db", PRECISIONS["int8"].min_psnr_db)
    return build_int8(fp32_onnx, calib, out=out, steps=steps, seed=seed, progress=progress, **options)


register_precision(PrecisionSpec(
    name="fp32", suffix="", derive=None, reference="torch", min_psnr_db=60.0, max_step_abs=1e-4,
    description="the exported graph, verified against the torch EMA estimator"))
register_precision(PrecisionSpec(
    name="fp16", suffix=".fp16", derive=derive_fp16, reference="fp32", min_psnr_db=40.0,
    max_step_abs=None,
    description="FP16 weights/activations with FP32 I/O and FP32 islands (rd_export.fp16.ISLANDS)"))
register_precision(PrecisionSpec(
    name="int8", suffix=".int8", derive=derive_int8, reference="fp32", min_psnr_db=35.0,
    max_step_abs=None, requires=("calib",),
    accepts=("calib_images", "method", "cpu_variant", "target_psnr_db", "max_fp32_layers"),
    description="INT8 Q/DQ (Conv/MatMul/Gemm), calibrated along whole DDIM trajectories; "
                "also <stem>.int8.cpu.onnx for onnxruntime on x86"))


def get_precision(name: str) -> PrecisionSpec:
    try:
        return PRECISIONS[str(name)]
    except KeyError:
        raise UsageError(f"precision {name!r} is not supported; choose one of {', '.join(PRECISIONS)}") from None


def onnx_name(stem: str, precision: str) -> str:
    """``model`` + fp16 -> ``model.fp16.onnx`` (manifest ``model.fp16.json``)."""
    return f"{stem}{get_precision(precision).suffix}.onnx"


def plan_name(onnx_path: str | Path) -> str:
    """``model.fp16.onnx`` -> ``model.fp16.trt.plan`` (manifest ``model.fp16.trt.json``; CONTRACTS.md)."""
    return f"{Path(onnx_path).name.removesuffix('.onnx')}.trt.plan"
