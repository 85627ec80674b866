"""TensorRT backend: a ``<stem>.trt.plan`` on a CUDA GPU, through cuda-python.

What happens, in order (every step before deserialisation runs without touching TensorRT):

1. the manifest is loaded and the plan's sha256 checked against it (a mismatch raises
   :class:`EngineMismatchError`: the plan was rebuilt or altered since its manifest);
2. ``tensorrt`` is imported lazily, and its version compared with the manifest's
   ``tensorrt.version`` (:func:`check_engine_compat`); then ``cuda.bindings.runtime``
   (cuda-python) is imported, the device made current, and the GPU's compute capability compared
   with ``tensorrt.compute_capability``. Any mismatch raises :class:`EngineMismatchError` with
   the exact ``rd-export build ... --format trt`` command;
3. the plan is deserialised (``trt.Runtime.engine_host_code_allowed`` set first when the manifest
   says it was built version-compatible) into one execution context, and run by
   :class:`~runtime.backends.cuda_backend.CudaStepBackend` through the one TensorRT executor
   (runtime/backends/trt_executor.py): buffers once per shape, the tables on the executor's
   own stream, the S-step loop as one CUDA graph.

Version rules (TensorRT "Version Compatibility", 10.x, and "Engine Compatibility" / support
matrix, 11.x): a plan runs only on the TensorRT release that built it, unless it was built
version-compatible (``BuilderFlag.VERSION_COMPATIBLE``, ``rd-export build --version-compatible``):
then on that release and any later one of the same major version, and across the one documented
major step per release line (a TensorRT 10 plan on TensorRT 11; 8 on 9 and 10). Such a plan carries the
lean runtime (host code), so TensorRT loads it only with ``engine_host_code_allowed``; the plan's
sha256 is checked against its manifest before that. The GPU must be the build GPU's compute
capability, unless built hardware-compatible (``ampere_plus``: compute capability >= 8.0).

None of this has run on TensorRT yet (no TensorRT on the machines it was written on).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from runtime.backends.base import parse_device
from runtime.backends.cuda_backend import CudaStepBackend
from runtime.backends.cuda_device import CudaDevice, CudaError
from runtime.backends.trt_executor import TRT_INSTALL_HINT, TensorRTEngine, import_tensorrt
from runtime.errors import ArtifactError, EngineMismatchError, ManifestError, UsageError
from runtime.manifest import Manifest, load_manifest, manifest_path_for

__all__ = ["CudaError", "TensorRTBackend", "check_engine_compat", "rebuild_command", "version_compatible",
           "version_compatible_runs", "TRT_INSTALL_HINT", "VC_CROSS_MAJOR"]

#: (built major, runtime major) pairs across which TensorRT documents that version-compatible
#: plans run: "TensorRT 10 version-compatible engines can run with a TensorRT 11 runtime, and
#: TensorRT 8 version-compatible engines can run with a TensorRT 10 runtime. No other
#: combination across major versions is supported." (TensorRT 11.4 support matrix), and
#: "engines built with TensorRT 8 work with TensorRT 9 and TensorRT 10 runtimes" (10.x docs).
VC_CROSS_MAJOR = frozenset({(8, 9), (8, 10), (10, 11)})


# ---------------------------------------------------------------------- compatibility checks
def rebuild_command(artifact: str | os.PathLike, manifest: Manifest | None = None) -> str:
    """The command that rebuilds this plan on this machine: ``rd-export build <stem>.onnx --format trt``."""
    plan = Path(artifact)
    name = plan.name
    stem = name[: -len(".trt.plan")] if name.endswith(".trt.plan") else plan.stem
    onnx_name = f"{stem}.onnx"
    source = manifest.get("source") if manifest is not None else None
    if isinstance(source, dict) and isinstance(source.get("onnx"), str) and source["onnx"]:
        onnx_name = Path(source["onnx"]).name
    return f"rd-export build {plan.with_name(onnx_name)} --format trt"


def _version_tuple(version: str) -> tuple[int, ...]:
    nums = re.findall(r"\d+", str(version).split("+")[0])
    return tuple(int(n) for n in nums[:3])


def _parse_cc(value: Any) -> tuple[int, int] | None:
    """'8.6', [8, 6], (8, 6), 'sm_86', 86 -> (8, 6)."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str):
        text = value.strip().lower().removeprefix("sm_").removeprefix("sm")
        if "." in text:
            major, _, minor = text.partition(".")
            if major.isdigit() and minor.isdigit():
                return int(major), int(minor)
        elif text.isdigit() and len(text) >= 2:
            return int(text[:-1]), int(text[-1])
    return None


def _flags(info: dict) -> set[str]:
    flags = info.get("build_flags") or []
    if isinstance(flags, dict):
        flags = [k for k, v in flags.items() if v is True]
    elif isinstance(flags, str):
        flags = re.split(r"[,\s]+", flags)
    return {str(f).strip().lower().replace("-", "_") for f in flags if str(f).strip()}


def version_compatible(manifest: Manifest) -> bool:
    """Whether the manifest says its plan was built with ``BuilderFlag.VERSION_COMPATIBLE``."""
    info = manifest.get("tensorrt")
    if not isinstance(info, dict):
        return False
    return info.get("version_compatible") is True or "version_compatible" in _flags(info)


def version_compatible_runs(built: str, installed: str) -> bool:
    """A version-compatible plan built by ``built`` runs on ``installed`` (the rule of the docstring)."""
    b, i = _version_tuple(built), _version_tuple(installed)
    if not b or not i or i < b:
        return False
    return i[0] == b[0] or (b[0], i[0]) in VC_CROSS_MAJOR


def _vc_range(built: str) -> str:
    major = _version_tuple(built)[0]
    nxt = sorted(r for b, r in VC_CROSS_MAJOR if b == major)
    return f"TensorRT {built} or a later {major}.x" + "".join(f" or {n}.x" for n in nxt)


def check_engine_compat(manifest: Manifest, *, artifact: str | os.PathLike, trt_version: str | None = None,
                        compute_capability: tuple[int, int] | None = None, gpu_name: str | None = None) -> None:
    """Refuse a plan built for another TensorRT release or GPU; the message says how to rebuild.

    Rules: see the module docstring. Pass None for a value not checked yet.
    """
    info = manifest.get("tensorrt")
    where = manifest_path_for(artifact)
    cmd = rebuild_command(artifact, manifest)
    if not isinstance(info, dict):
        raise ManifestError(f"{where}: a TensorRT plan's manifest needs a 'tensorrt' section; rebuild: {cmd}")
    flags = _flags(info)
    if trt_version is not None:
        built = info.get("version")
        if not isinstance(built, str) or not _version_tuple(built):
            raise ManifestError(f"{where}: field 'tensorrt.version' is missing or invalid; rebuild: {cmd}")
        name = Path(artifact).name
        if version_compatible(manifest):
            if not version_compatible_runs(built, trt_version):
                raise EngineMismatchError(
                    f"{name} was built version-compatible by TensorRT {built}, so it runs on {_vc_range(built)}, "
                    f"but TensorRT {trt_version} is installed. Rebuild it here: {cmd}")
        elif _version_tuple(trt_version) != _version_tuple(built):
            raise EngineMismatchError(
                f"{name} was built with TensorRT {built} but TensorRT {trt_version} is installed; "
                f"a plan only runs on the TensorRT release that built it. Rebuild it here: {cmd}"
                f" (or build it with --version-compatible to run it on later releases)")
    if compute_capability is not None:
        raw = info.get("compute_capability")
        built_cc = _parse_cc(raw)
        if built_cc is None:
            raise ManifestError(f"{where}: field 'tensorrt.compute_capability' is missing or invalid ({raw!r}); "
                                f"rebuild: {cmd}")
        have_cc = (int(compute_capability[0]), int(compute_capability[1]))
        if flags & {"ampere_plus", "hardware_compatible", "hardware_compatibility"}:
            ok = have_cc >= (8, 0)
        else:
            ok = have_cc == built_cc
        if not ok:
            built_gpu = info.get("gpu_name") or "another GPU"
            this_gpu = f"this GPU ({gpu_name})" if gpu_name else "this GPU"
            raise EngineMismatchError(
                f"{Path(artifact).name} was built for {built_gpu} (compute capability {built_cc[0]}.{built_cc[1]}) "
                f"but {this_gpu} has compute capability {have_cc[0]}.{have_cc[1]}; a plan only runs on the GPU "
                f"family that built it. Rebuild it here: {cmd}"
            )


# ---------------------------------------------------------------------- the backend
class TensorRTBackend(CudaStepBackend):
    """The fused step as a TensorRT plan (see the module docstring and CudaStepBackend)."""

    name = "tensorrt"

    def __init__(self, artifact: str | os.PathLike, *, device: str = "cuda", cuda_graph: bool = True,
                 manifest: Manifest | None = None) -> None:
        kind, index = parse_device(device)
        if kind != "cuda":
            raise UsageError(f"a TensorRT plan runs on a CUDA GPU; use device='cuda' (got {device!r})")
        # 1. manifest + sha256, before anything of TensorRT is imported or called
        manifest = manifest if manifest is not None else load_manifest(artifact, "trt")
        check_engine_compat(manifest, artifact=artifact)  # the 'tensorrt' section exists
        pro_path = manifest.prologue_path(artifact)  # a predict-and-refine prologue plan: hash-checked too

        # 2. versions: installed TensorRT, then this GPU's compute capability, vs the manifest
        trt = import_tensorrt()
        check_engine_compat(manifest, artifact=artifact, trt_version=str(getattr(trt, "__version__", "")))
        cuda = CudaDevice(index)
        cuda.activate()
        check_engine_compat(manifest, artifact=artifact, compute_capability=cuda.compute_capability(),
                            gpu_name=_gpu_name(cuda))

        # 3. deserialise (version-compatible plans carry host code: TensorRT must be told to load it)
        path = Path(artifact)
        try:
            engine = TensorRTEngine(path.read_bytes(), trt=trt, name=path.name,
                                    allow_host_code=version_compatible(manifest))
        except ArtifactError as e:
            raise EngineMismatchError(f"{e}; rebuild it here: {rebuild_command(artifact, manifest)}") from None
        pro_engine = None
        try:
            if pro_path is not None:
                try:
                    pro_engine = TensorRTEngine(pro_path.read_bytes(), trt=trt, name=pro_path.name,
                                                allow_host_code=version_compatible(manifest))
                except ArtifactError as e:
                    raise EngineMismatchError(f"{e}; rebuild it here: {rebuild_command(artifact, manifest)}") from None
            super().__init__(artifact, manifest, device=cuda, engine=engine, cuda_graph=cuda_graph,
                             limits=manifest.step_descriptor.profile, prologue_engine=pro_engine)
        except BaseException:
            engine.close()
            if pro_engine is not None:
                pro_engine.close()
            raise


def _gpu_name(cuda: CudaDevice) -> str | None:
    try:
        return cuda.name() or None
    except Exception:  # the name only decorates an error message
        return None
