"""SPE maps of test images from saved masks: what a SAM+SRDiff model (`model.cond_sam`, Table 7) is given at
test time, where SAM-DiffSR itself needs no masks.

The masks are the mask export's (`tools/export_sam_masks.py --keep_masks` run on the test set's HR images, with
`--mask_source hr|lr` as for the training data): `<DIR>/masks/<image name>.json` (COCO RLE), named as the
evaluation names its images (the path below the dataset folder without its suffix), at the size of the
image trimmed to the scale. DIR may also be that masks folder itself. The SPE kind (and the seed of the random
`linear` kind) is read from DIR/manifest.json when there is one, else the paper's `rope`. The map is computed
on the whole trimmed image, as the export computes the training tiles' maps (`data.export.image_records`).

`diffssr-upscale` has LR inputs only: their masks (the export run on the input images themselves, --scale 1)
are at the LR size and are brought to the HR grid by repeating each pixel (`lr_scale`), then E is computed at
the HR size; masks already at the HR size are used as they are. No jax.
"""
from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping

import numpy as np

from diffssr_jax import storage
from diffssr_jax.errors import UserError
from diffssr_jax.data import rle
from diffssr_jax.data import spe as spe_lib


class SpeMaskError(UserError, ValueError):
  """The masks of a test image cannot be used; the message names the image and the file."""


def _export_settings(root: pathlib.Path) -> tuple[str, int]:
  """(spe kind, seed) of the export whose manifest is root/manifest.json; ("rope", 0) without one."""
  man = root / "manifest.json"
  if not man.is_file():
    return "rope", 0
  try:
    splits = json.loads(man.read_text()).get("splits", {})
    found = {(s["config"].get("spe_kind", "rope"), int(s["config"].get("seed", 0))) for s in splits.values()}
  except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
    raise SpeMaskError(f"{man}: not a mask export manifest ({type(e).__name__}: {e})") from None
  if len(found) > 1:
    raise SpeMaskError(f"{man}: its splits use different SPE settings {sorted(found)}")
  return found.pop() if found else ("rope", 0)


def _mask_size(path: pathlib.Path) -> tuple[int, int] | None:
  """(H, W) of a mask file's masks from its RLE headers (nothing decoded), None when it holds no mask."""
  try:
    entries = json.loads(path.read_text())
    if not isinstance(entries, list):
      raise ValueError("expected a JSON list of masks")
    if not entries:
      return None
    first = entries[0].get("segmentation", entries[0]) if isinstance(entries[0], dict) else entries[0]
    h, w = first["size"]
    return int(h), int(w)
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise SpeMaskError(f"{path}: cannot read as a mask file ({type(e).__name__}: {e})") from None


class SpeMasks:
  """The saved masks of one test set: `check` them all before any sampling, then `spe(name, hw)` per image."""

  def __init__(self, directory):
    root = storage.native(directory)
    if not root.is_dir():
      raise SpeMaskError(f"{root}: no such folder (--spe_masks takes the mask export's output for the test set)")
    self.root = root
    self.masks_dir = root / "masks" if (root / "masks").is_dir() else root
    self.kind, self.seed = _export_settings(root)

  def path(self, name: str) -> pathlib.Path:
    return self.masks_dir / f"{name}.json"

  def _fits(self, size, hw, lr_scale) -> bool:
    (mh, mw), (h, w) = size, hw
    return (mh >= h and mw >= w) or (lr_scale is not None and (mh * lr_scale, mw * lr_scale) == (h, w))

  def check(self, names, hr_shapes, lr_scale: int | None = None) -> None:
    """Every image has a mask file whose masks cover its (trimmed) HR size `hr_shapes[i]` (or, with `lr_scale`,
    are exactly its LR size), or an error naming the first that has not (read from the files' headers, nothing
    decoded)."""
    for name, (h, w) in zip(names, hr_shapes):
      path = self.path(name)
      if not path.is_file():
        raise SpeMaskError(f"{path}: no masks for image {name!r} (run the mask export with --keep_masks on these "
                           "images; images too small for one export tile get none)")
      size = _mask_size(path)
      if size is not None and not self._fits(size, (h, w), lr_scale):
        lr = f" or {h // lr_scale}x{w // lr_scale} (LR)" if lr_scale else ""
        raise SpeMaskError(f"{path}: masks are {size[0]}x{size[1]}, image {name!r} needs {h}x{w} (HR, trimmed to "
                           f"the scale){lr}; were they exported from another image or scale?")

  def spe(self, name: str, hw: tuple[int, int], lr_scale: int | None = None) -> np.ndarray:
    """The (H, W) float32 SPE map of image `name` at its trimmed HR size `hw`; with `lr_scale`, masks of the LR
    size (H / lr_scale, W / lr_scale) are first repeated to the HR grid."""
    h, w = hw
    path = self.path(name)
    try:
      masks = rle.read_mask_file(path)
    except rle.RLEError as e:
      raise SpeMaskError(str(e)) from None
    if masks.shape[0] == 0:
      return np.zeros((h, w), np.float32)
    if not self._fits(masks.shape[1:], hw, lr_scale):
      raise SpeMaskError(f"{path}: masks are {masks.shape[1]}x{masks.shape[2]}, image {name!r} is {h}x{w}")
    if masks.shape[1] < h:  # LR-size masks (see the module doc)
      masks = np.repeat(np.repeat(masks, lr_scale, axis=1), lr_scale, axis=2)
    rng = None
    if self.kind == "linear":
      from diffssr_jax.data.export import image_seed  # the export's per-image seed
      rng = np.random.RandomState(image_seed(self.seed, name))
    return spe_lib.compute_spe(masks[:, :h, :w], self.kind, rng=rng).astype(np.float32)

  def describe(self) -> dict:
    return {"spe_masks": str(self.root), "spe_kind": self.kind}


def check_flag(spe_masks: Mapping[str, str] | None, datasets, needs_spe: bool, model_source: str | None
               ) -> dict[str, str]:
  """The evaluation's --spe_masks ({dataset: masks folder}) when the masks and the model go together (a
  SAM+SRDiff model's diffusion row needs masks for every dataset, any other run none), else a one-line
  `SpeMaskError` naming the flag or the dataset. `needs_spe`: whether the run samples such a model."""
  spe_masks = dict(spe_masks or {})
  if spe_masks and not needs_spe:
    raise SpeMaskError("--spe_masks is only for the diffusion row of a SAM+SRDiff model (model.cond_sam); this "
                       "run samples none")
  unknown = sorted(set(spe_masks) - set(datasets))
  if unknown:
    raise SpeMaskError(f"--spe_masks names datasets not in --datasets: {unknown}")
  missing = [d for d in datasets if d not in spe_masks] if needs_spe else []
  if missing:
    raise SpeMaskError(f"--spe_masks: no masks for dataset {missing[0]} ({model_source or 'the model'} is a "
                       f"SAM+SRDiff model, model.cond_sam, and needs every test image's masks: "
                       f"--spe_masks {missing[0]}=MASK_EXPORT_DIR)")
  return spe_masks
