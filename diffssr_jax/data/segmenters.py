"""Region segmenters for the SPE export: Segment Anything (torch) and classical ones (scikit-image).

A segmenter is a callable `seg(image_u8 (H, W, 3)) -> Segmentation` with a `describe()` dict recorded in
the export manifest. `Segmentation` holds either overlapping masks in painting order (SAM) or a label
map of disjoint regions (classical), so a 2K image split into thousands of superpixels never needs a
(K, H, W) mask stack.

SAM: `SamAutomaticMaskGenerator` with segment-anything's defaults (those of its `scripts/amg.py`, which
the official SAM-DiffSR data used with vit_h): 32 points per side, pred_iou_thresh 0.88,
stability_score_thresh 0.95, box_nms_thresh 0.7, no crops, min_mask_region_area 0. Masks keep the
generator's order (the order of the official mask JSON files). No jax here: this module runs in the
torch-only export tool.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np

from diffssr_jax import fileio, storage

SAM_DEFAULTS = dict(
    points_per_side=32, points_per_batch=64, pred_iou_thresh=0.88, stability_score_thresh=0.95,
    stability_score_offset=1.0, box_nms_thresh=0.7, crop_n_layers=0, crop_nms_thresh=0.7,
    crop_overlap_ratio=512 / 1500, crop_n_points_downscale_factor=1, min_mask_region_area=0)
SAM_MODEL_TYPES = ("vit_h", "vit_l", "vit_b")
SAM_CHECKPOINT_NAMES = {"vit_h": "sam_vit_h_4b8939.pth", "vit_l": "sam_vit_l_0b3195.pth",
                        "vit_b": "sam_vit_b_01ec64.pth"}


class SegmenterError(RuntimeError):
  """A segmenter could not be set up (missing weights, wrong checkpoint, missing package)."""


@dataclasses.dataclass
class Segmentation:
  """Regions of one image: `masks` (K, H, W) bool in painting order, or `labels` (H, W) int (-1 = none)."""
  masks: np.ndarray | None = None
  labels: np.ndarray | None = None

  @property
  def shape(self) -> tuple[int, int]:
    return tuple(self.labels.shape) if self.labels is not None else tuple(self.masks.shape[1:])

  @property
  def count(self) -> int:
    if self.labels is not None:
      return int(len(np.unique(self.labels[self.labels >= 0])))
    return int(self.masks.shape[0])

  def to_masks(self) -> np.ndarray:
    """(K, H, W) bool masks (one per label, in label order, for a label map)."""
    if self.masks is not None:
      return self.masks
    ids = np.unique(self.labels[self.labels >= 0])
    return self.labels[None] == ids[:, None, None]

  def crop(self, h: int, w: int) -> "Segmentation":
    """The regions restricted to the top-left (h, w) of the image."""
    if self.labels is not None:
      return Segmentation(labels=self.labels[:h, :w])
    return Segmentation(masks=self.masks[:, :h, :w])


def compute_segmentation_spe(seg: Segmentation, kind: str, rng=None) -> np.ndarray:
  """The (H, W) float32 SPE of a segmentation (label maps take the fast bincount path)."""
  from diffssr_jax.data import spe
  if seg.labels is not None:
    out = spe.compute_spe_labels(seg.labels, kind, rng=rng)
  else:
    out = spe.compute_spe(seg.masks, kind, rng=rng)
  return out.astype(np.float32)


# --- classical ---

class FelzenszwalbSegmenter:
  """scikit-image's Felzenszwalb-Huttenlocher graph segmentation (no weights needed)."""
  name = "felzenszwalb"

  def __init__(self, scale: float = 200.0, sigma: float = 0.8, min_size: int = 100):
    self.scale, self.sigma, self.min_size = float(scale), float(sigma), int(min_size)

  def __call__(self, image: np.ndarray) -> Segmentation:
    from skimage.segmentation import felzenszwalb
    labels = felzenszwalb(image, scale=self.scale, sigma=self.sigma, min_size=self.min_size)
    return Segmentation(labels=labels.astype(np.int32))

  def describe(self) -> dict:
    return {"name": self.name, "scale": self.scale, "sigma": self.sigma, "min_size": self.min_size}


class SlicSegmenter:
  """scikit-image's SLIC superpixels (compact, roughly equal-size regions)."""
  name = "slic"

  def __init__(self, n_segments: int = 200, compactness: float = 10.0, sigma: float = 1.0):
    self.n_segments, self.compactness, self.sigma = int(n_segments), float(compactness), float(sigma)

  def __call__(self, image: np.ndarray) -> Segmentation:
    from skimage.segmentation import slic
    labels = slic(image, n_segments=self.n_segments, compactness=self.compactness, sigma=self.sigma,
                  start_label=0, channel_axis=-1)
    return Segmentation(labels=labels.astype(np.int32))

  def describe(self) -> dict:
    return {"name": self.name, "n_segments": self.n_segments, "compactness": self.compactness,
            "sigma": self.sigma}


# --- Segment Anything ---

def import_segment_anything():
  """Imports segment_anything, providing our torchvision fallback when torchvision is missing."""
  from diffssr_jax.data import torchvision_fallback
  torchvision_fallback.install()
  try:
    import segment_anything
  except ImportError as e:
    raise SegmenterError(f"segment-anything is not installed ({e}); pip install segment-anything") from None
  return segment_anything


def default_device() -> str:
  import torch
  return "cuda" if torch.cuda.is_available() else "cpu"


def check_checkpoint_file(checkpoint) -> pathlib.Path:
  """The checkpoint path, or a SegmenterError saying where the weights come from."""
  path = storage.native(checkpoint)
  if not path.is_file():
    raise SegmenterError(f"SAM checkpoint {path} not found (download e.g. {SAM_CHECKPOINT_NAMES['vit_h']} "
                         "from the segment-anything release and pass --checkpoint)")
  return path


def load_sam_weights(model, checkpoint) -> None:
  """Loads a SAM state_dict file into `model`, with errors that say what does not fit and why."""
  import torch
  path = check_checkpoint_file(checkpoint)
  try:
    if storage.is_remote(path):  # torch reads a file object as well as a file name
      with path.open("rb") as f:
        state = torch.load(f, map_location="cpu", weights_only=True)
    else:
      state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise SegmenterError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
  if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
    state = state["model"]
  if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
    raise SegmenterError(f"{path}: expected a SAM state_dict (parameter name -> tensor)")
  own = model.state_dict()
  missing = sorted(set(own) - set(state))
  unexpected = sorted(set(state) - set(own))
  mismatched = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in sorted(set(own) & set(state))
                if tuple(state[k].shape) != tuple(own[k].shape)]
  if missing or unexpected or mismatched:
    parts = []
    if missing:
      parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
      parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if mismatched:
      k, a, b = mismatched[0]
      parts.append(f"{len(mismatched)} shape mismatches (e.g. {k}: file {a} vs model {b})")
    raise SegmenterError(f"{path} does not fit this SAM model: " + "; ".join(parts)
                         + " -- is it a checkpoint of another model type (--model-type)?")
  model.load_state_dict(state)


def build_sam(model_type: str, checkpoint, device: str | None = None):
  """A SAM model of `model_type` (vit_h / vit_l / vit_b) with weights from a local file, in eval mode."""
  sa = import_segment_anything()
  if model_type not in SAM_MODEL_TYPES:
    raise SegmenterError(f"unknown SAM model type {model_type!r}; expected one of {SAM_MODEL_TYPES}")
  check_checkpoint_file(checkpoint)  # fail before spending seconds building a ViT-H
  model = sa.sam_model_registry[model_type](checkpoint=None)
  load_sam_weights(model, checkpoint)
  return model.to(device or default_device()).eval()


class SamSegmenter:
  """Segment Anything's automatic mask generator as a segmenter (masks in generator order).

  Pass `model_type` + `checkpoint`, or an already built `model` (e.g. a custom architecture loaded with
  `load_sam_weights`). Extra keyword arguments override `SAM_DEFAULTS`.
  """
  name = "sam"

  def __init__(self, checkpoint=None, model_type: str = "vit_h", device: str | None = None, model=None,
               **amg_kwargs):
    unknown = set(amg_kwargs) - set(SAM_DEFAULTS)
    if unknown:
      raise SegmenterError(f"unknown SAM generator options {sorted(unknown)}")
    self.params = {**SAM_DEFAULTS, **amg_kwargs}
    if self.params["min_mask_region_area"] > 0:
      try:
        import cv2  # noqa: F401  (segment-anything's small-region removal needs OpenCV)
      except ImportError:
        raise SegmenterError("min_mask_region_area > 0 needs opencv-python (cv2)") from None
    self.device = device or default_device()
    self.model_type = model_type if model is None else "custom"
    self.checkpoint = None if checkpoint is None else str(checkpoint)
    if model is None:
      if checkpoint is None:
        raise SegmenterError("SamSegmenter needs a checkpoint file (--checkpoint) or a model")
      model = build_sam(model_type, checkpoint, self.device)
    else:
      model = model.to(self.device).eval()
    self._checkpoint_sha = None
    sa = import_segment_anything()
    self.generator = sa.SamAutomaticMaskGenerator(model, output_mode="binary_mask", **self.params)

  def __call__(self, image: np.ndarray) -> Segmentation:
    import torch
    with torch.inference_mode():
      anns = self.generator.generate(np.ascontiguousarray(image))
    h, w = image.shape[:2]
    if not anns:
      return Segmentation(masks=np.zeros((0, h, w), dtype=bool))
    return Segmentation(masks=np.stack([np.asarray(a["segmentation"], dtype=bool) for a in anns]))

  def describe(self) -> dict:
    d = {"name": self.name, "model_type": self.model_type, "params": dict(self.params)}
    if self.checkpoint is not None:
      if self._checkpoint_sha is None:
        self._checkpoint_sha = fileio.file_sha256(self.checkpoint)
      d["checkpoint"] = os.path.basename(self.checkpoint)
      d["checkpoint_sha256"] = self._checkpoint_sha
    return d


class FromLR:
  """A segmenter applied to the LR image instead of the HR one (the paper's Table 3 ablation: masks from LR
  vs HR images): the HR image is made LR as the training data is (MATLAB bicubic, 1/scale) and brought back to
  the HR size with MATLAB bicubic, so the masks (and the SPE) keep the HR grid the tiles are cut on. Which
  up-sampling the paper used is not known here; this one is the `lr_up` the model itself is given (up to the
  official /256 scaling, which does not change the image a segmenter sees)."""

  def __init__(self, segmenter, scale: int):
    self.segmenter, self.scale = segmenter, int(scale)

  def __call__(self, image):
    from diffssr_jax.data.imresize import imresize
    h, w = image.shape[:2]
    if h % self.scale or w % self.scale:
      raise ValueError(f"image {h}x{w} is not trimmed to a multiple of the scale {self.scale}")
    return self.segmenter(imresize(imresize(image, 1 / self.scale), self.scale))

  def describe(self) -> dict:
    return {**self.segmenter.describe(), "mask_source": "lr", "mask_source_scale": self.scale}


def make_segmenter(name: str, **kwargs):
  """Segmenter by name: 'sam' (needs checkpoint=...), 'felzenszwalb' or 'slic'."""
  if name == "sam":
    return SamSegmenter(**kwargs)
  if name == "felzenszwalb":
    return FelzenszwalbSegmenter(**kwargs)
  if name == "slic":
    return SlicSegmenter(**kwargs)
  raise SegmenterError(f"unknown segmenter {name!r}; expected sam, felzenszwalb or slic")
