"""LPIPS v0.1 (Zhang et al., CVPR 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric") in Flax linen, NHWC, with the AlexNet or VGG16 backbone, loaded from weight files the user supplies.

Nothing is downloaded. Two files are needed:
* the backbone, as a torchvision state dict (`alexnet-owt-7be5be79.pth` / `vgg16-397923af.pth`: keys
  `features.<i>.weight|bias`; `classifier.*` is ignored) or the `net.slice<k>.<i>.*` keys of a saved LPIPS
  module;
* the LPIPS linear calibration layers (`weights/v0.1/alex.pth` / `vgg.pth` of the authors' release: keys
  `lin<k>.model.1.weight`, shape (1, C_k, 1, 1)).

The distance: inputs in [-1, 1] are shifted and scaled per channel ((x - shift) / scale, the release's
ScalingLayer), both images go through the backbone, the five ReLU outputs are unit-normalised along
channels (eps 1e-10 added to the norm), squared differences are weighted per channel by the non-negative
linear layers (a 1x1 conv to one channel), averaged over space and summed over the five layers.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# ScalingLayer constants of the LPIPS release (ImageNet mean/std expressed for inputs in [-1, 1]).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10

# Backbone layers by torchvision `features` index: ("conv", idx, out_channels, kernel, stride, pad),
# ("pool", kernel, stride), ("tap",) marks a ReLU output used by LPIPS (ReLU follows every conv).
ALEX_LAYERS = (
    ("conv", 0, 64, 11, 4, 2), ("tap",),
    ("pool", 3, 2), ("conv", 3, 192, 5, 1, 2), ("tap",),
    ("pool", 3, 2), ("conv", 6, 384, 3, 1, 1), ("tap",),
    ("conv", 8, 256, 3, 1, 1), ("tap",),
    ("conv", 10, 256, 3, 1, 1), ("tap",),
)
VGG16_LAYERS = (
    ("conv", 0, 64, 3, 1, 1), ("conv", 2, 64, 3, 1, 1), ("tap",),
    ("pool", 2, 2), ("conv", 5, 128, 3, 1, 1), ("conv", 7, 128, 3, 1, 1), ("tap",),
    ("pool", 2, 2), ("conv", 10, 256, 3, 1, 1), ("conv", 12, 256, 3, 1, 1), ("conv", 14, 256, 3, 1, 1), ("tap",),
    ("pool", 2, 2), ("conv", 17, 512, 3, 1, 1), ("conv", 19, 512, 3, 1, 1), ("conv", 21, 512, 3, 1, 1), ("tap",),
    ("pool", 2, 2), ("conv", 24, 512, 3, 1, 1), ("conv", 26, 512, 3, 1, 1), ("conv", 28, 512, 3, 1, 1), ("tap",),
)
BACKBONES = {"alex": ALEX_LAYERS, "vgg": VGG16_LAYERS}


def tap_channels(net: str) -> tuple[int, ...]:
  """Channels of the five feature maps LPIPS compares (alex: 64,192,384,256,256; vgg: 64,128,256,512,512)."""
  layers = BACKBONES[net]
  out, last = [], None
  for layer in layers:
    if layer[0] == "conv":
      last = layer[2]
    elif layer[0] == "tap":
      out.append(last)
  return tuple(out)


class Backbone(nn.Module):
  """The truncated torchvision feature extractor (AlexNet or VGG16 `features`), returning the ReLU outputs
  LPIPS taps. Convs are named `features_<torchvision index>`; pooling is max, 'VALID', floor."""
  layers: tuple

  @nn.compact
  def __call__(self, x) -> list[jnp.ndarray]:
    taps = []
    for layer in self.layers:
      if layer[0] == "conv":
        _, idx, feats, k, s, p = layer
        x = nn.Conv(feats, (k, k), strides=(s, s), padding=((p, p), (p, p)), name=f"features_{idx}")(x)
        x = jax.nn.relu(x)
      elif layer[0] == "pool":
        _, k, s = layer
        x = nn.max_pool(x, (k, k), strides=(s, s), padding="VALID")
      else:
        taps.append(x)
    return taps


def normalize_channels(x, eps: float = NORM_EPS):
  """x / (||x||_2 over channels + eps): LPIPS' unit-length feature normalisation (NHWC)."""
  return x / (jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)) + eps)


class LPIPS(nn.Module):
  """LPIPS v0.1 distance between two NHWC batches in [-1, 1], returning (N,) (the release's `spatial=True`
  per-pixel maps are not provided). Params: `backbone/features_<i>`, `lin<k>` (1x1 conv, no bias)."""
  net: str = "alex"

  def setup(self):
    self.backbone = Backbone(BACKBONES[self.net])
    self.lins = [nn.Conv(1, (1, 1), use_bias=False, name=f"lin{k}") for k in range(5)]

  def features(self, x):
    shift = jnp.asarray(LPIPS_SHIFT, x.dtype)
    scale = jnp.asarray(LPIPS_SCALE, x.dtype)
    return self.backbone((x - shift) / scale)

  def __call__(self, x0, x1):
    f0, f1 = self.features(x0), self.features(x1)
    total = 0.0
    for lin, a, b in zip(self.lins, f0, f1):
      d = (normalize_channels(a) - normalize_channels(b)) ** 2
      total = total + jnp.mean(lin(d), axis=(1, 2, 3))  # spatial average of the 1-channel map
    return total


# ---------------------------------------------------------------- weights
class LPIPSWeightError(ValueError):
  """A weight file lacks a tensor LPIPS needs or has it in the wrong shape."""


def _numpy(x) -> np.ndarray:
  return x.detach().cpu().float().numpy() if hasattr(x, "detach") else np.asarray(x, np.float32)


def _backbone_key(key: str) -> str | None:
  """torchvision `features.<i>.<p>` (optionally behind a `module.` or `net.` prefix) or the LPIPS module's
  `net.slice<k>.<i>.<p>` -> `features.<i>.<p>`; None for anything else."""
  key = re.sub(r"^(module\.)?", "", key)
  if m := re.fullmatch(r"(?:net\.)?slice\d+\.(\d+)\.(weight|bias)", key):
    return f"features.{m[1]}.{m[2]}"
  if m := re.fullmatch(r"(?:net\.)?features\.(\d+)\.(weight|bias)", key):
    return f"features.{m[1]}.{m[2]}"
  return None


def convert_weights(net: str, backbone_sd: Mapping, lin_sd: Mapping) -> dict:
  """Flax params {"params": ...} for `LPIPS(net)` from a torchvision-layout backbone state dict and the
  LPIPS linear-layer state dict (torch tensors or arrays). Conv OIHW -> HWIO; lin (1, C, 1, 1) -> (1, 1, C, 1).
  Checks every needed key and shape; extra keys (classifier, other layers) are ignored."""
  if net not in BACKBONES:
    raise ValueError(f"unknown LPIPS backbone {net!r}; choose from {sorted(BACKBONES)}")
  feats = {}
  for k, v in backbone_sd.items():
    if (name := _backbone_key(k)) is not None:
      feats[name] = _numpy(v)
  backbone, in_ch = {}, 3
  for layer in BACKBONES[net]:
    if layer[0] != "conv":
      continue
    _, idx, out_ch, ksize, _, _ = layer
    w, b = feats.get(f"features.{idx}.weight"), feats.get(f"features.{idx}.bias")
    if w is None or b is None:
      raise LPIPSWeightError(f"{net} backbone: missing features.{idx}.weight/bias")
    if w.shape != (out_ch, in_ch, ksize, ksize) or b.shape != (out_ch,):
      raise LPIPSWeightError(f"{net} backbone: features.{idx} has {w.shape}/{b.shape}, expected "
                             f"{(out_ch, in_ch, ksize, ksize)}/{(out_ch,)} (wrong network?)")
    backbone[f"features_{idx}"] = {"kernel": np.transpose(w, (2, 3, 1, 0)), "bias": b}
    in_ch = out_ch
  params = {"backbone": backbone}
  lins = {}
  for k, v in lin_sd.items():
    if m := re.fullmatch(r"(?:module\.)?lin(\d)\.(?:model\.1\.)?weight", k):
      lins[int(m[1])] = _numpy(v)
  for k, ch in enumerate(tap_channels(net)):
    if k not in lins:
      raise LPIPSWeightError(f"{net} linear layers: missing lin{k}.model.1.weight")
    if lins[k].shape != (1, ch, 1, 1):
      raise LPIPSWeightError(f"{net} linear layers: lin{k} has shape {lins[k].shape}, expected {(1, ch, 1, 1)}")
    params[f"lin{k}"] = {"kernel": np.transpose(lins[k], (2, 3, 1, 0))}
  return {"params": jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)}


def load_weights(net: str, backbone_path, lin_path) -> dict:
  """Reads the two `.pth` files (torch.load, weights only: no pickled code runs) and converts them."""
  from diffssr_jax.models.convert import load_torch_checkpoint
  return convert_weights(net, load_torch_checkpoint(backbone_path), load_torch_checkpoint(lin_path))


def make_lpips_fn(net: str, params: dict):
  """A jitted `fn(x0, x1) -> (N,)` LPIPS distance for NHWC float batches in [-1, 1]."""
  model = LPIPS(net)
  return jax.jit(lambda a, b: model.apply(params, a, b))


def uint8_to_signed(img: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1] as x / 127.5 - 1 (the official Measure's LPIPS input)."""
  return np.asarray(img, np.float32) / 127.5 - 1.0


def lpips_images(fn, sr: Sequence[np.ndarray] | np.ndarray, hr: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
  """LPIPS of uint8 (H, W, 3) image pairs (or (N, H, W, 3) batches of equal size) with `fn` from
  `make_lpips_fn`; returns float64 (N,)."""
  sr, hr = np.asarray(sr), np.asarray(hr)
  if sr.ndim == 3:
    sr, hr = sr[None], hr[None]
  if sr.shape != hr.shape:
    raise ValueError(f"image shapes differ: {sr.shape} vs {hr.shape}")
  return np.asarray(fn(uint8_to_signed(sr), uint8_to_signed(hr)), np.float64)
