"""Training pipeline over exported shards: shapes, ranges, alignment, augmentation, state, sharding, errors."""
import shutil

import numpy as np
import pytest

from diffssr_jax import conventions
from diffssr_jax.data import export, hr_sources, pipeline, segmenters, tfrecord
from diffssr_jax.data.source import TileSource
from diffssr_jax.data.imresize import imresize
from reference_data import reference, require

P, S = 64, 4
PHOTOS = {"astronaut": (200, 232), "coffee": (168, 260), "rocket": (180, 180)}
SEG = segmenters.FelzenszwalbSegmenter(scale=100, min_size=50)


def _photo(name):
  import skimage.data
  h, w = PHOTOS[name]
  return getattr(skimage.data, name)()[:h, :w]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  from PIL import Image
  root = tmp_path_factory.mktemp("pipe")
  (root / "hr").mkdir()
  for name in PHOTOS:
    Image.fromarray(_photo(name)).save(root / "hr" / f"{name}.png")
  cfg = export.ExportConfig(scale=S, tile_size=96, tile_step=96, min_tile=64, num_shards=2)
  export.run_export(hr_sources.FolderSource(root / "hr"), root / "out", cfg, segmenter=SEG, progress=False)
  return root / "out"


def _cfg(files, **kw):
  c = pipeline.default_data_config()
  c.train_files = str(files)
  c.patch_size = P
  c.num_workers = 0
  c.read_threads = 1
  c.with_metadata = True
  c.update(kw)
  return c


def _whole(name):
  hr = conventions.trim_to_scale(_photo(name), S)
  spe = segmenters.compute_segmentation_spe(SEG(hr), "rope")
  return hr, imresize(hr, 1 / S), spe


def _to_u8(x):
  return np.round((x * 0.5 + 0.5) * 255).astype(np.uint8)


def test_batches_shapes_ranges_and_alignment(shards):
  src = TileSource(shards, scale=S)
  it = pipeline.make_train_iterator(_cfg(shards, reduce_constant_spe=False), scale=4, seed=3, batch_size=5)
  wholes = {n: _whole(n) for n in PHOTOS}
  for _ in range(3):
    b = next(it)
    assert b["hr"].shape == (5, P, P, 3) and b["lr"].shape == (5, P // S, P // S, 3)
    assert b["lr_up"].shape == (5, P, P, 3) and b["spe"].shape == (5, P, P, 1)
    assert all(b[k].dtype == np.float32 for k in ("hr", "lr", "lr_up", "spe"))
    assert b["hr"].min() >= -1 and b["hr"].max() <= 1 and b["lr"].min() >= -1 and b["lr"].max() <= 1
    assert (b["patch_yx"] % S == 0).all()
    for i in range(5):
      name = src[int(b["record_index"][i])]["image_id"]
      hr, lr, spe = wholes[name]
      y, x = b["patch_yx"][i]
      np.testing.assert_array_equal(_to_u8(b["hr"][i]), hr[y:y + P, x:x + P])
      np.testing.assert_allclose(b["hr"][i], (hr[y:y + P, x:x + P] / 255 - 0.5) / 0.5, atol=1e-6)
      lr_patch = lr[y // S:(y + P) // S, x // S:(x + P) // S]
      np.testing.assert_array_equal(_to_u8(b["lr"][i]), lr_patch)
      np.testing.assert_array_equal(b["spe"][i, :, :, 0], spe[y:y + P, x:x + P])
      want_up = (imresize(lr_patch / 256, S) - 0.5) / 0.5
      np.testing.assert_allclose(b["lr_up"][i], want_up, atol=1e-6)


def test_lr_up_divisor_quirk():
  lr = np.full((4, 4, 3), 255, np.uint8)
  np.testing.assert_allclose(conventions.make_lr_up(lr, 4), (255 / 256 - 0.5) / 0.5, atol=1e-6)
  np.testing.assert_allclose(conventions.make_lr_up(lr, 4, 255.0), 1.0, atol=1e-6)


def test_reduce_constant_spe_patch():
  rng = np.random.default_rng(0)
  tile = {"hr": np.zeros((8, 8, 3), np.uint8), "lr": np.zeros((2, 2, 3), np.uint8),
          "spe": np.full((8, 8), 0.68, np.float32), "y": 0, "x": 0, "index": 0}
  on = pipeline.TrainTransform(patch_size=8, scale=4)(tile, rng)
  off = pipeline.TrainTransform(patch_size=8, scale=4, reduce_constant_spe=False)(tile, rng)
  assert not on["spe"].any()
  np.testing.assert_allclose(off["spe"], 0.68)
  tile["spe"][0, 0] = 0.1
  np.testing.assert_allclose(pipeline.TrainTransform(patch_size=8, scale=4)(tile, rng)["spe"][..., 0],
                             tile["spe"])


def test_flips_and_rotations_apply_to_all_three(shards):
  src = TileSource(shards, scale=S)
  it = pipeline.make_train_iterator(_cfg(shards, hflip=True, rot90=True, reduce_constant_spe=False),
                                    scale=4, seed=1, batch_size=8)
  b = next(it)
  wholes = {}
  used = set()
  for i in range(8):
    name = src[int(b["record_index"][i])]["image_id"]
    hr, lr, spe = wholes.setdefault(name, _whole(name))
    y, x = b["patch_yx"][i]
    crops = (hr[y:y + P, x:x + P], lr[y // S:(y + P) // S, x // S:(x + P) // S], spe[y:y + P, x:x + P])
    got = (_to_u8(b["hr"][i]), _to_u8(b["lr"][i]), b["spe"][i, :, :, 0])
    match = [(f, k) for f in (False, True) for k in range(4)
             if np.array_equal(pipeline.augment(crops[:1], f, k)[0], got[0])]
    assert match, "HR patch is not a flip/rotation of its crop"
    f, k = match[0]
    used.add((f, k))
    np.testing.assert_array_equal(pipeline.augment(crops[1:2], f, k)[0], got[1])
    np.testing.assert_array_equal(pipeline.augment(crops[2:], f, k)[0], got[2])
  assert len(used) > 1


def test_state_restore_reproduces_batches(shards):
  cfg = _cfg(shards, hflip=True)
  it = pipeline.make_train_iterator(cfg, scale=4, seed=7, batch_size=3)
  for _ in range(4):  # past the first epoch (14 records)
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(3)]
  fresh = pipeline.make_train_iterator(cfg, scale=4, seed=7, batch_size=3)
  fresh.set_state(state)
  for w in want:
    g = next(fresh)
    for k in w:
      np.testing.assert_array_equal(g[k], w[k])
  other = next(pipeline.make_train_iterator(cfg, scale=4, seed=8, batch_size=3))
  first = next(pipeline.make_train_iterator(cfg, scale=4, seed=7, batch_size=3))
  assert not np.array_equal(other["hr"], first["hr"])


def test_epochs_cover_all_records_and_reshuffle(shards):
  n = len(TileSource(shards))
  it = pipeline.make_train_iterator(_cfg(shards, num_epochs=2), scale=4, seed=0, batch_size=1)
  seq = [int(b["record_index"][0]) for b in it]
  assert len(seq) == 2 * n
  assert sorted(seq[:n]) == list(range(n)) == sorted(seq[n:])
  assert seq[:n] != seq[n:] and seq[:n] != list(range(n))


def test_process_slices_make_up_the_global_batch(shards):
  """Each of 2 processes reads a disjoint, contiguous part of every global batch: put together in process
  order they are the single-process batch, values included (patch positions and flips depend on the
  example's place in the global stream only). Every record once per epoch; a stream can start at any step."""
  n = len(TileSource(shards))   # 14 records: 3 whole global batches of 4 per epoch
  cfg = _cfg(shards, num_epochs=1, hflip=True, rot90=True)
  single = list(pipeline.make_train_iterator(cfg, scale=4, seed=5, batch_size=4))
  parts = [list(pipeline.make_train_iterator(cfg, scale=4, seed=5, batch_size=2, process_index=p, process_count=2))
           for p in range(2)]
  assert len(single) == len(parts[0]) == len(parts[1]) == n // 4
  seen = []
  for s, whole in enumerate(single):
    for k in whole:
      np.testing.assert_array_equal(np.concatenate([parts[0][s][k], parts[1][s][k]]), whole[k])
    ids = [set(parts[p][s]["record_index"].tolist()) for p in range(2)]
    assert not ids[0] & ids[1]
    seen += whole["record_index"].tolist()
  assert len(set(seen)) == len(seen) == 4 * (n // 4)
  # Batch s of a process is the same whether the stream starts at 0 or at s (resuming, maybe on another
  # number of processes).
  late = next(pipeline.make_train_iterator(cfg, scale=4, seed=5, batch_size=2, process_index=1, process_count=2,
                                           start_step=2))
  for k in late:
    np.testing.assert_array_equal(late[k], parts[1][2][k])


def test_worker_processes_give_the_same_batches(shards):
  a = pipeline.make_train_iterator(_cfg(shards), scale=4, seed=2, batch_size=2)
  b = pipeline.make_train_iterator(_cfg(shards, num_workers=2), scale=4, seed=2, batch_size=2)
  try:
    for _ in range(3):
      x, y = next(a), next(b)
      for k in x:
        np.testing.assert_array_equal(x[k], y[k])
  finally:
    b.close()


def test_corrupt_shard_is_reported_with_file_and_offset(shards, tmp_path):
  bad = tmp_path / "bad"
  shutil.copytree(shards, bad)
  f = bad / "train-00001-of-00002.tfrecord"
  offs, lens = tfrecord.build_index(f)
  raw = bytearray(f.read_bytes())
  raw[int(offs[1]) + 12 + int(lens[1]) // 2] ^= 0xFF
  f.write_bytes(bytes(raw))
  it = pipeline.make_train_iterator(_cfg(bad, shuffle=False, num_epochs=1), scale=4, seed=0, batch_size=1)
  with pytest.raises(Exception) as ei:
    for _ in it:
      pass
  msg = str(ei.value) + repr(ei.value.__cause__)
  assert "train-00001-of-00002.tfrecord: record 1 at offset" in msg and str(int(offs[1])) in msg
  f.write_bytes(bytes(raw[:-100]))
  with pytest.raises(tfrecord.RecordError, match=r"train-00001-of-00002\.tfrecord: record \d+ at offset \d+: trunc"):
    pipeline.make_train_iterator(_cfg(bad), scale=4, seed=0, batch_size=1)


def test_config_validation(shards):
  with pytest.raises(ValueError, match="unknown data config"):
    pipeline.make_train_iterator({"train_files": str(shards), "patchsize": 3}, scale=4, seed=0, batch_size=1)
  with pytest.raises(ValueError, match="train_files"):
    pipeline.make_train_iterator(pipeline.default_data_config(), scale=4, seed=0, batch_size=1)
  with pytest.raises(ValueError, match="scale"):
    pipeline.make_train_iterator(_cfg(shards, patch_size=64), scale=2, seed=0, batch_size=1)
  with pytest.raises(ValueError, match="smaller than"):
    next(pipeline.make_train_iterator(_cfg(shards, patch_size=128, check_manifest=False), scale=4, seed=0, batch_size=1))


@reference
def test_normalisation_matches_official_dataset():
  hr_u8, lr_u8, img_hr, img_lr, img_lr_up = require("in/hr_u8", "in/lr_u8", "in/img_hr", "in/img_lr",
                                                    "in/img_lr_up")
  np.testing.assert_allclose(conventions.to_signed(hr_u8), img_hr[0].transpose(1, 2, 0), atol=1e-7)
  np.testing.assert_allclose(conventions.to_signed(lr_u8), img_lr[0].transpose(1, 2, 0), atol=1e-7)
  np.testing.assert_allclose(conventions.make_lr_up(lr_u8, 4), img_lr_up[0].transpose(1, 2, 0), atol=1e-6)
