"""Random-access data source over exported tile shards (grain `RandomAccessDataSource` protocol).

Opening the source indexes every shard (record offsets from the length headers, header CRCs checked,
truncation detected); each `__getitem__` preads one record, checks its data CRC and decodes it. Every
error names the shard file, the record number in it and its byte offset. The source pickles without
open files, so grain worker processes reopen the shards themselves. No jax.
"""
from __future__ import annotations

import json
from diffssr_jax import storage
from diffssr_jax.data import records, tfrecord


class TileSource:
  """The decoded tiles of a set of TFRecord shards, numbered globally in sorted file order.

  Item i is a dict: `hr` (h, w, 3) uint8, `lr` (h/s, w/s, 3) uint8, `spe` (h, w) float32, `y`, `x` (the
  tile's top-left in its image, HR pixels), `index` (= i) and `image_id`.
  """

  def __init__(self, files, scale: int | None = None, verify_crc: bool = True):
    self.files = [str(f) for f in tfrecord.expand_files(files)]
    self.scale = scale
    self.verify_crc = verify_crc
    self._index = tfrecord.RecordIndex(self.files)

  def __len__(self) -> int:
    return len(self._index)

  def where(self, i: int) -> str:
    return self._index.where(i)

  def read(self, i: int) -> bytes:
    """The raw (CRC-checked) record i."""
    return self._index.read(i, verify=self.verify_crc)

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    data = self.read(i)
    t = records.decode_tile(data, where=self._index.where(i), scale=self.scale)
    return {"hr": t.hr, "lr": t.lr, "spe": t.spe, "y": t.y, "x": t.x, "index": i % len(self),
            "image_id": t.image_id}

  def __repr__(self) -> str:
    return f"TileSource({len(self.files)} files, {len(self)} records)"


def manifest_for(files) -> dict | None:
  """The export manifest next to the shards (the split entry they belong to), if there is one."""
  paths = tfrecord.expand_files(files)
  man = storage.path(paths[0]).parent / "manifest.json"
  if not man.is_file():
    return None
  try:
    data = json.loads(man.read_text())
  except ValueError:
    return None
  name = storage.path(paths[0]).name
  for split in data.get("splits", {}).values():
    if any(s.get("file") == name for s in split.get("shards", [])):
      return split
  return None
