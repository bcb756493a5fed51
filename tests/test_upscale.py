"""The upscale CLI: folder trees mirrored, greyscale / RGBA / 16-bit layouts kept, broken files reported while
the rest are done, no overwriting without --overwrite, job mapping."""
import numpy as np
import pytest
from PIL import Image

from diffssr_jax import images
from diffssr_jax.inference import upscale
from diffssr_jax.data.imresize import imresize
from diffssr_jax.inference.upscaler import Upscaler
from test_inference import tiny_model


def _rgb(seed, h=8, w=6):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)


@pytest.fixture()
def tree(tmp_path):
  """in/a/grey.png (L), in/b/deep16.png (16-bit RGB), in/broken.png, in/rgba.png; RGB of deep16 and rgba equal."""
  src = tmp_path / "in"
  rgb = _rgb(0)
  images.save_png(src / "a" / "grey.png", rgb[:, :, 0])
  images.save_png(src / "b" / "deep16.png", rgb.astype(np.uint16) * 257)
  (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00garbage")
  alpha = np.random.default_rng(1).integers(0, 256, (8, 6)).astype(np.uint8)
  images.save_png(src / "rgba.png", np.dstack([rgb, alpha]))
  return src, rgb, alpha


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  checkpointing = pytest.importorskip("diffssr_jax.training.checkpointing")
  cfg, model, params = tiny_model()
  work = tmp_path_factory.mktemp("work")
  checkpointing.save_config(cfg, work)
  ckpt = checkpointing.Checkpointer(work, use_async=False)
  ckpt.save(1, {"params": params})
  ckpt.wait()
  ckpt.close()
  return work


def test_tree_layouts_and_broken_file(tree, workdir, tmp_path, capsys):
  src, rgb, alpha = tree
  out = tmp_path / "out"
  rc = upscale.cli(["upscale", "--workdir", str(workdir), "--rrdb", str(src), "--output", str(out), "--noprogress"])
  assert rc == 1
  err = capsys.readouterr().err
  assert "broken.png" in err and "3 written, 0 skipped (existing), 1 failed" in err
  assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
      "a/grey.png", "b/deep16.png", "rgba.png"]
  with Image.open(out / "a" / "grey.png") as im:
    assert im.mode == "L" and im.size == (24, 32)
  deep = images.load_image(out / "b" / "deep16.png")
  assert deep.bits == 16 and deep.rgb.dtype == np.uint16 and deep.rgb.shape == (32, 24, 3)
  rgba = images.load_image(out / "rgba.png")
  assert rgba.alpha is not None and rgba.rgb.shape == (32, 24, 3)
  np.testing.assert_array_equal(rgba.alpha, imresize(alpha, 4))
  # The 16-bit and the 8-bit RGBA input hold the same picture: same SR up to the output quantisation.
  assert np.abs(deep.rgb.astype(np.float64) / 257 - rgba.rgb).max() <= 1.0
  cfg, model, params = tiny_model()
  np.testing.assert_array_equal(rgba.rgb, Upscaler(model, params, config=cfg, mode="rrdb").upscale(rgb))


def test_existing_outputs_are_kept_unless_overwrite(tree, tmp_path):
  src, rgb, _ = tree
  (src / "broken.png").unlink()
  cfg, model, params = tiny_model()
  up = Upscaler(model, params, config=cfg, mode="rrdb")
  jobs, errors = upscale.collect_jobs([str(src)], tmp_path / "out")
  assert errors == [] and len(jobs) == 3
  done = upscale.upscale_files(lambda: up, jobs, show_progress=False)
  assert len(done["written"]) == 3
  stamps = {d: d.stat().st_mtime_ns for _, d in jobs}
  (jobs[0][1]).write_bytes(b"kept")  # an existing output, whatever it holds, is left alone
  msgs, made = [], []
  done = upscale.upscale_files(lambda: made.append(1) or up, jobs, show_progress=False, log=msgs.append)
  assert done["written"] == [] and len(done["skipped"]) == 3 and made == []  # the model is not even loaded
  assert all("skip" in m and "--overwrite" in m for m in msgs)
  assert jobs[0][1].read_bytes() == b"kept"
  assert all(d.stat().st_mtime_ns == stamps[d] for _, d in jobs[1:])
  done = upscale.upscale_files(lambda: up, jobs, overwrite=True, show_progress=False)
  assert len(done["written"]) == 3 and images.load_image(jobs[0][1]).rgb.shape == (32, 24, 3)


def test_fail_fast_stops_at_the_first_broken_file(tree, tmp_path):
  src, _, _ = tree
  cfg, model, params = tiny_model()
  up = Upscaler(model, params, config=cfg, mode="rrdb")
  jobs, _ = upscale.collect_jobs([str(src)], tmp_path / "out")
  msgs = []
  done = upscale.upscale_files(lambda: up, jobs, fail_fast=True, show_progress=False, log=msgs.append)
  # Sorted order: a/grey, b/deep16, broken, rgba.
  assert len(done["written"]) == 2 and len(done["failed"]) == 1 and "broken.png" in done["failed"][0]
  assert not (tmp_path / "out" / "rgba.png").exists()


def test_large_image_is_tiled_with_bounded_batches(tmp_path):
  """An image larger than a tile goes through tiles of the tile size only (the largest array the model sees),
  and smaller images in one piece."""
  cfg, model, params = tiny_model()
  up = Upscaler(model, params, config=cfg, mode="rrdb")
  seen = []
  original = up.super_resolve_batch

  def spy(batch, **kw):
    seen.append(np.shape(batch))
    return original(batch, **kw)

  up.super_resolve_batch = spy
  images.save_png(tmp_path / "in" / "big.png", _rgb(3, 20, 14))
  jobs, _ = upscale.collect_jobs([str(tmp_path / "in" / "big.png")], tmp_path / "out")
  upscale.upscale_files(lambda: up, jobs, tile=8, overlap=2, batch_size=3, show_progress=False)
  assert set(seen) == {(3, 8, 8, 3)}
  assert images.load_image(tmp_path / "out" / "big.png").rgb.shape == (80, 56, 3)


def test_collect_jobs(tmp_path):
  src = tmp_path / "in"
  images.save_png(src / "x" / "p.png", _rgb(0))
  images.save_png(src / "q.jpg.png", _rgb(1))
  single = tmp_path / "one.bmp"
  Image.fromarray(_rgb(2)).save(single)
  out = src / "results"  # an output folder inside the input: earlier outputs are not inputs
  images.save_png(out / "old.png", _rgb(3))
  jobs, errors = upscale.collect_jobs([str(src), str(single), str(tmp_path / "missing")], out)
  assert {(s.relative_to(tmp_path).as_posix(), d.relative_to(out).as_posix()) for s, d in jobs} == {
      ("in/x/p.png", "x/p.png"), ("in/q.jpg.png", "q.jpg.png"), ("one.bmp", "one.png")}
  assert len(errors) == 1 and "missing" in errors[0]
  images.save_png(src / "x" / "p.jpg", _rgb(4))  # p.jpg and p.png both map to x/p.png
  with pytest.raises(upscale.JobError, match="p.jpg"):
    upscale.collect_jobs([str(src)], out)


def test_cli_usage_errors(tmp_path):
  from absl import app
  with pytest.raises(app.UsageError, match="--output"):
    upscale.cli(["upscale", "--rrdb", "--checkpoint", "x.ckpt", str(tmp_path)])
  with pytest.raises(app.UsageError, match="exactly one"):
    upscale.cli(["upscale", str(tmp_path), "--output", str(tmp_path / "o")])
