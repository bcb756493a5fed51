"""Tiled super-resolution: coverage, blend weights, and equality with untiled local upscalers."""
import numpy as np
import pytest

from diffssr_jax.inference import tiling


def _img(h, w, seed=0):
  return np.random.default_rng(seed).random((h, w, 3)).astype(np.float32)


def _nearest(batch, s):
  return np.repeat(np.repeat(batch, s, axis=1), s, axis=2)


def _bicubic(batch, s):
  from diffssr_jax.data.imresize import imresize
  return np.stack([imresize(x.astype(np.float64), scale=s) for x in batch]).astype(np.float32)


# ---------------------------------------------------------------- plan
@pytest.mark.parametrize("n, tile, overlap", [(100, 32, 8), (33, 32, 8), (32, 32, 8), (5, 32, 8), (257, 64, 0),
                                              (97, 17, 5), (1, 4, 1)])
def test_axis_starts_cover_and_overlap(n, tile, overlap):
  starts = tiling.axis_starts(n, tile, overlap)
  assert starts[0] == 0 and starts == sorted(set(starts))
  if n <= tile:
    assert starts == [0]
    return
  assert starts[-1] == n - tile  # flush with the edge
  covered = np.zeros(n, int)
  for s in starts:
    covered[s:s + tile] += 1
  assert covered.min() >= 1
  gaps = np.diff(starts)
  assert np.all(tile - gaps >= overlap)  # consecutive tiles overlap by at least `overlap`
  assert np.all(gaps[:-1] == tile - overlap)


def test_plan_tiles_cover_every_pixel():
  h, w, tile, overlap = 45, 70, 16, 4
  cover = np.zeros((h, w), int)
  tiles = tiling.plan_tiles(h, w, tile, overlap)
  for y, x in tiles:
    assert 0 <= y <= h - tile and 0 <= x <= w - tile
    cover[y:y + tile, x:x + tile] += 1
  assert cover.min() >= 1
  assert len(tiles) == tiling.tile_count(h, w, tile, overlap) == 4 * 6  # rows 0,12,24,29; columns 0,12,24,36,48,54
  with pytest.raises(ValueError):
    tiling.plan_tiles(10, 10, 8, 8)


# ---------------------------------------------------------------- weights
def test_cosine_ramps_are_complementary():
  for overlap, margin in [(8, 0), (8, 2), (7, 3), (32, 8)]:
    w = tiling.ramp_1d(80, overlap, margin)
    rise = w[:overlap]
    fall = w[-overlap:]
    np.testing.assert_allclose(rise + fall, 1.0, atol=1e-15)  # rising + falling over one overlap = 1
    assert np.all(w[:margin] == 0) and np.all(w[margin:overlap - margin] > 0)
    assert np.all(w[overlap:-overlap] == 1)
    np.testing.assert_array_equal(w, w[::-1])
  np.testing.assert_array_equal(tiling.ramp_1d(10, 3, 1, start=False, end=False), np.ones(10))
  with pytest.raises(ValueError):
    tiling.ramp_1d(10, 4, 2)  # margins leave no ramp


def test_blend_weights_partition_of_unity_on_regular_grid():
  """With the regular overlap everywhere (n = k * stride + overlap) the windows already sum to 1."""
  tile, overlap, margin = 16, 4, 1
  n = 3 * (tile - overlap) + overlap
  total = np.zeros((n, n))
  last = n - tile
  for y, x in tiling.plan_tiles(n, n, tile, overlap):
    total[y:y + tile, x:x + tile] += tiling.blend_weights(tile, overlap, margin,
                                                          (y > 0, y < last, x > 0, x < last))
  np.testing.assert_allclose(total, 1.0, atol=1e-6)
  win = tiling.blend_weights(tile, overlap, margin)
  assert win.shape == (tile, tile) and win.dtype == np.float32
  assert win[0, 5] == 0 and win[5, 5] == 1 and win[8, tile - 1] == 0


def test_constant_sr_gives_constant_output():
  out = tiling.upscale_tiled(_img(50, 37), lambda b: np.full((b.shape[0], 32, 32, 3), 0.7, np.float32),
                             scale=2, tile=16, overlap=6)
  assert out.shape == (100, 74, 3)
  np.testing.assert_allclose(out, 0.7, rtol=1e-6)  # weights normalised to 1 at every pixel


# ---------------------------------------------------------------- equality with untiled
@pytest.mark.parametrize("h, w, tile, overlap, batch", [(37, 53, 16, 4, 3), (40, 40, 16, 8, 4), (17, 90, 16, 6, 1)])
def test_nearest_tiled_equals_untiled(h, w, tile, overlap, batch):
  lr = _img(h, w)
  out = tiling.upscale_tiled(lr, lambda b: _nearest(b, 3), 3, tile=tile, overlap=overlap, batch_size=batch)
  np.testing.assert_allclose(out, _nearest(lr[None], 3)[0], rtol=1e-6, atol=1e-7)


def test_bicubic_tiled_equals_untiled():
  """MATLAB bicubic x4 reads LR pixels within 2 of an output pixel: with a 2-pixel zero-weight margin the
  tile edges never contribute, and tiles on the image border see the same border handling as the whole."""
  lr = _img(43, 30, seed=2)
  full = _bicubic(lr[None], 4)[0]
  out = tiling.upscale_tiled(lr, lambda b: _bicubic(b, 4), 4, tile=16, overlap=6, margin=2, batch_size=2)
  assert out.shape == full.shape
  np.testing.assert_allclose(out, full, atol=2e-6)
  # without the margin the tiles' own border handling leaks into the blend
  leaky = tiling.upscale_tiled(lr, lambda b: _bicubic(b, 4), 4, tile=16, overlap=6, margin=0, batch_size=2)
  assert np.abs(leaky - full).max() > 1e-3


def test_tile_edge_artifacts_never_reach_the_interior():
  """An sr_fn that writes garbage on the outer ring of every tile: the margins hide it except on the image
  border, where the tile edge is the image edge."""
  s, margin = 2, 3

  def bad(batch):
    out = _nearest(batch, s)
    k = margin * s
    out[:, :k] = out[:, -k:] = out[:, :, :k] = out[:, :, -k:] = 1e3
    return out

  lr = _img(50, 41, seed=5)
  out = tiling.upscale_tiled(lr, bad, s, tile=20, overlap=8, margin=margin)
  ref = _nearest(lr[None], s)[0]
  k = margin * s
  np.testing.assert_allclose(out[k:-k, k:-k], ref[k:-k, k:-k], rtol=1e-6)
  assert out[0, 0, 0] == 1e3


# ---------------------------------------------------------------- small images, batching, errors
@pytest.mark.parametrize("h, w", [(5, 7), (1, 1), (16, 3), (20, 9)])
def test_smaller_than_tile(h, w):
  lr = _img(h, w, seed=h * w)
  shapes = []

  def fn(b):
    shapes.append(b.shape)
    return _nearest(b, 2)

  out = tiling.upscale_tiled(lr, fn, 2, tile=16, overlap=4, batch_size=2)
  assert out.shape == (2 * h, 2 * w, 3)
  np.testing.assert_allclose(out, _nearest(lr[None], 2)[0], rtol=1e-6)
  assert all(s == (2, 16, 16, 3) for s in shapes)


def test_fixed_batch_shape_and_count():
  calls = []

  def fn(b):
    calls.append(b.shape)
    return _nearest(b, 2)

  done = []
  tiling.upscale_tiled(_img(40, 60), fn, 2, tile=16, overlap=4, batch_size=4,
                       progress=lambda d, t: done.append((d, t)))
  n = tiling.tile_count(40, 60, 16, 4)
  assert len(calls) == -(-n // 4) and set(calls) == {(4, 16, 16, 3)}
  assert done[-1] == (n, n) and len(done) == len(calls)


def test_bad_sr_output_and_arguments():
  with pytest.raises(ValueError, match="sr_fn returned"):
    tiling.upscale_tiled(_img(20, 20), lambda b: _nearest(b, 3), 2, tile=16, overlap=4)
  with pytest.raises(ValueError, match="half"):
    tiling.upscale_tiled(_img(20, 20), lambda b: _nearest(b, 2), 2, tile=16, overlap=9)
