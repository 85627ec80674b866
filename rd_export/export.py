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

from rd_export.graph import check_model, check_signature
from rd_export.precision import get_precision, onnx_name
from rd_export.simplify import SIMPLIFY_DEFAULT, simplify_model
from rd_export.verify import check_report, compare_to_torch
from runtime import __version__ as toolkit_version
from runtime.descriptor import ShapeProfile, StepDescriptor
from runtime.errors import ArtifactError, UsageError
from runtime.io import atomic_path
from runtime.manifest import Manifest, manifest_path_for, sha256_file
from runtime.schedule import MIN_STEPS, steps_error

__all__ = ["export_onnx", "export_estimator_onnx", "verify_onnx", "make_descriptor", "verification_size",
           "extra_shapes", "name_nodes"]

Progress = Callable[[str], None]


def _quiet(msg: str) -> None:
    pass


def make_descriptor(size_multiple: int, profile: ShapeProfile | None = None, opset: int = 17) -> StepDescriptor:
    """The step descriptor; a profile that does not fit the model is a UsageError naming the sizes."""
    profile = profile or ShapeProfile()
    if opset < 17:
        raise UsageError(f"opset {opset} is too old; the fused step needs opset >= 17")
    try:
        profile.validate(size_multiple)
    except ValueError as e:
        raise UsageError(f"{e} (the model's size multiple is {size_multiple})") from None
    return StepDescriptor(size_multiple=size_multiple, profile=profile, opset=opset)


def verification_size(descriptor: StepDescriptor) -> tuple[int, int]:
    """The frame size verification runs at: the profile's minimum (cheap on a CPU)."""
    h, w = descriptor.profile.min_size
    return int(h), int(w)


def extra_shapes(descriptor: StepDescriptor) -> list[tuple[int, int, int]]:
    """One batch-2, non-square shape, so verification exercises every dynamic axis."""
    h, w = verification_size(descriptor)
    return [(2, h, w + descriptor.size_multiple)]


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
    args = (torch.zeros(n, descriptor.channels, h, w), torch.zeros(n, descriptor.channels, h, w),
            torch.full((n,), 500.0), torch.tensor([[1.0, 0.5, 1.0, 0.0]] * n))
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(FusedStep(estimator), args, buf, input_names=descriptor.input_names,
                          output_names=descriptor.output_names, dynamic_axes=descriptor.dynamic_axes(),
                          opset_version=descriptor.opset, dynamo=False, do_constant_folding=True)
    model = name_nodes(onnx.load_from_string(buf.getvalue()))
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


def verify_onnx(onnx_path: str | os.PathLike, estimator, descriptor: StepDescriptor, *, steps: int = 10,
                seed: int = 0, schedule_config=None, precision: str = "fp32") -> dict:
    """Verify an ONNX step against the torch estimator; raises VerificationError, returns the numbers."""
    spec = get_precision(precision)
    report = compare_to_torch(onnx_path, estimator, steps=steps, seed=seed, size=verification_size(descriptor),
                              schedule_config=schedule_config, extra_shapes=extra_shapes(descriptor))
    min_psnr = spec.min_psnr_db
    max_abs = spec.max_step_abs
    if spec.reference != "torch":  # e.g. FP16 checked straight against torch by `rd-export verify`
        max_abs = None
    return check_report(report, min_psnr_db=min_psnr, max_step_abs=max_abs, what=f"{Path(onnx_path).name}")


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def export_onnx(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, model: str = "derain",
                name: str = "model", steps: int = 10, profile: ShapeProfile | None = None, opset: int = 17,
                seed: int = 0, simplify: bool = SIMPLIFY_DEFAULT, progress: Progress = _quiet) -> Path:
    """Export the EMA estimator of ``checkpoint`` as ``out_dir/<name>.onnx`` + ``<name>.json``, verified.

    Raises CheckpointError (bad checkpoint), UsageError (bad profile / options),
    VerificationError (does not match torch: nothing is written).
    """
    from training.checkpoint import build_estimator, load_checkpoint, model_configs

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
    descriptor = make_descriptor(estimator.size_multiple, profile, opset)

    out_dir = Path(out_dir)
    dest = out_dir / onnx_name(name, "fp32")
    progress(f"exporting fused DDIM step ({model}, opset {opset}) -> {dest.name}")
    with atomic_path(dest) as tmp:
        export_estimator_onnx(estimator, tmp, descriptor, simplify=simplify)
        h, w = verification_size(descriptor)
        progress(f"verifying {dest.name} against torch ({steps} steps, {h}x{w})")
        report = verify_onnx(tmp, estimator, descriptor, steps=steps, seed=seed, schedule_config=schedule)
        import onnxruntime
        import torch

        report.update(provider="CPUExecutionProvider", onnxruntime=onnxruntime.__version__)
        manifest = Manifest(
            artifact=dest.name, format="onnx", precision="fp32", model=model, sha256=sha256_file(tmp),
            descriptor=descriptor.to_dict(),
            schedule={"num_train_timesteps": schedule.num_train_timesteps, "beta_start": schedule.beta_start,
                      "beta_end": schedule.beta_end, "default_steps": steps},
            model_config=estimator.config.to_dict(), toolkit_version=toolkit_version,
            extra={
                "source": {"checkpoint": checkpoint.name, "checkpoint_sha256": sha256_file(checkpoint),
                           "checkpoint_step": int(ckpt.get("step", 0) or 0),
                           "estimator": "ema_B" if model == "rain" else "ema_A"},
                "verification": report,
                "export": {"opset": opset, "simplified": bool(simplify), "exporter": "torch.onnx (dynamo=False)",
                           "torch": torch.__version__, "onnx": onnx.__version__},
                "created": _now(),
            },
        )
    # the ONNX is in place and verified; the manifest makes it an artifact
    return manifest.publish(dest)


def load_onnx_manifest(onnx_path: str | os.PathLike) -> Manifest:
    """The manifest of an ONNX artifact, hash-checked (ArtifactError/ManifestError otherwise)."""
    onnx_path = Path(onnx_path)
    manifest = Manifest.for_artifact(onnx_path)
    if manifest.format != "onnx":
        raise ArtifactError(f"{manifest_path_for(onnx_path)}: describes a {manifest.format} artifact, not ONNX")
    if manifest.artifact != onnx_path.name:
        raise ArtifactError(f"{manifest_path_for(onnx_path)}: describes '{manifest.artifact}', not '{onnx_path.name}'")
    manifest.check_artifact_hash(onnx_path)
    return manifest


__all__.append("load_onnx_manifest")
