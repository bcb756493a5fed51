"""--mask_source lr (the paper's Table 3 ablation): masks from the LR image, SPE on the HR grid."""
import json

import numpy as np
from skimage import data as skdata

from diffssr_jax import images
from diffssr_jax.data import export_cli, records, segmenters, tfrecord
from diffssr_jax.data.imresize import imresize


def test_lr_masks_are_those_of_the_lr_image_brought_back_to_hr_size():
  hr = skdata.astronaut()[:64, :96]
  seg = segmenters.FelzenszwalbSegmenter(min_size=20)
  lr_seg = segmenters.FromLR(seg, 4)
  want = seg(imresize(imresize(hr, 1 / 4), 4))
  got = lr_seg(hr)
  np.testing.assert_array_equal(got.labels, want.labels)
  assert got.labels.shape == hr.shape[:2]
  assert not np.array_equal(got.labels, seg(hr).labels)  # the LR image loses detail: other regions
  assert lr_seg.describe() == {**seg.describe(), "mask_source": "lr", "mask_source_scale": 4}


def test_export_cli_mask_source_lr(tmp_path, capsys):
  hr = skdata.astronaut()[:64, :64]
  images.save_png(tmp_path / "hr" / "a.png", hr)
  args = ["export", "--images", str(tmp_path / "hr"), "--segmenter", "felzenszwalb", "--fz_min_size", "20",
          "--num_shards", "1", "--tile_size", "64", "--tile_step", "64", "--min_tile", "32", "--noprogress"]
  assert export_cli.cli(args + ["--out", str(tmp_path / "lr"), "--mask_source", "lr"]) == 0
  assert export_cli.cli(args + ["--out", str(tmp_path / "hr_out")]) == 0
  spes = {}
  for name in ("lr", "hr_out"):
    (f,) = sorted((tmp_path / name).glob("*.tfrecord"))
    (tile,) = [records.decode_tile(r, scale=4) for r in tfrecord.iter_records(f)]
    spes[name] = tile.spe
  seg = segmenters.FromLR(segmenters.FelzenszwalbSegmenter(min_size=20), 4)(hr)
  np.testing.assert_allclose(spes["lr"], segmenters.compute_segmentation_spe(seg, "rope"), rtol=1e-6)
  assert not np.allclose(spes["lr"], spes["hr_out"])
  manifest = json.loads((tmp_path / "lr" / "manifest.json").read_text())
  assert manifest["splits"]["train"]["segmenter"]["mask_source"] == "lr"
  capsys.readouterr()
  assert export_cli.cli(args + ["--out", str(tmp_path / "x"), "--mask_source", "lr", "--from_masks",
                                str(tmp_path)]) == 2
  assert "not with --from_masks" in capsys.readouterr().err
