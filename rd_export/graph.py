"""ONNX graph helpers shared by the exporter, the FP16 converter and ``rd-export inspect``.

numpy + onnx only (no torch), so the edge flow (``rd-export build model.onnx`` on a device)
never needs PyTorch.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import onnx
from onnx import TensorProto

from runtime.artifacts import check_external_data
from runtime.descriptor import StepDescriptor
from runtime.errors import ArtifactError

__all__ = [
    "load_model",
    "check_model",
    "io_signature",
    "check_signature",
    "op_histogram",
    "consumers",
    "input_cone",
    "descendants",
    "island_nodes",
    "toposort",
]

_DTYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.INT64: "int64",
           TensorProto.INT32: "int32", TensorProto.INT8: "int8", TensorProto.UINT8: "uint8",
           TensorProto.BFLOAT16: "bfloat16"}


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX file, turning every parse failure into an ArtifactError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"{p}: no such ONNX file")
    check_external_data(p)  # external-data locations must stay inside the model's folder
    try:
        return onnx.load(str(p))
    except Exception as e:  # protobuf DecodeError, OSError, ...
        raise ArtifactError(f"{p}: not a readable ONNX model ({e.__class__.__name__}: {e})") from None


def check_model(model: onnx.ModelProto, *, min_opset: int = 17, where: str = "model") -> onnx.ModelProto:
    """onnx.checker (full) + strict shape inference; returns the shape-inferred model.

    Raises ArtifactError naming the failing check.
    """
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < min_opset:
        raise ArtifactError(f"{where}: opset {opset} is below the required {min_opset}")
    try:
        onnx.checker.check_model(model, full_check=False)
    except onnx.checker.ValidationError as e:
        raise ArtifactError(f"{where}: onnx.checker failed: {str(e).splitlines()[0]}") from None
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:
        raise ArtifactError(f"{where}: ONNX shape inference failed: {str(e).splitlines()[0]}") from None
    return inferred


def _value_spec(v: onnx.ValueInfoProto) -> dict:
    tt = v.type.tensor_type
    shape: list[str | int] = []
    for d in tt.shape.dim:
        shape.append(d.dim_param if d.HasField("dim_param") else (int(d.dim_value) if d.HasField("dim_value") else "?"))
    return {"name": v.name, "dtype": _DTYPES.get(tt.elem_type, str(tt.elem_type)), "shape": shape}


def io_signature(model: onnx.ModelProto) -> dict[str, list[dict]]:
    """{"inputs": [{name, dtype, shape}], "outputs": [...]} of the graph (initializers excluded)."""
    inits = {i.name for i in model.graph.initializer}
    return {"inputs": [_value_spec(v) for v in model.graph.input if v.name not in inits],
            "outputs": [_value_spec(v) for v in model.graph.output]}


def check_signature(model: onnx.ModelProto, descriptor: StepDescriptor, *, where: str = "model") -> None:
    """The graph's inputs/outputs must be exactly the descriptor's names, dtypes and ranks."""
    sig = io_signature(model)
    for kind, specs in (("inputs", descriptor.inputs), ("outputs", descriptor.outputs)):
        got = {s["name"]: s for s in sig[kind]}
        want = [s.name for s in specs]
        if sorted(got) != sorted(want):
            raise ArtifactError(f"{where}: graph {kind} are {sorted(got)}, the step descriptor expects {want}")
        for spec in specs:
            g = got[spec.name]
            if g["dtype"] != spec.dtype or len(g["shape"]) != len(spec.shape):
                raise ArtifactError(
                    f"{where}: {kind[:-1]} '{spec.name}' is {g['dtype']}{g['shape']}, "
                    f"expected {spec.dtype}{list(spec.shape)}"
                )


def inline_identity_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove ``Identity`` nodes that copy an initializer (the TorchScript exporter emits them for
    equal constants), pointing their readers at the initializer itself; in place, returns ``model``.

    onnxruntime 1.32's basic graph optimisations reject such a graph when several folded constants
    share one initializer ("Node input ... is not a graph input, initializer, or output of a previous
    node"); seen with GroupNorms of equal parameters traced as reductions.
    """
    inits = {i.name for i in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    alias = {n.output[0]: n.input[0] for n in model.graph.node
             if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs}
    if not alias:
        return model
    keep = [n for n in model.graph.node if not (n.op_type == "Identity" and n.output and n.output[0] in alias)]
    for n in keep:
        for k, name in enumerate(n.input):
            if name in alias:
                n.input[k] = alias[name]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(n.op_type for n in model.graph.node).most_common())


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """tensor name -> nodes that read it."""
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            if i:
                out.setdefault(i, []).append(n)
    return out


def _constant_tensors(model: onnx.ModelProto) -> set[str]:
    names = {i.name for i in model.graph.initializer}
    names.update(o for n in model.graph.node if n.op_type == "Constant" for o in n.output)
    return names


def input_cone(model: onnx.ModelProto, input_name: str) -> list[str]:
    """Names of the nodes computed from ``input_name`` and constants only (no other graph input).

    For the fused step, the cone of ``t`` is the time embedding (sinusoid + MLP + the per-block
    projections) and the cone of ``coef`` is the slicing of (a, b, c, d).
    """
    consts = _constant_tensors(model)
    known = consts | {input_name}
    graph_inputs = {v.name for v in model.graph.input}
    if input_name not in graph_inputs:
        raise ValueError(f"'{input_name}' is not a graph input")
    cone: list[str] = []
    changed = True
    done: set[str] = set()
    while changed:  # fixed point over the (topologically sorted) node list
        changed = False
        for n in model.graph.node:
            if n.name in done or n.op_type == "Constant":
                continue
            ins = [i for i in n.input if i]
            if ins and all(i in known for i in ins) and any(i not in consts for i in ins):
                done.add(n.name)
                cone.append(n.name)
                known.update(n.output)
                changed = True
    return cone


def descendants(model: onnx.ModelProto, node_names: list[str]) -> list[str]:
    """Nodes downstream of the given nodes (not including them)."""
    by_name = {n.name: n for n in model.graph.node}
    cons = consumers(model)
    seen: set[str] = set()
    stack = [o for name in node_names for o in by_name[name].output]
    out: list[str] = []
    while stack:
        tensor = stack.pop()
        for n in cons.get(tensor, []):
            if n.name not in seen:
                seen.add(n.name)
                out.append(n.name)
                stack.extend(n.output)
    return [n for n in out if n not in set(node_names)]


#: Node-name scope of the v -> eps conversion in exported graphs (TorchScript exporter scopes).
TO_EPS_SCOPE = "/estimator/to_eps/"
#: Node-name scope segment of GroupNorm statistics traced as reductions (rd_export.groupnorm.STATS_SCOPE;
#: the exporter numbers a repeated scope name: ``groupnorm_stats_1``)
GROUPNORM_STATS_SCOPE = re.compile(r"/groupnorm_stats(_\d+)?/")


def island_nodes(model: onnx.ModelProto, island: str) -> list[str]:
    """Node names of a structural FP32 island of an exported graph.

    - ``time_embedding``: every node computed from ``t`` alone.
    - ``ddim_update``: the slicing of ``coef`` and everything downstream of the nodes that read
      it (eps_hat does not depend on coef, so this is exactly the DDIM update arithmetic), plus,
      for v-prediction estimators, the v -> eps conversion (nodes scoped ``/estimator/to_eps/``,
      see training.multiscale.ToEps): with the update it computes x0 = a * x_t - b * eps_hat,
      a cancellation that FP16 rounding of eps_hat would wreck at high t.
    - ``groupnorm_stats``: the GroupNorm statistics of graphs exported with
      :func:`rd_export.groupnorm.reduced_groupnorm` (nodes scoped ``.../groupnorm_stats/...``): a
      mean of squares minus a squared mean, which FP16 would lose to cancellation.
    """
    if island == "groupnorm_stats":
        nodes = [n.name for n in model.graph.node if GROUPNORM_STATS_SCOPE.search(n.name)]
    elif island == "time_embedding":
        nodes = input_cone(model, StepDescriptor.T)
    elif island == "ddim_update":
        coef_cone = input_cone(model, StepDescriptor.COEF)
        cone_out = {o for n in model.graph.node if n.name in set(coef_cone) for o in n.output}
        readers = [n.name for n in model.graph.node if n.name not in set(coef_cone)
                   and any(i in cone_out or i == StepDescriptor.COEF for i in n.input)]
        nodes = coef_cone + readers + [d for d in descendants(model, readers) if d not in set(readers)]
        to_eps = [n.name for n in model.graph.node if n.name.startswith(TO_EPS_SCOPE) and n.name not in set(nodes)]
        nodes += to_eps + [d for d in descendants(model, to_eps) if d not in set(nodes) | set(to_eps)]
    else:
        raise ValueError(f"unknown structural island {island!r}")
    return nodes + _feeding_constants(model, nodes)


def _feeding_constants(model: onnx.ModelProto, nodes: list[str]) -> list[str]:
    """Constant nodes read only by ``nodes`` (e.g. the sinusoid's frequencies): they belong to the
    island, or the FP16 converter would round their values before the FP32 island reads them."""
    inside = set(nodes)
    cons = consumers(model)
    return [n.name for n in model.graph.node if n.op_type == "Constant"
            and all(c.name in inside for o in n.output for c in cons.get(o, [])) and any(o in cons for o in n.output)]


def toposort(model: onnx.ModelProto) -> onnx.ModelProto:
    """Sort the graph's nodes topologically in place (converters append casts at the end)."""
    produced_by = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    available = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    nodes = list(model.graph.node)
    deps = [[produced_by[i] for i in n.input if i not in available and i in produced_by] for n in nodes]
    order: list[int] = []
    state = [0] * len(nodes)  # 0 new, 1 visiting, 2 done
    for start in range(len(nodes)):
        stack = [(start, 0)]
        while stack:
            i, k = stack.pop()
            if k == 0:
                if state[i] == 2:
                    continue
                if state[i] == 1:
                    raise ArtifactError(f"graph has a cycle through node {nodes[i].name}")
                state[i] = 1
            if k < len(deps[i]):
                stack.append((i, k + 1))
                if state[deps[i][k]] != 2:
                    stack.append((deps[i][k], 0))
            else:
                state[i] = 2
                order.append(i)
    del model.graph.node[:]
    model.graph.node.extend(nodes[i] for i in order)
    return model
