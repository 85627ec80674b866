"""Which extra of ``raindiffusion-edge`` installs each optional dependency, and the errors that say so.

The base install is what ``runtime/`` imports at module scope (numpy, Pillow, typer, rich). Every
other dependency belongs to an extra of ``pyproject.toml`` and is imported only where it is used;
when it is missing, the toolkit raises a :class:`~runtime.errors.DependencyError` (exit 6) whose one
line names the extra to install. ``tests/test_packaging.py`` checks this table against the
extras and the imports.

The inference engine is one of two exclusive extras, ``[cpu]`` (onnxruntime, and OpenVINO on
x86-64) or ``[gpu]`` (onnxruntime-gpu): both distributions install the same ``onnxruntime`` module, and with both
present the CUDA provider disappears (onnxruntime#7748). :func:`cuda_provider_error` tells which
of those situations a machine is in.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
import traceback
from dataclasses import dataclass

from runtime.errors import DependencyError

__all__ = ["PROJECT", "Dependency", "OPTIONAL", "install_command", "missing", "from_import_error",
           "onnxruntime_distributions", "cuda_provider_error", "rd_train", "rd_export", "rd_run"]

PROJECT = "raindiffusion-edge"


@dataclass(frozen=True)
class Dependency:
    """An optional dependency: its import name, what to call it, and the extra that installs it."""

    module: str
    what: str
    extra: str
    distribution: str
    #: the install line when it is not simply the extra's (onnx: two extras carry it)
    hint: str | None = None


#: top-level import name -> the optional dependency (torch's extra depends on the caller: see missing())
OPTIONAL: dict[str, Dependency] = {o.module: o for o in (
    Dependency("onnxruntime", "onnxruntime", "cpu", "onnxruntime"),
    Dependency("torch", "PyTorch", "train", "torch"),
    Dependency("scipy", "SciPy", "train", "scipy"),
    Dependency("onnx", "the onnx package", "export", "onnx",
               hint="pip install onnx (it comes with the [export] extra, and with [trt] for plans on a device)"),
    Dependency("onnxslim", "onnxslim", "export", "onnxslim"),
    Dependency("skimage", "scikit-image", "eval", "scikit-image"),
    Dependency("av", "PyAV", "video", "av"),
    Dependency("cv2", "OpenCV", "stream", "opencv-python-headless"),
    Dependency("openvino", "OpenVINO", "openvino", "openvino"),
    Dependency("tensorrt", "TensorRT", "trt", "tensorrt-cu12"),
    Dependency("cuda", "cuda-python", "trt", "cuda-python"),
    Dependency("pytriton", "PyTriton", "serve", "nvidia-pytriton"),
    Dependency("tritonclient", "tritonclient", "serve", "tritonclient"),
    # provided by the tritonserver that PyTriton bundles (the Python backend), inside a served model only
    Dependency("triton_python_backend_utils", "Triton's Python backend", "serve", "nvidia-pytriton"),
)}


def install_command(extra: str) -> str:
    """``pip install 'raindiffusion-edge[EXTRA]'`` plus what a user must know about that extra."""
    cmd = f"pip install '{PROJECT}[{extra}]'"
    if extra == "cpu":
        return f"{cmd} (or [gpu] for CUDA; install exactly one of the two)"
    if extra in ("train", "export"):
        return f"{cmd} (install your PyTorch build first: the CPU wheel or a CUDA one, see the README's Install)"
    if extra == "trt":
        return f"{cmd} (CUDA 12; [trt-cu13] for CUDA 13)"
    return cmd


def missing(module: str, *, needed_for: str | None = None, extra: str | None = None) -> DependencyError:
    """The DependencyError for an absent optional ``module`` (a top-level import name)."""
    top = module.partition(".")[0]
    opt = OPTIONAL.get(top)
    what = opt.what if opt else top
    needs = f"{needed_for} needs {what}, which is not installed" if needed_for else f"{what} is not installed"
    if extra is None and opt is not None and opt.hint:
        return DependencyError(f"{needs}: {opt.hint}")
    extra = extra or (opt.extra if opt else None)
    if extra is None:
        return DependencyError(f"{needs}: pip install {top}")
    return DependencyError(f"{needs}: {install_command(extra)}")


def from_import_error(error: ImportError) -> DependencyError | None:
    """The DependencyError for an ImportError of an optional dependency; None for anything else.

    PyTorch is the [export] extra's when the failed import came from rd_export/ or calibration/
    (found in the traceback), [train]'s otherwise.
    """
    if not isinstance(error, ModuleNotFoundError) or not error.name:
        return None
    top = error.name.partition(".")[0]
    if top not in OPTIONAL:
        return None
    extra = None
    if top == "torch":
        modules = (f.f_globals.get("__name__", "") for f, _ in traceback.walk_tb(error.__traceback__))
        extra = "export" if any(m.startswith(("rd_export", "calibration")) for m in modules) else "train"
    return missing(top, extra=extra)


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def onnxruntime_distributions() -> list[str]:
    """Installed distributions that provide the ``onnxruntime`` module (onnxruntime, onnxruntime-gpu, ...)."""
    names = set()
    for dist in importlib.metadata.distributions():
        name = _normalise(dist.metadata.get("Name") or "")
        if name == "onnxruntime" or name.startswith(("onnxruntime-", "ort-nightly")):
            if name not in ("onnxruntime-extensions", "onnxruntime-genai", "onnxruntime-tools"):
                names.add(name)
    return sorted(names)


def cuda_provider_error(available: list[str], distributions: list[str] | None = None) -> DependencyError:
    """Why onnxruntime offers no CUDAExecutionProvider here, and the commands that fix it."""
    dists = onnxruntime_distributions() if distributions is None else distributions
    providers = ", ".join(available) or "none"
    gpu = f"pip install '{PROJECT}[gpu]'"
    if len(dists) > 1:
        return DependencyError(
            f"device='cuda' needs onnxruntime-gpu's CUDAExecutionProvider, but {' and '.join(dists)} are all "
            f"installed and share one onnxruntime module (onnxruntime#7748; providers now: {providers}): "
            f"pip uninstall -y {' '.join(dists)} && {gpu}")
    if dists == ["onnxruntime"]:
        return DependencyError(
            f"device='cuda' needs onnxruntime-gpu; the installed onnxruntime is the CPU build (providers: "
            f"{providers}): pip uninstall -y onnxruntime && {gpu}")
    if dists == ["onnxruntime-gpu"]:
        return DependencyError(
            f"onnxruntime-gpu is installed but offers no CUDAExecutionProvider (providers: {providers}); "
            f"check that its CUDA and cuDNN libraries match it, or reinstall it: "
            f"pip install --force-reinstall onnxruntime-gpu")
    found = f"the installed {dists[0]}" if dists else "this onnxruntime"
    return DependencyError(f"device='cuda' needs CUDAExecutionProvider, which {found} does not offer "
                           f"(providers: {providers}): {gpu} (in place of the other build)")


def _launch(prog: str, module: str, extra: str | None = None) -> None:
    """Run the typer ``app`` of ``module``; an optional dependency missing at import is one line + exit 6.

    The CLIs turn what their commands raise into one line themselves (runtime.cli_errors); this
    catches what escapes them: a missing package imported by the CLI module itself or before a
    command enters its error handling. ``--debug`` keeps the traceback.
    """
    try:
        app = importlib.import_module(module).app
        app()
    except ImportError as e:
        err = from_import_error(e)
        if err is None or "--debug" in sys.argv[1:]:
            raise
        if extra is not None:  # the extra this whole CLI needs
            err = missing(e.name or "", needed_for=prog, extra=extra)
        print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None


def rd_train() -> None:
    """The ``rd-train`` console script (needs the [train] extra: PyTorch, SciPy, scikit-image)."""
    _launch("rd-train", "training.cli", extra="train")


def rd_export() -> None:
    """The ``rd-export`` console script ([export] from a checkpoint, [trt] for plans, [cpu] to verify)."""
    _launch("rd-export", "rd_export.cli")


def rd_run() -> None:
    """The ``rd-run`` console script (the base install plus an engine: [cpu], [gpu] or [trt])."""
    _launch("rd-run", "runtime.cli")
