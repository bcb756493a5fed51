"""MATLAB-bicubic imresize: parity with the official outputs and with a per-pixel re-derivation."""
import math

import numpy as np
import pytest

from diffssr_jax.data.imresize import imresize, imresize_batch, weight_matrix
from reference_data import reference, require

PAIRS = [("rs/a_u8", "rs/a_down", 0.25), ("rs/b_u8", "rs/b_down", 0.25), ("rs/c_f64", "rs/c_up", 4),
         ("in/hr_u8", "in/lr_u8", 0.25)]


@reference
@pytest.mark.parametrize("src,dst,scale", PAIRS)
def test_matches_official(src, dst, scale):
  x, want = require(src, dst)
  got = imresize(x, scale)
  assert got.shape == want.shape and got.dtype == want.dtype
  if want.dtype == np.uint8:
    np.testing.assert_array_equal(got, want)
  else:
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


def _slow_axis(x, out_len, scale):
  """MATLAB's formula written pixel by pixel (independent of the vectorised code)."""
  n = x.shape[0]
  def kern(d):
    a = abs(d)
    if a <= 1:
      return 1.5 * a**3 - 2.5 * a**2 + 1
    if a <= 2:
      return -0.5 * a**3 + 2.5 * a**2 - 4 * a + 2
    return 0.0
  out = np.zeros((out_len,) + x.shape[1:])
  width = 4 / scale if scale < 1 else 4
  for i in range(out_len):
    u = (i + 1) / scale + 0.5 * (1 - 1 / scale)
    left = math.floor(u - width / 2)
    js = range(left, left + math.ceil(width) + 2)
    ws = [scale * kern(scale * (u - j)) if scale < 1 else kern(u - j) for j in js]
    tot = sum(ws)
    acc = 0.0
    for j, w in zip(js, ws):
      if w == 0:
        continue
      k = j - 1
      k = k % (2 * n)
      k = k if k < n else 2 * n - 1 - k  # symmetric mirror
      acc = acc + (w / tot) * x[k].astype(np.float64)
    out[i] = acc
  if x.dtype == np.uint8:
    out = np.around(np.clip(out, 0, 255)).astype(np.uint8)
  return out


def _slow(x, out_hw):
  s = [o / i for o, i in zip(out_hw, x.shape[:2])]
  for k in sorted(range(2), key=lambda k: s[k]):
    x = np.moveaxis(_slow_axis(np.moveaxis(x, k, 0), out_hw[k], s[k]), 0, k)
  return x


@pytest.mark.parametrize("shape,scale", [((13, 9, 3), 0.25), ((10, 7, 3), 3), ((12, 16), 0.5),
                                         ((9, 11, 3), 2)])
def test_matches_pixelwise_definition(shape, scale):
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, shape).astype(np.uint8)
  out_hw = tuple(math.ceil(n * scale) for n in shape[:2])
  np.testing.assert_array_equal(imresize(x, output_shape=out_hw), _slow(x, out_hw))
  xf = x / 256
  np.testing.assert_allclose(imresize(xf, output_shape=out_hw), _slow(xf, out_hw), atol=1e-12)


def test_anisotropic_output_shape_resizes_smaller_scale_first():
  rng = np.random.default_rng(1)
  x = rng.integers(0, 256, (20, 12, 3)).astype(np.uint8)
  np.testing.assert_array_equal(imresize(x, output_shape=(7, 30)), _slow(x, (7, 30)))


def test_output_size_is_ceil_and_dtypes():
  x = np.zeros((101, 77, 3), np.uint8)
  assert imresize(x, 0.25).shape == (26, 20, 3)
  assert imresize(x, 0.25).dtype == np.uint8
  assert imresize(x.astype(np.float32), 0.25).dtype == np.float64
  assert imresize(x[..., 0], 2).shape == (202, 154)


def test_constant_preserved_and_identity_at_scale_one():
  x = np.full((17, 23, 3), 137, np.uint8)
  np.testing.assert_array_equal(imresize(x, 0.25), np.full((5, 6, 3), 137, np.uint8))
  np.testing.assert_allclose(imresize(np.full((9, 9), 0.3), 4), 0.3, atol=1e-12)
  y = np.random.default_rng(2).random((8, 6, 3))
  np.testing.assert_allclose(imresize(y, 1), y, atol=1e-12)


def test_uint8_rounds_after_each_pass():
  """Rounding between passes differs from resizing as float and rounding once."""
  rng = np.random.default_rng(3)
  x = rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)
  once = np.around(np.clip(imresize(x.astype(np.float64), 0.25), 0, 255)).astype(np.uint8)
  rows = imresize(x, output_shape=(16, 64))
  twice = imresize(rows, output_shape=(16, 16))
  np.testing.assert_array_equal(imresize(x, 0.25), twice)
  assert not np.array_equal(once, twice)


def test_weight_rows_sum_to_one_and_antialias_width():
  m = weight_matrix(40, 10, 0.25)
  np.testing.assert_allclose(m.sum(axis=1), 1, atol=1e-12)
  assert (np.count_nonzero(m[5]) >= 15)  # 4/scale = 16 taps when shrinking by 4


def test_batch_equals_per_image():
  rng = np.random.default_rng(4)
  x = rng.integers(0, 256, (3, 24, 20, 3)).astype(np.uint8)
  got = imresize_batch(x, 0.25)
  np.testing.assert_array_equal(got, np.stack([imresize(i, 0.25) for i in x]))


def test_bad_arguments():
  x = np.zeros((4, 4, 3))
  with pytest.raises(ValueError):
    imresize(x)
  with pytest.raises(ValueError):
    imresize(x, 2, output_shape=(8, 8))
  with pytest.raises(ValueError):
    imresize(np.zeros((4,)), 2)
