"""MATLAB-compatible bicubic `imresize` in numpy (the resize SAM-DiffSR's data pipeline is built on).

Behaviour matched (MATLAB's `imresize(I, scale, 'bicubic')`, as reproduced by the official
`utils_sr/matlab_resize.py`):

* Keys cubic kernel with a = -0.5, support 4 input pixels.
* When shrinking (scale < 1) the kernel is stretched by 1/scale (antialiasing), so each output pixel
  averages ~4/scale input pixels.
* Output size is `ceil(in * scale)` per axis; pixel centres map as `u = x/scale + 0.5*(1 - 1/scale)`
  (1-based), and samples beyond the border are mirrored (symmetric padding, edge pixel repeated).
* The two axes are resized one after the other, the axis with the smaller scale first (rows first when
  both scales are equal).
* A uint8 input is clipped to [0, 255], rounded (half to even) and stored as uint8 after EACH 1-D pass, as
  the official code does; any other input is computed and returned as float64.

Implementation: per axis, a (out, taps) table of weights and source indices; the pass loops over the
few taps (not over pixels) and accumulates `w[:, t] * x[idx[:, t]]` in tap order, which is the same
summation order as the official code, so results are bit-identical (uint8 rounding ties included).
"""
from __future__ import annotations

import functools
import math

import numpy as np

KERNEL_WIDTH = 4.0


def cubic(x: np.ndarray) -> np.ndarray:
  """Keys' cubic convolution kernel with a = -0.5 (MATLAB's 'bicubic')."""
  ax = np.abs(np.asarray(x, dtype=np.float64))
  ax2 = ax * ax
  ax3 = ax2 * ax
  near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
  far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
  return near + far


def output_size(in_shape, scale: float) -> tuple[int, int]:
  """MATLAB's output size for a scale factor: ceil(scale * n) per axis."""
  return tuple(int(math.ceil(scale * n)) for n in in_shape[:2])


@functools.lru_cache(maxsize=256)
def contributions(in_len: int, out_len: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
  """Weights (out_len, taps) float64 and source indices (out_len, taps) int of one axis' resize.

  Taps whose weight is zero for every output are dropped (they add nothing), mirrored indices fold
  out-of-range samples back into the image.
  """
  if scale < 1:
    kernel = lambda d: scale * cubic(scale * d)  # stretched kernel = antialiasing
    width = KERNEL_WIDTH / scale
  else:
    kernel = cubic
    width = KERNEL_WIDTH
  x = np.arange(1, out_len + 1, dtype=np.float64)
  u = x / scale + 0.5 * (1 - 1 / scale)  # output pixel centre in 1-based input coordinates
  left = np.floor(u - width / 2)
  taps = int(math.ceil(width)) + 2
  idx = (left[:, None] + np.arange(taps) - 1).astype(np.int64)  # 0-based
  w = kernel(u[:, None] - idx - 1)
  w = w / w.sum(axis=1, keepdims=True)
  mirror = np.concatenate([np.arange(in_len), np.arange(in_len - 1, -1, -1)])
  idx = mirror[np.mod(idx, mirror.size)]
  keep = np.any(w, axis=0)
  w, idx = np.ascontiguousarray(w[:, keep]), np.ascontiguousarray(idx[:, keep])
  w.setflags(write=False)
  idx.setflags(write=False)
  return w, idx


@functools.lru_cache(maxsize=64)
def weight_matrix(in_len: int, out_len: int, scale: float) -> np.ndarray:
  """The dense (out_len, in_len) linear map of one axis' resize (read-only, cached)."""
  w, idx = contributions(in_len, out_len, scale)
  m = np.zeros((out_len, in_len))
  np.add.at(m, (np.repeat(np.arange(out_len), w.shape[1]), idx.ravel()), w.ravel())
  m.setflags(write=False)
  return m


def resize_axis(x: np.ndarray, axis: int, out_len: int, scale: float) -> np.ndarray:
  """One 1-D bicubic pass along `axis`; uint8 in -> uint8 out (clip + round), else float64."""
  w, idx = contributions(x.shape[axis], out_len, scale)
  # Work on a contiguous copy with `axis` first: row gathers are then plain memory copies (gathering
  # along an inner axis is ~10x slower). No BLAS either: a matrix product would round differently and,
  # with OpenBLAS threads on a busy machine, is slower still for patch-sized inputs.
  xm = np.ascontiguousarray(np.moveaxis(x, axis, 0), dtype=np.float64)
  shape = (out_len,) + (1,) * (xm.ndim - 1)
  out = np.zeros((out_len,) + xm.shape[1:], dtype=np.float64)
  tmp = np.empty_like(out)
  for t in range(w.shape[1]):  # few taps (<= ~20); the work per tap is vectorised over all pixels
    np.take(xm, idx[:, t], axis=0, out=tmp)
    tmp *= w[:, t].reshape(shape)
    out += tmp
  if x.dtype == np.uint8:
    out = np.around(np.clip(out, 0, 255)).astype(np.uint8)
  return np.ascontiguousarray(np.moveaxis(out, 0, axis))


def _plan(in_hw, scale, output_shape):
  if (scale is None) == (output_shape is None):
    raise ValueError("imresize: give exactly one of scale or output_shape")
  if scale is not None:
    scale = float(scale)
    if not scale > 0:
      raise ValueError(f"imresize: scale must be positive, got {scale}")
    sizes = output_size(in_hw, scale)
    scales = (scale, scale)
  else:
    sizes = tuple(int(s) for s in output_shape[:2])
    if min(sizes) <= 0:
      raise ValueError(f"imresize: output_shape must be positive, got {output_shape}")
    scales = tuple(o / i for o, i in zip(sizes, in_hw))
  order = sorted(range(2), key=lambda k: scales[k])  # stable: rows first on equal scales
  return sizes, scales, order


def _resize_hw(x, axes, scale, output_shape):
  in_hw = (x.shape[axes[0]], x.shape[axes[1]])
  if min(in_hw) == 0:
    raise ValueError(f"imresize: empty image of shape {x.shape}")
  sizes, scales, order = _plan(in_hw, scale, output_shape)
  for k in order:
    x = resize_axis(x, axes[k], sizes[k], scales[k])
  return x


def imresize(img: np.ndarray, scale: float | None = None, output_shape=None) -> np.ndarray:
  """MATLAB `imresize(img, scale)` / `imresize(img, [h, w])`, bicubic with antialiasing.

  `img` is (H, W) or (H, W, C). uint8 stays uint8 (rounded after each pass); other dtypes give float64.
  """
  img = np.asarray(img)
  if img.ndim not in (2, 3):
    raise ValueError(f"imresize: expected (H, W) or (H, W, C), got shape {img.shape}")
  if img.dtype != np.uint8 and img.dtype.kind not in "fiub":
    raise TypeError(f"imresize: unsupported dtype {img.dtype}")
  return _resize_hw(img, (0, 1), scale, output_shape)


def imresize_batch(imgs: np.ndarray, scale: float | None = None, output_shape=None) -> np.ndarray:
  """`imresize` of every image of an (N, H, W, C) or (N, H, W) batch, in one vectorised call."""
  imgs = np.asarray(imgs)
  if imgs.ndim not in (3, 4):
    raise ValueError(f"imresize_batch: expected (N, H, W[, C]), got shape {imgs.shape}")
  return _resize_hw(imgs, (1, 2), scale, output_shape)
