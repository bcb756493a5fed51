#!/usr/bin/env python
"""Export SAM-DiffSR training data: segment HR images (SAM or classical), compute the SPE, and write
aligned HR / LR / SPE tiles as TFRecord shards with a manifest (see `diffssr_jax.data.export`).

Torch-only: this tool never imports jax, so it runs on any machine with torch (CUDA used when present).

Examples:
  python tools/export_sam_masks.py --images data/DF2K_train_HR --out data/df2k_sam \\
      --segmenter sam --checkpoint weights/sam_vit_h_4b8939.pth --model-type vit_h
  python tools/export_sam_masks.py --images div2k --tfds-data-dir ~/tensorflow_datasets --out data/div2k \\
      --segmenter felzenszwalb --num-shards 8 --shard-index 0     # machine 0 of 8
  python tools/export_sam_masks.py --images data/DF2K_train_HR --from-masks data/sam_out --spe cosine \\
      --out data/df2k_cosine                                       # reuse saved masks, no SAM needed
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _shard_list(text: str) -> list[int]:
  out = []
  for part in text.split(","):
    if "-" in part:
      a, b = part.split("-")
      out.extend(range(int(a), int(b) + 1))
    elif part:
      out.append(int(part))
  return out


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
  io = p.add_argument_group("input / output")
  io.add_argument("--images", help="folder of HR images (png/jpg/bmp/tif) or a prepared TFDS dataset name")
  io.add_argument("--out", required=True, help="output folder (shards, manifest.json, masks/)")
  io.add_argument("--tfds-data-dir", default=None, help="TFDS data dir holding the prepared dataset")
  io.add_argument("--tfds-split", default="train")
  io.add_argument("--tfds-image-key", default=None, help="TFDS feature holding the HR image (default: hr/image)")
  io.add_argument("--split", default="train", help="name of the exported split (shard file prefix)")
  seg = p.add_argument_group("segmentation")
  seg.add_argument("--segmenter", choices=["sam", "felzenszwalb", "slic"], default="sam")
  seg.add_argument("--from-masks", default=None, metavar="DIR",
                   help="read masks from DIR/<image id>.json (saved with --keep-masks, or amg.py RLE output) "
                        "instead of segmenting")
  seg.add_argument("--checkpoint", help="SAM weights file (e.g. sam_vit_h_4b8939.pth)")
  seg.add_argument("--model-type", choices=["vit_h", "vit_l", "vit_b"], default="vit_h")
  seg.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
  for name, typ in (("points-per-side", int), ("points-per-batch", int), ("pred-iou-thresh", float),
                    ("stability-score-thresh", float), ("box-nms-thresh", float), ("crop-n-layers", int),
                    ("min-mask-region-area", int)):
    seg.add_argument(f"--{name}", type=typ, default=None, help="SAM generator option (default: SAM's)")
  seg.add_argument("--fz-scale", type=float, default=200.0, help="Felzenszwalb scale")
  seg.add_argument("--fz-sigma", type=float, default=0.8)
  seg.add_argument("--fz-min-size", type=int, default=100)
  seg.add_argument("--slic-segments", type=int, default=200)
  seg.add_argument("--slic-compactness", type=float, default=10.0)
  seg.add_argument("--keep-masks", action="store_true", help="also save the masks (COCO RLE) under OUT/masks/")
  t = p.add_argument_group("SPE and tiles")
  t.add_argument("--spe", choices=["rope", "cosine", "sincos", "linear"], default="rope")
  t.add_argument("--scale", type=int, default=4)
  t.add_argument("--tile-size", type=int, default=320)
  t.add_argument("--tile-step", type=int, default=320)
  t.add_argument("--min-tile", type=int, default=160,
                 help="keep an edge tile when more than this many pixels remain (official thresh_size)")
  t.add_argument("--seed", type=int, default=0, help="seed of the random 'linear' SPE")
  r = p.add_argument_group("running")
  r.add_argument("--num-shards", type=int, default=16)
  r.add_argument("--shard-index", type=_shard_list, default=None,
                 help="only these shards (e.g. 3 or 0,2 or 4-7): split the work over machines/GPUs")
  r.add_argument("--on-error", choices=["skip", "fail"], default="fail",
                 help="unreadable image: skip it (listed in the manifest) or stop")
  r.add_argument("--workers", type=int, default=0, help="parallel processes over shards (CPU segmenters)")
  r.add_argument("--no-progress", action="store_true")
  r.add_argument("--finalize", action="store_true", help="only rebuild manifest.json from finished shards")
  return p


def make_segmenter(args):
  from diffssr_jax.data import segmenters
  if args.segmenter == "sam":
    if not args.checkpoint:
      raise segmenters.SegmenterError("--segmenter sam needs --checkpoint (or use --segmenter felzenszwalb)")
    opts = {k: getattr(args, k) for k in ("points_per_side", "points_per_batch", "pred_iou_thresh",
                                          "stability_score_thresh", "box_nms_thresh", "crop_n_layers",
                                          "min_mask_region_area") if getattr(args, k) is not None}
    return segmenters.SamSegmenter(args.checkpoint, args.model_type, args.device, **opts)
  if args.segmenter == "felzenszwalb":
    return segmenters.FelzenszwalbSegmenter(args.fz_scale, args.fz_sigma, args.fz_min_size)
  return segmenters.SlicSegmenter(args.slic_segments, args.slic_compactness)


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  from diffssr_jax.data import export, hr_sources, segmenters
  try:
    if args.finalize:
      man = export.write_manifest(args.out, args.split)
      s = man["splits"][args.split]
      print(f"manifest: {s['num_records']} records in {len(s['shards'])}/{s['num_shards']} shards")
      return 0
    if not args.images:
      raise export.ExportError("--images is required")
    cfg = export.ExportConfig(scale=args.scale, tile_size=args.tile_size, tile_step=args.tile_step,
                              min_tile=args.min_tile, spe_kind=args.spe, num_shards=args.num_shards,
                              split=args.split, seed=args.seed, keep_masks=args.keep_masks)
    cfg.validate()
    if args.segmenter == "sam" and not args.from_masks and args.workers > 1:
      raise export.ExportError("--workers > 1 would load SAM once per process; run one process per GPU "
                               "with --shard-index instead")
    source = hr_sources.open_source(args.images, args.tfds_data_dir, args.tfds_split, args.tfds_image_key)
    segmenter = None if args.from_masks else make_segmenter(args)
    man = export.run_export(source, args.out, cfg, segmenter=segmenter, masks_dir=args.from_masks,
                            shard_indices=args.shard_index, on_error=args.on_error,
                            progress=not args.no_progress, workers=args.workers)
  except (export.ExportError, segmenters.SegmenterError, hr_sources.SourceError, FileNotFoundError,
          ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  s = man["splits"][cfg.split]
  print(f"done: {s['num_records']} tiles from {s['num_images_done']} images in {len(s['shards'])}/"
        f"{s['num_shards']} shards ({len(s['skipped'])} skipped){'' if s['complete'] else ' [incomplete]'}"
        f" -> {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
