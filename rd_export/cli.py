"""``rd-export``: checkpoint -> verified ONNX -> FP16 ONNX -> TensorRT engine.

    rd-export build model.pt -o out/ [--precision fp16] [--format onnx|trt|all] [--model rain]
    rd-export build out/model.onnx              (on the target device: ONNX + manifest -> plan)
    rd-export inspect out/model.onnx [--json]
    rd-export verify out/model.onnx --checkpoint model.pt

Progress lines go to stderr; ``--json`` puts the machine-readable result on stdout. Errors are
one line on stderr with the error class's exit code (``--debug`` shows the traceback). Nothing
here imports torch until a checkpoint is actually exported or verified.
"""

from __future__ import annotations

import json
import math
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rd_export.precision import PRECISIONS
from runtime.cli_errors import (
    HELP_OPTIONS,
    STEPS_RANGE,
    check_noise_scale,
    check_refine_lowpass,
    check_refine_strength,
    check_steps,
    error_exits,
    one_line_group,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, context_settings=HELP_OPTIONS, cls=one_line_group(""),
                  help="Export RainDiffusion checkpoints to verified ONNX (FP32/FP16) and TensorRT engines. "
                       "Frame sizes are HxW (height x width, e.g. 1080x1920), as in rd-run bench --size.")
_state = {"debug": False}

#: the precision choices come from the precision table (INT8 appears when it is registered)
Precision = Enum("Precision", {name: name for name in PRECISIONS}, type=str)


class Format(str, Enum):
    onnx = "onnx"
    trt = "trt"
    all = "all"


class Model(str, Enum):
    derain = "derain"
    rain = "rain"


def _profile_default(which: str) -> str:
    """Where a profile bound comes from when not given: a checkpoint's native tile (its training
    crop N, which the runtime tiles at), an ONNX's manifest (rd_export.export.native_profile)."""
    value = {"min": "N/2 x N/2", "opt": "N x N", "max": "N x N", "batch": "1..4..8"}[which]
    return (f"default {value} for a checkpoint trained at N-px crops, its native tile; an ONNX keeps the profile "
            f"in its manifest")


def _console() -> Console:
    return Console(stderr=True, soft_wrap=True, highlight=False)


def _run(fn, debug: bool = False):
    """Toolkit errors -> one stderr line + exit code; --debug re-raises (full traceback)."""
    console = _console()

    def showwarning(message, category, filename, lineno, file=None, line=None):
        console.print(f"[yellow]warning:[/] {escape(str(message))}")

    def say(text: str) -> None:
        console.print(f"[red]error:[/] {escape(text)}")

    previous, warnings.showwarning = warnings.showwarning, showwarning
    try:
        with error_exits(say, debug=debug or _state["debug"]):
            return fn()
    finally:
        warnings.showwarning = previous


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False) -> None:
    _state["debug"] = debug


def _finite_json(obj):
    """NaN / Inf -> null, so --json output is strict JSON (a failed report may hold them)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_json(v) for v in obj]
    return obj


def _echo_json(obj) -> None:
    typer.echo(json.dumps(_finite_json(obj), indent=2, allow_nan=False))


def _fmt_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt_psnr(p) -> str:
    if p is None:
        return "-"
    return "nan" if isinstance(p, float) and math.isnan(p) else f"{p:.1f} dB"


_Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]


@app.command()
def build(
    source: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True,
                                           help="A training checkpoint (.pt) or an exported ONNX (with its .json).")],
    out: Annotated[Path | None, typer.Option("-o", "--out", file_okay=False,
                                             help="Output folder (default: beside SOURCE).")] = None,
    precision: Annotated[Precision | None, typer.Option(
        help="Artifact precision (default fp32 for a checkpoint, the ONNX's own for an ONNX). fp16 keeps FP32 I/O "
             "and FP32 islands (normalisation, softmax, time embedding, DDIM update).")] = None,
    fmt: Annotated[Format | None, typer.Option("--format", help=(
        "onnx: ONNX only; trt: ONNX + TensorRT plan (fails if TensorRT is missing); all: every artifact this "
        "machine can build (TensorRT skipped with a note). Default: all for a checkpoint, trt for an ONNX."))] = None,
    model: Annotated[Model | None, typer.Option(help="Which EMA estimator: derain (model A, default) or rain "
                                                     "(model B).")] = None,
    steps: Annotated[int | None, typer.Option(
        callback=check_steps,
        help="DDIM steps verification runs, 2..1000; also the manifest's default unless --default-steps "
             "(default 10).")] = None,
    default_steps: Annotated[int | None, typer.Option(
        callback=check_steps,
        help=f"The steps the runtime runs by default, stored in the manifest ({STEPS_RANGE}); default: "
             "--steps. A checkpoint only.")] = None,
    refine_strength: Annotated[float | None, typer.Option(
        callback=check_refine_strength,
        help="Predict-and-refine models: the share a of the refiner's correction the runtime keeps, "
             "P(y) + a * (x_0 - P(y)), in (0, 2], stored in the manifest; default 1 (x_0 as Algorithm 2 "
             "returns it). A checkpoint only.")] = None,
    noise_scale: Annotated[float | None, typer.Option(
        callback=check_noise_scale,
        help="Predict-and-refine models: the runtime starts the DDIM loop from x_T = s * N(0, I), s in [0, 1], "
             "stored in the manifest; 0 starts it from x_T = 0, the noise's mean; default 1 "
             "(Algorithm 2's x_T). A checkpoint only.")] = None,
    refine_lowpass: Annotated[float | None, typer.Option(
        callback=check_refine_lowpass, metavar="SIGMA",
        help="Predict-and-refine models: the runtime keeps only the low frequencies of the refiner's "
             "correction, P(y) + a * G(x_0 - P(y)), G a Gaussian blur of SIGMA pixels over the whole frame, "
             "stored in the manifest; default 0 (the whole correction). A checkpoint only.")] = None,
    name: Annotated[str, typer.Option(help="Artifact stem: NAME.onnx, NAME.fp16.onnx, NAME.trt.plan.")] = "model",
    min_size: Annotated[str | None, typer.Option(
        help=f"Engine profile minimum frame HxW, height x width ({_profile_default('min')}); also the size "
             "verification runs the whole DDIM loop at.")] = None,
    opt_size: Annotated[str | None, typer.Option(
        help=f"Engine profile optimum HxW, height x width ({_profile_default('opt')}).")] = None,
    max_size: Annotated[str | None, typer.Option(
        help=f"Engine profile maximum HxW, height x width ({_profile_default('max')}); a larger one only pays "
             "with a tile= the runtime is told to use.")] = None,
    batch: Annotated[str | None, typer.Option(help="Engine batch range MIN..MAX or MIN..OPT..MAX "
                                                   f"({_profile_default('batch')}).")] = None,
    workspace_mib: Annotated[int | None, typer.Option("--workspace", min=1, help="TensorRT workspace limit in MiB "
                                                                               "(default 2048).")] = None,
    opt_level: Annotated[int | None, typer.Option(min=0, max=5, help="TensorRT builder optimisation level 0-5 "
                                                                      "(default 3).")] = None,
    timing_cache: Annotated[Path | None, typer.Option(dir_okay=False, help=(
        "TensorRT timing cache file, loaded if present and updated (default: OUT/timing.cache)."))] = None,
    version_compatible: Annotated[bool, typer.Option("--version-compatible", help=(
        "TensorRT: build a version-compatible plan (runs on this TensorRT release and later ones of the same major "
        "version, a TensorRT 10 plan also on 11; can be slower; it carries host code, so load only plans you "
        "trust)."))] = False,
    calib: Annotated[Path | None, typer.Option(help=(
        "Calibration image folder of real rainy photos, for precisions that need one (INT8)."))] = None,
    calib_images: Annotated[int | None, typer.Option(min=1, help=(
        "INT8: how many calibration images to record whole DDIM trajectories on (default 8)."))] = None,
    calib_method: Annotated[str | None, typer.Option(help=(
        "INT8: activation range method minmax|percentile|entropy (default minmax: within 0.5 dB of the others, "
        "7x faster than entropy; see calibration/README.md)."))] = None,
    calib_target_psnr: Annotated[float | None, typer.Option(help=(
        "INT8: if the held-out end-to-end PSNR vs FP32 is under this (dB), keep the most sensitive layers FP32 "
        "(measured one by one; minutes) until it is reached. Default: no search."))] = None,
    calib_max_fp32: Annotated[int | None, typer.Option(min=0, help=(
        "INT8: at most this many layers kept FP32 by --calib-target-psnr (default 4)."))] = None,
    seed: Annotated[int, typer.Option(help="Seed of the verification noise.")] = 0,
    simplify: Annotated[bool, typer.Option("--simplify/--no-simplify", help=(
        "Run onnxslim on the export (off: measured no latency gain, see docs/export.md)."))] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
    debug: _Debug = False,
) -> None:
    """Export, verify and build: checkpoint -> ONNX (-> FP16 ONNX) -> TensorRT plan."""
    from rd_export.pipeline import BuildOptions, parse_batch, parse_size
    from rd_export.pipeline import build as run_build

    console = _console()

    def go():
        opts = BuildOptions(
            precision=precision.value if precision else None, fmt=fmt.value if fmt else None,
            model=model.value if model else None, steps=steps, default_steps=default_steps,
            refine_strength=refine_strength, noise_scale=noise_scale, refine_lowpass=refine_lowpass,
            name=name,
            min_size=parse_size(min_size, "--min-size"), opt_size=parse_size(opt_size, "--opt-size"),
            max_size=parse_size(max_size, "--max-size"), batch=parse_batch(batch), seed=seed, simplify=simplify,
            workspace=workspace_mib * (1 << 20) if workspace_mib else None, opt_level=opt_level,
            timing_cache=timing_cache or ((out or source.parent) / "timing.cache"),
            version_compatible=version_compatible,
            options={"calib": calib, "calib_images": calib_images, "method": calib_method,
                     "target_psnr_db": calib_target_psnr, "max_fp32_layers": calib_max_fp32},
        )
        result = run_build(source, out, opts, progress=lambda msg: console.print(f"[bold cyan]>[/] {escape(msg)}"))
        for note in result.notes:
            console.print(f"[yellow]note:[/] {escape(note)}")
        if as_json:
            _echo_json(result.to_dict())
            return
        table = Table(title="rd-export build", title_justify="left")
        for col in ("artifact", "size", "precision", "verification"):
            table.add_column(col)
        for a in result.artifacts:
            ref = {"torch": "vs torch", "fp32": "vs FP32 ONNX", "onnx": "vs ONNX"}.get(a.reference or "", "")
            table.add_row(escape(str(a.path)), _fmt_size(a.size_bytes), a.precision,
                          f"{_fmt_psnr(a.psnr_db)} {ref}".strip())
        console.print(table)

    _run(go, debug)


@app.command()
def inspect(
    artifact: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True,
                                             help="An .onnx or .trt.plan artifact.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print everything as JSON on stdout.")] = False,
    debug: _Debug = False,
) -> None:
    """Show an artifact's manifest and I/O signature."""
    from rd_export.pipeline import inspect_artifact

    def go():
        info = inspect_artifact(artifact)
        if as_json:
            _echo_json(info)
            return
        out = Console(soft_wrap=True, highlight=False, markup=False)
        m = info.get("manifest")
        out.print(f"{artifact} ({_fmt_size(info['size_bytes'])})")
        if m is None:
            out.print(f"no manifest: {info.get('manifest_error')}")
        else:
            hash_state = "ok" if info.get("hash_ok") else f"MISMATCH ({info.get('hash_error')})"
            out.print(f"format {m['format']}, precision {m['precision']}, model {m['model']}, sha256 {hash_state}")
            d = m["descriptor"]
            p = d["profile"]
            out.print(f"size multiple {d['size_multiple']}; profile batch {p['min_batch']}..{p['opt_batch']}.."
                      f"{p['max_batch']}, HxW {p['min_size']}..{p['opt_size']}..{p['max_size']}")
            s = m["schedule"]
            out.print(f"schedule T={s['num_train_timesteps']} betas {s['beta_start']}..{s['beta_end']}, "
                      f"default steps {s.get('default_steps', 10)}")
            if m.get("fp32_islands"):
                out.print("fp32 islands: " + ", ".join(f"{i['name']} ({i['nodes']} nodes)" for i in m["fp32_islands"]))
            if m.get("tensorrt"):
                t = m["tensorrt"]
                out.print(f"TensorRT {t['version']} on {t['gpu_name']} (sm {t['compute_capability']})")
            v = m.get("verification")
            if v:
                out.print(f"verification vs {v.get('reference')}: PSNR {_fmt_psnr(v.get('psnr_db'))}, per-step max "
                          f"abs {v.get('per_step_max_abs', float('nan')):.3g}, passed {v.get('passed')}")
        table = Table(title="I/O", title_justify="left")
        for col in ("", "name", "dtype", "shape"):
            table.add_column(col)
        for kind in ("inputs", "outputs"):
            for s in info["io"][kind]:
                table.add_row(kind[:-1], s["name"], s["dtype"], "[" + ", ".join(str(x) for x in s["shape"]) + "]")
        out.print(table)
        if "nodes" in info:
            out.print(f"opset {info['opset']}, {info['nodes']} nodes")

    _run(go, debug)


@app.command()
def verify(
    artifact: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True,
                                             help="An .onnx (or, with TensorRT, .trt.plan) artifact.")],
    checkpoint: Annotated[Path, typer.Option(exists=True, dir_okay=False, readable=True,
                                             help="The checkpoint the artifact was exported from.")],
    steps: Annotated[int | None, typer.Option(
        callback=check_steps, help=f"DDIM steps, {STEPS_RANGE} (default: the manifest's).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the verification noise.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
    debug: _Debug = False,
) -> None:
    """Re-run verification of an artifact against the checkpoint's torch model."""
    from rd_export.pipeline import reverify

    console = _console()

    def go():
        report, error = reverify(artifact, checkpoint, steps=steps, seed=seed,
                                 progress=lambda msg: console.print(f"[bold cyan]>[/] {escape(msg)}"))
        if as_json:
            _echo_json(report)
        else:
            table = Table(title=f"verify {artifact.name} vs torch", title_justify="left")
            for col in ("step", "t", "max |error|"):
                table.add_column(col)
            for r in report["per_step"]:
                table.add_row(r["at"], str(r["t"]), f"{r['max_abs']:.3g}")
            for r in report.get("shapes", []):
                table.add_row("shape " + "x".join(map(str, r["shape"])), str(r["t"]), f"{r['max_abs']:.3g}")
            console.print(table)
            console.print(f"end-to-end PSNR {_fmt_psnr(report['psnr_db'])} ({report['steps']} steps); "
                          f"thresholds {report['thresholds']}")
            if not report.get("checkpoint_matches_manifest", True):
                console.print("[yellow]note:[/] this checkpoint's sha256 differs from the one in the manifest")
        if error is not None:
            raise error
        if not as_json:
            console.print("[green]passed[/]")

    _run(go, debug)


@app.command()
def triton(
    artifact: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True, help=(
        "A TensorRT .trt.plan (GPU repository: the plan as a tensorrt_plan model + a Python BLS model running "
        "the DDIM loop) or an .onnx (CPU repository: a Python model running the runtime on onnxruntime), "
        "with its .json manifest beside it."))],
    out: Annotated[Path, typer.Option("-o", "--out", file_okay=False, help="The model repository folder to write.")],
    steps: Annotated[int | None, typer.Option(callback=check_steps, help=(
        "DDIM steps the served model runs, 2 or more (default: the manifest's).")) ] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the initial noise (same seed, same output).")] = 0,
    instances: Annotated[int, typer.Option(min=1, help="Instances of the served model (each its own runtime on "
                                                       "CPU; BLS loops on GPU).")] = 1,
    gpu_instances: Annotated[int, typer.Option(min=1, help="GPU instances of each TensorRT plan model.")] = 1,
    max_batch: Annotated[int | None, typer.Option(min=1, help=(
        "Frames Triton's dynamic batcher may put in one batch (default: the plan's max batch; 8 on CPU).")) ] = None,
    queue_delay_us: Annotated[int, typer.Option(min=0, help="How long a request may wait for others to batch "
                                                           "with, in microseconds.")] = 2000,
    max_pixels: Annotated[int, typer.Option(min=0, help="Refuse frames with more pixels (0: no limit; default "
                                                       "3840x2160).")] = 3840 * 2160,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU repository: onnxruntime threads per instance "
                                                            "(default: the cores shared out).")] = None,
    name: Annotated[str, typer.Option(help="Model name in the repository (the GPU plans get NAME_step, "
                                           "NAME_prologue).")] = "derain",
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists and is not empty.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the repository's layout as JSON on stdout.")] = False,
    debug: _Debug = False,
) -> None:
    """Write a Triton Inference Server model repository for ARTIFACT (see docs/serving.md)."""
    from rd_export.triton import TritonOptions, export_triton

    console = _console()

    def go():
        opts = TritonOptions(model_name=name, steps=steps, seed=seed, instances=instances,
                             gpu_instances=gpu_instances, max_batch=max_batch, queue_delay_us=queue_delay_us,
                             max_pixels=max_pixels, threads=threads)
        repo = export_triton(artifact, out, opts, force=force)
        files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
        if as_json:
            _echo_json({"repository": str(repo), "models": sorted(p.name for p in repo.iterdir() if p.is_dir()),
                        "files": files})
        else:
            console.print(f"[green]wrote[/] {escape(str(repo))}: " + ", ".join(escape(f) for f in files))

    _run(go, debug)


if __name__ == "__main__":  # pragma: no cover
    app()
