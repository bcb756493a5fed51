"""Full-reference image-quality metrics on 8-bit images (numpy + scipy only).

Two families of conventions live here and are kept apart on purpose:

* the SR literature's reporting convention (BasicSR / the MATLAB scripts of the NTIRE era): PSNR and SSIM on
  the BT.601 luma (Y) channel, optionally after cropping `crop_border` pixels from every side, SSIM with an
  11x11 Gaussian window (sigma 1.5) and 'valid' filtering, computed in float64 on the [0, 255] range;
* the official SAM-DiffSR training-time `Measure.measure`: RGB PSNR and scikit-image's default SSIM (7x7
  uniform window, sample covariance) on tensors mapped to uint8, plus LR-PSNR.

Metrics take uint8 images (H, W, 3) so they can be recomputed from saved PNGs. `imresize` (MATLAB bicubic) is
imported lazily because only LR-PSNR needs it.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from diffssr_jax.conventions import signed_to_uint8

# ITU-R BT.601 luma for studio-swing output, as MATLAB's rgb2ycbcr: Y = 16 + (65.481 R + 128.553 G + 24.966 B)
# with R, G, B in [0, 1]; Y spans [16, 235].
_BT601_Y = np.array([65.481, 128.553, 24.966]) / 255.0

SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
  if a.shape != b.shape:
    raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")


def rgb2y(img: np.ndarray) -> np.ndarray:
  """BT.601 luma Y in [16, 235] (float64, not rounded) of an (H, W, 3) uint8 RGB image.

  The MATLAB `rgb2ycbcr` coefficients on the 8-bit values, keeping the fractional part as BasicSR's
  `to_y_channel` does (MATLAB on uint8 input would round Y to an integer). BasicSR stores Y in float32; we keep
  float64, which moves PSNR-Y by ~1e-6 dB at most.
  """
  img = np.asarray(img)
  if img.ndim != 3 or img.shape[2] != 3:
    raise ValueError(f"rgb2y takes (H, W, 3) RGB, got {img.shape}")
  return img.astype(np.float64) @ _BT601_Y + 16.0


def crop_border(img: np.ndarray, border: int) -> np.ndarray:
  """`img` without `border` pixels on each of its four sides (the SR convention of ignoring the frame)."""
  if border < 0:
    raise ValueError(f"crop border must be >= 0, got {border}")
  if border == 0:
    return img
  if img.shape[0] <= 2 * border or img.shape[1] <= 2 * border:
    raise ValueError(f"crop border {border} leaves nothing of a {img.shape[:2]} image")
  return img[border:-border, border:-border]


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
  """Peak signal-to-noise ratio 10 log10(data_range^2 / MSE) in dB, float64; +inf for identical inputs."""
  _check_pair(a, b)
  mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
  if mse == 0:
    return math.inf
  return float(10.0 * np.log10(data_range ** 2 / mse))


def psnr_rgb(sr: np.ndarray, hr: np.ndarray, crop: int = 0) -> float:
  """PSNR over all three RGB channels of uint8 images (skimage's `peak_signal_noise_ratio`, data_range 255)."""
  return psnr(crop_border(sr, crop), crop_border(hr, crop))


def psnr_y(sr: np.ndarray, hr: np.ndarray, crop: int = 0) -> float:
  """PSNR on the BT.601 Y channel (float, [16, 235] in a 255 range) after cropping `crop` pixels per side."""
  _check_pair(sr, hr)
  return psnr(crop_border(rgb2y(sr), crop), crop_border(rgb2y(hr), crop))


def gaussian_window_1d(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  """Normalised 1-D Gaussian taps exp(-x^2 / 2 sigma^2), x = -(size//2)..size//2 (MATLAB fspecial's window)."""
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  g = np.exp(-(x ** 2) / (2.0 * sigma ** 2))
  return g / g.sum()


def _filter_valid(img: np.ndarray, taps: np.ndarray) -> np.ndarray:
  """Separable correlation of a 2-D float64 image with `taps` on rows and columns, 'valid' part only."""
  r = len(taps) // 2
  out = ndimage.correlate1d(img, taps, axis=0, mode="constant")
  out = ndimage.correlate1d(out, taps, axis=1, mode="constant")
  # Away from a band of width r every window lies inside the image, so padding never reaches what we keep.
  return out[r:img.shape[0] - r, r:img.shape[1] - r]


def ssim_map(a: np.ndarray, b: np.ndarray, taps: np.ndarray, data_range: float = 255.0,
             sample_covariance: bool = False) -> np.ndarray:
  """Per-pixel SSIM (Wang et al. 2004, eq. 13) of two 2-D images over a separable window, 'valid' region.

  Local means and (co)variances are window-weighted; with `sample_covariance` the (co)variances are scaled by
  N / (N - 1) for an N-pixel window (scikit-image's default with uniform windows). C1 = (K1 L)^2, C2 = (K2 L)^2.
  """
  _check_pair(a, b)
  if a.ndim != 2:
    raise ValueError(f"ssim_map takes 2-D images, got {a.shape}")
  if min(a.shape) < len(taps):
    raise ValueError(f"image {a.shape} is smaller than the {len(taps)}x{len(taps)} SSIM window")
  x = np.asarray(a, np.float64)
  y = np.asarray(b, np.float64)
  mx, my = _filter_valid(x, taps), _filter_valid(y, taps)
  n = len(taps) ** 2
  norm = n / (n - 1) if sample_covariance else 1.0
  vx = norm * (_filter_valid(x * x, taps) - mx * mx)
  vy = norm * (_filter_valid(y * y, taps) - my * my)
  vxy = norm * (_filter_valid(x * y, taps) - mx * my)
  c1 = (SSIM_K1 * data_range) ** 2
  c2 = (SSIM_K2 * data_range) ** 2
  return ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def ssim_matlab(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
  """Mean SSIM of two 2-D images as Wang et al.'s MATLAB `ssim_index`: 11x11 Gaussian (sigma 1.5), 'valid'.

  Population (co)variances, float64, K1 = 0.01, K2 = 0.03. This equals scikit-image's
  `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)` because skimage crops
  the filter radius (5) from its reflect-padded map, leaving exactly the valid region.
  """
  return float(ssim_map(a, b, gaussian_window_1d(11, 1.5), data_range).mean())


def ssim_y(sr: np.ndarray, hr: np.ndarray, crop: int = 0) -> float:
  """SSIM on the BT.601 Y channel (BasicSR's `calculate_ssim(test_y_channel=True)`) after cropping `crop`."""
  _check_pair(sr, hr)
  return ssim_matlab(crop_border(rgb2y(sr), crop), crop_border(rgb2y(hr), crop))


def ssim_rgb_skimage(a: np.ndarray, b: np.ndarray, win_size: int = 7, data_range: float = 255.0) -> float:
  """SSIM with scikit-image's defaults on (H, W, C) images: per-channel 7x7 uniform window, sample
  covariance, map cropped by the window radius (= the valid region), mean over channels and pixels.

  This is the SSIM of the official `Measure.ssim` (`structural_similarity(channel_axis=2, data_range=255)`).
  """
  _check_pair(a, b)
  taps = np.full(win_size, 1.0 / win_size)
  maps = [ssim_map(a[..., c], b[..., c], taps, data_range, sample_covariance=True) for c in range(a.shape[2])]
  return float(np.mean([m.mean() for m in maps]))


def _imresize():
  from diffssr_jax.data.imresize import imresize  # lazy: only LR-PSNR needs MATLAB bicubic
  return imresize


def lr_psnr(sr: np.ndarray, lr: np.ndarray, scale: int) -> float:
  """LR consistency (SRDiff's LR-PSNR): RGB PSNR between the uint8 SR image down-scaled by 1/scale with
  MATLAB bicubic (uint8 rounding after each pass) and the uint8 LR input."""
  down = _imresize()(np.asarray(sr, np.uint8), scale=1.0 / scale)
  if down.shape != lr.shape:
    raise ValueError(f"SR down-scaled by 1/{scale} is {down.shape}, LR is {lr.shape}")
  return psnr(down, lr)


def _local_variance(img: np.ndarray, ksize: int) -> np.ndarray:
  """Unbiased variance (divisor ksize^2 - 1) of each ksize x ksize window, the image reflect-padded
  (edge pixel not repeated), one value per pixel."""
  pad = ksize // 2
  padded = np.pad(img, pad, mode="reflect")
  # Window sums of x and x^2 via separable box filters; 'valid' on the padded image gives one per pixel.
  box = np.ones(ksize)
  s1 = _filter_valid(padded, box)
  s2 = _filter_valid(padded * padded, box)
  n = ksize * ksize
  return np.maximum(s2 - s1 * s1 / n, 0.0) / (n - 1)


def artifact_map(sr: np.ndarray, hr: np.ndarray, ksize: int = 7, exponent: float = 5.0) -> np.ndarray:
  """The LDL artifact map (Liang et al., CVPR 2022, "Details or Artifacts", Sec. 3.2, eqs. 3-5).

  With images scaled to [0, 1] (their training range): residual R = sum over channels of |HR - SR|;
  pixel-level map M(i, j) = variance of R in the 7x7 window centred on (i, j); patch-level scale
  delta = var(R) ** (1 / a), a = 5, over the whole image; artifact map = delta * M. As in the authors'
  release, both variances are unbiased (n - 1 divisor) and the image is reflect-padded for the windows.
  (The EMA refinement that zeroes pixels where the EMA model is worse is a training device, left out.)
  Returns an (H, W) float64 map.
  """
  _check_pair(sr, hr)
  residual = np.abs(np.asarray(hr, np.float64) - np.asarray(sr, np.float64)).sum(axis=2) / 255.0
  delta = np.var(residual, ddof=1) ** (1.0 / exponent) if residual.size > 1 else 0.0
  return delta * _local_variance(residual, ksize)


def artifact_mean(sr: np.ndarray, hr: np.ndarray, ksize: int = 7) -> float:
  """Mean of `artifact_map` over the image: one artifact score per image (lower is better)."""
  return float(artifact_map(sr, hr, ksize).mean())


def official_measure(sr, hr, lr, scale: int, lpips_fn=None) -> dict[str, float]:
  """Reproduces SAM-DiffSR's training-time `Measure.measure`: `psnr`, `ssim`, `lr_psnr` (+ `lpips`).

  Inputs are (C, H, W): float tensors/arrays in [-1, 1] (mapped with `signed_to_uint8`) or uint8. Computes RGB
  PSNR (data_range 255), skimage-default SSIM over the channels, and RGB PSNR between the MATLAB-bicubic
  1/scale down-scaled SR and the LR, all on uint8. With `lpips_fn` (from `lpips.make_lpips_fn`, AlexNet
  in the official code) also LPIPS of the uint8 pair mapped back to [-1, 1] by x / 127.5 - 1.
  """
  imgs = []
  for x in (sr, hr, lr):
    x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    x = x if x.dtype == np.uint8 else signed_to_uint8(x)
    imgs.append(np.ascontiguousarray(x.transpose(1, 2, 0)))
  sr8, hr8, lr8 = imgs
  out = {
      "psnr": psnr(sr8, hr8),
      "ssim": ssim_rgb_skimage(sr8, hr8),
      "lr_psnr": lr_psnr(sr8, lr8, scale),
  }
  if lpips_fn is not None:
    from diffssr_jax.evaluation.lpips import lpips_images  # lazy: keeps this module free of jax
    out["lpips"] = float(lpips_images(lpips_fn, sr8, hr8)[0])
  return out


def sr_metrics(sr: np.ndarray, hr: np.ndarray, lr: np.ndarray | None, scale: int,
               crop: int | None = None) -> dict[str, float]:
  """The per-image evaluation row: psnr_y, ssim_y (cropping `crop`, default `scale` pixels per side as
  BasicSR's benchmark configs; pass 0 for pyiqa's default, which the official tools/caculate_iqa.py used),
  psnr_rgb (uncropped), lr_psnr (NaN without an LR) and artifact."""
  crop = scale if crop is None else crop
  return {
      "psnr_y": psnr_y(sr, hr, crop),
      "ssim_y": ssim_y(sr, hr, crop),
      "psnr_rgb": psnr_rgb(sr, hr),
      "lr_psnr": lr_psnr(sr, lr, scale) if lr is not None else math.nan,
      "artifact": artifact_mean(sr, hr),
  }
