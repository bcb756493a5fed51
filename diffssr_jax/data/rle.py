"""COCO run-length encoding of binary masks (numpy only), as written by SAM's `amg.py --convert-to-rle`.

A mask (H, W) is read in column-major order (down the columns, the COCO convention) and stored as
alternating run lengths starting with a run of zeros (possibly empty). The compressed string form
(`pycocotools` `rleToString`) writes each count as 5-bit groups, least significant first, with bit 0x20
meaning "more groups follow", as signed values offset by 48 into printable ASCII; from the fourth count
on, each count is stored as the difference to the count two places earlier. We implement both
directions ourselves so mask files can be written and read (including the official SAM-DiffSR mask
downloads) without pycocotools.

Mask files (`--keep-masks`): one JSON list per image, in painting order, each entry
`{"segmentation": {"size": [H, W], "counts": "<compressed>"}, "area": int}` (the amg.py layout).
"""
from __future__ import annotations

import json
import pathlib

import numpy as np

from diffssr_jax import fileio, storage


class RLEError(ValueError):
  """A run-length encoding is malformed or does not match its size."""


def mask_to_counts(mask: np.ndarray) -> list[int]:
  """Column-major run lengths of a (H, W) mask, starting with the zeros run."""
  flat = np.asarray(mask, dtype=bool).T.ravel()
  if flat.size == 0:
    return [0]
  change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
  bounds = np.concatenate([[0], change, [flat.size]])
  runs = np.diff(bounds).tolist()
  return ([0] + runs) if flat[0] else runs


def counts_to_mask(counts, size) -> np.ndarray:
  """Inverse of `mask_to_counts` for a mask of size (H, W)."""
  h, w = (int(s) for s in size)
  counts = np.asarray(counts, dtype=np.int64)
  if counts.size and (counts < 0).any():
    raise RLEError("negative run length")
  if int(counts.sum()) != h * w:
    raise RLEError(f"run lengths sum to {int(counts.sum())}, expected {h * w} for size {h}x{w}")
  values = np.zeros(counts.size, dtype=bool)
  values[1::2] = True
  flat = np.repeat(values, counts)
  return flat.reshape(w, h).T.copy()


def counts_to_string(counts) -> str:
  """pycocotools' compressed counts string."""
  out = bytearray()
  counts = [int(c) for c in counts]
  for i, c in enumerate(counts):
    x = c - counts[i - 2] if i > 2 else c
    more = True
    while more:
      ch = x & 0x1F
      x >>= 5  # arithmetic shift keeps the sign
      more = (x != -1) if (ch & 0x10) else (x != 0)
      if more:
        ch |= 0x20
      out.append(ch + 48)
  return out.decode("ascii")


def string_to_counts(s: str) -> list[int]:
  """Inverse of `counts_to_string`."""
  data = s.encode("ascii") if isinstance(s, str) else bytes(s)
  counts: list[int] = []
  p = 0
  while p < len(data):
    x = 0
    k = 0
    more = True
    while more:
      if p >= len(data):
        raise RLEError("truncated RLE string")
      c = data[p] - 48
      if not 0 <= c < 64:
        raise RLEError(f"invalid character {chr(data[p])!r} in RLE string")
      x |= (c & 0x1F) << (5 * k)
      more = bool(c & 0x20)
      p += 1
      k += 1
      if not more and (c & 0x10):
        x |= -1 << (5 * k)
    if len(counts) > 2:
      x += counts[-2]
    counts.append(x)
  return counts


def encode(mask: np.ndarray) -> dict:
  """{'size': [H, W], 'counts': str} of a binary mask."""
  mask = np.asarray(mask)
  return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts_to_string(mask_to_counts(mask))}


def decode(rle: dict) -> np.ndarray:
  """(H, W) bool mask from a compressed (str) or uncompressed (list) COCO RLE dict."""
  try:
    size, counts = rle["size"], rle["counts"]
  except (KeyError, TypeError):
    raise RLEError(f"not an RLE dict: {str(rle)[:80]}") from None
  if isinstance(counts, (str, bytes)):
    counts = string_to_counts(counts)
  return counts_to_mask(counts, size)


def area(rle: dict) -> int:
  """Number of set pixels, without decoding the mask."""
  counts = rle["counts"]
  if isinstance(counts, (str, bytes)):
    counts = string_to_counts(counts)
  return int(sum(counts[1::2]))


def write_mask_file(path, masks) -> None:
  """Writes (K, H, W) masks as an amg.py-style JSON list, atomically."""
  path = storage.native(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  entries = []
  for m in masks:
    r = encode(m)
    entries.append({"segmentation": r, "area": int(np.count_nonzero(m))})
  fileio.atomic_write(path, json.dumps(entries, separators=(",", ":")))


def read_mask_file(path) -> np.ndarray:
  """(K, H, W) bool masks of an amg.py-style JSON file (list of {'segmentation': rle, ...} or of rles)."""
  path = storage.native(path)
  try:
    entries = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise RLEError(f"{path}: cannot read mask file ({e})") from None
  if not isinstance(entries, list):
    raise RLEError(f"{path}: expected a JSON list of masks")
  masks = []
  for i, e in enumerate(entries):
    r = e.get("segmentation", e) if isinstance(e, dict) else e
    try:
      masks.append(decode(r))
    except RLEError as err:
      raise RLEError(f"{path}: mask {i}: {err}") from None
  if not masks:
    return np.zeros((0, 0, 0), dtype=bool)
  shapes = {m.shape for m in masks}
  if len(shapes) != 1:
    raise RLEError(f"{path}: masks of different sizes {sorted(shapes)}")
  return np.stack(masks)
