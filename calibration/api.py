"""``build_int8``: verified FP32 ONNX + a folder of real rainy photos -> INT8 Q/DQ ONNX + manifest.

Stages (each a function of this package, callable on its own)::

    1  select images        calib_images for calibration, eval_images held out (collect.select_images)
    2  pre-process          shape inference + ORT optimiser (quantize.preprocess)
    3  record trajectories  the FP32 step's inputs at every DDIM step, several sizes (collect)
    4  calibrate once       activation ranges of every Conv/MatMul/Gemm tensor -> range cache (quantize)
    5  quantize             Q/DQ graphs from that one cache: s8 (TensorRT / portable), u8r (x86 CPU)
    6  keep FP32            layers whose quantization costs most, until the target PSNR (sensitivity)
    7  verify + report      vs FP32: synthetic verification image (rd_export.verify, the gate) and
                            held-out real images end to end; CPU latency INT8 vs FP32 (report)
    8  write                <stem>.int8.onnx + <stem>.int8.json, each atomically (ONNX first)

The INT8 artifact is an ordinary ONNX of the fused step (same inputs/outputs), so the runtime
opens it like any other; the manifest says ``precision: int8`` and carries the ``calibration``
report. Torch is never imported here, and nothing of the exporter but its comparisons
(``rd_export.verify``): the exporter calls this package (``rd_export.precision``), not the
other way round. From a checkpoint: ``rd-export build model.pt --precision int8 --calib DIR``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np

from calibration.collect import (
    FeedReader,
    ImageItem,
    TrajectoryDataReader,
    calibration_crops,
    calibration_sizes,
    crop_to_size,
    make_session,
    prologue_fn,
    record_trajectories,
    select_images,
    timestep_coverage,
    to_model_input,
)
from calibration.quantize import (
    OP_TYPES,
    RECIPES,
    Method,
    attention_head_nodes,
    calibrate,
    preprocess,
    qdq_summary,
    quantizable_nodes,
    quantize,
)
from calibration.report import compare_latency, compare_quality, step_psnr
from calibration.sensitivity import choose_fp32_nodes, sensitivity
from runtime.descriptor import PrologueDescriptor, StepDescriptor
from runtime.errors import UsageError, VerificationError
from runtime.io import atomic_path
from runtime.manifest import Manifest, load_manifest, manifest_path_for, prologue_name, sha256_file
from runtime.schedule import MIN_STEPS, DDIMSchedule, ScheduleConfig, steps_error

__all__ = ["DEFAULT_MIN_PSNR_DB", "CPU_SUFFIX", "CPU_RECIPE", "build_int8", "int8_path_for", "default_fp32_nodes"]

#: end-to-end PSNR of INT8 vs FP32 that verification demands (dB, peak 2 on [-1, 1])
DEFAULT_MIN_PSNR_DB = 35.0
#: step counts whose timesteps are calibrated (with the manifest's default): the counts users run
CALIB_STEPS = (2, 3, 5, 10)
#: ``model.int8.onnx`` is the s8 (TensorRT) graph; ``model.int8.cpu.onnx`` the onnxruntime x86 CPU one
CPU_SUFFIX = ".int8.cpu"
#: the CPU graph: UINT8 asymmetric activations, 7-bit weights. onnxruntime's x86 kernels without
#: VNNI sum u8 x s8 products in pairs in int16 (vpmaddubsw), which saturates with 8-bit weights;
#: 7-bit weights cannot saturate (fused = exact Q/DQ semantics) and cost nothing in speed, and with
#: VNNI at most ~1 bit of weight (calibration/README.md has the measurements).
CPU_RECIPE = "u8r"
S8_ON_CPU_NOTE = ("the s8 graph run by onnxruntime's CPU kernels on the build machine; x86 CPUs without VNNI "
                  "saturate 8-bit products in int16 pairs, so CPU users should run the .int8.cpu.onnx sibling")

Progress = Callable[[str], None]


def _quiet(msg: str) -> None:
    pass


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def int8_path_for(fp32_onnx: str | os.PathLike, out: str | os.PathLike | None = None, *, suffix: str = ".int8") -> Path:
    """``dir/model.onnx`` -> ``dir/model.int8.onnx``; ``out`` may be a directory or an ``.onnx`` path."""
    src = Path(fp32_onnx)
    stem = src.name.removesuffix(".onnx")
    if out is None:
        return src.with_name(f"{stem}{suffix}.onnx")
    out = Path(out)
    if out.suffix == ".onnx":
        if suffix == ".int8":
            return out
        return out.with_name(out.name.removesuffix(".onnx").removesuffix(".int8") + f"{suffix}.onnx")
    return out / f"{stem}{suffix}.onnx"


def default_fp32_nodes(model) -> list[str]:
    """Nodes kept FP32 before any measurement: the attention-fusion head (Eq. 14).

    Its logits go through a softmax over the scales that mixes the three noise maps; an error
    there reweights whole scales, and its three small convolutions are a few percent of the
    step's compute. (Softmax, resizes and the DDIM update are never quantized: only Conv,
    MatMul and Gemm are.) See calibration/README.md for the measurements behind this.
    """
    return attention_head_nodes(model)


def _schedule_config(manifest: Manifest) -> ScheduleConfig:
    """``manifest.schedule_config``; kept because benchmarks/int8_vs_fp32.py imports this name."""
    return manifest.schedule_config


def _load_fp32(fp32_onnx: Path) -> Manifest:
    manifest = load_manifest(fp32_onnx, "onnx")
    if manifest.precision != "fp32":
        raise UsageError(f"{fp32_onnx.name} is {manifest.precision}; INT8 is derived from the FP32 ONNX")
    return manifest


def _eval_conds(items: Sequence[ImageItem], sizes: Sequence[tuple[int, int]],
                seed: int) -> list[tuple[str, np.ndarray]]:
    """Held-out frames at the calibration sizes, crops seeded apart from the calibration crops."""
    out = []
    for k, item in enumerate(items):
        rng = np.random.Generator(np.random.PCG64(seed + 10_007 + k))
        out.append((item.path.name, to_model_input(crop_to_size(item.rgb, sizes[k % len(sizes)], rng))))
    return out


def build_int8(fp32_onnx: str | os.PathLike, calib_dir: str | os.PathLike, *, out: str | os.PathLike | None = None,
               calib_images: int = 8, eval_images: int = 2, steps: int | None = None,
               calib_steps: Sequence[int] | None = None,
               sizes: Sequence[int | tuple[int, int]] | None = None, seed: int = 0,
               method: Method | str = Method.minmax, cpu_variant: bool = True,
               fp32_nodes: Sequence[str] | None = None, target_psnr_db: float | None = None,
               max_fp32_layers: int = 4, min_psnr_db: float | None = DEFAULT_MIN_PSNR_DB,
               latency: bool = True, latency_size: tuple[int, int] | None = None, latency_repeats: int = 3,
               threads: int | None = None, progress: Progress | None = None) -> Path:
    """Derive ``<stem>.int8.onnx`` (+ ``<stem>.int8.json``) from a verified FP32 ONNX artifact.

    Args:
        fp32_onnx: ``model.onnx`` with its manifest ``model.json`` beside it.
        calib_dir: real rainy photos. Missing / empty / nothing readable: InputError naming it;
            unreadable files inside are skipped with a ``CalibrationWarning``.
        out: output directory or ``.onnx`` path (default: beside the FP32 ONNX).
        calib_images / eval_images: images calibrated on / held out for the quality report.
        steps: DDIM steps of verification and the quality report (default: the manifest's ``verify_steps``).
        calib_steps: step counts whose full trajectories are recorded for calibration (default
            :data:`CALIB_STEPS` plus ``steps``): every timestep users run is calibrated; the union is
            the manifest calibration section's ``timesteps`` (the runtime warns once outside them).
        sizes: calibration frame sizes, ints or (H, W) (default: the profile's opt size and half).
        seed: image order, crops and x_T of every trajectory.
        method: ``minmax`` (default), ``percentile`` or ``entropy``.
        cpu_variant: also write ``<stem>.int8.cpu.onnx`` (default): UINT8 asymmetric activations and
            7-bit weights from the same calibration, for onnxruntime on x86 CPUs (TensorRT cannot
            build it: its zero points are not 0).
        fp32_nodes: quantizable nodes to keep FP32 (default: :func:`default_fp32_nodes`).
        target_psnr_db: if the held-out PSNR vs FP32 is below this, keep the most sensitive
            layers FP32 (measured, all-but-one) up to ``max_fp32_layers``. None: no search.
        min_psnr_db: verification gate, end-to-end PSNR vs FP32 on the synthetic verification image
            (``rd_export.verify.compare_onnx``), each graph as its target executes it: s8 with exact
            Q/DQ semantics, the CPU graph with onnxruntime's CPU kernels. Below it: VerificationError
            and nothing is written. None disables the gate (the numbers are still recorded).
        latency: measure CPU latency INT8 vs FP32 (blocks, same run) at ``latency_size``.

    A predict-and-refine artifact (a prologue beside the step) gets both graphs quantized from one
    run: the step calibrated on trajectories conditioned on the FP32 prologue, the prologue on the
    rainy crops themselves; verification and the quality report run both INT8 graphs end to end.

    Returns the path of the INT8 (s8, TensorRT-compatible) ONNX.
    """
    progress = progress or _quiet
    job = _Job.plan(Path(fp32_onnx), out, steps=steps, calib_steps=calib_steps, sizes=sizes, seed=seed,
                    method=method, cpu_variant=cpu_variant, threads=threads)
    # 1: images
    calib, held = select_images(calib_dir, calib_images=calib_images, eval_images=eval_images, seed=seed)
    progress(f"calibration images: {len(calib)} from {calib_dir} (held out: {len(held)})")
    eval_conds = _eval_conds(held or calib, job.sizes, seed)
    if not held:
        warnings.warn("no held-out image: the INT8 quality report uses a calibration image",
                      RuntimeWarning, stacklevel=2)

    job.dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=job.dest.parent) as tmp:
        work = Path(tmp)
        # 2: pre-process
        pre = preprocess(job.fp32_onnx, work / "pre.onnx")
        # 3: trajectories, every step of every calibrated step count, each through the FP32 prologue
        trajectories, coverage = _record(job, calib, progress)
        reader = TrajectoryDataReader.from_trajectories(trajectories, job.descriptor)
        # 4: calibrate once
        progress(f"calibrating ({job.method.value}) on {len(reader)} step inputs")
        cache = calibrate(pre, reader, cache=work / "ranges.json", method=job.method, workdir=work)
        # 5-6: quantize; keep FP32 what must stay FP32 (with a target: the most sensitive layers too)
        base_fp32 = list(default_fp32_nodes(pre) if fp32_nodes is None else fp32_nodes)
        graphs, all_fp32, searched = _quantize_step(job, pre, cache, work, base_fp32, eval_conds,
                                                    target_psnr_db=target_psnr_db, max_fp32_layers=max_fp32_layers,
                                                    progress=progress)
        # 5b: the prologue (predict-and-refine), calibrated on the rainy crops the trajectories used
        pro_graphs = _quantize_prologue(job, calib, graphs, work, progress) if job.src_pro is not None else {}
        # 7: verify (the gate) and report, each graph as its target executes it
        reports, timed = _verify_and_report(job, graphs, pro_graphs, eval_conds, trajectories, held_out=bool(held),
                                            min_psnr_db=min_psnr_db, progress=progress)
        lat = None
        if latency:
            size = tuple(latency_size or job.sizes[0])
            progress(f"timing FP32 vs INT8 on CPU at {size[0]}x{size[1]}, {job.steps} steps")
            lat = compare_latency(timed, size=size, steps=job.steps, descriptor=job.descriptor,
                                  schedule_config=job.schedule_config, repeats=latency_repeats, threads=threads)
        del timed
        common = {
            "method": job.method.value,
            "op_types": list(OP_TYPES),
            "images": [item.path.name for item in calib],
            "folder": str(Path(calib_dir)),
            "held_out_images": [item.path.name for item in held],
            "sizes": [list(s) for s in job.sizes],
            "steps": job.steps,
            "calibrated_step_counts": job.counts,
            "seed": seed,
            "noise_scale": job.manifest.noise_scale,
            "timesteps": list(coverage),
            "samples": len(reader),
            "samples_per_timestep": sorted(set(coverage.values())),
            "fp32_nodes": all_fp32,
            "fp32_search": searched,
            "onnxruntime": _ort_version(),
            "latency": lat,
        }
        # 8: write, the CPU variant first so the TensorRT artifact is the last thing to appear
        if job.cpu_dest is not None:
            _write(graphs[CPU_RECIPE], job.cpu_dest, job.manifest, job.fp32_onnx, recipe=CPU_RECIPE, common=common,
                   report=reports[CPU_RECIPE], siblings={"tensorrt": job.dest.name},
                   prologue=pro_graphs.get(CPU_RECIPE))
        _write(graphs["s8"], job.dest, job.manifest, job.fp32_onnx, recipe="s8", common=common, report=reports["s8"],
               siblings={"onnxruntime_cpu": job.cpu_dest.name} if job.cpu_dest else {}, prologue=pro_graphs.get("s8"))
    return job.dest


@dataclass
class _Job:
    """What one :func:`build_int8` works from: the checked FP32 artifact and the resolved options."""

    fp32_onnx: Path
    manifest: Manifest
    descriptor: StepDescriptor
    schedule_config: ScheduleConfig
    steps: int
    counts: list[int]
    sizes: list[tuple[int, int]]
    seed: int
    method: Method
    threads: int | None
    dest: Path
    cpu_dest: Path | None
    src_pro: Path | None
    #: the FP32 step's session and (predict-and-refine) the FP32 prologue, opened once
    fp32_session: object = None
    pro32: Callable[[np.ndarray], np.ndarray] | None = None

    @classmethod
    def plan(cls, fp32_onnx: Path, out, *, steps, calib_steps, sizes, seed, method, cpu_variant, threads) -> _Job:
        """Everything checked before any image is read: the artifact, the step counts, the sizes."""
        manifest = _load_fp32(fp32_onnx)
        sc = manifest.schedule_config
        T = sc.num_train_timesteps
        steps = int(steps or manifest.verify_steps)
        if not MIN_STEPS <= steps <= T:
            raise UsageError(steps_error(steps, T))
        counts = sorted({*(CALIB_STEPS if calib_steps is None else calib_steps), steps})
        for c in counts:
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not MIN_STEPS <= c <= T:
                raise UsageError(f"calibration {steps_error(c, T)}")
        src_pro = manifest.prologue_path(fp32_onnx)
        method = Method(method)
        frame_sizes = calibration_sizes(manifest.step_descriptor, sizes)
        job = cls(fp32_onnx=fp32_onnx, manifest=manifest, descriptor=manifest.step_descriptor, schedule_config=sc,
                  steps=steps, counts=counts, sizes=frame_sizes, seed=seed, method=method, threads=threads,
                  dest=int8_path_for(fp32_onnx, out),
                  cpu_dest=int8_path_for(fp32_onnx, out, suffix=CPU_SUFFIX) if cpu_variant else None,
                  src_pro=src_pro)
        job.fp32_session = make_session(fp32_onnx, threads=threads)
        job.pro32 = prologue_fn(make_session(src_pro, threads=threads)) if src_pro is not None else None
        return job

    def quality(self, candidate, eval_conds, *, held_out: bool = True, prologues=None):
        """INT8 vs FP32 end to end on the held-out frames (calibration.report.compare_quality)."""
        return compare_quality(self.fp32_session, candidate, eval_conds, descriptor=self.descriptor,
                               schedule_config=self.schedule_config, steps=self.steps, seed=self.seed,
                               held_out=held_out, prologues=prologues, noise_scale=self.manifest.noise_scale)


def _record(job: _Job, calib: Sequence[ImageItem], progress: Progress):
    """3: the FP32 trajectories of every calibrated step count, and their timestep coverage."""
    progress(f"recording FP32 trajectories of {', '.join(map(str, job.counts))} steps at "
             f"{', '.join(f'{h}x{w}' for h, w in job.sizes)}")
    trajectories = record_trajectories(job.fp32_onnx, calib, descriptor=job.descriptor,
                                       schedule_config=job.schedule_config, steps=job.counts, sizes=job.sizes,
                                       seed=job.seed, threads=job.threads, prologue=job.pro32,
                                       noise_scale=job.manifest.noise_scale)
    coverage = timestep_coverage(trajectories)
    sched = DDIMSchedule(job.schedule_config)
    expected = sorted({int(t) for c in job.counts for t in sched.set_timesteps(c)})
    if sorted(coverage) != expected:  # a broken recorder must not calibrate silently
        raise VerificationError(f"calibration covers timesteps {sorted(coverage)}, expected {expected}")
    return trajectories, coverage


def _quantize_step(job: _Job, pre: Path, cache: Path, work: Path, base_fp32: list[str], eval_conds, *,
                   target_psnr_db: float | None, max_fp32_layers: int, progress: Progress):
    """5-6: the s8 graph (and the CPU one) from one range cache; with ``target_psnr_db``, the most
    sensitive layers are kept FP32 until the held-out PSNR reaches it. (graphs, FP32 nodes, search)."""
    known = {n for n, _ in quantizable_nodes(pre)}
    unknown = [n for n in base_fp32 if n not in known]
    if unknown:
        raise UsageError(f"fp32_nodes not found among the model's Conv/MatMul/Gemm nodes: {unknown[:5]}")
    same_prologue = None if job.pro32 is None else (job.pro32, job.pro32)

    def probe(path: Path) -> float:  # the s8 graph's own Q/DQ semantics (what TensorRT executes)
        return job.quality(make_session(path, reference=True), eval_conds, prologues=same_prologue).mean_psnr_db

    quantize_s8 = partial(quantize, pre, work / "s8.onnx", cache=cache, recipe="s8", method=job.method)
    s8 = quantize_s8(nodes_to_exclude=base_fp32)
    extra_fp32: list[str] = []
    searched = None
    if target_psnr_db is not None:
        first = probe(s8)
        searched = {"target_psnr_db": target_psnr_db, "before_db": round(first, 3)}
        if first < target_psnr_db:
            progress(f"held-out PSNR {first:.2f} dB < {target_psnr_db} dB: measuring per-layer sensitivity")
            search = {"workdir": work, "recipe": "s8", "method": job.method, "base_exclude": base_fp32}
            ranked = sensitivity(pre, cache, probe, mode="all_but", **search)
            extra_fp32, after = choose_fp32_nodes(ranked, probe, pre, cache, target_db=target_psnr_db,
                                                  max_groups=max_fp32_layers, **search)
            searched.update(after_db=round(after, 3),
                            ranking=[{"layer": r.group, "psnr_db_all_but": round(r.psnr_db, 3)} for r in ranked[:10]])
            s8 = quantize_s8(nodes_to_exclude=[*base_fp32, *extra_fp32])
    all_fp32 = [*base_fp32, *extra_fp32]
    graphs = {"s8": s8}
    if job.cpu_dest is not None:
        graphs[CPU_RECIPE] = quantize(pre, work / "cpu.onnx", cache=cache, recipe=CPU_RECIPE, method=job.method,
                                      nodes_to_exclude=all_fp32)
    return graphs, all_fp32, searched


def _quantize_prologue(job: _Job, calib: Sequence[ImageItem], graphs: dict[str, Path], work: Path,
                       progress: Progress) -> dict[str, Path]:
    """5b: the prologue graph quantized like each step graph, calibrated on the rainy crops."""
    progress("calibrating the prologue on the same rainy crops")
    pro_pre = preprocess(job.src_pro, work / "pro_pre.onnx")
    (work / "pro").mkdir()
    crops = calibration_crops(calib, job.sizes, job.seed)
    pro_cache = calibrate(pro_pre, FeedReader([{PrologueDescriptor.RAINY: c} for c in crops]),
                          cache=work / "pro_ranges.json", method=job.method, workdir=work / "pro")
    return {name: quantize(pro_pre, work / f"pro_{name}.onnx", cache=pro_cache, recipe=name, method=job.method)
            for name in graphs}


def _verify_and_report(job: _Job, graphs: dict[str, Path], pro_graphs: dict[str, Path], eval_conds,
                       trajectories, *, held_out: bool, min_psnr_db: float | None, progress: Progress):
    """7: each graph judged as its target executes it: the s8 graph by its exact Q/DQ semantics
    (onnxruntime with fusions off: what TensorRT computes), the CPU graph by onnxruntime's CPU
    kernels; the s8 graph on onnxruntime CPU is reported too. Verification (the gate) runs at the
    profile's minimum size, like the FP32/FP16 verification; the quality report on the held-out
    frames. Returns (reports by graph, the CPU sessions to time)."""
    from rd_export.verify import check_report, compare_onnx

    h, w = (int(v) for v in job.descriptor.profile.min_size)
    reports: dict[str, dict] = {}
    timed = {"fp32": job.fp32_session}
    for name, path in graphs.items():
        cpu_session = make_session(path, threads=job.threads)
        target = make_session(path, reference=True, threads=job.threads) if name == "s8" else cpu_session
        timed[f"int8_{name}"] = cpu_session
        what = (job.dest if name == "s8" else job.cpu_dest).name
        pro8 = pro_cpu = None
        if name in pro_graphs:
            pro_cpu = prologue_fn(make_session(pro_graphs[name], threads=job.threads))
            pro8 = (prologue_fn(make_session(pro_graphs[name], reference=True, threads=job.threads))
                    if name == "s8" else pro_cpu)
        progress(f"verifying {what} against {job.fp32_onnx.name} ({job.steps} steps, {h}x{w})")
        v = compare_onnx(_step_fn(target, job.descriptor), _step_fn(job.fp32_session, job.descriptor),
                         steps=job.steps, seed=job.seed, size=(h, w), schedule_config=job.schedule_config,
                         reference_prologue=job.pro32, candidate_prologue=pro8)
        v.update(provider="CPUExecutionProvider", onnxruntime=_ort_version(),
                 semantics="Q/DQ reference (graph optimisations off)" if name == "s8" else "onnxruntime CPU kernels")
        if min_psnr_db is not None:
            v = check_report(v, min_psnr_db=min_psnr_db, max_step_abs=None, what=what)
        quality = job.quality(target, eval_conds, held_out=held_out,
                              prologues=None if job.pro32 is None else (job.pro32, pro8))
        per_step = step_psnr(job.fp32_session, target, trajectories[0].samples, descriptor=job.descriptor)
        reports[name] = {"verification": v, "quality": quality.to_dict(),
                         "step_psnr_db": {str(k): round(min(val, 200.0), 3) for k, val in per_step.items()}}
        if name == "s8":
            on_cpu = job.quality(cpu_session, eval_conds, held_out=held_out,
                                 prologues=None if job.pro32 is None else (job.pro32, pro_cpu))
            reports[name]["quality_onnxruntime_cpu"] = dict(on_cpu.to_dict(), note=S8_ON_CPU_NOTE)
    return reports, timed


def _step_fn(session, descriptor):
    """A ``rd_export.verify.StepFn`` over an open session (verification reuses our sessions)."""
    d = descriptor

    def step(x_t: np.ndarray, cond: np.ndarray, t: np.ndarray, coef: np.ndarray) -> np.ndarray:
        feeds = {d.X: x_t, d.COND: cond, d.T: t, d.COEF: coef}
        return session.run([d.OUT], {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items()})[0]

    return step


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _write(graph: Path, dest: Path, src_manifest: Manifest, fp32_onnx: Path, *, recipe: str, common: dict,
           report: dict, siblings: dict, prologue: Path | None = None) -> None:
    r = RECIPES[recipe]
    calibration = {
        "recipe": recipe,
        "activations": r.activation,
        "activation_symmetric": r.symmetric,
        "weights": f"int8 symmetric per channel{' (7-bit range)' if r.reduce_range else ''}",
        "target": ("tensorrt (explicit Q/DQ), any onnxruntime" if recipe == "s8"
                   else "onnxruntime x86 CPU (not TensorRT: activation zero points are not 0)"),
        **common,
        "graph": qdq_summary(graph),
        "quality": report["quality"],
        "step_psnr_db": report["step_psnr_db"],
        "siblings": siblings,
    }
    if "quality_onnxruntime_cpu" in report:
        calibration["quality_onnxruntime_cpu"] = report["quality_onnxruntime_cpu"]
    extra = {k: v for k, v in src_manifest.extra.items()
             if k not in ("verification", "created", "fp32_islands", "calibration")}
    extra["source"] = dict(src_manifest.get("source") or {}, onnx=fp32_onnx.name, onnx_sha256=src_manifest.sha256)
    extra.update(verification=report["verification"], calibration=calibration, created=_now())
    manifest_dest = manifest_path_for(dest)
    pro_dest = dest.with_name(prologue_name(dest.name)) if prologue is not None else None
    with (atomic_path(manifest_dest) as tmp_manifest, atomic_path(dest) as tmp_onnx,
          atomic_path(pro_dest) if pro_dest else contextlib.nullcontext() as tmp_pro):
        shutil.copyfile(graph, tmp_onnx)
        if tmp_pro is not None:
            shutil.copyfile(prologue, tmp_pro)
            extra["prologue"] = dict(src_manifest.prologue, artifact=pro_dest.name, sha256=sha256_file(tmp_pro),
                                     precision="int8", graph=qdq_summary(prologue))
        manifest = Manifest(artifact=dest.name, format="onnx", precision="int8", model=src_manifest.model,
                            sha256=sha256_file(tmp_onnx), descriptor=src_manifest.descriptor,
                            schedule=src_manifest.schedule, model_config=src_manifest.model_config,
                            toolkit_version=src_manifest.toolkit_version, extra=extra)
        manifest.save(tmp_manifest)
    # exiting the inner contexts renamed the prologue and the ONNX, then the outer one the manifest
