"""CycleGAN's discriminators (--lambda-adv) and identity loss (--lambda-idt) for the NTB (issue 8)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from runtime.errors import UsageError
from training.algorithm import RainDiffusion, algorithm1_step
from training.config import TrainConfig, model_preset
from training.gan import Discriminators, PatchDiscriminator, lsgan_discriminator_loss, lsgan_generator_loss
from training.synthrain import rain_batch


class Constant(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x):
        return torch.full((x.shape[0], 1, 2, 2), self.value)


def batch(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1, torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_lsgan_losses_known_values():
    x = torch.zeros(2, 3, 8, 8)
    assert float(lsgan_generator_loss(Constant(0.25), x)) == pytest.approx(0.75**2)
    # ((0.25 - 1)^2 + 0.25^2) / 2 with the same score for real and fake
    assert float(lsgan_discriminator_loss(Constant(0.25), x, x)) == pytest.approx((0.75**2 + 0.25**2) / 2)
    assert float(lsgan_discriminator_loss(Constant(1.0), x, x)) == pytest.approx(0.5)


@pytest.mark.parametrize("size,layers,out", [(64, 2, 14), (32, 2, 6), (64, 3, 6)])
def test_patch_discriminator_scores_patches(size, layers, out):
    d = PatchDiscriminator(layers=layers, channels=8)
    assert d(torch.zeros(3, 3, size, size)).shape == (3, 1, out, out)
    with pytest.raises(ValueError, match="layers"):
        PatchDiscriminator(layers=0)


@pytest.mark.parametrize("ntb", ["faithful", "render"])
def test_adversarial_term_reaches_both_generators_not_the_estimators(ntb):
    torch.manual_seed(0)
    m, disc = RainDiffusion(model_preset("tiny")), Discriminators(channels=8)
    x, y = batch()
    x_syn = rain_batch(x, torch.Generator().manual_seed(0))
    terms = m(x, y, ntb=ntb, x_syn=x_syn, disc=disc, lambda_adv=1.0, lambda_cyc=0.0)
    assert float(terms["adv"].detach()) > 0 and [t.requires_grad for t in terms["fakes"]] == [False, False]
    terms["adv"].backward()
    for name in ("G_A", "G_B"):  # both translations are judged, in render mode too (G_A(x) vs rainy photos)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(m, name).parameters()), name
    for name in ("eps_A", "eps_B"):
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in getattr(m, name).parameters()), name


def test_step_trains_discriminators_with_their_own_optimizer():
    torch.manual_seed(0)
    m, disc = RainDiffusion(model_preset("tiny")), Discriminators(channels=8)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    d_opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    assert not {id(p) for p in disc.parameters()} & {id(p) for g in opt.param_groups for p in g["params"]}
    x, y = batch()
    before = {k: v.clone() for k, v in disc.state_dict().items()}
    d_losses = []
    for _ in range(15):
        terms = algorithm1_step(m, opt, x, y, disc=disc, disc_optimizer=d_opt, lambda_adv=0.1)
        d_losses.append(terms["D"])
    assert {"adv", "D"} <= set(terms) and all(v == v for v in terms.values())
    assert any(not torch.equal(before[k], v) for k, v in disc.state_dict().items())
    assert d_losses[-1] < d_losses[0]  # the discriminators learn to tell a fixed batch apart
    no_disc = algorithm1_step(m, opt, x, y)
    assert no_disc["adv"] == 0.0 and no_disc["D"] == 0.0
    with pytest.raises(ValueError, match="go together"):
        algorithm1_step(m, opt, x, y, disc=disc)


def test_identity_loss_is_zero_for_identity_generators_and_trains_them():
    torch.manual_seed(0)
    m = RainDiffusion(model_preset("tiny"))  # zero-initialised residual generators: the identity
    x, y = batch()
    x_syn = rain_batch(x, torch.Generator().manual_seed(0))
    assert float(m(x, y, ntb="render", x_syn=x_syn, lambda_idt=0.5)["idt"].detach()) == 0.0
    with torch.no_grad():
        for g in (m.G_A, m.G_B):
            for p in g.parameters():
                p.add_(0.05 * torch.randn(p.shape))
    base = m(x, y, ntb="render", x_syn=x_syn)
    terms = m(x, y, ntb="render", x_syn=x_syn, lambda_idt=0.5, lambda_cyc=0.0)
    idt = torch.nn.functional.l1_loss(m.G_B(x), x) + torch.nn.functional.l1_loss(m.G_A(y), y)
    assert float(base["idt"]) == 0.0 and float(terms["idt"].detach()) == pytest.approx(float(idt.detach()), rel=1e-6)
    terms["idt"].backward()
    for name in ("G_A", "G_B"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(m, name).parameters()), name


def test_lambda_adv_and_idt_are_validated():
    with pytest.raises(UsageError, match="lambda_adv"):
        TrainConfig(lambda_adv=-1.0)
    with pytest.raises(UsageError, match="lambda_idt"):
        TrainConfig(lambda_idt=-0.5)
    with pytest.raises(UsageError, match="disc_channels"):
        TrainConfig(disc_channels=0)
