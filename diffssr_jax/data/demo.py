"""A small demo dataset from the colour photographs bundled with scikit-image (no download, no SAM).

`build_demo_dataset(out_dir)` exports the training photographs with the Felzenszwalb segmenter into
`out_dir/train-*.tfrecord` + `manifest.json` (official tiling: 320 px tiles, scale 4, RoPE SPE), and
writes the held-out photographs as HR PNGs to `out_dir/val/` (split by image, for `eval_sources.HRFolder`).
Files are read straight from scikit-image's package folder, only when present, so nothing is fetched.
A finished build is detected and reused. Takes ~10 s on 2 CPU cores.
"""
from __future__ import annotations

import pathlib

from diffssr_jax import images

# scikit-image bundles these colour photographs (file names in skimage/data/).
TRAIN_PHOTOS = {"astronaut": "astronaut.png", "rocket": "rocket.jpg", "motorcycle": "motorcycle_left.png",
                "hubble": "hubble_deep_field.jpg", "retina": "retina.jpg", "ihc": "ihc.png"}
VAL_PHOTOS = {"chelsea": "chelsea.png", "coffee": "coffee.png"}


def bundled_photos(names: dict) -> dict[str, pathlib.Path]:
  """{name: path} of the requested photographs that exist in the installed scikit-image."""
  import skimage.data
  root = pathlib.Path(skimage.data.__file__).parent
  return {k: root / f for k, f in names.items() if (root / f).is_file()}


def build_demo_dataset(out_dir, scale: int = 4, spe_kind: str = "rope", num_shards: int = 2,
                       tile_size: int = 320, segmenter=None, progress: bool = False) -> dict:
  """Builds (or reuses) the demo dataset; returns {'train_files', 'val_dir', 'manifest'}."""
  from diffssr_jax.data import export, hr_sources, segmenters
  out = pathlib.Path(out_dir)
  train = bundled_photos(TRAIN_PHOTOS)
  val = bundled_photos(VAL_PHOTOS)
  if not train:
    raise RuntimeError("scikit-image's bundled photographs are missing; reinstall scikit-image")
  hr_dir = out / "hr_train"
  for name, path in train.items():  # a folder source keeps ids stable ('astronaut', ...)
    dst = hr_dir / f"{name}.png"
    if not dst.is_file():
      images.save_png(dst, images.read_rgb8(path))
  val_dir = out / "val"
  for name, path in val.items():
    dst = val_dir / f"{name}.png"
    if not dst.is_file():
      images.save_png(dst, images.read_rgb8(path))
  cfg = export.ExportConfig(scale=scale, tile_size=tile_size, tile_step=tile_size, min_tile=tile_size // 2,
                            spe_kind=spe_kind, num_shards=num_shards)
  seg = segmenter or segmenters.FelzenszwalbSegmenter()
  man = export.run_export(hr_sources.FolderSource(hr_dir), out, cfg, segmenter=seg, progress=progress)
  return {"train_files": str(out / "train-*.tfrecord"), "val_dir": str(val_dir), "manifest": man}
