"""The packages depend on each other one way, through visible imports (docs/ARCHITECTURE.md):
runtime <- training, runtime <- calibration <- rd_export, runtime <- rd_export -> training.

Every ``import`` counts, function-level ones included, and so does a module named in a string
(``importlib.import_module("calibration.api")`` or a ``"module:function"`` reference): the
precision table used to reach calibration that way while calibration called the exporter back.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "training", "calibration", "rd_export")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            mods[name] = path
    return mods


MODULES = _modules()
#: the console scripts' launcher (pyproject's [project.scripts]) imports each CLI by name, above
#: every package, so that a missing extra is one line and exit 6 (runtime.extras._launch)
LAUNCHES = {("runtime.extras", "training.cli"), ("runtime.extras", "rd_export.cli"), ("runtime.extras", "runtime.cli")}


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for mod, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value.partition(":")[0]
                dotted = "." in text or ":" in node.value  # "calibration" alone is a manifest key
                if dotted and _resolve(text) == text and text != mod and (mod, text) not in LAUNCHES:
                    names = [text]  # a module named in a string: an import by name
            edges[mod].update(r for r in map(_resolve, names) if r is not None and r != mod)
    return edges


EDGES = _edges()


def _package(mod: str) -> str:
    return mod.split(".")[0]


def _cross(src: str, dst: str) -> list[tuple[str, str]]:
    return sorted((m, t) for m, ts in EDGES.items() for t in ts if _package(m) == src and _package(t) == dst)


def test_runtime_and_training_stand_alone():
    for other in ("training", "calibration", "rd_export"):
        assert _cross("runtime", other) == []
    assert _cross("training", "calibration") == [] and _cross("training", "rd_export") == []


def test_calibration_uses_only_the_exporters_comparisons():
    """The exporter calls calibration (the INT8 row of the precision table); calibration does not
    call the exporter back (no precision table, no export), it only reuses rd_export.verify."""
    assert _cross("calibration", "training") == []
    assert {t for _, t in _cross("calibration", "rd_export")} <= {"rd_export.verify"}
    assert ("rd_export.precision", "calibration.api") in _cross("rd_export", "calibration")
    assert not {_package(t) for t in EDGES["rd_export.verify"]} & {"rd_export", "calibration"}


def test_no_import_cycle_between_packages():
    """No strongly connected set of modules spans two packages (a cycle inside one package,
    through a function-level import, is allowed)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    spanning: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(EDGES[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len({_package(m) for m in comp}) > 1:
                spanning.append(sorted(comp))

    for v in sorted(EDGES):
        if v not in index:
            visit(v)
    assert spanning == []
