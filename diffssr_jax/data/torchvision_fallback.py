"""The few torchvision functions segment-anything imports, for machines where torchvision is missing.

segment-anything 1.0 imports `torchvision.ops.boxes.{batched_nms, box_area}` (duplicate-mask removal in
the automatic mask generator) and `torchvision.transforms.functional.{resize, to_pil_image}` (resizing
the input image to the encoder size). `install()` registers small torch/Pillow implementations of
exactly these under the torchvision module names, and only when `import torchvision` fails, so a real
torchvision always wins.

Behaviour matched: NMS keeps boxes in decreasing score order, dropping any whose IoU with an already kept
box of the same category exceeds the threshold; `resize` of a PIL image to (h, w) uses Pillow's bilinear
filter (what torchvision does for PIL inputs); `to_pil_image` of an (H, W, C) uint8 array.
"""
from __future__ import annotations

import sys
import types

import numpy as np


def box_area(boxes):
  """Areas of (N, 4) boxes in (x1, y1, x2, y2) format."""
  return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(a, b):
  """(N, M) IoU matrix of two sets of (x1, y1, x2, y2) boxes."""
  import torch
  lt = torch.maximum(a[:, None, :2], b[None, :, :2])
  rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
  wh = (rb - lt).clamp(min=0)
  inter = wh[..., 0] * wh[..., 1]
  union = box_area(a)[:, None] + box_area(b)[None, :] - inter
  return inter / union


def nms(boxes, scores, iou_threshold: float):
  """Indices (int64, by decreasing score) of boxes kept by greedy non-maximum suppression."""
  import torch
  if boxes.numel() == 0:
    return torch.empty((0,), dtype=torch.int64, device=boxes.device)
  order = torch.sort(scores, descending=True, stable=True).indices
  iou = box_iou(boxes[order], boxes[order]).cpu().numpy()
  suppressed = np.zeros(len(order), dtype=bool)
  keep = []
  for i in range(len(order)):  # greedy: inherently sequential, vectorised over the other boxes
    if suppressed[i]:
      continue
    keep.append(i)
    suppressed |= iou[i] > iou_threshold
  return order[torch.as_tensor(keep, dtype=torch.int64, device=order.device)]


def batched_nms(boxes, scores, idxs, iou_threshold: float):
  """NMS done independently per category `idxs` (boxes of different categories never suppress)."""
  import torch
  if boxes.numel() == 0:
    return torch.empty((0,), dtype=torch.int64, device=boxes.device)
  # Shift each category to its own far-away region so one NMS pass handles all of them.
  offsets = idxs.to(boxes) * (boxes.max() + 1)
  return nms(boxes + offsets[:, None], scores, iou_threshold)


def to_pil_image(pic, mode=None):
  """PIL image of an (H, W[, C]) uint8 numpy array (or a CHW float tensor in [0, 1])."""
  from PIL import Image
  if hasattr(pic, "detach"):  # torch tensor, CHW
    arr = pic.detach().cpu().numpy()
    if arr.ndim == 3:
      arr = np.transpose(arr, (1, 2, 0))
    if arr.dtype != np.uint8:
      arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    pic = arr
  arr = np.asarray(pic)
  if arr.ndim == 3 and arr.shape[2] == 1:
    arr = arr[:, :, 0]
  return Image.fromarray(arr, mode=mode) if mode else Image.fromarray(arr)


def resize(img, size, interpolation=None, max_size=None, antialias=True):
  """Resizes a PIL image to size (h, w), or its shorter side to `size` when an int (bilinear)."""
  from PIL import Image
  if not isinstance(img, Image.Image):
    raise TypeError("torchvision fallback: resize supports PIL images only")
  w, h = img.size
  if isinstance(size, int) or len(size) == 1:
    s = size if isinstance(size, int) else size[0]
    short, long_ = (w, h) if w <= h else (h, w)
    new_short, new_long = s, int(s * long_ / short)
    if max_size is not None and new_long > max_size:
      new_short, new_long = int(max_size * new_short / new_long), max_size
    out_w, out_h = (new_short, new_long) if w <= h else (new_long, new_short)
  else:
    out_h, out_w = int(size[0]), int(size[1])
  return img.resize((out_w, out_h), Image.BILINEAR)


def install() -> bool:
  """Registers the fallback under `torchvision.*` if torchvision cannot be imported; True if it did."""
  if "torchvision" in sys.modules and not getattr(sys.modules["torchvision"], "__diffssr_fallback__", False):
    return False
  try:
    import torchvision  # noqa: F401
    if not getattr(torchvision, "__diffssr_fallback__", False):
      return False
  except ImportError:
    pass
  me = sys.modules[__name__]
  root = types.ModuleType("torchvision")
  root.__diffssr_fallback__ = True
  root.__version__ = "0.0.0+diffssr-fallback"
  ops = types.ModuleType("torchvision.ops")
  boxes = types.ModuleType("torchvision.ops.boxes")
  transforms = types.ModuleType("torchvision.transforms")
  functional = types.ModuleType("torchvision.transforms.functional")
  for name in ("batched_nms", "nms", "box_area", "box_iou"):
    setattr(boxes, name, getattr(me, name))
    setattr(ops, name, getattr(me, name))
  functional.resize = resize
  functional.to_pil_image = to_pil_image
  root.ops, ops.boxes, root.transforms, transforms.functional = ops, boxes, transforms, functional
  sys.modules.update({"torchvision": root, "torchvision.ops": ops, "torchvision.ops.boxes": boxes,
                      "torchvision.transforms": transforms, "torchvision.transforms.functional": functional})
  return True
