"""``rd-export triton``: an artifact -> a Triton Inference Server model repository (docs/serving.md).

Two variants, chosen by the artifact (docs/ARCHITECTURE.md, code convention 5: one pure function that
returns the path):

GPU (a TensorRT ``.plan`` and its manifest), for NVIDIA's Triton container on a GPU box::

    REPO/derain/config.pbtxt              Python backend, dynamic batching, K CPU instances
    REPO/derain/1/model.py                the DDIM loop over the plans through BLS (rd_export/triton_models/bls.py)
    REPO/derain/1/derain.json             settings: tensor names, channels, profile, step tables, seed
    REPO/derain_step/config.pbtxt         tensorrt_plan, the fused step's I/O from runtime.descriptor
    REPO/derain_step/1/model.plan         the plan, raw (+ its manifest as model.json)
    REPO/derain_prologue/...              the prologue plan, for a predict-and-refine model

CPU (an ``.onnx`` and its manifest): one Python-backend model running ``runtime.Derainer`` on
onnxruntime (rd_export/triton_models/cpu.py); the bundled ``tritonserver`` of PyTriton loads it.

Both top models expose :mod:`runtime.serving.contract`, as ``rd-run serve`` does. The repository is
written into a temporary folder beside REPO and renamed into place when complete; an existing
non-empty REPO is replaced only with ``force``.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from runtime.backends import load_manifest
from runtime.descriptor import StepDescriptor, TensorSpec
from runtime.errors import ArtifactError, UsageError
from runtime.manifest import SAMPLING_SETTINGS, Manifest, manifest_path_for
from runtime.schedule import DDIMSchedule, ScheduleConfig
from runtime.serving import contract

__all__ = ["TritonOptions", "export_triton", "SETTINGS", "config_pbtxt"]

SETTINGS = "derain.json"  # the file name the model templates read
_TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "uint8": "TYPE_UINT8", "int32": "TYPE_INT32",
                 "int64": "TYPE_INT64"}


@dataclass(frozen=True)
class TritonOptions:
    """What the repository serves and how. None: the artifact's own default (steps: the manifest's;
    max_batch: the plan's max batch, 8 on CPU; threads: the cores shared out between instances)."""

    model_name: str = contract.MODEL_NAME
    steps: int | None = None
    seed: int = 0
    instances: int = 1
    gpu_instances: int = 1
    max_batch: int | None = None
    queue_delay_us: int = 2000
    max_pixels: int = contract.DEFAULT_MAX_PIXELS
    threads: int | None = None
    tile: int | None = None
    overlap: int | None = None

    def __post_init__(self) -> None:
        for name, lo in (("seed", 0), ("instances", 1), ("gpu_instances", 1), ("queue_delay_us", 0),
                         ("max_pixels", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise UsageError(f"{name} must be an integer >= {lo}, got {v!r}")
        for name in ("max_batch", "threads", "tile"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise UsageError(f"{name} must be a positive integer, got {v!r}")
        if not self.model_name or not all(c.isalnum() or c in "._-" for c in self.model_name):
            raise UsageError(f"model name {self.model_name!r}: use letters, digits, '.', '_' and '-' only")


# ---------------------------------------------------------------------- config.pbtxt
def _dims(spec: TensorSpec, *, batched: bool) -> str:
    shape = spec.shape[1:] if batched else spec.shape
    return "[ " + ", ".join("-1" if isinstance(d, str) else str(int(d)) for d in shape) + " ]"


def _tensor(spec: TensorSpec, *, batched: bool) -> str:
    try:
        dtype = _TRITON_TYPES[spec.dtype]
    except KeyError:
        raise ArtifactError(f"tensor {spec.name!r} has dtype {spec.dtype}, which this exporter cannot map "
                            f"to a Triton type") from None
    return f'  {{\n    name: "{spec.name}"\n    data_type: {dtype}\n    dims: {_dims(spec, batched=batched)}\n  }}'


def config_pbtxt(name: str, *, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], max_batch: int,
                 backend: str | None = None, platform: str | None = None, instances: int = 1,
                 kind: str = "KIND_CPU", queue_delay_us: int | None = None) -> str:
    """A model's ``config.pbtxt`` (Triton's ModelConfig in protobuf text format). ``max_batch`` 0:
    the shapes are given whole (the first axis is the graph's own); > 0: Triton's batch dimension
    is the first axis and dynamic batching (``queue_delay_us``) applies."""
    batched = max_batch > 0
    lines = [f'name: "{name}"']
    lines.append(f'platform: "{platform}"' if platform else f'backend: "{backend}"')
    lines.append(f"max_batch_size: {max_batch}")
    lines.append("input [\n" + ",\n".join(_tensor(s, batched=batched) for s in inputs) + "\n]")
    lines.append("output [\n" + ",\n".join(_tensor(s, batched=batched) for s in outputs) + "\n]")
    if batched and queue_delay_us is not None:
        lines.append(f"dynamic_batching {{\n  max_queue_delay_microseconds: {queue_delay_us}\n}}")
    lines.append(f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]")
    return "\n".join(lines) + "\n"


def _frame_specs() -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    dims = ("batch", "height", "width", contract.FRAME_CHANNELS)
    return ((TensorSpec(contract.INPUT, contract.FRAME_DTYPE, dims),),
            (TensorSpec(contract.OUTPUT, contract.FRAME_DTYPE, dims),))


# ---------------------------------------------------------------------- helpers
def _template(name: str) -> str:
    return importlib.resources.files("rd_export.triton_models").joinpath(f"{name}.py").read_text(encoding="utf-8")


def _schedule_tables(manifest: Manifest, steps: int | None, *, allow_zero: bool) -> tuple[int, list, list]:
    sched = manifest.schedule
    config = ScheduleConfig(num_train_timesteps=int(sched["num_train_timesteps"]),
                            beta_start=float(sched["beta_start"]), beta_end=float(sched["beta_end"]))
    steps = manifest.default_steps if steps is None else steps
    if allow_zero and steps == 0:
        return 0, [], []
    schedule = DDIMSchedule(config)
    try:
        schedule.set_timesteps(steps)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return int(steps), [int(t) for t in schedule.timesteps], schedule.coefficients().tolist()


def _source(artifact: Path, manifest: Manifest) -> dict:
    return {"artifact": artifact.name, "sha256": manifest.sha256, "format": manifest.format,
            "precision": manifest.precision, "model": manifest.model, "toolkit_version": manifest.toolkit_version,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _copy_artifact(artifact: Path, dest_dir: Path, name: str | None = None, *, manifest: bool = True) -> Path:
    """The artifact (and its manifest, renamed with it) into ``dest_dir``."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / (name or artifact.name)
    shutil.copyfile(artifact, dest)
    if manifest:
        shutil.copyfile(manifest_path_for(artifact), manifest_path_for(dest))
    return dest


def prologue_file(artifact: Path, manifest: Manifest) -> Path | None:
    """The prologue graph beside a predict-and-refine artifact (hash-checked where the manifest can), or None.

    The manifest's ``prologue`` entry names it (``{"artifact": file name beside the step, "sha256"}``).
    """
    find = getattr(manifest, "prologue_path", None)
    if callable(find):  # the manifest checks the file's hash itself
        return find(artifact)
    info = manifest.get("prologue")
    if info is None:
        return None
    name = info.get("artifact") if isinstance(info, dict) else None
    if not isinstance(name, str) or not name or "/" in name:
        raise ArtifactError(f"{manifest_path_for(artifact)}: field 'prologue.artifact' must name the prologue file")
    path = artifact.with_name(name)
    if not path.is_file():
        raise ArtifactError(f"{path}: the prologue graph of {artifact.name} is missing (an artifact of a "
                            f"predict-and-refine model is two files; copy both, and the manifest)")
    return path


def prologue_graph(artifact: Path, manifest: Manifest, descriptor: StepDescriptor) -> tuple[Path, object] | None:
    """The prologue plan of a predict-and-refine artifact and its descriptor, or None (a y-only model).

    The step's condition has more channels than its sample when a prologue makes it (the step
    descriptor's ``cond_channels``); the prologue's I/O contract is ``descriptor.prologue()``.
    """
    cond_channels = int(getattr(descriptor, "cond_channels", descriptor.channels))
    if cond_channels == descriptor.channels:
        return None
    path = prologue_file(artifact, manifest)
    if path is None:
        raise ArtifactError(f"{manifest_path_for(artifact)}: the step's condition has {cond_channels} channels (a "
                            f"predict-and-refine model) but the manifest names no prologue graph ('prologue')")
    return path, descriptor.prologue()


# ---------------------------------------------------------------------- the two variants
def _gpu_repository(root: Path, artifact: Path, manifest: Manifest, opts: TritonOptions) -> None:
    desc = manifest.step_descriptor
    prologue = prologue_graph(artifact, manifest, desc)
    steps, timesteps, coefficients = _schedule_tables(manifest, opts.steps, allow_zero=prologue is not None)
    name, step_name, prologue_name = opts.model_name, f"{opts.model_name}_step", f"{opts.model_name}_prologue"
    profile = desc.profile

    _write(root / step_name / "config.pbtxt",
           config_pbtxt(step_name, inputs=desc.inputs, outputs=desc.outputs, max_batch=0, platform="tensorrt_plan",
                        instances=opts.gpu_instances, kind="KIND_GPU"))
    _copy_artifact(artifact, root / step_name / "1", "model.plan")
    settings_prologue = None
    if prologue is not None:
        p_path, p_desc = prologue  # hash-checked against the step's manifest
        _write(root / prologue_name / "config.pbtxt",
               config_pbtxt(prologue_name, inputs=p_desc.inputs, outputs=p_desc.outputs, max_batch=0,
                            platform="tensorrt_plan", instances=opts.gpu_instances, kind="KIND_GPU"))
        _copy_artifact(p_path, root / prologue_name / "1", "model.plan", manifest=False)
        est = p_desc.estimate_channels
        settings_prologue = {"model": prologue_name, "input": p_desc.input_names[0], "output": p_desc.output_names[0],
                             "estimate_channels": [est.start, est.stop],
                             **{key: manifest.sampling_setting(key) for key in SAMPLING_SETTINGS}}

    max_batch = opts.max_batch or profile.max_batch
    inputs, outputs = _frame_specs()
    _write(root / name / "config.pbtxt",
           config_pbtxt(name, inputs=inputs, outputs=outputs, max_batch=max_batch, backend="python",
                        instances=opts.instances, kind="KIND_CPU", queue_delay_us=opts.queue_delay_us))
    _write(root / name / "1" / "model.py", _template("bls"))
    settings = {
        "variant": "gpu",
        "contract": {"input": contract.INPUT, "output": contract.OUTPUT, "channels": contract.FRAME_CHANNELS},
        "seed": opts.seed, "steps": steps, "max_pixels": opts.max_pixels,
        "size_multiple": desc.size_multiple, "profile": profile.to_dict(),
        "schedule": {"timesteps": timesteps, "coefficients": coefficients},
        "step": {"model": step_name, "x": desc.X, "cond": desc.COND, "t": desc.T, "coef": desc.COEF,
                 "output": desc.OUT, "channels": desc.channels},
        "prologue": settings_prologue,
        "source": _source(artifact, manifest),
        "tensorrt": manifest.get("tensorrt"),
    }
    _write(root / name / "1" / SETTINGS, json.dumps(settings, indent=2) + "\n")


def _cpu_repository(root: Path, artifact: Path, manifest: Manifest, opts: TritonOptions) -> None:
    prologue = prologue_file(artifact, manifest)  # a predict-and-refine ONNX is two files
    steps, _, _ = _schedule_tables(manifest, opts.steps, allow_zero=prologue is not None)
    name = opts.model_name
    inputs, outputs = _frame_specs()
    _write(root / name / "config.pbtxt",
           config_pbtxt(name, inputs=inputs, outputs=outputs, max_batch=opts.max_batch or 8, backend="python",
                        instances=opts.instances, kind="KIND_CPU", queue_delay_us=opts.queue_delay_us))
    _write(root / name / "1" / "model.py", _template("cpu"))
    copied = _copy_artifact(artifact, root / name / "1")
    if prologue is not None:  # beside the step, under the name its manifest gives
        _copy_artifact(prologue, root / name / "1", manifest=False)
    settings = {
        "variant": "cpu",
        "contract": {"input": contract.INPUT, "output": contract.OUTPUT, "channels": contract.FRAME_CHANNELS},
        "artifact": copied.name, "steps": steps, "seed": opts.seed, "max_pixels": opts.max_pixels,
        "instances": opts.instances, "threads": opts.threads, "tile": opts.tile, "overlap": opts.overlap,
        "source": _source(artifact, manifest),
    }
    _write(root / name / "1" / SETTINGS, json.dumps(settings, indent=2) + "\n")


def export_triton(artifact: str | os.PathLike, out: str | os.PathLike, options: TritonOptions | None = None, *,
                  force: bool = False) -> Path:
    """Write the model repository for ``artifact`` (.plan: GPU, .onnx: CPU) at ``out``; return ``out``."""
    opts = options or TritonOptions()
    artifact, out = Path(artifact), Path(out)
    suffix = artifact.suffix.lower()
    if suffix not in (".plan", ".onnx"):
        raise UsageError(f"{artifact.name}: expected a TensorRT plan (.plan, GPU repository) or an ONNX model "
                         f"(.onnx, CPU repository)")
    manifest = load_manifest(artifact, "trt" if suffix == ".plan" else "onnx")  # schema, format, sha256
    if manifest.model != "derain":
        raise ArtifactError(f"{artifact.name} is a {manifest.model!r} model; the served model derains "
                            f"(export the derain estimator: rd-export build --model derain)")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"{out} exists and is not empty; choose a new folder or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (_gpu_repository if suffix == ".plan" else _cpu_repository)(tmp, artifact, manifest, opts)
        tmp.chmod(0o755)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
