"""CycleGAN's discriminators for the NTB: a documented deviation (docs/training.md).

The paper trains G_A / G_B with the cycle L1 alone, which identity generators satisfy exactly
(and unpaired training collapses to them: docs/quality.md). ``--lambda-adv > 0`` adds CycleGAN's
remedy to the NTB only; the DTB stays non-adversarial:

- two PatchGAN discriminators (Isola et al., pix2pix; Zhu et al., CycleGAN): ``D_clean`` scores
  patches of clean-domain images (real clean photos x vs G_B(y)), ``D_rainy`` rainy-domain ones
  (real rainy photos y vs G_A(x));
- least-squares GAN losses (Mao et al., LSGAN), as CycleGAN uses: the generators minimise
  ``(D(fake) - 1)^2``; each discriminator minimises ``((D(real) - 1)^2 + D(fake)^2) / 2`` with its
  own Adam, stepped after the main one on the detached fakes.

CycleGAN's history buffer of 50 fakes is left out (the batch's own fakes are used).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PatchDiscriminator", "Discriminators", "lsgan_generator_loss", "lsgan_discriminator_loss"]


class PatchDiscriminator(nn.Module):
    """A PatchGAN: strided 4x4 convolutions, InstanceNorm, LeakyReLU(0.2), one score per patch.

    ``layers`` strided blocks then a stride-1 block and a 1-channel output; with 2 strided layers
    (the default, for 64-128 px crops) each score sees a 34x34 px patch.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 2) -> None:
        super().__init__()
        if layers < 1 or channels < 1:
            raise ValueError(f"PatchDiscriminator needs layers >= 1 and channels >= 1, got {layers}, {channels}")
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, layers + 1):
            nxt = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            mods += [nn.Conv2d(ch, nxt, 4, stride, 1), nn.InstanceNorm2d(nxt, affine=True), nn.LeakyReLU(0.2)]
            ch = nxt
        mods.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Discriminators(nn.Module):
    """D_clean (clean domain: x vs G_B(y)) and D_rainy (rainy domain: y vs G_A(x))."""

    def __init__(self, channels: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.D_clean = PatchDiscriminator(channels=channels, layers=layers)
        self.D_rainy = PatchDiscriminator(channels=channels, layers=layers)

    def forward(self, real_clean: torch.Tensor, fake_clean: torch.Tensor, real_rainy: torch.Tensor,
                fake_rainy: torch.Tensor) -> torch.Tensor:
        """The discriminators' loss on detached fakes (what their optimiser minimises)."""
        return (lsgan_discriminator_loss(self.D_clean, real_clean, fake_clean.detach())
                + lsgan_discriminator_loss(self.D_rainy, real_rainy, fake_rainy.detach()))


def lsgan_generator_loss(disc: nn.Module, fake: torch.Tensor) -> torch.Tensor:
    """(D(fake) - 1)^2: the generator wants its output scored as real."""
    score = disc(fake)
    return F.mse_loss(score, torch.ones_like(score))


def lsgan_discriminator_loss(disc: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """((D(real) - 1)^2 + D(fake)^2) / 2."""
    s_real, s_fake = disc(real), disc(fake)
    return 0.5 * (F.mse_loss(s_real, torch.ones_like(s_real)) + F.mse_loss(s_fake, torch.zeros_like(s_fake)))
