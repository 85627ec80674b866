"""Safety checks on artifact files before an engine reads them (numpy-free, never imports torch).

An ONNX model may keep tensors in *external data* files named by a ``location`` string inside the
model. onnxruntime and ``onnx.load`` open that location relative to the model's folder, so a
hostile model could make them read any file the process can (``/etc/shadow``, ``../../key``, a
symlink to a device). :func:`check_external_data` refuses every location that leaves the
model's folder, lexically or through symlinks, before anything opens it.

``onnx`` (a base dependency) is imported lazily; without it, a model that has no external-data
marker at all passes, and one that has is refused with a DependencyError (it cannot be checked).
"""

from __future__ import annotations

import mmap
import os
import re
from collections.abc import Iterator
from pathlib import Path, PureWindowsPath
from typing import Any

from runtime.errors import ArtifactError, DependencyError

__all__ = ["check_external_data", "external_data_locations"]

_SEP = re.compile(r"[/\\]")


def _tensor_label(tensor: Any, fallback: str) -> str:
    return tensor.name or fallback


def _graph_tensors(graph: Any, where: str) -> Iterator[tuple[str, Any]]:
    """(label, TensorProto) of every tensor stored in ``graph``, its nodes' attributes and subgraphs."""
    for t in graph.initializer:
        yield _tensor_label(t, f"{where} initializer"), t
    for st in graph.sparse_initializer:
        yield _tensor_label(st.values, f"{where} sparse initializer"), st.values
        yield _tensor_label(st.indices, f"{where} sparse initializer indices"), st.indices
    yield from _nodes_tensors(graph.node, where)


def _nodes_tensors(nodes: Any, where: str) -> Iterator[tuple[str, Any]]:
    for node in nodes:
        node_label = f"{node.op_type} node {node.name or (node.output[0] if node.output else '?')!r}"
        for attr in node.attribute:
            fallback = f"{node_label} attribute {attr.name!r}"
            if attr.HasField("t"):
                yield _tensor_label(attr.t, fallback), attr.t
            for t in attr.tensors:
                yield _tensor_label(t, fallback), t
            if attr.HasField("sparse_tensor"):
                yield _tensor_label(attr.sparse_tensor.values, fallback), attr.sparse_tensor.values
                yield _tensor_label(attr.sparse_tensor.indices, fallback), attr.sparse_tensor.indices
            for st in attr.sparse_tensors:
                yield _tensor_label(st.values, fallback), st.values
                yield _tensor_label(st.indices, fallback), st.indices
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g, f"{fallback} subgraph")
            for g in attr.graphs:
                yield from _graph_tensors(g, f"{fallback} subgraph")


def external_data_locations(model: Any) -> Iterator[tuple[str, str | None]]:
    """(tensor label, location or None when missing) of every tensor of ``model`` (an
    onnx.ModelProto) that refers to external data."""
    tensors = list(_graph_tensors(model.graph, "graph"))
    for fn in model.functions:
        tensors.extend(_nodes_tensors(fn.node, f"function {fn.name!r}"))
    for label, t in tensors:
        entries = {e.key: e.value for e in t.external_data}
        if t.data_location == 1 or entries:  # TensorProto.EXTERNAL == 1
            yield label, entries.get("location")


def _location_problem(location: str | None, folder: Path, real_folder: Path) -> str | None:
    """Why ``location`` is unsafe, or None when it names a file inside ``folder``."""
    if location is None or location == "":
        return "no location"
    if "\x00" in location:
        return "a NUL byte in the location"
    if os.path.isabs(location) or PureWindowsPath(location).is_absolute() or PureWindowsPath(location).drive \
            or location.startswith(("/", "\\")):
        return "an absolute location"
    depth = 0
    for part in _SEP.split(location):
        if part == "..":
            depth -= 1
            if depth < 0:
                return "a location that leaves the model's folder ('..')"
        elif part not in ("", "."):
            depth += 1
    if depth == 0:
        return "a location that names the model's folder, not a file"
    try:
        target = (folder / location).resolve()
    except (OSError, RuntimeError, ValueError):  # symlink loop, ...
        return "a location that cannot be resolved (symlink loop?)"
    if target == real_folder or not target.is_relative_to(real_folder):
        return f"a location that resolves outside the model's folder (to {str(target)!r})"
    return None


def _has_external_marker(path: Path) -> bool:
    """Cheap scan for the ``location`` key every external-data entry carries."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return False
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return m.find(b"location") != -1


def check_external_data(onnx_path: str | os.PathLike) -> None:
    """Refuse an ONNX file whose external-data locations escape its folder.

    Raises :class:`ArtifactError` with one line naming the tensor and the bad location: an
    absolute location, one whose ``..`` leaves the folder, or one that resolves (through
    symlinks) outside the folder. Also raises ArtifactError when the file cannot be parsed as
    ONNX (nothing may read it unchecked). Reads only the model file itself, never the data.
    """
    p = Path(onnx_path)
    try:
        import onnx
    except ImportError:
        try:
            marked = _has_external_marker(p)
        except OSError as e:
            raise ArtifactError(f"{p}: cannot read it ({e.__class__.__name__}: {e})") from None
        if marked:
            raise DependencyError(f"{p}: may use external data files, whose paths cannot be checked without "
                                  f"the onnx package: pip install onnx") from None
        return
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # protobuf DecodeError, OSError, ...
        msg = " ".join(str(e).split())
        raise ArtifactError(f"{p}: not a readable ONNX model ({e.__class__.__name__}: {msg})") from None
    folder = p.parent if str(p.parent) else Path(".")
    try:
        real_folder = folder.resolve()
    except (OSError, RuntimeError) as e:
        raise ArtifactError(f"{p}: cannot resolve the model's folder ({e})") from None
    for label, location in external_data_locations(model):
        problem = _location_problem(location, folder, real_folder)
        if problem is not None:
            raise ArtifactError(
                f"{p}: tensor {label!r} refers to external data at {location!r}: {problem}; refused "
                f"(external data must be a file inside the model's folder)"
            )
