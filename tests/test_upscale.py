"""The upscale CLI: folder trees mirrored, greyscale / RGBA / 16-bit layouts kept, inputs never replaced, any
failing image reported while the rest are done, tiny images, no overwriting without --overwrite (and then only
of earlier outputs), the checkpoint step in every output, one-line errors, job mapping."""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffssr_jax import images
from diffssr_jax.inference import upscale
from diffssr_jax.data.imresize import imresize
from helpers import our_stderr_lines
from diffssr_jax.inference.upscaler import Upscaler
from test_inference import tiny_model, tiny_model3

ROOT = pathlib.Path(__file__).resolve().parents[1]


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


def _make_workdir(work, model_fn, step):
  checkpointing = pytest.importorskip("diffssr_jax.training.checkpointing")
  workdir_lib = pytest.importorskip("diffssr_jax.training.workdir")
  cfg, model, params = model_fn()
  workdir_lib.save_config(cfg, work)
  ckpt = checkpointing.Checkpointer(work, use_async=False)
  ckpt.save(step, {"params": params})
  ckpt.wait()
  ckpt.close()
  return work


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return _make_workdir(tmp_path_factory.mktemp("work"), tiny_model, 1)


def _error_lines(err):
  return [ln for ln in err.splitlines() if ln.startswith("error:")]


def test_tree_layouts_and_broken_file(tree, workdir, tmp_path, capsys):
  src, rgb, alpha = tree
  out = tmp_path / "out"
  rc = upscale.cli(["upscale", "--workdir", str(workdir), "--rrdb", str(src), "--output", str(out), "--noprogress"])
  assert rc == 1
  err = capsys.readouterr().err
  assert "broken.png" in err and "3 written, 0 skipped (existing), 1 failed" in err
  # The checkpoint step is reported when the model loads, and stored in every output.
  assert f"model: {workdir / 'checkpoints' / '1'} (step 1)" in err
  assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
      "a/grey.png", "b/deep16.png", "rgba.png"]
  for p in out.rglob("*.png"):
    text = images.png_text(p)
    assert text["Software"] == upscale.SOFTWARE and text["diffssr:step"] == "1"
    assert text["diffssr:checkpoint"] == str(workdir / "checkpoints" / "1")
    assert text["diffssr:sampler"] == "RRDB encoder" and text["diffssr:source"] == p.name
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
  images.save_png(jobs[0][1], rgb)  # a PNG at an output path that this command did not write
  foreign = jobs[0][1].read_bytes()
  msgs, made = [], []
  done = upscale.upscale_files(lambda: made.append(1) or up, jobs, show_progress=False, log=msgs.append)
  assert done["written"] == [] and len(done["skipped"]) == 3 and made == []  # the model is not even loaded
  assert all("skip" in m and "--overwrite" in m for m in msgs)
  assert jobs[0][1].read_bytes() == foreign
  assert all(d.stat().st_mtime_ns == stamps[d] for _, d in jobs[1:])
  # --overwrite replaces earlier outputs only: the foreign PNG is reported and left as it was.
  msgs = []
  done = upscale.upscale_files(lambda: up, jobs, overwrite=True, show_progress=False, log=msgs.append)
  assert sorted(done["written"]) == sorted(d for _, d in jobs[1:])
  assert len(done["failed"]) == 1 and str(jobs[0][1]) in done["failed"][0] and "not written by" in done["failed"][0]
  assert jobs[0][1].read_bytes() == foreign
  assert all(d.stat().st_mtime_ns != stamps[d] for _, d in jobs[1:])
  assert images.load_image(jobs[1][1]).rgb.shape == (32, 24, 3)


def test_inputs_are_never_replaced(workdir, tmp_path, capsys):
  """An output that would be an input file, or an output folder inside an input folder, is refused with one
  line and exit status 2, --overwrite or not; nothing is written."""
  src = tmp_path / "in"
  images.save_png(src / "tiny.png", _rgb(0))
  images.save_png(src / "sub" / "b.png", _rgb(1))
  before = {p: p.read_bytes() for p in src.rglob("*.png")}
  base = ["upscale", "--workdir", str(workdir), "--rrdb", "--noprogress"]
  for args in ([str(src / "tiny.png"), "--output", str(src), "--overwrite"],
               [str(src / "tiny.png"), "--output", str(src)],
               [str(src), "--output", str(src)],
               [str(src), "--output", str(src), "--overwrite"],
               [str(src), "--output", str(src / "results")],
               [str(src / "sub"), str(src / "tiny.png"), "--output", str(src)]):  # in/tiny.png -> in/tiny.png
    assert upscale.cli(base + args) == 2, args
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and " written," not in err, (args, err)  # no summary: nothing ran
    assert {p: p.read_bytes() for p in src.rglob("*.png")} == before
  assert not (src / "results").exists() and not (src / "b.png").exists()
  upscale.cli(base + [str(src / "tiny.png"), "--output", str(src)])
  assert "is the input" in capsys.readouterr().err


def test_nothing_to_do_is_said_plainly(workdir, tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  base = ["upscale", "--workdir", str(workdir), "--rrdb", "--noprogress", "--output", str(tmp_path / "out")]
  assert upscale.cli(base + [str(tmp_path / "empty")]) == 1
  err = capsys.readouterr().err
  assert "no images found" in err and "nothing to do" in err and "0 written, 0 skipped (existing), 1 failed" in err
  images.save_png(tmp_path / "in" / "a.png", _rgb(0))
  images.save_png(tmp_path / "out" / "a.png", _rgb(1))
  assert upscale.cli(base + [str(tmp_path / "in")]) == 0
  err = capsys.readouterr().err
  assert "nothing to do: all 1 outputs exist" in err and "0 written, 1 skipped (existing), 0 failed" in err


def test_tiny_images_and_a_bad_file_do_not_stop_the_rest(tmp_path, capsys):
  """With a three-level U-Net at x4, 1- and 2-pixel images reach its lowest level as 1-pixel maps unless padded:
  all are super-resolved, the broken file is reported by path, the summary is printed."""
  work = _make_workdir(tmp_path / "work", tiny_model3, 2)
  src = tmp_path / "in"
  for name, (h, w) in {"p1x1": (1, 1), "p2x1": (2, 1), "p1x2": (1, 2)}.items():
    images.save_png(src / f"{name}.png", _rgb(h + w, h, w))
  (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00garbage")
  out = tmp_path / "out"
  rc = upscale.cli(["upscale", "--workdir", str(work), str(src), "--output", str(out), "--sampler", "ddim",
                    "--steps", "2", "--noprogress"])
  err = capsys.readouterr().err
  assert rc == 1 and "3 written, 0 skipped (existing), 1 failed" in err and "broken.png" in err
  for name, shape in {"p1x1": (4, 4), "p2x1": (8, 4), "p1x2": (4, 8)}.items():
    assert images.load_image(out / f"{name}.png").rgb.shape == shape + (3,)
    assert images.png_text(out / f"{name}.png")["diffssr:step"] == "2"


def test_any_exception_of_one_image_is_reported_and_the_rest_done(tree, tmp_path):
  src, _, _ = tree
  (src / "broken.png").unlink()
  cfg, model, params = tiny_model()
  up = Upscaler(model, params, config=cfg, mode="rrdb")
  original = up.upscale_like_input

  def flaky(image, **kw):
    if image.path.endswith("deep16.png"):
      raise RuntimeError("out of memory")
    return original(image, **kw)

  up.upscale_like_input = flaky
  jobs, _ = upscale.collect_jobs([str(src)], tmp_path / "out")
  msgs = []
  done = upscale.upscale_files(lambda: up, jobs, show_progress=False, log=msgs.append)
  assert len(done["written"]) == 2 and len(done["failed"]) == 1
  assert done["failed"][0] == f"{src / 'b' / 'deep16.png'}: RuntimeError: out of memory"
  assert not (tmp_path / "out" / "b" / "deep16.png").exists() and (tmp_path / "out" / "rgba.png").exists()
  done = upscale.upscale_files(lambda: up, jobs, overwrite=True, fail_fast=True, show_progress=False)
  assert len(done["written"]) == 1 and len(done["failed"]) == 1  # a/grey, then b/deep16 stops the run


def test_load_errors_are_one_line(workdir, tree, tmp_path, capsys):
  """Missing or checkpoint-less workdirs and files that are not checkpoints: one line, exit 1, no traceback."""
  src, _, _ = tree
  workdir_lib = pytest.importorskip("diffssr_jax.training.workdir")
  cfg, _, _ = tiny_model()
  workdir_lib.save_config(cfg, tmp_path / "nockpt")
  not_a_ckpt = src / "rgba.png"
  out = ["--output", str(tmp_path / "out"), "--noprogress", str(src)]
  for model_args, expect in ((["--workdir", str(tmp_path / "nowhere")], "no such folder"),
                             (["--workdir", str(tmp_path / "nockpt")], "no checkpoints"),
                             (["--workdir", str(workdir), "--step", "99"], "no checkpoint for step 99"),
                             (["--checkpoint", str(not_a_ckpt)], "cannot load the model")):
    assert upscale.cli(["upscale", *model_args, *out]) == 1
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in err, err
  assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))


def test_png_text_metadata_round_trip(tmp_path):
  for arr in (_rgb(0), _rgb(1).astype(np.uint16) * 257, _rgb(2)[:, :, 0]):
    path = tmp_path / f"x{arr.ndim}{arr.dtype}.png"
    upscale.save_output(path, arr, {"Software": upscale.SOFTWARE, "diffssr:step": 7, "diffssr:source": "café€.png"})
    assert images.png_text(path) == {"Software": upscale.SOFTWARE, "diffssr:step": "7",
                                      "diffssr:source": "café€.png"}
    np.testing.assert_array_equal(images.load_image(path).rgb[..., 0], arr if arr.ndim == 2 else arr[..., 0])
    assert upscale.is_upscale_output(path)
  images.save_png(tmp_path / "plain.png", _rgb(0))
  (tmp_path / "junk.png").write_bytes(b"junk")
  assert not upscale.is_upscale_output(tmp_path / "plain.png") and not upscale.is_upscale_output(tmp_path / "junk.png")


def test_library_logs_are_quiet_by_default_and_shown_with_verbosity(workdir, tmp_path):
  """The command line as users run it: by default stderr holds our lines only (no orbax/absl/jax chatter; only
  the CUDA plugin's native start-up lines, which no code can stop: helpers.CUDA_STUB_LINE); with -v the
  libraries' messages are back."""
  images.save_png(tmp_path / "in" / "a.png", _rgb(0))
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "diffssr_jax.inference.upscale", "--workdir", str(workdir), "--rrdb",
         str(tmp_path / "in"), "--no-progress", "--batch-size", "2"]
  quiet = subprocess.run(cmd + ["--output", str(tmp_path / "o1")], capture_output=True, text=True, env=env,
                         timeout=300)
  assert quiet.returncode == 0, quiet.stderr
  assert our_stderr_lines(quiet.stderr) == [f"model: {workdir / 'checkpoints' / '1'} (step 1); RRDB encoder",
                                       "1 written, 0 skipped (existing), 0 failed"]
  loud = subprocess.run(cmd + ["--output", str(tmp_path / "o2"), "-v"], capture_output=True, text=True, env=env,
                        timeout=300)
  assert loud.returncode == 0 and "orbax" in loud.stderr.lower() and len(loud.stderr.splitlines()) > 5


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
  (tmp_path / "empty").mkdir()
  out = tmp_path / "results"
  jobs, errors = upscale.collect_jobs([str(src), str(single), str(tmp_path / "missing"), str(tmp_path / "empty")],
                                      out)
  assert {(s.relative_to(tmp_path).as_posix(), d.relative_to(out).as_posix()) for s, d in jobs} == {
      ("in/x/p.png", "x/p.png"), ("in/q.jpg.png", "q.jpg.png"), ("one.bmp", "one.png")}
  assert len(errors) == 2 and "missing" in errors[0] and "empty: no images found" in errors[1]
  with pytest.raises(upscale.JobError, match="inside the input folder"):
    upscale.collect_jobs([str(src)], src / "results")  # outputs would land among (and be read as) inputs
  os.symlink(src, tmp_path / "link")
  with pytest.raises(upscale.JobError, match="inside the input folder"):
    upscale.collect_jobs([str(src)], tmp_path / "link" / "out")  # the same folder through a symlink
  with pytest.raises(upscale.JobError, match="never replaced"):
    upscale.collect_jobs([str(src / "q.jpg.png")], tmp_path / "o" / ".." / "in")  # resolves onto the input
  images.save_png(src / "x" / "p.jpg", _rgb(4))  # p.jpg and p.png both map to x/p.png
  with pytest.raises(upscale.JobError, match="p.jpg"):
    upscale.collect_jobs([str(src)], out)


def test_cli_usage_errors(tmp_path, capsys):
  for args, expect in ((["--rrdb", "--checkpoint", "x.ckpt", str(tmp_path)], "--output"),
                       ([str(tmp_path), "--output", str(tmp_path / "o")], "exactly one"),
                       (["--rrdb", "--checkpoint", "x.ckpt", "--output", "o"], "at least one input"),
                       (["--rrdb", "--checkpoint", "x.ckpt", "--output", "o", "--tile", "8", "--overlap", "5", "i"],
                        "--overlap"),
                       (["--bogus", "x"], "bogus")):
    assert upscale.cli(["upscale", *args]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and expect in lines[0]


def _with_orientation(path, arr, orientation):
  """A PNG of `arr` with an EXIF orientation tag (eXIf chunk), as a phone writes its photos."""
  im = Image.fromarray(arr)
  exif = im.getexif()
  exif[0x0112] = orientation
  path.parent.mkdir(parents=True, exist_ok=True)
  im.save(path, exif=exif.tobytes())


def test_exif_orientation_is_applied_or_ignored_with_a_warning(workdir, tmp_path, capsys):
  """A phone photo stored sideways (orientation 6: turn 90 degrees clockwise) used to be upscaled as stored,
  i.e. rotated; every orientation now decodes as Pillow's exif_transpose shows it, and upscale's output is
  upright. --exif_orientation ignore keeps the stored pixels and warns."""
  from PIL import ImageOps
  arr = _rgb(3, 8, 12)
  for orientation in range(1, 9):
    p = tmp_path / "o" / f"{orientation}.png"
    _with_orientation(p, arr, orientation)
    want = np.asarray(ImageOps.exif_transpose(Image.open(p)).convert("RGB"))
    np.testing.assert_array_equal(images.read_rgb8(p), want, err_msg=str(orientation))
  src = tmp_path / "in"
  _with_orientation(src / "phone.png", arr, 6)
  rc = upscale.cli(["upscale", "--workdir", str(workdir), "--rrdb", str(src), "--output", str(tmp_path / "out"),
                    "--noprogress"])
  assert rc == 0
  assert images.read_rgb8(tmp_path / "out" / "phone.png").shape == (12 * 4, 8 * 4, 3)
  with pytest.warns(UserWarning, match="EXIF orientation 6 ignored"):
    rc = upscale.cli(["upscale", "--workdir", str(workdir), "--rrdb", str(src), "--output", str(tmp_path / "as_stored"),
                      "--noprogress", "--exif_orientation", "ignore"])
  assert rc == 0
  assert images.read_rgb8(tmp_path / "as_stored" / "phone.png").shape == (8 * 4, 12 * 4, 3)
