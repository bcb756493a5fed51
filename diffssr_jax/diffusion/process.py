"""Diffusion math as small pure jax functions (NHWC images; t is an int array of shape (B,)).

Naming follows guided-diffusion (q_sample, q_posterior, p_mean_variance). Equation numbers refer to
SAM-DiffSR (arXiv 2402.17133). Three noise-modulation modes:

  none       plain SRDiff:      x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps,            target eps
  paper      eq. 9-12:          x_t = sqrt(abar_t) x0 + phi_t E + sqrt(1-abar_t) eps,  target eps + sqrt(1-abar_t)/sqrt(beta_t) E
  reference  official code:     noise = eps + E_up * sqrt(1-abar_t) * beta_t,
                                x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) noise,          target noise

E is the structural position encoding (SPE) map, (B, h, w, 1), broadcast over channels. In every mode
the reverse process is the unchanged DDPM step, so sampling needs no E (the point of eq. 15).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffssr_jax.diffusion.schedules import Schedule

MODULATIONS = ("none", "reference", "paper")


def extract(arr: np.ndarray, t: jax.Array, like: jax.Array) -> jax.Array:
  """arr[t] reshaped to broadcast against `like` (B, ...). `arr` is a float64 schedule array, cast
  once to like's dtype (float32 normally; float64 when x64 is on, for exactness tests)."""
  dtype = like.dtype if jnp.issubdtype(like.dtype, jnp.floating) else jnp.float32
  return jnp.asarray(arr, dtype)[t].reshape((-1,) + (1,) * (like.ndim - 1))


# ----------------------------------------------------------------------------- residual parameterisation
def img2res(hr: jax.Array, lr_up: jax.Array, rescale: float = 2.0, clip: bool = True) -> jax.Array:
  """x0 = clip((x_HR - x_LR_up) * rescale, -1, 1): the diffusion variable is the residual."""
  x = (hr - lr_up) * rescale
  return jnp.clip(x, -1.0, 1.0) if clip else x


def res2img(res: jax.Array, lr_up: jax.Array, rescale: float = 2.0, clip: bool = True) -> jax.Array:
  """Inverse of img2res. Like the official code it clips the residual, not the final image."""
  if clip:
    res = jnp.clip(res, -1.0, 1.0)
  return res / rescale + lr_up


# ----------------------------------------------------------------------------- forward process
def resize_spe(spe: jax.Array, hw: tuple[int, int]) -> jax.Array:
  """Bilinear resize of an SPE map (B, h, w, 1) to (B, H, W, 1), half-pixel centres and no
  anti-aliasing: equal to torch's F.interpolate(mode='bilinear', align_corners=False) used by the
  official code (identity when the sizes already agree, the usual case)."""
  if spe.shape[1:3] == tuple(hw):
    return spe
  out_shape = (spe.shape[0], hw[0], hw[1], spe.shape[3])
  return jax.image.resize(spe, out_shape, method="linear", antialias=False)


def q_sample(sched: Schedule, x0: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
  """Standard DDPM marginal q(x_t | x0) (Ho et al. eq. 4), with a given noise."""
  return extract(sched.sqrt_alphas_cumprod, t, x0) * x0 + extract(sched.sqrt_one_minus_alphas_cumprod, t, x0) * eps


def q_sample_paper(sched: Schedule, x0, t, eps, spe) -> jax.Array:
  """SAM-DiffSR closed-form marginal q(x_t | x0, E) (paper eq. 10 with the correct phi_t):
  x_t = sqrt(abar_t) x0 + phi_t E + sqrt(1-abar_t) eps."""
  return q_sample(sched, x0, t, eps) + extract(sched.phi, t, x0) * spe


def paper_target(sched: Schedule, t, eps, spe) -> jax.Array:
  """What the network predicts in the paper's formulation (eq. 12): eps + sqrt(1-abar_t)/sqrt(beta_t) E.
  With this target the posterior mean takes the unchanged DDPM form (eq. 15)."""
  return eps + extract(sched.target_e, t, eps) * spe


def reference_noise(sched: Schedule, t, eps, spe) -> jax.Array:
  """The official code's modulated noise: eps + E_up * sqrt(1-abar_t) * beta_t (`mask_coefficient`)."""
  spe = resize_spe(spe, eps.shape[1:3])
  return eps + spe * extract(sched.mask_coefficient, t, eps)


def forward_and_target(sched: Schedule, mode: str, x0, t, eps, spe=None):
  """(x_t, network target) for one of MODULATIONS. `spe` may be None only for mode 'none'."""
  if mode == "none" or spe is None:
    if mode != "none":
      raise ValueError(f"modulation {mode!r} needs an SPE map")
    return q_sample(sched, x0, t, eps), eps
  spe = spe.astype(x0.dtype)
  if mode == "paper":
    return q_sample_paper(sched, x0, t, eps, spe), paper_target(sched, t, eps, spe)
  if mode == "reference":
    noise = reference_noise(sched, t, eps, spe)
    return q_sample(sched, x0, t, noise), noise
  raise ValueError(f"unknown modulation {mode!r}; expected one of {MODULATIONS}")


# ----------------------------------------------------------------------------- reverse process
def predict_start_from_noise(sched: Schedule, x_t, t, noise) -> jax.Array:
  """x0 estimate from a noise prediction: sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps."""
  return (extract(sched.sqrt_recip_alphas_cumprod, t, x_t) * x_t
          - extract(sched.sqrt_recipm1_alphas_cumprod, t, x_t) * noise)


def q_posterior(sched: Schedule, x0, x_t, t):
  """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0) (Ho et al. eq. 6-7)."""
  mean = extract(sched.posterior_mean_coef1, t, x_t) * x0 + extract(sched.posterior_mean_coef2, t, x_t) * x_t
  return mean, extract(sched.posterior_variance, t, x_t), extract(sched.posterior_log_variance_clipped, t, x_t)


def q_posterior_modulated(sched: Schedule, x0, x_t, t, spe):
  """Bayes posterior mean of q(x_{t-1} | x_t, x0, E) for the paper's process (eq. 13-14).

  With y_t = x_t - phi_t E the process is plain DDPM in y, so
  mean = c1 x0 + c2 (x_t - phi_t E) + phi_{t-1} E. Used to check eq. 15 and as documentation.
  """
  y_t = x_t - extract(sched.phi, t, x_t) * spe
  mean, var, log_var = q_posterior(sched, x0, y_t, t)
  return mean + extract(sched.phi_prev, t, x_t) * spe, var, log_var


def posterior_mean_from_target(sched: Schedule, x_t, t, target) -> jax.Array:
  """Paper eq. 15: mu = (x_t - beta_t / sqrt(1-abar_t) * target) / sqrt(alpha_t)."""
  coef = extract(sched.betas / np.sqrt(1.0 - sched.alphas_cumprod), t, x_t)
  return (x_t - coef * target) / extract(np.sqrt(sched.alphas), t, x_t)


def p_mean_variance(sched: Schedule, x_t, t, noise_pred, clip_denoised: bool = True):
  """Mean, variance, log-variance of p(x_{t-1} | x_t) and the x0 estimate, from the predicted noise
  (x0 clipped to [-1, 1] as the official sampler does)."""
  x0 = predict_start_from_noise(sched, x_t, t, noise_pred)
  if clip_denoised:
    x0 = jnp.clip(x0, -1.0, 1.0)
  mean, var, log_var = q_posterior(sched, x0, x_t, t)
  return mean, var, log_var, x0


def p_sample(sched: Schedule, x_t, t, noise_pred, z, clip_denoised: bool = True):
  """One ancestral DDPM step: mean + exp(log_var / 2) z, with no noise at t = 0. Returns (x_{t-1}, x0)."""
  mean, _, log_var, x0 = p_mean_variance(sched, x_t, t, noise_pred, clip_denoised)
  nonzero = (t != 0).astype(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))
  return mean + nonzero * jnp.exp(0.5 * log_var) * z, x0


def ddim_step(sched: Schedule, x_t, t, t_prev, noise_pred, z, eta: float = 0.0,
              clip_denoised: bool = True):
  """Generalised DDIM step (Song et al. 2021, eq. 12) from t to t_prev (t_prev = -1 means x0).

  The noise is re-derived from the clipped x0 so the step stays consistent with clipping.
  eta = 0 is deterministic DDIM, eta = 1 matches the DDPM posterior variance on the strided grid.
  """
  abar = jnp.asarray(sched.alphas_cumprod, x_t.dtype)
  a_t = abar[t].reshape(-1, 1, 1, 1)
  a_prev = jnp.where(t_prev >= 0, abar[jnp.maximum(t_prev, 0)], 1.0).reshape(-1, 1, 1, 1)
  x0 = (x_t - jnp.sqrt(1.0 - a_t) * noise_pred) / jnp.sqrt(a_t)
  if clip_denoised:
    x0 = jnp.clip(x0, -1.0, 1.0)
  eps = (x_t - jnp.sqrt(a_t) * x0) / jnp.sqrt(1.0 - a_t)
  sigma = eta * jnp.sqrt((1.0 - a_prev) / (1.0 - a_t)) * jnp.sqrt(jnp.maximum(1.0 - a_t / a_prev, 0.0))
  dir_xt = jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma ** 2, 0.0)) * eps
  return jnp.sqrt(a_prev) * x0 + dir_xt + sigma * z, x0


def strided_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
  """`steps` timesteps evenly spread over [0, T-1], descending, always containing T-1 and 0."""
  if not 1 <= steps <= num_timesteps:
    raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
  ts = np.unique(np.round(np.linspace(0, num_timesteps - 1, steps)).astype(np.int32))
  return ts[::-1].copy()
