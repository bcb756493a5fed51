"""The distilled few-step student (`config.task = "distill"`, training/distill.py): its parameterisation and
its sampler, as small pure functions.

Parameterisation. The student is the teacher's U-Net architecture, initialised from the teacher's weights,
whose output is read as v (Salimans & Ho 2022, "Progressive distillation", sec. 4):

    v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0,      so   f(x_t, t) = x0_hat = sqrt(abar_t) x_t - sqrt(1 - abar_t) v.

The teacher predicts eps, from which x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t): at the first step of a
1-step sampler (t = T-1 of the cosine schedule, abar ~ 1e-5 here) that divides by ~0.003, so any error of
eps is amplified ~300x; v keeps x0_hat a bounded mix of x_t and the output at every noise level (the paper's
argument for v or x0 when distilling to few steps). At low noise f ~ x_t, which the teacher's weights already
give, so initialising from them is a good start there.

Sampler (consistency sampling, Song et al. 2023, alg. 1): K timesteps tau_1 = T-1 > ... > tau_K, evenly
spread; x = x_T ~ N(0, I); x0_hat = clip(f(x, tau_1)); then for k >= 2: x = q(x_{tau_k} | x0_hat) with fresh
noise and x0_hat = clip(f(x, tau_k)). One step is the closed form clip(sqrt(abar) x_T - sqrt(1 - abar) v).
As the teacher's sampler, it needs no SPE map: the reverse process never sees E (eq. 15).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from diffssr_jax.diffusion import process
from diffssr_jax.diffusion.schedules import Schedule

# The step counts the student is meant for (any 1 <= K <= T runs; these are the ones measured).
STUDENT_STEPS = (1, 2, 4)


def x0_from_v(sched: Schedule, x_t, t, v):
  """x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v (Salimans & Ho 2022, the v-parameterisation)."""
  return (process.extract(sched.sqrt_alphas_cumprod, t, x_t) * x_t
          - process.extract(sched.sqrt_one_minus_alphas_cumprod, t, x_t) * v)


def v_from_x0(sched: Schedule, x0, t, eps):
  """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 for x_t = q_sample(x0, t, eps) (inverse of x0_from_v)."""
  return (process.extract(sched.sqrt_alphas_cumprod, t, x0) * eps
          - process.extract(sched.sqrt_one_minus_alphas_cumprod, t, x0) * x0)


def consistency_fn(model, unet_vars, cond, x_t, t):
  """The student's x0 estimate f(x_t, t) (not clipped: training compares it unclipped). t: (B,) ints."""
  return x0_from_v(model.schedule, x_t, t, model.predict_noise(unet_vars, x_t, t, cond))


def timesteps(num_timesteps: int, steps: int) -> np.ndarray:
  """K descending timesteps starting at T-1, evenly spread over (0, T-1]: 1 -> [T-1]; T=100, 2 -> [99, 50];
  4 -> [99, 74, 50, 25]."""
  if not 1 <= steps <= num_timesteps:
    raise ValueError(f"the student takes 1 to {num_timesteps} steps, got {steps}")
  ts = np.round(np.linspace(num_timesteps - 1, 0, steps, endpoint=False)).astype(np.int32)
  if len(np.unique(ts)) != steps:
    raise ValueError(f"{steps} student steps do not fit in {num_timesteps} distinct timesteps")
  return ts


def step(model, unet_vars, cond, x, t, t_next, z):
  """One consistency-sampling step at timestep t (scalar): (the next noisy input at t_next, or x0_hat when
  t_next < 0 (the last step), x0_hat). x0_hat is clipped to [-1, 1] as the teacher's sampler clips."""
  tb = jnp.full((x.shape[0],), t, jnp.int32)
  x0 = jnp.clip(consistency_fn(model, unet_vars, cond, x, tb), -1.0, 1.0)
  tn = jnp.full((x.shape[0],), jnp.maximum(t_next, 0), jnp.int32)
  renoised = process.q_sample(model.schedule, x0, tn, z)
  return jnp.where(t_next >= 0, renoised, x0), x0
