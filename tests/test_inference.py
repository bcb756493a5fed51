"""The Python inference API: official input/output conventions, per-image noise, padding, tiling, loading.

`tiny_model()` is shared with test_evaluate.py and test_upscale.py: one model object, so the samplers compiled
for it (cached per model in inference.py) are reused across these modules.
"""
import copy
import functools
import types

import jax
import numpy as np
import pytest

from diffssr_jax.configs import base
from diffssr_jax import conventions, images, parallel
from diffssr_jax.inference import upscaler as inference
from diffssr_jax.diffusion import sampling
from diffssr_jax.conventions import make_lr_up
from diffssr_jax.inference.upscaler import Upscaler
from diffssr_jax.conventions import signed_to_uint8
from diffssr_jax.diffusion.model import build_model
from helpers import tiny_config


def fast_params(model, seed: int = 0) -> dict:
  """Random params of the model's shapes without running its initialisers (which take ~20 s on CPU for
  the tiny model, one compilation per parameter shape): kernels N(0, 1/fan_in), biases N(0, 0.01)."""
  shapes = model.param_shapes()
  rng = np.random.default_rng(seed)

  def draw(leaf):
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
    std = 1.0 / np.sqrt(fan_in) if len(leaf.shape) > 1 else 0.01
    return jax.numpy.asarray(rng.normal(0.0, std, leaf.shape).astype(np.float32))

  return jax.tree.map(draw, shapes)


@functools.lru_cache(maxsize=None)
def tiny_model():
  """(config, model, params) of the tiny test model, one object per test session."""
  cfg = tiny_config()
  model = build_model(cfg)
  return cfg, model, fast_params(model)


@functools.lru_cache(maxsize=None)
def tiny_model3():
  """The tiny model with a three-level U-Net (HR multiple 4, lowest level 1/4 of the HR size): at x4 a 1-pixel
  LR side would reach that level as a 1-pixel map, which its reflection-padded convs refuse."""
  cfg = tiny_config()
  cfg.model.unet_dim_mults = (1, 2, 2)
  model = build_model(cfg)
  return cfg, model, fast_params(model)


@pytest.fixture(scope="module")
def tiny():
  cfg, model, params = tiny_model()
  return cfg, model, params, Upscaler(model, params, config=cfg, sampler="ddim", steps=2)


def _rand(shape, seed=0, dtype=np.uint8, high=256):
  return np.random.default_rng(seed).integers(0, high, shape).astype(dtype)


def test_unet_multiple_and_lr_multiple():
  assert inference.hr_multiple(build_model(base.get_config())) == 8  # the paper's U-Net: 3 downsamplings
  assert inference.lr_multiple(8, 4) == 2 and inference.lr_multiple(8, 2) == 4 and inference.lr_multiple(8, 8) == 1
  assert inference.lr_multiple(8, 3) == 8


def test_defaults_and_validation(tiny):
  cfg, model, params, up = tiny
  assert up.steps == 2 and up.lr_up_divisor == 256.0 and up.num_steps == 2
  assert Upscaler(model, params, sampler="ddim").steps == min(25, model.num_timesteps)
  cfg2 = tiny_config()
  cfg2.data.lr_up_divisor = 255.0
  assert Upscaler(model, params, config=cfg2, sampler="ddpm").lr_up_divisor == 255.0
  with pytest.raises(ValueError, match="ddim"):
    Upscaler(model, params, sampler="ddpm", steps=3)
  with pytest.raises(ValueError, match="mode"):
    Upscaler(model, params, mode="gan")


def test_batch_uses_official_inputs_and_per_image_keys(tiny):
  """Image i of a batch equals the plain sampler run on it alone with key fold_in(key(seed), i), the LR
  normalised as (v / 255 - 0.5) / 0.5 and lr_up = (imresize(v / 256, 4) - 0.5) / 0.5; and it does not
  depend on the other images of its batch."""
  cfg, model, params, up = tiny
  lr = _rand((2, 8, 8, 3))
  sr, rrdb = up.super_resolve_batch(lr, seed=3)
  assert sr.shape == rrdb.shape == (2, 32, 32, 3) and sr.dtype == np.float32
  lr_s = (lr.astype(np.float32) / 255 - 0.5) / 0.5
  lr_up = np.stack([make_lr_up(x, 4, 256.0) for x in lr])
  fn = sampling.make_sampler(model, sampler="ddim", steps=2)
  ref, ref_rrdb = fn(params, lr_s[1:2], lr_up[1:2], jax.random.fold_in(jax.random.key(3), 1))
  # DDIM's first step on this 10-step schedule magnifies float32 reordering ~200x (see test_sampling).
  np.testing.assert_allclose(sr[1], np.asarray(ref)[0], atol=1e-3)
  np.testing.assert_allclose(rrdb[1], np.asarray(ref_rrdb)[0], atol=1e-5)
  alone, _ = up.super_resolve_batch(lr[1:2], seed=3, indices=[1])
  np.testing.assert_allclose(alone[0], sr[1], atol=1e-3)
  other, _ = up.super_resolve_batch(lr[1:2], seed=4, indices=[1])
  assert np.abs(other[0] - sr[1]).max() > 1e-2


def test_batches_are_split_over_all_local_devices_with_one_device_results(tiny):
  """Data-parallel sampling: by default a batch is split over every local device (4 simulated CPUs here), the
  batch filled up to a multiple of them; the results are those of a one-device run, image by image."""
  cfg, model, params, up = tiny
  assert up.mesh.size == jax.local_device_count() == 4
  one = Upscaler(model, params, config=cfg, sampler="ddim", steps=2, mesh=parallel.make_mesh(jax.devices()[:1]))
  lr = _rand((3, 8, 8, 3), seed=5)   # 3 images on 4 devices: one copy fills the batch
  sr4, rrdb4 = up.super_resolve_batch(lr, seed=1, indices=[4, 5, 6])
  sr1, rrdb1 = one.super_resolve_batch(lr, seed=1, indices=[4, 5, 6])
  assert sr4.shape == (3, 32, 32, 3)
  # Per-device batches of 1 vs 4 reorder float32 sums; DDIM's first step on this 10-step schedule magnifies
  # that ~200x (see test_sampling); an image given another image's noise would differ by ~1.
  np.testing.assert_allclose(sr4, sr1, atol=1e-3)
  np.testing.assert_allclose(rrdb4, rrdb1, atol=1e-6)
  assert {s.device for s in up.params["rrdb"]["params"]["conv_first"]["kernel"].addressable_shards} == \
      set(jax.local_devices())   # params replicated once, not copied per call


def test_padding_to_the_unet_multiple(tiny):
  """An LR whose HR size is not a multiple of the U-Net's is reflect-padded (lr_up from the unpadded LR,
  padded in HR space) and the result cropped: the same as padding by hand."""
  cfg, model, params, _ = tiny
  # A U-Net needing HR multiples of 16 (the paper's needs 8): LR multiples of 4, so 7x7 pads to 8x8.
  up16 = Upscaler(model, params, config=cfg, sampler="ddim", steps=2, multiple=16)
  assert up16.lr_multiple == 4
  lr = _rand((1, 7, 7, 3), seed=1)
  sr, _ = up16.super_resolve_batch(lr, seed=0)
  assert sr.shape == (1, 28, 28, 3)
  padded = np.pad(lr, ((0, 0), (0, 1), (0, 1), (0, 0)), mode="reflect")
  lr_up = np.pad(make_lr_up(lr[0], 4)[None], ((0, 0), (0, 4), (0, 4), (0, 0)), mode="reflect")
  by_hand, _ = up16.super_resolve_batch(padded, seed=0, lr_up=lr_up)
  np.testing.assert_array_equal(sr, by_hand[:, :28, :28])


def test_tiny_inputs_are_padded_to_the_unet_minimum():
  """Images down to 1x1 are super-resolved: the LR is padded until the U-Net's lowest level is at least 2x2
  (HR >= 2 * 2 ** (levels - 1)), symmetric for a 1-pixel side, and the result is what padding by hand gives."""
  cfg, model, params = tiny_model3()
  up = Upscaler(model, params, config=cfg, sampler="ddim", steps=2)
  seen = []
  original = up._fn
  up._fn = lambda p, lr, lr_up, keys: seen.append(lr.shape) or original(p, lr, lr_up, keys)
  for h, w in ((1, 1), (2, 1), (1, 2)):
    img = _rand((h, w, 3), seed=h * 10 + w)
    out = up.upscale(img, seed=0)
    assert out.shape == (4 * h, 4 * w, 3) and out.dtype == np.uint8
  assert [shape[1:] for shape in seen] == [(2, 2, 3)] * 3   # the batch axis is filled up to the devices
  assert up.lr_multiple == 1 and up.min_lr == 2  # HR multiple 4 and minimum 8 at x4
  lr = _rand((1, 1, 1, 3), seed=11)
  sr, _ = up.super_resolve_batch(lr, seed=0)
  padded = np.pad(lr, ((0, 0), (0, 1), (0, 1), (0, 0)), mode="symmetric")
  lr_up = np.pad(make_lr_up(lr[0], 4)[None], ((0, 0), (0, 4), (0, 4), (0, 0)), mode="symmetric")
  by_hand, _ = up.super_resolve_batch(padded, seed=0, lr_up=lr_up)
  np.testing.assert_array_equal(sr, by_hand[:, :4, :4])
  assert np.isfinite(sr).all()


def test_conventions_are_the_official_ones_and_shared():
  """One home for pixel conventions: the official formulas, and the defaults agree with it."""
  from diffssr_jax.data import pipeline
  u8 = np.array([0, 1, 127, 128, 255], np.uint8)
  np.testing.assert_array_equal(conventions.to_signed(u8), (u8.astype(np.float32) / 255 - 0.5) / 0.5)
  u16 = np.array([0, 257, 65535], np.uint16)
  np.testing.assert_allclose(conventions.to_signed(u16), [-1.0, 257 / 65535 * 2 - 1, 1.0], rtol=1e-6)
  np.testing.assert_array_equal(conventions.to_signed(u8.astype(np.float32)), conventions.to_signed(u8))
  # round((x + 1) * 127.5) clipped, half to even (0 -> 127.5 -> 128), in float32 for float32 input.
  x = np.array([-1.5, -1.0, 0.0, 1.0, 2.0, -1 + 1.6 / 127.5], np.float32)
  np.testing.assert_array_equal(conventions.signed_to_uint8(x), [0, 0, 128, 255, 255, 2])
  np.testing.assert_array_equal(conventions.signed_to_uint16(np.array([-1.0, 0.0, 1.0])), [0, 32768, 65535])
  assert conventions.signed_to_pixels(x, np.uint16).dtype == np.uint16
  assert [conventions.unet_multiple(n) for n in (1, 2, 4)] == [1, 2, 8]
  assert conventions.min_hr_size(4) == 16 and conventions.OFFICIAL_LR_UP_DIVISOR == 256.0
  assert inference.hr_multiple(build_model(base.get_config())) == conventions.unet_multiple(4)
  assert (pipeline.TrainTransform().lr_up_divisor == pipeline.default_data_config().lr_up_divisor
          == conventions.OFFICIAL_LR_UP_DIVISOR)


def test_validation_crop_refuses_images_below_the_unet_minimum():
  from diffssr_jax.data.eval_sources import EvalImage
  from diffssr_jax.training import validate
  hr = _rand((12, 40, 3))
  img = EvalImage("x", hr, hr[::4, ::4], None)
  with pytest.raises(ValueError, match="minimum 16"):
    validate.centre_crop(img, None, 4, 256.0, unet_levels=4)  # 8 x 40 after cropping to multiples of 8: the lowest level 1 px
  ok = validate.centre_crop(EvalImage("y", _rand((16, 40, 3)), _rand((4, 10, 3)), None), None, 4, 256.0, unet_levels=4)
  assert ok.hr.shape == (16, 40, 3) and ok.lr.shape == (4, 10, 3)


def test_upscale_round_trips_arrays_files_and_16_bit(tiny, tmp_path):
  cfg, model, params, up = tiny
  img = _rand((8, 8, 3), seed=2)
  out = up.upscale(img, seed=5)
  sr, _ = up.super_resolve_batch(img[None], seed=5, indices=[0])
  assert out.dtype == np.uint8 and out.shape == (32, 32, 3)
  np.testing.assert_array_equal(out, signed_to_uint8(sr[0]))
  np.testing.assert_array_equal(out, np.round((sr[0] + 1) * 127.5).clip(0, 255).astype(np.uint8))
  path = tmp_path / "x.png"
  images.save_png(path, img)
  np.testing.assert_array_equal(up.upscale(path, seed=5), out)
  np.testing.assert_array_equal(up.upscale(str(path), seed=5), out)
  # The same picture at 16 bits: same network input, output quantised to 16 bits.
  out16 = up.upscale(img.astype(np.uint16) * 257, seed=5)
  assert out16.dtype == np.uint16
  assert np.abs(out16.astype(np.float64) / 257 - out).max() <= 1.0
  # Alpha and grey layouts (what the upscale CLI writes).
  rgba = np.concatenate([img, _rand((8, 8, 1), seed=3)], axis=2)
  loaded = images.LoadedImage(rgba[:, :, :3], rgba[:, :, 3], 8, "mem", "RGBA")
  both = up.upscale_like_input(loaded, seed=5)
  np.testing.assert_array_equal(both[:, :, :3], out)
  np.testing.assert_array_equal(both[:, :, 3], inference.imresize(rgba[:, :, 3], 4))
  grey = images.LoadedImage(np.repeat(img[:, :, :1], 3, 2), None, 8, "mem", "L")
  assert up.upscale_like_input(grey).shape == (32, 32)


def _rrdb_radius(cfg) -> int:
  """LR pixels an RRDB output pixel depends on: conv_first, 3 RDBs of 5 convs per block, trunk_conv (one
  pixel each), then the x4 tail (two upconvs at 2x/4x, HRconv and conv_last at 4x: 1.25 LR pixels)."""
  return 1 + 15 * cfg.model.rrdb_num_blocks + 1 + 2


def test_tiled_equals_untiled_for_a_local_network(tiny):
  """With the deterministic RRDB output, whose pixels depend only on LR pixels within a known radius, tiles
  whose zero-weight margin covers that radius blend to exactly the untiled image; with no margin they do not
  (so the comparison can fail)."""
  cfg, model, params, _ = tiny
  up = Upscaler(model, params, config=cfg, mode="rrdb")
  img = _rand((180, 150, 3), seed=4)
  radius = _rrdb_radius(cfg)
  overlap = 2 * radius + 4
  whole = up.upscale_signed(img, tile=1000)
  calls = []
  tiled = up.upscale_signed(img, tile=2 * overlap, overlap=overlap, batch_size=2, margin=radius,
                            progress=lambda k, n: calls.append((k, n)))
  assert tiled.shape == whole.shape == (720, 600, 3)
  assert calls[-1] == (4, 4)
  np.testing.assert_allclose(tiled, whole, atol=2e-5)
  seamy = up.upscale_signed(img, tile=2 * overlap, overlap=overlap, batch_size=2, margin=0)
  assert np.abs(seamy - whole).max() > 1e-3


def test_diffusion_tiling_and_one_piece(tiny):
  cfg, model, params, up = tiny
  img = _rand((12, 10, 3), seed=6)
  tiled = up.upscale(img, seed=1, tile=8, overlap=2, batch_size=2)
  assert tiled.shape == (48, 40, 3) and tiled.dtype == np.uint8
  # An image no larger than a tile is one piece: the batch API's result for key index 0.
  small = img[:8, :8]
  np.testing.assert_array_equal(up.upscale(small, seed=1, tile=8),
                                signed_to_uint8(up.super_resolve_batch(small[None], seed=1)[0][0]))


def test_default_sampler_is_the_official_ddpm(tiny):
  cfg, model, params, _ = tiny
  assert conventions.DEFAULT_SAMPLER == "ddpm"
  up = Upscaler(model, params, config=cfg)
  assert up.sampler == "ddpm" and up.num_steps == model.num_timesteps
  assert "ddpm" in up.describe()


def test_load_from_workdir(tiny, tmp_path):
  checkpointing = pytest.importorskip("diffssr_jax.training.checkpointing")
  workdir_lib = pytest.importorskip("diffssr_jax.training.workdir")
  cfg, model, params, _ = tiny
  workdir_lib.save_config(cfg, tmp_path)
  ckpt = checkpointing.Checkpointer(tmp_path, use_async=False)
  ckpt.save(3, {"params": params})
  ckpt.wait()
  ckpt.close()
  img = _rand((9, 7, 3), seed=7)
  direct = Upscaler(model, params, config=cfg, mode="rrdb").upscale(img)
  loaded = inference.load_model(workdir=tmp_path, mode="rrdb")
  assert loaded.scale == 4 and loaded.lr_up_divisor == 256.0
  np.testing.assert_array_equal(loaded.upscale(img), direct)
  # The step loaded is reported (the latest by default), with where it came from.
  assert loaded.step == 3 and loaded.source == str(tmp_path / "checkpoints" / "3")
  assert "step 3" in loaded.describe_source()


def test_load_errors_name_the_path(tiny, tmp_path):
  """Missing workdirs, workdirs without checkpoints, unknown steps and files that are not checkpoints raise
  ModelLoadError (a one-line CLI error) naming the path."""
  workdir_lib = pytest.importorskip("diffssr_jax.training.workdir")
  cfg, _, _, _ = tiny
  with pytest.raises(inference.ModelLoadError, match="nowhere: no such folder"):
    Upscaler.load(workdir=tmp_path / "nowhere")
  (tmp_path / "nocfg").mkdir()
  with pytest.raises(inference.ModelLoadError, match="no config.json"):
    Upscaler.load(workdir=tmp_path / "nocfg")
  workdir_lib.save_config(cfg, tmp_path / "empty")
  with pytest.raises(inference.ModelLoadError, match="no checkpoints"):
    Upscaler.load(workdir=tmp_path / "empty")
  with pytest.raises(inference.ModelLoadError, match="no such file"):
    Upscaler.load(checkpoint=tmp_path / "missing.ckpt")
  not_a_ckpt = tmp_path / "photo.png"
  images.save_png(not_a_ckpt, _rand((4, 4, 3)))
  with pytest.raises(inference.ModelLoadError, match="photo.png: cannot load the model"):
    Upscaler.load(checkpoint=not_a_ckpt)
  assert inference.step_from_checkpoint_name("model_ckpt_steps_400000.ckpt") == 400000
  assert inference.step_from_checkpoint_name("weights.ckpt") is None


def test_load_official_checkpoint(tiny, tmp_path):
  """An official-layout PyTorch checkpoint (ckpt['state_dict']['model']) converts to the same model."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("diffssr_jax.training.checkpointing")
  from diffssr_jax.models import convert
  cfg, model, params, _ = tiny
  sd = {k: torch.from_numpy(np.array(v)) for k, v in convert.flax_to_torch(params).items()}
  path = tmp_path / "model_ckpt_steps_5.ckpt"
  torch.save({"state_dict": {"model": sd}, "global_step": 5}, path)
  img = _rand((9, 7, 3), seed=8)
  loaded = Upscaler.load(checkpoint=path, config=cfg, mode="rrdb")
  np.testing.assert_array_equal(loaded.upscale(img), Upscaler(model, params, config=cfg, mode="rrdb").upscale(img))


def test_default_tile_follows_the_device_memory(tiny):
  """The default tile: 256 where the device reports no memory (the CPU), else the largest multiple of 64 whose
  batch of tiles fits the measured sampler memory in 80% of the device's bytes_limit, within [64, 1024]."""
  from diffssr_jax.inference import tiling
  tile_for = tiling.tile_for_memory
  assert tile_for(None, 4, 4) == tiling.DEFAULT_TILE == 256
  # A 16 GB TPU v5e, 24 and 40 GB GPUs (jax's default pool: 75%); 4 tiles per call, x4.
  assert [tile_for(int(b), 4, 4) for b in (16e9, 0.75 * 24e9, 0.75 * 40e9)] == [576, 576, 768]
  assert [tile_for(int(b), 4, 4, "float32") for b in (16e9, 0.75 * 24e9, 0.75 * 40e9)] == [384, 448, 576]
  assert tile_for(int(141e9), 4, 4) == tiling.MAX_TILE and tile_for(10**8, 4, 4) == tiling.MIN_TILE
  for limit in (4e9, 16e9, 40e9):
    for batch in (1, 4):
      for dtype in ("bfloat16", "float32"):
        t = tile_for(int(limit), batch, 4, dtype)
        need = lambda tile: (tiling.SAMPLING_FIXED_BYTES  # noqa: E731
                             + batch * tiling.SAMPLING_BYTES_PER_HR_PIXEL[dtype] * (4 * tile) ** 2)
        assert t % 64 == 0 and need(t) <= 0.8 * limit < need(t + 64) or t == tiling.MAX_TILE
  # The Upscaler asks its devices: the CPU reports nothing (256); a device with a limit gets the rule's tile.
  cfg, model, params, up = tiny
  assert up.default_tile() == 256

  class Device:
    def memory_stats(self):
      return {"bytes_limit": int(16e9)}

  fake = copy.copy(up)
  fake.mesh = types.SimpleNamespace(devices=np.array([Device(), Device()]), size=2)
  # 4 tiles over 2 devices: 2 per device; the tiny model computes in float32 on the CPU.
  assert fake.default_tile(4) == tile_for(int(16e9), 2, 4, "float32") == 576
