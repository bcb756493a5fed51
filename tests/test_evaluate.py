"""Benchmark evaluation: files and columns, values recomputed from the saved PNGs, resume after an interruption,
settings guard, the Markdown table, clear errors, and the CLI from a training workdir."""
import csv
import math

import jax
import numpy as np
import pytest

from diffssr_jax import images
from diffssr_jax.evaluation import evaluate, results
from diffssr_jax.data.eval_sources import EvalSourceError
from diffssr_jax.data.imresize import imresize
from diffssr_jax.inference.upscaler import Upscaler
from diffssr_jax.evaluation.metrics import psnr_y, ssim_y, lr_psnr, artifact_mean
from test_inference import tiny_model

STEP = "7"


def _hr(seed, h=32, w=32):
  """A smooth-ish random HR image (so bicubic is not absurd)."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3)).astype(np.uint8)
  return imresize(small, output_shape=(h, w))


@pytest.fixture(scope="module")
def up():
  cfg, model, params = tiny_model()
  # HR multiples of 16 (LR of 4): the 24x32 image is padded to the others' LR size, so one compilation serves.
  return Upscaler(model, params, config=cfg, sampler="ddim", steps=2, multiple=16)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("bench")
  a, b = root / "A" / "HR", root / "B" / "HR"
  for i in range(3):
    images.save_png(a / f"img{i}.png", _hr(i))
  images.save_png(a / "sub" / "deep.png", _hr(3))
  images.save_png(a / "odd.png", _hr(4, 24, 32))
  for i in range(2):
    images.save_png(b / f"b{i}.png", _hr(10 + i))
  return {"A": str(a), "B": str(b)}


def _rows(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _psnr_rgb_plain(a, b):
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return 10 * math.log10(255.0 ** 2 / mse)


def test_evaluation_files_values_and_table(up, folders, tmp_path):
  table = evaluate.evaluate_all(up, folders, tmp_path, step_tag=STEP, methods=("diffusion", "rrdb", "bicubic"),
                                batch_size=2, seed=1, show_progress=False)
  names_a = ["img0", "img1", "img2", "odd", "sub/deep"]
  for ds, names in (("A", names_a), ("B", ["b0", "b1"])):
    for tag in (STEP, f"{STEP}_rrdb", "bicubic"):
      out = tmp_path / ds / tag
      rows = _rows(out / "metrics.csv")
      assert list(rows[0]) == ["image", "psnr_y", "ssim_y", "psnr_rgb", "lr_psnr", "artifact"]
      assert sorted(r["image"] for r in rows) == names
      summary = results.read_summary_json(out / "summary.json")
      assert summary["num_images"] == len(names) and summary["crop_border"] == 4 and summary["dataset"] == ds
      for k in ("psnr_y", "ssim_y", "psnr_rgb", "lr_psnr", "artifact"):
        assert summary[k] == pytest.approx(np.mean([float(r[k]) for r in rows]), rel=1e-12)
      for r in rows:
        # Recomputed from the saved PNG and the source HR (trimmed to the scale, LR by MATLAB bicubic).
        sr = images.read_rgb8(out / f"{r['image']}.png")
        hr = images.read_rgb8(f"{folders[ds]}/{r['image']}.png")
        lr = imresize(hr, 1 / 4)
        assert sr.shape == hr.shape
        assert float(r["psnr_rgb"]) == pytest.approx(_psnr_rgb_plain(sr, hr), rel=1e-12)
        assert float(r["psnr_y"]) == psnr_y(sr, hr, 4)
        assert float(r["ssim_y"]) == ssim_y(sr, hr, 4)
        assert float(r["lr_psnr"]) == lr_psnr(sr, lr, 4)
        assert float(r["artifact"]) == artifact_mean(sr, hr)
        if tag == "bicubic":
          np.testing.assert_array_equal(sr, imresize(lr, 4))
  s = results.read_summary_json(tmp_path / "A" / STEP / "summary.json")
  assert (s["sampler"], s["steps"], s["seed"], s["step"], s["method"]) == ("ddim", 2, 1, STEP, "diffusion")
  text = table.read_text()
  assert table.name == f"table_{STEP}.md"
  header = text.splitlines()[0]
  assert "A PSNR-Y" in header and "B SSIM-Y" in header
  assert [ln.split("|")[1].strip() for ln in text.splitlines()[2:]] == [
      "Bicubic", "RRDB", "SAM-DiffSR (ddim, 2 steps, eta 1)"]


def test_interrupted_evaluation_resumes(up, folders, tmp_path):
  seen = []

  def crash_after_two(name):
    seen.append(name)
    if len(seen) == 2:
      raise KeyboardInterrupt

  kw = dict(step_tag=STEP, batch_size=2, seed=1, show_progress=False)
  with pytest.raises(KeyboardInterrupt):
    evaluate.evaluate_all(up, {"A": folders["A"]}, tmp_path, on_image=crash_after_two, **kw)
  out = tmp_path / "A" / STEP
  before = (out / "metrics.csv").read_bytes()
  assert len(_rows(out / "metrics.csv")) == 2 and not (out / "summary.json").exists()
  resumed = []
  evaluate.evaluate_all(up, {"A": folders["A"]}, tmp_path, on_image=resumed.append, **kw)
  after = (out / "metrics.csv").read_bytes()
  assert after.startswith(before)  # earlier rows untouched
  names = [r["image"] for r in _rows(out / "metrics.csv")]
  assert sorted(names) == ["img0", "img1", "img2", "odd", "sub/deep"] and len(set(names)) == 5
  assert not set(resumed) & set(seen[:2]) and len(resumed) == 3
  # Noise is keyed by image name, so the resumed images are those an uninterrupted run makes (up to float
  # reordering between batch compositions, at most one level).
  fresh = tmp_path / "fresh"
  evaluate.evaluate_all(up, {"A": folders["A"]}, fresh, **kw)
  for n in names:
    a = images.read_rgb8(out / f"{n}.png").astype(int)
    b = images.read_rgb8(fresh / "A" / STEP / f"{n}.png").astype(int)
    assert np.abs(a - b).max() <= 1
  # A finished evaluation run again does nothing; a lost PNG is made again without a second row.
  (out / "img1.png").unlink()
  again = []
  with pytest.warns(UserWarning, match="lost their PNG"):
    evaluate.evaluate_all(up, {"A": folders["A"]}, tmp_path, on_image=again.append, **kw)
  assert again == [] and (out / "img1.png").exists() and (out / "metrics.csv").read_bytes() == after
  # Other settings on the same folder are refused rather than mixed in.
  with pytest.raises(evaluate.SettingsMismatchError, match="seed"):
    evaluate.evaluate_all(up, {"A": folders["A"]}, tmp_path, **{**kw, "seed": 2})


def test_another_models_results_are_not_resumed(up, folders, tmp_path):
  """Two models at the same step evaluated into one --output: the second must not take the first's images as
  its own (before weights_sha256 was recorded, their settings were equal and it resumed them silently)."""
  kw = dict(step_tag=STEP, batch_size=2, seed=1, show_progress=False)
  evaluate.evaluate_all(up, {"B": folders["B"]}, tmp_path, **kw)
  other = Upscaler(up.model, jax.tree.map(lambda p: p * 1.01, up.params), config=up.config, sampler="ddim",
                   steps=2, multiple=16)
  made = []
  with pytest.raises(evaluate.SettingsMismatchError, match="weights_sha256"):
    evaluate.evaluate_all(other, {"B": folders["B"]}, tmp_path, on_image=made.append, **kw)
  assert made == []
  # The same weights again (a fresh Upscaler of them) resume as before.
  same = Upscaler(up.model, up.params, config=up.config, sampler="ddim", steps=2, multiple=16)
  evaluate.evaluate_all(same, {"B": folders["B"]}, tmp_path, on_image=made.append, **kw)
  assert made == []


def test_damaged_outputs_are_verified_and_made_again(folders, tmp_path):
  """The issue's faults on a finished evaluation: 200 bytes flipped in one PNG, another cut in half, and a
  third replaced by a valid PNG of the right size (only its digest tells). The same command finds all three,
  says so in one warning and makes them again; the rest and every row stay as they were."""
  kw = dict(methods=("bicubic",), show_progress=False)
  evaluate.evaluate_all(None, {"A": folders["A"]}, tmp_path, **kw)
  out = tmp_path / "A" / "bicubic"
  good = {p.name: p.read_bytes() for p in out.rglob("*.png")}
  rows = (out / "metrics.csv").read_bytes()
  b = bytearray(good["img0.png"])
  for i in range(len(b) // 4, len(b) // 4 + 200):
    b[i] ^= 0xFF
  (out / "img0.png").write_bytes(bytes(b))
  (out / "img1.png").write_bytes(good["img1.png"][:len(good["img1.png"]) // 2])
  images.save_png(out / "img2.png", images.read_rgb8(out / "img2.png")[::-1])
  with pytest.warns(UserWarning, match=r"3 of 5 recorded images failed verification") as w:
    evaluate.evaluate_all(None, {"A": folders["A"]}, tmp_path, **kw)
  assert len([x for x in w if "verification" in str(x.message)]) == 1
  assert {p.name: p.read_bytes() for p in out.rglob("*.png")} == good
  assert (out / "metrics.csv").read_bytes() == rows
  # Results from before digests were recorded: what does not decode, or has another size, is made again.
  (out / results.DIGESTS_NAME).unlink()
  (out / "odd.png").write_bytes(good["odd.png"][:100])
  images.save_png(out / "img0.png", np.zeros((8, 8, 3), np.uint8))
  with pytest.warns(UserWarning, match=r"2 of 5 recorded images failed verification"):
    evaluate.evaluate_all(None, {"A": folders["A"]}, tmp_path, **kw)
  assert {p.name: p.read_bytes() for p in out.rglob("*.png")} == good


def test_sigterm_finishes_the_batch_and_exits_143(folders, tmp_path, monkeypatch):
  """SIGTERM while a batch is super-resolved: its images are saved and recorded, the command exits 143 with
  one line, and the same command then does the rest."""
  import os
  import signal
  from diffssr_jax.evaluation import methods
  real = methods.bicubic_sr_fn
  calls = []

  def preempted_sr_fn(scale):
    fn = real(scale)

    def run(items):
      calls.append(len(items))
      if len(calls) == 1:
        os.kill(os.getpid(), signal.SIGTERM)
      return fn(items)
    return run

  argv = ["evaluate", "--nodiffusion", "--bicubic", "--datasets", f"A={folders['A']}", "--output", str(tmp_path),
          "--batch_size", "2", "--noprogress"]
  with monkeypatch.context() as m:
    m.setattr(methods, "bicubic_sr_fn", preempted_sr_fn)
    assert evaluate.cli(argv) == 143
  out = tmp_path / "A" / "bicubic"
  assert len(_rows(out / "metrics.csv")) == 2 and calls == [2]
  assert evaluate.cli(argv) == 0
  assert sorted(r["image"] for r in _rows(out / "metrics.csv")) == ["img0", "img1", "img2", "odd", "sub/deep"]


def test_clear_errors(folders, tmp_path):
  bic = dict(methods=("bicubic",), show_progress=False)
  with pytest.raises(FileNotFoundError, match="nowhere"):
    evaluate.evaluate_all(None, {"X": str(tmp_path / "nowhere")}, tmp_path / "o", **bic)
  (tmp_path / "empty").mkdir()
  with pytest.raises(EvalSourceError, match="no images"):
    evaluate.evaluate_all(None, {"E": str(tmp_path / "empty")}, tmp_path / "o", **bic)
  bad = tmp_path / "bad"
  images.save_png(bad / "ok.png", _hr(0))
  (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
  with pytest.raises(images.ImageReadError, match="broken.png"):
    evaluate.evaluate_all(None, {"Bad": str(bad)}, tmp_path / "o", **bic)
  lr = tmp_path / "lr"
  images.save_png(lr / "b0x4.png", np.zeros((8, 8, 3), np.uint8))
  images.save_png(lr / "b1x4.png", np.zeros((7, 8, 3), np.uint8))  # HR is 32x32: should be 8x8
  with pytest.raises(EvalSourceError, match="b1"):
    evaluate.evaluate_all(None, {"B": folders["B"]}, tmp_path / "o", paired_lr={"B": str(lr)}, **bic)
  with pytest.raises(ValueError, match="checkpoint"):
    evaluate.evaluate_all(None, {"B": folders["B"]}, tmp_path / "o", methods=("rrdb",), show_progress=False)
  assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.png"))


def test_parse_named_paths():
  assert evaluate.parse_named_paths(["Set5=/d/Set5/HR", "/d/Urban100/HR", "/d/Manga"]) == {
      "Set5": "/d/Set5/HR", "Urban100": "/d/Urban100/HR", "Manga": "/d/Manga"}
  with pytest.raises(ValueError, match="twice"):
    evaluate.parse_named_paths(["A=/x", "A=/y"])


def test_plan_batches_groups_equal_sizes():
  shapes = [(8, 8), (6, 8), (8, 8), (8, 8), (6, 8)]
  assert evaluate.plan_batches(shapes, [0, 1, 2, 3, 4], 2) == [[0, 2], [3], [1, 4]]
  assert evaluate.plan_batches(shapes, [1, 3], 4) == [[1], [3]]


def test_cli_from_a_training_workdir(folders, tmp_path, capsys):
  checkpointing = pytest.importorskip("diffssr_jax.training.checkpointing")
  workdir_lib = pytest.importorskip("diffssr_jax.training.workdir")
  cfg, model, params = tiny_model()
  work = tmp_path / "work"
  workdir_lib.save_config(cfg, work)
  ckpt = checkpointing.Checkpointer(work, use_async=False)
  for step in (5, 10):
    ckpt.save(step, {"params": params})
  ckpt.wait()
  ckpt.close()
  argv = ["evaluate", "--workdir", str(work), "--datasets", f"B={folders['B']}", "--nodiffusion", "--rrdb",
          "--bicubic", "--crop_border", "0", "--noprogress"]
  assert evaluate.cli(argv) == 0
  out = work / "eval" / "B" / "10_rrdb"  # the latest step
  assert sorted(r["image"] for r in _rows(out / "metrics.csv")) == ["b0", "b1"]
  assert results.read_summary_json(out / "summary.json")["crop_border"] == 0
  table = (work / "eval" / "table_10.md").read_text()
  captured = capsys.readouterr()
  assert "| RRDB |" in table and "| Bicubic |" in table and table in captured.out
  assert f"model: {work / 'checkpoints' / '10'} (step 10)" in captured.err  # the step used is reported
  assert results.read_summary_json(out / "summary.json")["checkpoint"] == str(work / "checkpoints" / "10")
  # The same RRDB through the Python API gives the same images.
  hr = images.read_rgb8(f"{folders['B']}/b0.png")
  rrdb = Upscaler(model, params, config=cfg, mode="rrdb").upscale(imresize(hr, 1 / 4))
  np.testing.assert_array_equal(images.read_rgb8(out / "b0.png"), rrdb)
  # User errors: one line on stderr, exit status 1 (bad command lines: 2), never a traceback.
  assert evaluate.cli(["evaluate", "--workdir", str(work), "--datasets", f"X={tmp_path / 'nope'}",
                       "--noprogress"]) == 1
  assert "nope" in capsys.readouterr().err
  workdir_lib.save_config(cfg, tmp_path / "nockpt")
  images.save_png(tmp_path / "photo.png", hr)
  data = ["--datasets", f"B={folders['B']}", "--noprogress", "--output", str(tmp_path / "o")]
  for args, status, expect in ((["--workdir", str(tmp_path / "nowhere")], 1, "no such folder"),
                               (["--workdir", str(tmp_path / "nockpt")], 1, "no checkpoints"),
                               (["--workdir", str(work), "--step", "7"], 1, "no checkpoint for step 7"),
                               (["--checkpoint", str(tmp_path / "photo.png")], 1, "cannot load the model"),
                               (["--workdir", str(work), "--datasets", "A=/x,A=/y"], 2, "given twice"),
                               (["--workdir", str(work), "--paired_lr", "Z=/x"], 2, "not in --datasets"),
                               (["--workdir", str(work), "--batch-size", "x"], 2, "batch_size")):
    assert evaluate.cli(["evaluate", *data, *args]) == status, args
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in err, (args, err)


def test_table_keeps_every_method_on_disk(up, folders, tmp_path):
  """Re-running one method rewrites the step's table with the rows of the others already on disk."""
  kw = dict(step_tag=STEP, batch_size=2, seed=1, show_progress=False)
  evaluate.evaluate_all(up, {"B": folders["B"]}, tmp_path, methods=("rrdb", "bicubic"), **kw)
  table = evaluate.evaluate_all(up, {"B": folders["B"]}, tmp_path, methods=("diffusion",), **kw)
  rows = [ln.split("|")[1].strip() for ln in table.read_text().splitlines()[2:]]
  assert rows == ["Bicubic", "RRDB", "SAM-DiffSR (ddim, 2 steps, eta 1)"]
  # Another step's table holds that step's model rows only (bicubic is step-independent).
  other = evaluate.evaluate_all(up, {"B": folders["B"]}, tmp_path, methods=("rrdb",), **{**kw, "step_tag": "8"})
  assert other.name == "table_8.md"
  assert [ln.split("|")[1].strip() for ln in other.read_text().splitlines()[2:]] == ["Bicubic", "RRDB"]


def test_optional_lpips_column_and_fid(folders, tmp_path):
  """The LPIPS and FID hooks, with stand-in networks (the real ones need user-supplied weights)."""
  lpips_fn = lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).mean(axis=(1, 2, 3))  # noqa: E731
  fid_fn = lambda x: np.asarray(x).mean(axis=(1, 2))  # noqa: E731  (N, 3) "features" of [0, 1] images
  table = evaluate.evaluate_all(None, {"B": folders["B"]}, tmp_path, methods=("bicubic",), lpips_fn=lpips_fn,
                                lpips_net="alex", fid_fn=fid_fn, show_progress=False)
  out = tmp_path / "B" / "bicubic"
  rows = _rows(out / "metrics.csv")
  assert list(rows[0])[-1] == "lpips"
  for r in rows:
    sr = images.read_rgb8(out / f"{r['image']}.png").astype(np.float64) / 127.5 - 1
    hr = images.read_rgb8(f"{folders['B']}/{r['image']}.png").astype(np.float64) / 127.5 - 1
    assert float(r["lpips"]) == pytest.approx(np.abs(sr - hr).mean(), rel=1e-5)
  summary = results.read_summary_json(out / "summary.json")
  assert summary["lpips_net"] == "alex" and np.isfinite(summary["fid"]) and summary["fid"] > 0
  header = table.read_text().splitlines()[0]
  assert "B LPIPS" in header and "B FID" in header
