"""``rd-train``: train RainDiffusion and run the reference sampler.

    rd-train fit --clean DIR --rainy DIR --out RUN_DIR [--recipe NAME] [--config small] [--steps N] ...
    rd-train recipes                                             (the named recipes and their options)
    rd-train sample RUN_DIR/model.pt rainy.png ... -o OUT_DIR [--steps 10]
    torchrun --nproc_per_node=2 -m training.cli fit ...        (DDP)

Progress goes to stderr; errors are one line on stderr and the error's exit code
(--debug shows the traceback).
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from runtime.cli_errors import HELP_OPTIONS, STEPS_RANGE, check_steps, error_exits, one_line_group
from runtime.errors import UsageError
from training.config import NTBMode, Preset
from training.multiscale import PREDICTIONS
from training.recipes import RECIPES, recipe_flags

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, context_settings=HELP_OPTIONS, cls=one_line_group(""),
                  help="Train RainDiffusion (Algorithm 1) and sample with the torch reference DDIM sampler.")

#: What a training run directory holds (training.train.fit): a folder with any of these is a run.
RUN_FILES = ("last.pt", "model.pt", "metrics.jsonl", "config.json")
_state = {"debug": False}


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


class Model(str, Enum):
    derain = "derain"
    rain = "rain"


class Condition(str, Enum):
    """--condition's choices: the derain estimator's condition (training.multiscale.COND_CHANNELS)."""

    y = "y"
    refine = "refine"

    @property
    def channels(self) -> int:
        return 3 if self is Condition.y else 6


#: --prediction's choices: what the estimators may predict (training.multiscale.PREDICTIONS).
Prediction = Enum("Prediction", {p: p for p in PREDICTIONS}, type=str)
#: --recipe's choices: the named recipes of training.recipes.
RecipeName = Enum("RecipeName", {r: r for r in RECIPES}, type=str)
RECIPE_HELP = ("Start from a named recipe's settings (docs/training.md; `rd-train recipes` lists each one's "
               "options); options given explicitly override it, and the run's config records it. "
               + " ".join(f"{r.name} = {recipe_flags(r)}: {r.summary}." for r in RECIPES.values()))


def _console() -> Console:
    return Console(stderr=True, soft_wrap=True)


def _run(fn):
    """Turn toolkit errors into one stderr line + exit code (tracebacks with --debug)."""
    console = _console()

    def showwarning(message, category, filename, lineno, file=None, line=None):
        console.print(f"[yellow]warning:[/] {message}", highlight=False)

    def say(text: str) -> None:
        console.print(f"[red]error:[/] {text}", highlight=False, soft_wrap=True)

    previous, warnings.showwarning = warnings.showwarning, showwarning
    try:
        with error_exits(say, debug=_state["debug"]):
            return fn()
    finally:
        warnings.showwarning = previous


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    if threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False) -> None:
    _state["debug"] = debug


class RichReporter:
    """Progress bar + one printed line per logged step (readable in log files too)."""

    def __init__(self, console: Console, enabled: bool = True) -> None:
        self.console, self.enabled = console, enabled
        self.progress = Progress(TextColumn("[bold]fit"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=console, transient=False, disable=not enabled)
        self.task = None
        self.t0 = time.perf_counter()

    def start(self, start_step, total_steps, info):
        if not self.enabled:
            return
        p = info["params"]
        self.console.print(
            f"training on {info['device']} x{info['world_size']}: {info['clean']} clean / {info['rainy']} rainy "
            f"images, "
            f"ntb={info['ntb']}, params G={p['G_A']:,} x2, eps={p['eps_A']:,} x2; steps {start_step}->{total_steps}",
            highlight=False)
        self.progress.start()
        self.task = self.progress.add_task("fit", total=total_steps, completed=start_step, info="")

    def advance(self, step):
        if self.enabled and self.task is not None:
            self.progress.update(self.task, completed=step)

    def log(self, r):
        if not self.enabled:
            return
        info = f"loss {r['loss']:.4f} |G_B(y)-y| {r['id_dist']:.4f} {r['it_s']:.2f} it/s"
        self.progress.update(self.task, info=info)
        eta = r["eta_s"]
        self.progress.console.print(
            f"step {r['step']}: loss {r['loss']:.4f} = A(x|x') {r['A_x']:.4f} + B(x'|x'') {r['B_xp']:.4f} + "
            f"B(y|y') {r['B_y']:.4f} + A(y'|y'') {r['A_yp']:.4f} + cyc {r['cyc']:.4f} + syn {r['syn']:.4f}"
            + (f" + adv {r['adv']:.4f} (D {r['D']:.4f})" if r.get("D") else "")
            + (f" + idt {r['idt']:.4f}" if r.get("idt") else "") + "; "
            f"|G_B(y)-y| {r['id_dist']:.4f}; {r['it_s']:.3f} it/s; ETA {eta // 3600:.0f}h{eta % 3600 / 60:02.0f}m",
            highlight=False)

    def validation(self, r):
        if self.enabled:
            self.progress.console.print(
                f"val step {r['step']}: Y PSNR {r['psnr']:.2f} dB / SSIM {r['ssim']:.4f} (rainy input "
                f"{r['psnr_in']:.2f} dB / {r['ssim_in']:.4f}; brightness-matched input {r['psnr_in_shift']:.2f} dB)",
                highlight=False)

    def checkpoint(self, path, step):
        if self.enabled:
            self.progress.console.print(f"checkpoint step {step}: {path} (+ model.pt)", highlight=False)

    def close(self):
        if self.enabled:
            self.progress.stop()


@app.command()
def fit(
    clean: Annotated[list[Path], typer.Option(
        help="Folder of clean images (unpaired); repeat the option for several folders.", exists=True,
        file_okay=False)],
    rainy: Annotated[list[Path], typer.Option(
        help="Folder of rainy images (unpaired); repeat the option for several folders.", exists=True,
        file_okay=False)],
    out: Annotated[Path, typer.Option(help="Run directory (metrics.jsonl, last.pt, model.pt, config.json).")],
    recipe: Annotated[RecipeName | None, typer.Option(help=RECIPE_HELP)] = None,
    config: Annotated[Preset | None, typer.Option(
        help="Model: tiny (tests and smoke runs: crop 32, batch 4 and val-size 32 unless given; seconds a "
             "step on a CPU), small (default; the paper's y-only condition), edge (predict-and-refine: P = "
             "an attention-free G_B plus a small refiner conditioned on [y, P(y)]; the shipped model), "
             "base (GPU).")] = None,
    steps: Annotated[int | None, typer.Option(
        help="Total optimiser steps (a resumed run continues to this). [10000]")] = None,
    resume: Annotated[Path | None, typer.Option(help="Resume from a last.pt (same data order and RNG).",
                                                exists=True, dir_okay=False)] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite",
        help="Start a new run in an --out folder that already holds one, deleting its last.pt, model.pt, "
             "metrics.jsonl, config.json and snap_*.pt first. Without it (or --resume) such a folder is "
             "refused.")] = False,
    device: Annotated[Device, typer.Option(help="cpu or cuda (bf16 autocast on cuda).")] = Device.cpu,
    val_rainy: Annotated[Path | None, typer.Option(help="Paired validation: rainy folder.", exists=True,
                                                   file_okay=False)] = None,
    val_clean: Annotated[Path | None, typer.Option(help="Paired validation: clean folder (same file names).",
                                                   exists=True, file_okay=False)] = None,
    ntb: Annotated[NTBMode | None, typer.Option(
        help="faithful = exactly Algorithm 1 (cycle L1 only; collapses to identity generators on unpaired "
             "data: docs/quality.md). "
             "synthetic (default) = documented deviation adding lambda_syn * |G_A(x) - synthrain(x)|_1, "
             "synthetic rain as a weak prior for G_A. render = documented deviation: the rain renderer "
             "replaces G_A on the clean branch (x' = synthrain(x)).")] = None,
    lambda_syn: Annotated[float | None, typer.Option(help="Weight of the synthetic-rain prior. [1.0]")] = None,
    rain_style: Annotated[str | None, typer.Option(
        help="Rendered rain of --ntb synthetic/render: v1 (one streak layer, light veil), v2 (light and "
             "heavy regimes, 2-3 streak layers, a drawn veil), v3 (v1 under a heavier veil) or v4 (v1 plus a "
             "dense rain field added to the image: the shipped predictor's last stage); docs/quality.md. "
             "[v1; v4 with --recipe edge-refine]")] = None,
    lambda_cyc: Annotated[float | None, typer.Option(help="Weight of L_cyc. [1.0]")] = None,
    lambda_adv: Annotated[float | None, typer.Option(
        help="Weight of CycleGAN's LSGAN term: PatchGAN discriminators judge G_B(y) against clean photos "
             "and G_A(x) against rainy ones (documented deviation, docs/training.md; 0 = off, the paper). CycleGAN's "
             "ratio to the cycle L1 is 1:10, i.e. 0.1 here. [0]")] = None,
    lambda_idt: Annotated[float | None, typer.Option(
        help="Weight of CycleGAN's identity loss |G_B(x) - x|_1 + |G_A(y) - y|_1, which keeps the "
             "generators from changing colour and tone (documented deviation, docs/training.md; 0 = off). CycleGAN "
             "uses half the cycle weight, i.e. 0.5 here. [0]")] = None,
    cond_drop: Annotated[float | None, typer.Option(
        help="Probability that the noise losses of the real images drop their condition, so the "
             "estimators also learn unconditional priors of clean and rainy photos (classifier-free "
             "guidance style; a documented deviation, docs/training.md). [0]")] = None,
    lambda_sds: Annotated[float | None, typer.Option(
        help="Weight of the score-distillation prior: the unconditional derain estimator pulls G_B(y) "
             "toward clean photos (and the rain estimator G_A(x) toward rainy ones). Needs --cond-drop "
             "(a documented deviation, docs/training.md; 0 = off). [0]")] = None,
    detach_cond: Annotated[bool | None, typer.Option(
        "--detach-cond/--no-detach-cond",
        help="Detach generator outputs used as diffusion conditions (the paper does not). [no]")] = None,
    scales: Annotated[str | None, typer.Option(
        help="Estimator scales, comma-separated (ablation): '1', '1,0.5', '1,0.5,0.25' (default).")] = None,
    prediction: Annotated[Prediction | None, typer.Option(
        help="What the estimators predict: eps (the paper), v, v_residual (v of x_0 - base) or x0_residual "
             "(x_0 - base itself), base being the condition's estimate (y, or P(y) with --config edge); "
             "documented deviations: an undertrained eps model's 10-step DDIM output is noise. Default: eps "
             "(x0_residual for --config edge); with --init, the checkpoint's; with --resume, fixed by the "
             "checkpoint. [eps]")] = None,
    condition: Annotated[Condition | None, typer.Option(
        help="What the derain estimator is conditioned on: y (the rainy image, the paper) or refine "
             "([y, P(y)] with P = G_B: predict-and-refine, exported as a prologue graph plus the step). "
             "[refine for --config edge, else y]")] = None,
    init: Annotated[Path | None, typer.Option(
        help="Warm-start a new run from this checkpoint's weights (model.pt or last.pt); step 0, fresh "
             "optimiser. Only --prediction may differ from the checkpoint's model.", exists=True,
        dir_okay=False)] = None,
    crop: Annotated[int | None, typer.Option(help="Random crop size (pixels). [128; 32 with --config tiny]")] = None,
    batch: Annotated[int | None, typer.Option(help="Batch size per process. [4]")] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate (betas 0.5, 0.999). [2e-5]")] = None,
    gen_lr: Annotated[float | None, typer.Option(
        help="Learning rate of the NTB generators G_A, G_B only (the estimators keep --lr); a lower one "
             "slows their tone drift under --lambda-sds (issue 8). [--lr]")] = None,
    freeze_ntb: Annotated[bool | None, typer.Option(
        "--freeze-ntb/--no-freeze-ntb",
        help="Keep the NTB generators G_A, G_B as they are and train the estimators only (predict-and-refine: "
             "refine on a predictor trained before, e.g. warm-started with --init). [no]")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of data order, noise and synthetic rain. [0]")] = None,
    ema_decay: Annotated[float | None, typer.Option(help="EMA decay of the estimators. [0.999]")] = None,
    grad_clip: Annotated[float | None, typer.Option(
        help="Clip the global grad norm (0 = off; not in the paper). [1.0]")] = None,
    ckpt_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps. [500]")] = None,
    snapshot_every: Annotated[int | None, typer.Option(
        help="Also keep RUN/snap_<step>.pt (the stripped model; last.pt and model.pt are written then "
             "too) every N steps, to score a run's curve afterwards. [0 = off]")] = None,
    val_every: Annotated[int | None, typer.Option(help="Validate every N steps. [1000]")] = None,
    val_steps: Annotated[int | None, typer.Option(help=f"DDIM steps for validation, {STEPS_RANGE}. [10]")] = None,
    val_size: Annotated[int | None, typer.Option(
        help="Validation center-crop size. [128; 32 with --config tiny]")] = None,
    log_every: Annotated[int | None, typer.Option(help="Log every N steps. [10]")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
    threads: Annotated[int | None, typer.Option(
        help="torch intra-op CPU threads (default: torch's choice; 1 is faster on a busy machine).")] = None,
) -> None:
    """Train RainDiffusion with Algorithm 1 on two unpaired folders."""

    def go():
        _set_threads(threads)
        from training.train import fit as fit_run

        overrides = {k: v for k, v in {
            "steps": steps, "batch": batch, "crop": crop, "lr": lr, "gen_lr": gen_lr, "freeze_ntb": freeze_ntb,
            "seed": seed,
            "ntb": ntb.value if ntb else None, "lambda_syn": lambda_syn, "rain_style": rain_style,
            "lambda_cyc": lambda_cyc,
            "lambda_adv": lambda_adv, "lambda_idt": lambda_idt, "cond_drop": cond_drop, "lambda_sds": lambda_sds,
            "detach_cond": detach_cond, "ema_decay": ema_decay, "grad_clip": grad_clip, "ckpt_every": ckpt_every,
            "snapshot_every": snapshot_every, "val_every": val_every, "val_steps": val_steps, "val_size": val_size,
            "log_every": log_every,
        }.items() if v is not None}
        _check_run_dir(out, resume, overwrite)
        train, models, init_ckpt = _resolve_run(overrides, resume=resume, init=init, preset=config,
                                                recipe=recipe, scales=scales, prediction=prediction,
                                                condition=condition)
        import os

        rank = int(os.environ.get("RANK", "0"))
        if overwrite and rank == 0:
            _clear_run_dir(out)
        reporter = RichReporter(_console(), enabled=not quiet and rank == 0)
        result = fit_run(clean, rainy, out, train=train, models=models, resume=resume, device=device.value,
                         val_rainy=val_rainy, val_clean=val_clean, reporter=reporter, init=init_ckpt)
        if rank == 0 and not quiet:
            _console().print(f"done: step {result.step}; {result.model} (shipped) and {result.last} (resume)",
                             highlight=False)

    _run(go)


def _resolve_run(overrides: dict, *, resume: Path | None, init: Path | None, preset: Preset | None,
                 recipe: Enum | None, scales: str | None, prediction: Enum | None,
                 condition: Condition | None = None):
    """(TrainConfig, ModelConfigs or None, the --init checkpoint or None) of ``rd-train fit``.

    The model's shape comes from --resume's or --init's checkpoint when given, else from
    --config (or the recipe's preset) with --scales, --prediction and --condition (or the recipe's).
    """
    from training.checkpoint import load_checkpoint, model_configs
    from training.config import model_preset
    from training.recipes import get_recipe
    from training.train import resolve_train_config

    r = get_recipe(recipe.value) if recipe is not None else None
    preset_name = preset.value if preset is not None else None
    pred = prediction.value if prediction is not None else None
    init_ckpt = None
    if init is not None:
        if scales is not None or preset is not None:
            raise UsageError("--init takes the model's shape from the checkpoint: drop --scales/--config")
        init_ckpt = load_checkpoint(init)
        preset_name = (init_ckpt.get("config", {}).get("train") or {}).get("preset") if resume is None else None
        if r is not None and r.preset and preset_name and r.preset != preset_name:
            raise UsageError(f"--recipe {r.name} trains the {r.preset} model, but --init {init} holds a "
                             f"{preset_name} model")
    train = resolve_train_config(resume, overrides, preset_name, recipe=r.name if r is not None else None)
    if resume is None and pred is None and r is not None:
        pred = r.prediction
    if init_ckpt is not None:
        if condition is not None:
            raise UsageError("--init takes the model's condition from the checkpoint: drop --condition")
        models = model_configs(init_ckpt)
        if pred is not None:
            models.estimator.prediction = pred
        return train, models, init_ckpt
    if resume is not None:
        if scales is not None or prediction is not None or condition is not None:
            raise UsageError("--scales/--prediction/--condition cannot change when resuming (the checkpoint fixes "
                             "the model)")
        return train, None, None
    try:
        sc = tuple(float(s) for s in scales.split(",")) if scales else None
    except ValueError:
        raise UsageError(f"--scales must be comma-separated numbers like 1,0.5,0.25, got {scales!r}") from None
    return train, model_preset(train.preset, scales=sc, prediction=pred,
                               cond_channels=None if condition is None else Condition(condition).channels), None


def _run_files(out: Path) -> list[str]:
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.name in RUN_FILES or (p.name.startswith("snap_")
                                                                          and p.suffix == ".pt"))


def _check_run_dir(out: Path, resume: Path | None, overwrite: bool) -> None:
    """Refuse to start a new run over an existing one (its checkpoints would be replaced and its
    metrics appended to) unless --overwrite; --resume continues the run it names."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if overwrite and resume is not None:
        raise UsageError("--overwrite starts a new run and --resume continues one: pass one of them")
    found = _run_files(out)
    if not found or overwrite:
        return
    if resume is not None and resume.resolve().parent == out.resolve():
        return
    what = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
    if resume is not None:
        raise UsageError(f"--out {out} already holds another training run ({what}) than --resume {resume}; "
                         f"resume into the folder of that last.pt, choose another --out, or pass --overwrite")
    last = out / "last.pt"
    hint = f"--resume {last} to continue it" if last.is_file() else "another --out"
    raise UsageError(f"--out {out} already holds a training run ({what}); pass {hint}, or --overwrite to start "
                     f"over (deletes it)")


def _clear_run_dir(out: Path) -> None:
    for name in _run_files(out):
        (out / name).unlink()


@app.command()
def recipes(json_out: Annotated[bool, typer.Option("--json", help="Print them as JSON on stdout.")] = False) -> None:
    """List the named recipes of `rd-train fit --recipe` and the options each one stands for."""

    def go():
        if json_out:
            sys.stdout.write(json.dumps({r.name: {"summary": r.summary, "preset": r.preset, "prediction": r.prediction,
                                                   "train": dict(r.train), "options": recipe_flags(r)}
                                         for r in RECIPES.values()}) + "\n")
            return
        for r in RECIPES.values():
            sys.stdout.write(f"{r.name}: {r.summary}\n    {recipe_flags(r)}\n")

    _run(go)


@app.command()
def sample(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint (model.pt or last.pt).", exists=True, dir_okay=False)],
    inputs: Annotated[list[Path], typer.Argument(help="Image files.", exists=True, dir_okay=False)],
    out_dir: Annotated[Path, typer.Option("-o", "--out-dir", help="Output folder.")],
    steps: Annotated[int, typer.Option(
        callback=check_steps,
        help=f"DDIM steps, {STEPS_RANGE}; one step of Algorithm 2 is at t = 1 and returns the noise.")] = 10,
    model: Annotated[Model, typer.Option(help="derain (eps_A) or rain (eps_B).")] = Model.derain,
    seed: Annotated[int, typer.Option(help="Seed of x_T (numpy PCG64, same in every backend).")] = 0,
    raw: Annotated[bool, typer.Option("--raw", help="Use the raw (non-EMA) estimator of a last.pt.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON list of outputs on stdout.")] = False,
    threads: Annotated[int | None, typer.Option(help="torch intra-op CPU threads.")] = None,
) -> None:
    """Run the reference DDIM sampler (Algorithm 2) on image files."""

    def go():
        _set_threads(threads)
        import torch

        from runtime.io import load_rgb, save_image
        from training.checkpoint import build_estimator, load_checkpoint
        from training.diffusion import ddim_sample, to_tensor, to_uint8

        ck = load_checkpoint(ckpt)
        est = build_estimator(ck, model=model.value, ema=not raw)
        from training.checkpoint import model_configs

        schedule = model_configs(ck).schedule
        results = []
        for p in inputs:
            rgb = load_rgb(p)
            t0 = time.perf_counter()
            with torch.inference_mode():
                x0 = ddim_sample(est, to_tensor(rgb), steps=steps, seed=seed, schedule_config=schedule)
            dest = out_dir / f"{p.stem}.png"
            save_image(dest, to_uint8(x0))
            results.append({"input": str(p), "output": str(dest), "seconds": round(time.perf_counter() - t0, 3)})
            _console().print(f"{p} -> {dest} ({results[-1]['seconds']:.2f} s)", highlight=False)
        if json_out:
            sys.stdout.write(json.dumps(results) + "\n")

    _run(go)


if __name__ == "__main__":  # torchrun --nproc_per_node=2 -m training.cli fit ...
    app()
