"""Structural position encoding (SPE): segmentation masks -> one per-pixel map (numpy only).

SAM-DiffSR turns the K region masks of an image into a single (H, W) map in which every pixel of region
i holds one number: the mean, over the WHOLE image, of a fixed position-embedding map E restricted to the
region, `sum(E * M_i) / (H * W)`. Regions are painted in order, later masks overwriting earlier ones;
pixels no mask covers are 0. The kinds differ only in E:

* ``rope`` (the paper's and official default): E is rotary position embedding (RoFormer, as implemented
  by `rotary-embedding-torch`) applied to an all-ones (H, W) map, with the W columns as the embedding
  features and the H rows as sequence positions: `theta[r, k] = r * 10000**(-2k/W)` for k < W//2 rotates
  the interleaved pair (2k, 2k+1), so the ones become `(cos - sin, cos + sin)`; for odd W the last column
  is not rotated and stays 1. One full 16x16 mask gives the constant 0.686852.
  The official code computes this in float32, so `spe_rope` returns float32.
* ``cosine``: no E; region i gets the cosine similarity between the all-ones vector and its flattened
  mask, i.e. `sqrt(|M_i| / (H*W))`. float64, as the official numpy code.
* ``sincos``: `E[r, c] = sin(v_c) * cos(sin(v_r))` with `v_k = 1000**(2k/n)` (n = W for columns, H for
  rows). float64.
* ``linear``: `E[r, c] = a_c * b_r` with `a ~ U(0,1)^W` drawn first, then `b ~ U(0,1)^H`. float64.

The official `cosine`, `sincos` and `linear` code only works for square images (it takes `w, h =
mask.shape` and mixes the two up); ours is written for (H, W) and equals the official output on square
images, including the random draws of `linear` when given `np.random.RandomState(seed)` after the
official `np.random.seed(seed)`.

Masks are (K, H, W) bool or 0/1 integers (pycocotools decodes to uint8), K may be 0.
"""
from __future__ import annotations

import numpy as np

KINDS = ("rope", "cosine", "sincos", "linear")
ROPE_THETA = 10000.0
# Precision the official implementation produced each kind in (rotary-embedding-torch runs float32).
OFFICIAL_DTYPE = {"rope": np.float32, "cosine": np.float64, "sincos": np.float64, "linear": np.float64}


def _as_masks(masks) -> np.ndarray:
  """(K, H, W) bool view of the masks, validating the shape."""
  m = np.asarray(masks)
  if m.ndim == 2:
    m = m[None]
  if m.ndim != 3:
    raise ValueError(f"masks must be (K, H, W), got shape {m.shape}")
  if m.shape[1] == 0 or m.shape[2] == 0:
    raise ValueError(f"masks must have a non-empty image size, got {m.shape}")
  return m.astype(bool, copy=False)


def rope_angles(h: int, w: int) -> np.ndarray:
  """Rotation angles (H, W//2) of rotary-embedding-torch with dim=W over H positions, in float32.

  The official code derives them in float32 (`1 / theta**(arange(0, W, 2)/W)`, times the float32
  position). Angles reach ~H radians, where a float32 rounding step moves cos/sin by up to ~1e-4, so we
  redo the float32 arithmetic step by step. The one step numpy cannot mirror is torch's float32 `pow`
  (a vectorised SLEEF routine, not always correctly rounded, and CPU-dependent); we round the exact
  float64 power instead, which equals torch's for the common widths (<= 64 and many others) and
  otherwise differs by one ulp in a few frequencies, which moves single E values by <~2e-4 but region
  means (the SPE) by < 1e-7.
  """
  exps = (np.arange(0, w, 2, dtype=np.float32)[: w // 2] / np.float32(w)).astype(np.float32)
  power = np.power(ROPE_THETA, exps.astype(np.float64)).astype(np.float32)
  inv_freq = (np.float32(1.0) / power).astype(np.float32)
  pos = np.arange(h, dtype=np.float32)
  return (pos[:, None] * inv_freq[None, :]).astype(np.float32)


def rope_ones(h: int, w: int) -> np.ndarray:
  """RoPE of an all-ones (H, W) map (rows = positions, columns = features), float32."""
  ang = rope_angles(h, w).astype(np.float64)
  cos, sin = np.cos(ang), np.sin(ang)
  out = np.ones((h, w), dtype=np.float64)
  out[:, 0:2 * (w // 2):2] = cos - sin  # interleaved pair (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)
  out[:, 1:2 * (w // 2):2] = cos + sin
  return out.astype(np.float32)


def sincos_embedding(h: int, w: int) -> np.ndarray:
  """The `sincos` kind's E (H, W) float64: sin(v_col) * cos(sin(v_row)), v_k = 1000**(2k/n)."""
  def freqs(n):
    return 1.0 / np.power(0.001, 2.0 * np.arange(n) / n)
  return np.sin(freqs(w))[None, :] * np.cos(np.sin(freqs(h)))[:, None]


def linear_embedding(h: int, w: int, rng) -> np.ndarray:
  """The `linear` kind's E (H, W) float64: a_col * b_row, a ~ U(0,1)^W drawn before b ~ U(0,1)^H.

  `rng`: an int seed (legacy MT19937, as `np.random.seed`), a `np.random.RandomState` or a
  `np.random.Generator`.
  """
  if rng is None:
    raise ValueError("spe_linear needs an rng (int seed, RandomState or Generator) to be reproducible")
  if isinstance(rng, (int, np.integer)):
    rng = np.random.RandomState(int(rng))
  a = rng.uniform(0, 1, (1, w))
  b = rng.uniform(0, 1, (h, 1))
  return a * b


def paint_regions(masks: np.ndarray, values, dtype) -> np.ndarray:
  """(H, W) map with region i filled with values[i], later masks overwriting earlier, 0 elsewhere."""
  _, h, w = masks.shape
  out = np.zeros((h, w), dtype=dtype)
  for m, v in zip(masks, values):  # loop over regions (tens to hundreds), vectorised per region
    out[m] = v
  return out


def region_means(masks: np.ndarray, embedding: np.ndarray) -> np.ndarray:
  """sum(E * M_i) / (H * W) for every mask i (the mean over the whole image), float64."""
  k, h, w = masks.shape
  e = embedding.reshape(h * w).astype(np.float64)
  flat = masks.reshape(k, h * w)
  # One boolean gather per mask: a (K, H*W) float product would need gigabytes for 2K images.
  return np.array([e[f].sum() for f in flat], dtype=np.float64) / (h * w)


def spe_rope(masks) -> np.ndarray:
  """SAM-DiffSR's RoPE SPE (official `merge_all_mask_to_one_RoPE`), float32 (H, W)."""
  m = _as_masks(masks)
  vals = region_means(m, rope_ones(m.shape[1], m.shape[2]))
  return paint_regions(m, vals.astype(np.float32), np.float32)


def spe_cosine(masks) -> np.ndarray:
  """Cosine-similarity SPE (official `merge_all_mask_to_one`): region i -> sqrt(|M_i| / (H*W))."""
  m = _as_masks(masks)
  k, h, w = m.shape
  counts = m.reshape(k, h * w).sum(axis=1).astype(np.float64)
  # ones . m / (|ones| |m|); an empty mask paints nothing, so its undefined value never shows.
  with np.errstate(invalid="ignore", divide="ignore"):
    vals = counts / (np.sqrt(h * w) * np.sqrt(counts))
  return paint_regions(m, vals, np.float64)


def spe_sincos(masks) -> np.ndarray:
  """Sin-cos SPE (official `merge_all_mask_to_one_sincos`, generalised to non-square), float64."""
  m = _as_masks(masks)
  return paint_regions(m, region_means(m, sincos_embedding(m.shape[1], m.shape[2])), np.float64)


def spe_linear(masks, rng) -> np.ndarray:
  """Random separable SPE (official `merge_all_mask_to_one_linear`, generalised), float64."""
  m = _as_masks(masks)
  return paint_regions(m, region_means(m, linear_embedding(m.shape[1], m.shape[2], rng)), np.float64)


def compute_spe(masks, kind: str = "rope", rng=None) -> np.ndarray:
  """The SPE map of `kind` (one of KINDS) for (K, H, W) masks; `rng` only for `linear`."""
  if kind == "rope":
    return spe_rope(masks)
  if kind == "cosine":
    return spe_cosine(masks)
  if kind == "sincos":
    return spe_sincos(masks)
  if kind == "linear":
    return spe_linear(masks, rng)
  raise ValueError(f"unknown SPE kind {kind!r}; expected one of {KINDS}")


def compute_spe_labels(labels, kind: str = "rope", rng=None) -> np.ndarray:
  """SPE of disjoint regions given as an (H, W) label map (labels >= 0; negative = uncovered).

  Equals `compute_spe` of the masks `labels == k` (disjoint, so their order does not matter), but sums
  each region with one `bincount` instead of materialising a (K, H, W) mask stack.
  """
  lab = np.asarray(labels)
  if lab.ndim != 2 or lab.size == 0:
    raise ValueError(f"labels must be a non-empty (H, W) array, got shape {lab.shape}")
  h, w = lab.shape
  valid = lab >= 0
  flat = np.where(valid, lab, 0).ravel().astype(np.int64)
  k = int(flat.max()) + 1 if valid.any() else 0
  counts = np.bincount(flat[valid.ravel()], minlength=k).astype(np.float64)
  if kind == "cosine":
    with np.errstate(invalid="ignore", divide="ignore"):
      vals = counts / (np.sqrt(h * w) * np.sqrt(counts))
  else:
    if kind == "rope":
      e = rope_ones(h, w)
    elif kind == "sincos":
      e = sincos_embedding(h, w)
    elif kind == "linear":
      e = linear_embedding(h, w, rng)
    else:
      raise ValueError(f"unknown SPE kind {kind!r}; expected one of {KINDS}")
    sums = np.bincount(flat[valid.ravel()], weights=e.ravel().astype(np.float64)[valid.ravel()], minlength=k)
    vals = sums / (h * w)
  dtype = OFFICIAL_DTYPE[kind]
  vals = vals.astype(dtype)
  return np.where(valid, vals[flat.reshape(h, w)] if k else np.zeros((h, w), dtype), 0).astype(dtype)


def is_constant(spe: np.ndarray) -> bool:
  """True when every value of the map is the same (official test: `len(np.unique(x)) == 1`)."""
  spe = np.asarray(spe)
  return spe.size > 0 and bool(np.all(spe == spe.flat[0]))


def reduce_constant(spe: np.ndarray) -> np.ndarray:
  """A map with one single value becomes zeros ("all_same_mask_to_zero"); others are returned as is.

  A patch lying inside one region carries no structure, and its constant would only shift the noise
  mean, so the official option replaces it by 0.
  """
  spe = np.asarray(spe)
  return np.zeros_like(spe) if is_constant(spe) else spe
