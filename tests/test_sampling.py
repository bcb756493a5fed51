"""Samplers: the scanned reverse process equals a Python loop of the same step; official parity."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_data as rd
from diffssr_jax.models import convert
from diffssr_jax.diffusion import sampling
from diffssr_jax.diffusion.model import build_model
from helpers import nchw_to_nhwc, reference_state_dict, tiny_config


@pytest.fixture(scope="module")
def tiny():
  model = build_model(tiny_config())
  params = model.init(jax.random.key(1))
  rng = np.random.default_rng(0)
  lr = jnp.asarray(rng.uniform(-1, 1, (2, 4, 4, 3)), jnp.float32)
  lr_up = jnp.repeat(jnp.repeat(lr, 4, 1), 4, 2)
  return model, params, lr, lr_up


def _loop(model, params, lr, lr_up, key, ts, sampler, eta=0.0):
  """Reference implementation: a plain Python loop over the same step functions."""
  rrdb_out, cond = sampling.prepare(model, params, lr)
  k_init, k_steps = jax.random.split(key)
  x = jax.random.normal(k_init, lr_up.shape)
  # Each step compiled on its own (one dispatch per step), so both sides use XLA's fused arithmetic.
  ddpm = jax.jit(sampling.ddpm_step, static_argnums=0)
  ddim = jax.jit(sampling.ddim_step, static_argnums=(0, 7))
  for i, t in enumerate(ts):
    z = sampling.step_noise(k_steps, int(t), x.shape)
    if sampler == "ddpm":
      x, _ = ddpm(model, params["unet"], cond, x, jnp.int32(t), z)
    else:
      tp = int(ts[i + 1]) if i + 1 < len(ts) else -1
      x, _ = ddim(model, params["unet"], cond, x, jnp.int32(t), jnp.int32(tp), z, eta)
  return model.res2img(x, lr_up), rrdb_out


@pytest.mark.parametrize("sampler,steps,eta", [("ddpm", None, 0.0), ("ddim", 4, 0.0), ("ddim", 5, 1.0)])
def test_scan_equals_python_loop(tiny, sampler, steps, eta):
  model, params, lr, lr_up = tiny
  key = jax.random.key(5)
  fn = sampling.make_sampler(model, sampler=sampler, steps=steps, eta=eta)
  sr, rrdb = fn(params, lr, lr_up, key)
  ts = sampling.timesteps_for(model, sampler, steps)
  sr_loop, rrdb_loop = _loop(model, params, lr, lr_up, key, ts, sampler, eta)
  assert sr.shape == lr_up.shape and np.all(np.isfinite(np.asarray(sr)))
  # DDIM's first step divides by sqrt(abar_{T-1}) = 0.005 in this 10-step schedule, which magnifies
  # last-bit differences between fused and unfused float32 arithmetic ~200x; DDPM does not.
  np.testing.assert_allclose(np.asarray(sr), np.asarray(sr_loop), atol=1e-5 if sampler == "ddpm" else 1e-4)
  np.testing.assert_allclose(np.asarray(rrdb), np.asarray(rrdb_loop), atol=1e-6)
  # The result stays within res2img's range: lr_up + [-1, 1] / rescale.
  assert float(jnp.abs(sr - lr_up).max()) <= 0.5 + 1e-6


def test_sampler_is_deterministic_per_key_and_batch_independent(tiny):
  model, params, lr, lr_up = tiny
  fn = sampling.make_sampler(model, sampler="ddim", steps=3)
  a, _ = fn(params, lr, lr_up, jax.random.key(0))
  b, _ = fn(params, lr, lr_up, jax.random.key(0))
  c, _ = fn(params, lr, lr_up, jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))
  with pytest.raises(ValueError, match="ddim"):
    sampling.timesteps_for(model, "ddpm", 5)


def test_sampling_compiles_once(tiny):
  model, params, lr, lr_up = tiny
  fn = sampling.make_sampler(model, sampler="ddim", steps=2)
  fn(params, lr, lr_up, jax.random.key(0))
  fn(params, lr * 0.5, lr_up, jax.random.key(1))
  assert fn._cache_size() == 1


@rd.reference
def test_full_sampling_run_matches_official():
  """The official 100-step sampling run with its recorded noises, through our scanned sampler."""
  ref = rd.load()
  if ref is None or "samp/img_sr" not in ref:
    pytest.skip("no reference")
  from diffssr_jax.configs import base
  model = build_model(base.get_config(), dtype="float32")  # pinned: "auto" is bfloat16 on GPUs
  params = jax.tree.map(jnp.asarray, convert.torch_to_flax(reference_state_dict(ref)))
  noises = jnp.asarray(np.transpose(ref["samp/noises"], (0, 1, 3, 4, 2)))
  lr, lr_up = (jnp.asarray(nchw_to_nhwc(ref[k])) for k in ("samp/img_lr", "samp/img_lr_up"))
  sr, rrdb_out = jax.jit(lambda p, a, b, n: sampling.sample_with_noises(model, p, a, b, n))(params, lr, lr_up, noises)
  np.testing.assert_allclose(np.asarray(rrdb_out), nchw_to_nhwc(ref["samp/rrdb_out"]), atol=1e-4)
  np.testing.assert_allclose(np.asarray(sr), nchw_to_nhwc(ref["samp/img_sr"]), atol=1e-4)
