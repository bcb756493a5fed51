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


class MixedExportError(ValueError):
  """Training shards that come from different exports (splits or tile geometries)."""


def _read_manifest(folder) -> dict | None:
  path = folder / "manifest.json"
  if not path.is_file():
    return None
  try:
    data = json.loads(path.read_text())
  except ValueError:
    return None
  return data if isinstance(data.get("splits"), dict) else None


def manifest_for(files) -> dict | None:
  """The export manifest entry (one split of manifest.json beside the shards) that every shard belongs to;
  None without manifests. Every file's entry is looked up, not only the first's: shards of different splits
  or tile geometries (a val export mixed into the train folder), or a shard its folder's manifest does not
  list, raise MixedExportError naming them. Folders exported alike (same split and geometry) may be mixed."""
  paths = tfrecord.expand_files(files)
  manifests: dict = {}
  groups: dict = {}   # (split, scale, tile_size, tile_step, min_tile) -> (entry, [file names])
  for path in paths:
    folder = storage.path(path).parent
    if folder not in manifests:
      manifests[folder] = _read_manifest(folder)
    man = manifests[folder]
    if man is None:
      continue
    name = storage.path(path).name
    hit = [(split, entry) for split, entry in man["splits"].items()
           if any(s.get("file") == name for s in entry.get("shards", []))]
    if not hit:
      raise MixedExportError(f"{path} is not listed in {folder / 'manifest.json'} (a shard of another export? "
                             "keep each export in its own folder, or rebuild the manifest with the export's "
                             "--finalize)")
    split, entry = hit[0]
    c = entry.get("config", {})
    key = (split, c.get("scale"), c.get("tile_size"), c.get("tile_step"), c.get("min_tile"))
    groups.setdefault(key, (entry, []))[1].append(str(path))
  if len(groups) > 1:
    parts = [f"{len(names)} shards of split '{k[0]}' (scale {k[1]}, tiles {k[2]} px every {k[3]})"
             for k, (_, names) in groups.items()]
    raise MixedExportError(f"the training files {files!r} mix exports: {'; '.join(parts)}; train on one split "
                           "and one tile geometry (one export per folder)")
  return next(iter(groups.values()))[0] if groups else None
  try:
    data = json.loads(man.read_text())
  except ValueError:
    return None
  name = storage.path(paths[0]).name
  for split in data.get("splits", {}).values():
    if any(s.get("file") == name for s in split.get("shards", [])):
      return split
  return None
