"""The paper's metric protocol: pyiqa's clean FID resize, MANIQA through pyiqa (optional extra), their flags."""
import csv

import numpy as np
import pytest
from PIL import Image

from diffssr_jax import images
from diffssr_jax.evaluation import evaluate, fid, fid_protocols, maniqa, paper_table


def _checkerboard(n=598):
  return (((np.indices((n, n)).sum(0) % 2) * 255).astype(np.uint8)[..., None].repeat(3, axis=2))


def test_clean_resize_known_values_and_where_the_protocols_differ():
  const = np.full((37, 53, 3), 200, np.uint8)
  np.testing.assert_allclose(fid_protocols.clean_resize(const), 200.0, atol=1e-3)  # bicubic keeps constants
  same = np.random.default_rng(0).integers(0, 256, (299, 299, 3), dtype=np.uint8)
  np.testing.assert_array_equal(fid_protocols.clean_resize(same), same.astype(np.float32))  # no resize at 299
  # A 1-pixel checkerboard shrunk 2.5x: the antialiased bicubic (pyiqa) averages it to grey, pytorch-fid's bilinear
  # without antialiasing samples it into an aliasing pattern far from grey.
  board = _checkerboard(748)
  clean = fid_protocols.clean_resize(board)
  legacy = np.asarray(fid.resize_bilinear(board[None].astype(np.float32), (299, 299)))[0]
  assert abs(clean.mean() - 127.5) < 2 and clean.std() < 20
  assert legacy.std() > 40


def test_pyiqa_protocol_feeds_the_inception_clean_resized_images(monkeypatch):
  seen = {}

  def fake_make(variables, resize=True):
    seen["resize"] = resize
    return lambda x: seen.setdefault("x", np.asarray(x))[:, :2, 0, 0]

  monkeypatch.setattr(fid, "make_feature_fn", fake_make)
  img = np.random.default_rng(1).integers(0, 256, (40, 31, 3), dtype=np.uint8)
  fn = fid_protocols.make_feature_fn({}, "pyiqa")
  fn(img[None].astype(np.float32) / 255.0)
  assert seen["resize"] is False
  x = seen["x"][0]
  np.testing.assert_allclose(2 * x - 1, (fid_protocols.clean_resize(img) - 128) / 128, atol=1e-6)  # pyiqa's norm.
  with pytest.raises(ValueError, match="fid_protocol"):
    fid_protocols.make_feature_fn({}, "tensorflow")


def test_maniqa_column_per_image_csv_and_table(tmp_path):
  """With a stand-in scorer (the real one is pyiqa's): maniqa.csv per image, the mean in the table."""
  rng = np.random.default_rng(0)
  for i in range(3):
    images.save_png(tmp_path / "hr" / f"im{i}.png", rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
  score = lambda path: float(images.read_rgb8(path).mean()) / 255  # noqa: E731
  md = evaluate.evaluate_all(None, {"Urban100": tmp_path / "hr"}, tmp_path / "out", methods=("bicubic",),
                             maniqa_fn=score, show_progress=False)
  out = tmp_path / "out" / "Urban100" / "bicubic"
  rows = list(csv.DictReader(open(out / "maniqa.csv")))
  assert [r["image"] for r in rows] == ["im0", "im1", "im2"]
  for r in rows:
    assert float(r["maniqa"]) == score(out / f"{r['image']}.png")
  assert "Urban100 MANIQA↑" in md.read_text()
  back = paper_table.read_csv(tmp_path / "out" / "table_bicubic.csv")
  assert back["Bicubic"]["Urban100"]["maniqa"] == pytest.approx(np.mean([float(r["maniqa"]) for r in rows]))


def _pyiqa_or_none():
  try:
    return maniqa._import_pyiqa()[0]
  except maniqa.MissingExtraError:
    return None


def test_missing_extra_or_weights_is_one_line(tmp_path, capsys):
  images.save_png(tmp_path / "hr" / "a.png", np.zeros((16, 16, 3), np.uint8))
  base = ["evaluate", "--datasets", f"A={tmp_path / 'hr'}", "--nodiffusion", "--bicubic", "--output",
          str(tmp_path / "o"), "--noprogress"]
  assert evaluate.cli(base + ["--maniqa", str(tmp_path / "nope.pt")]) == 1
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and "nope.pt: no such file" in err
  assert evaluate.cli(base + ["--fid_protocol", "pyiqa"]) == 2
  assert "--fid_protocol needs --fid_inception" in capsys.readouterr().err
  if _pyiqa_or_none() is None:
    (tmp_path / "w.pt").write_bytes(b"x")
    assert evaluate.cli(base + ["--maniqa", str(tmp_path / "w.pt")]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "needs the optional pyiqa package" in err
  assert not (tmp_path / "o").exists()  # refused before any work


def test_maniqa_and_clean_resize_equal_pyiqa_own_calls(tmp_path):
  pyiqa = _pyiqa_or_none()
  if pyiqa is None:
    pytest.skip("pyiqa (with a torchvision matching torch) is not installed")
  import torch
  from pyiqa.archs.fid_arch import ResizeDataset
  img = np.random.default_rng(2).integers(0, 256, (64, 48, 3), dtype=np.uint8)
  path = tmp_path / "x.png"
  images.save_png(path, img)
  theirs = ResizeDataset([str(path)], mode="clean")[0].permute(1, 2, 0).numpy()
  np.testing.assert_array_equal(fid_protocols.clean_resize(np.asarray(Image.open(path).convert("RGB"))), theirs)
  torch.manual_seed(0)
  ours = maniqa.make_maniqa_fn(None)  # random initialisation: no weights needed
  torch.manual_seed(0)
  with maniqa._no_timm_downloads(maniqa._import_pyiqa()[1]):
    ref = pyiqa.create_metric(maniqa.METRIC, device=torch.device("cpu"), pretrained=False)
  assert ours(path) == float(ref(str(path)).reshape(-1)[0])
