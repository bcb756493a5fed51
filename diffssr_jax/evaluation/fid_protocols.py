"""Which images the FID Inception sees: pytorch-fid's protocol (ours by default) or pyiqa's (the paper's).

The Inception network and its weights are the same in both (pytorch-fid's `pt_inception-2015-12-05-*.pth`,
evaluation/fid.py); what differs is how an image becomes its 299x299 input:

  pytorch-fid  uint8 / 255, bilinear resize to 299 (torch `interpolate`, no antialiasing), then 2 x - 1
  pyiqa        each channel as a float32 PIL image ('F'), PIL bicubic resize to 299 (antialiased), clipped
               to [0, 255], then (x - 128) / 128: pyiqa's default `mode='clean'` (clean-fid's resize),
               what the official `tools/caculate_iqa.py` computes with `pyiqa.create_metric('fid')`

On images that are not 299x299 the two give different FIDs (downscaling without antialiasing aliases), so
a FID is comparable with the paper's only under `pyiqa`. Written here rather than calling pyiqa: its FID
needs torchvision and pyiqa at run time (see README, "Reproducing the paper"), while this is the same
arithmetic on Pillow and our Inception.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from diffssr_jax.evaluation import fid

PROTOCOLS = ("pytorch-fid", "pyiqa")


def clean_resize(image_u8: np.ndarray, size: int = fid.FID_SIZE) -> np.ndarray:
  """pyiqa's `mode='clean'` resize: (H, W, 3) uint8 -> (size, size, 3) float32 in [0, 255], each channel a
  float PIL image resized bicubically (pyiqa.archs.fid_arch.ResizeDataset)."""
  a = np.asarray(image_u8)
  channels = []
  for c in range(a.shape[2]):
    img = Image.fromarray(a[:, :, c].astype(np.float32))  # 2-D float32: PIL mode 'F'
    img = img.resize((size, size), resample=Image.BICUBIC)
    channels.append(np.asarray(img, np.float32).clip(0, 255))
  return np.stack(channels, axis=-1)


def make_feature_fn(variables: dict, protocol: str = "pytorch-fid"):
  """`fn(batch) -> (N, 2048)` for NHWC float batches of uint8 / 255 (what `fid.image_features` passes), under
  `protocol`."""
  if protocol not in PROTOCOLS:
    raise ValueError(f"--fid_protocol must be one of {PROTOCOLS}, got {protocol!r}")
  if protocol == "pytorch-fid":
    return fid.make_feature_fn(variables)
  inner = fid.make_feature_fn(variables, resize=False)  # maps x to 2 x - 1

  def fn(batch):
    u8 = np.rint(np.asarray(batch, np.float64) * 255.0).clip(0, 255).astype(np.uint8)
    resized = np.stack([clean_resize(im) for im in u8])
    return inner(resized / np.float32(256.0))  # 2 (x / 256) - 1 = (x - 128) / 128, pyiqa's normalisation

  return fn
