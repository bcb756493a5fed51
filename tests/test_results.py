"""Resumable metrics CSV, atomic summary JSON, and the paper-style Markdown table."""
import json
import math
import os

import pytest

from diffssr_jax.evaluation import results
from diffssr_jax.evaluation.results import CorruptResultsError, MetricsCSV


def _m(i, **extra):
  return {"psnr_y": 30.0 + i / 7, "ssim_y": 0.8 + i / 1000, "psnr_rgb": 28.0 + i, "lr_psnr": 45.0 - i / 3,
          "artifact": 1e-4 * (i + 1), **extra}


HEADER = "image,psnr_y,ssim_y,psnr_rgb,lr_psnr,artifact"


def test_header_columns_and_values_round_trip(tmp_path):
  path = tmp_path / "m.csv"
  csv = MetricsCSV(path, extra=("lpips",))
  assert csv.columns == ("image", "psnr_y", "ssim_y", "psnr_rgb", "lr_psnr", "artifact", "lpips")
  csv.append("a.png", _m(1, lpips=0.25))
  csv.append("b, with comma \"quoted\".png", _m(2))  # lpips missing, awkward name
  csv.append("c.png", {**_m(3), "psnr_y": math.inf, "lr_psnr": math.nan})
  assert path.read_text().splitlines()[0] == HEADER + ",lpips"
  again = MetricsCSV(path, extra=("lpips",))
  rows = again.rows()
  assert [r["image"] for r in rows] == ["a.png", "b, with comma \"quoted\".png", "c.png"]
  assert rows[0] == {"image": "a.png", **_m(1, lpips=0.25)}  # exact float round trip
  assert rows[1]["lpips"] is None
  assert rows[2]["psnr_y"] == math.inf and math.isnan(rows[2]["lr_psnr"])
  assert again.done == {"a.png", "b, with comma \"quoted\".png", "c.png"}


def test_resume_skips_done_and_appends(tmp_path):
  path = tmp_path / "m.csv"
  csv = MetricsCSV(path)
  for i in range(3):
    csv.append(f"{i}.png", _m(i))
  csv = MetricsCSV(path)
  todo = [f"{i}.png" for i in range(5) if f"{i}.png" not in csv.done]
  assert todo == ["3.png", "4.png"]
  for name in todo:
    csv.append(name, _m(int(name[0])))
  assert [r["image"] for r in MetricsCSV(path).rows()] == [f"{i}.png" for i in range(5)]


@pytest.mark.parametrize("cut", [1, 5, 20, -1])
def test_torn_last_line_is_dropped(tmp_path, cut):
  path = tmp_path / "m.csv"
  csv = MetricsCSV(path)
  csv.append("a.png", _m(0))
  csv.append("b.png", _m(1))
  good = path.read_bytes()
  line = b"c.png," + b",".join(repr(v).encode() for v in _m(2).values()) + b"\n"
  path.write_bytes(good + line[:cut])  # a crash mid-write: any proper prefix, never the final newline
  csv = MetricsCSV(path)
  assert csv.done == {"a.png", "b.png"}
  assert path.read_bytes() == good  # truncated back, earlier rows byte-identical
  csv.append("c.png", _m(2))
  assert [r["image"] for r in MetricsCSV(path).rows()] == ["a.png", "b.png", "c.png"]


def test_zero_filled_tail_after_power_loss(tmp_path):
  path = tmp_path / "m.csv"
  MetricsCSV(path).append("a.png", _m(0))
  good = path.read_bytes()
  path.write_bytes(good + b"b.png,31.0,0.9" + b"\0" * 100)
  assert MetricsCSV(path).done == {"a.png"}
  assert path.read_bytes() == good
  path.write_bytes(good + b"\0" * 64)
  assert MetricsCSV(path).done == {"a.png"}


def test_last_complete_but_short_line_is_dropped(tmp_path):
  path = tmp_path / "m.csv"
  MetricsCSV(path).append("a.png", _m(0))
  good = path.read_bytes()
  path.write_bytes(good + b"b.png,31.0\n")
  assert MetricsCSV(path).done == {"a.png"}
  assert path.read_bytes() == good


def test_corruption_before_the_end_raises(tmp_path):
  path = tmp_path / "m.csv"
  csv = MetricsCSV(path)
  csv.append("a.png", _m(0))
  csv.append("b.png", _m(1))
  lines = path.read_bytes().split(b"\n")
  lines[1] = lines[1][:10]  # damage the first data row, later rows intact
  path.write_bytes(b"\n".join(lines))
  before = path.read_bytes()
  with pytest.raises(CorruptResultsError, match="row 2"):
    MetricsCSV(path)
  assert path.read_bytes() == before  # never rewritten


def test_other_header_refused(tmp_path):
  path = tmp_path / "m.csv"
  MetricsCSV(path, extra=("lpips",)).append("a.png", _m(0, lpips=0.1))
  with pytest.raises(CorruptResultsError, match="header"):
    MetricsCSV(path)
  path.write_text("name,score\nx,1\n")
  with pytest.raises(CorruptResultsError):
    MetricsCSV(path)


def test_empty_or_torn_header_rewritten(tmp_path):
  path = tmp_path / "m.csv"
  path.write_bytes(b"")
  assert len(MetricsCSV(path)) == 0
  assert path.read_text() == HEADER + "\n"
  path.write_bytes(HEADER[:9].encode())
  MetricsCSV(path).append("a.png", _m(0))
  assert path.read_text().splitlines() == [HEADER, "a.png," + ",".join(repr(v) for v in _m(0).values())]


def test_append_validation(tmp_path):
  csv = MetricsCSV(tmp_path / "m.csv")
  csv.append("a.png", _m(0))
  with pytest.raises(ValueError, match="already"):
    csv.append("a.png", _m(0))
  with pytest.raises(ValueError, match="unknown"):
    csv.append("b.png", _m(0, lpips=0.1))
  with pytest.raises(ValueError, match="required"):
    csv.append("b.png", {k: v for k, v in _m(0).items() if k != "ssim_y"})
  with pytest.raises(ValueError, match="one line"):
    csv.append("b\n.png", _m(0))
  assert len(MetricsCSV(tmp_path / "m.csv")) == 1


def test_duplicate_rows_in_file_raise(tmp_path):
  path = tmp_path / "m.csv"
  MetricsCSV(path).append("a.png", _m(0))
  data = path.read_bytes()
  path.write_bytes(data + data.split(b"\n")[1] + b"\n")
  with pytest.raises(CorruptResultsError, match="twice"):
    MetricsCSV(path)


def test_means(tmp_path):
  csv = MetricsCSV(tmp_path / "m.csv", extra=("lpips",))
  csv.append("a", {**_m(0), "lr_psnr": math.nan, "lpips": 0.2})
  csv.append("b", _m(1))
  csv.append("c", _m(2))
  means = csv.means()
  assert means["psnr_y"] == pytest.approx((30 + 30 + 1 / 7 + 30 + 2 / 7) / 3, abs=1e-12)
  assert means["lr_psnr"] == pytest.approx((45 - 1 / 3 + 45 - 2 / 3) / 2, abs=1e-12)  # NaN skipped
  assert means["lpips"] == 0.2  # missing skipped
  assert results.column_means([{"x": math.inf}, {"x": 3.0}], ["x"])["x"] == math.inf
  assert math.isnan(results.column_means([{"x": None}], ["x"])["x"])


def test_summary_json_atomic_and_non_finite(tmp_path):
  path = tmp_path / "sub" / "summary.json"
  summary = {"Urban100": {"psnr_y": 25.5, "ssim_y": 0.77, "lr_psnr": math.nan}, "Set5": {"psnr_y": math.inf}}
  results.write_summary_json(path, summary)
  text = path.read_text()
  json.loads(text)  # strict JSON (no NaN/Infinity tokens)
  assert "NaN" not in text and "Infinity" not in text
  back = results.read_summary_json(path)
  assert back["Urban100"]["psnr_y"] == 25.5 and math.isnan(back["Urban100"]["lr_psnr"])
  assert back["Set5"]["psnr_y"] == math.inf
  # replacing leaves no temporary files behind; a failing write leaves the old file intact
  results.write_summary_json(path, {"a": 1.0})
  with pytest.raises(TypeError):
    results.write_summary_json(path, {"a": object()})
  assert results.read_summary_json(path) == {"a": 1.0}
  assert os.listdir(path.parent) == ["summary.json"]


def test_markdown_table_layout_and_bold():
  res = {
      "SRDiff": {"Urban100": {"psnr_y": 25.52, "ssim_y": 0.7703, "fid": 4.7}, "DIV2K": {"psnr_y": 28.0}},
      "SAM-DiffSR": {"Urban100": {"psnr_y": 26.14, "ssim_y": 0.7893, "fid": 4.5},
                     "DIV2K": {"psnr_y": 28.7, "ssim_y": 0.79}},
      "ckpt_100k": {"Urban100": {"psnr_y": 26.14, "ssim_y": 0.70, "fid": 9.1}},
  }
  table = results.markdown_table(res, datasets=["Urban100", "DIV2K"])
  lines = table.strip().split("\n")
  assert lines[0] == ("| Method | Urban100 PSNR-Y↑ | Urban100 SSIM-Y↑ | Urban100 FID↓ | DIV2K PSNR-Y↑ "
                      "| DIV2K SSIM-Y↑ |")
  assert lines[1].count("|") == 7
  assert lines[2] == "| SRDiff | 25.52 | 0.7703 | 4.70 | 28.00 | - |"
  assert lines[3] == "| SAM-DiffSR | **26.14** | **0.7893** | **4.50** | **28.70** | **0.7900** |"
  assert lines[4] == "| ckpt_100k | **26.14** | 0.7000 | 9.10 | - | - |"  # ties are both bold
  # dataset order defaults to first appearance; absent metrics are dropped
  auto = results.markdown_table(res, metrics=("psnr_y", "lpips"))
  assert auto.split("\n")[0] == "| Method | Urban100 PSNR-Y↑ | DIV2K PSNR-Y↑ |"
