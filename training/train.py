"""Training driver of RainDiffusion: setup, a few named helpers, one loop (nanoGPT style).

``fit`` trains the four networks with Algorithm 1 (training.algorithm) on two unpaired folders
and writes into the run directory:

- ``metrics.jsonl``: one JSON record per logged step (every loss term, |G_B(y) - y|, it/s) and
  one per validation (Y PSNR / SSIM of the EMA derain model next to the rainy input's);
- ``last.pt``: the full training checkpoint (optimizer, RNG states, sampler position) to resume;
- ``model.pt``: the stripped checkpoint (configs + generators + EMA estimators), what is
  shipped and exported;
- ``snap_<step>.pt`` (``snapshot_every``): copies of model.pt kept along the run, for its curve;
- ``config.json``: the configs, for people.

The library never prints: progress goes through a :class:`Reporter` (the CLI's draws a rich bar).
"""

from __future__ import annotations

import copy
import json
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from runtime.cli_errors import Terminated
from runtime.errors import CheckpointError, InputError, RDError, UsageError
from runtime.io import atomic_path, iter_image_files, load_rgb
from runtime.metrics import brightness_matched, psnr_y, ssim_y
from training import ddp
from training.algorithm import RainDiffusion, algorithm1_step
from training.checkpoint import check_state_dict, load_checkpoint, model_configs, save_checkpoint, strip_checkpoint
from training.config import PRESET_TRAIN_DEFAULTS, ModelConfigs, NTBMode, TrainConfig, model_preset
from training.data import UnpairedSampler, load_folders
from training.diffusion import ddim_sample, to_tensor, to_uint8
from training.gan import Discriminators
from training.multiscale import Prologue
from training.recipes import get_recipe
from training.synthrain import rain_batch

__all__ = ["EMA", "Reporter", "FitResult", "fit", "resolve_train_config", "validate", "load_val_pairs"]


# ---------------------------------------------------------------------------------------- helpers
class EMA:
    """Exponential moving average of the two estimators (used for sampling and export).

    decay_n = min(decay, (1 + n) / (warmup + n)) for the n-th update, so early averages are not
    dominated by the random initialisation.
    """

    def __init__(self, model: RainDiffusion, decay: float, warmup: int) -> None:
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.ema_A = copy.deepcopy(model.eps_A).eval().requires_grad_(False)
        self.ema_B = copy.deepcopy(model.eps_B).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: RainDiffusion) -> None:
        n = self.updates
        d = min(self.decay, (1.0 + n) / (self.warmup + n))
        for ema, live in ((self.ema_A, model.eps_A), (self.ema_B, model.eps_B)):
            for pe, p in zip(ema.parameters(), live.parameters()):
                pe.lerp_(p.detach(), 1.0 - d)
            for be, b in zip(ema.buffers(), live.buffers()):
                be.copy_(b)
        self.updates += 1


class Reporter:
    """Progress callbacks of :func:`fit` (no-ops here; the CLI overrides them)."""

    def start(self, start_step: int, total_steps: int, info: dict) -> None: ...

    def advance(self, step: int) -> None: ...

    def log(self, record: dict) -> None: ...

    def validation(self, record: dict) -> None: ...

    def checkpoint(self, path: Path, step: int) -> None: ...

    def close(self) -> None: ...


class _DeferredStop:
    """Ctrl-C / SIGTERM in a single-process run: finish the step, save last.pt, then stop.

    The first signal only sets a flag, which the loop checks between steps, so the checkpoint is
    consistent (weights, EMA, optimiser, RNG and step counter of one step boundary); a second
    signal stops at once. An inherited SIG_IGN (a background job's SIGINT) is kept. Nothing is
    installed off the main thread or in a distributed run (every rank would have to agree on the step).
    """

    def __init__(self, enabled: bool) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        if not enabled:
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread
                return

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            self.stop(signum)
        self.signum = signum

    @staticmethod
    def stop(signum: int) -> None:
        raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


@dataclass
class FitResult:
    run_dir: Path
    step: int
    last: Path
    model: Path
    records: list[dict] = field(default_factory=list)


def resolve_train_config(resume: Path | None, overrides: dict, preset: str | None = None,
                         recipe: str | None = None) -> TrainConfig:
    """The TrainConfig of a run.

    A fresh run layers, each over the one before: TrainConfig's defaults, the preset's
    (``PRESET_TRAIN_DEFAULTS``: tiny's small crops), the recipe's (training.recipes), then
    ``overrides`` (the options given). ``preset`` None takes the recipe's, else ``small``. A
    resumed run: the checkpoint's TrainConfig with ``overrides`` on top (so resuming continues
    the same run unless told otherwise); ``preset`` and ``recipe`` must then be the checkpoint's.
    """
    if resume is None:
        r = get_recipe(recipe) if recipe is not None else None
        preset = preset or (r.preset if r is not None else None) or TrainConfig.preset
        layered = {**PRESET_TRAIN_DEFAULTS.get(preset, {}), **(dict(r.train) if r is not None else {}),
                   **overrides, "preset": preset}
        if r is not None:
            layered["recipe"] = r.name
        return TrainConfig(**layered)
    ckpt = load_checkpoint(resume)
    base = ckpt["config"].get("train")
    if base is None or "optimizer" not in ckpt or "rng" not in ckpt:
        raise CheckpointError(f"{resume}: missing key(s) optimizer/rng/config.train: a stripped model.pt cannot be "
                              f"resumed; use the run's last.pt")
    if preset is not None and preset != base.get("preset"):
        raise UsageError(f"--config {preset} differs from the checkpoint's preset {base.get('preset')!r}; "
                         f"drop --config when resuming")
    if recipe is not None and recipe != base.get("recipe"):
        raise UsageError(f"--recipe {recipe} differs from the checkpoint's recipe {base.get('recipe')!r}; "
                         f"drop --recipe when resuming (the run keeps its own settings)")
    return TrainConfig.from_dict({**base, **overrides})


def _rng_state(sampler: UnpairedSampler, syn_gen: torch.Generator, device: torch.device) -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "syn": syn_gen.get_state(),
        "sampler": sampler.state_dict(),
    }


def _set_rng_state(st: dict, sampler: UnpairedSampler, syn_gen: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(st["torch"].cpu())
    if device.type == "cuda" and st.get("cuda") is not None:
        torch.cuda.set_rng_state(st["cuda"].cpu(), device)
    n = st["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = st["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    syn_gen.set_state(st["syn"].cpu())
    sampler.load_state_dict(st["sampler"])


def load_val_pairs(rainy_dir: Path, clean_dir: Path, *, size: int, max_images: int) -> list[tuple]:
    """(name, rainy, clean) uint8 pairs matched by file name, center-cropped to size x size."""
    clean = {p.name: p for p in iter_image_files(clean_dir)}
    pairs = []
    for rp in iter_image_files(rainy_dir):
        if rp.name not in clean:
            continue
        r, c = load_rgb(rp), load_rgb(clean[rp.name])
        if r.shape != c.shape:
            continue
        h, w = r.shape[:2]
        s = min(size, h, w)
        top, left = (h - s) // 2, (w - s) // 2
        pairs.append((rp.name, r[top:top + s, left:left + s].copy(), c[top:top + s, left:left + s].copy()))
        if len(pairs) >= max_images:
            break
    if not pairs:
        raise InputError(f"no validation pairs: no file name of {rainy_dir} is also in {clean_dir} with the same size")
    return pairs


@torch.no_grad()
def validate(estimator: nn.Module, pairs: list[tuple], *, steps: int, seed: int, schedule,
             prologue: nn.Module | None = None) -> dict:
    """Mean Y PSNR / SSIM of the DDIM output vs clean, next to the rainy input's (raw and
    brightness-matched, docs/ARCHITECTURE.md). ``prologue``: the predict-and-refine condition."""
    out = {"psnr": [], "ssim": [], "psnr_in": [], "ssim_in": [], "psnr_in_shift": []}
    for i, (_, rainy, clean) in enumerate(pairs):
        x0 = ddim_sample(estimator, to_tensor(rainy), steps=steps, seed=seed + i, schedule_config=schedule,
                         prologue=prologue)
        pred = to_uint8(x0)
        out["psnr"].append(psnr_y(pred, clean))
        out["ssim"].append(ssim_y(pred, clean))
        out["psnr_in"].append(psnr_y(rainy, clean))
        out["ssim_in"].append(ssim_y(rainy, clean))
        out["psnr_in_shift"].append(psnr_y(brightness_matched(rainy, clean), clean))
    return {k: float(np.mean([min(v, 100.0) for v in vals])) for k, vals in out.items()}


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop records past the checkpoint's step (they will be logged again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    with atomic_path(path) as tmp:
        tmp.write_text("".join(s + "\n" for s in keep), encoding="utf-8")


# ---------------------------------------------------------------------------------------- fit
def _warm_start(model: RainDiffusion, ema: EMA, ckpt: dict) -> None:
    """Copy a checkpoint's four networks into ``model`` and its EMA (shapes checked by name)."""
    st = ckpt.get("state")
    if not isinstance(st, dict):
        raise CheckpointError(f"{ckpt.get('_path', 'checkpoint')}: no 'state' to initialise from")
    where = f"{ckpt.get('_path', 'checkpoint')} (--init)"
    for name, keys in (("G_A", ("G_A",)), ("G_B", ("G_B",)), ("eps_A", ("eps_A", "ema_A")),
                       ("eps_B", ("eps_B", "ema_B"))):
        key = next((k for k in keys if k in st), None)
        if key is None:
            raise CheckpointError(f"{where}: missing {' or '.join(keys)}")
        check_state_dict(getattr(model, name), st[key], key, where)
        getattr(model, name).load_state_dict(st[key])
    for name in ("ema_A", "ema_B"):  # the EMA from the EMA where the checkpoint has one
        key = name if name in st else "eps_" + name[-1]
        check_state_dict(getattr(ema, name), st[key], key, where)
        getattr(ema, name).load_state_dict(st[key])


def _group_lrs(train: TrainConfig) -> tuple[float, float]:
    return (train.gen_lr if train.gen_lr is not None else train.lr, train.lr)


def param_groups(model: RainDiffusion, train: TrainConfig) -> list[dict]:
    """The optimiser's two parameter groups: the NTB generators (``gen_lr``), then the estimators (``lr``).

    Together they list ``model.parameters()`` in its order (G_A, G_B, eps_A, eps_B), so the
    optimiser state's parameter indices are those of a single-group optimiser over the model.
    """
    gen_lr, lr = _group_lrs(train)
    groups = [{"params": [*model.G_A.parameters(), *model.G_B.parameters()], "lr": gen_lr},
              {"params": [*model.eps_A.parameters(), *model.eps_B.parameters()], "lr": lr}]
    if [id(p) for g in groups for p in g["params"]] != [id(p) for p in model.parameters()]:
        raise RuntimeError("RainDiffusion's parameters are not G_A, G_B, eps_A, eps_B in that order")
    return groups


def split_param_groups(state: dict, sizes: list[int]) -> dict:
    """An optimiser state dict saved with one parameter group, split into groups of ``sizes``.

    Checkpoints written before ``--gen-lr`` hold a single group over ``model.parameters()``;
    :func:`param_groups` keeps that parameter order, so the per-parameter state carries over and
    only the group list is split. A state dict that already has ``len(sizes)`` groups is returned
    as is; anything else is a :class:`CheckpointError`.
    """
    saved = state["param_groups"]
    if len(saved) == len(sizes):
        return state
    if len(saved) != 1 or len(saved[0]["params"]) != sum(sizes):
        raise CheckpointError(f"optimizer state has {len(saved)} parameter group(s) of "
                              f"{[len(g['params']) for g in saved]} parameters; this model needs {sizes}")
    ids, groups, start = saved[0]["params"], [], 0
    for n in sizes:
        groups.append({**saved[0], "params": ids[start:start + n]})
        start += n
    return {**state, "param_groups": groups}


@dataclass
class _Networks:
    """What one step of training updates: Algorithm 1's four networks, the EMA of the two
    estimators, their optimiser, and CycleGAN's discriminators with their own (``lambda_adv``)."""

    model: RainDiffusion
    ema: EMA
    optimizer: torch.optim.Optimizer
    disc: Discriminators | None = None
    disc_optimizer: torch.optim.Optimizer | None = None

    @classmethod
    def build(cls, models: ModelConfigs, train: TrainConfig, dev: torch.device) -> _Networks:
        model = RainDiffusion(models).to(dev)
        ema = EMA(model, train.ema_decay, train.ema_warmup)
        if train.freeze_ntb:  # no gradient reaches G_A / G_B: Adam skips them (they stay in the groups' order)
            model.G_A.requires_grad_(False)
            model.G_B.requires_grad_(False)
        optimizer = torch.optim.Adam(param_groups(model, train), betas=(train.beta1, train.beta2))
        nets = cls(model, ema, optimizer)
        if train.lambda_adv > 0:  # deviation: CycleGAN's discriminators for the NTB (docs/training.md)
            nets.disc = Discriminators(channels=train.disc_channels).to(dev)
            nets.disc_optimizer = torch.optim.Adam(nets.disc.parameters(), lr=train.lr,
                                                   betas=(train.beta1, train.beta2))
        return nets

    def restore(self, ckpt: dict, train: TrainConfig, where: str) -> int:
        """Load a last.pt (weights, EMA, optimisers) and apply this run's learning rates; the step."""
        st = ckpt["state"]
        for name in ("G_A", "G_B", "eps_A", "eps_B"):
            getattr(self.model, name).load_state_dict(st[name])
        self.ema.ema_A.load_state_dict(st["ema_A"])
        self.ema.ema_B.load_state_dict(st["ema_B"])
        self.ema.updates = int(ckpt.get("ema_updates", ckpt["step"]))
        sizes = [len(g["params"]) for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(split_param_groups(ckpt["optimizer"], sizes))
        if self.disc is not None and "disc" in st:  # else: discriminators added on resume start fresh
            check_state_dict(self.disc, st["disc"], "disc", where)
            self.disc.load_state_dict(st["disc"])
            self.disc_optimizer.load_state_dict(ckpt["optimizer_disc"])
        for g, g_lr in zip(self.optimizer.param_groups, _group_lrs(train)):
            g["lr"] = g_lr  # a resumed run may change the learning rates
        for g in self.disc_optimizer.param_groups if self.disc_optimizer else []:
            g["lr"] = train.lr
        return int(ckpt["step"])

    def checkpoint(self, config: dict, step: int, rngs: list) -> dict:
        """The full training checkpoint (last.pt): everything :meth:`restore` reads back."""
        m, e = self.model, self.ema
        full = {"config": config, "step": step, "ema_updates": e.updates,
                "state": {"G_A": m.G_A.state_dict(), "G_B": m.G_B.state_dict(), "eps_A": m.eps_A.state_dict(),
                          "eps_B": m.eps_B.state_dict(), "ema_A": e.ema_A.state_dict(),
                          "ema_B": e.ema_B.state_dict()},
                "optimizer": self.optimizer.state_dict(), "rng": rngs}
        if self.disc is not None:
            full["state"]["disc"] = self.disc.state_dict()
            full["optimizer_disc"] = self.disc_optimizer.state_dict()
        return full

    def parameter_counts(self) -> dict[str, int]:
        return {k: sum(p.numel() for p in getattr(self.model, k).parameters())
                for k in ("G_A", "G_B", "eps_A", "eps_B")}


def _start_from(resume: Path | None, init: Path | dict | None) -> tuple[dict | None, dict | None]:
    """(the last.pt to resume, the checkpoint to warm-start from); at most one of them."""
    ckpt = load_checkpoint(resume) if resume is not None else None
    if ckpt is not None and ("optimizer" not in ckpt or "rng" not in ckpt):
        raise CheckpointError(f"{resume}: missing key optimizer/rng (a stripped model.pt cannot be resumed; "
                              f"use last.pt)")
    if init is None:
        return ckpt, None
    if ckpt is not None:
        raise UsageError("--init starts a new run; it cannot be combined with --resume")
    return None, init if isinstance(init, dict) else load_checkpoint(init)


def _seed(train: TrainConfig, rank: int) -> torch.Generator:
    """Seed torch, numpy and random; each rank its own noise and synthetic-rain stream. Returns
    the generator of the rendered rain."""
    seed = train.seed + 1000003 * rank
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    return torch.Generator().manual_seed(seed + 1)


def _prepare_run_dir(run_dir: Path, config: dict, *, resumed_at: int | None, is_main: bool) -> Path:
    """Create the run folder, drop the log past a resumed step, write config.json; the log's path."""
    log_path = run_dir / "metrics.jsonl"
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resumed_at is not None:
            _truncate_log(log_path, resumed_at)
        with atomic_path(run_dir / "config.json") as tmp:
            tmp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return log_path


@dataclass
class _Checkpointer:
    """Saves last.pt, model.pt (stripped) and the snapshots; every rank calls it at the same step."""

    run_dir: Path
    config: dict
    nets: _Networks
    sampler: UnpairedSampler
    syn_gen: torch.Generator
    dev: torch.device
    dist_info: ddp.DistInfo
    reporter: Reporter
    snapshot_every: int

    def snapshot_due(self, step: int) -> bool:
        return self.snapshot_every > 0 and step % self.snapshot_every == 0

    def save(self, step: int) -> tuple[Path, Path]:
        rngs = ddp.gather_objects(_rng_state(self.sampler, self.syn_gen, self.dev), self.dist_info)
        last, shipped = self.run_dir / "last.pt", self.run_dir / "model.pt"
        if self.dist_info.is_main:
            full = self.nets.checkpoint(self.config, step, rngs)
            save_checkpoint(last, full)
            stripped = strip_checkpoint(full)
            save_checkpoint(shipped, stripped)
            if self.snapshot_due(step):
                save_checkpoint(self.run_dir / f"snap_{step:06d}.pt", stripped)
            self.reporter.checkpoint(last, step)
        ddp.barrier(self.dist_info)
        return last, shipped


class _Rate:
    """it/s between logged steps, with validation and checkpoint time left out."""

    def __init__(self, step: int) -> None:
        self.t, self.step = time.perf_counter(), step

    def record(self, step: int, total: int, terms: dict) -> dict:
        now = time.perf_counter()
        it_s = (step - self.step) / max(now - self.t, 1e-9)
        self.t, self.step = now, step
        return {"kind": "train", "step": step, **{k: round(v, 6) for k, v in terms.items()},
                "it_s": round(it_s, 4), "eta_s": round((total - step) / max(it_s, 1e-9), 1),
                "time": round(time.time(), 3)}

    def pause_ended(self) -> None:
        self.t = time.perf_counter()


def fit(clean_dir: Path | list[Path], rainy_dir: Path | list[Path], run_dir: Path, *, train: TrainConfig,
        models: ModelConfigs | None = None,
        resume: Path | None = None, device: str = "cpu", val_rainy: Path | None = None,
        val_clean: Path | None = None, reporter: Reporter | None = None,
        init: Path | dict | None = None) -> FitResult:
    """Train RainDiffusion (Algorithm 1) until ``train.steps``; resumable from ``last.pt``.

    ``clean_dir`` and ``rainy_dir`` are a folder or a list of folders each.

    ``init`` warm-starts a new run (step 0, fresh optimiser) from a checkpoint's weights (a
    model.pt or last.pt, as a path or as the dict ``load_checkpoint`` returned; EMA estimators
    where the raw ones are absent). ``models`` may then
    differ from the checkpoint's only in ``estimator.prediction``: the network shapes must match.
    """
    reporter = reporter or Reporter()
    run_dir = Path(run_dir)
    if (val_rainy is None) != (val_clean is None):
        raise UsageError("--val-rainy and --val-clean go together")

    # --- setup: process group, seeds, data, networks, optimisers, the run folder
    dist_info = ddp.setup(device)
    dev = dist_info.device
    ckpt, init_ckpt = _start_from(resume, init)
    models = model_configs(ckpt) if ckpt is not None else (models or model_preset(train.preset))
    syn_gen = _seed(train, dist_info.rank)
    clean, _ = load_folders(clean_dir, min_side=train.crop)
    rainy, _ = load_folders(rainy_dir, min_side=train.crop)
    sampler = UnpairedSampler(clean, rainy, batch=train.batch, crop=train.crop, seed=train.seed,
                              rank=dist_info.rank)
    val_pairs = (load_val_pairs(val_rainy, val_clean, size=train.val_size, max_images=train.val_max_images)
                 if val_rainy is not None and dist_info.is_main else None)

    nets = _Networks.build(models, train, dev)
    model, ema = nets.model, nets.ema
    step = 0
    if init_ckpt is not None:
        _warm_start(model, ema, init_ckpt)
    if ckpt is not None:
        step = nets.restore(ckpt, train, str(resume))
        if dist_info.rank < len(ckpt["rng"]):
            _set_rng_state(ckpt["rng"][dist_info.rank], sampler, syn_gen, dev)
    ema.ema_A.to(dev)
    ema.ema_B.to(dev)
    net, disc_net = ddp.wrap(model, dist_info), ddp.wrap(nets.disc, dist_info)
    autocast_dtype = torch.bfloat16 if dev.type == "cuda" else None  # bf16 on GPU only
    objective = {k: getattr(train, k) for k in ("lambda_cyc", "ntb", "lambda_syn", "detach_cond", "grad_clip",
                                                 "lambda_adv", "lambda_idt", "cond_drop", "lambda_sds")}

    config = {**models.to_dict(), "train": train.to_dict()}
    if init_ckpt is not None:
        config["init"] = init_ckpt.get("_path", "(a checkpoint dict)")
    log_path = _prepare_run_dir(run_dir, config, resumed_at=step if ckpt is not None else None,
                                is_main=dist_info.is_main)
    reporter.start(step, train.steps, {"params": nets.parameter_counts(), "device": str(dev),
                                       "world_size": dist_info.world_size, "clean": len(clean), "rainy": len(rainy),
                                       "ntb": train.ntb})
    checkpointer = _Checkpointer(run_dir, config, nets, sampler, syn_gen, dev, dist_info, reporter,
                                 train.snapshot_every)

    # --- the loop
    records: list[dict] = []
    synthetic = NTBMode(train.ntb) in (NTBMode.synthetic, NTBMode.render)
    rate = _Rate(step)
    last = shipped = saved_step = None
    stop = _DeferredStop(enabled=not dist_info.distributed)
    try:
        while step < train.steps:
            x, y = sampler.next_batch()  # 2: x ~ clean, y ~ rainy (unpaired)
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            x_syn = rain_batch(x, syn_gen, train.rain_style) if synthetic else None  # rendered on dev
            terms = algorithm1_step(net, nets.optimizer, x, y, x_syn=x_syn, disc=disc_net,  # 3-7
                                    disc_optimizer=nets.disc_optimizer, autocast_dtype=autocast_dtype, **objective)
            if not math.isfinite(terms["loss"]):
                raise RDError(f"loss is {terms['loss']} at step {step + 1}; lower --lr or resume from the last "
                              f"checkpoint ({run_dir / 'last.pt'})")
            ema.update(model)
            step += 1
            reporter.advance(step)

            if step % train.log_every == 0 or step == train.steps:
                records.append(rate.record(step, train.steps, terms))
                if dist_info.is_main:
                    _append_jsonl(log_path, records[-1])
                    reporter.log(records[-1])
            if val_pairs is not None and (step % train.val_every == 0 or step == train.steps):
                records.append(_validation_record(nets, models, val_pairs, train, step))
                _append_jsonl(log_path, records[-1])
                reporter.validation(records[-1])
                rate.pause_ended()
            if step % train.ckpt_every == 0 or step == train.steps or checkpointer.snapshot_due(step):
                (last, shipped), saved_step = checkpointer.save(step), step
                rate.pause_ended()
            if stop.signum is not None:  # interrupted: keep this step's work, then stop
                stop.restore()
                if saved_step != step:
                    checkpointer.save(step)
                stop.stop(stop.signum)
        if last is None:  # nothing to train (resumed at or past the target): still write the files
            last, shipped = checkpointer.save(step)
    finally:
        stop.restore()
        reporter.close()
        ddp.cleanup()
    return FitResult(run_dir=run_dir, step=step, last=last, model=shipped, records=records)


def _validation_record(nets: _Networks, models: ModelConfigs, val_pairs: list[tuple], train: TrainConfig,
                       step: int) -> dict:
    """Validate the EMA derain estimator (through the live G_B's prologue for predict-and-refine)."""
    prologue = Prologue(nets.model.G_B).eval() if models.estimator.refines else None
    v = validate(nets.ema.ema_A, val_pairs, steps=train.val_steps, seed=train.seed, schedule=models.schedule,
                 prologue=prologue)
    nets.model.train()
    return {"kind": "val", "step": step, **{k: round(val, 4) for k, val in v.items()},
            "images": len(val_pairs), "ddim_steps": train.val_steps, "size": train.val_size}
