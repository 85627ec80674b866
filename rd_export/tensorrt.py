"""ONNX -> TensorRT plan (``<stem>.trt.plan`` + ``<stem>.trt.json``), TensorRT 10.x and 11.x.

One path serves both (docs/ARCHITECTURE.md): the network is created **strongly typed**
(``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; deprecated-but-accepted in TensorRT 11, where
every network is strongly typed), so precision comes from the ONNX (FP16 casts, Q/DQ for INT8)
and no ``BuilderFlag.FP16/INT8`` or INT8 calibrator is used (TensorRT 11 removed them).
Builder settings: one optimisation profile from the step descriptor's tensor specs, a workspace
memory-pool limit, ``builder_optimization_level``, a timing cache file loaded when present and
saved (atomically) after the build, and optionally ``BuilderFlag.VERSION_COMPATIBLE`` (the plan
then runs on later TensorRT releases: runtime/backends/tensorrt.py has the rule). The plan is
written raw (no header: trtexec, Triton and C++ loaders read it, ultralytics#22910) through a
temporary file; the sidecar manifest records the TensorRT version, the GPU's name and compute
capability (a plan only runs where it was built), ``version_compatible`` and the build flags.

Refused before TensorRT is touched: a Q/DQ graph with unsigned or non-zero zero points (the
``.int8.cpu.onnx`` made for onnxruntime on x86): TensorRT executes only symmetric signed INT8
(its parser asserts "TRT only supports symmetric quantization - zeroPt must be all zeros",
onnx/tensorflow-onnx#1713), so the message names the ``.int8.onnx`` to build instead.

Verification runs the engine through the one TensorRT executor the runtime uses
(runtime/backends/trt_executor.py) against its ONNX through onnxruntime: the whole DDIM loop at
the profile's minimum shape, and single steps at high, middle and low t at the optimum and the
maximum shape (batch included), FP16 plans too: FP16 overflow in normalisation statistics
(what rd_export/fp16.py keeps FP32 islands for) grows with the pixel count, so it shows at the
large end of the profile, not at the small one.

``tensorrt`` and ``cuda-python`` (``cuda.bindings``) are imported lazily: without them
everything else in the toolkit works and the user gets one line saying what to install.

Nothing in this module has run on TensorRT on the machines this was written on (no GPU); the
API names follow the TensorRT 10/11 Python documentation and tests/fakes/fake_tensorrt.py
pins the calls. ``pytest -m trt`` runs the real build + parity where TensorRT exists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np

from rd_export.precision import plan_name
from runtime.artifacts import check_external_data
from runtime.backends.cuda_backend import spec_shapes
from runtime.backends.cuda_device import CudaDevice, CudaError
from runtime.backends.trt_executor import Executor, TensorRTEngine, capturing_logger
from runtime.backends.trt_executor import import_tensorrt as _import_tensorrt
from runtime.descriptor import PrologueDescriptor, ShapeProfile, StepDescriptor
from runtime.errors import ArtifactError, DependencyError, UsageError, VerificationError
from runtime.io import atomic_path, atomic_write_bytes
from runtime.manifest import Manifest, load_manifest, prologue_name, sha256_file

__all__ = [
    "INSTALL_HINT",
    "DEFAULT_WORKSPACE",
    "DEFAULT_OPT_LEVEL",
    "ENGINE_MIN_PSNR_DB",
    "import_tensorrt",
    "import_cudart",
    "tensorrt_available",
    "tensorrt_version",
    "gpu_info",
    "build_engine",
    "check_tensorrt_quantization",
    "EngineStep",
    "verify_engine",
]

INSTALL_HINT = (
    "TensorRT engines need tensorrt and cuda-python: pip install 'raindiffusion-edge[trt]' "
    "(or copy the .onnx with its .json to the target device and run `rd-export build model.onnx` there)"
)
DEFAULT_WORKSPACE = 2 << 30  # 2 GiB
DEFAULT_OPT_LEVEL = 3  # TensorRT's default; 0-5
#: engine vs the ONNX it was built from (onnxruntime CPU): end-to-end PSNR at the profile's
#: minimum, and per-step PSNR at its optimum and maximum. TF32/FP16 kernels differ from CPU FP32
#: arithmetic; this bound is the FP16 ONNX bound, not yet measured on a GPU.
ENGINE_MIN_PSNR_DB = 40.0
#: PSNR reported for identical step outputs (finite JSON)
_PSNR_CAP = 200.0


# --------------------------------------------------------------------------- lazy imports
def import_tensorrt():
    """The ``tensorrt`` module, or DependencyError with the one-line install hint."""
    return _import_tensorrt(INSTALL_HINT)


def import_cudart():
    """cuda-python's runtime API: ``cuda.bindings.runtime`` (>= 12.6) or the older ``cuda.cudart``."""
    from runtime.backends.cuda_device import import_cudart as _import_cudart

    return _import_cudart(INSTALL_HINT)


def tensorrt_available() -> bool:
    try:
        import_tensorrt()
        import_cudart()
    except DependencyError:
        return False
    return True


def tensorrt_version() -> str:
    return str(import_tensorrt().__version__)


def gpu_info(device: int | None = None) -> dict:
    """{"name", "compute_capability": "8.9", "device"} of the current (or given) CUDA device.

    Raises CudaError (exit 1) when CUDA fails, DependencyError without cuda-python.
    """
    cudart = import_cudart()
    if device is None:
        device = int(CudaDevice(0, cudart=cudart).check(cudart.cudaGetDevice(), "cudaGetDevice"))
    cuda = CudaDevice(device, cudart=cudart)
    major, minor = cuda.compute_capability()
    return {"name": cuda.name(), "compute_capability": f"{major}.{minor}", "device": int(device)}


# --------------------------------------------------------------------------- build
def resolve_profile(descriptor: StepDescriptor, *, min_size: Sequence[int] | None = None,
                    opt_size: Sequence[int] | None = None, max_size: Sequence[int] | None = None,
                    batch: int | Sequence[int] | None = None) -> ShapeProfile:
    """The descriptor's profile with any given bounds replaced; UsageError if it does not fit."""
    p = descriptor.profile
    if batch is None:
        b = (p.min_batch, p.opt_batch, p.max_batch)
    elif isinstance(batch, int):
        b = (batch, batch, batch)
    else:
        b = tuple(int(v) for v in batch)
        if len(b) == 2:
            b = (b[0], b[0], b[1])
        if len(b) != 3:
            raise UsageError(f"batch must be N, (min, max) or (min, opt, max), got {batch!r}")
    prof = ShapeProfile(min_batch=b[0], opt_batch=b[1], max_batch=b[2],
                        min_size=tuple(min_size) if min_size else p.min_size,
                        opt_size=tuple(opt_size) if opt_size else p.opt_size,
                        max_size=tuple(max_size) if max_size else p.max_size)
    try:
        prof.validate(descriptor.size_multiple)
    except ValueError as e:
        raise UsageError(f"{e} (the model's size multiple is {descriptor.size_multiple})") from None
    return prof


def _host_bytes(blob) -> bytes:
    """IHostMemory / buffer -> bytes."""
    if isinstance(blob, (bytes, bytearray)):
        return bytes(blob)
    return bytes(memoryview(blob))


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def check_tensorrt_quantization(onnx_path: str | os.PathLike, manifest: Manifest) -> None:
    """UsageError when the ONNX is a Q/DQ graph TensorRT cannot build (unsigned or non-zero zero points).

    Checked from the manifest's ``calibration`` section first (the ``.int8.cpu.onnx`` of
    calibration/ says ``activation_symmetric: false`` and names its TensorRT sibling), then in
    the graph itself, so a hand-made asymmetric graph is refused too.
    """
    onnx_path = Path(onnx_path)
    cal = manifest.get("calibration") if isinstance(manifest.get("calibration"), dict) else {}
    sibling = (cal.get("siblings") or {}).get("tensorrt") if isinstance(cal.get("siblings"), dict) else None
    name = onnx_path.name
    if sibling is None and name.endswith(".int8.cpu.onnx"):
        sibling = name[: -len(".int8.cpu.onnx")] + ".int8.onnx"
    use = (f"; build {onnx_path.with_name(sibling)} instead: rd-export build {onnx_path.with_name(sibling)} "
           f"--format trt" if sibling else "; calibrate with `rd-export build ... --precision int8`, whose "
                                          "<stem>.int8.onnx is symmetric")
    why = (f"{name} is an INT8 graph with unsigned asymmetric activations (for onnxruntime on x86 CPUs); "
           f"TensorRT runs only symmetric signed INT8 (zero point 0)")
    if cal.get("activation_symmetric") is False:
        raise UsageError(why + use)
    bad = _asymmetric_qdq(onnx_path)
    if bad:
        raise UsageError(f"{name} has Q/DQ nodes with unsigned or non-zero zero points ({bad}); TensorRT runs only "
                         f"symmetric signed INT8 (zero point 0){use}")


def _asymmetric_qdq(onnx_path: Path) -> str | None:
    """The first Q/DQ node whose zero point is uint8 or non-zero ("node (why)"), or None."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    consts = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.HasField("t"):
                    consts[node.output[0]] = a.t
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3 or not node.input[2]:
            continue
        zp = consts.get(node.input[2])
        if zp is None:
            continue
        if zp.data_type == onnx.TensorProto.UINT8:
            return f"{node.name or node.op_type}: uint8 zero point"
        if zp.data_location != onnx.TensorProto.EXTERNAL and np.any(numpy_helper.to_array(zp) != 0):
            return f"{node.name or node.op_type}: non-zero zero point"
    return None


def build_engine(onnx_path: str | os.PathLike, descriptor: StepDescriptor | None = None, *,
                 out: str | os.PathLike | None = None, min_size: Sequence[int] | None = None,
                 opt_size: Sequence[int] | None = None, max_size: Sequence[int] | None = None,
                 batch: int | Sequence[int] | None = None, workspace: int = DEFAULT_WORKSPACE,
                 timing_cache: str | os.PathLike | None = None, opt_level: int = DEFAULT_OPT_LEVEL,
                 version_compatible: bool = False, verify: bool = True, steps: int | None = None, seed: int = 0,
                 progress: Callable[[str], None] | None = None) -> Path:
    """Build ``<stem>.trt.plan`` (+ ``<stem>.trt.json``) from an ONNX artifact and its manifest.

    ``descriptor`` defaults to the ONNX manifest's; the size/batch arguments override its
    profile. ``version_compatible`` sets ``BuilderFlag.VERSION_COMPATIBLE`` (the plan runs on
    later TensorRT releases; TensorRT notes such plans can be slower). With ``verify`` the
    engine is run on this GPU against the ONNX through onnxruntime (see the module docstring)
    before anything is written as done. Raises DependencyError (no tensorrt / cuda-python),
    ArtifactError (parser or build failure, with TensorRT's messages), UsageError (bad profile,
    an ONNX TensorRT cannot build), CudaError (the GPU failed, e.g. out of memory),
    VerificationError.
    """
    progress = progress or (lambda s: None)
    onnx_path = Path(onnx_path)
    src = load_manifest(onnx_path, "onnx")  # hash-checked before the GPU is touched
    check_external_data(onnx_path)  # TensorRT's parser would open external-data files as named
    check_tensorrt_quantization(onnx_path, src)
    descriptor = descriptor or src.step_descriptor
    profile = resolve_profile(descriptor, min_size=min_size, opt_size=opt_size, max_size=max_size, batch=batch)
    descriptor = dataclasses.replace(descriptor, profile=profile)
    if not 0 <= int(opt_level) <= 5:
        raise UsageError(f"builder optimisation level {opt_level} is outside 0..5")
    if int(workspace) <= 0:
        raise UsageError(f"workspace must be a positive number of bytes, got {workspace}")
    dest = Path(out) if out is not None else onnx_path.with_name(plan_name(onnx_path))
    if dest.suffix != ".plan":
        raise UsageError(f"{dest}: engine files are named <stem>.trt.plan")

    trt = import_tensorrt()
    gpu = gpu_info()
    progress(f"parsing {onnx_path.name} (TensorRT {trt.__version__}, {gpu['name']} sm_{gpu['compute_capability']})")
    cache_path = Path(timing_cache) if timing_cache is not None else None
    flags = _build_flags(profile, workspace=workspace, opt_level=opt_level, version_compatible=version_compatible,
                         cache_path=cache_path)
    build = partial(_build_plan, trt, workspace=workspace, opt_level=opt_level, version_compatible=version_compatible,
                    cache_path=cache_path)
    progress(f"building engine (profile batch {profile.min_batch}..{profile.max_batch}, "
             f"{profile.min_size[0]}x{profile.min_size[1]}..{profile.max_size[0]}x{profile.max_size[1]}, "
             f"opt level {opt_level}{', version-compatible' if version_compatible else ''})")
    plan_bytes = build(onnx_path, descriptor)
    pro_onnx = src.prologue_path(onnx_path)  # predict-and-refine: the prologue plan, same profile
    pro_dest = dest.with_name(prologue_name(dest.name)) if pro_onnx is not None else None
    pro_bytes = None
    if pro_onnx is not None:
        check_external_data(pro_onnx)
        progress(f"building the prologue engine from {pro_onnx.name}")
        pro_bytes = build(pro_onnx, descriptor.prologue())

    with atomic_path(dest) as tmp, (atomic_path(pro_dest) if pro_dest else contextlib.nullcontext()) as pro_tmp:
        _write_raw(tmp, plan_bytes)  # raw plans, no header
        if pro_tmp is not None:
            _write_raw(pro_tmp, pro_bytes)
        extra = {k: v for k, v in src.extra.items() if k not in ("verification", "created", "tensorrt", "source")}
        extra["source"] = dict(src.get("source", {}), onnx=onnx_path.name, onnx_sha256=src.sha256)
        extra["tensorrt"] = {"version": str(trt.__version__), "gpu_name": gpu["name"],
                             "compute_capability": gpu["compute_capability"], **flags}
        if verify:
            progress(f"verifying {dest.name} against {onnx_path.name} on {gpu['name']} (profile min, opt, max)")
            extra["verification"] = verify_engine(plan_bytes, onnx_path, descriptor, steps=steps or src.verify_steps,
                                                  seed=seed, schedule=src.schedule, device=gpu["device"],
                                                  allow_host_code=bool(version_compatible),
                                                  prologue=(pro_bytes, pro_onnx) if pro_bytes else None)
        if pro_tmp is not None:
            extra["prologue"] = dict(src.prologue, artifact=pro_dest.name, sha256=sha256_file(pro_tmp),
                                     source_onnx=pro_onnx.name)
        extra["created"] = _now()
        manifest = Manifest(artifact=dest.name, format="trt", precision=src.precision, model=src.model,
                            sha256=sha256_file(tmp), descriptor=descriptor.to_dict(), schedule=src.schedule,
                            model_config=src.model_config, toolkit_version=src.toolkit_version, extra=extra)
    return manifest.publish(dest)


def _build_flags(profile: ShapeProfile, *, workspace: int, opt_level: int, version_compatible: bool,
                 cache_path: Path | None) -> dict:
    """The manifest's ``version_compatible`` and ``build_flags`` (read before the build touches the cache)."""
    return {"version_compatible": bool(version_compatible), "build_flags": {
        "strongly_typed": True,
        "version_compatible": bool(version_compatible),
        "workspace_bytes": int(workspace),
        "builder_optimization_level": int(opt_level),
        "timing_cache": cache_path.name if cache_path is not None else None,
        "timing_cache_loaded": cache_path is not None and cache_path.is_file() and cache_path.stat().st_size > 0,
        "profile": profile.to_dict(),
    }}


def _write_raw(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _build_plan(trt, onnx_path: Path, descriptor, *, workspace: int, opt_level: int, version_compatible: bool,
                cache_path: Path | None) -> bytes:
    """One strongly typed plan of ``onnx_path`` with one optimisation profile from ``descriptor``
    (a step's or a prologue's: its ``input_shapes()``); the timing cache is read and updated."""
    logger = capturing_logger(trt)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or logger.errors()
        raise ArtifactError(f"{onnx_path}: TensorRT's ONNX parser failed: {' | '.join(errors) or 'no message'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    config.builder_optimization_level = int(opt_level)
    if version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)  # TensorRT "Version Compatibility"
    trt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in descriptor.input_shapes().items():  # the descriptor carries the resolved profile
        trt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(trt_profile)
    cache_blob = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_blob)
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        errors = logger.errors()
        raise ArtifactError(f"{onnx_path}: TensorRT could not build an engine"
                            + (f": {' | '.join(errors[-3:])}" if errors else ""))
    if cache_path is not None:
        atomic_write_bytes(cache_path, _host_bytes(config.get_timing_cache().serialize()))
    return _host_bytes(plan)


# --------------------------------------------------------------------------- run (verification)
class EnginePrologue:
    """The prologue of a TensorRT plan as a numpy function (rainy -> cond), through the executor."""

    def __init__(self, plan: bytes, *, device: int = 0, allow_host_code: bool = False) -> None:
        trt = import_tensorrt()
        self.executor = Executor(CudaDevice(device, cudart=import_cudart()))
        try:
            self.engine = TensorRTEngine(plan, trt=trt, name="TensorRT prologue engine",
                                         allow_host_code=allow_host_code)
        except BaseException:
            self.executor.close()
            raise

    def __call__(self, rainy: np.ndarray) -> np.ndarray:
        d = PrologueDescriptor
        return self.executor.run(self.engine, {d.RAINY: rainy})[d.OUT]

    def close(self) -> None:
        self.executor.close()
        self.engine.close()


class EngineStep:
    """The fused step of a TensorRT plan as a numpy function, through the runtime's executor.

    Buffers are named after the descriptor's tensors and kept while the shapes stay (allocated
    once per shape), every copy and enqueue runs on the executor's stream, every enqueue's
    result is checked. ``allow_host_code``: the plan was built version-compatible.
    """

    def __init__(self, plan: bytes, descriptor: StepDescriptor | None = None, *, device: int = 0,
                 allow_host_code: bool = False) -> None:
        self.descriptor = descriptor or StepDescriptor(size_multiple=1)
        trt = import_tensorrt()
        self.executor = Executor(CudaDevice(device, cudart=import_cudart()))
        try:
            self.engine = TensorRTEngine(plan, trt=trt, name="TensorRT engine", allow_host_code=allow_host_code)
        except BaseException:
            self.executor.close()
            raise

    def __call__(self, x_t: np.ndarray, cond: np.ndarray, t: np.ndarray, coef: np.ndarray) -> np.ndarray:
        d = self.descriptor
        return self.executor.run(self.engine, {d.X: x_t, d.COND: cond, d.T: t, d.COEF: coef})[d.OUT]

    def close(self) -> None:
        self.executor.close()
        self.engine.close()


def _step_psnr(got: np.ndarray, want: np.ndarray) -> float:
    """PSNR of one step's output with the peak set to the reference's value range (x_t is not in [-1, 1])."""
    if not (np.isfinite(got).all() and np.isfinite(want).all()):
        return float("nan")
    mse = float(np.mean((got.astype(np.float64) - want.astype(np.float64)) ** 2))
    peak = float(want.max() - want.min()) or 1.0
    return _PSNR_CAP if mse == 0.0 else min(_PSNR_CAP, 10.0 * math.log10(peak**2 / mse))


def _profile_points(descriptor: StepDescriptor) -> list[tuple[str, int, int, int]]:
    """(label, batch, height, width) of the profile's optimum and maximum, without repeating the minimum."""
    p = descriptor.profile
    seen = {(p.min_batch, *p.min_size)}
    points = []
    for label, b, hw in (("opt", p.opt_batch, p.opt_size), ("max", p.max_batch, p.max_size)):
        key = (int(b), int(hw[0]), int(hw[1]))
        if key not in seen:
            seen.add(key)
            points.append((label, *key))
    return points


def _step_inputs(descriptor: StepDescriptor, batch: int, h: int, w: int, t: int, coef: np.ndarray,
                 alpha_bar: float, seed: int) -> dict[str, np.ndarray]:
    """Inputs of one step at a shape: the verification image as cond (its channels repeated to
    the descriptor's cond width), x_t = sqrt(alpha_bar) x + sqrt(1 - alpha_bar) noise as at t."""
    from rd_export.verify import verification_cond
    from runtime.schedule import initial_noise

    d = descriptor
    shapes = spec_shapes(d, batch, h, w)
    image = verification_cond(batch, h, w, seed)
    reps = -(-shapes[d.COND][1] // image.shape[1])
    cond = np.ascontiguousarray(np.concatenate([image] * reps, axis=1)[:, : shapes[d.COND][1]])
    base = np.concatenate([image] * (-(-shapes[d.X][1] // image.shape[1])), axis=1)[:, : shapes[d.X][1]]
    x_t = (math.sqrt(alpha_bar) * base + math.sqrt(1.0 - alpha_bar) * initial_noise(shapes[d.X], seed)).astype(
        np.float32)
    return {d.X: x_t, d.COND: cond, d.T: np.full(shapes[d.T], float(t), np.float32),
            d.COEF: np.ascontiguousarray(np.broadcast_to(coef.astype(np.float32), shapes[d.COEF]))}


def verify_engine(plan: bytes, onnx_path: str | os.PathLike, descriptor: StepDescriptor, *, steps: int = 10,
                  seed: int = 0, schedule: dict | None = None, device: int = 0,
                  allow_host_code: bool = False, prologue: tuple[bytes, Path] | None = None) -> dict:
    """Engine vs its ONNX (onnxruntime CPU): the DDIM loop at the profile's minimum, single
    steps at high / middle / low t at its optimum and maximum. Raises VerificationError naming
    the shape and the number that failed; returns the report (with ``profile_points``).

    ``prologue`` = (prologue plan, prologue ONNX) of a predict-and-refine artifact: the DDIM loop
    then runs on each side's own prologue (both engines against both ONNX graphs), and the
    prologue engine is compared with its ONNX at the profile's min, opt and max shapes too.
    """
    from rd_export.verify import OnnxPrologue, OnnxStep, check_report, compare_onnx
    from runtime.schedule import DDIMSchedule, ScheduleConfig

    sched = DDIMSchedule(ScheduleConfig.from_dict(schedule) if schedule else ScheduleConfig())
    sched.set_timesteps(steps)
    d = descriptor
    step = EngineStep(plan, d, device=device, allow_host_code=allow_host_code)
    pro_engine = EnginePrologue(prologue[0], device=device, allow_host_code=allow_host_code) if prologue else None
    try:
        reference = OnnxStep(onnx_path)
        pro_ref = OnnxPrologue(prologue[1]) if prologue else None
        h, w = d.profile.min_size
        report = compare_onnx(step, reference, steps=steps, seed=seed, size=(int(h), int(w)),
                              batch=d.profile.min_batch, schedule_config=sched.config, reference_prologue=pro_ref,
                              candidate_prologue=pro_engine)
        pro_points = _prologue_points(pro_engine, pro_ref, d, seed) if pro_engine is not None else []
        points = _profile_step_points(step, reference, d, sched, seed)
    finally:
        step.close()
        if pro_engine is not None:
            pro_engine.close()
    report["reference"] = "onnx"
    report["profile_points"] = points
    if pro_points:
        report["prologue_points"] = pro_points
    problems = _point_problems(pro_points, points)
    try:
        checked = check_report(report, min_psnr_db=ENGINE_MIN_PSNR_DB, max_step_abs=None, what="TensorRT engine")
    except VerificationError as e:
        raise VerificationError("; ".join([str(e), *problems])) from None
    if problems:
        raise VerificationError("TensorRT engine failed verification: " + "; ".join(problems))
    return checked


def _prologue_points(engine: EnginePrologue, reference, d: StepDescriptor, seed: int) -> list[dict]:
    """The prologue engine vs its ONNX on the verification image at the profile's min, opt and max."""
    from rd_export.verify import verification_cond

    points = []
    for k, (label, b, ph, pw) in enumerate([("min", d.profile.min_batch, *d.profile.min_size), *_profile_points(d)]):
        y = verification_cond(b, ph, pw, seed + 211 + k)
        got, want = engine(y), reference(y)
        points.append({"at": label, "shape": list(y.shape), "psnr_db": _step_psnr(got, want),
                       "finite": bool(np.isfinite(got).all())})
    return points


def _profile_step_points(step: EngineStep, reference, d: StepDescriptor, sched, seed: int) -> list[dict]:
    """Single steps at high / middle / low t, engine vs ONNX, at the profile's optimum and maximum."""
    from rd_export.verify import step_points

    timesteps, coefs = sched.timesteps, sched.coefficients()
    points = []
    for k, (label, b, ph, pw) in enumerate(_profile_points(d)):
        rows = []
        for i, at in sorted({i: at for at, i in reversed(step_points(len(timesteps)).items())}.items()):
            t = int(timesteps[i])
            feeds = _step_inputs(d, b, ph, pw, t, coefs[i], float(sched.alpha_bar[t]), seed + 101 + k)
            got = step(feeds[d.X], feeds[d.COND], feeds[d.T], feeds[d.COEF])
            want = reference(feeds[d.X], feeds[d.COND], feeds[d.T], feeds[d.COEF])
            rows.append({"at": at, "t": t, "psnr_db": _step_psnr(got, want), "finite": bool(np.isfinite(got).all()),
                         "max_abs": float(np.abs(got.astype(np.float64) - want).max())
                         if np.isfinite(got).all() else float("inf")})
        points.append({"at": label, "shape": list(spec_shapes(d, b, ph, pw)[d.X]), "steps": rows,
                       "psnr_db": min(r["psnr_db"] for r in rows), "finite": all(r["finite"] for r in rows)})
    return points


def _point_problems(pro_points: list[dict], points: list[dict]) -> list[str]:
    """What fails ``ENGINE_MIN_PSNR_DB`` or is not finite, naming the shape (and t)."""
    problems = []
    for p in pro_points:
        shape = "x".join(str(v) for v in p["shape"])
        if not p["finite"]:
            problems.append(f"prologue NaN/Inf at the profile's {p['at']} shape {shape}")
        elif not p["psnr_db"] >= ENGINE_MIN_PSNR_DB:
            problems.append(f"prologue PSNR {p['psnr_db']:.2f} dB < {ENGINE_MIN_PSNR_DB:g} dB at the profile's "
                            f"{p['at']} shape {shape}")
    for p in points:
        shape = "x".join(str(v) for v in p["shape"])
        for r in p["steps"]:
            if not r["finite"]:
                problems.append(f"NaN/Inf at the profile's {p['at']} shape {shape}, t={r['t']}")
            elif not r["psnr_db"] >= ENGINE_MIN_PSNR_DB:
                problems.append(f"step PSNR {r['psnr_db']:.2f} dB < {ENGINE_MIN_PSNR_DB:g} dB at the profile's "
                                f"{p['at']} shape {shape}, t={r['t']}")
    return problems


__all__ += ["CudaError", "resolve_profile"]
