"""The training-tile record: one `tf.train.Example` per HR tile (schema shared by export and pipeline).

Features (all required unless noted):

  image/id        bytes     source image id (file path relative to the input folder, without suffix,
                            or "<split>-<index>" for a TFDS dataset)
  tile/y, tile/x  int64     top-left of the tile in the (scale-trimmed) HR image, in HR pixels
  image/hr_png    bytes     PNG (8-bit RGB) of the HR tile, (h, w, 3)
  image/lr_png    bytes     PNG (8-bit RGB) of the matching LR tile, (h/scale, w/scale, 3): the crop at
                            (y/scale, x/scale) of imresize(whole trimmed HR, 1/scale)
  spe/data        bytes     little-endian float32 SPE of the tile, row-major, (h, w): the crop at (y, x)
                            of the SPE computed on the whole trimmed HR image
  spe/shape       int64[2]  [h, w]
  segments/count  int64     number of regions (SAM masks or superpixels) of the whole image
  image/hr_size   int64[2]  [H, W] of the whole trimmed HR image (extra, optional for readers)

Readable by TensorFlow (`tf.io.parse_single_example`) as well as by `decode_tile` here.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from diffssr_jax import images
from diffssr_jax.data import example


SCHEMA = {
    "image/id": "bytes: source image id",
    "tile/y": "int64: tile top row in the trimmed HR image (HR pixels)",
    "tile/x": "int64: tile left column in the trimmed HR image (HR pixels)",
    "image/hr_png": "bytes: PNG of the HR tile (h, w, 3) uint8",
    "image/lr_png": "bytes: PNG of the LR tile (h/scale, w/scale, 3) uint8 at (y/scale, x/scale)",
    "spe/data": "bytes: little-endian float32 SPE tile, row-major (h, w)",
    "spe/shape": "int64[2]: [h, w]",
    "segments/count": "int64: number of regions of the whole image",
    "image/hr_size": "int64[2]: [H, W] of the whole trimmed HR image",
}


class TileDecodeError(ValueError):
  """A record does not follow the tile schema."""


@dataclasses.dataclass
class Tile:
  """One decoded training tile."""
  image_id: str
  y: int
  x: int
  hr: np.ndarray  # (h, w, 3) uint8
  lr: np.ndarray  # (h/s, w/s, 3) uint8
  spe: np.ndarray  # (h, w) float32
  segments: int = 0
  hr_size: tuple[int, int] | None = None


def encode_tile(tile: Tile, png_level: int = 1) -> bytes:
  """Serialized Example of a tile (deterministic bytes)."""
  spe = np.ascontiguousarray(tile.spe, dtype="<f4")
  if spe.shape != tile.hr.shape[:2]:
    raise ValueError(f"SPE tile {spe.shape} does not match HR tile {tile.hr.shape[:2]}")
  feats = {
      "image/id": tile.image_id.encode("utf-8"),
      "tile/y": int(tile.y),
      "tile/x": int(tile.x),
      "image/hr_png": _png(tile.hr, png_level),
      "image/lr_png": _png(tile.lr, png_level),
      "spe/data": spe.tobytes(),
      "spe/shape": np.asarray(spe.shape, dtype=np.int64),
      "segments/count": int(tile.segments),
  }
  if tile.hr_size is not None:
    feats["image/hr_size"] = np.asarray(tile.hr_size, dtype=np.int64)
  return example.encode_example(feats)


def _png(arr: np.ndarray, level: int) -> bytes:
  import io
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8)).save(buf, format="PNG", compress_level=level)
  return buf.getvalue()


def _one(feats, key, where):
  v = feats.get(key)
  if v is None or len(v) != 1:
    raise TileDecodeError(f"{where}: feature {key!r} missing or not a single value")
  return v[0]


def decode_tile(data: bytes, where: str = "<record>", scale: int | None = None) -> Tile:
  """A Tile from a serialized record; checks shapes (and the LR/HR ratio when `scale` is given)."""
  try:
    f = example.decode_example(data)
  except example.ExampleDecodeError as e:
    raise TileDecodeError(f"{where}: malformed Example ({e})") from None
  hr = images.decode_png(_one(f, "image/hr_png", where), where)
  lr = images.decode_png(_one(f, "image/lr_png", where), where)
  shape = f.get("spe/shape")
  if shape is None or len(shape) != 2:
    raise TileDecodeError(f"{where}: feature 'spe/shape' missing or not [h, w]")
  raw = _one(f, "spe/data", where)
  h, w = int(shape[0]), int(shape[1])
  if len(raw) != 4 * h * w:
    raise TileDecodeError(f"{where}: spe/data has {len(raw)} bytes, expected {4 * h * w} for {h}x{w}")
  spe = np.frombuffer(raw, dtype="<f4").reshape(h, w).astype(np.float32)
  if hr.shape[:2] != (h, w):
    raise TileDecodeError(f"{where}: HR tile {hr.shape[:2]} and SPE {h}x{w} differ")
  if scale is not None and (lr.shape[0] * scale, lr.shape[1] * scale) != hr.shape[:2]:
    raise TileDecodeError(f"{where}: LR tile {lr.shape[:2]} x{scale} does not give HR {hr.shape[:2]}")
  size = f.get("image/hr_size")
  return Tile(
      image_id=_one(f, "image/id", where).decode("utf-8"), y=int(_one(f, "tile/y", where)),
      x=int(_one(f, "tile/x", where)), hr=hr, lr=lr, spe=spe,
      segments=int(f["segments/count"][0]) if len(f.get("segments/count", [])) else 0,
      hr_size=(int(size[0]), int(size[1])) if size is not None and len(size) == 2 else None)
