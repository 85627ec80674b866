"""Golden numbers of the DDIM schedule (runtime.schedule), and training's use of it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from runtime.schedule import DDIMSchedule, ScheduleConfig, initial_noise

T = 1000


def beta(s: int) -> float:
    """beta_s of the linear schedule, 1-based, computed independently of numpy.linspace."""
    return 1e-4 + (s - 1) * (0.02 - 1e-4) / (T - 1)


def alpha_bar(t: int) -> float:
    return math.prod(1.0 - beta(s) for s in range(1, t + 1))


def test_tau_lists_are_golden():
    sched = DDIMSchedule()
    assert sched.set_timesteps(10).tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert sched.next_timesteps.tolist() == [801, 701, 601, 501, 401, 301, 201, 101, 1, 0]
    assert sched.set_timesteps(25).tolist() == [
        961, 921, 881, 841, 801, 761, 721, 681, 641, 601, 561, 521, 481,
        441, 401, 361, 321, 281, 241, 201, 161, 121, 81, 41, 1]
    assert sched.next_timesteps.tolist()[-2:] == [1, 0]
    assert sched.set_timesteps(2).tolist() == [501, 1]
    assert sched.set_timesteps(1000).tolist() == list(range(1000, 0, -1))


def test_one_step_is_refused_with_the_reason():
    """S = 1 is tau_1 = 1: the update x0 = (x_1 - sqrt(1 - ab_1) eps) / sqrt(ab_1) hands x_T back."""
    sched = DDIMSchedule()
    with pytest.raises(ValueError, match=r"steps must be an integer in 2\.\.1000, got 1 \(a single step of "
                                         r"Algorithm 2 is at t = 1 and returns the initial noise\)"):
        sched.set_timesteps(1)
    with pytest.raises(ValueError, match=r"in 2\.\.1000, got 1001$"):
        sched.set_timesteps(1001)
    a, b, _, _ = sched.step_coefficients(1, 0)
    assert a == pytest.approx(1.0, abs=1e-4) and b < 0.011  # x0_hat ~ x_1: the noise comes back


@pytest.mark.parametrize("t", [1, 2, 101, 500, 901, 1000])
def test_alpha_bar_matches_independent_product(t):
    sched = DDIMSchedule()
    assert sched.alpha_bar[0] == 1.0
    assert sched.alpha_bar.shape == (T + 1,)
    assert sched.alpha_bar[t] == pytest.approx(alpha_bar(t), rel=1e-12)
    assert sched.betas[t - 1] == pytest.approx(beta(t), rel=1e-12)


def test_alpha_bar_golden_values():
    sched = DDIMSchedule()
    assert sched.alpha_bar[1] == pytest.approx(0.9999, rel=1e-12)
    assert sched.alpha_bar[1000] == pytest.approx(4.0358297653756754e-05, rel=1e-9)
    assert sched.alpha_bar[500] == pytest.approx(0.07858724288177821, rel=1e-9)


@pytest.mark.parametrize("t,t_next", [(901, 801), (101, 1), (1, 0), (1000, 960)])
def test_step_coefficients_are_golden(t, t_next):
    ab, ab_next = alpha_bar(t), alpha_bar(t_next)
    expect = [1 / math.sqrt(ab), math.sqrt(1 - ab) / math.sqrt(ab), math.sqrt(ab_next), math.sqrt(1 - ab_next)]
    got = DDIMSchedule().step_coefficients(t, t_next)
    np.testing.assert_allclose(got, expect, rtol=1e-11)


def test_coefficient_table():
    sched = DDIMSchedule()
    sched.set_timesteps(10)
    coef = sched.coefficients()
    assert coef.shape == (10, 4) and coef.dtype == np.float32
    np.testing.assert_allclose(coef[-1, 2:], [1.0, 0.0])  # last step lands on alpha_bar = 1
    np.testing.assert_allclose(coef[0], sched.step_coefficients(901, 801).astype(np.float32))


def test_step_before_set_timesteps_raises():
    sched = DDIMSchedule()
    with pytest.raises(RuntimeError, match="set_timesteps"):
        sched.step(np.zeros(3), 901, np.zeros(3))
    with pytest.raises(RuntimeError, match="set_timesteps"):
        sched.coefficients()


@pytest.mark.parametrize("steps", [10, 25])
def test_full_loop_with_oracle_estimator_recovers_x0(steps):
    """A dummy estimator returning the true noise makes eta = 0 DDIM exact at every step."""
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (1, 3, 8, 8))
    eps = rng.standard_normal((1, 3, 8, 8))
    sched = DDIMSchedule()
    taus = sched.set_timesteps(steps)
    x_t = sched.q_sample(x0, int(taus[0]), eps)
    for t in taus:
        x_t, x0_hat = sched.step(eps, int(t), x_t)
        np.testing.assert_allclose(x0_hat, x0, atol=1e-12)
    np.testing.assert_allclose(x_t, x0, atol=1e-12)


def test_initial_noise_is_pcg64():
    a = initial_noise((1, 3, 4, 4), 7)
    b = np.random.Generator(np.random.PCG64(7)).standard_normal((1, 3, 4, 4), dtype=np.float32)
    assert a.dtype == np.float32 and np.array_equal(a, b)



def test_initial_noise_scale():
    """x_T = scale * N(0, I) (a manifest's prologue.noise_scale): the same draw scaled, zeros at 0;
    frame_noise repeats that one frame's draw over the batch."""
    from runtime.schedule import frame_noise

    a = initial_noise((1, 3, 4, 4), 7)
    np.testing.assert_array_equal(initial_noise((1, 3, 4, 4), 7, 0.5), a * np.float32(0.5))
    zero = initial_noise((1, 3, 4, 4), 7, 0.0)
    assert zero.dtype == np.float32 and zero.shape == (1, 3, 4, 4) and not zero.any()
    f = frame_noise(2, 4, 4, 7, 0.5)
    assert f.shape == (2, 3, 4, 4) and f.flags.c_contiguous
    np.testing.assert_array_equal(f[1], a[0] * np.float32(0.5))


def test_training_uses_runtime_alpha_bar():
    torch = pytest.importorskip("torch")
    from training.diffusion import alpha_bar_tensor, q_sample

    sched = DDIMSchedule(ScheduleConfig())
    ab = alpha_bar_tensor()
    assert ab.dtype == torch.float64
    assert np.array_equal(ab.numpy(), sched.alpha_bar)  # the same numbers, bit for bit
    rng = np.random.default_rng(1)
    x0 = rng.uniform(-1, 1, (3, 3, 4, 4)).astype(np.float32)
    eps = rng.standard_normal((3, 3, 4, 4)).astype(np.float32)
    ts = [1, 500, 1000]
    got = q_sample(torch.from_numpy(x0), torch.tensor(ts), torch.from_numpy(eps), ab).numpy()
    for i, t in enumerate(ts):
        np.testing.assert_allclose(got[i], sched.q_sample(x0[i].astype(np.float64), t, eps[i]), atol=1e-6)
    # and the model's buffer is that table
    from training.algorithm import RainDiffusion
    from training.config import model_preset

    assert np.array_equal(RainDiffusion(model_preset("tiny")).alpha_bar.numpy(), sched.alpha_bar)


# ------------------------------------------------------------------ one (de)serialisation of the schedule
def test_schedule_config_to_dict_is_golden_and_from_dict_inverts_it():
    """Checkpoints ("diffusion"), manifests ("schedule") and every reader use these two functions."""
    cfg = ScheduleConfig(num_train_timesteps=500, beta_start=2e-4, beta_end=0.01)
    assert cfg.to_dict() == {"num_train_timesteps": 500, "beta_start": 2e-4, "beta_end": 0.01}
    assert ScheduleConfig.from_dict(cfg.to_dict()) == cfg
    # a manifest's section carries default_steps too; numbers may come back from JSON as other types
    assert ScheduleConfig.from_dict({**cfg.to_dict(), "default_steps": 10}) == cfg
    assert ScheduleConfig.from_dict({"num_train_timesteps": 500.0, "beta_start": "2e-4", "beta_end": 0.01}) == cfg
    assert ScheduleConfig.from_dict(ScheduleConfig().to_dict()) == ScheduleConfig()


@pytest.mark.parametrize("d,match", [
    ({"beta_start": 1e-4, "beta_end": 0.02}, "schedule is missing 'num_train_timesteps'"),
    ({"num_train_timesteps": "many", "beta_start": 1e-4, "beta_end": 0.02}, "schedule is invalid"),
    ({"num_train_timesteps": 1000, "beta_start": 0.03, "beta_end": 0.02}, "beta_start <= beta_end"),
])
def test_schedule_config_from_dict_names_the_problem(d, match):
    with pytest.raises(ValueError, match=match):
        ScheduleConfig.from_dict(d)


def test_manifest_schedule_config_is_from_dict_and_a_bad_one_is_a_manifest_error():
    from runtime.derainer import default_artifact
    from runtime.errors import ManifestError
    from runtime.manifest import Manifest

    m = Manifest.for_artifact(default_artifact())
    assert m.schedule_config == ScheduleConfig.from_dict(m.schedule) == ScheduleConfig()
    m.schedule = {"default_steps": 3}
    with pytest.raises(ManifestError, match=r"manifest of default\.onnx: invalid schedule \(schedule is missing"):
        _ = m.schedule_config


def test_model_configs_round_trip_the_shipped_checkpoints_schedule():
    """training.config.ModelConfigs reads and writes "diffusion" through ScheduleConfig's own pair."""
    pytest.importorskip("torch")
    from pathlib import Path

    from training.checkpoint import load_checkpoint, model_configs

    ckpt = load_checkpoint(Path(__file__).resolve().parents[1] / "training" / "assets" / "default.pt")
    cfgs = model_configs(ckpt)
    assert cfgs.schedule == ScheduleConfig()
    assert cfgs.to_dict()["diffusion"] == ckpt["config"]["diffusion"] == ScheduleConfig().to_dict()


# ------------------------------------------------------------------ the one DDIM loop
def test_sample_loop_is_the_schedule_step_loop_and_shows_each_steps_inputs():
    """``sample_loop`` over a fused step equals DDIMSchedule.step over the same estimator (the
    loop that training's reference, verification and calibration each wrote before), and
    ``on_step`` sees the exact (t, coef) rows of the coefficient table."""
    from runtime.schedule import sample_loop

    rng = np.random.default_rng(3)
    cond = rng.uniform(-1, 1, (2, 3, 4, 4)).astype(np.float32)
    x_T = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)

    def eps_theta(x_t, c, t):  # a dummy estimator that depends on every input
        return (0.3 * x_t - 0.2 * c + t[:, None, None, None] / 1000.0).astype(np.float32)

    def fused(x_t, c, t, coef):
        a, b, cc, d = (coef[:, k, None, None, None] for k in range(4))
        eps_hat = eps_theta(x_t, c, t)
        return cc * (a * x_t - b * eps_hat) + d * eps_hat

    sched = DDIMSchedule()
    sched.set_timesteps(5)
    seen = []
    got = sample_loop(fused, x_T, cond, sched, on_step=lambda i, x, t, coef: seen.append((i, t.copy(), coef.copy())))

    want = x_T.astype(np.float64)
    for t in sched.timesteps:
        want, _ = sched.step(eps_theta(want, cond, np.full(2, float(t))), int(t), want)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    table = sched.coefficients()
    assert [i for i, _, _ in seen] == [0, 1, 2, 3, 4]
    for i, t, coef in seen:
        assert t.dtype == np.float32 and t.tolist() == [float(sched.timesteps[i])] * 2
        assert coef.shape == (2, 4) and np.array_equal(coef, np.repeat(table[i][None], 2, axis=0))
    with pytest.raises(RuntimeError, match=r"set_timesteps\(num_steps\) before sample_loop"):
        sample_loop(fused, x_T, cond, DDIMSchedule())
