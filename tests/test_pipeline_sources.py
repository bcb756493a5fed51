"""Evaluation folders and the scikit-image demo dataset."""
import numpy as np
import pytest
from PIL import Image

from diffssr_jax.data import demo, eval_sources, pipeline
from diffssr_jax.data.source import TileSource
from diffssr_jax.data.imresize import imresize


def _img(h, w, seed):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)


def test_hr_folder_makes_lr_by_matlab_bicubic(tmp_path):
  Image.fromarray(_img(50, 63, 0)).save(tmp_path / "baby.png")
  Image.fromarray(_img(40, 40, 1)[:, :, 0]).save(tmp_path / "grey.bmp")
  src = eval_sources.HRFolder(tmp_path, scale=4)
  assert src.names == ["baby", "grey"]
  e = src[0]
  assert e.hr.shape == (48, 60, 3) and e.lr.shape == (12, 15, 3)
  np.testing.assert_array_equal(e.hr, _img(50, 63, 0)[:48, :60])
  np.testing.assert_array_equal(e.lr, imresize(e.hr, 0.25))
  np.testing.assert_allclose(e.lr_up, (imresize(e.lr / 256, 4) - 0.5) / 0.5, atol=1e-6)
  assert e.lr_up.dtype == np.float32
  with pytest.warns(UserWarning, match="greyscale"):
    g = src[1]
  assert g.hr.shape == (40, 40, 3)
  e255 = eval_sources.HRFolder(tmp_path, scale=4, lr_up_divisor=255.0)[0]
  assert not np.allclose(e255.lr_up, e.lr_up)


def test_paired_folders_match_by_base_name(tmp_path):
  hr_dir, lr_dir = tmp_path / "HR", tmp_path / "LR"
  hr_dir.mkdir()
  lr_dir.mkdir()
  for name, seed in (("0801", 0), ("0802", 1)):
    hr = _img(33, 42, seed)
    Image.fromarray(hr).save(hr_dir / f"{name}.png")
    Image.fromarray(imresize(hr[:32, :40], 0.25)).save(lr_dir / f"{name}x4.png")
  src = eval_sources.open_eval_source(hr_dir, lr_dir, scale=4)
  assert src.names == ["0801", "0802"]
  e = src[1]
  assert e.hr.shape == (32, 40, 3) and e.lr.shape == (8, 10, 3)
  np.testing.assert_array_equal(e.lr, imresize(_img(33, 42, 1)[:32, :40], 0.25))
  Image.fromarray(_img(8, 8, 3)).save(lr_dir / "0803x4.png")
  with pytest.raises(eval_sources.EvalSourceError, match="0803"):
    eval_sources.PairedFolders(hr_dir, lr_dir, scale=4)
  (lr_dir / "0803x4.png").unlink()
  Image.fromarray(_img(9, 10, 3)).save(lr_dir / "0801x4.png")
  with pytest.raises(eval_sources.EvalSourceError, match="0801"):
    eval_sources.PairedFolders(hr_dir, lr_dir, scale=4)[0]
  assert eval_sources.lr_base_name("img_001_SRF_4_LR", 4) == "img_001"
  assert eval_sources.hr_base_name("img_001_SRF_4_HR", 4) == "img_001"


def test_demo_dataset_builds_trains_and_is_reused(tmp_path):
  out = tmp_path / "demo"
  r = demo.build_demo_dataset(out, tile_size=160)  # smaller tiles: faster, same code path
  s = r["manifest"]["splits"]["train"]
  assert s["complete"] and s["num_records"] > 20
  val = eval_sources.HRFolder(r["val_dir"])
  train_ids = {TileSource(r["train_files"])[i]["image_id"] for i in range(s["num_records"])}
  assert train_ids and not train_ids & set(val.names)  # split by image
  cfg = pipeline.default_data_config()
  cfg.train_files = r["train_files"]
  cfg.patch_size = 64
  cfg.num_workers = 0
  b = next(pipeline.make_train_iterator(cfg, scale=4, seed=0, batch_size=2))
  assert b["hr"].shape == (2, 64, 64, 3)
  before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tfrecord")}
  demo.build_demo_dataset(out, tile_size=160)
  assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tfrecord")} == before
