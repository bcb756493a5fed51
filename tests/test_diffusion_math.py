"""Schedules and the forward/reverse diffusion math, including the structure-modulated variants."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_data as rd
from diffssr_jax.diffusion import process as diffusion, schedules
from helpers import nchw_to_nhwc



@pytest.fixture(scope="module")
def sched():
  return schedules.make_schedule(schedules.cosine_betas(100, 0.008))


def test_cosine_schedule_properties(sched):
  b = sched.betas
  assert b.dtype == np.float64 and b.shape == (100,)
  assert np.all(np.diff(b) > 0), "cosine betas increase monotonically"
  assert b[-1] == pytest.approx(0.999), "last beta is clipped at 0.999"
  # abar follows the cosine law at every step except where the clip acts.
  # The official code samples T + 1 points of [0, T + 1] (not the integers 0..T): kept for parity.
  n = 101
  f = np.cos(((np.linspace(0, n, n) / n) + 0.008) / 1.008 * np.pi / 2) ** 2
  np.testing.assert_allclose(sched.alphas_cumprod[:-1], (f / f[0])[1:-1], rtol=1e-12)


def test_linear_schedule():
  b = schedules.linear_betas(10, 1e-4, 0.02, last_beta=0.999)
  np.testing.assert_allclose(b[:-1], np.linspace(1e-4, 0.02, 10)[:-1])
  assert b[-1] == 0.999
  assert schedules.linear_betas(10, last_beta=None)[-1] == pytest.approx(0.02)


def test_phi_is_the_unrolled_sum(sched):
  abar, beta = sched.alphas_cumprod, sched.betas
  for t in (0, 1, 37, 99):
    direct = sum(np.sqrt(beta[i] * abar[t] / abar[i]) for i in range(t + 1))
    assert sched.phi[t] == pytest.approx(direct, rel=1e-12)
  assert sched.phi_prev[0] == 0.0 and sched.phi_prev[5] == sched.phi[4]
  # At t = 0 the target's E coefficient is exactly 1: sqrt(1 - abar_0) = sqrt(beta_0).
  assert sched.target_e[0] == pytest.approx(1.0, rel=1e-12)


def test_closed_form_equals_iterated_one_step_process(sched):
  """q(x_t | x0, E) from eq. 10 has the mean and variance of iterating x_t = sqrt(a_t) x_{t-1} + sqrt(b_t)(eps_t + E)."""
  rng = np.random.default_rng(0)
  x0, e = rng.normal(size=5), rng.normal(size=5)
  mean, var = x0.copy(), np.zeros(5)
  for t in range(100):
    mean = np.sqrt(sched.alphas[t]) * mean + np.sqrt(sched.betas[t]) * e
    var = sched.alphas[t] * var + sched.betas[t]
    closed_mean = np.asarray(diffusion.q_sample_paper(sched, jnp.asarray(x0[None, :, None, None], jnp.float32),
                                                      jnp.array([t]), jnp.zeros((1, 5, 1, 1)),
                                                      jnp.asarray(e[None, :, None, None], jnp.float32)))[0, :, 0, 0]
    np.testing.assert_allclose(closed_mean, mean, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(sched.sqrt_one_minus_alphas_cumprod[t] ** 2, var[0], rtol=1e-10)


def test_monte_carlo_matches_closed_form(sched):
  """Sampling the one-step chain gives the closed-form mean/std (statistical check, 20k chains)."""
  rng = np.random.default_rng(1)
  x0, e, t_end = 0.3, -0.7, 60
  x = np.full(20000, x0)
  for t in range(t_end + 1):
    x = np.sqrt(sched.alphas[t]) * x + np.sqrt(sched.betas[t]) * (rng.normal(size=x.shape) + e)
  mean = sched.sqrt_alphas_cumprod[t_end] * x0 + sched.phi[t_end] * e
  assert x.mean() == pytest.approx(mean, abs=0.03)
  assert x.std() == pytest.approx(sched.sqrt_one_minus_alphas_cumprod[t_end], rel=0.03)


@pytest.mark.parametrize("t", [0, 1, 10, 50, 98, 99])
def test_eq15_posterior_mean_equals_bayes_form(sched, t):
  """Posterior mean written with the predicted target (eq. 15) equals the Bayes form (eq. 13-14)."""
  rng = np.random.default_rng(t)
  shape = (2, 6, 5, 3)
  # float64 so the check measures the algebra, not float32 rounding at t = T-1 (beta = 0.999).
  with jax.enable_x64(True):
    x0 = jnp.asarray(rng.uniform(-1, 1, shape))
    eps = jnp.asarray(rng.normal(size=shape))
    spe = jnp.asarray(rng.uniform(-0.5, 0.7, shape[:3] + (1,)))
    tt = jnp.full((2,), t)
    x_t, target = diffusion.forward_and_target(sched, "paper", x0, tt, eps, spe)
    bayes, _, _ = diffusion.q_posterior_modulated(sched, x0, x_t, tt, spe)
    eq15 = diffusion.posterior_mean_from_target(sched, x_t, tt, target)
    assert eq15.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(eq15), np.asarray(bayes), atol=1e-6, rtol=0)
    # ... and the standard DDPM step from the eps-style prediction (no clipping) is that same mean.
    mean, _, _, _ = diffusion.p_mean_variance(sched, x_t, tt, target, clip_denoised=False)
    np.testing.assert_allclose(np.asarray(mean), np.asarray(bayes), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", diffusion.MODULATIONS)
def test_zero_spe_reduces_to_ddpm(sched, mode):
  rng = np.random.default_rng(3)
  x0 = jnp.asarray(rng.uniform(-1, 1, (3, 4, 4, 3)), jnp.float32)
  eps = jnp.asarray(rng.normal(size=(3, 4, 4, 3)), jnp.float32)
  t = jnp.array([0, 42, 99])
  spe = None if mode == "none" else jnp.zeros((3, 4, 4, 1))
  x_t, target = diffusion.forward_and_target(sched, mode, x0, t, eps, spe)
  np.testing.assert_allclose(np.asarray(x_t), np.asarray(diffusion.q_sample(sched, x0, t, eps)), atol=1e-7)
  np.testing.assert_array_equal(np.asarray(target), np.asarray(eps))


def test_modes_differ_when_spe_is_nonzero(sched):
  x0, eps = jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 2, 2, 3))
  spe, t = jnp.ones((1, 2, 2, 1)), jnp.array([50])
  _, tr = diffusion.forward_and_target(sched, "reference", x0, t, eps, spe)
  _, tp = diffusion.forward_and_target(sched, "paper", x0, t, eps, spe)
  assert float(tr[0, 0, 0, 0]) == pytest.approx(sched.mask_coefficient[50], rel=1e-6)
  assert float(tp[0, 0, 0, 0]) == pytest.approx(sched.target_e[50], rel=1e-6)
  with pytest.raises(ValueError):
    diffusion.forward_and_target(sched, "paper", x0, t, eps, None)


def test_residual_round_trip():
  rng = np.random.default_rng(0)
  lr_up = jnp.asarray(rng.uniform(-1, 1, (1, 4, 4, 3)), jnp.float32)
  hr = jnp.clip(lr_up + jnp.asarray(rng.normal(0, 0.1, (1, 4, 4, 3)), jnp.float32), -1, 1)
  res = diffusion.img2res(hr, lr_up)
  np.testing.assert_allclose(np.asarray(diffusion.res2img(res, lr_up)), np.asarray(hr), atol=1e-6)
  assert float(jnp.abs(diffusion.img2res(jnp.ones((1, 1, 1, 3)), -jnp.ones((1, 1, 1, 3)))).max()) == 1.0


def test_strided_timesteps():
  ts = diffusion.strided_timesteps(100, 10)
  assert ts[0] == 99 and ts[-1] == 0 and len(ts) == 10 and np.all(np.diff(ts) < 0)
  np.testing.assert_array_equal(diffusion.strided_timesteps(100, 100), np.arange(99, -1, -1))


def test_ddim_full_grid_eta1_matches_ddpm_variance(sched):
  """On the full grid with eta = 1, the DDIM sigma equals the DDPM posterior std."""
  x = jnp.zeros((1, 1, 1, 1))
  t, tp = jnp.array([40]), jnp.array([39])
  z = jnp.ones((1, 1, 1, 1))
  out1, _ = diffusion.ddim_step(sched, x, t, tp, jnp.zeros_like(x), z, eta=1.0)
  out0, _ = diffusion.ddim_step(sched, x, t, tp, jnp.zeros_like(x), z, eta=0.0)
  assert float((out1 - out0).squeeze()) == pytest.approx(np.sqrt(sched.posterior_variance[40]), rel=1e-4)


@pytest.mark.parametrize("t", [99, 60, 20, 1])
def test_ddim_full_grid_eta1_mean_is_the_ddpm_posterior_mean(sched, t):
  """With eta = 1 and t_prev = t - 1, the DDIM step without noise is the DDPM posterior mean computed
  from the same (clipped) x0 prediction: the strided sampler on the full grid is the DDPM sampler."""
  k1, k2 = jax.random.split(jax.random.key(t))
  x = jax.random.normal(k1, (3, 4, 4, 3))
  eps = 0.8 * jax.random.normal(k2, (3, 4, 4, 3))
  tt = jnp.full((3,), t)
  mean_ddim, _ = diffusion.ddim_step(sched, x, tt, tt - 1, eps, jnp.zeros_like(x), eta=1.0)
  x0 = jnp.clip(diffusion.extract(sched.sqrt_recip_alphas_cumprod, tt, x) * x
                - diffusion.extract(sched.sqrt_recipm1_alphas_cumprod, tt, x) * eps, -1.0, 1.0)
  mean_ddpm, _, _ = diffusion.q_posterior(sched, x0, x, tt)
  np.testing.assert_allclose(np.asarray(mean_ddim), np.asarray(mean_ddpm), atol=2e-5)


# ----------------------------------------------------------------------------- reference parity
@rd.reference
@pytest.mark.parametrize("name", ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                                  "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                                  "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                                  "posterior_variance", "posterior_log_variance_clipped",
                                  "posterior_mean_coef1", "posterior_mean_coef2", "mask_coefficient"])
def test_schedule_matches_reference(sched, name):
  ref = rd.require(f"sched/{name}")
  np.testing.assert_allclose(getattr(sched, name).astype(np.float32), ref, rtol=1e-6, atol=1e-7)


@rd.reference
def test_float64_betas_match_reference(sched):
  np.testing.assert_allclose(sched.betas, rd.require("sched64/betas"), rtol=1e-13, atol=0)


@rd.reference
def test_q_sample_reference_mode_matches_official(sched):
  x0, eps, mask, t, mask_up, noise_mod, x_t, x_tm1, loss0 = rd.require(
      "qs/x_start", "qs/eps", "qs/mask", "qs/t", "qs/mask_up", "qs/noise_mod", "qs/x_t", "qs/x_tm1", "qs/loss_vs_zero")
  x0, eps, mask = (jnp.asarray(nchw_to_nhwc(a)) for a in (x0, eps, mask))
  t = jnp.asarray(t, jnp.int32)
  up = diffusion.resize_spe(mask, eps.shape[1:3])
  np.testing.assert_allclose(np.asarray(up), nchw_to_nhwc(mask_up), atol=1e-6)
  xt, target = diffusion.forward_and_target(sched, "reference", x0, t, eps, mask)
  np.testing.assert_allclose(np.asarray(target), nchw_to_nhwc(noise_mod), atol=1e-6)
  np.testing.assert_allclose(np.asarray(xt), nchw_to_nhwc(x_t), atol=1e-5)
  # t - 1 (returns x_start where t - 1 < 0, as the official q_sample)
  tm1 = jnp.maximum(t - 1, 0)
  xtm1 = jnp.where((t - 1 >= 0)[:, None, None, None], diffusion.q_sample(sched, x0, tm1, target), x0)
  np.testing.assert_allclose(np.asarray(xtm1), nchw_to_nhwc(x_tm1), atol=1e-5)
  assert float(jnp.mean(jnp.abs(target))) == pytest.approx(float(loss0), rel=1e-6)


@rd.reference
def test_p_sample_matches_official(sched):
  x, noise_pred, t, mean, var, log_var, x0, z, out = rd.require(
      "ps/x", "ps/noise_pred", "ps/t", "ps/mean", "ps/var", "ps/log_var", "ps/x0", "ps/z", "ps/out")
  x, noise_pred, z = (jnp.asarray(nchw_to_nhwc(a)) for a in (x, noise_pred, z))
  t = jnp.asarray(t, jnp.int32)
  m, v, lv, x0_ = diffusion.p_mean_variance(sched, x, t, noise_pred, clip_denoised=True)
  np.testing.assert_allclose(np.asarray(x0_), nchw_to_nhwc(x0), atol=1e-5)
  np.testing.assert_allclose(np.asarray(m), nchw_to_nhwc(mean), atol=1e-5)
  np.testing.assert_allclose(np.asarray(v).ravel(), var.ravel(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(lv).ravel(), log_var.ravel(), rtol=1e-5)
  step, _ = diffusion.p_sample(sched, x, t, noise_pred, z)
  np.testing.assert_allclose(np.asarray(step), nchw_to_nhwc(out), atol=1e-5)
