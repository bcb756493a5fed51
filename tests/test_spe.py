"""Structural position encodings: parity with the official outputs and their defining properties."""
import numpy as np
import pytest

from diffssr_jax.data import spe
from reference_data import cases, reference, require


@reference
@pytest.mark.parametrize("case", cases("spe/", "rope_ones"))
def test_rope_ones_matches_official(case):
  want = require(f"spe/{case}/rope_ones")
  got = spe.rope_ones(*want.shape)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


_KIND_LEAF = [("rope", "rope"), ("cosine", "cosine"), ("sincos", "sincos"), ("linear", "linear_seed0")]
_SPE_CASES = [(c, k, l) for k, l in _KIND_LEAF for c in cases("spe/", l) if c in cases("spe/", "masks")]


@reference
@pytest.mark.parametrize("case,kind,leaf", _SPE_CASES)
def test_spe_matches_official(case, kind, leaf):
  masks = require(f"spe/{case}/masks")
  want = require(f"spe/{case}/{leaf}")
  got = spe.compute_spe(masks, kind, rng=np.random.RandomState(0))
  assert got.dtype == spe.OFFICIAL_DTYPE[kind] == want.dtype
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@reference
def test_single_full_mask_constant():
  want = require("spe/single_full_16x16/rope")
  got = spe.spe_rope(np.ones((1, 16, 16), np.uint8))
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_allclose(got, 0.686852, atol=1e-6)


def test_rope_ones_formula_and_odd_width():
  h, w = 9, 7
  e = spe.rope_ones(h, w)
  r = np.arange(h)[:, None]
  k = np.arange(w // 2)[None, :]
  th = r * 10000.0 ** (-2 * k / w)
  np.testing.assert_allclose(e[:, 0:6:2], np.cos(th) - np.sin(th), atol=1e-6)
  np.testing.assert_allclose(e[:, 1:6:2], np.cos(th) + np.sin(th), atol=1e-6)
  np.testing.assert_array_equal(e[:, 6], 1)  # odd width: last column not rotated
  np.testing.assert_array_equal(e[0, :], 1)  # position 0: no rotation


def test_overwrite_order_uncovered_zero_and_whole_image_mean():
  h, w = 12, 10
  m = np.zeros((2, h, w), bool)
  m[0, :6] = True
  m[1, 4:9] = True  # overlaps rows 4-5 of mask 0
  e = spe.rope_ones(h, w).astype(np.float64)
  out = spe.spe_rope(m)
  v0 = e[:6].sum() / (h * w)
  v1 = e[4:9].sum() / (h * w)
  np.testing.assert_allclose(out[:4], v0, atol=1e-7)
  np.testing.assert_allclose(out[4:9], v1, atol=1e-7)  # later mask wins
  np.testing.assert_array_equal(out[9:], 0)


@pytest.mark.parametrize("kind", spe.KINDS)
def test_non_square_and_no_masks(kind):
  h, w = 20, 33
  m = np.zeros((3, h, w), np.uint8)
  m[0, :, :11] = 1
  m[1, 5:, 11:] = 1
  out = spe.compute_spe(m, kind, rng=0)
  assert out.shape == (h, w)
  assert len(np.unique(out[:, :11])) == 1 and len(np.unique(out[5:, 11:])) == 1
  np.testing.assert_array_equal(out[:5, 11:], 0)
  empty = spe.compute_spe(np.zeros((0, h, w), bool), kind, rng=0)
  np.testing.assert_array_equal(empty, np.zeros((h, w)))


def test_sincos_non_square_definition():
  h, w = 6, 9
  e = spe.sincos_embedding(h, w)
  r, c = 4, 7
  want = np.sin(1000 ** (2 * c / w)) * np.cos(np.sin(1000 ** (2 * r / h)))
  np.testing.assert_allclose(e[r, c], want, rtol=1e-12)
  m = np.ones((1, h, w), bool)
  np.testing.assert_allclose(spe.spe_sincos(m), e.mean(), rtol=1e-12)


def test_linear_draw_order_and_generators():
  h, w = 5, 8
  rs = np.random.RandomState(3)
  a = rs.uniform(0, 1, (1, w))
  b = rs.uniform(0, 1, (h, 1))
  np.testing.assert_allclose(spe.linear_embedding(h, w, 3), a * b)
  g1 = spe.spe_linear(np.ones((1, h, w)), np.random.default_rng(1))
  g2 = spe.spe_linear(np.ones((1, h, w)), np.random.default_rng(1))
  np.testing.assert_array_equal(g1, g2)
  with pytest.raises(ValueError):
    spe.spe_linear(np.ones((1, h, w)), None)


def test_cosine_value():
  m = np.zeros((1, 10, 10), bool)
  m[0, :5, :5] = True
  np.testing.assert_allclose(spe.spe_cosine(m)[0, 0], np.sqrt(25 / 100))


def test_reduce_constant():
  x = np.full((4, 4), 0.68, np.float32)
  r = spe.reduce_constant(x)
  assert r.dtype == np.float32 and not r.any()
  y = x.copy()
  y[0, 0] = 0
  np.testing.assert_array_equal(spe.reduce_constant(y), y)
  assert spe.is_constant(np.zeros((3, 3)))


def test_bad_kind_and_shape():
  with pytest.raises(ValueError):
    spe.compute_spe(np.ones((1, 4, 4)), "nope")
  with pytest.raises(ValueError):
    spe.spe_rope(np.ones((1, 1, 4, 4)))
