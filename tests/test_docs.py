"""The repository stands alone and its comments and help say what the code does (issue 17).

- No file points to DESIGN.md / STYLE.md (not in the repository); docs/ARCHITECTURE.md exists,
  covers what the comments cite it for, and every "code convention N" cited exists.
- Every ``package.module[.name]`` named in a docstring or doc resolves (``rd_export.int8`` did not).
- Numbers in comments match the code or the measurement they quote.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARCH = REPO / "docs" / "ARCHITECTURE.md"
PACKAGES = ("runtime", "training", "rd_export", "calibration")


def _sources() -> list[Path]:
    skip = {".venv", ".git", "__pycache__", "node_modules"}
    out = []
    for p in REPO.rglob("*"):
        if p.suffix in (".py", ".md", ".toml", ".txt") and not skip & set(p.relative_to(REPO).parts) and p.is_file():
            out.append(p)
    return sorted(out)


def test_nothing_points_outside_the_repository():
    bad = [f"{p.relative_to(REPO)}:{i}" for p in _sources() if p.name != "test_docs.py"
           for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
           if re.search(r"\b(DESIGN|STYLE)\.md\b", line)]
    assert not bad, f"DESIGN.md / STYLE.md are not in the repository: {bad}"


def test_architecture_covers_what_it_is_cited_for():
    text = ARCH.read_text(encoding="utf-8")
    for heading in ("## From photos to a camera", "## The packages", "## Fixed conventions", "## Code conventions",
                    "## Facts that shaped the design", "### Predict, then refine"):
        assert heading in text, heading
    for fact in ("prologue", "steps = 0", "PCG64", "affine in `eps_hat`", "weights_only=True", "1.45x", "1.28x",
                 "22.29 dB", "25.94 dB", "strongly typed", "onnxruntime#7748", "tensorrt-cu12", "symmetric",
                 "ultralytics#22910", "TensorRT#2691", "IOBinding", "native tile size"):
        assert fact in text, fact
    conventions = re.findall(r"^(\d+)\. ", text.split("## Code conventions", 1)[1].split("\n## ", 1)[0], re.M)
    cited = {int(n) for p in _sources() for n in re.findall(r"ARCHITECTURE\.md, (?:code )?convention (\d+)",
                                                              p.read_text(encoding="utf-8", errors="replace"))}
    assert cited and cited <= {int(n) for n in conventions}, (sorted(cited), conventions)


_DOTTED = re.compile(r"`{1,2}((?:" + "|".join(PACKAGES) + r")(?:\.[A-Za-z_][A-Za-z0-9_]*)+)`{1,2}")


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_named_module_and_function_exists():
    pytest.importorskip("torch")  # training.* and rd_export.export import it
    named = {m for p in _sources() if p.name != "test_docs.py"
             for m in _DOTTED.findall(p.read_text(encoding="utf-8", errors="replace"))}
    assert "runtime.schedule.initial_noise" in named  # the scan sees docstrings
    missing = sorted(m for m in named if not _resolves(m))
    assert not missing, f"named in a docstring or doc but not in the code: {missing}"


def test_the_fp16_comment_quotes_the_schedules_coefficients():
    import rd_export.fp16 as fp16
    from runtime.schedule import DDIMSchedule, ScheduleConfig

    m = re.search(r"At t = (\d+),\s+a = ([\d.]+) and b = ([\d.]+)", fp16.__doc__)
    assert m, "the ddim_update island's note lost its numbers"
    t, a, b = int(m[1]), float(m[2]), float(m[3])
    sched = DDIMSchedule(ScheduleConfig())
    want_a, want_b, _, _ = sched.step_coefficients(t, 0)
    assert round(want_a, 2) == a and round(want_b, 2) == b, (want_a, want_b)


def test_the_onnxruntime_backend_quotes_the_measured_speedup():
    """docs/ARCHITECTURE.md (which the backend's docstring cites for its optimisation level) quotes
    the CI CPU's measured speed-up as docs/benchmarks.md has it."""
    quoted = re.search(r"onnxruntime FP32 \*\*([\d.]+)x\*\* torch eager", ARCH.read_text(encoding="utf-8"))
    table = (REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    measured = re.search(r"\| onnxruntime FP32 \(Derainer, full frame\) \|[^\n]*\*\*([\d.]+)\*\* \|", table)
    assert quoted and measured and quoted[1] == measured[1], (quoted, measured)


def test_rd_export_build_help_states_where_the_profile_comes_from():
    """The profile defaults are a checkpoint's native ones; an ONNX keeps its manifest's."""
    import typer.main

    from rd_export.cli import app
    from rd_export.export import native_profile
    from rd_export.tensorrt import resolve_profile
    from runtime.derainer import default_artifact
    from runtime.manifest import Manifest

    build = typer.main.get_command(app).commands["build"]
    helps = {p.name: p.help for p in build.params}
    # a checkpoint's default is the native profile of its training crop N (rd_export.export.native_profile)
    d = native_profile(32, 64)  # N = 64
    assert (d.min_size, d.opt_size, d.max_size) == ((32, 32), (64, 64), (64, 64))  # N/2, N, N
    for name, text in (("min_size", "N/2 x N/2"), ("opt_size", "N x N"), ("max_size", "N x N")):
        assert f"default {text} for a checkpoint trained at N-px crops" in helps[name], helps[name]
        assert "an ONNX keeps the profile in its manifest" in helps[name]
    assert f"default {d.min_batch}..{d.opt_batch}..{d.max_batch} for a checkpoint" in helps["batch"]
    shipped = Manifest.for_artifact(default_artifact()).step_descriptor
    assert resolve_profile(shipped).max_size == shipped.profile.max_size  # what `build model.onnx` uses
