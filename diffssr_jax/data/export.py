"""Export of SAM-DiffSR training data: HR images -> segmentation -> SPE -> aligned tiles in TFRecords.

Per image (as the official `data_gen/utils.py` + `merge_mask_to_one.py`, with its tile/SPE bug fixed):

1. The HR image is trimmed to a multiple of the scale (bottom/right rows and columns dropped).
2. The whole trimmed image is segmented (SAM or a classical segmenter, or masks read from a folder) and
   its SPE map computed on the whole image (`diffssr_jax.data.spe`).
3. LR = MATLAB-bicubic `imresize(HR_uint8, 1/scale)` of the whole trimmed image (uint8).
4. Tiles: top-left corners y = 0, step, 2*step, ... while y < H - min_tile (same for x), i.e. the
   official rule with crop_size 320, step 320, thresh_size 160: edge tiles are kept, cut short, when
   more than 160 px remain. Each record holds the HR tile [y:y+320, x:x+320], the LR tile
   [y/s:(y+320)/s, x/s:(x+320)/s] and the SPE tile [y:y+320, x:x+320]. (The official code crops the SPE
   with the LR coordinates, GitHub issue #13, so its SPE tiles do not match their images; ours do.)

Record schema: see `diffssr_jax.data.records`.

Output folder:

  <split>-00000-of-00016.tfrecord ...   shards, each complete once it has its final name
  manifest.json                         {"format", "version", "splits": {split: {config, segmenter,
                                        source, shards [{file, records, images, skipped, bytes, sha256}],
                                        skipped images, totals, complete}}}
  masks/<image id>.json                 with keep_masks: the masks as COCO RLE (amg.py layout)
  .export/                              bookkeeping: run configuration, per-shard journal and metadata
                                        (all of it in `diffssr_jax.data.export_files`)

Images are assigned to shards round-robin in sorted id order (image i -> shard i mod N), so
`shard_indices` can split the work over machines deterministically. A shard is written under a
temporary name in `.export/` with a journal line per finished image (records appended, fsync'ed);
an interrupted run resumes after the last journalled image (the partial file is truncated back to it),
and a finished shard is renamed into place, so re-running produces byte-identical output. An image that
cannot be read is skipped and listed in the manifest, or fails the run (`on_error`).

An output folder in a bucket (gs://...): the partial shard and its journal stay in a local staging folder
(`staging_dir`, the same on every run for the same --out, so a rerun on the same machine resumes the partial
shard); a finished shard is published by writing its metadata object, then uploading the shard (an upload is
all-or-nothing: the shard object appears complete or not at all); a run that finds the metadata but not the
shard uploads the partial again when it is still staged, or redoes the shard. The manifest is one object
written last.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import time

import numpy as np

from diffssr_jax import conventions, fileio, images, preemption, storage
from diffssr_jax.data import spe as spe_lib
from diffssr_jax.data import records, rle, tfrecord
from diffssr_jax.data.segmenters import Segmentation, compute_segmentation_spe
from diffssr_jax.data.imresize import imresize
# The output folder's files and bookkeeping (re-exported: callers and tests use them as export.X).
from diffssr_jax.data.export_files import (FORMAT, STATE_DIR, VERSION, ExportError, append_line,  # noqa: F401
                                           check_run_settings, exported_splits, publish, read_journal,
                                           shard_name, staging_dir, write_json, write_shards_manifest)

class InputError(ValueError):
  """Per-image input problem (handled by the on_error policy)."""


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  """What determines the records: change any field and the output changes."""
  scale: int = 4
  tile_size: int = 320  # official crop_size
  tile_step: int = 320  # official: tiles do not overlap
  min_tile: int = 160  # official thresh_size: keep a tile starting at y while y < H - min_tile
  spe_kind: str = "rope"
  num_shards: int = 16
  split: str = "train"
  seed: int = 0  # only the random 'linear' SPE uses it (per image: hash of seed and image id)
  keep_masks: bool = False
  png_level: int = 1  # zlib level of the PNGs (1: fast; decoding speed is the same)

  def validate(self) -> None:
    s = self.scale
    if s < 1:
      raise ValueError(f"scale must be >= 1, got {s}")
    for name in ("tile_size", "tile_step", "min_tile"):
      v = getattr(self, name)
      if v <= 0 or v % s:
        raise ValueError(f"{name}={v} must be a positive multiple of the scale {s}")
    if self.spe_kind not in spe_lib.KINDS:
      raise ValueError(f"spe_kind must be one of {spe_lib.KINDS}, got {self.spe_kind!r}")
    if self.num_shards < 1:
      raise ValueError("num_shards must be >= 1")


# --- pure per-image functions ---

def tile_starts(n: int, step: int, min_tile: int) -> list[int]:
  """Tile starts along one axis of length n: 0, step, ... while start < n - min_tile."""
  return list(range(0, max(n - min_tile, 0), step))


def tile_origins(h: int, w: int, step: int, min_tile: int) -> list[tuple[int, int]]:
  """Row-major (y, x) top-left corners of the tiles of an (h, w) image."""
  return [(y, x) for y in tile_starts(h, step, min_tile) for x in tile_starts(w, step, min_tile)]


def cut_tiles(hr, lr, spe_map, cfg: ExportConfig):
  """Yields (y, x, hr_tile, lr_tile, spe_tile), all three cut at the same place (HR coordinates)."""
  s, t = cfg.scale, cfg.tile_size
  h, w = hr.shape[:2]
  for y, x in tile_origins(h, w, cfg.tile_step, cfg.min_tile):
    yield (y, x, hr[y:y + t, x:x + t], lr[y // s:(y + t) // s, x // s:(x + t) // s],
           spe_map[y:y + t, x:x + t])


def image_seed(seed: int, image_id: str) -> int:
  """A 32-bit seed from the run seed and the image id (stable across runs, machines and orders)."""
  d = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
  return int.from_bytes(d[:4], "little")


def image_records(image_id: str, hr: np.ndarray, seg: Segmentation, cfg: ExportConfig):
  """(serialized tile records, SPE map, LR image) of one trimmed HR image and its segmentation."""
  rng = np.random.RandomState(image_seed(cfg.seed, image_id)) if cfg.spe_kind == "linear" else None
  spe_map = compute_segmentation_spe(seg, cfg.spe_kind, rng)
  lr = imresize(hr, 1 / cfg.scale)
  out = []
  for y, x, hr_t, lr_t, spe_t in cut_tiles(hr, lr, spe_map, cfg):
    tile = records.Tile(image_id, y, x, hr_t, lr_t, spe_t, seg.count, hr.shape[:2])
    out.append(records.encode_tile(tile, cfg.png_level))
  return out, spe_map, lr


def assign_shards(ids, num_shards: int) -> list[list[str]]:
  """Round-robin assignment of the sorted ids: image i goes to shard i mod num_shards."""
  ids = sorted(ids)
  return [ids[k::num_shards] for k in range(num_shards)]


# --- segmentation providers ---

class SegmenterProvider:
  """Runs a segmenter on each (trimmed) image."""

  def __init__(self, segmenter):
    self.segmenter = segmenter

  def __call__(self, image_id: str, hr: np.ndarray, full_shape) -> Segmentation:
    return self.segmenter(hr)

  def describe(self) -> dict:
    return self.segmenter.describe()


class MaskFolderProvider:
  """Reads masks saved earlier (ours, or amg.py's RLE JSON files): `<dir>/<image id>.json`."""

  def __init__(self, masks_dir):
    self.dir = storage.native(masks_dir)
    if not self.dir.is_dir():
      raise ExportError(f"masks folder {self.dir} does not exist")

  def __call__(self, image_id: str, hr: np.ndarray, full_shape) -> Segmentation:
    path = self.dir / f"{image_id}.json"
    if not path.is_file():
      raise InputError(f"{path}: no mask file for image {image_id!r}")
    masks = rle.read_mask_file(path)
    h, w = hr.shape[:2]
    if masks.shape[0] == 0:
      return Segmentation(masks=np.zeros((0, h, w), dtype=bool))
    if masks.shape[1:] == tuple(full_shape[:2]) or masks.shape[1:] == (h, w):
      return Segmentation(masks=masks[:, :h, :w])
    raise InputError(f"{path}: masks are {masks.shape[1]}x{masks.shape[2]}, image is "
                     f"{full_shape[0]}x{full_shape[1]}")

  def describe(self) -> dict:
    return {"name": "from-masks", "dir": str(self.dir)}


@dataclasses.dataclass
class RunContext:
  source: object
  provider: object
  cfg: ExportConfig
  out_dir: pathlib.Path
  fingerprint: str
  on_error: str = "fail"
  staging: pathlib.Path | None = None  # where partial shards and journals are written (default out_dir/.export)


def _process_one(ctx: RunContext, image_id: str):
  """(status, records, segments, error, masks) of one image; input problems per on_error."""
  cfg = ctx.cfg
  try:
    full = ctx.source.load(image_id)
    hr = conventions.trim_to_scale(full, cfg.scale)
    if not tile_origins(hr.shape[0], hr.shape[1], cfg.tile_step, cfg.min_tile):
      return "no_tiles", [], 0, None, None
    seg = ctx.provider(image_id, hr, full.shape)
  except (images.ImageReadError, rle.RLEError, InputError) as e:
    msg = f"{_image_path(ctx.source, image_id)}: {e}" if image_id not in str(e) else str(e)
    if ctx.on_error == "fail":
      raise ExportError(f"cannot export image {image_id!r}: {msg}") from None
    return "skipped", [], 0, msg, None
  recs, _, _ = image_records(image_id, np.ascontiguousarray(hr), seg, cfg)
  masks = seg.to_masks() if cfg.keep_masks else None
  return "ok", recs, seg.count, None, masks


def _image_path(source, image_id):
  return source.path(image_id) if hasattr(source, "path") else image_id


def export_shard(ctx: RunContext, k: int, ids: list[str], progress=None) -> dict:
  """Writes (or resumes, or skips when done) shard k holding `ids`; returns its metadata."""
  cfg = ctx.cfg
  name = shard_name(cfg.split, k, cfg.num_shards)
  final = ctx.out_dir / name
  state = ctx.out_dir / STATE_DIR
  local = ctx.staging or state
  meta_path, partial, journal = state / f"{name}.json", local / f"{name}.partial", local / f"{name}.journal"
  if meta_path.is_file():
    meta = json.loads(meta_path.read_text())
    if meta.get("fingerprint") == ctx.fingerprint:
      if final.is_file() and storage.size(final) == meta["bytes"]:
        if progress is not None:
          progress.update(meta["images"])
        return meta
      if partial.is_file() and fileio.file_sha256(partial) == meta["sha256"]:  # crashed between meta and rename
        publish(partial, final)
        journal.unlink(missing_ok=True)
        if progress is not None:
          progress.update(meta["images"])
        return meta
    meta_path.unlink()
  state.mkdir(parents=True, exist_ok=True)
  local.mkdir(parents=True, exist_ok=True)
  fp, entries = read_journal(journal)
  if fp != ctx.fingerprint or not partial.is_file():
    entries = []
  end = entries[-1]["end"] if entries else 0
  if partial.is_file() and partial.stat().st_size < end:
    raise ExportError(f"{partial}: shorter than its journal says ({partial.stat().st_size} < {end}); "
                      "delete it and its .journal to redo this shard")
  with open(partial, "ab") as f:
    f.truncate(end)  # drop records of an image whose journal line was never written
  if not entries:
    with open(journal, "w") as jf:
      append_line(jf, {"fingerprint": ctx.fingerprint, "shard": name})
  done = {e["id"] for e in entries}
  if progress is not None and done:
    progress.update(len(done))
  with tfrecord.TFRecordWriter(partial, append=True) as writer, open(journal, "a") as jf:
    for image_id in ids:
      if image_id in done:
        continue
      status, recs, segments, error, masks = _process_one(ctx, image_id)
      if masks is not None:
        rle.write_mask_file(ctx.out_dir / "masks" / f"{image_id}.json", masks)
      for r in recs:
        writer.write(r)
      writer.flush(fsync=True)
      entry = {"id": image_id, "status": status, "records": len(recs), "segments": segments,
               "end": writer.tell()}
      if error:
        entry.update(error=error, path=_image_path(ctx.source, image_id))
      append_line(jf, entry)
      entries.append(entry)
      if progress is not None:
        progress.update(1)
        progress.set_postfix(tiles=sum(e["records"] for e in entries), refresh=False)
      if preemption.requested():  # the image is durable (records fsynced, journal line written): stop here
        raise preemption.Preempted(f"SIGTERM: export stopped after image {image_id!r} ({len(entries)} of "
                                   f"{len(ids)} images of {name}); run the same command again to continue")
  meta = {
      "file": name, "fingerprint": ctx.fingerprint, "images": len(entries),
      "records": sum(e["records"] for e in entries), "bytes": partial.stat().st_size,
      "sha256": fileio.file_sha256(partial),
      "skipped": [{"id": e["id"], "path": e.get("path"), "error": e["error"]} for e in entries
                  if e["status"] == "skipped"],
      "no_tiles": [e["id"] for e in entries if e["status"] == "no_tiles"],
  }
  write_json(meta_path, meta)
  publish(partial, final)
  journal.unlink(missing_ok=True)
  return meta


def run_fingerprint(cfg: ExportConfig, provider, ids) -> tuple[str, dict]:
  """A digest of everything that determines the output bytes, and the readable settings behind it."""
  settings = {"config": dataclasses.asdict(cfg), "segmenter": provider.describe(),
              "ids_sha256": hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest(),
              "num_images": len(ids)}
  digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
  return digest, settings


def _worker_run(args):
  ctx, k, ids = args
  with preemption.handle_sigterm():  # a SIGTERM to the process group: each worker finishes its image
    return export_shard(ctx, k, ids)


def run_export(source, out_dir, cfg: ExportConfig, segmenter=None, masks_dir=None, shard_indices=None,
               on_error: str = "fail", progress: bool = True, workers: int = 0) -> dict:
  """Exports `source` into `out_dir` (only shards `shard_indices` when given); returns the manifest.

  Exactly one of `segmenter` (a callable, see `segmenters`) or `masks_dir` (saved masks) is needed.
  `workers > 1` processes shards in parallel processes (for CPU segmenters; keep 0 for SAM on a GPU).
  """
  cfg.validate()
  if on_error not in ("skip", "fail"):
    raise ValueError("on_error must be 'skip' or 'fail'")
  if (segmenter is None) == (masks_dir is None):
    raise ValueError("give exactly one of segmenter or masks_dir")
  provider = SegmenterProvider(segmenter) if segmenter is not None else MaskFolderProvider(masks_dir)
  out_dir = storage.native(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  fingerprint, settings = run_fingerprint(cfg, provider, source.ids)
  check_run_settings(out_dir, cfg.split, fingerprint, settings)
  ctx = RunContext(source, provider, cfg, out_dir, fingerprint, on_error,
                   staging_dir(out_dir) if storage.is_remote(out_dir) else None)
  plan = assign_shards(source.ids, cfg.num_shards)
  todo = list(range(cfg.num_shards)) if shard_indices is None else sorted(set(shard_indices))
  for k in todo:
    if not 0 <= k < cfg.num_shards:
      raise ValueError(f"shard index {k} out of range [0, {cfg.num_shards})")
  from tqdm import tqdm
  bar = tqdm(total=sum(len(plan[k]) for k in todo), unit="img", desc=f"export {cfg.split}",
             disable=not progress, smoothing=0.1)
  t0 = time.time()
  try:
    if workers and workers > 1 and len(todo) > 1:
      import concurrent.futures as cf
      import multiprocessing as mp
      with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futs = {pool.submit(_worker_run, (ctx, k, plan[k])): k for k in todo}
        for fut in cf.as_completed(futs):
          bar.update(fut.result()["images"])
          if preemption.requested():  # SIGTERM to this process only: no new shard; the running ones end
            pool.shutdown(wait=True, cancel_futures=True)
            raise preemption.Preempted(f"SIGTERM: export stopped after the shards in progress; run the same "
                                       "command again to continue")
    else:
      for k in todo:
        export_shard(ctx, k, plan[k], bar)
  finally:
    bar.close()
  man = write_shards_manifest(out_dir, cfg.split, source.describe())
  man["splits"][cfg.split]["seconds"] = round(time.time() - t0, 3)
  return man
