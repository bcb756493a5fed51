"""Evaluation images: benchmark folders (Set5, Set14, Urban100, BSDS100, Manga109, General100, DIV2K val).

Two layouts:

* `HRFolder(hr_dir)`: HR images only; each is trimmed to a multiple of the scale and its LR made with
  the MATLAB-bicubic `imresize(hr, 1/scale)` on uint8 (as the official `data_gen/benchmark.py`).
* `PairedFolders(hr_dir, lr_dir)`: HR and LR given; matched by base name, where an LR name may carry a
  scale suffix (`babyx4.png`, `0801x4.png`, `img_001_SRF_4_LR.png` style names are matched by the part
  before the suffix). Unmatched or mis-sized pairs raise `EvalSourceError` listing them.

Each item is an `EvalImage(name, hr uint8, lr uint8, lr_up float32)` with `lr_up = (imresize(lr / 256,
scale) - 0.5) / 0.5` (the official /256 quirk; `lr_up_divisor` changes it). No jax.
"""
from __future__ import annotations

import dataclasses
import pathlib
import re

import numpy as np

from diffssr_jax import images, storage
from diffssr_jax.conventions import make_lr_up, trim_to_scale
from diffssr_jax.data.imresize import imresize


class EvalSourceError(ValueError):
  """A benchmark folder cannot be used as given; the message lists the offending files."""


@dataclasses.dataclass
class EvalImage:
  name: str
  hr: np.ndarray  # (H, W, 3) uint8, H and W multiples of the scale
  lr: np.ndarray  # (H/s, W/s, 3) uint8
  lr_up: np.ndarray  # (H, W, 3) float32, ~[-1, 1]


def _key(p: pathlib.Path, root: pathlib.Path) -> str:
  return p.relative_to(root).with_suffix("").as_posix()


class HRFolder:
  """HR images of a folder; LR made by MATLAB bicubic down-scaling of the scale-trimmed HR."""

  def __init__(self, hr_dir, scale: int = 4, lr_up_divisor: float = 256.0):
    self.root = storage.native(hr_dir)
    self.scale, self.divisor = int(scale), float(lr_up_divisor)
    self.paths = images.list_images(self.root)
    if not self.paths:
      raise EvalSourceError(f"{self.root}: no images")
    self.names = [_key(p, self.root) for p in self.paths]

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> EvalImage:
    hr = trim_to_scale(images.read_rgb8(self.paths[i]), self.scale)
    if hr.shape[0] == 0 or hr.shape[1] == 0:
      raise EvalSourceError(f"{self.paths[i]}: smaller than the scale {self.scale}")
    lr = imresize(hr, 1 / self.scale)
    return EvalImage(self.names[i], np.ascontiguousarray(hr), lr, make_lr_up(lr, self.scale, self.divisor))

  def __iter__(self):
    for i in range(len(self)):
      yield self[i]


def lr_base_name(name: str, scale: int) -> str:
  """An LR file's base name without its scale suffix ('babyx4' -> 'baby', 'img_001_SRF_4_LR' -> 'img_001')."""
  for pat in (rf"[_-]?[xX]{scale}$", rf"_SRF_{scale}_LR$", rf"_LR[xX]?{scale}?$", r"_LR$"):
    stripped = re.sub(pat, "", name)
    if stripped != name:
      return stripped
  return name


def hr_base_name(name: str, scale: int) -> str:
  """An HR file's base name without an '_HR' style suffix ('img_001_SRF_4_HR' -> 'img_001')."""
  for pat in (rf"_SRF_{scale}_HR$", r"_HR$"):
    stripped = re.sub(pat, "", name)
    if stripped != name:
      return stripped
  return name


class PairedFolders:
  """Given HR and LR images, matched by base name; HR trimmed to scale x LR size."""

  def __init__(self, hr_dir, lr_dir, scale: int = 4, lr_up_divisor: float = 256.0):
    self.hr_root, self.lr_root = storage.native(hr_dir), storage.native(lr_dir)
    self.scale, self.divisor = int(scale), float(lr_up_divisor)
    hr = {hr_base_name(_key(p, self.hr_root), scale): p for p in images.list_images(self.hr_root)}
    lr = {lr_base_name(_key(p, self.lr_root), scale): p for p in images.list_images(self.lr_root)}
    only_hr, only_lr = sorted(set(hr) - set(lr)), sorted(set(lr) - set(hr))
    if only_hr or only_lr or not hr:
      raise EvalSourceError(
          f"HR folder {self.hr_root} and LR folder {self.lr_root} do not pair up: "
          f"{len(only_hr)} HR without LR {only_hr[:5]}, {len(only_lr)} LR without HR {only_lr[:5]}")
    self.names = sorted(hr)
    self.pairs = [(hr[n], lr[n]) for n in self.names]

  def __len__(self) -> int:
    return len(self.pairs)

  def __getitem__(self, i: int) -> EvalImage:
    hp, lp = self.pairs[i]
    hr, lr = images.read_rgb8(hp), images.read_rgb8(lp)
    s = self.scale
    want = (lr.shape[0] * s, lr.shape[1] * s)
    if not (want[0] <= hr.shape[0] < want[0] + s and want[1] <= hr.shape[1] < want[1] + s):
      raise EvalSourceError(f"{hp} is {hr.shape[0]}x{hr.shape[1]} but {lp} x{s} is {want[0]}x{want[1]}")
    hr = np.ascontiguousarray(hr[:want[0], :want[1]])
    return EvalImage(self.names[i], hr, lr, make_lr_up(lr, s, self.divisor))

  def __iter__(self):
    for i in range(len(self)):
      yield self[i]


def open_eval_source(hr_dir, lr_dir=None, scale: int = 4, lr_up_divisor: float = 256.0):
  """`PairedFolders` when an LR folder is given, else `HRFolder`."""
  if lr_dir:
    return PairedFolders(hr_dir, lr_dir, scale, lr_up_divisor)
  return HRFolder(hr_dir, scale, lr_up_divisor)
