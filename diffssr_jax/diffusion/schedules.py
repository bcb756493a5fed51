"""Noise schedules and every array derived from them, in float64 numpy (computed once, cast later).

Index convention: arrays are indexed by t = 0 .. T-1, where index t is the paper's step t+1
(the official code and guided-diffusion use the same 0-based indexing). numpy only, no jax.
"""
from __future__ import annotations

import dataclasses

import numpy as np


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Cosine schedule (Nichol & Dhariwal 2021, eq. 17): abar(t) = cos^2(((t/T) + s) / (1 + s) * pi/2).

  Sampled on T + 1 points like the official SRDiff code, betas = 1 - abar_t / abar_{t-1}, clipped
  to [0, max_beta] (the last beta reaches 1 otherwise).
  """
  n = timesteps + 1
  x = np.linspace(0.0, n, n, dtype=np.float64)
  abar = np.cos(((x / n) + s) / (1.0 + s) * np.pi * 0.5) ** 2
  abar = abar / abar[0]
  betas = 1.0 - abar[1:] / abar[:-1]
  return np.clip(betas, 0.0, max_beta)


def linear_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02,
                 last_beta: float | None = 0.999) -> np.ndarray:
  """Linear schedule (Ho et al. 2020). With `last_beta` set, the final beta is replaced by it, as the
  official SRDiff code does for residual prediction so that x_T is (almost) pure noise."""
  betas = np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)
  if last_beta is not None:
    betas[-1] = last_beta
  return betas


@dataclasses.dataclass(frozen=True)
class Schedule:
  """All per-step coefficients of the forward and reverse processes, float64, shape (T,).

  Names follow guided-diffusion / the official code. The structure-modulation terms:
    phi:        paper mode, E coefficient of q(x_t | x0, E): phi_t = sum_{i<=t} sqrt(beta_i abar_t / abar_i)
    phi_prev:   phi_{t-1} (0 at t = 0)
    target_e:   paper mode, E coefficient of the network target: sqrt(1 - abar_t) / sqrt(beta_t)
    mask_coefficient: reference mode (official code), sqrt(1 - abar_t) * beta_t
  """
  betas: np.ndarray
  alphas: np.ndarray
  alphas_cumprod: np.ndarray
  alphas_cumprod_prev: np.ndarray
  sqrt_alphas_cumprod: np.ndarray
  sqrt_one_minus_alphas_cumprod: np.ndarray
  log_one_minus_alphas_cumprod: np.ndarray
  sqrt_recip_alphas_cumprod: np.ndarray
  sqrt_recipm1_alphas_cumprod: np.ndarray
  posterior_variance: np.ndarray
  posterior_log_variance_clipped: np.ndarray
  posterior_mean_coef1: np.ndarray
  posterior_mean_coef2: np.ndarray
  mask_coefficient: np.ndarray
  phi: np.ndarray
  phi_prev: np.ndarray
  target_e: np.ndarray

  @property
  def num_timesteps(self) -> int:
    return int(self.betas.shape[0])

  def arrays(self) -> dict[str, np.ndarray]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def phi_coefficients(betas: np.ndarray) -> np.ndarray:
  """phi_t = sum_{i<=t} sqrt(beta_i * abar_t / abar_i): the E coefficient obtained by unrolling
  x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) (eps_t + E) (paper eq. 9-10; the closed form printed
  in the paper is wrong). Computed by the recursion phi_t = sqrt(alpha_t) phi_{t-1} + sqrt(beta_t)."""
  alphas = 1.0 - betas
  phi = np.empty_like(betas)
  acc = 0.0
  for t in range(betas.shape[0]):
    acc = np.sqrt(alphas[t]) * acc + np.sqrt(betas[t])
    phi[t] = acc
  return phi


def make_schedule(betas: np.ndarray) -> Schedule:
  """Derives every coefficient from betas (float64), like guided-diffusion's GaussianDiffusion."""
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
    raise ValueError("betas must be a 1-D array in (0, 1]")
  alphas = 1.0 - betas
  abar = np.cumprod(alphas)
  abar_prev = np.append(1.0, abar[:-1])
  post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
  phi = phi_coefficients(betas)
  return Schedule(
      betas=betas,
      alphas=alphas,
      alphas_cumprod=abar,
      alphas_cumprod_prev=abar_prev,
      sqrt_alphas_cumprod=np.sqrt(abar),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
      log_one_minus_alphas_cumprod=np.log(1.0 - abar),
      sqrt_recip_alphas_cumprod=np.sqrt(1.0 / abar),
      sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / abar - 1.0),
      posterior_variance=post_var,
      # The posterior variance is 0 at t = 0; clip before the log as the official code does.
      posterior_log_variance_clipped=np.log(np.maximum(post_var, 1e-20)),
      posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
      posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
      mask_coefficient=np.sqrt(1.0 - abar) * betas,
      phi=phi,
      phi_prev=np.append(0.0, phi[:-1]),
      target_e=np.sqrt(1.0 - abar) / np.sqrt(betas),
  )


def schedule_from_config(diffusion_cfg) -> Schedule:
  """Builds the schedule named by a config section with fields timesteps, beta_schedule, beta_s,
  beta_start, beta_end."""
  kind = diffusion_cfg.beta_schedule
  if kind == "cosine":
    betas = cosine_betas(diffusion_cfg.timesteps, s=diffusion_cfg.beta_s)
  elif kind == "linear":
    betas = linear_betas(diffusion_cfg.timesteps, diffusion_cfg.beta_start,
                         diffusion_cfg.beta_end)
  else:
    raise ValueError(f"unknown beta_schedule {kind!r} (expected 'cosine' or 'linear')")
  return make_schedule(betas)
