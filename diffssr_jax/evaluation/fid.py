"""FID (Heusel et al., NeurIPS 2017): InceptionV3 pool3 features in Flax and the Frechet distance in numpy.

The network is the "FID Inception" of pytorch-fid, i.e. TensorFlow's 2015-12-05 InceptionV3 graph as ported to
PyTorch (`pt_inception-2015-12-05-*.pth`, a state dict the user supplies; nothing is downloaded). It differs
from torchvision's InceptionV3 in the pooling of the Inception blocks: the average pools of Mixed_5b-5d,
6b-6e and 7b exclude the padding from their counts, and Mixed_7c's pool branch uses a 3x3 max pool. Every
conv is bias-free and followed by BatchNorm (eps 1e-3, running statistics) and ReLU.

Input: RGB in [0, 1], resized to 299x299 with bilinear interpolation (half-pixel centres, no antialiasing:
torch's `interpolate(mode='bilinear', align_corners=False)`), mapped to [-1, 1]; output: the 2048-d global
average of Mixed_7c. The distance between two feature sets is
  d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FID_SIZE = 299
BN_EPS = 1e-3


# ---------------------------------------------------------------- network
class BasicConv(nn.Module):
  """Conv (no bias) + BatchNorm (inference) + ReLU; `padding` (ph, pw) symmetric."""
  features: int
  kernel: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel, strides=(self.strides, self.strides),
                padding=((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
    return jax.nn.relu(x)


def _avg_pool_3x3(x):
  """3x3 average, stride 1, padding 1, padded cells not counted (TF 'SAME' average pooling)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  """Mixed_5b/c/d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 (pool_features)."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (grid reduction): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b-e: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1, `c7` inner channels."""
  c7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.c7
    b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a (grid reduction): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b/c: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1; `max_pool` selects Mixed_7c's
  3x3 max pool (the TF graph's) instead of the padding-excluding average."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """InceptionV3 up to the pool3 features (N, 2048), on NHWC input already in [-1, 1]. Sub-module names are
  the PyTorch attribute names, so state-dict keys map one to one."""

  @nn.compact
  def __call__(self, x):
    x = BasicConv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))


# ---------------------------------------------------------------- preprocessing
def bilinear_matrix(in_len: int, out_len: int) -> np.ndarray:
  """(out_len, in_len) matrix of 1-D bilinear resampling with half-pixel centres and no antialiasing, as
  torch's `interpolate(mode='bilinear', align_corners=False)`: src = (dst + 0.5) * in/out - 0.5, clamped below
  at 0; neighbours floor(src) and the next one (clamped to the last pixel), weighted by the fraction.

  The source positions are computed in float32, as torch does for the float32 images pytorch-fid feeds it
  (float64 positions differ by up to ~1e-5 of the pixel range when shrinking large images)."""
  f32 = np.float32
  scale = f32(in_len) / f32(out_len)
  src = np.maximum(scale * (np.arange(out_len, dtype=f32) + f32(0.5)) - f32(0.5), f32(0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_len - 1)
  i1 = np.minimum(i0 + 1, in_len - 1)
  frac = src - i0.astype(f32)
  m = np.zeros((out_len, in_len))
  rows = np.arange(out_len)
  np.add.at(m, (rows, i0), (f32(1) - frac).astype(np.float64))
  np.add.at(m, (rows, i1), frac.astype(np.float64))
  return m


def resize_bilinear(x, size: tuple[int, int]):
  """Bilinear resize of an NHWC batch to `size` = (H, W) by two matrix products (see `bilinear_matrix`)."""
  mh = jnp.asarray(bilinear_matrix(x.shape[1], size[0]), x.dtype)
  mw = jnp.asarray(bilinear_matrix(x.shape[2], size[1]), x.dtype)
  x = jnp.einsum("oh,nhwc->nowc", mh, x, precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum("pw,nowc->nopc", mw, x, precision=jax.lax.Precision.HIGHEST)


def make_feature_fn(variables: dict, resize: bool = True):
  """A jitted `fn(images) -> (N, 2048)` for NHWC float images in [0, 1] (resized to 299x299 unless
  `resize` is False, then scaled to [-1, 1])."""
  model = FIDInceptionV3()

  def fn(x):
    if resize:
      x = resize_bilinear(x, (FID_SIZE, FID_SIZE))
    return model.apply(variables, 2.0 * x - 1.0)

  return jax.jit(fn)


def image_features(fn, images, batch_size: int = 16) -> np.ndarray:
  """Features (N, 2048) float64 of uint8 (H, W, 3) images (equal sizes within a batch), batch by batch, with
  `fn` from `make_feature_fn`. The last batch is padded to `batch_size` so `fn` compiles once per size."""
  out = []
  for i in range(0, len(images), batch_size):
    chunk = [np.asarray(im) for im in images[i:i + batch_size]]
    batch = np.stack(chunk).astype(np.float32) / 255.0
    if len(chunk) < batch_size:
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - len(chunk), axis=0)])
    out.append(np.asarray(fn(batch), np.float64)[:len(chunk)])
  return np.concatenate(out) if out else np.zeros((0, 2048))


# ---------------------------------------------------------------- weights
class FIDWeightError(ValueError):
  """The Inception state dict does not fit the network (missing keys or wrong shapes)."""


def convert_weights(state_dict: Mapping) -> dict:
  """Flax variables {"params", "batch_stats"} for `FIDInceptionV3` from the pytorch-fid Inception state dict
  (`<Block>[.<branch>].conv.weight`, `.bn.{weight,bias,running_mean,running_var}`; `fc.*`, `AuxLogits.*`
  and `num_batches_tracked` ignored). Every tensor the network needs must be present with the right shape."""
  params, stats = {}, {}
  for key, value in state_dict.items():
    m = re.fullmatch(r"(?:module\.)?(.+)\.(conv|bn)\.(weight|bias|running_mean|running_var)", key)
    if m is None or m[1].startswith("AuxLogits"):  # the auxiliary classifier is not on the pool3 path
      continue
    w = value.detach().cpu().float().numpy() if hasattr(value, "detach") else np.asarray(value, np.float32)
    path = m[1].split(".")
    layer, kind = m[2], m[3]
    if layer == "conv" and kind == "weight":
      tree, leaf, w = params, "kernel", np.transpose(w, (2, 3, 1, 0))  # OIHW -> HWIO
    elif layer == "bn" and kind in ("weight", "bias"):
      tree, leaf = params, {"weight": "scale", "bias": "bias"}[kind]
    elif layer == "bn":
      tree, leaf = stats, {"running_mean": "mean", "running_var": "var"}[kind]
    else:
      raise FIDWeightError(f"unexpected tensor {key} (the FID Inception convs have no bias)")
    node = tree
    for part in path + [layer]:
      node = node.setdefault(part, {})
    node[leaf] = w
  expected = jax.eval_shape(lambda: FIDInceptionV3().init(jax.random.PRNGKey(0), jnp.zeros((1, 75, 75, 3))))
  got = {"params": params, "batch_stats": stats}
  flat_exp = dict(jax.tree_util.tree_leaves_with_path(expected))
  flat_got = dict(jax.tree_util.tree_leaves_with_path(got))
  missing = [jax.tree_util.keystr(k) for k in flat_exp if k not in flat_got]
  bad = [f"{jax.tree_util.keystr(k)}: {flat_got[k].shape} vs {v.shape}" for k, v in flat_exp.items()
         if k in flat_got and flat_got[k].shape != v.shape]
  if missing or bad:
    raise FIDWeightError(f"Inception weights do not fit: {len(missing)} missing (e.g. {missing[:3]}), "
                         f"{len(bad)} with wrong shapes (e.g. {bad[:3]})")
  extra = [jax.tree_util.keystr(k) for k in flat_got if k not in flat_exp]
  if extra:
    raise FIDWeightError(f"Inception weights have {len(extra)} tensors the network lacks, e.g. {extra[:3]}")
  return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), got)


def load_weights(path) -> dict:
  """Reads the pytorch-fid `pt_inception-2015-12-05-*.pth` (torch.load, weights only) and converts it."""
  from diffssr_jax.models.convert import load_torch_checkpoint
  return convert_weights(load_torch_checkpoint(path))


# ---------------------------------------------------------------- statistics and distance
def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean (D,) and unbiased covariance (D, D) in float64 of (N, D) features (N >= 2)."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"need (N >= 2, D) features, got {f.shape}")
  return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric positive semi-definite matrix (negative rounding-noise
  eigenvalues clipped to 0)."""
  vals, vecs = np.linalg.eigh((s + s.T) / 2)
  return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """Tr((S1 S2)^(1/2)) for covariance matrices. S1 S2 is similar to the PSD matrix S1^(1/2) S2 S1^(1/2)
  (same eigenvalues, all >= 0), so the trace is the sum of the square roots of that matrix's eigenvalues:
  real and defined even for singular covariances (N < D), where sqrtm(S1 S2) needs regularising."""
  root = _psd_sqrt(sigma1)
  m = root @ sigma2 @ root
  vals = np.linalg.eigvalsh((m + m.T) / 2)
  return float(np.sum(np.sqrt(np.clip(vals, 0, None))))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Squared Frechet (2-Wasserstein) distance between N(mu1, S1) and N(mu2, S2):
  |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)) (Dowson & Landau 1982; FID of Heusel et al. 2017)."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
    raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {sigma1.shape}/{sigma2.shape}")
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
  """FID between two feature sets (N1, D), (N2, D)."""
  return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))
