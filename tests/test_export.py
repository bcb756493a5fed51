"""SPE export: tiling rule, HR/LR/SPE alignment, resume, sharding, error policy, masks, SAM, no-jax tool."""
import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from diffssr_jax import conventions, fileio, images
from diffssr_jax.data import spe as spe_lib
from diffssr_jax.data import export, hr_sources, records, rle, segmenters, tfrecord
from diffssr_jax.data.imresize import imresize

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = dict(scale=4, tile_size=64, tile_step=64, min_tile=32)


class ColorSegmenter:
  """Regions = pixels of one colour (so the true SPE regions are visible in the HR image itself)."""
  name = "color"

  def __call__(self, img):
    _, inv = np.unique(img.reshape(-1, 3), axis=0, return_inverse=True)
    return segmenters.Segmentation(labels=inv.reshape(img.shape[:2]).astype(np.int32))

  def describe(self):
    return {"name": self.name}


def _blocks(h, w, seed):
  rng = np.random.default_rng(seed)
  img = np.zeros((h, w, 3), np.uint8)
  for _ in range(12):
    y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
    img[y:y + rng.integers(8, h // 2), x:x + rng.integers(8, w // 2)] = rng.integers(0, 256, 3)
  return img


def _photo(name, h, w):
  import skimage.data
  return getattr(skimage.data, name)()[:h, :w]


def _folder(tmp_path, imgs):
  d = tmp_path / "hr"
  d.mkdir()
  for name, arr in imgs.items():
    Image.fromarray(arr).save(d / f"{name}.png")
  return d


def _tiles(out_dir):
  out = []
  for f in tfrecord.expand_files(out_dir):
    out.extend(records.decode_tile(r, scale=4) for r in tfrecord.iter_records(f))
  return out


def _shard_bytes(out_dir):
  return {f.name: f.read_bytes() for f in sorted(pathlib.Path(out_dir).glob("*.tfrecord"))}


def test_tile_origins_follow_official_rule():
  def official(n, crop, thresh):
    starts, x = [], 0
    while x < n - thresh:
      starts.append(x)
      x += crop
    return starts
  for n in (0, 100, 160, 161, 320, 480, 481, 644, 1356, 2040):
    assert export.tile_starts(n, 320, 160) == official(n, 320, 160)
  assert export.tile_origins(512, 700, 320, 160) == [(0, 0), (0, 320), (320, 0), (320, 320)]


def test_tiles_align_hr_lr_spe(tmp_path):
  imgs = {"a": _blocks(203, 262, 0), "b": _blocks(130, 150, 1)}
  src = hr_sources.FolderSource(_folder(tmp_path, imgs))
  cfg = export.ExportConfig(**SMALL, num_shards=2)
  export.run_export(src, tmp_path / "out", cfg, segmenter=ColorSegmenter(), progress=False)
  tiles = _tiles(tmp_path / "out")
  seen = {}
  for t in tiles:
    full = conventions.trim_to_scale(imgs[t.image_id], 4)
    whole_spe = spe_lib.compute_spe_labels(ColorSegmenter()(full).labels, "rope")
    whole_lr = imresize(full, 0.25)
    np.testing.assert_array_equal(t.hr, full[t.y:t.y + 64, t.x:t.x + 64])
    np.testing.assert_array_equal(t.lr, whole_lr[t.y // 4:t.y // 4 + t.hr.shape[0] // 4,
                                                 t.x // 4:t.x // 4 + t.hr.shape[1] // 4])
    np.testing.assert_array_equal(t.spe, whole_spe[t.y:t.y + 64, t.x:t.x + 64])
    assert t.hr_size == full.shape[:2]
    # Alignment seen in the data itself: SPE regions are exactly the colour regions of the HR tile.
    _, inv = np.unique(t.hr.reshape(-1, 3), axis=0, return_inverse=True)
    pairs = set(zip(inv.tolist(), t.spe.ravel().tolist()))
    assert len(pairs) == len(set(inv.tolist())) == len(set(t.spe.ravel().tolist()))
    seen.setdefault(t.image_id, []).append((t.y, t.x, t.hr.shape[:2]))
  # 'a' trimmed to 200x260: rows 0, 64, 128 (128 < 168), cols 0..192; edge tiles cut short.
  assert sorted(seen["a"]) == [(y, x, (min(64, 200 - y), min(64, 260 - x)))
                               for y in (0, 64, 128) for x in (0, 64, 128, 192)]
  assert len(seen["b"]) == 4  # 128x148: rows 0, 64; cols 0, 64 (128 is not < 148 - 32)


def test_official_lr_coordinate_crop_would_misalign():
  """The official crop of the SPE with LR coordinates (issue #13) does not match its HR tile."""
  full = _blocks(256, 256, 3)
  whole_spe = spe_lib.compute_spe_labels(ColorSegmenter()(full).labels, "rope")
  y = x = 128
  buggy = whole_spe[y // 4:(y + 64) // 4, x // 4:(x + 64) // 4]
  ours = whole_spe[y:y + 64, x:x + 64]
  assert buggy.shape != ours.shape or not np.array_equal(buggy, ours)


class _Interrupt(Exception):
  pass


class _FailingAfter:
  def __init__(self, inner, n):
    self.inner, self.n, self.calls = inner, n, 0

  def __call__(self, img):
    self.calls += 1
    if self.calls > self.n:
      raise _Interrupt("simulated crash")
    return self.inner(img)

  def describe(self):
    return self.inner.describe()


def test_interrupted_export_resumes_to_identical_bytes(tmp_path):
  imgs = {f"im{i}": _blocks(140 + 8 * i, 150, i) for i in range(5)}
  src = hr_sources.FolderSource(_folder(tmp_path, imgs))
  cfg = export.ExportConfig(**SMALL, num_shards=2)
  seg = segmenters.FelzenszwalbSegmenter(scale=50)
  export.run_export(src, tmp_path / "ref", cfg, segmenter=seg, progress=False)
  want = _shard_bytes(tmp_path / "ref")
  out = tmp_path / "resumed"
  with pytest.raises(_Interrupt):
    export.run_export(src, out, cfg, segmenter=_FailingAfter(seg, 3), progress=False)
  assert not list(out.glob("*.tfrecord")) or len(list(out.glob("*.tfrecord"))) < 2
  state = out / export.STATE_DIR
  partial = sorted(state.glob("*.partial"))
  assert partial, "an interrupted shard must leave its partial file"
  with open(partial[0], "ab") as f:  # a torn record write after the last journal line
    f.write(b"\x00garbage-from-a-killed-writer")
  calls = _FailingAfter(seg, 10**9)
  man = export.run_export(src, out, cfg, segmenter=calls, progress=False)
  assert calls.calls == 2, "only the two unfinished images are segmented again"
  assert _shard_bytes(out) == want
  s = man["splits"]["train"]
  assert s["complete"] and s["num_images_done"] == 5
  for sh in s["shards"]:
    assert sh["sha256"] == fileio.file_sha256(out / sh["file"])
  calls = _FailingAfter(seg, 0)  # a finished export is not redone
  export.run_export(src, out, cfg, segmenter=calls, progress=False)
  assert calls.calls == 0


class _SigtermAt:
  """A segmenter that sends this process SIGTERM while segmenting its n-th image (a preemption notice)."""

  def __init__(self, inner, n):
    self.inner, self.n, self.calls = inner, n, 0

  def __call__(self, img):
    self.calls += 1
    if self.calls == self.n:
      os.kill(os.getpid(), signal.SIGTERM)
    return self.inner(img)

  def describe(self):
    return self.inner.describe()


def test_sigterm_finishes_the_image_and_the_rerun_continues(tmp_path):
  from diffssr_jax import preemption
  imgs = {f"im{i}": _blocks(136, 136, i) for i in range(4)}
  src = hr_sources.FolderSource(_folder(tmp_path, imgs))
  cfg = export.ExportConfig(**SMALL, num_shards=1)
  seg = segmenters.FelzenszwalbSegmenter(scale=50)
  export.run_export(src, tmp_path / "ref", cfg, segmenter=seg, progress=False)
  out = tmp_path / "out"
  with preemption.handle_sigterm(), pytest.raises(preemption.Preempted, match=r"after image 'im\d' \(2 of 4 images"):
    export.run_export(src, out, cfg, segmenter=_SigtermAt(seg, 2), progress=False)
  calls = _FailingAfter(seg, 10**9)
  export.run_export(src, out, cfg, segmenter=calls, progress=False)
  assert calls.calls == 2, "the two finished images are not segmented again"
  assert _shard_bytes(out) == _shard_bytes(tmp_path / "ref")


def test_one_split_and_one_tile_geometry_per_folder(tmp_path):
  """The issue's command: a val export with 96 px tiles into the train export's --out is refused, and a
  folder mixed by the old code (val shards and their manifest entry beside the train ones), or a shard its
  manifest does not list, is refused by training's input check instead of read as one dataset."""
  from diffssr_jax.data import pipeline, source
  imgs = {f"im{i}": _blocks(136, 136, i) for i in range(3)}
  src = hr_sources.FolderSource(_folder(tmp_path, imgs))
  seg = segmenters.FelzenszwalbSegmenter(scale=50)
  out = tmp_path / "out"
  export.run_export(src, out, export.ExportConfig(**SMALL, num_shards=1), segmenter=seg, progress=False)
  before = sorted(p.name for p in out.rglob("*"))
  val = export.ExportConfig(**{**SMALL, "tile_size": 96, "tile_step": 96}, num_shards=1, split="val")
  with pytest.raises(export.ExportError, match="holds the 'train' split; one split per folder"):
    export.run_export(src, out, val, segmenter=seg, progress=False)
  assert sorted(p.name for p in out.rglob("*")) == before
  assert source.manifest_for(out)["config"]["tile_size"] == 64

  other = tmp_path / "val"
  export.run_export(src, other, val, segmenter=seg, progress=False)
  (shard,) = other.glob("val-*.tfrecord")
  (out / shard.name).write_bytes(shard.read_bytes())
  with pytest.raises(source.MixedExportError, match="not listed in"):
    source.manifest_for(out)
  man = json.loads((out / "manifest.json").read_text())
  man["splits"]["val"] = json.loads((other / "manifest.json").read_text())["splits"]["val"]
  (out / "manifest.json").write_text(json.dumps(man))
  cfg = pipeline.default_data_config()
  cfg.train_files = str(out)
  cfg.patch_size = 32
  with pytest.raises(source.MixedExportError, match=r"split 'train' \(scale 4, tiles 64 px.*split 'val' \(scale 4, tiles 96"):
    pipeline.make_source({**pipeline._as_dict(cfg, 4)})


def test_shards_split_over_machines_equal_single_run(tmp_path):
  imgs = {f"im{i}": _blocks(136, 136, i) for i in range(4)}
  src = hr_sources.FolderSource(_folder(tmp_path, imgs))
  cfg = export.ExportConfig(**SMALL, num_shards=3)
  seg = ColorSegmenter()
  export.run_export(src, tmp_path / "one", cfg, segmenter=seg, progress=False)
  out = tmp_path / "many"
  m = export.run_export(src, out, cfg, segmenter=seg, shard_indices=[1], progress=False)
  assert not m["splits"]["train"]["complete"] and m["splits"]["train"]["missing_shards"] == [0, 2]
  export.run_export(src, out, cfg, segmenter=seg, shard_indices=[2, 0], progress=False)
  assert _shard_bytes(out) == _shard_bytes(tmp_path / "one")
  assert export.assign_shards(["d", "a", "c", "b"], 3) == [["a", "d"], ["b"], ["c"]]
  ids = sorted({t.image_id for t in _tiles(out / "train-00000-of-00003.tfrecord")})
  assert ids == ["im0", "im3"]
  with pytest.raises(export.ExportError, match=r"other settings \(config\.spe_kind: '\w+' there, 'cosine' now\)"):
    export.run_export(src, out, export.ExportConfig(**SMALL, num_shards=3, spe_kind="cosine"),
                      segmenter=seg, progress=False)


def test_unreadable_image_skip_or_fail(tmp_path):
  d = _folder(tmp_path, {"good": _blocks(136, 136, 0)})
  (d / "broken.png").write_bytes(b"\x89PNG not really")
  src = hr_sources.FolderSource(d)
  cfg = export.ExportConfig(**SMALL, num_shards=1)
  with pytest.raises(export.ExportError, match="broken.png"):
    export.run_export(src, tmp_path / "fail", cfg, segmenter=ColorSegmenter(), on_error="fail", progress=False)
  m = export.run_export(src, tmp_path / "skip", cfg, segmenter=ColorSegmenter(), on_error="skip",
                        progress=False)
  s = m["splits"]["train"]
  assert len(s["skipped"]) == 1 and "broken.png" in s["skipped"][0]["path"]
  assert "broken.png" in s["skipped"][0]["error"]
  assert {t.image_id for t in _tiles(tmp_path / "skip")} == {"good"}


def test_input_conversions_warn(tmp_path):
  d = tmp_path / "in"
  d.mkdir()
  g = _blocks(136, 136, 0)[:, :, 0]
  Image.fromarray(g).save(d / "grey.png")
  Image.fromarray(np.dstack([_blocks(136, 136, 1), np.full((136, 136), 200, np.uint8)])).save(d / "rgba.png")
  Image.fromarray((g.astype(np.uint16) * 257)).save(d / "deep.png")
  deep_rgb = np.random.default_rng(0).integers(0, 65536, (136, 136, 3)).astype(np.uint16)
  images.save_png(d / "deep_rgb.png", deep_rgb)  # 16-bit colour: Pillow could not write or read it
  src = hr_sources.FolderSource(d)
  for name, note in (("grey", "greyscale"), ("rgba", "alpha"), ("deep", "greyscale"), ("deep_rgb", "16-bit")):
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      img = src.load(name)
    assert img.dtype == np.uint8 and img.shape == (136, 136, 3)
    assert any(note in str(w.message) and name in str(w.message) for w in caught)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    np.testing.assert_array_equal(src.load("deep")[:, :, 0], g)
    np.testing.assert_array_equal(src.load("deep_rgb"), images.to_uint8(deep_rgb))


def test_rle_round_trip_and_coco_strings():
  m = np.array([[0, 1], [1, 1]], bool)
  r = rle.encode(m)
  assert r == {"size": [2, 2], "counts": "13"}  # column-major runs [1, 3]
  rng = np.random.default_rng(0)
  for shape in ((1, 1), (7, 5), (64, 48)):
    for p in (0.0, 0.5, 1.0):
      mask = rng.random(shape) < p
      np.testing.assert_array_equal(rle.decode(rle.encode(mask)), mask)
      assert rle.area(rle.encode(mask)) == mask.sum()
  counts = [5, 2, 3, 1, 400, 70000, 2]  # differences go negative and large
  assert rle.string_to_counts(rle.counts_to_string(counts)) == counts
  assert rle.counts_to_string([5, 2, 3, 1]) == "523O"
  np.testing.assert_array_equal(rle.decode({"size": [2, 2], "counts": [1, 3]}), m)
  with pytest.raises(rle.RLEError):
    rle.decode({"size": [2, 2], "counts": [1, 2]})


def test_keep_masks_then_recompute_spe_from_masks(tmp_path):
  imgs = {"ph": _photo("astronaut", 136, 140)}
  src = hr_sources.FolderSource(_folder(tmp_path, imgs))
  seg = segmenters.SlicSegmenter(n_segments=30)
  cfg = export.ExportConfig(**SMALL, num_shards=1, keep_masks=True)
  export.run_export(src, tmp_path / "a", cfg, segmenter=seg, progress=False)
  masks = rle.read_mask_file(tmp_path / "a" / "masks" / "ph.json")
  assert masks.shape[1:] == (136, 140) and masks.shape[0] == seg(imgs["ph"][:136, :140]).count
  # Same SPE kind from the saved masks: the same records.
  export.run_export(src, tmp_path / "b", export.ExportConfig(**SMALL, num_shards=1),
                    masks_dir=tmp_path / "a" / "masks", progress=False)
  assert _shard_bytes(tmp_path / "a") == _shard_bytes(tmp_path / "b")
  # Another SPE variant without running the segmenter.
  export.run_export(src, tmp_path / "c", export.ExportConfig(**SMALL, num_shards=1, spe_kind="cosine"),
                    masks_dir=tmp_path / "a" / "masks", progress=False)
  whole = spe_lib.spe_cosine(masks).astype(np.float32)
  for t in _tiles(tmp_path / "c"):
    np.testing.assert_array_equal(t.spe, whole[t.y:t.y + 64, t.x:t.x + 64])


def _tiny_sam(seed=0, dim=16):
  import torch
  from functools import partial
  segmenters.import_segment_anything()
  from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
  torch.manual_seed(seed)
  enc = ImageEncoderViT(img_size=64, patch_size=16, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0,
                        out_chans=dim, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                        use_rel_pos=True, window_size=0, global_attn_indexes=())
  pe = PromptEncoder(embed_dim=dim, image_embedding_size=(4, 4), input_image_size=(64, 64), mask_in_chans=4)
  md = MaskDecoder(num_multimask_outputs=3, transformer_dim=dim, iou_head_depth=1, iou_head_hidden_dim=16,
                   transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=32, num_heads=2))
  return Sam(enc, pe, md, pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])


def test_file_sha256_known_value_and_sam_checkpoint_digest(tmp_path):
  (tmp_path / "abc").write_bytes(b"abc")
  assert fileio.file_sha256(tmp_path / "abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
  import torch
  ckpt = tmp_path / "tiny_sam.pth"
  torch.save(_tiny_sam(0).state_dict(), ckpt)
  sam = segmenters.SamSegmenter(ckpt, model=_tiny_sam(0), device="cpu")
  d = sam.describe()
  assert d["checkpoint"] == "tiny_sam.pth"
  assert d["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()


def test_export_through_tiny_sam(tmp_path):
  import torch
  ckpt = tmp_path / "tiny_sam.pth"
  torch.save(_tiny_sam(0).state_dict(), ckpt)
  model = _tiny_sam(1)
  segmenters.load_sam_weights(model, ckpt)
  sam = segmenters.SamSegmenter(model=model, device="cpu", points_per_side=4, pred_iou_thresh=0.0,
                                stability_score_thresh=0.0)
  imgs = {"ph": _photo("coffee", 136, 200)}
  src = hr_sources.FolderSource(_folder(tmp_path, imgs))
  cfg = export.ExportConfig(**SMALL, num_shards=1, keep_masks=True)
  m = export.run_export(src, tmp_path / "out", cfg, segmenter=sam, progress=False)
  assert m["splits"]["train"]["segmenter"]["params"]["points_per_side"] == 4
  masks = rle.read_mask_file(tmp_path / "out" / "masks" / "ph.json")
  assert masks.shape[0] >= 1
  whole = spe_lib.spe_rope(masks)
  tiles = _tiles(tmp_path / "out")
  assert len(tiles) == 6 and all(t.segments == masks.shape[0] for t in tiles)
  for t in tiles:
    np.testing.assert_array_equal(t.spe, whole[t.y:t.y + 64, t.x:t.x + 64])
  with pytest.raises(segmenters.SegmenterError, match="does not fit"):
    segmenters.load_sam_weights(_tiny_sam(0, dim=8), ckpt)
  with pytest.raises(segmenters.SegmenterError, match="not found"):
    segmenters.SamSegmenter(tmp_path / "nope.pth", "vit_b")


def test_torchvision_fallback_nms_matches_bruteforce():
  import torch
  from diffssr_jax.data import torchvision_fallback as tv
  rng = np.random.default_rng(0)
  xy = rng.random((60, 2)) * 50
  boxes = torch.tensor(np.concatenate([xy, xy + 5 + rng.random((60, 2)) * 20], 1), dtype=torch.float32)
  scores = torch.tensor(rng.random(60), dtype=torch.float32)
  cats = torch.tensor(rng.integers(0, 2, 60))
  keep = tv.batched_nms(boxes, scores, cats, 0.3).tolist()
  iou = tv.box_iou(boxes, boxes).numpy()
  want = []
  for i in np.argsort(-scores.numpy(), kind="stable"):
    if all(not (cats[i] == cats[j] and iou[i, j] > 0.3) for j in want):
      want.append(int(i))
  assert keep == want
  im = tv.to_pil_image(np.zeros((10, 20, 3), np.uint8))
  assert np.asarray(tv.resize(im, (30, 40))).shape == (30, 40, 3)


def _run_tool(args, tmp_path, env_extra=None):
  fake = tmp_path / "fakejax"
  (fake / "jax").mkdir(parents=True, exist_ok=True)
  (fake / "jax" / "__init__.py").write_text("raise ImportError('jax must not be imported by the export tool')\n")
  env = dict(os.environ, PYTHONPATH=f"{fake}{os.pathsep}{ROOT}", **(env_extra or {}))
  return subprocess.run([sys.executable, str(ROOT / "tools" / "export_sam_masks.py"), *args],
                        capture_output=True, text=True, env=env, timeout=300)


def test_tool_runs_without_jax(tmp_path):
  """The tool as users run it (a fake jax that fails on import proves jax is never loaded): both flag
  spellings, a summary that counts skipped images apart from exported ones, one-line errors (exit 1; a bad
  command line 2)."""
  d = _folder(tmp_path, {"a": _photo("rocket", 136, 136), "small": _photo("rocket", 24, 24)})
  (d / "broken.png").write_bytes(b"\x89PNG not really")
  out = tmp_path / "out"
  r = _run_tool(["--images", str(d), "--out", str(out), "--segmenter", "felzenszwalb", "--num-shards", "1",
                 "--tile-size", "64", "--tile_step", "64", "--min_tile", "32", "--no-progress", "--on-error", "skip"],
                tmp_path)
  assert r.returncode == 0, r.stderr
  assert "done: 4 tiles from 1 images (1 skipped, 1 too small for a tile) in 1/1 shards" in r.stdout
  man = json.loads((out / "manifest.json").read_text())
  assert man["splits"]["train"]["num_records"] == 4 and man["splits"]["train"]["num_images_done"] == 3
  r = _run_tool(["--images", str(d), "--out", str(tmp_path / "o2"), "--segmenter", "sam", "--checkpoint",
                 str(tmp_path / "missing.pth")], tmp_path)
  assert r.returncode == 1 and "missing.pth not found" in r.stderr and "Traceback" not in r.stderr
  r = _run_tool(["--images", "no_such_tfds_dataset", "--tfds_data_dir", str(tmp_path / "tfds"), "--out",
                 str(tmp_path / "o3"), "--segmenter", "felzenszwalb"], tmp_path)
  assert r.returncode == 1 and "not prepared" in r.stderr
  r = _run_tool(["--images", str(d), "--segmenter", "felzenszwalb", "--shard-index", "x"], tmp_path)
  assert r.returncode == 2 and r.stderr.count("error:") == 1 and "--out is required" in r.stderr
  import torch
  torch.save(_tiny_sam(0).state_dict(), tmp_path / "tiny.pth")
  r = _run_tool(["--images", str(d), "--out", str(tmp_path / "o4"), "--segmenter", "sam", "--model-type", "vit_b",
                 "--checkpoint", str(tmp_path / "tiny.pth"), "--device", "cpu"], tmp_path)
  assert r.returncode == 1 and "does not fit this SAM model" in r.stderr, r.stderr
  code = "import sys, runpy; runpy.run_path(sys.argv[1]); import jax"
  r = subprocess.run([sys.executable, "-c", code, str(ROOT / "tools" / "export_sam_masks.py")],
                     capture_output=True, text=True, timeout=120,
                     env=dict(os.environ, PYTHONPATH=f"{tmp_path / 'fakejax'}{os.pathsep}{ROOT}"))
  assert "jax must not be imported" in r.stderr  # the fake really blocks jax


_SLOW_EXPORT = """
import sys, time
sys.path.insert(0, sys.argv[3])
from diffssr_jax.data import export, hr_sources, segmenters

class Slow:
  def __init__(self):
    self.inner = segmenters.FelzenszwalbSegmenter(scale=50)

  def __call__(self, img):
    time.sleep(0.4)
    return self.inner(img)

  def describe(self):
    return self.inner.describe()

cfg = export.ExportConfig(scale=4, tile_size=64, tile_step=64, min_tile=32, num_shards=1)
export.run_export(hr_sources.FolderSource(sys.argv[1]), sys.argv[2], cfg, segmenter=Slow(), progress=False)
"""


def test_killed_export_process_resumes_to_identical_bytes(tmp_path):
  import time
  imgs = {f"im{i}": _blocks(136, 140, 10 + i) for i in range(6)}
  d = _folder(tmp_path, imgs)
  cfg = export.ExportConfig(**SMALL, num_shards=1)
  seg = segmenters.FelzenszwalbSegmenter(scale=50)
  export.run_export(hr_sources.FolderSource(d), tmp_path / "ref", cfg, segmenter=seg, progress=False)
  out = tmp_path / "killed"
  proc = subprocess.Popen([sys.executable, "-c", _SLOW_EXPORT, str(d), str(out), str(ROOT)])
  journal = out / export.STATE_DIR / "train-00000-of-00001.tfrecord.journal"
  deadline = time.time() + 120
  try:
    while time.time() < deadline and proc.poll() is None:
      if journal.is_file() and journal.read_text().count("\n") >= 3:  # header + two finished images
        break
      time.sleep(0.05)
  finally:
    proc.kill()  # SIGKILL: no cleanup handlers run
    proc.wait()
  assert not (out / "train-00000-of-00001.tfrecord").exists(), "the process finished before it was killed"
  export.run_export(hr_sources.FolderSource(d), out, cfg, segmenter=seg, progress=False)
  assert _shard_bytes(out) == _shard_bytes(tmp_path / "ref")
