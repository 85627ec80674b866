"""Issue 8 candidate 1: condition dropout (unconditional priors) and score distillation (--lambda-sds)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import training.algorithm as algorithm
from runtime.errors import UsageError
from training.algorithm import SDS_T_RANGE, RainDiffusion, drop_condition, sds_loss
from training.config import TrainConfig, model_preset
from training.diffusion import alpha_bar_tensor, q_sample
from training.synthrain import rain_batch


def batch(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1, torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_drop_condition_zeroes_whole_samples_at_rate_p():
    cond = torch.ones(4000, 3, 2, 2)
    assert drop_condition(cond, 0.0) is cond
    torch.manual_seed(0)
    out = drop_condition(cond, 0.25)
    per_sample = out.flatten(1)
    dropped = (per_sample == 0).all(1)
    assert bool(((per_sample == 1).all(1) | dropped).all())  # a sample is kept or dropped as a whole
    assert 0.22 < float(dropped.float().mean()) < 0.28


class Recorder(nn.Module):
    """An eps estimator that records its inputs and answers a fixed eps_hat."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value, self.calls = value, []
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x_t, cond, t):
        self.calls.append((x_t.clone(), cond.clone(), t.clone()))
        return torch.full_like(x_t, self.value) + 0 * self.w


def test_sds_gradient_is_weighted_residual_on_the_generator_output_only():
    ab = alpha_bar_tensor()
    est = Recorder(0.3)
    g = (torch.rand(3, 3, 8, 8) * 2 - 1).requires_grad_(True)
    torch.manual_seed(5)
    surrogate, monitor = sds_loss(est, g, ab)
    surrogate.backward()
    torch.manual_seed(5)  # the same draws, by hand
    t = torch.randint(SDS_T_RANGE[0], SDS_T_RANGE[1] + 1, (3,))
    eps = torch.randn(g.shape)
    w = (1.0 - ab[t]).float()[:, None, None, None]
    expected = w * (0.3 - eps)
    torch.testing.assert_close(g.grad, expected / g.numel())
    assert float(monitor) == pytest.approx(float(expected.abs().mean()), rel=1e-5)
    x_t, cond, t_seen = est.calls[0]
    torch.testing.assert_close(x_t, q_sample(g.detach(), t, eps, ab))  # g noised to t
    assert bool((cond == 0).all()) and torch.equal(t_seen, t.float())  # unconditional query
    assert est.w.grad is None  # nothing reaches the prior


@pytest.mark.parametrize("ntb", ["faithful", "render"])
def test_sds_term_reaches_both_generators_not_the_estimators(ntb):
    torch.manual_seed(0)
    m = RainDiffusion(model_preset("tiny"))
    x, y = batch(2)
    x_syn = rain_batch(x, torch.Generator().manual_seed(0))
    terms = m(x, y, ntb=ntb, x_syn=x_syn, lambda_cyc=0.0, cond_drop=0.5, lambda_sds=1.0)
    assert float(terms["sds"]) > 0
    m.zero_grad()
    # the SDS surrogate alone: total loss minus the (differentiable) noise terms, which carry no cycle here
    (terms["loss"] - terms["A_x"] - terms["B_xp"] - terms["B_y"] - terms["A_yp"]).backward()
    for name in ("G_A", "G_B"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(m, name).parameters()), name
    for name in ("eps_A", "eps_B"):
        assert all(p.grad is None or float(p.grad.abs().max()) < 1e-7 for p in getattr(m, name).parameters()), name


def test_condition_dropout_only_on_the_real_images_losses(monkeypatch):
    seen = []

    def spy(estimator, x_0, cond, t, eps, alpha_bar):
        seen.append(cond.detach().flatten(1).abs().sum(1))
        return x_0.flatten(1).sum(1) * 0

    monkeypatch.setattr(algorithm, "noise_errors", spy)
    torch.manual_seed(1)
    m = RainDiffusion(model_preset("tiny"))
    m.batch_calls = False  # one call per term (the batched calls give the same terms: test_batched_calls_*)
    x, y = batch(64, 16)
    x_syn = rain_batch(x, torch.Generator().manual_seed(0))
    m(x, y, ntb="render", x_syn=x_syn, cond_drop=0.5)
    a_x, a_yp, b_xp, b_y = ((s == 0).float().mean() for s in seen)  # share of zeroed conditions per term
    assert 0.3 < float(a_x) < 0.7 and 0.3 < float(b_y) < 0.7  # A on clean x, B on rainy y: dropped
    assert float(b_xp) == 0 and float(a_yp) == 0  # the generated images keep their conditions
    seen.clear()
    m(x, y, ntb="render", x_syn=x_syn)  # off by default: the paper's losses
    assert all(float((s == 0).float().mean()) == 0 for s in seen)


def test_config_validation():
    with pytest.raises(UsageError, match="needs cond_drop"):
        TrainConfig(lambda_sds=1.0)
    with pytest.raises(UsageError, match="cond_drop must be in"):
        TrainConfig(cond_drop=1.0)
    with pytest.raises(UsageError, match="lambda_sds must be >= 0"):
        TrainConfig(cond_drop=0.1, lambda_sds=-1.0)
    assert TrainConfig(cond_drop=0.2, lambda_sds=1.0).lambda_sds == 1.0
