"""The data-parallel train step: device-count invariance, frozen encoder, official loss parity."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_data as rd
from diffssr_jax.models import convert
from diffssr_jax.diffusion.model import build_model
from diffssr_jax.parallel import make_mesh, shard_batch
from diffssr_jax.training.train_step import create_train_state, loss_given_noise, make_optimizer, make_train_step
from helpers import nchw_to_nhwc, reference_state_dict, tiny_config


def _batch(n=8, p=16, scale=4, seed=0):
  rng = np.random.default_rng(seed)
  hr = rng.uniform(-1, 1, (n, p, p, 3)).astype(np.float32)
  lr = hr.reshape(n, p // scale, scale, p // scale, scale, 3).mean((2, 4))
  lr_up = np.repeat(np.repeat(lr, scale, 1), scale, 2)
  spe = np.repeat(np.repeat(rng.uniform(-0.3, 0.7, (n, 4, 4, 1)), p // 4, 1), p // 4, 2).astype(np.float32)
  return {"hr": hr, "lr": lr, "lr_up": lr_up, "spe": spe}


def _setup(cfg, train_rrdb=False, ema=0.0):
  model = build_model(cfg)
  params = model.init(jax.random.key(0))
  tx = make_optimizer(cfg.optim, total_steps=10)
  return model, params, tx


def _run(cfg, devices, batch, steps=1, train_rrdb=False, ema=0.0):
  model, params, tx = _setup(cfg)
  params_host = jax.device_get(params)  # the step donates (deletes) the state's buffers
  mesh = make_mesh(devices)
  state = create_train_state(model, params, tx, seed=3, train_rrdb=train_rrdb, use_ema=ema > 0)
  step = make_train_step(model, tx, mesh, loss_type=cfg.diffusion.loss, aux_l1_weight=1.0, ema_decay=ema,
                         grad_accum_steps=cfg.optim.grad_accum_steps)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, shard_batch(batch, mesh))
    losses.append(float(metrics["loss"]))
  return jax.device_get(state), losses, params_host


# L2 losses: the L1 subgradient sign(pred - target) jumps where an element's error is ~0, so float32
# summation-order differences between device layouts could flip single elements (the step is still
# the same function; the comparison would not be meaningful).
@pytest.mark.parametrize("mode,loss", [("reference", "l2"), ("paper", "l2")])
def test_four_devices_equal_one_device(mode, loss):
  assert jax.device_count() >= 4, "conftest sets 4 simulated CPU devices"
  cfg = tiny_config(mode, loss)
  # Adam's first update is g / (|g| + eps): with the default eps = 1e-8 a gradient entry of ~1e-9
  # turns float32 summation-order noise into a full-size update. A larger eps keeps the update a
  # smooth function of the gradient, so the comparison checks the data-parallel reduction itself.
  cfg.optim.eps = 1e-4
  batch = _batch()
  s4, l4, _ = _run(cfg, jax.devices()[:4], batch)
  s1, l1, _ = _run(cfg, jax.devices()[:1], batch)
  assert l4[0] == pytest.approx(l1[0], rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), s4.params, s1.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), s4.opt_state, s1.opt_state)
  assert int(s4.step) == 1


def test_frozen_encoder_and_training_progress():
  cfg = tiny_config()
  cfg.optim.lr = 3e-3
  batch = _batch(n=4)
  state, _, init = _run(cfg, jax.devices()[:2], batch, steps=12)
  # Only the U-Net moved; the frozen RRDB is bit-identical.
  jax.tree.map(np.testing.assert_array_equal, state.frozen["rrdb"], jax.device_get(init["rrdb"]))
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), state.params["unet"], init["unet"]))
  assert max(moved) > 1e-4
  # Progress, measured with fixed noise at every timestep (per-step losses draw new t and eps, whose
  # spread hides 12 steps' progress from a PyTorch-style initialisation that starts near zero output).
  model = build_model(cfg)
  b = {k: jnp.asarray(np.concatenate([v] * 5)) for k, v in batch.items()}
  t = jnp.asarray(np.arange(20) % cfg.diffusion.timesteps, jnp.int32)
  eps = jax.random.normal(jax.random.key(9), b["hr"].shape)
  loss = lambda unet: float(loss_given_noise(model, {"unet": unet}, {"rrdb": init["rrdb"]}, b, t, eps)[0])
  assert loss(state.params["unet"]) < loss(init["unet"]) - 0.005
  assert state.ema_params is None


def test_ema_update():
  cfg = tiny_config()
  state, _, init = _run(cfg, jax.devices()[:1], _batch(n=2), steps=1, ema=0.75)
  jax.tree.map(lambda e, p, i: np.testing.assert_allclose(e, 0.75 * i + 0.25 * p, atol=1e-7),
               state.ema_params, state.params, {"unet": init["unet"]})


def test_trainable_encoder_gets_gradients():
  cfg = tiny_config()
  state, _, init = _run(cfg, jax.devices()[:1], _batch(n=2), steps=1, train_rrdb=True)
  assert state.frozen == {}
  diff = np.abs(np.asarray(state.params["rrdb"]["params"]["conv_last"]["kernel"])
                - np.asarray(init["rrdb"]["params"]["conv_last"]["kernel"])).max()
  assert diff > 0


def test_indivisible_batch_is_a_clear_error():
  mesh = make_mesh(jax.devices()[:4])
  with pytest.raises(ValueError, match="not divisible by 4"):
    shard_batch(_batch(n=6), mesh)


@rd.reference
def test_training_loss_matches_official():
  """The full official training forward at t = 23 with a given eps: noise target and L1 loss."""
  ref = rd.load()
  if ref is None or "fwd/loss" not in ref:
    pytest.skip("no reference")
  from diffssr_jax.configs import base
  model = build_model(base.get_config(), dtype="float32")  # pinned: "auto" is bfloat16 on GPUs
  params = jax.tree.map(jnp.asarray, convert.torch_to_flax(reference_state_dict(ref)))
  batch = {"hr": nchw_to_nhwc(ref["in/img_hr"]), "lr": nchw_to_nhwc(ref["in/img_lr"]),
           "lr_up": nchw_to_nhwc(ref["in/img_lr_up"]), "spe": nchw_to_nhwc(ref["in/sam_mask"])}
  batch = jax.tree.map(jnp.asarray, batch)
  t = jnp.asarray(ref["fwd/t"], jnp.int32)
  eps = jnp.asarray(nchw_to_nhwc(ref["fwd/eps"]))
  np.testing.assert_allclose(np.asarray(model.img2res(batch["hr"], batch["lr_up"])), nchw_to_nhwc(ref["fwd/x0_res"]),
                             atol=1e-6)
  from diffssr_jax.diffusion import process as diffusion
  _, target = diffusion.forward_and_target(model.schedule, "reference", model.img2res(batch["hr"], batch["lr_up"]),
                                           t, eps, batch["spe"])
  np.testing.assert_allclose(np.asarray(target), nchw_to_nhwc(ref["fwd/noise_target"]), atol=1e-6)
  loss, _ = jax.jit(lambda p, b, t, e: loss_given_noise(model, {"unet": p["unet"]}, {"rrdb": p["rrdb"]}, b, t, e))(
      params, batch, t, eps)
  assert float(loss) == pytest.approx(float(ref["fwd/loss"]), rel=1e-5)


def test_gradient_accumulation_equals_the_full_batch():
  """k micro-batches per step give the update of the whole batch: every example keeps its timestep and
  noise (drawn from its global index), gradients are averaged over the micro-batches (2 devices x 2
  micro-batches of 2 examples against 2 devices x 4 examples)."""
  n_dev = 2
  cfg = tiny_config("reference", "l2")
  cfg.optim.eps = 1e-4   # see test_four_devices_equal_one_device
  batch = _batch(n=8)
  full, l_full, _ = _run(cfg, jax.devices()[:n_dev], batch, steps=1)
  cfg.optim.grad_accum_steps = 2
  acc, l_acc, _ = _run(cfg, jax.devices()[:n_dev], batch, steps=1)
  assert l_acc == pytest.approx(l_full, rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), acc.params, full.params)
  cfg.optim.grad_accum_steps = 3
  with pytest.raises(ValueError, match="not divisible by grad_accum_steps 3"):
    _run(cfg, jax.devices()[:n_dev], batch)


def test_bfloat16_loss_curve_tracks_float32():
  """Mixed precision (bfloat16 compute, float32 params / optimizer / diffusion math) on the tiny config: the
  same 30 steps (same data, timesteps and noise) in both dtypes.

  Tolerance: bfloat16 keeps 8 mantissa bits (relative rounding ~0.4% per op). The prediction differs by
  ~1% of its size, but the L1 loss is dominated by the noise target (~0.8), so per-step losses differ by
  ~1e-3 (measured 1.5e-3 at most). 0.01 is well below the curve's step-to-step spread (std ~0.02) and its
  decrease over the run (~0.05): a bfloat16 path that diverged or stopped learning would exceed it."""
  def run(dtype):
    cfg = tiny_config()
    cfg.model.dtype, cfg.optim.lr = dtype, 3e-3
    model, params, tx = _setup(cfg)
    mesh = make_mesh(jax.devices()[:1])
    pred = model.predict_noise(params["unet"], jnp.ones((1, 16, 16, 3)), jnp.array([5]),
                               jnp.full((1, 16, 16, 8), 0.5))
    state = create_train_state(model, params, tx, seed=3)
    step = make_train_step(model, tx, mesh, loss_type="l1")
    losses = []
    for i in range(30):
      state, metrics = step(state, shard_batch(_batch(n=4, seed=i), mesh))
      losses.append(float(metrics["loss"]))
    return np.array(losses), np.asarray(pred), jax.device_get(state.params)

  l32, p32, s32 = run("float32")
  l16, p16, s16 = run("bfloat16")
  assert p16.dtype == np.float32 and 1e-4 < np.abs(p16 - p32).max() / np.abs(p32).max() < 0.05  # bf16 really ran
  assert jax.tree.leaves(s16)[0].dtype == np.float32                                             # params stay f32
  assert np.abs(l16 - l32).max() < 0.01, (l16, l32)
  assert l16[-5:].mean() < l16[:5].mean() - 0.02 and l32[-5:].mean() < l32[:5].mean() - 0.02
