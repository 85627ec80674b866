"""Static Q/DQ quantization of the fused step: one calibration, one or more graphs.

Only ``Conv``, ``MatMul`` and ``Gemm`` get Q/DQ (docs/ARCHITECTURE.md: measured more accurate than
quantizing every op and no slower), weights per channel and symmetric. Everything else —
GroupNorm (InstanceNormalization), SiLU, the attention einsums and softmaxes, the resizes, the
softmax fusion over scales and the DDIM update arithmetic — stays FP32 by construction.

Two activation recipes come from the **same** calibrated ranges (a JSON range cache written once,
then read by every ``quantize_static`` call):

- ``s8``: signed INT8 activations, symmetric (zero point 0). The only form TensorRT executes
  for explicit Q/DQ (docs/ARCHITECTURE.md), and the portable default.
- ``u8``: unsigned INT8 activations, asymmetric. onnxruntime's x86 kernels are built around
  u8 x s8 products; see :mod:`calibration.report` for which one this CPU prefers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import onnx

from runtime.errors import ArtifactError, UsageError

__all__ = [
    "OP_TYPES",
    "Method",
    "Recipe",
    "RECIPES",
    "preprocess",
    "calibrate",
    "quantize",
    "quantizable_nodes",
    "attention_head_nodes",
    "qdq_summary",
]

OP_TYPES = ("Conv", "MatMul", "Gemm")


class Method(str, Enum):
    """Range estimator: MinMax (every value fits), Percentile (clip the top 0.001 %), Entropy (KL)."""

    minmax = "minmax"
    percentile = "percentile"
    entropy = "entropy"

    def ort(self):
        from onnxruntime.quantization import CalibrationMethod

        return {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                "entropy": CalibrationMethod.Entropy}[self.value]


@dataclass(frozen=True)
class Recipe:
    name: str
    activation: str  # "int8" | "uint8"
    symmetric: bool
    description: str
    #: 7-bit weights: avoids u8 x s8 pair-sum saturation (vpmaddubsw) on x86 without VNNI
    reduce_range: bool = False

    def quant_types(self):
        from onnxruntime.quantization import QuantType

        act = QuantType.QInt8 if self.activation == "int8" else QuantType.QUInt8
        return act, QuantType.QInt8


RECIPES: dict[str, Recipe] = {
    "s8": Recipe("s8", "int8", True, "INT8 activations, symmetric (zero point 0): TensorRT and portable"),
    "u8": Recipe("u8", "uint8", False, "UINT8 activations, asymmetric: onnxruntime x86 CPU kernels"),
    "u8r": Recipe("u8r", "uint8", False, "UINT8 activations, asymmetric, 7-bit weights: x86 CPUs without VNNI",
                  reduce_range=True),
}


@contextlib.contextmanager
def _quiet_ort_logging() -> Iterator[None]:
    """onnxruntime.quantization logs through the root logger; keep library calls silent."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def preprocess(fp32_onnx: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Shape inference + onnxruntime graph optimisation before quantization (``quant_pre_process``).

    Symbolic shape inference is skipped: it rejects the dynamic H/W arithmetic of the resizes, and
    ONNX shape inference plus the optimiser give every Conv/Gemm its known weight shapes.
    """
    from onnxruntime.quantization import quant_pre_process

    out = Path(out)
    try:
        with _quiet_ort_logging():
            quant_pre_process(str(fp32_onnx), str(out), skip_symbolic_shape=True)
    except Exception as e:  # onnx / onnxruntime raise many types; name the file
        raise ArtifactError(f"{fp32_onnx}: quantization pre-processing failed ({type(e).__name__}: {e})") from None
    return out


def calibrate(model: str | os.PathLike, reader, *, cache: str | os.PathLike, method: Method = Method.minmax,
              workdir: str | os.PathLike, chunk: int | None = None) -> Path:
    """Collect activation ranges of every Conv/MatMul/Gemm tensor; write them to ``cache`` (JSON).

    Ranges are stored raw (asymmetric min/max, or signed histograms) so that both recipes can
    be derived from them. Data flow through the calibrator ``chunk`` samples at a time (default:
    16 for MinMax, whose augmented graph outputs per-tensor min/max scalars; 1 for the histogram
    methods, which hold every intermediate tensor of a chunk in memory).
    """
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    method = Method(method)
    chunk = chunk or (16 if method is Method.minmax else 1)
    options: dict = {"symmetric": False}
    if method is Method.percentile:
        options["percentile"] = 99.999
    n = len(reader)
    with _quiet_ort_logging():
        calibrator = create_calibrator(
            Path(model), list(OP_TYPES), augmented_model_path=str(Path(workdir) / "augmented.onnx"),
            calibrate_method=method.ort(), extra_options=options,
        )
        for start, end in reader.chunks(max(1, int(chunk))):
            reader.set_range(start, end)
            calibrator.collect_data(reader)
        reader.set_range(0, n)
        tensors_range = calibrator.compute_data()
        save_tensors_data(tensors_range, Path(cache))
    del calibrator
    return Path(cache)


def quantize(model: str | os.PathLike, out: str | os.PathLike, *, cache: str | os.PathLike,
             recipe: Recipe | str = "s8", method: Method = Method.minmax,
             nodes_to_exclude: Sequence[str] = (), nodes_to_quantize: Sequence[str] | None = None,
             per_channel: bool = True) -> Path:
    """Write a QDQ model of ``model`` using the ranges in ``cache`` (no calibration inference)."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    recipe = RECIPES[recipe] if isinstance(recipe, str) else recipe
    act, weight = recipe.quant_types()
    extra = {"ActivationSymmetric": recipe.symmetric, "WeightSymmetric": True}
    if nodes_to_quantize is not None and not nodes_to_quantize:
        raise UsageError("nodes_to_quantize is empty: nothing would be quantized")
    with _quiet_ort_logging():
        quantize_static(
            str(model), str(out), calibration_data_reader=None, quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(OP_TYPES), per_channel=per_channel, reduce_range=recipe.reduce_range,
            activation_type=act, weight_type=weight, nodes_to_exclude=list(nodes_to_exclude),
            nodes_to_quantize=list(nodes_to_quantize) if nodes_to_quantize is not None else None,
            calibrate_method=Method(method).ort(), extra_options=extra, calibration_cache_path=str(cache),
        )
    return Path(out)


def quantizable_nodes(model: str | os.PathLike | onnx.ModelProto) -> list[tuple[str, str]]:
    """(name, op_type) of every Conv/MatMul/Gemm node, in graph order."""
    m = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    return [(n.name, n.op_type) for n in m.graph.node if n.op_type in OP_TYPES]


_ATTN_HEAD = re.compile(r"(^|/)attn_head(/|\.|$)")


def attention_head_nodes(model: str | os.PathLike | onnx.ModelProto) -> list[str]:
    """Conv nodes of the multi-scale attention-fusion head (Eq. 14): it feeds the scale softmax.

    Found by node name (``/estimator/attn_head/...``) or weight name (``estimator.attn_head.0.weight``),
    so renamed nodes (``rd_export.export.name_nodes``, onnxslim) are still found.
    """
    m = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    return [n.name for n in m.graph.node
            if n.op_type in OP_TYPES and (_ATTN_HEAD.search(n.name) or _ATTN_HEAD.search(n.input[1].replace(".", "/")))]


def qdq_summary(model: str | os.PathLike | onnx.ModelProto) -> dict:
    """Counts that tell what a QDQ graph holds: Q/DQ nodes, activation zero-point type, quantized ops."""
    m = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    inits = {i.name: i for i in m.graph.initializer}
    q_nodes = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    dq_nodes = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    act_types = set()
    nonzero_zp = 0
    for n in q_nodes:  # QuantizeLinear only quantizes activations (weights are stored quantized)
        if len(n.input) > 2 and n.input[2] in inits:
            zp = onnx.numpy_helper.to_array(inits[n.input[2]])
            act_types.add(str(zp.dtype))
            nonzero_zp += int((zp != 0).any())
    produced_by_dq = {o for n in dq_nodes for o in n.output}
    quantized = [n.name for n in m.graph.node
                 if n.op_type in OP_TYPES and any(i in produced_by_dq for i in n.input[:2])]
    return {"quantize_linear": len(q_nodes), "dequantize_linear": len(dq_nodes),
            "activation_types": sorted(act_types), "nonzero_zero_points": nonzero_zp,
            "quantized_ops": len(quantized)}
