"""FP32 ONNX -> FP16 ONNX with FP32 I/O and FP32 islands (numpy + onnx + onnxruntime; no torch).

Converted with ``onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True,
op_block_list=..., node_block_list=...)`` (``onnxconverter_common`` crashed on this graph).
The islands that stay FP32 (``ISLANDS``; measured, see :func:`measure_islands` and
docs/export.md):

- ``normalization``: InstanceNormalization (what GroupNorm exports to), and the statistics of a
  GroupNorm exported as reductions (the prologue: rd_export.groupnorm). Its mean/variance are
  reductions over C/G*H*W elements per group: in FP16 a sum of squares passes 65504 at ~256x256
  even for unit activations (TensorRT#2691).
- ``softmax``: the per-pixel scale weights and the attention softmax (exp overflows in FP16).
- ``time_embedding``: everything computed from ``t`` alone. The sinusoid's arguments reach
  t * 1 = 1000, where FP16 spacing is 0.5 rad: cos/sin come out wrong.
- ``ddim_update``: ``x_next = c * (a * x_t - b * eps_hat) + d * eps_hat``. At t = 901,
  a = 60.83 and b = 60.82: FP16 rounding of the products is amplified into the image.

The converter routes every graph input through one FP16 cast and joins neighbouring FP32 nodes
through FP32 -> FP16 -> FP32 casts, which would quietly defeat the islands (x_t would reach the
update rounded to FP16); :func:`drop_cast_round_trips` removes those lossy round trips.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from rd_export.graph import check_model, consumers, island_nodes, load_model, toposort
from rd_export.precision import get_precision
from rd_export.verify import check_report, compare_onnx
from runtime.backends.onnxruntime import make_session
from runtime.errors import UsageError
from runtime.io import atomic_path
from runtime.manifest import Manifest, load_manifest, prologue_name, sha256_file

__all__ = ["ISLANDS", "DEFAULT_ISLANDS", "convert_fp16", "drop_cast_round_trips", "make_fp16", "measure_islands",
           "island_report", "tensor_errors", "time_embedding_tensors"]

#: name -> how it is selected and why it stays FP32. "ops" islands block op types; "structural"
#: islands block the nodes rd_export.graph.island_nodes finds.
ISLANDS: dict[str, dict] = {
    "normalization": {"ops": ["InstanceNormalization"], "structural": "groupnorm_stats",
                      "reason": "GroupNorm statistics: FP16 sums of squares overflow over large groups"},
    "softmax": {"ops": ["Softmax"], "reason": "exp() overflows in FP16; scale-fusion and attention weights"},
    "time_embedding": {"structural": "time_embedding",
                       "reason": "sinusoid arguments up to t=1000 lose all phase precision in FP16"},
    "ddim_update": {"structural": "ddim_update",
                    "reason": "a, b up to ~59 at high t amplify FP16 rounding of a*x_t - b*eps_hat"},
}
DEFAULT_ISLANDS: tuple[str, ...] = ("normalization", "softmax", "time_embedding", "ddim_update")
#: the predict-and-refine prologue (P's U-Net: no time input, no softmax, no DDIM update)
PROLOGUE_ISLANDS: tuple[str, ...] = ("normalization",)


def _block_lists(model: onnx.ModelProto, islands: Sequence[str]) -> tuple[list[str], list[str]]:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    ops, nodes = set(DEFAULT_OP_BLOCK_LIST), []
    for name in islands:
        if name not in ISLANDS:
            raise UsageError(f"unknown FP32 island {name!r}; known: {', '.join(ISLANDS)}")
        spec = ISLANDS[name]
        ops.update(spec.get("ops", []))
        if "structural" in spec:
            nodes.extend(island_nodes(model, spec["structural"]))
    return sorted(ops), nodes


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    types = {i.name: i.data_type for i in model.graph.initializer}
    for v in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        if v.type.HasField("tensor_type"):
            types[v.name] = v.type.tensor_type.elem_type
    for n in model.graph.node:
        if n.op_type == "Cast":
            to = next(a.i for a in n.attribute if a.name == "to")
            types[n.output[0]] = to
    return types


def drop_cast_round_trips(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Rewire ``X(fp32) -> Cast(fp16) -> Cast(fp32) -> consumers`` to ``X -> consumers``.

    Returns the model and the number of round trips removed. A round trip that ends in a graph
    output becomes ``Identity(X)`` so the output name stays.
    """
    model = onnx.shape_inference.infer_shapes(model)
    types = _elem_types(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    graph_outputs = {o.name for o in model.graph.output}

    def cast_to(n: onnx.NodeProto) -> int | None:
        if n.op_type != "Cast":
            return None
        return next(a.i for a in n.attribute if a.name == "to")

    removed = 0
    rename: dict[str, str] = {}
    for n in list(model.graph.node):
        if cast_to(n) != TensorProto.FLOAT:
            continue
        first = producer.get(n.input[0])
        if first is None or cast_to(first) != TensorProto.FLOAT16:
            continue
        src = first.input[0]
        if types.get(src) != TensorProto.FLOAT:
            continue
        if n.output[0] in graph_outputs:
            n.op_type = "Identity"
            del n.attribute[:]
            n.input[0] = src
        else:
            rename[n.output[0]] = src
        removed += 1
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    # drop nodes whose outputs nobody reads any more (the bypassed casts)
    while True:
        cons = consumers(model)
        dead = [n for n in model.graph.node if n.op_type in ("Cast", "Identity")
                and all(o not in cons and o not in graph_outputs for o in n.output)]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
    used = {i for n in model.graph.node for i in n.input} | graph_outputs
    keep_vi = [v for v in model.graph.value_info if v.name in used or v.name in producer]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep_vi)
    return model, removed


def convert_fp16(model: onnx.ModelProto, islands: Sequence[str] = DEFAULT_ISLANDS) -> tuple[onnx.ModelProto, dict]:
    """FP16 model with FP32 I/O and the given islands FP32; returns (model, island report)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    ops, nodes = _block_lists(model, islands)
    report = island_report(model, islands)
    fp16 = convert_float_to_float16(model, keep_io_types=True, op_block_list=ops, node_block_list=nodes)
    fp16, removed = drop_cast_round_trips(fp16)
    report["cast_round_trips_removed"] = removed
    toposort(fp16)
    del fp16.graph.value_info[:]  # stale after the cast rewiring; shape inference recomputes it
    fp16 = helper.make_model(fp16.graph, opset_imports=list(fp16.opset_import), producer_name=model.producer_name,
                             producer_version=model.producer_version, ir_version=model.ir_version)
    return fp16, report


def island_report(model: onnx.ModelProto, islands: Sequence[str]) -> dict:
    """What each island covers in this graph (for the manifest's ``fp32_islands``)."""
    rows = []
    for name in islands:
        spec = ISLANDS[name]
        row = {"name": name}
        count = 0
        if "ops" in spec:
            count += sum(1 for n in model.graph.node if n.op_type in spec["ops"])
            row["ops"] = spec["ops"]
        if "structural" in spec:
            count += len(island_nodes(model, spec["structural"]))
            row["select"] = spec["structural"]
        rows.append({**row, "nodes": count, "reason": spec["reason"]})
    return {"islands": rows}


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def make_fp16(onnx_fp32: str | os.PathLike, out: str | os.PathLike | None = None, *,
              islands: Sequence[str] = DEFAULT_ISLANDS, steps: int | None = None, seed: int = 0,
              progress: Callable[[str], None] | None = None) -> Path:
    """Derive ``model.fp16.onnx`` (+ manifest) from a verified FP32 ONNX artifact; verify first.

    Verification (onnxruntime CPU, vs the FP32 ONNX): end-to-end PSNR >= 40 dB and no NaN/Inf at
    any step, or VerificationError and nothing is written.
    """
    from rd_export.export import verification_size
    from rd_export.graph import check_signature

    progress = progress or (lambda s: None)
    src = Path(onnx_fp32)
    src_manifest = load_manifest(src, "onnx")
    if src_manifest.precision != "fp32":
        raise UsageError(f"{src.name} is {src_manifest.precision}; FP16 is derived from the FP32 ONNX")
    descriptor = src_manifest.step_descriptor
    steps = steps or src_manifest.verify_steps
    dest = Path(out) if out is not None else src.with_name(src.name.removesuffix(".onnx") + ".fp16.onnx")
    spec = get_precision("fp16")

    progress(f"converting {src.name} to FP16 (FP32 islands: {', '.join(islands)})")
    model = load_model(src)
    fp16, report_islands = convert_fp16(model, islands)
    check_model(fp16, min_opset=17, where=dest.name)
    check_signature(fp16, descriptor, where=dest.name)
    schedule = src_manifest.schedule_config
    src_pro = src_manifest.prologue_path(src)
    pro_dest = dest.with_name(prologue_name(dest.name)) if src_pro is not None else None
    if src_pro is not None:  # the prologue converts the same way; only its GroupNorms stay FP32
        pro16, _ = convert_fp16(load_model(src_pro), PROLOGUE_ISLANDS)
        check_model(pro16, min_opset=17, where=pro_dest.name)
        check_signature(pro16, descriptor.prologue(), where=pro_dest.name)
    with atomic_path(dest) as tmp, (atomic_path(pro_dest) if pro_dest else contextlib.nullcontext()) as pro_tmp:
        onnx.save(fp16, str(tmp))
        if pro_tmp is not None:
            onnx.save(pro16, str(pro_tmp))
        progress(f"verifying {dest.name} against {src.name} ({steps} steps)")
        report = compare_onnx(tmp, src, steps=steps, seed=seed, size=verification_size(descriptor),
                              schedule_config=schedule, reference_prologue=src_pro, candidate_prologue=pro_tmp)
        report = check_report(report, min_psnr_db=spec.min_psnr_db, max_step_abs=spec.max_step_abs,
                              what=dest.name)
        import onnxruntime

        report.update(provider="CPUExecutionProvider", onnxruntime=onnxruntime.__version__,
                      note="CPU onnxruntime: FP16 tensors between ops; ops without FP16 CPU kernels compute "
                           "in FP32 inside. Re-verify the engine on the target GPU.")
        extra = {k: v for k, v in src_manifest.extra.items() if k not in ("verification", "created", "fp32_islands")}
        extra["source"] = dict(src_manifest.get("source", {}), onnx=src.name, onnx_sha256=src_manifest.sha256)
        extra.update(fp32_islands=report_islands["islands"], verification=report, created=_now())
        if pro_tmp is not None:
            extra["prologue"] = dict(src_manifest.prologue, artifact=pro_dest.name, sha256=sha256_file(pro_tmp),
                                     precision="fp16", fp32_islands=list(PROLOGUE_ISLANDS))
        extra["fp16"] = {"converter": "onnxruntime.transformers.float16.convert_float_to_float16",
                         "keep_io_types": True,
                         "cast_round_trips_removed": report_islands["cast_round_trips_removed"]}
        manifest = Manifest(artifact=dest.name, format="onnx", precision="fp16", model=src_manifest.model,
                            sha256=sha256_file(tmp), descriptor=src_manifest.descriptor,
                            schedule=src_manifest.schedule, model_config=src_manifest.model_config,
                            toolkit_version=src_manifest.toolkit_version, extra=extra)
    return manifest.publish(dest)


def measure_islands(onnx_fp32: str | os.PathLike, *, steps: int = 10, seed: int = 0,
                    size: tuple[int, int] = (64, 64), variants: dict[str, Sequence[str]] | None = None,
                    workdir: str | os.PathLike | None = None) -> dict[str, dict]:
    """Convert with different island sets and compare each with the FP32 ONNX (no thresholds).

    Default variants: all islands, none, and all-but-one for each island. Returns
    {variant: {"islands", "psnr_db", "per_step", "finite", ...}}.
    """
    import tempfile

    model = load_model(onnx_fp32)
    schedule = None
    try:
        schedule = Manifest.for_artifact(onnx_fp32).schedule_config
    except Exception:  # a bare ONNX (no manifest) uses the default schedule
        schedule = None
    if variants is None:
        variants = {"all": DEFAULT_ISLANDS, "none": ()}
        for name in DEFAULT_ISLANDS:
            variants[f"without_{name}"] = tuple(i for i in DEFAULT_ISLANDS if i != name)
    results = {}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for label, isl in variants.items():
            fp16, _ = convert_fp16(model, isl)
            path = Path(tmp) / f"{label}.onnx"
            onnx.save(fp16, str(path))
            rep = compare_onnx(path, onnx_fp32, steps=steps, seed=seed, size=size, schedule_config=schedule)
            rep["islands"] = list(isl)
            results[label] = rep
    return results


def time_embedding_tensors(model: onnx.ModelProto) -> list[str]:
    """Outputs of the sinusoid (Cos/Sin) nodes of the time embedding."""
    te = set(island_nodes(model, "time_embedding"))
    return [n.output[0] for n in model.graph.node if n.name in te and n.op_type in ("Cos", "Sin")]


def tensor_errors(fp32: onnx.ModelProto, fp16: onnx.ModelProto, tensors: Sequence[str],
                  feeds: dict) -> dict[str, float]:
    """max |fp16 - fp32| of intermediate tensors (exposed as extra graph outputs), onnxruntime CPU."""
    import numpy as np

    outs = {}
    for label, model in (("fp32", fp32), ("fp16", fp16)):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        produced = {o for n in m.graph.node for o in n.output}
        # an FP32-island node's output is renamed "<name>_cast_to_fp16" by the converter
        actual = [t if t in produced else f"{t}_cast_to_fp16" for t in tensors]
        for name in actual:
            m.graph.output.append(helper.make_empty_tensor_value_info(name))
        sess = make_session(m.SerializeToString(), quiet=True)
        outs[label] = dict(zip(tensors, sess.run(actual, feeds)))
    return {name: float(np.abs(outs["fp16"][name].astype(np.float64) - outs["fp32"][name]).max()) for name in tensors}


def normalization_sums(onnx_fp32: str | os.PathLike, feeds: dict) -> dict[str, float]:
    """Largest per-instance sum(x) and sum(x^2) entering InstanceNormalization (FP32 run).

    An FP16 accumulator of the statistics overflows where these pass 65504; the count of
    elements per instance (C/G*H*W) grows with the frame, so large frames are the risk.
    """
    import numpy as np

    model = load_model(onnx_fp32)
    names = [n.input[0] for n in model.graph.node if n.op_type == "InstanceNormalization"]
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for name in names:
        m.graph.output.append(helper.make_empty_tensor_value_info(name))
    outs = make_session(m.SerializeToString(), quiet=True).run(names, feeds)
    sums = [np.abs(o.astype(np.float64).reshape(o.shape[0], o.shape[1], -1).sum(-1)).max() for o in outs]
    sq = [(o.astype(np.float64).reshape(o.shape[0], o.shape[1], -1) ** 2).sum(-1).max() for o in outs]
    count = max(int(np.prod(o.shape[2:])) for o in outs)
    return {"max_sum": float(max(sums)), "max_sum_sq": float(max(sq)), "max_elements": count,
            "nodes": len(names), "over_fp16_max": int(sum(v > 65504 for v in sq))}
