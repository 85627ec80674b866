"""The JSON manifest written beside every artifact (``model.onnx`` -> ``model.json``).

A plan stays raw (loadable by trtexec, Triton, C++); its metadata lives here. Loading
validates the schema (required keys and their types) and names the bad field.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.descriptor import StepDescriptor
from runtime.errors import ArtifactError, EngineMismatchError, ManifestError
from runtime.io import atomic_write_bytes
from runtime.lowpass import refine_lowpass_error
from runtime.schedule import MIN_STEPS, ScheduleConfig, steps_error

__all__ = ["REFINE_STRENGTH_MAX", "SCHEMA_VERSION", "Manifest", "load_manifest", "manifest_path_for", "prologue_name",
           "refine_strength_error", "noise_scale_error", "refine_lowpass_error", "SAMPLING_SETTINGS", "sha256_file"]

SCHEMA_VERSION = 1

# field -> accepted python types (None allowed where listed)
_REQUIRED: dict[str, tuple[type, ...]] = {
    "schema_version": (int,),
    "toolkit_version": (str,),
    "artifact": (str,),  # file name of the artifact, relative to the manifest
    "format": (str,),  # "onnx" | "trt"
    "precision": (str,),  # "fp32" | "fp16" | "int8"
    "model": (str,),  # "derain" | "rain"
    "sha256": (str,),  # of the artifact
    "descriptor": (dict,),
    "schedule": (dict,),  # {"num_train_timesteps", "beta_start", "beta_end", "default_steps"}
    "model_config": (dict,),
}
_OPTIONAL: dict[str, tuple[type, ...]] = {
    "fp32_islands": (list,),
    "source": (dict,),  # {"checkpoint": name, "checkpoint_sha256": ..., "onnx_sha256": ...}
    "verification": (dict,),
    "tensorrt": (dict,),  # {"version", "gpu_name", "compute_capability", "build_flags"}
    "calibration": (dict,),
    "created": (str,),
    #: predict-and-refine models: the prologue graph beside the step, {"artifact", "sha256", ...}
    "prologue": (dict,),
}
#: the largest ``prologue.refine_strength`` (above 1 extrapolates the refiner's correction)
REFINE_STRENGTH_MAX = 2.0
FORMATS = ("onnx", "trt")
PRECISIONS = ("fp32", "fp16", "int8")
MODELS = ("derain", "rain")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def prologue_name(artifact_name: str) -> str:
    """The prologue file of a step artifact: ``model.onnx`` -> ``model.prologue.onnx``,
    ``model.int8.onnx`` -> ``model.int8.prologue.onnx``, ``model.trt.plan`` -> ``model.trt.prologue.plan``."""
    stem, dot, suffix = artifact_name.rpartition(".")
    return f"{stem}.prologue.{suffix}" if dot else f"{artifact_name}.prologue"


def manifest_path_for(artifact: str | os.PathLike) -> Path:
    """``dir/model.onnx`` -> ``dir/model.json``; ``dir/model.int8.onnx`` -> ``dir/model.int8.json``."""
    p = Path(artifact)
    return p.with_suffix(".json")


@dataclass
class Manifest:
    artifact: str
    format: str
    precision: str
    model: str
    sha256: str
    descriptor: dict
    schedule: dict
    model_config: dict
    toolkit_version: str = ""
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ accessors
    @property
    def step_descriptor(self) -> StepDescriptor:
        return StepDescriptor.from_dict(self.descriptor)

    @property
    def schedule_config(self) -> ScheduleConfig:
        """The forward process of the model (``schedule`` without ``default_steps``); ManifestError
        when the section does not make one (a manifest built by hand: a loaded one was validated)."""
        try:
            return ScheduleConfig.from_dict(self.schedule)
        except ValueError as e:
            raise ManifestError(f"manifest of {self.artifact}: invalid schedule ({e})") from None

    @property
    def default_steps(self) -> int:
        return int(self.schedule.get("default_steps", 10))

    @property
    def verify_steps(self) -> int:
        """The DDIM steps a derived artifact (FP16, INT8, a plan) is verified at: the default steps,
        or, when those are 0 (the predictor alone), the steps the source was verified at."""
        if self.default_steps >= MIN_STEPS:
            return self.default_steps
        v = (self.get("verification") or {}).get("steps")
        return int(v) if isinstance(v, int) and not isinstance(v, bool) and v >= MIN_STEPS else 3

    @property
    def prologue(self) -> dict | None:
        """The prologue entry ({"artifact": file name beside the step, "sha256", ...}) or None."""
        return self.extra.get("prologue")

    def sampling_setting(self, name: str) -> float:
        """The prologue entry's sampling setting ``name`` (a key of :data:`SAMPLING_SETTINGS`), or its
        Algorithm-2 value where the entry does not say or there is no prologue."""
        default = SAMPLING_SETTINGS[name][0]
        pro = self.prologue
        return float(pro.get(name, default)) if pro is not None else default

    @property
    def refine_strength(self) -> float:
        """How much of the refiner's correction the output keeps, ``P(y) + a * (x_0 - P(y))``: the
        prologue entry's ``refine_strength``; 1 (Algorithm 2's x_0 as it is) where it does not say."""
        return self.sampling_setting("refine_strength")

    @property
    def noise_scale(self) -> float:
        """The scale of the initial noise, x_T = s * N(0, I): the prologue entry's ``noise_scale``;
        1 (Algorithm 2's x_T) where it does not say. 0 starts the refiner's DDIM loop from x_T = 0,
        the noise's mean: the output no longer depends on the seed."""
        return self.sampling_setting("noise_scale")

    @property
    def refine_lowpass(self) -> float:
        """The low-pass sigma (pixels) of the kept correction, ``P(y) + a * G_sigma(x_0 - P(y))``: the
        prologue entry's ``refine_lowpass``; 0 (the whole correction at the refine strength) where it
        does not say (:mod:`runtime.lowpass`)."""
        return self.sampling_setting("refine_lowpass")

    @property
    def min_steps(self) -> int:
        """The fewest steps this model runs: 0 with a prologue (its estimate alone), else MIN_STEPS."""
        return 0 if self.prologue is not None else MIN_STEPS

    def get(self, key: str, default: Any = None) -> Any:
        return self.extra.get(key, default)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        d = {
            "schema_version": self.schema_version,
            "toolkit_version": self.toolkit_version,
            "artifact": self.artifact,
            "format": self.format,
            "precision": self.precision,
            "model": self.model,
            "sha256": self.sha256,
            "descriptor": self.descriptor,
            "schedule": self.schedule,
            "model_config": self.model_config,
        }
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: Any, *, where: str = "manifest") -> Manifest:
        validate(d, where=where)
        extra = {k: v for k, v in d.items() if k not in _REQUIRED}
        return cls(
            artifact=d["artifact"], format=d["format"], precision=d["precision"], model=d["model"],
            sha256=d["sha256"], descriptor=d["descriptor"], schedule=d["schedule"],
            model_config=d["model_config"], toolkit_version=d["toolkit_version"],
            schema_version=d["schema_version"], extra=extra,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> Manifest:
        path = Path(path)
        if not path.is_file():
            raise ManifestError(f"{path}: manifest not found (every artifact needs its .json beside it)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError, JSONDecodeError, int too long, nesting
            raise ManifestError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
        return cls.from_dict(data, where=str(path))

    @classmethod
    def for_artifact(cls, artifact: str | os.PathLike) -> Manifest:
        return cls.load(manifest_path_for(artifact))

    def save(self, path: str | os.PathLike) -> Path:
        validate(self.to_dict(), where=str(path))
        return atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n").encode())

    def publish(self, artifact: str | os.PathLike) -> Path:
        """Write this manifest beside ``artifact`` (already in place and verified) and return the
        artifact; if the manifest cannot be written, the artifact is removed, so no artifact is
        ever left without its manifest."""
        artifact = Path(artifact)
        try:
            self.save(manifest_path_for(artifact))
        except BaseException:
            artifact.unlink(missing_ok=True)
            if self.prologue is not None:
                artifact.with_name(self.prologue["artifact"]).unlink(missing_ok=True)
            raise
        return artifact

    def prologue_path(self, artifact: str | os.PathLike) -> Path | None:
        """The prologue file beside ``artifact`` (the step), hash-checked; None without a prologue.

        Raises ArtifactError when it is missing and ManifestError when its hash does not match.
        """
        pro = self.prologue
        if pro is None:
            return None
        path = Path(artifact).with_name(pro["artifact"])
        if not path.is_file():
            raise ArtifactError(f"{path}: the prologue graph of {Path(artifact).name} is missing (an artifact of a "
                                f"predict-and-refine model is two files; copy both, and the manifest)")
        actual = sha256_file(path)
        if actual != pro["sha256"]:
            raise ManifestError(f"{path}: sha256 {actual[:12]}... does not match its manifest "
                                f"({pro['sha256'][:12]}...); the file was modified or belongs to another build")
        return path

    def check_artifact_hash(self, artifact: str | os.PathLike) -> None:
        actual = sha256_file(artifact)
        if actual != self.sha256:
            raise ManifestError(
                f"{artifact}: sha256 {actual[:12]}... does not match its manifest ({self.sha256[:12]}...); "
                f"the file was modified or belongs to another build"
            )


def load_manifest(artifact: str | os.PathLike, fmt: str | None = None) -> Manifest:
    """The manifest of ``artifact``, checked before anything reads the artifact: the file exists,
    the manifest beside it is valid, describes this file (and a ``fmt`` artifact, when given) and
    its sha256 matches. The one loader of the toolkit (runtime backends, exporter, calibration).

    Raises ArtifactError (no such file), ManifestError (no or an invalid manifest, another
    format or file, an ONNX whose hash differs) or EngineMismatchError (a plan whose hash differs:
    it was rebuilt or altered since its manifest was written).
    """
    path = Path(artifact)
    if not path.is_file():
        raise ArtifactError(f"{path}: artifact not found")
    manifest = Manifest.for_artifact(path)
    where = manifest_path_for(path)
    if fmt is not None and manifest.format != fmt:
        raise ManifestError(f"{where}: describes a {manifest.format!r} artifact, but {path.name} is {fmt!r}")
    if manifest.artifact != path.name:
        raise ManifestError(f"{where}: describes {manifest.artifact!r}, not {path.name!r}")
    try:
        manifest.check_artifact_hash(path)
    except ManifestError as e:
        if manifest.format == "trt":
            raise EngineMismatchError(str(e)) from None
        raise
    return manifest


def validate(d: Any, *, where: str = "manifest") -> None:
    """Check required keys, types and enumerations; raise ManifestError naming the field."""
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(d).__name__}")
    for key, types in _REQUIRED.items():
        if key not in d:
            raise ManifestError(f"{where}: missing required field '{key}'")
        if isinstance(d[key], bool) or not isinstance(d[key], types):
            raise ManifestError(
                f"{where}: field '{key}' must be {'/'.join(t.__name__ for t in types)}, "
                f"got {type(d[key]).__name__}"
            )
    for key, types in _OPTIONAL.items():
        if key in d and d[key] is not None and not isinstance(d[key], types):
            raise ManifestError(f"{where}: field '{key}' must be {types[0].__name__}, got {type(d[key]).__name__}")
    if d["schema_version"] > SCHEMA_VERSION:
        raise ManifestError(
            f"{where}: schema_version {d['schema_version']} is newer than this toolkit supports "
            f"({SCHEMA_VERSION}); upgrade raindiffusion-edge"
        )
    for key, allowed in (("format", FORMATS), ("precision", PRECISIONS), ("model", MODELS)):
        if d[key] not in allowed:
            raise ManifestError(f"{where}: field '{key}' is {d[key]!r}, expected one of {', '.join(allowed)}")
    art = d["artifact"]
    if not art or "/" in art or "\\" in art or art in (".", ".."):
        raise ManifestError(f"{where}: field 'artifact' must be a plain file name, got {art!r}")
    if d["schema_version"] < 1:
        raise ManifestError(f"{where}: field 'schema_version' must be >= 1, got {d['schema_version']}")
    if not re.fullmatch(r"[0-9a-fA-F]{64}", d["sha256"]):
        raise ManifestError(f"{where}: field 'sha256' must be 64 hex characters")
    desc = d["descriptor"]
    for key in ("size_multiple", "profile"):
        if key not in desc:
            raise ManifestError(f"{where}: field 'descriptor.{key}' is missing")
    for key in ("size_multiple", "channels", "opset", "cond_channels"):  # all but size_multiple optional
        if key in desc and not (_is_int(desc[key]) and desc[key] >= 1):
            raise ManifestError(f"{where}: field 'descriptor.{key}' must be a positive integer, got {desc[key]!r}")
    cond_channels = desc.get("cond_channels", 3)
    if cond_channels not in (3, 6):
        raise ManifestError(f"{where}: field 'descriptor.cond_channels' must be 3 (the rainy image) or 6 "
                            f"([y, P(y)] from a prologue), got {cond_channels!r}")
    pro = d.get("prologue")
    if (cond_channels == 6) != (pro is not None):
        raise ManifestError(f"{where}: a step with a {cond_channels}-channel condition "
                            + ("needs a 'prologue' entry" if cond_channels == 6 else "takes no 'prologue'"))
    if pro is not None:
        part = pro.get("artifact")
        if not isinstance(part, str) or not part or "/" in part or "\\" in part or part in (".", ".."):
            raise ManifestError(f"{where}: field 'prologue.artifact' must be a plain file name, got {part!r}")
        if part == d["artifact"]:
            raise ManifestError(f"{where}: field 'prologue.artifact' names the step artifact itself")
        if not (isinstance(pro.get("sha256"), str) and re.fullmatch(r"[0-9a-fA-F]{64}", pro["sha256"])):
            raise ManifestError(f"{where}: field 'prologue.sha256' must be 64 hex characters")
        for name, (_, error) in SAMPLING_SETTINGS.items():
            if name in pro and (why := error(pro[name])):
                raise ManifestError(f"{where}: field 'prologue.{name}' {why}")
    profile = desc["profile"]
    if not isinstance(profile, dict):
        raise ManifestError(f"{where}: field 'descriptor.profile' must be an object, got {type(profile).__name__}")
    for key in ("min_batch", "opt_batch", "max_batch"):
        if not _is_int(profile.get(key)):
            raise ManifestError(f"{where}: field 'descriptor.profile.{key}' must be an integer")
    for key in ("min_size", "opt_size", "max_size"):
        v = profile.get(key)
        if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(x) for x in v)):
            raise ManifestError(f"{where}: field 'descriptor.profile.{key}' must be [height, width] integers")
    try:
        StepDescriptor.from_dict(desc).profile.validate(int(desc["size_multiple"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ManifestError(f"{where}: field 'descriptor' is invalid ({e})") from None
    sched = d["schedule"]
    if not (_is_int(sched.get("num_train_timesteps")) and sched["num_train_timesteps"] >= 1):
        raise ManifestError(f"{where}: field 'schedule.num_train_timesteps' must be a positive integer")
    for key in ("beta_start", "beta_end"):
        v = sched.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ManifestError(f"{where}: field 'schedule.{key}' must be a finite number")
    if not 0.0 < sched["beta_start"] <= sched["beta_end"] < 1.0:
        raise ManifestError(f"{where}: field 'schedule.beta_start'/'schedule.beta_end' must satisfy "
                            f"0 < beta_start <= beta_end < 1, got {sched['beta_start']}..{sched['beta_end']}")
    steps = sched.get("default_steps")
    zero_ok = pro is not None and steps == 0 and _is_int(steps)  # predict-and-refine: the predictor alone
    if "default_steps" in sched and not zero_ok and not (
            _is_int(steps) and MIN_STEPS <= steps <= sched["num_train_timesteps"]):
        why = steps_error(steps, sched["num_train_timesteps"])
        raise ManifestError(f"{where}: field 'schedule.default_steps': {why}")


def refine_strength_error(v: Any) -> str | None:
    """Why ``v`` is not a refine strength (a number in (0, REFINE_STRENGTH_MAX]), or None."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) \
            or not 0.0 < v <= REFINE_STRENGTH_MAX:
        return f"must be a number in (0, {REFINE_STRENGTH_MAX:g}], got {v!r}"
    return None


def noise_scale_error(v: Any) -> str | None:
    """Why ``v`` is not an initial-noise scale (a number in [0, 1]), or None."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
        return f"must be a number in [0, 1], got {v!r}"
    return None


#: The sampling settings a predict-and-refine manifest's prologue entry may carry (``rd-export build
#: --refine-strength / --noise-scale / --refine-lowpass``, overridden by ``Derainer(...)`` and the
#: same ``rd-run`` options): name -> (its value where the entry does not say, Algorithm 2's; why a
#: value is not one).
SAMPLING_SETTINGS: dict[str, tuple[float, Callable[[Any], str | None]]] = {
    "refine_strength": (1.0, refine_strength_error),
    "noise_scale": (1.0, noise_scale_error),
    "refine_lowpass": (0.0, refine_lowpass_error),
}


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)
