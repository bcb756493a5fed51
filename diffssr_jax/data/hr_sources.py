"""HR image sources for the export: a folder of image files, or a prepared tensorflow-datasets dataset.

A source has sorted, unique string `ids`, `load(id) -> (H, W, 3) uint8` and `describe()` (for the
manifest). Loading errors are `images.ImageReadError`s naming the image, so the exporter can skip or
fail per its `on_error` policy. No jax, no TensorFlow.

TFDS: datasets prepared in the `array_record` file format are read through `tfds.data_source` (random
access, no TensorFlow). Datasets prepared as TFRecord (tfds' default) are read with our TFRecord index and
tfds' `tf.train.Example` proto when the chosen feature is an `Image` (stored as PNG/JPEG bytes, decoded
by `images`). Nothing is ever downloaded or prepared here.
"""
from __future__ import annotations

import os
import pathlib
import warnings

import numpy as np

from diffssr_jax import images, storage


class SourceError(RuntimeError):
  """An HR source cannot be opened; the message says what is needed."""


class FolderSource:
  """Image files below a folder (recursively); the id is the relative path without its suffix."""

  def __init__(self, root):
    self.root = storage.native(root)
    files = images.list_images(self.root)
    if not files:
      raise SourceError(f"{self.root}: no image files ({', '.join(images.IMAGE_EXTENSIONS)})")
    base = self.root if self.root.is_dir() else self.root.parent
    self._paths = {}
    for p in files:
      key = p.relative_to(base).with_suffix("").as_posix()
      if key in self._paths:
        raise SourceError(f"two images with the same name {key!r}: {self._paths[key]} and {p}")
      self._paths[key] = p
    self.ids = sorted(self._paths)

  def path(self, image_id: str) -> str:
    return str(self._paths[image_id])

  def load(self, image_id: str) -> np.ndarray:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      img = images.read_rgb8(self._paths[image_id])
    for w in caught:  # re-emit conversions (greyscale / alpha / 16-bit) once per image, path included
      warnings.warn(str(w.message), stacklevel=2)
    return img

  def describe(self) -> dict:
    return {"kind": "folder", "root": str(self.root), "images": len(self.ids)}


def _tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise SourceError(f"reading a TFDS dataset needs tensorflow-datasets ({e})") from None
  return tfds


def _open_builder(tfds, name: str, data_dir):
  """The builder of an already prepared dataset (no download, no preparation)."""
  p = pathlib.Path(name)
  if (p / "dataset_info.json").is_file():
    return tfds.builder_from_directory(p)
  root = pathlib.Path(data_dir) if data_dir else pathlib.Path(tfds.core.constants.DATA_DIR).expanduser()
  base, _, version = name.partition(":")
  cand = root / base
  versions = sorted((d for d in cand.glob("*") if (d / "dataset_info.json").is_file()),
                    key=lambda d: [int(x) if x.isdigit() else x for x in d.name.split(".")]) \
      if cand.is_dir() else []
  if version:
    versions = [d for d in versions if d.name == version]
  if not versions:
    raise SourceError(
        f"TFDS dataset {name!r} is not prepared under {root} (looked for {cand}/<version>/dataset_info.json). "
        "Prepare it first where the raw data is available (e.g. `tfds build "
        f"{base} --data_dir {root} --file_format array_record`), or point --images at a folder of images.")
  return tfds.builder_from_directory(versions[-1])


def _pick_image_key(features, wanted):
  import tensorflow_datasets as tfds
  keys = list(features.keys())
  if wanted:
    if wanted not in keys:
      raise SourceError(f"TFDS feature {wanted!r} not found; available: {keys}")
    return wanted
  for k in ("hr", "image", "high_resolution"):
    if k in keys:
      return k
  imgs = [k for k in keys if isinstance(features[k], tfds.features.Image)]
  if len(imgs) == 1:
    return imgs[0]
  raise SourceError(f"cannot tell which TFDS feature is the HR image among {keys}; pass --tfds-image-key")


class TfdsSource:
  """Images of one split of a prepared TFDS dataset; ids are '<split>-<index:06d>'."""

  def __init__(self, name: str, data_dir=None, split: str = "train", image_key: str | None = None):
    tfds = _tfds()
    self.name, self.split = name, split
    builder = _open_builder(tfds, name, data_dir)
    self.key = _pick_image_key(builder.info.features, image_key)
    if split not in builder.info.splits:
      raise SourceError(f"TFDS dataset {name!r} has no split {split!r}; splits: {list(builder.info.splits)}")
    fmt = str(getattr(builder.info.file_format, "value", builder.info.file_format))
    self.file_format = fmt
    if fmt == "array_record":
      self._ds = builder.as_data_source(split=split)
      self._index = None
      n = len(self._ds)
    elif fmt == "tfrecord":
      if not isinstance(builder.info.features[self.key], tfds.features.Image):
        raise SourceError(f"{name}: feature {self.key!r} is not an Image; reading TFRecord-format TFDS data "
                          "without TensorFlow supports Image features only (re-prepare it as array_record)")
      from diffssr_jax.data import tfrecord
      files = sorted(str(f) for f in builder.info.splits[split].filepaths)
      self._index = tfrecord.RecordIndex(files)
      self._ds = None
      n = len(self._index)
    else:
      raise SourceError(f"{name}: TFDS file format {fmt!r} is not supported (use array_record or tfrecord)")
    self.ids = [f"{split}-{i:06d}" for i in range(n)]

  def _position(self, image_id: str) -> int:
    prefix = f"{self.split}-"
    if not image_id.startswith(prefix):
      raise KeyError(image_id)
    return int(image_id[len(prefix):])

  def path(self, image_id: str) -> str:
    return f"tfds:{self.name}/{image_id}"

  def load(self, image_id: str) -> np.ndarray:
    i = self._position(image_id)
    where = self.path(image_id)
    if self._ds is None:  # TFRecord: the feature holds the encoded image
      return images.as_rgb8(images.decode_image(self._image_bytes(i, where), where), stacklevel=2)
    return _to_rgb8(np.asarray(self._ds[i][self.key]), where)

  def _image_bytes(self, i: int, where: str) -> bytes:
    """The encoded image of TFRecord record i (its feature `self.key`)."""
    from google.protobuf import message as pb_message
    from tensorflow_datasets.proto import tf_example_pb2
    try:
      feats = tf_example_pb2.Example.FromString(self._index.read(i)).features.feature
    except pb_message.DecodeError as e:
      raise images.ImageReadError(f"{where}: malformed tf.train.Example ({e})") from None
    if self.key not in feats or not feats[self.key].bytes_list.value:
      raise images.ImageReadError(f"{where}: record has no image bytes in feature {self.key!r}")
    return feats[self.key].bytes_list.value[0]

  def describe(self) -> dict:
    return {"kind": "tfds", "name": self.name, "split": self.split, "feature": self.key,
            "file_format": self.file_format, "images": len(self.ids)}


def _to_rgb8(arr: np.ndarray, where: str) -> np.ndarray:
  if arr.ndim == 3 and arr.shape[2] == 1:
    arr = arr[:, :, 0]
  notes = []
  if arr.dtype == np.uint16:
    arr = images.to_uint8(arr)
    notes.append("16-bit converted to 8-bit")
  if arr.dtype != np.uint8:
    raise images.ImageReadError(f"{where}: unsupported pixel type {arr.dtype}")
  if arr.ndim == 2:
    arr = np.repeat(arr[:, :, None], 3, axis=2)
    notes.append("greyscale replicated to RGB")
  elif arr.shape[2] == 4:
    arr = arr[:, :, :3]
    notes.append("alpha channel dropped")
  if notes:
    warnings.warn(f"{where}: " + "; ".join(notes), stacklevel=3)
  return np.ascontiguousarray(arr)


def open_source(spec: str, tfds_data_dir=None, tfds_split: str = "train", tfds_image_key=None):
  """A folder/file source when `spec` exists on disk, else a TFDS dataset name (e.g. 'div2k')."""
  p = storage.native(spec)
  if p.exists() and not (p / "dataset_info.json").is_file():
    return FolderSource(spec)
  if not p.exists() and (os.sep in spec or spec.startswith(".")):
    raise SourceError(f"{spec}: no such image folder (nor a TFDS dataset name)")
  return TfdsSource(spec, tfds_data_dir, tfds_split, tfds_image_key)
