"""Metrics against hand-derived values, scikit-image (where conventions coincide) and the official outputs."""
import math

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from diffssr_jax.evaluation import metrics
from reference_data import keys, reference, require


def _rng_img(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _noisy(img, sigma, seed=1):
  noise = np.random.default_rng(seed).normal(0, sigma, img.shape)
  return np.clip(np.round(img + noise), 0, 255).astype(np.uint8)


def _smooth_img(h, w, seed=0):
  """A natural-ish image: smooth random field (SSIM on pure noise is near 0 and tests little)."""
  from scipy import ndimage
  x = np.random.default_rng(seed).normal(0, 1, (h, w, 3))
  x = ndimage.gaussian_filter(x, (3, 3, 0))
  x = (x - x.min()) / (x.max() - x.min())
  return np.round(x * 235 + 10).astype(np.uint8)


# ---------------------------------------------------------------- Y channel
@pytest.mark.parametrize("rgb, y", [
    ((0, 0, 0), 16.0),
    ((255, 255, 255), 235.0),
    ((255, 0, 0), 16 + 65.481),
    ((0, 255, 0), 16 + 128.553),
    ((0, 0, 255), 16 + 24.966),
    ((128, 64, 32), 16 + (65.481 * 128 + 128.553 * 64 + 24.966 * 32) / 255),
])
def test_rgb2y_pure_colours(rgb, y):
  img = np.broadcast_to(np.array(rgb, np.uint8), (2, 3, 3))
  out = metrics.rgb2y(img)
  assert out.shape == (2, 3) and out.dtype == np.float64
  np.testing.assert_allclose(out, y, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- PSNR
@pytest.mark.parametrize("offset", [1, 3, 10, 50])
def test_psnr_constant_offset_exact(offset):
  hr = np.full((16, 20, 3), 100, np.uint8)
  sr = hr + np.uint8(offset)
  expect = 20 * math.log10(255 / offset)
  assert metrics.psnr_rgb(sr, hr) == pytest.approx(expect, abs=1e-12)
  # a uniform RGB offset d moves Y by d * (65.481 + 128.553 + 24.966) / 255 = d * 219 / 255
  expect_y = 20 * math.log10(255 / (offset * 219 / 255))
  assert metrics.psnr_y(sr, hr) == pytest.approx(expect_y, abs=1e-9)


def test_psnr_identical_is_inf():
  img = _rng_img(9, 11)
  assert metrics.psnr_rgb(img, img) == math.inf
  assert metrics.psnr_y(img, img, crop=2) == math.inf


def test_psnr_rgb_matches_skimage():
  hr = _rng_img(33, 27)
  sr = _noisy(hr, 8)
  assert metrics.psnr_rgb(sr, hr) == pytest.approx(peak_signal_noise_ratio(hr, sr, data_range=255), abs=1e-10)


def test_psnr_crop_border_ignores_frame():
  hr = _rng_img(20, 24)
  sr = hr.copy()
  sr[:3] = 0  # damage only within the cropped frame
  sr[:, -3:] = 255
  assert metrics.psnr_y(sr, hr, crop=3) == math.inf
  assert metrics.psnr_y(sr, hr, crop=2) < 40
  with pytest.raises(ValueError):
    metrics.psnr_y(sr, hr, crop=10)


# ---------------------------------------------------------------- SSIM
def test_gaussian_window_normalised_symmetric():
  g = metrics.gaussian_window_1d(11, 1.5)
  assert g.sum() == pytest.approx(1.0, abs=1e-15)
  np.testing.assert_array_equal(g, g[::-1])
  assert g[5] / g[6] == pytest.approx(math.exp(1 / (2 * 1.5 ** 2)), rel=1e-12)


def test_ssim_identical_is_one():
  img = _smooth_img(30, 31)
  assert metrics.ssim_y(img, img) == pytest.approx(1.0, abs=1e-12)
  assert metrics.ssim_rgb_skimage(img, img) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("a, b", [(100, 110), (30, 200), (0, 255)])
def test_ssim_constant_images_closed_form(a, b):
  """Flat images have zero (co)variances, so SSIM = (2ab + C1)(C2) / ((a^2 + b^2 + C1) C2)."""
  x = np.full((15, 17), float(a))
  y = np.full((15, 17), float(b))
  c1 = (0.01 * 255) ** 2
  expect = (2 * a * b + c1) / (a * a + b * b + c1)
  assert metrics.ssim_matlab(x, y) == pytest.approx(expect, rel=1e-12)


def test_ssim_matlab_equals_skimage_gaussian_valid():
  """skimage with the Gaussian window crops its radius (5 for sigma 1.5, truncate 3.5) from a reflect-padded
  map: exactly MATLAB's 'valid' region, so the two agree to float64 rounding."""
  hr = _smooth_img(48, 41)
  sr = _noisy(hr, 6)
  y1, y2 = metrics.rgb2y(sr), metrics.rgb2y(hr)
  ours = metrics.ssim_matlab(y1, y2)
  ref = structural_similarity(y1, y2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                              data_range=255)
  assert 0.3 < ours < 0.99
  assert abs(ours - ref) < 1e-10
  assert metrics.ssim_y(sr, hr, crop=4) == pytest.approx(
      structural_similarity(y1[4:-4, 4:-4], y2[4:-4, 4:-4], gaussian_weights=True, sigma=1.5,
                            use_sample_covariance=False, data_range=255), abs=1e-10)


def test_ssim_map_is_valid_region_sized():
  x = _smooth_img(20, 25)[..., 0].astype(float)
  m = metrics.ssim_map(x, x + 3, metrics.gaussian_window_1d(), 255.0)
  assert m.shape == (10, 15)
  with pytest.raises(ValueError):
    metrics.ssim_matlab(x[:9], x[:9])


def test_ssim_rgb_matches_skimage_default():
  hr = _smooth_img(37, 29, seed=3)
  sr = _noisy(hr, 10, seed=4)
  ref = structural_similarity(sr, hr, channel_axis=2, data_range=255)
  assert abs(metrics.ssim_rgb_skimage(sr, hr) - ref) < 1e-10


# ---------------------------------------------------------------- LR-PSNR
def test_lr_psnr_of_exact_downscale_is_inf():
  from diffssr_jax.data.imresize import imresize
  sr = _smooth_img(40, 36)
  lr = imresize(sr, scale=0.25)
  assert metrics.lr_psnr(sr, lr, 4) == math.inf
  lr2 = lr.copy()
  lr2[0, 0, 0] ^= 1  # one LSB of one value: MSE = 1 / lr.size
  assert metrics.lr_psnr(sr, lr2, 4) == pytest.approx(10 * math.log10(255 ** 2 * lr.size), abs=1e-9)
  with pytest.raises(ValueError):
    metrics.lr_psnr(sr, lr[:-1], 4)


# ---------------------------------------------------------------- LDL artifact map
def _artifact_bruteforce(sr, hr, k=7):
  """Direct per-pixel evaluation of the definition (reflect padding, unbiased variances)."""
  r = np.abs(hr.astype(float) - sr.astype(float)).sum(2) / 255
  p = np.pad(r, k // 2, mode="reflect")
  local = np.array([[np.var(p[i:i + k, j:j + k], ddof=1) for j in range(r.shape[1])]
                    for i in range(r.shape[0])])
  return np.var(r, ddof=1) ** 0.2 * local


def test_artifact_map_matches_definition():
  hr = _smooth_img(19, 23)
  sr = _noisy(hr, 12)
  ours = metrics.artifact_map(sr, hr)
  ref = _artifact_bruteforce(sr, hr)
  assert ours.shape == (19, 23)
  np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-15)
  assert metrics.artifact_mean(sr, hr) == pytest.approx(ref.mean(), rel=1e-9)


def test_artifact_map_hand_values():
  hr = np.zeros((15, 15, 3), np.uint8)
  # constant residual: zero variance everywhere
  assert np.all(metrics.artifact_map(hr + 7, hr) == 0)
  # one pixel with residual 1 (255 in one channel) in the centre: window var = (1 - 1/49) / 48 = 1/49,
  # image var = (1 - 1/225) / 224 = 1/225.
  sr = hr.copy()
  sr[7, 7, 1] = 255
  m = metrics.artifact_map(sr, hr)
  expect = (1 / 225) ** 0.2 * (1 / 49)
  assert m[7, 7] == pytest.approx(expect, rel=1e-12)
  assert m[4, 4] == pytest.approx(expect, rel=1e-12)  # window still contains the pixel
  assert m[3, 7] == 0 and m[11, 11] == 0  # windows that miss it


# ---------------------------------------------------------------- sr_metrics row
def test_sr_metrics_row():
  from diffssr_jax.data.imresize import imresize
  hr = _smooth_img(32, 32)
  sr = _noisy(hr, 3)
  lr = imresize(hr, scale=0.25)
  row = metrics.sr_metrics(sr, hr, lr, 4)
  assert list(row) == ["psnr_y", "ssim_y", "psnr_rgb", "lr_psnr", "artifact"]
  assert row["psnr_y"] == metrics.psnr_y(sr, hr, 4)
  assert 30 < row["psnr_rgb"] < 45 and 0 < row["ssim_y"] < 1 and row["artifact"] > 0
  assert math.isnan(metrics.sr_metrics(sr, hr, None, 4)["lr_psnr"])


# ---------------------------------------------------------------- official Measure.measure
def test_signed_to_uint8_rounding():
  # 0.0 maps to 127.5 exactly: half to even gives 128
  x = np.array([-1.0, -1.5, 1.0, 2.0, 0.0, -1 + 0.4 / 127.5, -1 + 1.6 / 127.5, 1 - 0.6 / 127.5], np.float32)
  np.testing.assert_array_equal(metrics.signed_to_uint8(x), [0, 0, 255, 255, 128, 0, 2, 254])


def _measure_cases():
  """Cases `<c>` with an official `met/<c>_psnr` (keys are flat, `met/a_psnr`, so `cases()` does not apply)."""
  return sorted(k[len("met/"):-len("_psnr")] for k in keys()
                if k.startswith("met/") and k.endswith("_psnr") and not k.endswith("_lr_psnr"))


@reference
@pytest.mark.parametrize("case", _measure_cases())
def test_official_measure_reference(case):
  psnr, ssim, lr_psnr = require(f"met/{case}_psnr", f"met/{case}_ssim", f"met/{case}_lr_psnr")
  if f"met/{case}_sr" in keys():  # float tensors in [-1, 1], CHW
    sr, hr, lr = require(f"met/{case}_sr", f"met/{case}_hr", f"met/{case}_lr")
  else:  # uint8 HWC, passed transposed to CHW
    sr, hr, lr = (x.transpose(2, 0, 1) for x in require(f"met/{case}_sr_u8", f"met/{case}_hr_u8",
                                                           f"met/{case}_lr_u8"))
  out = metrics.official_measure(sr, hr, lr, 4)
  assert out["psnr"] == pytest.approx(float(psnr), abs=1e-9)
  assert out["lr_psnr"] == pytest.approx(float(lr_psnr), abs=1e-9)
  assert out["ssim"] == pytest.approx(float(ssim), abs=1e-9)


def test_official_measure_passes_uint8_pair_to_lpips():
  from diffssr_jax.data.imresize import imresize
  hr = _smooth_img(32, 32)
  sr = _noisy(hr, 5)
  lr = imresize(hr, scale=0.25)
  seen = []

  def fake_lpips(a, b):  # records what LPIPS would get: [-1, 1] NHWC
    seen.append((a, b))
    return np.array([0.123])

  chw = lambda x: x.transpose(2, 0, 1)
  out = metrics.official_measure(chw(sr), chw(hr), chw(lr), 4, lpips_fn=fake_lpips)
  assert out["lpips"] == 0.123 and out["psnr"] == metrics.psnr_rgb(sr, hr)
  np.testing.assert_allclose(seen[0][0][0], sr / 127.5 - 1, atol=1e-6)
  assert "lpips" not in metrics.official_measure(chw(sr), chw(hr), chw(lr), 4)
