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

Readable by TensorFlow (`tf.io.parse_single_example`) as well as by `decode_tile` here. The message
classes are tensorflow-datasets' copy of TensorFlow's example.proto/feature.proto, generated for use
without TensorFlow (same field numbers, so the bytes are those TensorFlow writes and reads); importing it
loads tfds' package (~0.5 s) but neither TensorFlow nor jax.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from google.protobuf import message as pb_message
from tensorflow_datasets.proto import tf_example_pb2

from diffssr_jax import images


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
  """Serialized Example of a tile (deterministic bytes: features sorted by name)."""
  spe = np.ascontiguousarray(tile.spe, dtype="<f4")
  if spe.shape != tile.hr.shape[:2]:
    raise ValueError(f"SPE tile {spe.shape} does not match HR tile {tile.hr.shape[:2]}")
  ex = tf_example_pb2.Example()
  f = ex.features.feature
  f["image/id"].bytes_list.value.append(tile.image_id.encode("utf-8"))
  f["tile/y"].int64_list.value.append(int(tile.y))
  f["tile/x"].int64_list.value.append(int(tile.x))
  f["image/hr_png"].bytes_list.value.append(images.encode_png(np.asarray(tile.hr, np.uint8), png_level))
  f["image/lr_png"].bytes_list.value.append(images.encode_png(np.asarray(tile.lr, np.uint8), png_level))
  f["spe/data"].bytes_list.value.append(spe.tobytes())
  f["spe/shape"].int64_list.value.extend(spe.shape)
  f["segments/count"].int64_list.value.append(int(tile.segments))
  if tile.hr_size is not None:
    f["image/hr_size"].int64_list.value.extend(int(v) for v in tile.hr_size)
  return ex.SerializeToString(deterministic=True)


def _values(feats, key: str, kind: str, where: str, required: bool = True):
  """The values of feature `key`, which must hold a `kind` list ('bytes_list' or 'int64_list'); None when
  an optional feature is absent."""
  if key not in feats:  # (indexing a protobuf map would insert the key)
    if required:
      raise TileDecodeError(f"{where}: feature {key!r} missing")
    return None
  feat = feats[key]
  if feat.WhichOneof("kind") != kind:
    raise TileDecodeError(f"{where}: feature {key!r} holds {feat.WhichOneof('kind')}, expected {kind}")
  return feat.bytes_list.value if kind == "bytes_list" else feat.int64_list.value


def _one(feats, key: str, kind: str, where: str):
  v = _values(feats, key, kind, where)
  if len(v) != 1:
    raise TileDecodeError(f"{where}: feature {key!r} has {len(v)} values, expected one")
  return v[0]


def decode_tile(data: bytes, where: str = "<record>", scale: int | None = None) -> Tile:
  """A Tile from a serialized record; checks shapes (and the LR/HR ratio when `scale` is given)."""
  try:
    f = tf_example_pb2.Example.FromString(data).features.feature
  except pb_message.DecodeError as e:
    raise TileDecodeError(f"{where}: malformed Example ({e})") from None
  hr = images.decode_png(_one(f, "image/hr_png", "bytes_list", where), where)
  lr = images.decode_png(_one(f, "image/lr_png", "bytes_list", where), where)
  shape = _values(f, "spe/shape", "int64_list", where)
  if len(shape) != 2:
    raise TileDecodeError(f"{where}: feature 'spe/shape' is not [h, w]")
  raw = _one(f, "spe/data", "bytes_list", where)
  h, w = int(shape[0]), int(shape[1])
  if len(raw) != 4 * h * w:
    raise TileDecodeError(f"{where}: spe/data has {len(raw)} bytes, expected {4 * h * w} for {h}x{w}")
  spe = np.frombuffer(raw, dtype="<f4").reshape(h, w).astype(np.float32)
  if hr.shape[:2] != (h, w):
    raise TileDecodeError(f"{where}: HR tile {hr.shape[:2]} and SPE {h}x{w} differ")
  if scale is not None and (lr.shape[0] * scale, lr.shape[1] * scale) != hr.shape[:2]:
    raise TileDecodeError(f"{where}: LR tile {lr.shape[:2]} x{scale} does not give HR {hr.shape[:2]}")
  segments = _values(f, "segments/count", "int64_list", where, required=False)
  size = _values(f, "image/hr_size", "int64_list", where, required=False)
  return Tile(
      image_id=_one(f, "image/id", "bytes_list", where).decode("utf-8"),
      y=int(_one(f, "tile/y", "int64_list", where)), x=int(_one(f, "tile/x", "int64_list", where)),
      hr=hr, lr=lr, spe=spe, segments=int(segments[0]) if segments else 0,
      hr_size=(int(size[0]), int(size[1])) if size is not None and len(size) == 2 else None)
