"""Throughput of the data half, printed as JSON (a measurement tool, not a test).

  python -m diffssr_jax.benchmarks.data pipeline [--files GLOB_OR_DIR] [--batch_size 16] [--num_workers 2]
  python -m diffssr_jax.benchmarks.data export [--images DIR] [--segmenter felzenszwalb] [--workers 0]

Without --files / --images the scikit-image demo photographs are used (built into a temporary folder).
`pipeline` reports training samples/s after a warm-up; `export` reports images/s and tiles/s of the full
export and the time per image spent in each stage (read, segment, SPE, LR resize, tile encoding).
"""
from __future__ import annotations

import json
import os
import pathlib
import tempfile
import sys
import time
import types

from absl import flags

from diffssr_jax import cli, storage



def bench_pipeline(files, batch_size: int, num_workers: int, steps: int, warmup: int, patch_size: int,
                   read_threads: int, augment: bool, scale: int = 4) -> dict:
  from diffssr_jax.data import pipeline
  cfg = pipeline.default_data_config()
  cfg.train_files = files
  cfg.num_workers = num_workers
  cfg.patch_size = patch_size
  cfg.read_threads = read_threads
  cfg.hflip = cfg.rot90 = augment
  it = pipeline.make_train_iterator(cfg, scale=scale, seed=0, batch_size=batch_size)
  t_first = time.perf_counter()
  for _ in range(warmup):
    next(it)
  t0 = time.perf_counter()
  for _ in range(steps):
    next(it)
  dt = time.perf_counter() - t0
  if hasattr(it, "close"):
    it.close()
  return {"benchmark": "pipeline", "files": str(files), "batch_size": batch_size, "num_workers": num_workers,
          "read_threads": read_threads, "patch_size": patch_size, "augment": augment, "steps": steps,
          "warmup_s": round(t0 - t_first, 3), "samples_per_s": round(steps * batch_size / dt, 2),
          "batches_per_s": round(steps / dt, 3), "cpu_count": os.cpu_count()}


def bench_export(images_dir, segmenter_name: str, workers: int, scale: int) -> dict:
  from diffssr_jax import conventions
  from diffssr_jax.data import export, hr_sources, segmenters
  src = hr_sources.FolderSource(images_dir)
  seg = segmenters.make_segmenter(segmenter_name)
  cfg = export.ExportConfig(scale=scale, num_shards=max(1, min(len(src.ids), 2 * max(workers, 1))))
  with tempfile.TemporaryDirectory() as out:
    t0 = time.perf_counter()
    man = export.run_export(src, out, cfg, segmenter=seg, progress=False, workers=workers)
    total = time.perf_counter() - t0
  s = man["splits"][cfg.split]
  # Per-stage time, single process, same images.
  stages = {"read": 0.0, "segment": 0.0, "spe": 0.0, "lr_resize": 0.0, "encode_tiles": 0.0}
  from diffssr_jax.data import records
  from diffssr_jax.data.imresize import imresize
  pixels = 0
  for image_id in src.ids:
    t = time.perf_counter()
    hr = conventions.trim_to_scale(src.load(image_id), scale)
    stages["read"] += time.perf_counter() - t
    pixels += hr.shape[0] * hr.shape[1]
    t = time.perf_counter()
    sg = seg(hr)
    stages["segment"] += time.perf_counter() - t
    t = time.perf_counter()
    spe = segmenters.compute_segmentation_spe(sg, cfg.spe_kind)
    stages["spe"] += time.perf_counter() - t
    t = time.perf_counter()
    lr = imresize(hr, 1 / scale)
    stages["lr_resize"] += time.perf_counter() - t
    t = time.perf_counter()
    for y, x, a, b, c in export.cut_tiles(hr, lr, spe, cfg):
      records.encode_tile(records.Tile(image_id, y, x, a, b, c, sg.count, hr.shape[:2]))
    stages["encode_tiles"] += time.perf_counter() - t
  n = len(src.ids)
  return {"benchmark": "export", "images": n, "tiles": s["num_records"], "segmenter": segmenter_name,
          "workers": workers, "seconds": round(total, 3), "images_per_s": round(n / total, 3),
          "tiles_per_s": round(s["num_records"] / total, 2), "megapixels": round(pixels / 1e6, 3),
          "stage_ms_per_image": {k: round(1e3 * v / n, 1) for k, v in stages.items()},
          "cpu_count": os.cpu_count()}


def define_pipeline_flags(fv) -> None:
  d = dict(flag_values=fv)
  flags.DEFINE_string("files", None, "Shards (glob, folder, file); default: the demo shards.", **d)
  flags.DEFINE_integer("batch_size", 16, "Examples per batch.", **d)
  flags.DEFINE_integer("num_workers", 2, "Grain worker processes.", **d)
  flags.DEFINE_integer("read_threads", 2, "Reader threads per process.", **d)
  flags.DEFINE_integer("steps", 30, "Timed batches.", **d)
  flags.DEFINE_integer("warmup", 3, "Untimed batches first.", **d)
  flags.DEFINE_integer("patch_size", 160, "HR patch side.", **d)
  flags.DEFINE_bool("augment", False, "Random flips and rotations.", **d)
  flags.DEFINE_integer("scale", 4, "The shards' scale.", **d)


def define_export_flags(fv) -> None:
  d = dict(flag_values=fv)
  flags.DEFINE_string("images", None, "Folder of HR images; default: the demo photographs.", **d)
  flags.DEFINE_enum("segmenter", "felzenszwalb", ["felzenszwalb", "slic"], "Classical segmenter.", **d)
  flags.DEFINE_integer("workers", 0, "Export worker processes.", **d)
  flags.DEFINE_integer("scale", 4, "Super-resolution factor.", **d)


COMMANDS = {"pipeline": ("training samples/s of the input pipeline", define_pipeline_flags),
            "export": ("images/s and tiles/s of the mask export, per stage", define_export_flags)}


def main(argv=None) -> None:
  """argv without the program name (default sys.argv[1:])."""
  argv = sys.argv[1:] if argv is None else list(argv)
  what, fv = cli.parse_subcommand(["python -m diffssr_jax.benchmarks.data", *argv], COMMANDS, __doc__)
  args = types.SimpleNamespace(what=what, **fv.flag_values_dict())
  try:  # before any work: a location no backend can serve is refused in one line
    storage.check_all({"--files": getattr(args, "files", None), "--images": getattr(args, "images", None)})
  except storage.StorageError as e:
    raise SystemExit(f"error: {e}") from None
  with tempfile.TemporaryDirectory() as tmp:
    if args.what == "pipeline":
      files = args.files
      if files is None:
        from diffssr_jax.data import demo
        files = demo.build_demo_dataset(pathlib.Path(tmp) / "demo")["train_files"]
      res = bench_pipeline(files, args.batch_size, args.num_workers, args.steps, args.warmup, args.patch_size,
                           args.read_threads, args.augment, args.scale)
    else:
      images_dir = args.images
      if images_dir is None:
        from diffssr_jax import images
        from diffssr_jax.data import demo
        images_dir = pathlib.Path(tmp) / "photos"
        for name, path in {**demo.bundled_photos(demo.TRAIN_PHOTOS), **demo.bundled_photos(demo.VAL_PHOTOS)}.items():
          images.save_png(images_dir / f"{name}.png", images.read_rgb8(path))
      res = bench_export(images_dir, args.segmenter, args.workers, args.scale)
  print(json.dumps(res, indent=1))


if __name__ == "__main__":
  main()
