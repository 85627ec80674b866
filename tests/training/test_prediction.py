"""The v and v_residual estimators (issue 8): they return eps_hat, train toward their own target,
and survive checkpoints, warm starts and the reference sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime.schedule import DDIMSchedule, ScheduleConfig
from training.config import model_preset
from training.diffusion import noise_loss
from training.multiscale import EstimatorConfig, MultiScaleEstimator


@pytest.mark.parametrize("prediction", ["v", "v_residual"])
def test_target_maps_back_to_the_true_eps(prediction):
    """If the raw maps equal their target, forward() returns exactly the eps that made x_t."""
    cfg = model_preset("tiny", prediction=prediction)
    est = MultiScaleEstimator(cfg.estimator, cfg.schedule)
    g = torch.Generator().manual_seed(0)
    x0, eps, cond = (torch.randn(3, 3, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([1.0, 500.0, 1000.0])
    ab = torch.from_numpy(DDIMSchedule(ScheduleConfig()).alpha_bar)[t.long()].float()[:, None, None, None]
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    raw = est.target(x0, eps, cond, t)
    v = ab.sqrt() * eps - (1 - ab).sqrt() * (x0 - cond if prediction == "v_residual" else x0)
    torch.testing.assert_close(raw, v)
    torch.testing.assert_close(est.to_eps(raw, x_t, cond, t), eps, atol=2e-5, rtol=0)


def test_v_residual_starts_from_the_condition_at_high_t():
    """raw = 0 means x0_hat = sqrt(ab) x_t + (1 - ab) cond ~ cond at t = T: the estimator's x_0
    guess starts from the condition, not from 0 (as a v or eps model with zero output would)."""
    cfg = model_preset("tiny", prediction="v_residual")
    est = MultiScaleEstimator(cfg.estimator, cfg.schedule)
    g = torch.Generator().manual_seed(1)
    x_t, cond = torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    t = torch.tensor([1000.0, 1000.0])
    ab = float(DDIMSchedule(ScheduleConfig()).alpha_bar[1000])
    eps_hat = est.to_eps(torch.zeros_like(x_t), x_t, cond, t)
    x0_hat = (x_t - (1 - ab) ** 0.5 * eps_hat) / ab ** 0.5
    torch.testing.assert_close(x0_hat, ab ** 0.5 * x_t + (1 - ab) * cond, atol=1e-4, rtol=0)
    assert float((x0_hat - cond).abs().max()) < 0.03


def test_eps_estimator_is_unchanged_and_v_kinds_have_no_new_weights():
    eps_cfg, v_cfg = model_preset("tiny"), model_preset("tiny", prediction="v_residual")
    a, b = MultiScaleEstimator(eps_cfg.estimator), MultiScaleEstimator(v_cfg.estimator, v_cfg.schedule)
    assert a.to_eps is None
    assert a.state_dict().keys() == b.state_dict().keys()  # the tables are schedule, not weights
    assert EstimatorConfig.from_dict(v_cfg.estimator.to_dict()).prediction == "v_residual"
    assert EstimatorConfig.from_dict({k: v for k, v in eps_cfg.estimator.to_dict().items()
                                      if k != "prediction"}).prediction == "eps"  # old checkpoints
    with pytest.raises(ValueError, match="prediction must be one of"):
        model_preset("tiny", prediction="x0")


def test_noise_loss_scores_the_v_target():
    """With a network that outputs exactly the v target the loss is 0; with eps as its output it is not."""
    cfg = model_preset("tiny", prediction="v")
    est = MultiScaleEstimator(cfg.estimator, cfg.schedule)
    ab = torch.from_numpy(DDIMSchedule(ScheduleConfig()).alpha_bar)
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    cond = torch.zeros_like(x0)
    seen = {}

    def oracle(x_t, c, t):  # recover eps from x_t (x0 known), return the v target
        a = ab[t.long()].float()[:, None, None, None]
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        seen["eps"] = eps
        return est.target(x0, eps, c, t)

    est.predict = oracle
    torch.manual_seed(0)
    assert float(noise_loss(est, x0, cond, ab)) < 1e-8
    est.predict = lambda x_t, c, t: (oracle(x_t, c, t), seen["eps"])[1]
    torch.manual_seed(0)
    assert float(noise_loss(est, x0, cond, ab)) > 1e-3


def test_checkpoint_round_trip_keeps_prediction(tmp_path):
    from training.checkpoint import build_estimator, load_checkpoint, save_checkpoint
    from training.config import TrainConfig
    from training.unet import UNet

    cfgs = model_preset("tiny", prediction="v_residual")
    e = MultiScaleEstimator(cfgs.estimator, cfgs.schedule).state_dict()
    g = UNet(cfgs.ntb_unet).state_dict()
    config = dict(cfgs.to_dict(), train=TrainConfig(preset="tiny").to_dict())
    path = save_checkpoint(tmp_path / "m.pt", {"config": config, "step": 0,
                                               "state": {"G_A": g, "G_B": g, "ema_A": e, "ema_B": e}})
    ck = load_checkpoint(path)
    est = build_estimator(ck, "derain")
    assert est.config.prediction == "v_residual" and est.to_eps is not None
    x = torch.randn(1, 3, 16, 16)
    out = est(x, torch.zeros_like(x), torch.tensor([700.0]))
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
    assert not np.allclose(out.detach().numpy(), est.predict(x, torch.zeros_like(x), torch.tensor([700.0]))
                           .detach().numpy())
