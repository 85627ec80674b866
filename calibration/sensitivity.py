"""Per-layer sensitivity: which Conv/MatMul/Gemm nodes cost quality when quantized.

Two views, both measured end to end (full DDIM trajectories on held-out frames, INT8 vs FP32,
:func:`calibration.report.compare_quality`), both reusing one calibration's range cache so each
probe is one ``quantize_static`` call and one evaluation, no calibration inference:

- ``only``: quantize node k alone. A low PSNR marks a node whose own quantization hurts.
- ``all_but``: quantize every node except k. The PSNR *gain* over the fully quantized model is
  what keeping k in FP32 would buy — what :func:`choose_fp32_nodes` uses.

Node groups (``group_nodes``) make the analysis affordable on larger models: the shared U-Net
appears once per scale in the graph, so the same layer at scales 1, 1/2 and 1/4 is three nodes
sharing one weight; a group is a layer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx

from calibration.quantize import OP_TYPES, Method, Recipe, quantize

__all__ = ["Probe", "NodeSensitivity", "group_nodes", "sensitivity", "choose_fp32_nodes", "format_table"]

#: a probe maps a quantized model file to its end-to-end PSNR (dB) against FP32
Probe = Callable[[Path], float]


@dataclass
class NodeSensitivity:
    group: str  # layer (weight name without '.weight') or a single node name
    nodes: list[str]
    op_type: str
    psnr_db: float  # of the probe model (only: this group quantized; all_but: all but this group)
    mode: str

    def to_dict(self) -> dict:
        return asdict(self)


def group_nodes(model, *, by_layer: bool = True) -> dict[str, list[tuple[str, str]]]:
    """Quantizable nodes grouped by layer: the weight initializer they share.

    The shared U-Net runs once per scale, so one layer (one weight tensor, e.g.
    ``estimator.unet.down.1.blocks.0.conv1.weight``) is a node at every scale; quantizing or
    keeping a layer in FP32 is decided for all of them at once. Nodes whose weight is not an
    initializer form their own group. ``by_layer=False`` gives one group per node.
    """
    m = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    groups: dict[str, list[tuple[str, str]]] = {}
    for n in m.graph.node:
        if n.op_type not in OP_TYPES:
            continue
        weight = n.input[1] if len(n.input) > 1 else ""
        key = weight.removesuffix(".weight") if by_layer and weight in inits else n.name
        groups.setdefault(key, []).append((n.name, n.op_type))
    return groups


def sensitivity(model: str | os.PathLike, cache: str | os.PathLike, probe: Probe, *, workdir: str | os.PathLike,
                mode: str = "all_but", recipe: Recipe | str = "s8", method: Method | str = Method.minmax,
                groups: dict[str, list[tuple[str, str]]] | None = None, base_exclude: Sequence[str] = (),
                on_result: Callable[[NodeSensitivity], None] | None = None) -> list[NodeSensitivity]:
    """Probe every group of quantizable nodes; results sorted most sensitive first.

    ``model`` is the pre-processed FP32 model the cache was calibrated on; ``base_exclude`` nodes
    stay FP32 in every probe.
    """
    if mode not in ("only", "all_but"):
        raise ValueError(f"mode must be 'only' or 'all_but', got {mode!r}")
    groups = groups if groups is not None else group_nodes(model)
    work = Path(workdir)
    results = []
    for i, (key, members) in enumerate(groups.items()):
        names = [n for n, _ in members if n not in base_exclude]
        if not names:
            continue
        out = work / f"probe_{i}.onnx"
        if mode == "only":
            quantize(model, out, cache=cache, recipe=recipe, method=method, nodes_to_quantize=names)
        else:
            quantize(model, out, cache=cache, recipe=recipe, method=method,
                     nodes_to_exclude=[*base_exclude, *names])
        r = NodeSensitivity(group=key, nodes=names, op_type=members[0][1], psnr_db=probe(out), mode=mode)
        out.unlink(missing_ok=True)
        results.append(r)
        if on_result is not None:
            on_result(r)
    # only: low PSNR = sensitive; all_but: high PSNR (big gain from keeping it FP32) = sensitive
    results.sort(key=lambda r: r.psnr_db, reverse=(mode == "all_but"))
    return results


def choose_fp32_nodes(ranked: Sequence[NodeSensitivity], probe: Probe, model: str | os.PathLike,
                      cache: str | os.PathLike, *, target_db: float, workdir: str | os.PathLike,
                      recipe: Recipe | str = "s8", method: Method | str = Method.minmax,
                      base_exclude: Sequence[str] = (), max_groups: int = 4) -> tuple[list[str], float]:
    """Greedy: keep the most sensitive groups in FP32 one by one until the probe reaches ``target_db``.

    Returns (nodes kept FP32 beyond ``base_exclude``, the probe's PSNR of the final model).
    Stops after ``max_groups`` groups: more FP32 islands cost speed (and every Q/DQ boundary costs
    a conversion), so a model that needs more is reported rather than silently de-quantized.
    """
    excluded: list[str] = []
    out = Path(workdir) / "greedy.onnx"
    quantize(model, out, cache=cache, recipe=recipe, method=method, nodes_to_exclude=list(base_exclude))
    psnr = probe(out)
    for r in ranked[:max_groups]:
        if psnr >= target_db:
            break
        excluded.extend(r.nodes)
        quantize(model, out, cache=cache, recipe=recipe, method=method,
                 nodes_to_exclude=[*base_exclude, *excluded])
        psnr = probe(out)
    out.unlink(missing_ok=True)
    return excluded, psnr


def format_table(results: Sequence[NodeSensitivity], *, baseline_db: float | None = None) -> str:
    """Markdown table of a sensitivity run (for docs and the benchmark's output)."""
    lines = ["| group | op | nodes | PSNR dB | gain dB |", "|---|---|---|---|---|"]
    for r in results:
        gain = "" if baseline_db is None else f"{r.psnr_db - baseline_db:+.2f}"
        lines.append(f"| `{r.group}` | {r.op_type} | {len(r.nodes)} | {r.psnr_db:.2f} | {gain} |")
    return "\n".join(lines)
