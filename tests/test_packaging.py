"""Packaging (issue 17): the runtime installs without torch, the engines are exclusive choices, and a
command that needs a missing extra names it (exit 6).

- The dependency sets of pyproject.toml, resolved (self-references like ``[dev] = [cpu,test]``
  expanded): the base is what runtime/ imports at module scope, no torch / onnx / scikit-image;
  every install choice (one engine extra plus any others) holds exactly one onnxruntime
  distribution; the TensorRT extras pin cuda-python to their wheels' CUDA major.
- An import audit: every third-party import of each package is provided by the extras that
  package's commands document, and runtime/extras.py's table agrees with pyproject.toml.
- The CLIs with a dependency blocked (``sys.modules[name] = None``) exit 6 with one line.
- ``-m slow``: a fresh venv with ``pip install REPO`` (the base), then ``REPO[cpu]``, runs
  ``rd-run derain`` on a photo without torch ever being installed.
"""

from __future__ import annotations

import ast
import itertools
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from runtime import extras

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = canonicalize_name(PYPROJECT["project"]["name"])
EXTRAS: dict[str, list[str]] = PYPROJECT["project"]["optional-dependencies"]
ORT = {"onnxruntime", "onnxruntime-gpu"}
TENSORRT = {"tensorrt", "tensorrt-cu12", "tensorrt-cu13"}
#: import name -> distribution, for the base install's modules (the optional ones: extras.OPTIONAL)
#: module -> the base distribution that provides it; click only in runtime/cli_errors.py's fallback for
#: typer < 0.26, which depends on click (later typer ships its own copy)
BASE_MODULES = {"numpy": "numpy", "PIL": "pillow", "typer": "typer", "rich": "rich", "click": "typer"}


def resolve(*chosen: str) -> dict[str, Requirement]:
    """The direct requirements of ``pip install 'PROJECT[chosen]'``, self-references expanded."""
    out: dict[str, Requirement] = {}
    todo, seen = [("", r) for r in PYPROJECT["project"]["dependencies"]], set()
    todo += [(e, r) for e in chosen for r in EXTRAS[e]]
    assert all(e in EXTRAS for e in chosen), chosen
    while todo:
        _, line = todo.pop()
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name == PROJECT:
            for e in sorted(req.extras - seen):
                seen.add(e)
                todo += [(e, r) for r in EXTRAS[e]]
            continue
        out[name] = req
    return out


def _names(*chosen: str) -> set[str]:
    return set(resolve(*chosen))


# ---------------------------------------------------------------- the dependency sets
def test_the_base_install_is_the_runtime_alone():
    base = _names()
    assert base == set(BASE_MODULES.values()), base
    for heavy in ("torch", "onnx", "scikit-image", "scipy", "onnxslim", *ORT, *TENSORRT, "cuda-python"):
        assert heavy not in base


def test_torch_comes_only_with_the_extras_that_need_it():
    with_torch = {e for e in EXTRAS if "torch" in _names(e)}
    assert with_torch == {"train", "export", "test", "dev"}, with_torch
    for e in ("cpu", "gpu", "trt", "trt-cu13", "video", "stream", "eval"):
        assert not _names(e) & {"torch", "scipy", "onnxslim"}, e


def _engine_free() -> list[str]:
    return [e for e in EXTRAS if not _names(e) & ORT]


def test_only_the_engine_extras_pull_onnxruntime():
    assert {e: sorted(_names(e) & ORT) for e in EXTRAS if _names(e) & ORT} == {
        "cpu": ["onnxruntime"], "gpu": ["onnxruntime-gpu"], "dev": ["onnxruntime"]}


def test_the_cpu_engine_carries_openvino_on_x86_64_only():
    """[cpu] installs OpenVINO where the runtime picks it (x86-64 CPUs with native BF16 or AVX512_VNNI);
    ARM and other machines run onnxruntime and do not install it."""
    marker = resolve("cpu")["openvino"].marker
    assert marker is not None
    for machine, wanted in (("x86_64", True), ("AMD64", True), ("aarch64", False), ("arm64", False)):
        assert marker.evaluate({"platform_machine": machine}) is wanted, machine
    assert "openvino" not in _names("gpu")


def test_every_install_choice_holds_exactly_one_onnxruntime():
    """One of [cpu] / [gpu] (or [dev], the CPU test set) plus any subset of the other extras."""
    others = [e for e in _engine_free() if e != "trt-cu13"]  # [trt] and [trt-cu13] are exclusive too
    for engine in ("cpu", "gpu", "dev"):
        for k in range(len(others) + 1):
            for combo in itertools.combinations(others, k):
                names = _names(engine, *combo)
                assert len(names & ORT) == 1, (engine, combo, sorted(names & ORT))
    assert len(_names("cpu", "gpu") & ORT) == 2  # the combination the README and tool.uv rule out


def test_the_tensorrt_extras_pin_cuda_python_to_their_wheels_cuda_major():
    for extra in ("trt", "trt-cu13"):
        reqs = resolve(extra)
        trt = [n for n in reqs if n in TENSORRT]
        assert len(trt) == 1 and trt[0] != "tensorrt", f"[{extra}] must name its CUDA variant, got {trt}"
        major = int(trt[0].removeprefix("tensorrt-cu"))
        spec = reqs["cuda-python"].specifier
        assert spec.contains(f"{major}.0") and spec.contains(f"{major}.9.9"), (extra, str(spec))
        assert not spec.contains(f"{major + 1}.0") and not spec.contains(f"{major - 1}.9.9"), (extra, str(spec))
        assert "onnx" in reqs  # plans are built from the ONNX on the device
        assert not set(reqs) & ORT and "torch" not in reqs


def test_exclusive_extras_are_declared_to_uv():
    """Pairs of extras that would install two builds of one module are uv conflicts (pip has no such rule)."""
    declared = {frozenset(d["extra"] for d in group) for group in PYPROJECT["tool"]["uv"]["conflicts"]}

    def clash(a: str, b: str) -> bool:
        names = _names(a, b)
        cuda = {str(r.specifier) for n, r in resolve(a, b).items() if n == "cuda-python"}
        return len(names & ORT) > 1 or len(names & TENSORRT) > 1 or len(cuda) > 1

    clashes = {frozenset((a, b)) for a, b in itertools.combinations(EXTRAS, 2) if clash(a, b)}
    assert clashes and clashes <= declared, sorted(map(sorted, clashes - declared))


def test_extras_table_matches_pyproject():
    for module, dep in extras.OPTIONAL.items():
        assert dep.extra in EXTRAS, (module, dep.extra)
        assert canonicalize_name(dep.distribution) in _names(dep.extra), (module, dep)
    scripts = PYPROJECT["project"]["scripts"]
    assert scripts == {"rd-train": "runtime.extras:rd_train", "rd-export": "runtime.extras:rd_export",
                       "rd-run": "runtime.extras:rd_run"} | {k: v for k, v in scripts.items()
                                                            if k not in ("rd-train", "rd-export", "rd-run")}


# ---------------------------------------------------------------- the import audit
def _imports(package: str) -> tuple[set[str], set[str]]:
    """Third-party top-level modules imported by ``package``: (at module scope, inside functions)."""
    own = {"runtime", "training", "rd_export", "calibration"}
    top, lazy = set(), set()
    for path in sorted((REPO / package).rglob("*.py")):
        if "triton_models" in path.parts:  # templates copied into a Triton model repository, run by tritonserver
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        scoped = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                scoped |= {id(n) for n in ast.walk(node) if n is not node}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                root = name.partition(".")[0]
                if root in own or root in sys.stdlib_module_names or root == "__future__":
                    continue
                (lazy if id(node) in scoped else top).add(root)
    return top, lazy


def _distribution(module: str) -> str:
    if module in BASE_MODULES:
        return BASE_MODULES[module]
    assert module in extras.OPTIONAL, f"{module} is imported but runtime/extras.py does not know its extra"
    return canonicalize_name(extras.OPTIONAL[module].distribution)


def test_runtime_imports_only_the_base_at_module_scope():
    top, lazy = _imports("runtime")
    assert {_distribution(m) for m in top} <= _names(), sorted(top)
    assert not top & {"torch", "onnx", "skimage", "onnxruntime", "tensorrt", "cuda", "av", "cv2"}, sorted(top)
    for module in lazy - set(BASE_MODULES):  # each lazy import has an extra that really installs it
        dist = _distribution(module)
        if module == "tensorrt":
            assert {"tensorrt-cu12"} <= _names("trt") and {"tensorrt-cu13"} <= _names("trt-cu13")
        else:
            assert dist in _names(extras.OPTIONAL[module].extra), (module, dist)


@pytest.mark.parametrize("package, chosen", [
    ("training", ("train",)),
    ("rd_export", ("export", "trt", "cpu")),
    ("calibration", ("export", "cpu")),
])
def test_each_package_is_covered_by_its_extras(package, chosen):
    top, lazy = _imports(package)
    have = _names(*chosen)
    missing = sorted(m for m in top | lazy if _distribution(m) not in have)
    assert not missing, f"{package} imports {missing}, which [{','.join(chosen)}] does not install"


# ---------------------------------------------------------------- missing extras: one line, exit 6
def _run_blocked(blocked: list[str], code: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    prologue = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in blocked)
    return subprocess.run([sys.executable, "-c", prologue + textwrap.dedent(code)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def _one_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(">")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_rd_train_without_torch_names_the_train_extra():
    proc = _run_blocked(["torch"], """
        sys.argv = ["rd-train", "fit", "--help"]
        from runtime.extras import rd_train
        rd_train()
    """)
    assert proc.returncode == 6, proc.stderr
    assert "rd-train needs PyTorch" in _one_line(proc) and "raindiffusion-edge[train]" in proc.stderr


@pytest.mark.parametrize("blocked, expect", [
    ("torch", "PyTorch is not installed: pip install 'raindiffusion-edge[export]'"),
    ("onnx", "the onnx package is not installed: pip install onnx"),
])
def test_rd_export_from_a_checkpoint_without_its_extra(tmp_path, blocked, expect):
    ckpt = REPO / "training" / "assets" / "default.pt"
    proc = _run_blocked([blocked], f"""
        sys.argv = ["rd-export", "build", {str(ckpt)!r}, "-o", {str(tmp_path)!r}, "--format", "onnx"]
        from runtime.extras import rd_export
        rd_export()
    """)
    assert proc.returncode == 6, proc.stderr
    assert expect in _one_line(proc)
    assert not any(tmp_path.iterdir())


def test_rd_run_derain_without_an_engine_names_cpu_and_gpu(tmp_path):
    photo = REPO / "examples" / "rainy_street.jpg"
    proc = _run_blocked(["onnxruntime"], f"""
        sys.argv = ["rd-run", "derain", {str(photo)!r}, "-o", {str(tmp_path / "out")!r}]
        from runtime.extras import rd_run
        rd_run()
    """)
    assert proc.returncode == 6, proc.stderr
    line = _one_line(proc)
    assert "raindiffusion-edge[cpu]" in line and "[gpu]" in line and "exactly one" in line
    assert not (tmp_path / "out" / "rainy_street.jpg").exists()


def test_rd_run_eval_without_scikit_image_names_the_eval_extra(tmp_path):
    from PIL import Image

    for sub, value in (("rainy", 120), ("clean", 100)):
        (tmp_path / sub).mkdir()
        Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(tmp_path / sub / "a.png")
    proc = _run_blocked(["skimage"], f"""
        sys.argv = ["rd-run", "eval", "--rainy", {str(tmp_path / "rainy")!r}, "--clean", {str(tmp_path / "clean")!r}]
        from runtime.extras import rd_run
        rd_run()
    """)
    assert proc.returncode == 6, proc.stderr  # once, before any pair: not exit 7 with every pair failed
    assert "SSIM needs scikit-image" in _one_line(proc) and "raindiffusion-edge[eval]" in proc.stderr


def test_psnr_works_without_scikit_image():
    proc = _run_blocked(["skimage"], """
        import numpy as np
        from runtime import metrics
        a = np.zeros((8, 8, 3), np.uint8)
        print(round(metrics.psnr_y(a, a + 1), 2))
        try:
            metrics.ssim_y(a, a)
        except Exception as e:
            print(type(e).__name__, e.exit_code)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["48.13", "DependencyError", "6"]


def test_from_import_error_maps_only_optional_dependencies():
    def failing_import(module: str, caller: str) -> ImportError:
        scope = {"__name__": caller}
        try:
            exec(f"import {module}", scope)
        except ImportError as e:
            return e
        raise AssertionError(f"{module} imported")

    saved = {m: sys.modules.get(m) for m in ("torch", "av")}
    try:
        sys.modules["torch"] = sys.modules["av"] = None
        assert "[export]" in str(extras.from_import_error(failing_import("torch", "rd_export.export")))
        assert "[train]" in str(extras.from_import_error(failing_import("torch", "training.train")))
        assert "[video]" in str(extras.from_import_error(failing_import("av", "runtime.video")))
    finally:
        for m, v in saved.items():
            if v is None:
                sys.modules.pop(m, None)
            else:
                sys.modules[m] = v
    assert extras.from_import_error(failing_import("no_such_module_rd17", "runtime.cli")) is None  # a bug: exit 1
    assert extras.from_import_error(ImportError("cannot import name 'x' from 'numpy'")) is None


# ---------------------------------------------------------------- the CUDA provider's error
def test_cuda_provider_error_says_which_situation_this_is():
    both = str(extras.cuda_provider_error(["CPUExecutionProvider"], ["onnxruntime", "onnxruntime-gpu"]))
    assert "onnxruntime and onnxruntime-gpu are all installed" in both
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'raindiffusion-edge[gpu]'" in both
    cpu = str(extras.cuda_provider_error(["CPUExecutionProvider"], ["onnxruntime"]))
    assert "CPU build" in cpu and "pip uninstall -y onnxruntime && pip install 'raindiffusion-edge[gpu]'" in cpu
    gpu = str(extras.cuda_provider_error(["CPUExecutionProvider"], ["onnxruntime-gpu"]))
    assert "onnxruntime-gpu is installed but offers no CUDAExecutionProvider" in gpu and "[gpu]'" not in gpu


def test_the_onnxruntime_backend_on_cuda_without_the_gpu_build_says_what_to_do():
    """On this machine (onnxruntime's CPU build): not the old 'install [gpu]', which would add a second build."""
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    from runtime.backends.onnxruntime import OnnxRuntimeBackend
    from runtime.derainer import default_artifact
    from runtime.errors import DependencyError

    dists = extras.onnxruntime_distributions()
    assert dists, "onnxruntime imports but no distribution provides it"
    with pytest.raises(DependencyError) as info:
        OnnxRuntimeBackend(default_artifact(), device="cuda")
    msg = str(info.value)
    assert f"pip uninstall -y {' '.join(dists)}" in msg, msg
    if dists == ["onnxruntime"]:
        assert "CPU build" in msg


# ---------------------------------------------------------------- a fresh venv, base install only
def _copy_repo(dest: Path) -> Path:
    ignore = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", "build", "dist", "out", "runs",
                                    ".pytest_cache", ".ruff_cache", ".hypothesis")
    shutil.copytree(REPO, dest, ignore=ignore)
    return dest


@pytest.mark.slow
def test_a_fresh_runtime_install_derains_without_torch(tmp_path):
    """``pip install REPO`` (the base) in a new venv, then ``REPO[cpu]``: rd-run derains, torch never installed."""
    src = _copy_repo(tmp_path / "repo")  # pip builds in the source tree: keep the checkout clean
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    pip = [str(bindir / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def run(argv, **kw):
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800, **kw)

    from PIL import Image

    photo = tmp_path / "photo.png"
    Image.open(REPO / "examples" / "rainy_street.jpg").convert("RGB").crop((160, 80, 352, 208)).save(photo)

    def installed() -> set[str]:
        proc = run([str(bindir / "python"), "-m", "pip", "list", "--format=freeze"])
        assert proc.returncode == 0, proc.stderr
        return {canonicalize_name(line.split("==")[0]) for line in proc.stdout.splitlines() if "==" in line}

    proc = run([*pip, str(src)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    have = installed()
    assert not have & {"torch", "onnx", "scikit-image", "scipy", *ORT}, sorted(have)
    proc = run([str(bindir / "rd-run"), "derain", str(photo), "-o", str(tmp_path / "out0")], cwd=tmp_path)
    assert proc.returncode == 6 and "raindiffusion-edge[cpu]" in proc.stderr, (proc.returncode, proc.stderr)

    proc = run([*pip, f"{src}[cpu]"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    have = installed()
    assert "torch" not in have and len(have & ORT) == 1, sorted(have)
    proc = run([str(bindir / "rd-run"), "derain", str(photo), "-o", str(tmp_path / "out")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = np.asarray(Image.open(tmp_path / "out" / "photo.png").convert("RGB"))
    inp = np.asarray(Image.open(photo).convert("RGB"))
    assert out.shape == inp.shape and np.abs(out.astype(int) - inp).mean() > 1.0
    proc = run([str(bindir / "python"), "-c", "import importlib.util as u; print(u.find_spec('torch'))"])
    assert proc.stdout.strip() == "None"
