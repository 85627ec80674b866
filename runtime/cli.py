"""``rd-run``: derain photos, videos and camera streams with an exported model (no PyTorch needed).

A thin typer app: each command parses its options and calls the library (runtime.batch,
runtime.video, runtime.evaluate, runtime.bench, runtime.stream). Progress and messages go to
stderr; ``--json`` puts the machine-readable result on stdout. Every toolkit error becomes one
line ``rd-run: error: ...`` and its exit code (``--debug`` shows the traceback instead).

Tests (and embedders) replace ``derainer_factory`` to run without a model.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from runtime.cli_errors import (
    HELP_OPTIONS,
    STEPS_RANGE,
    Terminated,
    check_noise_scale,
    check_refine_lowpass,
    check_refine_strength,
    check_steps,
    error_exits,
    one_line_group,
    parse_hw,
)
from runtime.errors import EXIT_CODES, ArtifactError, InputError, RDError, UsageError
from runtime.io import DEFAULT_MAX_PIXELS

ASSETS = Path(__file__).resolve().parent / "assets"


def shipped_models() -> dict[str, Path]:
    """The shipped models ``rd-run info`` lists, named by runtime.derainer.SHIPPED_MODELS:
    --precision fp32, --precision int8 (the x86 CPU graph), and the s8 Q/DQ graph TensorRT builds
    its INT8 plan from."""
    from runtime.derainer import SHIPPED_MODELS

    (fp32,), (int8, int8_s8) = SHIPPED_MODELS["fp32"], SHIPPED_MODELS["int8"]
    return {"fp32": ASSETS / fp32, "int8": ASSETS / int8, "int8 s8 (TensorRT's)": ASSETS / int8_s8}


def _default_derainer_factory(artifact: str | Path | None = None, **options: Any):
    from runtime.derainer import Derainer

    fp32 = shipped_models()["fp32"]
    if artifact is None and not fp32.is_file():
        raise ArtifactError(f"no default model is installed ({fp32} is missing); pass "
                            f"--engine model.onnx (made with 'rd-export build checkpoint.pt')")
    return Derainer(artifact, **options)


#: ``factory(artifact_or_None, *, steps, seed, tile, overlap, device, threads, batch[, refine_strength,
#: noise_scale, refine_lowpass]) -> Derainer`` (the last three only when given).
#: Replaced by tests (a fake derainer) and by embedders; None = the model shipped in the package.
derainer_factory: Callable[..., Any] = _default_derainer_factory

_EXIT_EPILOG = "\b\nExit codes:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items())

app = typer.Typer(
    name="rd-run",
    help="Derain photos, videos and camera streams with a RainDiffusion model (CPU or GPU, no PyTorch).\n\n"
         "Without --engine the model shipped in the package is used.",
    epilog=_EXIT_EPILOG,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings=HELP_OPTIONS,
    cls=one_line_group("rd-run: "),
)


def _shipped_tile() -> str:
    """The shipped model's native tile size, as its manifest records it (for --tile's help)."""
    try:
        manifest = json.loads((ASSETS / "default.json").read_text())
        native = manifest.get("native_tile") or manifest["descriptor"]["profile"]["max_size"][0]
        return f"{int(native)}x{int(native)}"
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return "64x64"


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"
    openvino = "openvino"
    auto = "auto"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    int8 = "int8"


# --------------------------------------------------------------------------- shared options

EngineOpt = Annotated[Path | None, typer.Option(
    "--engine", "-e", exists=True, dir_okay=False, readable=True, metavar="ART",
    help="Model artifact: an .onnx file or a TensorRT .trt.plan, with its .json manifest beside it. "
         "Default: the model shipped in the package (runtime/assets/default.onnx).")]
PrecisionOpt = Annotated[Precision | None, typer.Option(
    "--precision", case_sensitive=False,
    help="Which shipped model to use when --engine is not given: auto (default: int8 where the model runs on "
         "OpenVINO on an AVX512_VNNI CPU without native BF16, 1.6x there; fp32 elsewhere), fp32, or int8 "
         "(runtime/assets/default.int8.cpu.onnx: faster on some CPUs, slower on others: docs/benchmarks.md). "
         "Not combinable with --engine: an artifact's precision is in its manifest.")]
StepsOpt = Annotated[int | None, typer.Option(
    "--steps", "-s", callback=check_steps, metavar="S",
    help=f"DDIM sampling steps, {STEPS_RANGE}; one step of Algorithm 2 is at t = 1 and returns the noise. "
         "Default: the model's own (manifest 'default_steps'; 2 for the shipped model). Fewer is faster.")]
SeedOpt = Annotated[int, typer.Option(
    "--seed", metavar="N", help="Seed of the initial noise; the same seed and input give the same output (no effect "
         "at --noise-scale 0, the shipped model's default: its loop starts from x_T = 0).")]
TileOpt = Annotated[int | None, typer.Option(
    "--tile", min=16, metavar="P",
    help="Derain in PxP tiles blended over --overlap pixels at every step (P a multiple of the model's size "
         "multiple). Default: the model's native tile size, the largest frame of its manifest's profile: "
         "frames up to it run whole, larger ones are tiled at it. The shipped model's native tile is "
         f"{_shipped_tile()}, so it tiles every frame larger than that (it does not generalise beyond "
         "the crop it was trained on).")]
OverlapOpt = Annotated[int | None, typer.Option(
    "--overlap", min=0, metavar="O",
    help="Overlap between neighbouring tiles, in pixels. Default: an eighth of the tile, at most 32 (8 for the "
         "shipped model's 64-px tiles).")]
RefineOpt = Annotated[float | None, typer.Option(
    "--refine-strength", metavar="A", callback=check_refine_strength,
    help="Predict-and-refine models: keep the share A of the refiner's correction, P(y) + A * (x_0 - P(y)), "
         "0 < A <= 2. Default: the model's own (manifest 'prologue.refine_strength'; 0.5 for the shipped "
         "model, 1 where it does not say).")]
NoiseOpt = Annotated[float | None, typer.Option(
    "--noise-scale", metavar="S", callback=check_noise_scale,
    help="Predict-and-refine models: start the DDIM loop from x_T = S * N(0, I), 0 <= S <= 1; 0 starts it "
         "from x_T = 0, the noise's mean (the output no longer depends on --seed). Default: the "
         "model's own (manifest 'prologue.noise_scale'; 0 for the shipped model, 1 where it does not say).")]
LowpassOpt = Annotated[float | None, typer.Option(
    "--refine-lowpass", metavar="SIGMA", callback=check_refine_lowpass,
    help="Predict-and-refine models: keep only the low frequencies of the refiner's correction, P(y) + A * "
         "G(x_0 - P(y)) with G a Gaussian blur of SIGMA pixels over the whole frame; 0 keeps the whole "
         "correction. Default: the model's own (manifest 'prologue.refine_lowpass'; 8 for the shipped model, 0 "
         "where it does not say).")]
BatchOpt = Annotated[int | None, typer.Option(
    "--batch", "-b", min=1, metavar="B",
    help="Frames per inference call: consecutive images of equal size, or video frames (and tiles per "
         "call when tiling). Higher can be faster on a GPU; uses more memory. Default: one frame at a "
         "time, tiles batched up to the engine's profile (OpenVINO: 32 tiles per call, measured fastest).")]
ThreadsOpt = Annotated[int | None, typer.Option(
    "--threads", "-t", min=1, metavar="T", help="CPU threads for the inference engine. Default: the engine's choice.")]
DeviceOpt = Annotated[Device | None, typer.Option(
    "--device", case_sensitive=False,
    help="Where to run: cpu (onnxruntime), cuda (onnxruntime-gpu, or a TensorRT plan), openvino "
         "(the CPU through OpenVINO, BF16 on CPUs with AMX / AVX512_BF16; pip install "
         "'raindiffusion-edge[openvino]'), or auto (openvino where it is installed and the CPU has native "
         "BF16 or, for an INT8 model, AVX512_VNNI, else cpu). Default: auto for .onnx (the environment "
         "variable RD_DEVICE changes it, e.g. RD_DEVICE=cpu), cuda for .plan.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the machine-readable result as JSON on stdout.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="On an error, show the full traceback instead of one line.")]
MaxPixelsOpt = Annotated[int, typer.Option(
    "--max-pixels", min=0, metavar="N",
    help="Refuse images with more than N pixels (a guard against decompression bombs); 0 = no limit. "
         "Also settable with the environment variable RD_MAX_PIXELS.")]


# --------------------------------------------------------------------------- error handling


def _say(message: str, kind: str = "error") -> None:
    text = " ".join(str(message).split("\n")).strip()
    typer.echo(f"rd-run: {kind}: {text}", err=True)


def _guard(debug: bool, json_out: bool = False):
    """Turn toolkit errors into one line on stderr and their exit code (STYLE #11)."""
    return error_exits(_say, debug=debug, report=_emit_json if json_out else None)


def _emit_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


# --------------------------------------------------------------------------- engine


def resolve_engine(engine: Path | None, precision: Precision | None) -> Path | None:
    """The artifact to load: ``engine``, the shipped model of an explicit precision, or None (the
    shipped model of the precision the Derainer picks for its device: ``--precision auto``)."""
    if engine is not None:
        if precision not in (None, Precision.auto):
            raise UsageError("--precision picks one of the shipped models; with --engine the artifact's own "
                             "precision (from its manifest) applies: drop --precision")
        return engine
    if precision in (None, Precision.auto):
        return None
    from runtime.derainer import default_artifact

    try:  # int8: the x86 CPU graph (.int8.cpu.onnx) where shipped, else the TensorRT-style .int8.onnx
        return default_artifact(precision.value)
    except ArtifactError as e:
        instead = "--precision fp32 or --engine ART" if precision is Precision.int8 else "--engine ART"
        raise ArtifactError(f"--precision {precision.value}: {e}; use {instead}") from None


def make_derainer(engine: Path | None, precision: Precision | None, *, steps: int | None = None, seed: int = 0,
                  tile: int | None = None, overlap: int | None = None, device: Device | None = None,
                  threads: int | None = None, batch: int | None = None, refine_strength: float | None = None,
                  noise_scale: float | None = None, refine_lowpass: float | None = None):
    if tile is not None and overlap is not None and overlap >= tile:
        raise UsageError(f"--overlap {overlap} must be smaller than --tile {tile}")
    artifact = resolve_engine(engine, precision)
    extra = {k: v for k, v in (("refine_strength", refine_strength), ("noise_scale", noise_scale),
                                ("refine_lowpass", refine_lowpass))
             if v is not None}  # only when given
    return derainer_factory(artifact, steps=steps, seed=seed, tile=tile, overlap=overlap,
                            device=device.value if device is not None else None, threads=threads, batch=batch,
                            **extra)


def engine_info(derainer: Any, engine: Path | None, device: Device | None, threads: int | None) -> dict[str, Any]:
    manifest = getattr(derainer, "manifest", None)
    backend = getattr(derainer, "backend", None)
    artifact = getattr(derainer, "artifact", None) or engine
    info = {
        "artifact": str(artifact) if artifact is not None else "default",
        "backend": getattr(derainer, "backend_name", None),
        "precision": getattr(manifest, "precision", None),
        "steps": getattr(derainer, "steps", None),
        "device": getattr(backend, "device", None) or getattr(derainer, "device", None)
        or (device.value if device is not None else None),
        "threads": getattr(backend, "threads", None) or getattr(derainer, "threads", None) or threads,
    }
    # predict-and-refine: what the output was sampled with
    for key in ("refine_strength", "noise_scale", "refine_lowpass"):
        if (value := getattr(derainer, key, None)) is not None and getattr(backend, "has_prologue", False):
            info[key] = value
    if getattr(backend, "inference_precision", None):  # OpenVINO: the arithmetic it chose for this CPU
        info["inference_precision"] = backend.inference_precision
    providers = getattr(backend, "providers", None)
    if providers is not None:
        with contextlib.suppress(Exception):
            info["providers"] = list(providers() if callable(providers) else providers)
    return info


def _close(derainer: Any) -> None:
    close = getattr(derainer, "close", None)
    if callable(close):
        with contextlib.suppress(Exception):
            close()


# --------------------------------------------------------------------------- derain


class _RichBatchObserver:
    """Progress bar on stderr (terminals only) and one line per failure or warning (always)."""

    def __init__(self, console, show_bar: bool) -> None:
        self.console = console
        self.progress = None
        self.files_task = self.frames_task = None
        if show_bar:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=console, transient=True)

    def __enter__(self):
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def start(self, total: int) -> None:
        if self.progress is not None:
            self.files_task = self.progress.add_task("files", total=total)

    def file_started(self, item, index: int) -> None:
        if self.progress is None:
            return
        self.progress.update(self.files_task, description=f"{item.source.name[:40]}")
        if self.frames_task is not None:
            self.progress.remove_task(self.frames_task)
            self.frames_task = None

    def frames(self, done: int, total: int | None) -> None:
        if self.progress is None:
            return
        if self.frames_task is None:
            self.frames_task = self.progress.add_task("  frames", total=total)
        self.progress.update(self.frames_task, completed=done)

    def file_done(self, result) -> None:
        for w in result.warnings:
            self._line(f"rd-run: warning: {w}")
        if result.status == "failed":
            self._line(f"rd-run: failed: {result.error}")
        if self.progress is not None:
            self.progress.advance(self.files_task)

    def _line(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            typer.echo(text, err=True)


@app.command(epilog=_EXIT_EPILOG)
def derain(
    inputs: Annotated[list[str], typer.Argument(
        metavar="INPUT",
        help="Image or video files, folders, or quoted glob patterns ('in/**/*.jpg'). Folders are read "
             "top-level only unless --recursive. Images: png jpg jpeg bmp tif tiff webp ppm pgm; "
             "videos: mp4 mov mkv avi.")],
    output_dir: Annotated[Path, typer.Option(
        "--output-dir", "-o", file_okay=False, metavar="OUTDIR",
        help="Where outputs go: OUTDIR/<name relative to its input folder>, same extension. Created if "
             "needed. An output directory inside an input folder is never read as input.")],
    engine: EngineOpt = None,
    precision: PrecisionOpt = None,
    steps: StepsOpt = None,
    seed: SeedOpt = 0,
    tile: TileOpt = None,
    overlap: OverlapOpt = None,
    refine_strength: RefineOpt = None,
    noise_scale: NoiseOpt = None,
    refine_lowpass: LowpassOpt = None,
    batch: BatchOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
    recursive: Annotated[bool, typer.Option(
        "--recursive", "-r",
        help="Descend into sub-folders of input folders (the folder layout is kept in OUTDIR).")] = False,
    suffix: Annotated[str, typer.Option(
        "--suffix", metavar="TEXT",
        help="Add TEXT to each output name before the extension (photo.jpg -> photo_derained.jpg with "
             "--suffix _derained). Needed when OUTDIR is an input folder.")] = "",
    skip_existing: Annotated[bool, typer.Option(
        "--skip-existing",
        help="Skip inputs whose output already exists (resume an interrupted run). Without it, rd-run's "
             "own earlier outputs are replaced (atomically). A file rd-run did not write is never replaced: "
             "that input fails (is skipped, with --skip-existing) and says why.")] = False,
    strip_metadata: Annotated[bool, typer.Option(
        "--strip-metadata",
        help="Write outputs without the input's photo metadata. Default: the ICC colour profile, EXIF "
             "(camera, date, GPS; orientation reset to 1, the pixels being upright) and DPI are kept where "
             "the output format can hold them.")] = False,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Derain images and videos into an output folder.

    Never loses work: each output is written to a hidden temporary file and renamed when complete;
    an input, or any file rd-run did not write, is never overwritten (OUTDIR/.rd-run-outputs.jsonl
    records its outputs); a file that fails is reported and the rest go on (exit 7); Ctrl-C stops
    cleanly (exit 130) and --skip-existing resumes; leftovers of a killed run are removed. Two runs
    on one OUTDIR share the work: each output is locked while written, and the other run skips it.
    Nothing matched by the inputs is a usage error (exit 2). Alpha channels pass through untouched;
    grayscale inputs come back grayscale; 16-bit inputs are written as 8-bit (with a warning);
    animated WebP/PNG and multi-page TIFF are derained frame by frame. Videos keep their frame
    count, frame rate and audio (needs PyAV: the [video] extra); a truncated video gives the frames
    there were, status 'partial' and a warning (exit 7).
    """
    from runtime.batch import BatchRunner, discover_inputs

    console = _stderr_console()
    runner = None
    warnings: list[str] = []

    def report_error(d: dict) -> None:  # --json on an error before the batch: the reason and the warnings
        from runtime.batch import BatchReport

        _emit_json({"command": "derain", "version": _version(), "output_dir": str(output_dir), "files": [],
                    "totals": BatchReport().totals(), "warnings": warnings, **d})

    with error_exits(_say, debug=debug, report=report_error if json_out else None):
        if output_dir.exists() and not output_dir.is_dir():
            raise UsageError(f"--output-dir {output_dir} exists and is not a directory")
        items, found_warnings = discover_inputs(inputs, outdir=output_dir, recursive=recursive, suffix=suffix)
        warnings.extend(found_warnings)
        for w in warnings:
            _say(w, "warning")
        if not items:
            raise UsageError("nothing to derain: " + "; ".join(warnings or ["no inputs"]))
        if tile is not None and overlap is not None and overlap >= tile:
            raise UsageError(f"--overlap {overlap} must be smaller than --tile {tile}")
        resolve_engine(engine, precision)  # fail fast on option errors, before any work
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"--output-dir {output_dir}: cannot create it ({e.strerror or e})") from None
        if not os.access(output_dir, os.W_OK | os.X_OK):
            raise InputError(f"--output-dir {output_dir}: not writable")

        def factory():
            return make_derainer(engine, precision, steps=steps, seed=seed, tile=tile, overlap=overlap,
                                 device=device, threads=threads, batch=batch,
                                 refine_strength=refine_strength, noise_scale=noise_scale,
                                 refine_lowpass=refine_lowpass)

        observer = _RichBatchObserver(console, show_bar=console.is_terminal and not debug)
        runner = BatchRunner(items, output_dir, factory, suffix=suffix, skip_existing=skip_existing,
                             max_pixels=max_pixels, batch=batch or 1, observer=observer, strip_metadata=strip_metadata)
        runner.report.warnings.extend(warnings)
        stopped: KeyboardInterrupt | None = None
        try:
            with observer:
                runner.run()
        except KeyboardInterrupt as e:
            stopped = e  # the report so far is still printed (and --json emitted) below
        try:
            code = _finish_derain(runner, engine, device, threads, json_out, console,
                                  terminated=isinstance(stopped, Terminated))
        finally:
            _close(runner._derainer)
        if stopped is not None:
            raise typer.Exit(143 if isinstance(stopped, Terminated) else 130)
    raise typer.Exit(code)


def _finish_derain(runner, engine, device, threads, json_out: bool, console, terminated: bool = False) -> int:
    report = runner.report
    t = report.totals()
    if report.interrupted:
        what = "terminated" if terminated else "interrupted"
        _say(f"{what} after {t['ok']} ok, {t['skipped']} skipped, {t['failed']} failed of {t['files']}; "
             f"no partial files left; rerun with --skip-existing to resume", "error")
    else:
        partial = f", {t['partial']} partial" if t["partial"] else ""
        typer.echo(f"rd-run: {t['files']} files: {t['ok']} ok, {t['skipped']} skipped, {t['failed']} failed"
                   f"{partial} in {t['seconds']:.1f} s", err=True)
    if report.removed:
        _say(f"removed {len(report.removed)} leftover temporary/lock file(s) of an earlier killed run: "
             + ", ".join(Path(p).name for p in report.removed), "note")
    if json_out:
        out = {"command": "derain", "version": _version(), "output_dir": str(runner.outdir)}
        d = report.to_dict()
        out.update(d)
        if terminated:
            out["exit_code"] = 143
        if runner._derainer is not None:
            out["engine"] = engine_info(runner._derainer, engine, device, threads)
        _emit_json(out)
    return report.exit_code


# --------------------------------------------------------------------------- eval


@app.command("eval", epilog=_EXIT_EPILOG)
def eval_cmd(
    rainy: Annotated[Path, typer.Option("--rainy", exists=True, file_okay=False, metavar="DIR",
                                        help="Folder of rainy images.")],
    clean: Annotated[Path, typer.Option("--clean", exists=True, file_okay=False, metavar="DIR",
                                        help="Folder of the clean ground truth; pairs are matched by file "
                                             "name stem (rain/12.jpg <-> clean/12.png).")],
    engine: EngineOpt = None,
    precision: PrecisionOpt = None,
    steps: StepsOpt = None,
    seed: SeedOpt = 0,
    tile: TileOpt = None,
    overlap: OverlapOpt = None,
    refine_strength: RefineOpt = None,
    noise_scale: NoiseOpt = None,
    refine_lowpass: LowpassOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
    save: Annotated[Path | None, typer.Option(
        "--save", file_okay=False, metavar="DIR",
        help="Also write a side-by-side PNG panel per pair (rainy | derained | clean) into DIR.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, metavar="N",
                                              help="Evaluate only the first N pairs (natural name order).")] = None,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """PSNR and SSIM on the Y channel (BT.601), per pair and mean, as deraining papers report them.

    Next to the model's scores it prints two baselines: the rainy input as is, and the rainy input
    after its best global brightness shift ('matched'). Rain brightens images, so darkening alone
    beats the raw input; claim deraining only above 'matched'. Files without a partner are listed;
    a pair that cannot be scored is reported and the rest go on (exit 7).
    """
    from runtime.evaluate import EvalReport, evaluate, pair_folders

    console = _stderr_console()
    report = EvalReport()
    with _guard(debug, json_out):
        pairs, problems = pair_folders(rainy, clean)
        for p in problems:
            _say(p, "warning")
        report.problems = problems
        if limit is not None:
            pairs = pairs[:limit]
        if not pairs:
            raise InputError(f"no rainy/clean pairs in {rainy} and {clean} (pairs are matched by file name stem)")
        derainer = make_derainer(engine, precision, steps=steps, seed=seed, tile=tile, overlap=overlap,
                                 device=device, threads=threads,
                                 refine_strength=refine_strength, noise_scale=noise_scale,
                                 refine_lowpass=refine_lowpass)

        def on_pair(s) -> None:  # the table goes to stdout, unless stdout carries the JSON
            if s.status == "failed":
                _say(s.error, "failed")
            else:
                typer.echo(f"{s.name:>12}  derained {s.psnr:6.2f} dB {s.ssim:.4f}   rainy {s.psnr_rainy:6.2f} dB "
                           f"{s.ssim_rainy:.4f}   matched {s.psnr_matched:6.2f} dB {s.ssim_matched:.4f}", err=json_out)

        stopped: KeyboardInterrupt | None = None
        try:
            evaluate(pairs, derainer, save_dir=save, max_pixels=max_pixels, on_pair=on_pair, report=report)
        except KeyboardInterrupt as e:
            stopped = e
        try:
            code = _finish_eval(report, derainer, engine, device, threads, json_out, console)
        finally:
            _close(derainer)
        if stopped is not None:
            raise typer.Exit(143 if isinstance(stopped, Terminated) else 130)
    raise typer.Exit(code)


def _finish_eval(report, derainer, engine, device, threads, json_out: bool, console) -> int:
    m = report.means()

    def f(v: float | None, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    n = len(report.scored)
    typer.echo(f"{'mean':>12}  derained {f(m['psnr'], '6.2f')} dB {f(m['ssim'], '.4f')}   "
               f"rainy {f(m['psnr_rainy'], '6.2f')} dB {f(m['ssim_rainy'], '.4f')}   "
               f"matched {f(m['psnr_matched'], '6.2f')} dB {f(m['ssim_matched'], '.4f')}   ({n} pairs, PSNR/SSIM "
               f"on Y; matched = the rainy input after its best global brightness shift)", err=json_out)
    if m.get("psnr_gain_over_matched") is not None:
        typer.echo(f"gain over the brightness-matched input: {m['psnr_gain_over_matched']:+.2f} dB "
                   f"(over the raw input: {m['psnr_gain_over_rainy']:+.2f} dB)", err=json_out)
    if json_out:
        out = {"command": "eval", "version": _version(), "engine": engine_info(derainer, engine, device, threads)}
        out.update(report.to_dict())
        _emit_json(out)
    return report.exit_code


# --------------------------------------------------------------------------- bench


@app.command(epilog=_EXIT_EPILOG)
def bench(
    engine: EngineOpt = None,
    precision: PrecisionOpt = None,
    size: Annotated[str, typer.Option("--size", metavar="HxW",
                                      help="Frame size HEIGHTxWIDTH, rows first as in rd-export's --max-size "
                                           "(1080x1920 is a 1080p frame), or one number for a square; a random "
                                           "frame of that size.")] = "512x512",
    steps: StepsOpt = None,
    batch: Annotated[int | None, typer.Option(
        "--batch", "-b", min=1, metavar="B",
        help="Frames per call (derain_batch when > 1), and tiles per engine call, as in rd-run derain. "
             "Default: one frame per call, tiles batched as rd-run derain does (the engine's choice).")] = None,
    warmup: Annotated[int, typer.Option("--warmup", min=0, metavar="N",
                                        help="Untimed calls first (engine warm-up, allocations).")] = 2,
    runs: Annotated[int, typer.Option("--runs", min=1, metavar="N", help="Timed calls.")] = 10,
    tile: TileOpt = None,
    overlap: OverlapOpt = None,
    refine_strength: RefineOpt = None,
    noise_scale: NoiseOpt = None,
    refine_lowpass: LowpassOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Measure latency per frame and per step (min / median / p95), frames per second and peak memory.

    Step latency is the frame latency divided by the number of steps. Peak memory is the process's
    peak resident set size (model loading included).
    """
    from runtime.bench import run_bench

    with _guard(debug, json_out):
        height, width = parse_hw(size, "--size")
        derainer = make_derainer(engine, precision, steps=steps, tile=tile, overlap=overlap, device=device,
                                 threads=threads, batch=batch,
                                 refine_strength=refine_strength, noise_scale=noise_scale,
                                 refine_lowpass=refine_lowpass)
        try:
            result = run_bench(derainer, width=width, height=height, batch=batch or 1, warmup=warmup, runs=runs,
                               steps=steps)
            result.update({"engine": engine_info(derainer, engine, device, threads)})
        finally:
            _close(derainer)
        info = result["engine"]
        result.update(backend=info["backend"], device=info["device"], threads=info["threads"],
                      precision=info["precision"], version=_version(), size=f"{height}x{width}")
        if "inference_precision" in info:
            result["inference_precision"] = info["inference_precision"]
        if json_out:
            _emit_json(result)
        else:
            rss = result["peak_rss_mib"]
            arith = f", {info['inference_precision']}" if "inference_precision" in info else ""
            step_line = (f"  step:  min {result['step_min_ms']:.2f}  median {result['step_median_ms']:.2f}  "
                         f"p95 {result['step_p95_ms']:.2f} ms\n" if result["steps"] else
                         "  step:  none (0 steps: the predictor alone)\n")
            engine = info["backend"] or "engine"
            device = info["device"]
            where = "" if not device else " on the CPU" if device == engine == "openvino" else f" on {device}"
            model = f", {info['precision']} model" if info.get("precision") else ""  # auto may pick INT8
            typer.echo(
                f"{engine}{where}{arith} ({info['threads'] or 'default'} threads){model}, "
                f"{height}x{width} (HxW), batch {batch or 1}, {result['steps']} steps, {runs} runs\n"
                f"  frame: min {result['frame_min_ms']:.1f}  median {result['frame_median_ms']:.1f}  "
                f"p95 {result['frame_p95_ms']:.1f} ms   ({result['fps']:.2f} fps)\n"
                + step_line +
                f"  peak RSS: {'n/a' if rss is None else f'{rss:.0f} MiB'}")


# --------------------------------------------------------------------------- stream


@app.command(epilog=_EXIT_EPILOG)
def stream(
    source: Annotated[str, typer.Option(
        "--source", metavar="SRC",
        help="Camera index (0), stream URL (rtsp://..., http://...) or a video file.")] = "0",
    engine: EngineOpt = None,
    precision: PrecisionOpt = None,
    steps: StepsOpt = None,
    seed: SeedOpt = 0,
    tile: TileOpt = None,
    overlap: OverlapOpt = None,
    refine_strength: RefineOpt = None,
    noise_scale: NoiseOpt = None,
    refine_lowpass: LowpassOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
    out: Annotated[Path | None, typer.Option(
        "--out", dir_okay=False, metavar="FILE",
        help="Record the derained frames to FILE (.mp4 or .avi), at the source's frame rate. "
             "Kept when you press Ctrl-C.")] = None,
    display: Annotated[bool, typer.Option("--display", help="Show the derained frames in a window (q quits; "
                                                            "needs opencv-python with GUI support).")] = False,
    max_frames: Annotated[int | None, typer.Option("--max-frames", min=1, metavar="N",
                                                   help="Stop after N derained frames.")] = None,
    drop: Annotated[bool | None, typer.Option(
        "--drop/--no-drop",
        help="Drop frames the model cannot keep up with, always deraining the newest one. Default: drop "
             "for cameras and URLs, not for files.")] = None,
    max_reconnects: Annotated[int | None, typer.Option(
        "--max-reconnects", min=0, metavar="N",
        help="Give up after N reconnect attempts when a live source drops (backoff 0.5 s doubling to 8 s). "
             "Default: retry forever.")] = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Derain a camera or stream live: a capture thread keeps only the newest frame, the model derains
    it, the rate is shown on stderr. Reconnects when a live source drops. Needs OpenCV (the [stream] extra).
    """
    from runtime.stream import run_stream

    interactive = sys.stderr.isatty()
    last_line = [0.0]

    def on_status(s) -> None:  # about once a second: a live line on a terminal, every 10 s in a log
        line = (f"stream: {s.frames} frames, {s.fps:.2f} fps (derain {s.derain_ms_mean:.0f} ms), "
                f"dropped {s.dropped}, reconnects {s.reconnects}")
        if interactive:
            sys.stderr.write("\r" + line + "  ")
            sys.stderr.flush()
        elif s.seconds - last_line[0] >= 10:
            last_line[0] = s.seconds
            typer.echo(f"rd-run: {line}", err=True)

    with _guard(debug, json_out):
        derainer = make_derainer(engine, precision, steps=steps, seed=seed, tile=tile, overlap=overlap,
                                 device=device, threads=threads,
                                 refine_strength=refine_strength, noise_scale=noise_scale,
                                 refine_lowpass=refine_lowpass)
        meta = engine_info(derainer, engine, device, threads)
        try:
            stats = run_stream(source, derainer, out=out, display=display, max_frames=max_frames, drop=drop,
                               max_reconnects=max_reconnects, on_status=on_status,
                               on_event=lambda msg: _say(msg, "warning"))
        finally:
            _close(derainer)
        if interactive:
            sys.stderr.write("\n")
        typer.echo(f"rd-run: stream: {stats.frames} frames in {stats.seconds:.1f} s ({stats.fps:.2f} fps, derain "
                   f"{stats.derain_ms_mean:.0f} ms/frame), dropped {stats.dropped}, reconnects {stats.reconnects}"
                   + (f", saved {stats.output}" if stats.output else ""), err=True)
        if stats.error:
            _say(stats.error)
        if json_out:
            d = {"command": "stream", "version": _version(), "source": source, "engine": meta}
            d.update(stats.to_dict())
            _emit_json(d)
        if stats.interrupted:
            raise typer.Exit(130)
        if stats.error:
            raise typer.Exit(3)


# --------------------------------------------------------------------------- info


def _version(dist: str = "raindiffusion-edge") -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect_info() -> dict[str, Any]:
    import importlib.util

    from runtime import __version__, extras

    versions: dict[str, str | None] = {"raindiffusion-edge": __version__, "python": platform.python_version()}
    for dist in ("numpy", "pillow", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt", "tensorrt-cu12",
                 "tensorrt-cu13", "cuda-python", "av", "opencv-python-headless", "opencv-python", "scikit-image",
                 "typer", "rich"):
        versions[dist] = _version(dist)
    backends: dict[str, Any] = {}
    if importlib.util.find_spec("onnxruntime") is not None:
        try:
            import onnxruntime as ort

            backends["onnxruntime"] = {"available": True, "providers": ort.get_available_providers()}
        except Exception as e:
            backends["onnxruntime"] = {"available": False, "error": f"{type(e).__name__}: {e}"}
    else:
        backends["onnxruntime"] = {"available": False, "install": extras.install_command("cpu")}
    from runtime.backends.openvino import probe

    backends["openvino"] = probe()
    if not backends["openvino"]["available"] and "error" not in backends["openvino"]:
        backends["openvino"]["install"] = extras.install_command("openvino")
    backends["tensorrt"] = {"available": importlib.util.find_spec("tensorrt") is not None,
                            "install": "pip install 'raindiffusion-edge[trt]'"}
    optional = {"video (PyAV)": importlib.util.find_spec("av") is not None,
                "stream (OpenCV)": importlib.util.find_spec("cv2") is not None,
                "eval (scikit-image)": importlib.util.find_spec("skimage") is not None}
    from runtime import cpu
    from runtime.backends import AUTO, DEVICE_ENV, OPENVINO, default_device, default_precision, onnx_device

    try:
        setting = default_device()
        ov = backends["openvino"]  # the probe above, not a second

        def engine(resolved: str) -> str:
            return {"cpu": "onnxruntime", OPENVINO: ("BF16" if ov.get("native_bf16") else "FP32") if ov["available"]
                    else "not installed"}.get(resolved, "onnxruntime-gpu")

        resolved = onnx_device(setting, openvino_probe=ov)
        precision = default_precision(setting, openvino_probe=ov)
        shipped = onnx_device(setting, precision=precision, openvino_probe=ov)
        device: dict[str, Any] = {"setting": setting, "from": DEVICE_ENV if os.environ.get(DEVICE_ENV, "").strip()
                                  else "default", "onnx": f"{resolved} ({engine(resolved)})",
                                  "shipped_model": f"{precision} on {shipped} ("
                                  + ("INT8 kernels" if precision == "int8" and shipped == OPENVINO else engine(shipped))
                                  + ")"}
        if setting == AUTO and not ov["available"] and cpu.has_native_bf16():
            device["hint"] = (f"this CPU has native BF16: {extras.install_command(OPENVINO)} makes auto run OpenVINO "
                              "in BF16 (2.3x onnxruntime at 720p, docs/benchmarks.md)")
        elif setting == AUTO and not ov["available"] and cpu.has_avx512_vnni():
            device["hint"] = (f"this CPU has AVX512_VNNI: {extras.install_command(OPENVINO)} makes auto run the "
                              "shipped INT8 model on OpenVINO (1.5x onnxruntime FP32 at 720p, docs/benchmarks.md)")
    except RDError as e:
        device = {"error": str(e)}
    models: dict[str, Any] = {}
    for precision, path in shipped_models().items():
        entry: dict[str, Any] = {"path": str(path), "installed": path.is_file()}
        if path.is_file():
            try:
                from runtime.manifest import Manifest

                m = Manifest.for_artifact(path)
                entry.update(precision=m.precision, model=m.model, format=m.format, sha256=m.sha256[:16],
                             default_steps=m.default_steps, toolkit_version=m.toolkit_version,
                             size_multiple=m.descriptor.get("size_multiple"), created=m.get("created"))
            except RDError as e:
                entry["error"] = str(e)
        models[precision] = entry
    return {"versions": versions, "platform": platform.platform(), "backends": backends,
            "default_device": device, "optional": optional, "default_models": models,
            "exit_codes": {str(k): v for k, v in EXIT_CODES.items()}}


@app.command(epilog=_EXIT_EPILOG)
def info(json_out: JsonOpt = False, debug: DebugOpt = False) -> None:
    """Versions, available inference backends and providers, and the shipped model's manifest."""
    with _guard(debug, json_out):
        data = collect_info()
        if json_out:
            _emit_json(data)
            return
        lines = ["versions:"]
        lines += [f"  {k}: {v}" for k, v in data["versions"].items() if v is not None]
        lines.append(f"platform: {data['platform']}")
        lines.append("backends:")
        for name, b in data["backends"].items():
            extra = f" providers: {', '.join(b['providers'])}" if b.get("providers") else ""
            if "native_bf16" in b:
                cache = b.get("cache_dir") or "off (RD_OPENVINO_CACHE)"
                extra += f" (native BF16: {'yes' if b['native_bf16'] else 'no'}; compile cache: {cache})"
            lines.append(f"  {name}: {'yes' if b['available'] else 'no'}{extra}")
        dev = data["default_device"]
        if "error" in dev:
            lines.append(f"default device: {dev['error']}")
        else:
            src = f" ({dev['from']})" if dev["from"] != "default" else ""
            lines.append(f"default device for .onnx: {dev['setting']}{src} -> {dev['onnx']}")
            lines.append(f"shipped model without --engine / --precision: {dev['shipped_model']}")
            if "hint" in dev:
                lines.append(f"  hint: {dev['hint']}")
        lines.append("optional: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in data["optional"].items()))
        lines.append("default models:")
        for precision, m in data["default_models"].items():
            if not m["installed"]:
                lines.append(f"  {precision}: not installed ({m['path']})")
            elif "error" in m:
                lines.append(f"  {precision}: {m['path']}: {m['error']}")
            else:
                lines.append(f"  {precision}: {m['path']} ({m['model']}, {m['format']} {m['precision']}, "
                             f"{m['default_steps']} steps, sha256 {m['sha256']}...)")
        typer.echo("\n".join(lines))


def _version_callback(value: bool) -> None:
    if value:
        from runtime import __version__

        typer.echo(f"rd-run {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True,
                                                help="Show the version and exit.")] = False) -> None:
    """Derain photos, videos and camera streams with a RainDiffusion model (CPU or GPU, no PyTorch).

    Without --engine the model shipped in the package is used.
    """


def main() -> None:  # pragma: no cover - console-script style entry for `python -m runtime.cli`
    app(prog_name="rd-run")


# --------------------------------------------------------------------------- serve (runtime.serving)


@app.command(epilog=_EXIT_EPILOG)
def serve(
    engine: EngineOpt = None,
    precision: PrecisionOpt = None,
    steps: StepsOpt = None,
    seed: SeedOpt = 0,
    host: Annotated[str, typer.Option("--host", metavar="ADDR", help=(
        "Address Triton listens on (HTTP, gRPC and metrics). The default serves this machine only; "
        "0.0.0.0 serves the network.")) ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=1, max=65535, metavar="N",
                                      help="HTTP port (Triton's KServe v2 API and health endpoints).")] = 8000,
    grpc_port: Annotated[int | None, typer.Option("--grpc-port", min=1, max=65535, metavar="N",
                                                  help="gRPC port. Default: --port + 1.")] = None,
    metrics_port: Annotated[int | None, typer.Option("--metrics-port", min=1, max=65535, metavar="N", help=(
        "Prometheus metrics port (GET /metrics). Default: --port + 2.")) ] = None,
    instances: Annotated[int, typer.Option("--instances", "-k", min=1, metavar="K", help=(
        "Model instances, each with its own engine, serving requests in parallel.")) ] = 1,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, metavar="B", help=(
        "Most frames Triton's dynamic batcher puts in one batch (requests of the same frame size are "
        "batched together; a request may carry up to B frames).")) ] = 8,
    queue_delay_us: Annotated[int, typer.Option("--queue-delay-us", min=0, metavar="US", help=(
        "How long a request may wait for others to batch with, in microseconds.")) ] = 2000,
    threads: Annotated[int | None, typer.Option("--threads", "-t", min=1, metavar="T", help=(
        "CPU threads per instance. Default: the CPU cores shared out between the instances.")) ] = None,
    tile: TileOpt = None,
    overlap: OverlapOpt = None,
    refine_strength: RefineOpt = None,
    noise_scale: NoiseOpt = None,
    refine_lowpass: LowpassOpt = None,
    device: DeviceOpt = None,
    max_pixels: Annotated[int, typer.Option("--max-pixels", min=0, metavar="N", help=(
        "Refuse frames with more than N pixels (default 3840x2160); 0 = no limit.")) ] = 3840 * 2160,
    model_name: Annotated[str, typer.Option("--model-name", metavar="NAME",
                                            help="Name the model is served under.")] = "derain",
    log_file: Annotated[Path | None, typer.Option("--log-file", dir_okay=False, metavar="FILE", help=(
        "Keep Triton's server log in FILE. Default: a temporary file, removed on exit.")) ] = None,
    debug: DebugOpt = False,
) -> None:
    """Serve the model to many cameras through NVIDIA Triton Inference Server (docs/serving.md).

    Frames go in and come out as UINT8 [N, H, W, 3] tensors (input 'frame', output 'derained');
    each output equals what 'rd-run derain' / Derainer gives for that frame. Starts in one command
    (needs the [serve] extra), answers HTTP, gRPC and health (/v2/health/ready) requests and serves
    Prometheus metrics; Ctrl-C or SIGTERM stops it cleanly (exit 130 / 143).
    """
    import logging

    from runtime.serving.server import DerainServer, ServeConfig

    with _guard(debug):
        if tile is not None and overlap is not None and overlap >= tile:
            raise UsageError(f"--overlap {overlap} must be smaller than --tile {tile}")
        resolve_engine(engine, precision)
        config = ServeConfig(host=host, http_port=port, grpc_port=grpc_port, metrics_port=metrics_port,
                             instances=instances, max_batch=max_batch, queue_delay_us=queue_delay_us,
                             max_pixels=max_pixels, model_name=model_name, log_file=log_file)
        if not debug:  # PyTriton logs each refused request's traceback; the client gets the reason
            logging.getLogger("pytriton").setLevel(logging.CRITICAL)

        def factory(n_threads: int):
            return make_derainer(engine, precision, steps=steps, seed=seed, tile=tile, overlap=overlap,
                                 device=device, threads=n_threads,
                                 refine_strength=refine_strength, noise_scale=noise_scale,
                                 refine_lowpass=refine_lowpass)

        server = DerainServer(factory, config, threads=threads)
        with server:
            info = engine_info(server.derainers[0], engine, device, server.threads)
            urls = server.urls
            _say(f"serving {model_name!r} ({Path(info['artifact']).name}, {info['backend']}, {info['steps']} steps, "
                 f"{instances} instance(s) x {server.threads} thread(s), max batch {max_batch}) on {urls['http']} "
                 f"(gRPC {urls['grpc']}, metrics {urls['metrics']}); Ctrl-C or SIGTERM stops", "ready")
            server.wait()


if __name__ == "__main__":  # pragma: no cover
    main()
