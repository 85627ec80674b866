"""Checkpoint -> verified FP32 ONNX of the fused DDIM step (torch; returns a Path: docs/ARCHITECTURE.md, convention 5).

The graph is ``training.multiscale.FusedStep`` of the EMA estimator of model A (derain, the
default) or B (rain): inputs ``x_t, cond, t, coef``, output ``x_next``, dynamic N/H/W, I/O from
``runtime.descriptor.StepDescriptor``. The artifact is written beside a temporary name, checked
(onnx.checker, strict shape inference, signature), verified against the torch reference sampler
(``rd_export.verify.compare_to_torch``), and only then renamed into place and given its
manifest. A failure leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import onnx

from rd_export.graph import check_model, check_signature, inline_identity_initializers
from rd_export.precision import get_precision, onnx_name
from rd_export.simplify import SIMPLIFY_DEFAULT, simplify_model
from rd_export.verify import check_report, compare_to_torch
from runtime import __version__ as toolkit_version
from runtime.descriptor import PrologueDescriptor, ShapeProfile, StepDescriptor
from runtime.errors import UsageError
from runtime.io import atomic_path
from runtime.manifest import SAMPLING_SETTINGS, Manifest, prologue_name, sha256_file
from runtime.schedule import MIN_STEPS, steps_error

__all__ = ["export_onnx", "export_estimator_onnx", "export_prologue_onnx", "verify_onnx", "make_descriptor",
           "native_profile", "native_tile", "prologue_name", "profile_points", "verification_size", "extra_shapes",
           "name_nodes"]

Progress = Callable[[str], None]


def _quiet(msg: str) -> None:
    pass


def make_descriptor(size_multiple: int, profile: ShapeProfile | None = None, opset: int = 17, *,
                    cond_channels: int = 3) -> StepDescriptor:
    """The step descriptor; a profile that does not fit the model is a UsageError naming the sizes."""
    profile = profile or ShapeProfile()
    if opset < 17:
        raise UsageError(f"opset {opset} is too old; the fused step needs opset >= 17")
    try:
        profile.validate(size_multiple)
    except ValueError as e:
        raise UsageError(f"{e} (the model's size multiple is {size_multiple})") from None
    return StepDescriptor(size_multiple=size_multiple, profile=profile, opset=opset, cond_channels=cond_channels)


def native_profile(size_multiple: int, native: int) -> ShapeProfile:
    """The default profile of an export: the runtime tiles every frame larger than the model's
    native tile (its training crop), so an engine sees frames and tiles of at most ``native``,
    batched (tiles of one frame go through together: batch 1..8, 4 at best). A user's larger
    ``tile=`` needs an engine built with ``--max-size``."""
    native = max(size_multiple, -(-native // size_multiple) * size_multiple)
    lo = max(size_multiple, (native // 2 // size_multiple) * size_multiple)
    return ShapeProfile(min_batch=1, opt_batch=4, max_batch=8, min_size=(lo, lo), opt_size=(native, native),
                        max_size=(native, native))





def verification_size(descriptor: StepDescriptor) -> tuple[int, int]:
    """The frame size verification runs at: the profile's minimum (cheap on a CPU)."""
    h, w = descriptor.profile.min_size
    return int(h), int(w)


def extra_shapes(descriptor: StepDescriptor) -> list[tuple[int, int, int]]:
    """One batch-2, non-square shape, so verification exercises every dynamic axis."""
    h, w = verification_size(descriptor)
    return [(2, h, w + descriptor.size_multiple)]


def profile_points(descriptor: StepDescriptor) -> list[tuple[int, int, int]]:
    """The profile's opt and max (batch, H, W) points, where they differ from the minimum."""
    points = descriptor.profile.points()
    return [points[k] for k in ("opt", "max") if points[k] != points["min"]]


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every node a unique name (FP16 islands and TensorRT errors refer to nodes by name)."""
    seen: set[str] = set()
    for i, n in enumerate(model.graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.name or n.op_type}__{i}"
        seen.add(n.name)
    return model


def export_estimator_onnx(estimator, dest: str | os.PathLike, descriptor: StepDescriptor, *,
                          simplify: bool = SIMPLIFY_DEFAULT) -> Path:
    """Trace ``FusedStep(estimator)`` to ``dest`` (not verified; :func:`export_onnx` verifies).

    Uses the TorchScript exporter (``dynamo=False``) with the descriptor's names and dynamic axes;
    checked with onnx.checker and strict shape inference before returning.
    """
    import torch

    from training.multiscale import FusedStep

    estimator = estimator.eval()
    m = descriptor.size_multiple
    h, w = max(m, verification_size(descriptor)[0]), max(m, verification_size(descriptor)[1])
    n = 1
    args = (torch.zeros(n, descriptor.channels, h, w), torch.zeros(n, descriptor.cond_channels, h, w),
            torch.full((n,), 500.0), torch.tensor([[1.0, 0.5, 1.0, 0.0]] * n))
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(FusedStep(estimator), args, buf, input_names=descriptor.input_names,
                          output_names=descriptor.output_names, dynamic_axes=descriptor.dynamic_axes(),
                          opset_version=descriptor.opset, dynamo=False, do_constant_folding=True)
    return _finish(buf.getvalue(), dest, descriptor, simplify=simplify)


def _finish(blob: bytes, dest: str | os.PathLike, descriptor, *, simplify: bool) -> Path:
    """Name the nodes, simplify, check the graph and its signature, write ``dest``."""
    model = name_nodes(inline_identity_initializers(onnx.load_from_string(blob)))
    model.producer_name = "raindiffusion-edge rd_export"
    model.producer_version = toolkit_version
    if simplify:
        model = name_nodes(simplify_model(model))
    check_model(model, min_opset=17, where=str(dest))
    check_signature(model, descriptor, where=str(dest))
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dest))
    return dest


def export_prologue_onnx(prologue, dest: str | os.PathLike, descriptor: PrologueDescriptor, *,
                         simplify: bool = SIMPLIFY_DEFAULT) -> Path:
    """Trace the predict-and-refine ``Prologue`` (rainy -> cond = [y, P(y)]) to ``dest`` (not verified).

    Its GroupNorms are traced as reductions (:func:`rd_export.groupnorm.reduced_groupnorm`: the same
    function, faster in onnxruntime on whole frames); verification compares with ``prologue`` itself.
    """
    import torch

    from rd_export.groupnorm import reduced_groupnorm

    h, w = verification_size(descriptor)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(reduced_groupnorm(prologue.eval()), (torch.zeros(1, descriptor.channels, h, w),), buf,
                          input_names=descriptor.input_names, output_names=descriptor.output_names,
                          dynamic_axes=descriptor.dynamic_axes(), opset_version=descriptor.opset, dynamo=False,
                          do_constant_folding=True)
    return _finish(buf.getvalue(), dest, descriptor, simplify=simplify)


def verify_onnx(onnx_path: str | os.PathLike, estimator, descriptor: StepDescriptor, *, steps: int = 10,
                seed: int = 0, schedule_config=None, precision: str = "fp32", prologue=None,
                prologue_path: str | os.PathLike | None = None) -> dict:
    """Verify an ONNX step (and its prologue) against the torch modules; raises VerificationError,
    returns the numbers. Runs at the profile's minimum, plus its opt and max shapes
    (:func:`profile_points`) so kernels chosen for large shapes are checked too."""
    from rd_export.verify import OnnxPrologue

    spec = get_precision(precision)
    candidate_pro = OnnxPrologue(prologue_path) if prologue_path is not None else None
    report = compare_to_torch(onnx_path, estimator, steps=steps, seed=seed, size=verification_size(descriptor),
                              schedule_config=schedule_config,
                              extra_shapes=extra_shapes(descriptor) + profile_points(descriptor),
                              prologue=prologue, prologue_candidate=candidate_pro)
    min_psnr = spec.min_psnr_db
    max_abs = spec.max_step_abs
    if spec.reference != "torch":  # e.g. FP16 checked straight against torch by `rd-export verify`
        max_abs = None
    return check_report(report, min_psnr_db=min_psnr, max_step_abs=max_abs, what=f"{Path(onnx_path).name}")


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def export_onnx(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, model: str = "derain",
                name: str = "model", steps: int = 10,
                profile: ShapeProfile | Callable[[ShapeProfile], ShapeProfile] | None = None, opset: int = 17,
                seed: int = 0, simplify: bool = SIMPLIFY_DEFAULT, progress: Progress = _quiet,
                default_steps: int | None = None, refine_strength: float | None = None,
                noise_scale: float | None = None, refine_lowpass: float | None = None) -> Path:
    """Export the EMA estimator of ``checkpoint`` as ``out_dir/<name>.onnx`` + ``<name>.json``, verified.

    ``steps``: the DDIM steps verification runs (and the manifest's ``default_steps`` unless
    ``default_steps`` is given; 0 there = the predictor alone, predict-and-refine models only).
    ``refine_strength``: the share of the refiner's correction the runtime keeps, stored as the
    manifest's ``prologue.refine_strength`` (predict-and-refine models only; None: not stored, 1).
    ``noise_scale``: the runtime's x_T = s * N(0, I), stored as ``prologue.noise_scale`` (likewise;
    None: not stored, 1). Verification runs with s = 1 either way: the graphs do not depend on it.
    ``refine_lowpass``: the Gaussian sigma of the kept correction (:mod:`runtime.lowpass`), stored as
    ``prologue.refine_lowpass`` (likewise; None: not stored, 0 = off); no graph depends on it.
    ``profile``: the engine shape profile; None = :func:`native_profile` of the checkpoint's training
    crop; a callable gets that native profile and returns the one to use (the CLI's size options).
    Raises CheckpointError (bad checkpoint), UsageError (bad profile / options),
    VerificationError (does not match torch: nothing is written).
    """
    from training.checkpoint import build_estimator, build_prologue, load_checkpoint, model_configs

    if model not in ("derain", "rain"):
        raise UsageError(f"model must be 'derain' or 'rain', got {model!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < MIN_STEPS:
        raise UsageError(steps_error(steps))
    checkpoint = Path(checkpoint)
    progress(f"loading checkpoint {checkpoint.name}")
    ckpt = load_checkpoint(checkpoint)
    estimator = build_estimator(ckpt, model=model, ema=True)
    schedule = model_configs(ckpt).schedule
    if steps > schedule.num_train_timesteps:
        raise UsageError(f"steps {steps} exceeds the schedule's T = {schedule.num_train_timesteps}")
    refines = estimator.config.refines
    if default_steps is not None and not (default_steps == 0 and refines) and not (
            isinstance(default_steps, int) and MIN_STEPS <= default_steps <= schedule.num_train_timesteps):
        raise UsageError(f"default steps: {steps_error(default_steps, schedule.num_train_timesteps)}"
                         + ("" if refines else " (0 needs a predict-and-refine model)"))
    # the sampling settings stored in the manifest: what a y-only checkpoint lacks for each, its label
    settings = {"refine_strength": (refine_strength, "refine strength", "has a refiner to weigh"),
                "noise_scale": (noise_scale, "noise scale", "stores one (a y-only model samples from x_T ~ "
                                                            "N(0, I), as Algorithm 2)"),
                "refine_lowpass": (refine_lowpass, "refine low-pass", "has a correction to filter")}
    for key, (value, label, lacks) in settings.items():
        if value is None:
            continue
        if not refines:
            raise UsageError(f"{label}: only a predict-and-refine checkpoint {lacks}")
        if why := SAMPLING_SETTINGS[key][1](value):
            raise UsageError(f"{label} {why}")
    if refines and model != "derain":
        raise UsageError("a predict-and-refine checkpoint exports its derain model (the rain model's estimate "
                         "comes from G_A, which has no prologue graph yet)")
    prologue = build_prologue(ckpt) if refines else None
    native = native_tile(ckpt)
    if profile is None or callable(profile):  # the native profile, or options applied on top of it
        base = native_profile(estimator.size_multiple, native)
        profile = base if profile is None else profile(base)
    descriptor = make_descriptor(estimator.size_multiple, profile, opset,
                                 cond_channels=estimator.config.cond_channels)

    out_dir = Path(out_dir)
    dest = out_dir / onnx_name(name, "fp32")
    pro_dest = dest.with_name(prologue_name(dest.name)) if refines else None
    progress(f"exporting fused DDIM step ({model}, opset {opset}) -> {dest.name}")
    with atomic_path(dest) as tmp, (atomic_path(pro_dest) if refines else contextlib.nullcontext()) as pro_tmp:
        export_estimator_onnx(estimator, tmp, descriptor, simplify=simplify)
        if refines:
            progress(f"exporting the prologue (y -> [y, P(y)]) -> {pro_dest.name}")
            export_prologue_onnx(prologue, pro_tmp, descriptor.prologue(), simplify=simplify)
        h, w = verification_size(descriptor)
        progress(f"verifying {dest.name}{' and ' + pro_dest.name if refines else ''} against torch "
                 f"({steps} steps, {h}x{w} and the profile's opt / max shapes)")
        report = verify_onnx(tmp, estimator, descriptor, steps=steps, seed=seed, schedule_config=schedule,
                             prologue=prologue, prologue_path=pro_tmp)
        import onnxruntime
        import torch

        report.update(provider="CPUExecutionProvider", onnxruntime=onnxruntime.__version__)
        extra_pro = ({"prologue": {"artifact": pro_dest.name, "sha256": sha256_file(pro_tmp), "precision": "fp32",
                                   "predictor_config": ckpt["config"]["ntb_unet"],
                                   **{key: float(value) for key, (value, _, _) in settings.items()
                                      if value is not None}}}
                     if refines else {})
        manifest = Manifest(
            artifact=dest.name, format="onnx", precision="fp32", model=model, sha256=sha256_file(tmp),
            descriptor=descriptor.to_dict(),
            schedule={**schedule.to_dict(), "default_steps": steps if default_steps is None else default_steps},
            model_config=estimator.config.to_dict(), toolkit_version=toolkit_version,
            extra={
                "source": {"checkpoint": checkpoint.name, "checkpoint_sha256": sha256_file(checkpoint),
                           "checkpoint_step": int(ckpt.get("step", 0) or 0),
                           "estimator": "ema_B" if model == "rain" else "ema_A"},
                "verification": report,
                "export": {"opset": opset, "simplified": bool(simplify), "exporter": "torch.onnx (dynamo=False)",
                           "torch": torch.__version__, "onnx": onnx.__version__,
                           **({"prologue_groupnorm": "reductions"} if refines else {})},
                "created": _now(),
                "native_tile": native,
                **extra_pro,
            },
        )
    # the ONNX files are in place and verified; the manifest makes them an artifact
    return manifest.publish(dest)


def native_tile(ckpt: dict) -> int:
    """The crop size the checkpoint was trained at: the model's native tile (the runtime tiles at
    it; the estimator does not generalise far beyond it). 128 when the checkpoint does not say."""
    crop = ((ckpt.get("config") or {}).get("train") or {}).get("crop", 128)
    return int(crop) if isinstance(crop, int) and not isinstance(crop, bool) and crop > 0 else 128
