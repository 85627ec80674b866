"""The stages behind ``rd-export build | inspect | verify``, as library functions.

``build`` chains the pure export steps (docs/ARCHITECTURE.md, code convention 5): checkpoint -> verified FP32 ONNX ->
derived precision (table-driven, rd_export.precision) -> TensorRT plan. Given an ONNX artifact
(with its manifest) it skips the export: the edge flow, which needs neither torch nor the
checkpoint. Progress goes through a callback; nothing here prints.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rd_export.precision import get_precision, onnx_name, plan_name
from rd_export.simplify import SIMPLIFY_DEFAULT
from runtime.descriptor import ShapeProfile
from runtime.errors import ArtifactError, InputError, UsageError, VerificationError
from runtime.manifest import SAMPLING_SETTINGS, Manifest, load_manifest, manifest_path_for

__all__ = ["BuildOptions", "BuiltArtifact", "BuildResult", "sniff", "build", "inspect_artifact", "reverify",
           "parse_size", "parse_batch"]

Progress = Callable[[str], None]

_MAGIC = [
    (b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"), (b"RIFF", "a RIFF (WebP/AVI) file"), (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive"), (b"{", "a JSON/text file"),
]


def sniff(path: str | os.PathLike) -> str:
    """"checkpoint" (torch zip) or "onnx"; InputError naming what the file looks like otherwise."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    if p.stat().st_size == 0:
        raise InputError(f"{p}: empty file (0 bytes)")
    with open(p, "rb") as f:
        head = f.read(16)
    if p.suffix == ".plan":
        raise UsageError(f"{p}: is already a TensorRT plan; `rd-export build` takes a checkpoint or an ONNX")
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80\x02"):  # torch zip / legacy pickle
        return "checkpoint"
    if p.suffix == ".onnx":
        return "onnx"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            raise InputError(f"{p}: is {what}, not a checkpoint (.pt) or ONNX model (.onnx)")
    if p.suffix in (".pt", ".pth", ".ckpt"):
        return "checkpoint"  # load_checkpoint names the problem precisely
    raise InputError(f"{p}: not a checkpoint (.pt, a torch zip archive) or an ONNX model (.onnx)")


def parse_size(text: str | None, what: str = "size") -> tuple[int, int] | None:
    """"256x192" (H x W) or "256" -> (256, 192) / (256, 256); UsageError otherwise."""
    if text is None:
        return None
    parts = str(text).lower().replace("*", "x").split("x")
    try:
        vals = [int(v) for v in parts]
    except ValueError:
        raise UsageError(f"{what} {text!r} is not HxW (e.g. 256x256) or a single number") from None
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or min(vals) < 1:
        raise UsageError(f"{what} {text!r} is not HxW with positive sides")
    return vals[0], vals[1]


def parse_batch(text: str | None) -> tuple[int, int, int] | None:
    """"1..4" -> (1, 1, 4); "1..2..4" -> (1, 2, 4); "2" -> (2, 2, 2)."""
    if text is None:
        return None
    try:
        vals = [int(v) for v in str(text).split("..")]
    except ValueError:
        raise UsageError(f"batch {text!r} is not N, MIN..MAX or MIN..OPT..MAX") from None
    if len(vals) == 1:
        vals = vals * 3
    elif len(vals) == 2:
        vals = [vals[0], vals[0], vals[1]]
    if len(vals) != 3 or not 1 <= vals[0] <= vals[1] <= vals[2]:
        raise UsageError(f"batch {text!r} must satisfy 1 <= min <= opt <= max")
    return vals[0], vals[1], vals[2]


@dataclass
class BuildOptions:
    precision: str | None = None  # None: fp32 for checkpoints, the ONNX's own for ONNX input
    fmt: str | None = None  # onnx | trt | all; None: all for checkpoints, trt for ONNX input
    model: str | None = None  # derain | rain; None: derain (checkpoint) / the manifest's (ONNX)
    steps: int | None = None
    default_steps: int | None = None  # the manifest's default (export only); None = steps
    refine_strength: float | None = None  # the manifest's prologue.refine_strength (export only); None = 1
    noise_scale: float | None = None  # the manifest's prologue.noise_scale (export only); None = 1
    refine_lowpass: float | None = None  # the manifest's prologue.refine_lowpass (export only); None = 0
    name: str = "model"
    min_size: tuple[int, int] | None = None
    opt_size: tuple[int, int] | None = None
    max_size: tuple[int, int] | None = None
    batch: tuple[int, int, int] | None = None
    seed: int = 0
    simplify: bool = SIMPLIFY_DEFAULT
    workspace: int | None = None
    opt_level: int | None = None
    timing_cache: Path | None = None
    version_compatible: bool = False  # TensorRT BuilderFlag.VERSION_COMPATIBLE (runs on later releases)
    #: extra options of a precision's derive() (e.g. {"calib": Path} for INT8)
    options: dict = field(default_factory=dict)

    def profile(self, base: ShapeProfile | None = None) -> ShapeProfile:
        base = base or ShapeProfile()
        b = self.batch or (base.min_batch, base.opt_batch, base.max_batch)
        return ShapeProfile(min_batch=b[0], opt_batch=b[1], max_batch=b[2],
                            min_size=self.min_size or base.min_size, opt_size=self.opt_size or base.opt_size,
                            max_size=self.max_size or base.max_size)


@dataclass
class BuiltArtifact:
    path: Path
    format: str
    precision: str
    size_bytes: int
    psnr_db: float | None
    reference: str | None
    manifest: Path

    @classmethod
    def from_path(cls, path: Path) -> BuiltArtifact:
        m = Manifest.for_artifact(path)
        v = m.get("verification") or {}
        return cls(path=path, format=m.format, precision=m.precision, size_bytes=path.stat().st_size,
                   psnr_db=v.get("psnr_db"), reference=v.get("reference"), manifest=manifest_path_for(path))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"], d["manifest"] = str(self.path), str(self.manifest)
        return d


@dataclass
class BuildResult:
    artifacts: list[BuiltArtifact] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"artifacts": [a.to_dict() for a in self.artifacts], "notes": list(self.notes)}


def _quiet(msg: str) -> None:
    pass


def build(source: str | os.PathLike, out_dir: str | os.PathLike | None = None, options: BuildOptions | None = None,
          *, progress: Progress = _quiet) -> BuildResult:
    """Run the requested stages; returns what was written (each artifact verified + manifest)."""
    opts = options or BuildOptions()
    source = Path(source)
    kind = sniff(source)
    out = Path(out_dir) if out_dir is not None else source.parent
    fmt = opts.fmt or ("all" if kind == "checkpoint" else "trt")
    if fmt not in ("onnx", "trt", "all"):
        raise UsageError(f"format must be onnx, trt or all, got {fmt!r}")
    if opts.version_compatible and fmt == "onnx":
        raise UsageError("--version-compatible applies to TensorRT plans; use --format trt or all")
    if opts.model not in (None, "derain", "rain"):
        raise UsageError(f"model must be derain or rain, got {opts.model!r}")
    result = BuildResult()

    if kind == "checkpoint":
        precision = opts.precision or "fp32"
        spec = get_precision(precision)
        _check_requires(spec, opts)
        from rd_export.export import export_onnx  # torch lives behind this import

        progress("stage 1/3 export: checkpoint -> FP32 ONNX")
        base = export_onnx(source, out, model=opts.model or "derain", name=opts.name, steps=opts.steps or 10,
                           default_steps=opts.default_steps, refine_strength=opts.refine_strength,
                           noise_scale=opts.noise_scale, refine_lowpass=opts.refine_lowpass,
                           profile=opts.profile, seed=opts.seed, simplify=opts.simplify, progress=progress)
        result.artifacts.append(BuiltArtifact.from_path(base))
    else:
        src_manifest = load_manifest(source, "onnx")
        for name in ("default_steps", *SAMPLING_SETTINGS):  # the manifest's own, written by the export
            if getattr(opts, name) is not None:
                raise UsageError(f"--{name.replace('_', '-')} is set when exporting a checkpoint; an ONNX keeps "
                                 f"its manifest's")
        if opts.model and opts.model != src_manifest.model:
            raise UsageError(f"{source.name} holds the {src_manifest.model} model; --model {opts.model} "
                             f"needs an export from the checkpoint")
        precision = opts.precision or src_manifest.precision
        spec = get_precision(precision)
        if src_manifest.precision not in (precision, "fp32"):
            raise UsageError(f"{source.name} is {src_manifest.precision}; {precision} is derived from the FP32 ONNX")
        _check_requires(spec, opts)
        base = source
        progress(f"stage 1/3 export: skipped ({source.name} is a verified {src_manifest.precision} ONNX)")

    target = base
    base_precision = Manifest.for_artifact(base).precision
    if precision != base_precision:
        progress(f"stage 2/3 precision: FP32 ONNX -> {precision.upper()} ONNX")
        stem = base.name.removesuffix(".onnx")
        dest = out / onnx_name(stem, precision)
        extra = {k: opts.options[k] for k in (*spec.requires, *spec.accepts) if opts.options.get(k) is not None}
        target = spec.derive_fn()(base, out=dest, steps=opts.steps, seed=opts.seed, progress=progress, **extra)
        result.artifacts.append(BuiltArtifact.from_path(target))
    else:
        progress(f"stage 2/3 precision: {precision} (nothing to derive)")

    if fmt in ("trt", "all"):
        from rd_export.tensorrt import INSTALL_HINT, build_engine, tensorrt_available

        if not tensorrt_available():
            if fmt == "trt":
                from runtime.errors import DependencyError

                raise DependencyError(INSTALL_HINT)
            result.notes.append(f"TensorRT engine skipped: {INSTALL_HINT}")
            progress("stage 3/3 engine: skipped (TensorRT not installed)")
            return result
        progress(f"stage 3/3 engine: {target.name} -> {plan_name(target)}")
        kwargs = {k: v for k, v in (("workspace", opts.workspace), ("opt_level", opts.opt_level)) if v is not None}
        plan = build_engine(target, out=out / plan_name(target), min_size=opts.min_size, opt_size=opts.opt_size,
                            max_size=opts.max_size, batch=opts.batch, timing_cache=opts.timing_cache,
                            version_compatible=opts.version_compatible, steps=opts.steps, seed=opts.seed,
                            progress=progress, **kwargs)
        result.artifacts.append(BuiltArtifact.from_path(plan))
    return result


#: BuildOptions.options keys -> the rd-export build flag that sets each (for error messages).
OPTION_FLAGS = {"calib": "--calib", "calib_images": "--calib-images", "method": "--calib-method",
                "target_psnr_db": "--calib-target-psnr", "max_fp32_layers": "--calib-max-fp32"}


def _flag(key: str) -> str:
    return OPTION_FLAGS.get(key, "--" + key.replace("_", "-"))


def _check_requires(spec, opts: BuildOptions) -> None:
    missing = [r for r in spec.requires if opts.options.get(r) is None]
    if missing:
        raise UsageError(f"precision {spec.name} needs {' '.join(_flag(k) for k in missing)}")
    unused = [k for k, v in opts.options.items()
              if v is not None and k not in spec.requires and k not in spec.accepts]
    if unused:
        raise UsageError(f"{' '.join(_flag(k) for k in unused)} is not used by precision {spec.name}")


# --------------------------------------------------------------------------- inspect
def inspect_artifact(path: str | os.PathLike) -> dict:
    """Manifest (hash-checked) and I/O signature of an ONNX or plan artifact."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    info: dict = {"artifact": str(path), "size_bytes": path.stat().st_size}
    manifest = None
    try:
        manifest = Manifest.for_artifact(path)
        info["manifest"] = manifest.to_dict()
        try:
            manifest.check_artifact_hash(path)
            info["hash_ok"] = True
        except ArtifactError as e:
            info["hash_ok"] = False
            info["hash_error"] = str(e)
    except ArtifactError as e:
        info["manifest"] = None
        info["manifest_error"] = str(e)
    if path.suffix == ".onnx":
        from rd_export.graph import io_signature, load_model

        model = load_model(path)
        info["io"] = io_signature(model)
        info["opset"] = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
        info["nodes"] = len(model.graph.node)
    elif manifest is not None:
        d = manifest.descriptor
        info["io"] = {"inputs": d.get("inputs", []), "outputs": d.get("outputs", [])}
    else:
        raise ArtifactError(f"{path}: neither an .onnx file nor an artifact with a manifest")
    return info


# --------------------------------------------------------------------------- verify
def reverify(artifact: str | os.PathLike, checkpoint: str | os.PathLike, *, steps: int | None = None,
             seed: int = 0, progress: Progress = _quiet) -> tuple[dict, VerificationError | None]:
    """Re-run verification of an ONNX (or, with TensorRT, a plan) against a checkpoint's torch model.

    Returns (report, error): the numbers are returned even when verification fails.
    """
    from rd_export.export import extra_shapes, verification_size
    from rd_export.verify import check_report, compare_to_torch
    from runtime.manifest import sha256_file
    from training.checkpoint import build_estimator, build_prologue, load_checkpoint, model_configs

    artifact = Path(artifact)
    manifest = load_manifest(artifact)
    pro_path = manifest.prologue_path(artifact)  # a predict-and-refine artifact: hash-checked too
    progress(f"loading checkpoint {Path(checkpoint).name}")
    ckpt = load_checkpoint(checkpoint)
    estimator = build_estimator(ckpt, model=manifest.model, ema=True)
    schedule = model_configs(ckpt).schedule
    descriptor = manifest.step_descriptor
    if estimator.size_multiple != descriptor.size_multiple:
        raise UsageError(f"{Path(checkpoint).name} has size multiple {estimator.size_multiple}, the artifact "
                         f"{descriptor.size_multiple}: not the model this artifact was exported from")
    steps = steps or manifest.verify_steps
    spec = get_precision(manifest.precision)
    prologue = build_prologue(ckpt) if pro_path is not None else None
    if (prologue is None) != (pro_path is None):
        raise UsageError(f"{Path(checkpoint).name} and {artifact.name} disagree on the model's condition (one of "
                         f"them has a prologue): not the model this artifact was exported from")
    candidate = candidate_pro = None
    min_psnr, max_abs = spec.min_psnr_db, spec.max_step_abs if spec.reference == "torch" else None
    shapes = extra_shapes(descriptor)
    if manifest.format == "trt":
        from rd_export.tensorrt import ENGINE_MIN_PSNR_DB, EngineStep
        from runtime.backends.tensorrt import version_compatible

        candidate = EngineStep(artifact.read_bytes(), descriptor, allow_host_code=version_compatible(manifest))
        if pro_path is not None:
            from rd_export.tensorrt import EnginePrologue

            candidate_pro = EnginePrologue(pro_path.read_bytes(), allow_host_code=version_compatible(manifest))
        min_psnr, max_abs, shapes = ENGINE_MIN_PSNR_DB, None, []
    elif pro_path is not None:
        from rd_export.verify import OnnxPrologue

        candidate_pro = OnnxPrologue(pro_path)
    progress(f"verifying {artifact.name} against torch ({steps} steps)")
    try:
        report = compare_to_torch(artifact, estimator, steps=steps, seed=seed, size=verification_size(descriptor),
                                  schedule_config=schedule, extra_shapes=shapes, candidate=candidate,
                                  prologue=prologue, prologue_candidate=candidate_pro)
    finally:
        for c in (candidate, candidate_pro):
            if c is not None and hasattr(c, "close"):
                c.close()
    src = manifest.get("source") or {}
    report["checkpoint_matches_manifest"] = src.get("checkpoint_sha256") == sha256_file(checkpoint)
    try:
        report = check_report(report, min_psnr_db=min_psnr, max_step_abs=max_abs, what=artifact.name)
        return report, None
    except VerificationError as e:
        report = dict(report, passed=False, thresholds={"psnr_db": min_psnr, "per_step_max_abs": max_abs})
        return report, e

