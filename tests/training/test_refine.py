"""Predict-and-refine (cond_channels = 6, x0_residual): the model side."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.algorithm import RainDiffusion
from training.config import model_preset
from training.diffusion import ddim_sample
from training.multiscale import EstimatorConfig, MultiScaleEstimator, Prologue, cond_base, fused_step
from training.synthrain import rain_batch
from training.unet import UNet


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _perturb(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return net.eval()


def tiny_refine():
    return model_preset("tiny", prediction="x0_residual", cond_channels=6)


def test_edge_preset_is_predict_and_refine():
    cfg = model_preset("edge")
    assert cfg.estimator.cond_channels == 6 and cfg.estimator.prediction == "x0_residual"
    assert cfg.estimator.unet.in_channels == 9 and cfg.estimator.refines
    assert cfg.ntb_unet.attention_levels == ()  # P is fully convolutional: any frame size
    # the paper's presets keep their y-only condition and eps
    small = model_preset("small")
    assert small.estimator.cond_channels == 3 and small.estimator.prediction == "eps"
    assert small.estimator.unet.in_channels == 6 and not small.estimator.refines


def test_estimator_config_round_trip_and_old_dicts():
    cfg = tiny_refine().estimator
    assert EstimatorConfig.from_dict(cfg.to_dict()) == cfg
    old = model_preset("tiny").estimator.to_dict()
    del old["cond_channels"]  # a checkpoint from before predict-and-refine
    assert EstimatorConfig.from_dict(old).cond_channels == 3
    with pytest.raises(ValueError, match="cond_channels must be one of"):
        EstimatorConfig(unet=cfg.unet, cond_channels=4)
    with pytest.raises(ValueError, match="takes 9 channels"):
        EstimatorConfig(unet=model_preset("tiny").estimator.unet, cond_channels=6)


@pytest.mark.parametrize("steps", [0, 2, 3, 10])
def test_untrained_refiner_returns_the_prediction_exactly(steps):
    """x0_residual with the zero-initialised output: every DDIM trajectory ends at b = P(y)."""
    cfg = tiny_refine()
    est = MultiScaleEstimator(cfg.estimator, cfg.schedule).eval()  # out conv = 0: raw = 0
    prologue = Prologue(_perturb(UNet(cfg.ntb_unet), 1))
    y = torch.rand(2, 3, 24, 40) * 2 - 1
    with torch.no_grad():
        b = prologue(y)[:, 3:]
        out = ddim_sample(est, y, steps=steps, seed=0, prologue=prologue)
    assert not torch.equal(b, y)  # P is not the identity here
    torch.testing.assert_close(out, b, atol=2e-5, rtol=0)


def test_x0_residual_last_step_is_the_prediction_plus_the_residual():
    """The fused step to t = 0 (c = 1, d = 0) returns raw + base: what x0_residual means."""
    cfg = tiny_refine()
    est = _perturb(MultiScaleEstimator(cfg.estimator, cfg.schedule), 2)
    from runtime.schedule import DDIMSchedule

    sched = DDIMSchedule()
    sched.set_timesteps(4)
    coef = torch.from_numpy(sched.coefficients()[-1:]).repeat(2, 1)
    t = torch.full((2,), float(sched.timesteps[-1]))
    x_t, cond = torch.randn(2, 3, 16, 16), torch.rand(2, 6, 16, 16) * 2 - 1
    with torch.no_grad():
        got = fused_step(est, x_t, cond, t, coef)
        want = est.predict(x_t, cond, t) + cond_base(cond)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # and the training target of that residual is x_0 - base, whatever t is
    x_0 = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(est.target(x_0, torch.randn_like(x_0), cond, t), x_0 - cond[:, 3:])


def test_zero_steps_needs_a_prologue():
    cfg = model_preset("tiny")
    est = MultiScaleEstimator(cfg.estimator, cfg.schedule).eval()
    with pytest.raises(ValueError, match="steps = 0 needs a predict-and-refine model"):
        ddim_sample(est, torch.zeros(1, 3, 16, 16), steps=0, seed=0)


def test_algorithm1_trains_all_four_networks_with_refine_conditions():
    torch.manual_seed(0)
    m = RainDiffusion(tiny_refine())
    for net in (m.G_A, m.G_B):
        _perturb(net, 3).train()
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    x_syn = rain_batch(x, torch.Generator().manual_seed(0))
    out = m(x, y, ntb="render", x_syn=x_syn)
    assert all(np.isfinite(float(v.detach())) for k, v in out.items() if k != "fakes")
    out["loss"].backward()
    for name in ("G_A", "G_B", "eps_A", "eps_B"):
        grads = [p.grad for p in getattr(m, name).parameters() if p.grad is not None]
        assert grads and any(bool(g.abs().sum()) for g in grads), name


def test_the_estimate_channels_do_not_train_the_predictor():
    """Through the estimate channels of a condition no gradient reaches G_B (detached): with the
    cycle off and the conditions detached, G_B's only gradient is y' = G_B(y) as A's x_0 target,
    and that gradient is the same whether the estimate channels carry G_B(.) or zeros."""
    torch.manual_seed(0)
    cfg = tiny_refine()
    m = RainDiffusion(cfg)
    for net in (m.G_A, m.G_B, m.eps_A, m.eps_B):
        _perturb(net, 4).train()
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    x_syn = rain_batch(x, torch.Generator().manual_seed(0))

    def g_b_grad() -> torch.Tensor:
        m.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        m(x, y, ntb="render", x_syn=x_syn, lambda_cyc=0.0, detach_cond=True)["loss"].backward()
        return torch.cat([p.grad.flatten() for p in m.G_B.parameters()])

    a = g_b_grad()
    assert bool(a.abs().sum())  # the x_0 target path exists
    # the same gradient when the noise losses never see the estimate channels' graph at all
    real_cat = torch.cat

    def cat_detached(ts, dim=0):
        if dim == 1 and len(ts) == 2 and ts[0].shape[1] == 3 and ts[1].shape[1] == 3:
            return real_cat([ts[0], ts[1].detach()], dim)
        return real_cat(ts, dim)

    torch.cat = cat_detached
    try:
        b = g_b_grad()
    finally:
        torch.cat = real_cat
    torch.testing.assert_close(a, b)
