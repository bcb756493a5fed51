r"""The SAM mask export command: segment HR images (SAM or classical), compute the SPE, and write aligned
HR / LR / SPE tiles as TFRecord shards with a manifest (see `diffssr_jax.data.export`).

  python tools/export_sam_masks.py --images data/DF2K_train_HR --out data/df2k_sam \
      --segmenter sam --checkpoint weights/sam_vit_h_4b8939.pth --model_type vit_h
  python tools/export_sam_masks.py --images div2k --tfds_data_dir ~/tensorflow_datasets --out data/div2k \
      --segmenter felzenszwalb --num_shards 8 --shard_index 0      # machine 0 of 8
  python tools/export_sam_masks.py --images data/DF2K_train_HR --from_masks data/sam_out --spe cosine \
      --out data/df2k_cosine                                        # reuse saved masks, no SAM needed
  (or diffssr-export-masks ... once installed; dashed spellings such as --model-type work too)

Torch-only: neither this module nor anything it imports loads jax, so it runs on any machine with torch (CUDA
used when present). The summary counts exported images, skipped (unreadable) images and images too small for
one tile separately. Errors (a missing weights file, an unprepared TFDS dataset, ...) print one line and exit
with status 1; a bad command line exits with 2.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import app, flags

from diffssr_jax import cli as shared_cli
from diffssr_jax import storage
from diffssr_jax.data import segmenters

_SAM_OPTIONS = (("points_per_side", int), ("points_per_batch", int), ("pred_iou_thresh", float),
                ("stability_score_thresh", float), ("box_nms_thresh", float), ("crop_n_layers", int),
                ("min_mask_region_area", int))


def parse_shard_list(text: str | None) -> list[int] | None:
  """'3', '0,2' or '4-7' (or a mix) -> shard indices; None or '' -> None (all shards)."""
  if not text:
    return None
  out = []
  for part in text.split(","):
    part = part.strip()
    try:
      if "-" in part:
        a, b = part.split("-")
        out.extend(range(int(a), int(b) + 1))
      elif part:
        out.append(int(part))
    except ValueError:
      raise app.UsageError(f"--shard_index: expected indices like 3, 0,2 or 4-7, got {text!r}") from None
  return out


def define_flags(fv: flags.FlagValues) -> None:
  """Defines the export command's flags in `fv` (a private FlagValues: see `cli`)."""
  d = dict(flag_values=fv)
  # input / output
  flags.DEFINE_string("images", None, "Folder of HR images (png/jpg/bmp/tif) or a prepared TFDS dataset name "
                      "(required unless --finalize).", **d)
  flags.DEFINE_string("out", None, "Output folder (shards, manifest.json, masks/) (required).", **d)
  flags.DEFINE_string("tfds_data_dir", None, "TFDS data dir holding the prepared dataset (default: TFDS's own).",
                      **d)
  flags.DEFINE_string("tfds_split", "train", "TFDS split to read.", **d)
  flags.DEFINE_string("tfds_image_key", None, "TFDS feature holding the HR image (default: hr/image).", **d)
  flags.DEFINE_string("split", "train", "Name of the exported split (shard file prefix).", **d)
  # segmentation
  flags.DEFINE_enum("segmenter", "sam", ["sam", "felzenszwalb", "slic"],
                    "Segmenter: sam (the paper's, needs --checkpoint) or felzenszwalb / slic (classical, no "
                    "weights).", **d)
  flags.DEFINE_string("from_masks", None, "Read masks from DIR/<image id>.json (saved with --keep_masks, or amg.py "
                      "RLE output) instead of segmenting (default: none, segment).", **d)
  flags.DEFINE_string("checkpoint", None, "SAM weights file, e.g. sam_vit_h_4b8939.pth (required for --segmenter "
                      "sam; default: none).", **d)
  flags.DEFINE_enum("model_type", "vit_h", list(segmenters.SAM_MODEL_TYPES), "SAM backbone of --checkpoint.", **d)
  flags.DEFINE_string("device", None, "Torch device (default: cuda if available, else cpu).", **d)
  for name, typ in _SAM_OPTIONS:
    define = flags.DEFINE_integer if typ is int else flags.DEFINE_float
    define(name, segmenters.SAM_DEFAULTS[name], "SAM automatic mask generator option; the default is SAM's.", **d)
  flags.DEFINE_float("fz_scale", 200.0, "Felzenszwalb scale.", **d)
  flags.DEFINE_float("fz_sigma", 0.8, "Felzenszwalb Gaussian sigma.", **d)
  flags.DEFINE_integer("fz_min_size", 100, "Felzenszwalb minimum segment size.", **d)
  flags.DEFINE_integer("slic_segments", 200, "SLIC number of segments.", **d)
  flags.DEFINE_float("slic_compactness", 10.0, "SLIC compactness.", **d)
  flags.DEFINE_enum("mask_source", "hr", ["hr", "lr"], "Segment the HR image, or its LR version brought back to the "
                    "HR size by MATLAB bicubic (the paper's Table 3 ablation). Not with --from_masks.", **d)
  flags.DEFINE_bool("keep_masks", False, "Also save the masks (COCO RLE) under OUT/masks/.", **d)
  # SPE and tiles
  flags.DEFINE_enum("spe", "rope", ["rope", "cosine", "sincos", "linear"], "Structural position encoding kind.", **d)
  flags.DEFINE_integer("scale", 4, "Super-resolution factor (LR made by MATLAB bicubic).", **d)
  flags.DEFINE_integer("tile_size", 320, "HR tile size.", **d)
  flags.DEFINE_integer("tile_step", 320, "HR tile stride.", **d)
  flags.DEFINE_integer("min_tile", 160, "Keep an edge tile when more than this many pixels remain (official "
                       "thresh_size).", **d)
  flags.DEFINE_integer("seed", 0, "Seed of the random 'linear' SPE.", **d)
  # running
  flags.DEFINE_integer("num_shards", 16, "Number of output shards.", **d)
  flags.DEFINE_string("shard_index", None, "Only these shards, e.g. 3, 0,2 or 4-7: split the work over "
                      "machines/GPUs (default: all).", **d)
  flags.DEFINE_enum("on_error", "fail", ["skip", "fail"], "Unreadable image: skip it (listed in the manifest) or "
                    "stop.", **d)
  flags.DEFINE_integer("workers", 0, "Parallel processes over shards (CPU segmenters; 0: in this process).", **d)
  flags.DEFINE_bool("progress", True, "Show a progress bar.", **d)
  flags.DEFINE_bool("finalize", False, "Only rebuild manifest.json from finished shards.", **d)


def make_segmenter(fv):
  """The segmenter the flags ask for."""
  if fv.segmenter == "sam":
    if not fv.checkpoint:
      raise segmenters.SegmenterError("--segmenter sam needs --checkpoint (or use --segmenter felzenszwalb)")
    opts = {name: fv[name].value for name, _ in _SAM_OPTIONS}
    return segmenters.SamSegmenter(fv.checkpoint, fv.model_type, fv.device, **opts)
  if fv.segmenter == "felzenszwalb":
    return segmenters.FelzenszwalbSegmenter(fv.fz_scale, fv.fz_sigma, fv.fz_min_size)
  return segmenters.SlicSegmenter(fv.slic_segments, fv.slic_compactness)


def summary_line(split: dict, out) -> str:
  """'done: T tiles from N images (S skipped, K too small for a tile) in a/b shards -> OUT'."""
  n_skipped = len(split.get("skipped", ()))
  n_small = sum(len(s.get("no_tiles", ())) for s in split.get("shards", ()))
  # The manifest's num_images_done counts every image a shard went through, the skipped ones included.
  n_exported = split["num_images_done"] - n_skipped - n_small
  return (f"done: {split['num_records']} tiles from {n_exported} images ({n_skipped} skipped, {n_small} too small "
          f"for a tile) in {len(split['shards'])}/{split['num_shards']} shards"
          f"{'' if split['complete'] else ' [incomplete]'} -> {out}")


def main(argv, fv: flags.FlagValues) -> int:
  """Runs the export (or --finalize); returns the exit status."""
  from diffssr_jax.data import export, hr_sources
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not fv.out:
    raise app.UsageError("--out is required")
  # Every location is checked before any work: an unservable one is refused in one line (StorageError).
  storage.check_all({"--out": fv.out, "--images": fv.images, "--from_masks": fv.from_masks,
                     "--checkpoint": fv.checkpoint, "--tfds_data_dir": fv.tfds_data_dir})
  shard_index = parse_shard_list(fv.shard_index)
  if fv.finalize:
    man = export.write_shards_manifest(fv.out, fv.split)
    s = man["splits"][fv.split]
    print(f"manifest: {s['num_records']} records in {len(s['shards'])}/{s['num_shards']} shards")
    return shared_cli.EXIT_OK
  if not fv.images:
    raise app.UsageError("--images is required")
  cfg = export.ExportConfig(scale=fv.scale, tile_size=fv.tile_size, tile_step=fv.tile_step, min_tile=fv.min_tile,
                            spe_kind=fv.spe, num_shards=fv.num_shards, split=fv.split, seed=fv.seed,
                            keep_masks=fv.keep_masks)
  cfg.validate()
  if fv.segmenter == "sam" and not fv.from_masks and fv.workers > 1:
    raise app.UsageError("--workers > 1 would load SAM once per process; run one process per GPU with "
                         "--shard_index instead")
  source = hr_sources.open_source(fv.images, fv.tfds_data_dir, fv.tfds_split, fv.tfds_image_key)
  if fv.from_masks and fv.mask_source != "hr":
    raise app.UsageError("--mask_source lr segments the LR image: not with --from_masks (saved masks)")
  segmenter = None if fv.from_masks else make_segmenter(fv)
  if fv.mask_source == "lr":
    segmenter = segmenters.FromLR(segmenter, fv.scale)
  from diffssr_jax import preemption
  with preemption.handle_sigterm():  # SIGTERM: the image in progress is finished, then a clean exit (143)
    man = export.run_export(source, fv.out, cfg, segmenter=segmenter, masks_dir=fv.from_masks,
                            shard_indices=shard_index, on_error=fv.on_error, progress=fv.progress,
                            workers=fv.workers)
  print(summary_line(man["splits"][cfg.split], fv.out))
  return shared_cli.EXIT_OK


def user_errors() -> tuple[type[BaseException], ...]:
  """The exceptions printed as one line (exit 1): the export's own and bad files or values."""
  from diffssr_jax.data import export, hr_sources
  return (export.ExportError, segmenters.SegmenterError, hr_sources.SourceError, FileNotFoundError, ValueError)


def cli(argv: Sequence[str] | None = None) -> int:
  """diffssr-export-masks (pyproject's console script; argv default sys.argv), in-process with its own flag
  values; returns the exit status."""
  return shared_cli.run(sys.argv if argv is None else argv, define_flags=define_flags, main=main, doc=__doc__,
                        user_errors=user_errors())


if __name__ == "__main__":
  sys.exit(cli())
