"""The Table 2 layout (Markdown + CSV) with Artifact/MANIQA columns, and the cited published rows of --compare."""
import csv
import io

import numpy as np
import pytest

from diffssr_jax import images
from diffssr_jax.evaluation import evaluate, paper_table, results


def _summary(root, ds, tag, label, **metrics):
  results.write_summary_json(root / ds / tag / "summary.json", {"label": label, "scale": 4, **metrics})


def test_columns_in_the_papers_order_and_csv_round_trip(tmp_path):
  _summary(tmp_path, "Urban100", "bicubic", "Bicubic", psnr_y=23.1, ssim_y=0.66, artifact=2e-3, fid=40.0)
  _summary(tmp_path, "Urban100", "10", "Ours", psnr_y=25.6, ssim_y=0.77, artifact=1e-3, fid=4.4, maniqa=0.61,
           lpips=0.12)
  _summary(tmp_path, "Extra", "10", "Ours", psnr_y=30.0, ssim_y=0.9, artifact=5e-4)
  md = paper_table.write_table(tmp_path, "10", evaluate.table_tags("10"), ["Urban100"])
  head = md.read_text().splitlines()[0]
  cols = [c.strip() for c in head.split("|")[2:-1]]
  assert cols == ["Urban100 PSNR-Y↑", "Urban100 SSIM-Y↑", "Urban100 MANIQA↑", "Urban100 FID↓", "Urban100 Artifact↓",
                  "Urban100 LPIPS↓", "Extra PSNR-Y↑", "Extra SSIM-Y↑", "Extra Artifact↓"]
  rows = {ln.split("|")[1].strip(): ln for ln in md.read_text().splitlines()[2:]}
  assert "**1.000e-03**" in rows["Ours"] and "2.000e-03" in rows["Bicubic"]  # lower artifact is better
  assert "| - |" in rows["Bicubic"]  # Bicubic has no MANIQA
  back = paper_table.read_csv(tmp_path / "table_10.csv")
  assert back["Ours"]["Urban100"] == {"psnr_y": 25.6, "ssim_y": 0.77, "maniqa": 0.61, "fid": 4.4, "artifact": 1e-3,
                                      "lpips": 0.12}
  assert back["Bicubic"]["Urban100"] == {"psnr_y": 23.1, "ssim_y": 0.66, "fid": 40.0, "artifact": 2e-3}
  assert back["Ours"]["Extra"] == {"psnr_y": 30.0, "ssim_y": 0.9, "artifact": 5e-4}
  assert "Official" not in md.read_text()  # no published rows without compare


def test_compare_adds_the_cited_rows_for_the_evaluated_datasets(tmp_path):
  _summary(tmp_path, "Urban100", "10", "Ours", psnr_y=25.0, ssim_y=0.75, artifact=1e-3, fid=5.0)
  _summary(tmp_path, "DIV2K", "10", "Ours", psnr_y=29.0, ssim_y=0.80, artifact=1e-3)
  md = paper_table.write_table(tmp_path, "10", ["10"], ["Urban100", "DIV2K"], compare=True).read_text()
  name = next(iter(paper_table.PUBLISHED))
  assert f"| {name} |" in md and paper_table.COMPARE_NOTE in md
  # The README's values (lose4578/SAM-DiffSR a18eaf6), for the two datasets we measured only.
  row = next(ln for ln in md.splitlines() if ln.startswith(f"| {name} |"))
  assert row.count("|") == 2 + 8 and "25.54" in row and "0.7721" in row and "4.53" in row and "29.34" in row
  assert "30.99" not in md  # Set5 was not evaluated
  back = paper_table.read_csv(tmp_path / "table_10.csv")
  assert back[name] == {"Urban100": {"psnr_y": 25.54, "ssim_y": 0.7721, "fid": 4.5276},
                        "DIV2K": {"psnr_y": 29.34, "ssim_y": 0.8109, "fid": 0.3809}}
  sources = {r["method"]: r["source"] for r in csv.DictReader(io.StringIO((tmp_path / "table_10.csv").read_text()))}
  assert sources == {"Ours": "measured", name: paper_table.PUBLISHED_SOURCES[name]}


def test_evaluation_table_has_the_artifact_column(tmp_path):
  """A real (bicubic) evaluation: the table's Artifact equals the mean of the per-image artifact values."""
  rng = np.random.default_rng(0)
  for i in range(2):
    images.save_png(tmp_path / "hr" / f"im{i}.png", rng.integers(0, 256, (32, 24, 3), dtype=np.uint8))
  md = evaluate.evaluate_all(None, {"Set5": tmp_path / "hr"}, tmp_path / "out", methods=("bicubic",),
                             show_progress=False)
  rows = list(csv.DictReader(open(tmp_path / "out" / "Set5" / "bicubic" / "metrics.csv")))
  mean_artifact = np.mean([float(r["artifact"]) for r in rows])
  assert "Set5 Artifact↓" in md.read_text()
  back = paper_table.read_csv(tmp_path / "out" / "table_bicubic.csv")
  assert back["Bicubic"]["Set5"]["artifact"] == pytest.approx(mean_artifact, rel=1e-12)
  assert f"{mean_artifact:.3e}" in md.read_text()
