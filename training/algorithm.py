"""Algorithm 1 of RainDiffusion: one training step over the NTB and the DTB.

NTB (non-diffusive translation branch): G_A clean -> rainy, G_B rainy -> clean.
DTB (diffusive translation branch): eps_A (derain: x | rainy cond) and eps_B (rain generation:
rainy | clean cond), each a multi-scale noise estimator. One optimiser step updates all of
theta (generators) and phi (estimators) with the sum of four noise losses and lambda_cyc * L_cyc.

The losses are computed in :meth:`RainDiffusion.forward` so that the whole model can be
wrapped in DistributedDataParallel (gradients are synchronised only through a wrapped forward).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from training.config import ModelConfigs, NTBMode
from training.diffusion import alpha_bar_tensor, noise_draw, noise_errors, q_sample
from training.gan import Discriminators, lsgan_generator_loss
from training.multiscale import MultiScaleEstimator
from training.unet import UNet

__all__ = ["RainDiffusion", "algorithm1_step", "sds_loss", "drop_condition", "LOSS_TERMS", "SDS_T_RANGE"]

#: Keys of the dict algorithm1_step returns (besides "id_dist"); "adv" and "D" are 0 without discriminators,
#: "idt" without lambda_idt, "sds" without lambda_sds.
LOSS_TERMS = ("loss", "A_x", "B_xp", "B_y", "A_yp", "cyc", "syn", "adv", "D", "idt", "sds")

#: Timesteps the score-distillation prior is queried at (inclusive): low and middle noise levels,
#: where the unconditional estimate sees local structure (streaks) rather than inventing content.
SDS_T_RANGE = (50, 600)


def drop_condition(cond: torch.Tensor, p: float) -> torch.Tensor:
    """Classifier-free-guidance style condition dropout: each sample's condition is replaced by
    zeros (the "no condition" input, mid grey) with probability ``p`` (torch's global RNG)."""
    if p <= 0:
        return cond
    keep = (torch.rand(cond.shape[0]) >= p).to(device=cond.device, dtype=cond.dtype)
    return cond * keep[:, None, None, None]


def sds_loss(estimator: nn.Module, g: torch.Tensor, alpha_bar: torch.Tensor,
             t_range: tuple[int, int] = SDS_T_RANGE) -> tuple[torch.Tensor, torch.Tensor]:
    """Score distillation (DreamFusion's SDS) of a generator output ``g`` under an unconditional prior.

    Draws t ~ U{t_range}, eps ~ N(0, I), noises ``g`` to z_t and asks ``estimator(z_t, 0, t)`` (the
    condition-dropped model: the prior of its domain) for eps_hat. The gradient w(t) (eps_hat - eps)
    with w(t) = 1 - alpha_bar_t reaches ``g`` only (no gradient through the estimator), averaged
    over the elements like the other losses. Returns (surrogate whose gradient that is, monitor =
    mean |w (eps_hat - eps)|); the surrogate's value itself means nothing.
    """
    n = g.shape[0]
    t = torch.randint(t_range[0], t_range[1] + 1, (n,)).to(g.device)
    eps = torch.randn(g.shape).to(device=g.device, dtype=g.dtype)
    with torch.no_grad():
        z_t = q_sample(g.detach(), t, eps, alpha_bar)
        cond_channels = getattr(getattr(estimator, "config", None), "cond_channels", g.shape[1])
        no_cond = g.new_zeros((n, cond_channels, *g.shape[2:]))
        eps_hat = estimator(z_t, no_cond, t.to(g.dtype))
        w = (1.0 - alpha_bar.to(g.device)[t.long()]).to(torch.float32)[:, None, None, None]
        grad = w * (eps_hat.float() - eps.float())
    return (grad.to(g.dtype) * g).sum() / g.numel(), grad.abs().mean()


class RainDiffusion(nn.Module):
    """The four networks of RainDiffusion plus runtime's alpha_bar table (a buffer)."""

    def __init__(self, configs: ModelConfigs) -> None:
        super().__init__()
        self.configs = configs
        self.G_A = UNet(configs.ntb_unet)  # clean -> rainy
        self.G_B = UNet(configs.ntb_unet)  # rainy -> clean
        self.eps_A = MultiScaleEstimator(configs.estimator, configs.schedule)  # derain: x | rainy condition
        self.eps_B = MultiScaleEstimator(configs.estimator, configs.schedule)  # rain gen.: rainy | clean cond
        self.register_buffer("alpha_bar", alpha_bar_tensor(configs.schedule), persistent=False)
        #: Run each network once on the two batches it gets (concatenated) instead of twice: 42% fewer
        #: kernel launches on a GPU, where the step is launch-bound (docs/benchmarks.md); the same
        #: losses (per-sample networks: GroupNorm, no batch statistics) and the same random draws.
        #: False = the literal one-call-per-term transcription (tests compare the two;
        #: benchmarks/train_step.py --calls unbatched,batched times them).
        self.batch_calls = True

    def _pair(self, net: nn.Module, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(net(a), net(b)), as one call on the concatenation where the shapes allow it."""
        if not self.batch_calls or a.shape[1:] != b.shape[1:]:
            return net(a), net(b)
        out = net(torch.cat([a, b]))
        return out[:a.shape[0]], out[a.shape[0]:]

    def _pair_losses(self, est: nn.Module, a: tuple, b: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """The noise losses of two draws (x_0, cond, t, eps) on one estimator, batched like :meth:`_pair`."""
        ab = self.alpha_bar
        if not self.batch_calls or a[0].shape[1:] != b[0].shape[1:] or a[1].shape[1:] != b[1].shape[1:]:
            return noise_errors(est, *a, ab).mean(), noise_errors(est, *b, ab).mean()
        err = noise_errors(est, *(torch.cat([u, v]) for u, v in zip(a, b)), ab)
        return err[:a[0].shape[0]].mean(), err[a[0].shape[0]:].mean()

    def forward(self, x: torch.Tensor, y: torch.Tensor, *, lambda_cyc: float = 1.0, ntb: str = "faithful",
                lambda_syn: float = 0.0, x_syn: torch.Tensor | None = None,
                detach_cond: bool = False, disc: Discriminators | None = None,
                lambda_adv: float = 0.0, lambda_idt: float = 0.0, cond_drop: float = 0.0,
                lambda_sds: float = 0.0) -> dict[str, torch.Tensor]:
        """Losses of Algorithm 1 for a clean batch x and a rainy batch y (both [-1, 1]).

        With ``disc`` (``--lambda-adv``, a deviation: training.gan) the generators also get
        ``lambda_adv`` times the LSGAN generator loss of G_B(y) under D_clean and of G_A(x) under
        D_rainy; the detached fakes come back under "fakes" for the discriminators' own step.
        ``lambda_idt > 0`` (``--lambda-idt``, CycleGAN's identity loss, a deviation) adds
        ``lambda_idt * (|G_B(x) - x|_1 + |G_A(y) - y|_1)``: each generator leaves an image that is
        already in its target domain unchanged, which keeps colour and tone.
        ``cond_drop`` and ``lambda_sds`` are a non-adversarial prior (a deviation, docs/training.md):
        the noise losses of the two *real* images (A on clean x, B on rainy y) drop their
        condition with probability ``cond_drop``, so eps_A(., 0, t) learns the clean photos and
        eps_B(., 0, t) the rainy ones; ``lambda_sds`` times :func:`sds_loss` then pulls G_B(y) toward
        the clean prior (and G_A(x), where it is computed, toward the rainy one).
        """
        # 3: NTB translations.
        render = NTBMode(ntb) is NTBMode.render
        # G_A(x) is unused in render mode unless the discriminators or the SDS prior judge it: not computed then.
        need_g_a_x = not render or disc is not None or lambda_sds > 0
        g_a_x = None if render else self.G_A(x)  # x' = G_A(x): clean -> rainy (needed before G_B)
        x_p = g_a_x
        if render:
            # Deviation (--ntb render, docs/training.md): the rain renderer plays G_A on the clean branch,
            # so x' is a real rainy version of x and every clean-branch term learns from it.
            if x_syn is None:
                raise ValueError("ntb='render' needs x_syn = synthrain(x)")
            x_p = x_syn
        x_pp, y_p = self._pair(self.G_B, x_p, y)  # x'' = G_B(x') back to clean; y' = G_B(y) rainy -> clean
        if render and need_g_a_x:
            y_pp, g_a_x = self._pair(self.G_A, y_p, x)  # y'' = G_A(y') back to rainy; G_A(x) for D / SDS
        else:
            y_pp = self.G_A(y_p)

        def c(v: torch.Tensor) -> torch.Tensor:  # the paper lets the noise losses reach the generators
            return v.detach() if detach_cond else v

        # 4-5: t ~ U{1..T}, eps ~ N(0, I) per term (drawn in the order of the terms), and the four
        # noise-prediction losses, each estimator called once on its two terms' batches.
        # Predict-and-refine (cond_channels = 6, docs/ARCHITECTURE.md): every condition also carries
        # its generator's translation, the estimate the estimator refines: [rainy, G_B(rainy)] for A,
        # [clean, G_A(clean)] for B. The estimate is detached, so P = G_B is trained by its own terms
        # only and P(y) stays a deraining on its own (the output at zero DDIM steps).
        if self.configs.estimator.refines:
            with torch.no_grad():
                g_a_xpp, g_b_ypp = self.G_A(x_pp), self.G_B(y_pp)  # the two estimates not computed above
            cond_A_x, cond_B_xp = torch.cat([c(x_p), x_pp.detach()], 1), torch.cat([c(x_pp), g_a_xpp], 1)
            cond_B_y, cond_A_yp = torch.cat([c(y_p), y_pp.detach()], 1), torch.cat([c(y_pp), g_b_ypp], 1)
        else:
            cond_A_x, cond_B_xp, cond_B_y, cond_A_yp = c(x_p), c(x_pp), c(y_p), c(y_pp)
        ab = self.alpha_bar
        d_A_x = (x, drop_condition(cond_A_x, cond_drop), *noise_draw(x, ab))  # A: clean x | rainy x'
        d_B_xp = (x_p, cond_B_xp, *noise_draw(x_p, ab))  # B: rainy x'  | clean x''
        d_B_y = (y, drop_condition(cond_B_y, cond_drop), *noise_draw(y, ab))  # B: rainy y | clean y'
        d_A_yp = (y_p, cond_A_yp, *noise_draw(y_p, ab))  # A: clean y'  | rainy y''
        A_x, A_yp = self._pair_losses(self.eps_A, d_A_x, d_A_yp)
        B_xp, B_y = self._pair_losses(self.eps_B, d_B_xp, d_B_y)
        # 6: cycle consistency L_cyc = |x'' - x|_1 + |y'' - y|_1.
        cyc = F.l1_loss(x_pp, x) + F.l1_loss(y_pp, y)
        loss = A_x + B_xp + B_y + A_yp + lambda_cyc * cyc
        # Deviation (--ntb synthetic): synthetic rain as a weak prior for G_A.
        syn = torch.zeros((), device=x.device)
        if NTBMode(ntb) is NTBMode.synthetic:
            if x_syn is None:
                raise ValueError("ntb='synthetic' needs x_syn = synthrain(x)")
            syn = F.l1_loss(x_p, x_syn)
            loss = loss + lambda_syn * syn
        # Deviation (--lambda-adv): CycleGAN's discriminators judge the NTB's outputs.
        adv = torch.zeros((), device=x.device)
        out: dict = {}
        if disc is not None:
            adv = lsgan_generator_loss(disc.D_clean, y_p) + lsgan_generator_loss(disc.D_rainy, g_a_x)
            loss = loss + lambda_adv * adv
            out["fakes"] = (y_p.detach(), g_a_x.detach())
        # Deviation (--lambda-idt): CycleGAN's identity loss.
        idt = torch.zeros((), device=x.device)
        if lambda_idt > 0:
            idt = F.l1_loss(self.G_B(x), x) + F.l1_loss(self.G_A(y), y)
            loss = loss + lambda_idt * idt
        # Deviation (--lambda-sds): score distillation under the unconditional priors.
        sds = torch.zeros((), device=x.device)
        if lambda_sds > 0:
            surrogate, sds = sds_loss(self.eps_A, y_p, self.alpha_bar)  # G_B(y) toward clean photos
            if g_a_x is not None:
                s_a, m_a = sds_loss(self.eps_B, g_a_x, self.alpha_bar)  # G_A(x) toward rainy photos
                surrogate, sds = surrogate + s_a, sds + m_a
            loss = loss + lambda_sds * surrogate
        # |G_B(y) - y|: how far the derain generator is from identity (a collapse monitor).
        id_dist = (y_p - y).abs().mean().detach()
        out.update({"loss": loss, "A_x": A_x, "B_xp": B_xp, "B_y": B_y, "A_yp": A_yp, "cyc": cyc, "syn": syn,
                    "adv": adv, "idt": idt, "sds": sds, "id_dist": id_dist})
        return out


def algorithm1_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
                    lambda_cyc: float = 1.0, ntb: str = "faithful", lambda_syn: float = 0.0,
                    x_syn: torch.Tensor | None = None, detach_cond: bool = False, grad_clip: float = 0.0,
                    autocast_dtype: torch.dtype | None = None, disc: nn.Module | None = None,
                    disc_optimizer: torch.optim.Optimizer | None = None,
                    lambda_adv: float = 0.0, lambda_idt: float = 0.0, cond_drop: float = 0.0,
                    lambda_sds: float = 0.0) -> dict[str, float]:
    """1-7: one step of Algorithm 1 - losses, backward, ONE optimiser step over theta and phi.

    ``model`` is a :class:`RainDiffusion` or its DDP wrapper. Returns the loss terms as floats.
    With ``disc`` (a :class:`Discriminators` or its DDP wrapper) and ``disc_optimizer`` the
    generators also get the adversarial term, and the discriminators then take their own step on
    the detached fakes (the deviation of ``--lambda-adv``; the main step stays one step over
    theta and phi).
    """
    if (disc is None) != (disc_optimizer is None):
        raise ValueError("disc and disc_optimizer go together")
    inner_disc = getattr(disc, "module", disc)  # the generators' term calls the unwrapped nets
    model.train()
    optimizer.zero_grad(set_to_none=True)
    device_type = x.device.type

    def ctx():
        return (torch.autocast(device_type=device_type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())

    with ctx():
        terms = model(x, y, lambda_cyc=lambda_cyc, ntb=ntb, lambda_syn=lambda_syn, x_syn=x_syn,
                      detach_cond=detach_cond, disc=inner_disc, lambda_adv=lambda_adv, lambda_idt=lambda_idt,
                      cond_drop=cond_drop, lambda_sds=lambda_sds)
    fakes = terms.pop("fakes", None)
    terms["loss"].backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()  # 7: theta, phi <- Adam step
    terms["D"] = torch.zeros(())
    if disc is not None:
        disc.train()
        disc_optimizer.zero_grad(set_to_none=True)  # drops what the generators' term left on D
        with ctx():
            d_loss = disc(x, fakes[0], y, fakes[1])
        d_loss.backward()
        disc_optimizer.step()
        terms["D"] = d_loss
    return {k: float(v.detach()) for k, v in terms.items()}
