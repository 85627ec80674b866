"""Constants and helpers of the exporter tests (importable by name: tests/rd_export is on sys.path)."""

from __future__ import annotations

import contextlib
from pathlib import Path

#: small, fast profile for tests: verification runs at min_size (32x32)
TEST_PROFILE = dict(min_batch=1, opt_batch=1, max_batch=2, min_size=(32, 32), opt_size=(32, 32), max_size=(64, 64))
TEST_STEPS = 3


def perturbed_estimator_state(estimator, seed: int) -> dict:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in estimator.parameters():
            if not bool(p.abs().sum()):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return {k: v.clone() for k, v in estimator.state_dict().items()}


def write_random_checkpoint(path: Path, seed: int = 0, prediction: str = "eps", cond_channels: int = 3,
                            crop: int = 128) -> Path:
    """A stripped-format checkpoint of the tiny preset with random (perturbed) weights.

    ``cond_channels = 6`` makes a predict-and-refine model (prologue [y, G_B(y)]); its G_B is
    perturbed too, so P(y) differs from y. ``crop`` is the training crop the checkpoint records
    (the model's native tile).
    """
    import torch

    from training.checkpoint import save_checkpoint
    from training.config import TrainConfig, model_preset
    from training.multiscale import MultiScaleEstimator
    from training.unet import UNet

    cfgs = model_preset("tiny", prediction=prediction, cond_channels=cond_channels)
    torch.manual_seed(seed)
    ema_a = perturbed_estimator_state(MultiScaleEstimator(cfgs.estimator, cfgs.schedule), seed + 1)
    ema_b = perturbed_estimator_state(MultiScaleEstimator(cfgs.estimator, cfgs.schedule), seed + 2)
    g_a, g_b = UNet(cfgs.ntb_unet), UNet(cfgs.ntb_unet)
    if cond_channels == 6:
        perturbed_estimator_state(g_b, seed + 3)
    config = dict(cfgs.to_dict(), train=TrainConfig(preset="tiny", crop=crop).to_dict())
    return save_checkpoint(path, {"config": config, "step": 0,
                                  "state": {"G_A": g_a.state_dict(), "G_B": g_b.state_dict(),
                                            "ema_A": ema_a, "ema_B": ema_b}})


@contextlib.contextmanager
def one_torch_thread():
    """torch on 1 thread: with the 2 CPU cores shared, 2 OpenMP threads made the tiny estimator
    ~100x slower (3.1 s vs 24 ms per call, measured here); restored on exit."""
    try:
        import torch
    except ImportError:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


#: calls of :func:`fake_int8_derive` (the precision-table test)
DERIVE_CALLS: list[dict] = []


def fake_int8_derive(fp32_onnx, out=None, *, calib, steps=None, seed=0, progress=None):
    """A stand-in ``derive`` for a precision that needs ``calib`` (produces an FP16 artifact)."""
    from rd_export.fp16 import make_fp16

    DERIVE_CALLS.append({"calib": calib, "out": out, "steps": steps})
    return make_fp16(fp32_onnx, out, steps=steps, seed=seed, progress=progress)
