"""The mask export's output folder: its layout, the bookkeeping that makes a run resumable, and the manifest.

  <split>-00000-of-00016.tfrecord ...   shards (`shard_name`), each complete once it has its final name
  manifest.json                         `write_shards_manifest`, from the finished shards' metadata
  .export/ (STATE_DIR)                  the run's settings (`check_run_settings`), per-shard journals
                                        (`read_journal` / `append_line`) and metadata

A bucket output stages partial shards locally (`staging_dir`) and `publish`es each finished one in one
upload. The export itself (images -> segmentation -> tiles) is `diffssr_jax.data.export`.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile

from diffssr_jax import fileio, run_settings, storage
from diffssr_jax.data import records

FORMAT = "diffssr-jax/sam-tiles"
VERSION = 1
STATE_DIR = ".export"


class ExportError(RuntimeError):
  """The export cannot proceed (bad input under on_error='fail', or an inconsistent output folder)."""


def shard_name(split: str, k: int, n: int) -> str:
  return f"{split}-{k:05d}-of-{n:05d}.tfrecord"


def write_json(path: pathlib.Path, obj) -> None:
  fileio.atomic_write_json(path, obj, indent=1, sort_keys=True)


def read_journal(path: pathlib.Path) -> tuple[str | None, list[dict]]:
  """(fingerprint, entries) of a journal; a torn last line (crash mid-write) is ignored."""
  if not path.is_file():
    return None, []
  lines = path.read_text().split("\n")
  fp, entries = None, []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except ValueError:
      if i >= len(lines) - 2:  # only the final line may be incomplete
        break
      raise ExportError(f"{path}: corrupt journal line {i + 1}") from None
    if "fingerprint" in obj:
      fp = obj["fingerprint"]
    else:
      entries.append(obj)
  return fp, entries


def append_line(f, obj) -> None:
  f.write(json.dumps(obj, sort_keys=True) + "\n")
  f.flush()
  os.fsync(f.fileno())


def staging_dir(out_dir) -> pathlib.Path:
  """Local folder for the partial shards and journals of an export into a bucket (out_dir/.export for a
  local out_dir): one per output URL, so a rerun on this machine finds its partial shards."""
  if not storage.is_remote(out_dir):
    return pathlib.Path(out_dir) / STATE_DIR
  key = hashlib.sha256(str(out_dir).encode()).hexdigest()[:16]
  return pathlib.Path(tempfile.gettempdir()) / f"diffssr-export-{key}"


def publish(partial: pathlib.Path, final) -> None:
  """A finished shard into place: a rename locally, one upload (all-or-nothing) then removal for a bucket."""
  if storage.is_remote(final):
    storage.path(partial).copy(storage.path(final), overwrite=True)
    partial.unlink()
  else:
    os.replace(partial, final)


def exported_splits(out_dir: pathlib.Path) -> set[str]:
  """The splits `out_dir` holds (finished or in progress): its manifest's and the export state's."""
  found = {f.name[:-len("-config.json")] for f in (out_dir / STATE_DIR).glob("*-config.json")}
  man = out_dir / "manifest.json"
  if man.is_file():
    try:
      found |= set(json.loads(man.read_text()).get("splits", {}))
    except (ValueError, AttributeError):
      pass
  return found


def check_run_settings(out_dir: pathlib.Path, split: str, fingerprint: str, settings: dict) -> None:
  """Records the run's settings on first use of `out_dir`; refuses to mix runs with other settings, and
  a second split in one folder: training reads every shard of a folder, so a folder holds one split and
  one tile geometry (a val export beside the train shards used to be trained on, tiles of two sizes)."""
  others = sorted(exported_splits(out_dir) - {split})
  if others:
    raise ExportError(f"{out_dir} holds the '{others[0]}' split; one split per folder (training reads every "
                      f"shard of its folder): export '{split}' into another --out, e.g. {out_dir / split}")
  # The fingerprint is the digest of the settings (`run_fingerprint`): comparing the settings tells which differ.
  run_settings.check(out_dir / STATE_DIR / f"{split}-config.json", settings, key="settings",
                     record={"fingerprint": fingerprint, "settings": settings},
                     holder=f"{out_dir} holds a '{split}' export", error=ExportError,
                     remedy="use another output folder, or delete it to start over")


def write_shards_manifest(out_dir, split: str, source_desc: dict | None = None) -> dict:
  """(Re)writes manifest.json from the finished shards' metadata found in `out_dir`."""
  out_dir = storage.native(out_dir)
  cfg_path = out_dir / STATE_DIR / f"{split}-config.json"
  if not cfg_path.is_file():
    raise ExportError(f"{out_dir}: no '{split}' export found")
  run = json.loads(cfg_path.read_text())
  n = run["settings"]["config"]["num_shards"]
  shards, missing = [], []
  for k in range(n):
    name = shard_name(split, k, n)
    mp = out_dir / STATE_DIR / f"{name}.json"
    if mp.is_file() and (out_dir / name).is_file():
      m = json.loads(mp.read_text())
      shards.append({key: m[key] for key in ("file", "records", "images", "bytes", "sha256", "skipped",
                                             "no_tiles")})
    else:
      missing.append(k)
  entry = {
      **run["settings"], "source": source_desc, "num_shards": n, "complete": not missing,
      "missing_shards": missing, "shards": shards,
      "num_records": sum(s["records"] for s in shards),
      "num_images_done": sum(s["images"] for s in shards),
      "skipped": [x for s in shards for x in s["skipped"]],
      "schema": records.SCHEMA,
  }
  man_path = out_dir / "manifest.json"
  man = json.loads(man_path.read_text()) if man_path.is_file() else {}
  if man.get("format") != FORMAT:
    man = {"format": FORMAT, "version": VERSION, "splits": {}}
  old = man["splits"].get(split, {})
  if source_desc is None and old.get("source") is not None:
    entry["source"] = old["source"]
  man["splits"][split] = entry
  write_json(man_path, man)
  return man
