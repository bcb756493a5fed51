"""Reverse-process samplers: each whole sampling run is one jit-compiled function with a lax.scan over
steps. The RRDB encoder and the U-Net's condition projection run once per image, outside the scan.

  ddpm: ancestral sampling over all T steps (x0 clipped to [-1, 1], posterior variance, no noise at
        t = 0), the official sampler.
  ddim: a strided schedule with fewer steps (DDIM, eta configurable) using the same trained model.
  student: consistency sampling with a distilled student (1-4 steps; diffusion/student.py), whose workdir
        says so (config task "distill").
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffssr_jax import conventions
from diffssr_jax.diffusion import process, student
from diffssr_jax.diffusion.model import SRDiffusion


def ddpm_step(model: SRDiffusion, unet_vars, cond, x, t, z):
  """One DDPM reverse step at integer timestep t (scalar) for a batch. Returns (x_{t-1}, x0_pred)."""
  tb = jnp.full((x.shape[0],), t, jnp.int32)
  eps = model.predict_noise(unet_vars, x, tb, cond)
  return process.p_sample(model.schedule, x, tb, eps, z, clip_denoised=True)


def ddim_step(model: SRDiffusion, unet_vars, cond, x, t, t_prev, z, eta):
  tb = jnp.full((x.shape[0],), t, jnp.int32)
  tp = jnp.full((x.shape[0],), t_prev, jnp.int32)
  eps = model.predict_noise(unet_vars, x, tb, cond)
  return process.ddim_step(model.schedule, x, tb, tp, eps, z, eta=eta, clip_denoised=True)


def step_noise(key, t, shape):
  """The noise of the step at timestep t: fold_in(key, t), so any subset of steps reproduces it."""
  return jax.random.normal(jax.random.fold_in(key, t), shape, jnp.float32)


def prepare(model: SRDiffusion, params, lr, spe=None):
  """RRDB image, and the U-Net condition: once per image. `spe` (B, H, W, 1): the SPE maps a SAM+SRDiff
  model (`model.needs_spe`) takes into its condition; None for the others."""
  rrdb_out, feats = model.encode(params["rrdb"], lr, decode=True)
  return rrdb_out, model.condition(params["unet"], feats, spe)


def _prepare_run(model: SRDiffusion, params, lr, spe=None):
  """(RRDB image, condition, U-Net params in the compute dtype): the per-run work before the reverse loop.
  The U-Net weights are cast once here, not in every step of the loop."""
  rrdb_out, cond = prepare(model, params, lr, spe)
  return rrdb_out, cond, model.cast_for_compute(params["unet"])


def timesteps_for(model: SRDiffusion, sampler: str, steps: int | None) -> np.ndarray:
  T = model.num_timesteps
  if sampler == "ddpm":
    if steps not in (None, T):
      raise ValueError(f"the ddpm sampler runs all {T} steps; use sampler='ddim' for {steps}")
    return np.arange(T - 1, -1, -1, dtype=np.int32)
  if sampler == "ddim":
    return process.strided_timesteps(T, steps or T)
  if sampler == "student":
    return student.timesteps(T, steps or 1)
  raise ValueError(f"unknown sampler {sampler!r} (expected 'ddpm', 'ddim' or 'student')")


def _reverse(model, unet_vars, cond, x_T, ts, sampler, eta, key=None, noises=None):
  """lax.scan over the timesteps `ts` (descending). Noise from `noises[i]` when given, else from key."""
  ts = jnp.asarray(ts, jnp.int32)
  t_prev = jnp.concatenate([ts[1:], jnp.array([-1], jnp.int32)])

  def body(x, inp):
    t, tp, z = inp
    if z is None:
      z = step_noise(key, t, x.shape)
    if sampler == "ddpm":
      x, _ = ddpm_step(model, unet_vars, cond, x, t, z)
    elif sampler == "student":
      x, _ = student.step(model, unet_vars, cond, x, t, tp, z)
    else:
      x, _ = ddim_step(model, unet_vars, cond, x, t, tp, z, eta)
    return x, None

  xs = (ts, t_prev, noises)
  x, _ = jax.lax.scan(body, x_T, xs)
  return x


def sample(model: SRDiffusion, params, lr, lr_up, key, *, sampler="ddpm", steps=None, eta=conventions.DEFAULT_ETA,
           spe=None):
  """Super-resolves a batch: (SR image in [-1, 1] space (not clipped, as the official res2img), RRDB image).

  `lr` (B, h, w, 3) and `lr_up` (B, h*s, w*s, 3) in [-1, 1]; HR sizes must be multiples of 8 (the
  U-Net has three 2x downsamplings) -- `upscale` pads inputs for that. `spe` (B, h*s, w*s, 1): the images'
  SPE maps, part of the condition of a SAM+SRDiff model (None for others). Not jitted: wrap with
  `make_sampler` for one compiled function per sampling run.
  """
  ts = timesteps_for(model, sampler, steps)
  rrdb_out, cond, unet_vars = _prepare_run(model, params, lr, spe)
  k_init, k_steps = jax.random.split(key)
  x_T = jax.random.normal(k_init, lr_up.shape, jnp.float32)
  x = _reverse(model, unet_vars, cond, x_T, ts, sampler, eta, key=k_steps)
  return model.res2img(x, lr_up), rrdb_out


def sample_with_noises(model: SRDiffusion, params, lr, lr_up, noises):
  """DDPM sampling with explicit noises: noises[0] = x_T, noises[1 + i] = the noise of the i-th step
  (timestep T-1-i); the layout of the official reference run."""
  ts = timesteps_for(model, "ddpm", None)
  rrdb_out, cond, unet_vars = _prepare_run(model, params, lr)
  x = _reverse(model, unet_vars, cond, noises[0], ts, "ddpm", 0.0, noises=noises[1:])
  return model.res2img(x, lr_up), rrdb_out


def make_sampler(model: SRDiffusion, *, sampler="ddpm", steps=None, eta=conventions.DEFAULT_ETA):
  """One compiled function (params, lr, lr_up, key[, spe=...]) -> (sr, rrdb_out) for a whole sampling run."""
  return jax.jit(functools.partial(sample, model, sampler=sampler, steps=steps, eta=eta))


def image_keys(seed: int, indices) -> jax.Array:
  """The per-image keys fold_in(key(seed), index) as one key array."""
  base = jax.random.key(int(seed))
  idx = jnp.asarray(np.asarray(indices, np.uint32))
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(idx)


@functools.lru_cache(maxsize=32)
def make_image_sampler(model: SRDiffusion, *, mode: str = "diffusion", sampler: str = "ddpm", steps=None,
                       eta: float = conventions.DEFAULT_ETA, mesh=None):
  """One compiled function (params, lr, lr_up, keys) -> (sr, rrdb) -- (params, lr, lr_up, keys, spe) for a
  SAM+SRDiff model (`model.needs_spe`: spe (B, H, W, 1) at the HR size) -- over a batch in which image i draws all
  its noise from keys[i], so its result does not depend on the other images of its batch, on the batch
  size or on how the batch is split over devices. mode "rrdb": the encoder's image for both outputs (no
  sampling; lr_up and keys unused).

  With a `mesh` (see `diffssr_jax.parallel`), the batch is split over its devices (data-parallel sampling;
  the batch must be a multiple of the mesh size) and params are replicated. Cached per model and setting, so
  callers sharing a model share its compilations (jit keeps one executable per input shape)."""
  if mode == "rrdb":
    def fn(params, lr, lr_up, keys):
      del lr_up, keys
      out, _ = model.encode(params["rrdb"], lr, decode=True)
      return out, out
  elif mode == "diffusion":
    def one(params, lr, lr_up, key, spe=None):
      spe = None if spe is None else spe[None]
      sr, rrdb = sample(model, params, lr[None], lr_up[None], key, sampler=sampler, steps=steps, eta=eta, spe=spe)
      return sr[0], rrdb[0]
    fn = jax.vmap(one, in_axes=(None, 0, 0, 0) + ((0,) if model.needs_spe else ()))
  else:
    raise ValueError(f"mode must be diffusion or rrdb, got {mode!r}")
  if mesh is None:
    return jax.jit(fn)
  from diffssr_jax import parallel
  rows, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  data_args = 4 if mode == "diffusion" and model.needs_spe else 3
  return jax.jit(fn, in_shardings=(rep,) + (rows,) * data_args, out_shardings=(rows, rows))
