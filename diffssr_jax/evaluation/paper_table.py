"""The results table as SAM-DiffSR's Table 2 lays it out (Markdown and CSV), and the published rows to set beside it.

Columns per dataset, in the paper's order: PSNR-Y, SSIM-Y, MANIQA, FID, Artifact, then LPIPS (not in the
paper; shown when measured). A metric no row has for any dataset is left out (MANIQA needs `--maniqa`, FID
`--fid_inception` or `--fid_protocol pyiqa`, LPIPS its weights), so the table never shows empty columns.

`table_<name>.csv` holds the same values unrounded: one row per method, a `source` column ("measured" or the
citation of a published row) and one column `<dataset>/<metric>` per table column (empty when missing).

Published rows (`--compare`): only numbers from a citable source are included. The one found is the result
table of the official README (lose4578/SAM-DiffSR at commit a18eaf6, "Result"): SAM-DiffSR's PSNR, SSIM and
FID on seven benchmarks, computed by the official `tools/caculate_iqa.py` (pyiqa `psnr` with
`test_y_channel=True`, `ssim` in `color_space='ycbcr'`, i.e. on Y; pyiqa `fid`, its default `clean` mode, between
the SR and HR folders). Table 2 of the paper (arXiv 2402.17133: SRDiff and the other methods, MANIQA and
Artifact) could not be retrieved from a citable copy here, so its rows are not included rather than retyped
from memory. The published rows join our rows by dataset name: name the benchmarks as the README does
(Set5, Set14, Urban100, BSDS100, Manga109, General100, DIV2K).

`write_table` gathers the rows from an evaluation's folders (root/<dataset>/<method tag>/summary.json).
"""
from __future__ import annotations

import csv
import io
import pathlib
from collections.abc import Mapping, Sequence

from diffssr_jax import fileio, storage
from diffssr_jax.evaluation import results

PAPER_METRICS = ("psnr_y", "ssim_y", "maniqa", "fid", "artifact", "lpips")

OFFICIAL_README = "official README (lose4578/SAM-DiffSR a18eaf6)"
# lose4578/SAM-DiffSR README.md at a18eaf6, table "Result" (row "SamDiff"), copied digit for digit.
PUBLISHED = {
    f"SAM-DiffSR, {OFFICIAL_README}": {
        "Set5": {"psnr_y": 30.99, "ssim_y": 0.8731, "fid": 48.20},
        "Set14": {"psnr_y": 27.14, "ssim_y": 0.7484, "fid": 49.84},
        "Urban100": {"psnr_y": 25.54, "ssim_y": 0.7721, "fid": 4.5276},
        "BSDS100": {"psnr_y": 26.47, "ssim_y": 0.7003, "fid": 60.81},
        "Manga109": {"psnr_y": 29.43, "ssim_y": 0.8899, "fid": 2.3994},
        "General100": {"psnr_y": 30.30, "ssim_y": 0.8353, "fid": 38.42},
        "DIV2K": {"psnr_y": 29.34, "ssim_y": 0.8109, "fid": 0.3809},
    },
}
# The source each published row cites (the CSV's `source` column).
PUBLISHED_SOURCES = {name: "https://github.com/lose4578/SAM-DiffSR/blob/a18eaf6/README.md#result"
                     for name in PUBLISHED}
# Added to the Markdown table under the rows when --compare is given.
COMPARE_NOTE = ("Published row: " + OFFICIAL_README + ", computed by its tools/caculate_iqa.py with pyiqa (PSNR/SSIM "
                "on Y without border crop, FID in pyiqa's default clean mode); compare with --crop_border 0 and "
                "--fid_protocol pyiqa. The README scale is x4.")


def with_published(table: Mapping[str, Mapping], datasets: Sequence[str]) -> tuple[dict, list[str]]:
  """`table` ({method: {dataset: {metric: value}}}) followed by the published rows, restricted to the datasets
  already in `table` (when it has any): the comparison is per benchmark we measured."""
  out = {k: dict(v) for k, v in table.items()}
  for name, rows in PUBLISHED.items():
    keep = {d: v for d, v in rows.items() if not datasets or d in datasets}
    if keep:
      out[name] = keep
  order = list(datasets) or sorted({d for v in out.values() for d in v})
  return out, order


def columns(table: Mapping[str, Mapping], datasets: Sequence[str], metrics: Sequence[str] = PAPER_METRICS):
  """[(dataset, metric)] of the table: every dataset in order, each with the metrics some row has there."""
  return [(d, k) for d in datasets for k in metrics if any(k in table[m].get(d, {}) for m in table)]


def csv_text(table: Mapping[str, Mapping], datasets: Sequence[str], metrics: Sequence[str] = PAPER_METRICS) -> str:
  """The table as CSV (unrounded floats, `repr`; empty cells for missing values)."""
  cols = columns(table, datasets, metrics)
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["method", "source"] + [f"{d}/{k}" for d, k in cols])
  for method, per_dataset in table.items():
    cells = []
    for d, k in cols:
      v = per_dataset.get(d, {}).get(k)
      cells.append("" if v is None else repr(float(v)))
    w.writerow([method, PUBLISHED_SOURCES.get(method, "measured")] + cells)
  return buf.getvalue()


def write_tables(root, table_name: str, table: Mapping[str, Mapping], datasets: Sequence[str],
                 compare: bool = False) -> pathlib.Path:
  """Writes root/table_<name>.md and root/table_<name>.csv (atomically); returns the Markdown file's path."""
  if compare:
    table, datasets = with_published(table, datasets)
  root = storage.native(root)
  md = results.markdown_table(table, metrics=PAPER_METRICS, datasets=datasets)
  if compare and any(name in table for name in PUBLISHED):
    md += "\n" + COMPARE_NOTE + "\n"
  path = root / f"table_{table_name}.md"
  fileio.atomic_write(path, md)
  fileio.atomic_write(root / f"table_{table_name}.csv", csv_text(table, datasets))
  return path


def read_csv(path) -> dict[str, dict[str, dict[str, float]]]:
  """Inverse of `csv_text`: {method: {dataset: {metric: value}}} (missing cells left out)."""
  text = storage.native(path).read_text(encoding="utf-8")
  rows = list(csv.reader(io.StringIO(text)))
  head, body = rows[0], rows[1:]
  out: dict = {}
  for row in body:
    per = out.setdefault(row[0], {})
    for col, cell in zip(head[2:], row[2:]):
      if cell != "":
        d, k = col.rsplit("/", 1)
        per.setdefault(d, {})[k] = float(cell)
  return out


def collect_results(root, tags: Sequence[str], datasets_first: Sequence[str] = ()) -> tuple[dict, list[str]]:
  """{label: {dataset: summary}} from root/<dataset>/<tag>/summary.json for the given tags (rows in tag
  order), and the dataset order: `datasets_first`, then the others found, sorted."""
  root = storage.native(root)
  found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
  order = list(datasets_first) + [d for d in found if d not in datasets_first]
  table: dict[str, dict] = {}
  for tag in tags:
    for d in order:
      path = root / d / tag / "summary.json"
      if path.is_file():
        s = results.read_summary_json(path)
        table.setdefault(s.get("label", tag), {})[d] = s
  datasets = [d for d in order if any(d in v for v in table.values())]
  return table, datasets


def write_table(root, table_name: str, tags: Sequence[str], datasets_first: Sequence[str] = (),
                compare: bool = False) -> pathlib.Path:
  """Writes root/table_<table_name>.md and .csv over every dataset with results for `tags` (see
  evaluation.paper_table; `compare` adds the published rows); returns the Markdown file's path."""
  table, datasets = collect_results(root, tags, datasets_first)
  return write_tables(root, table_name, table, datasets, compare=compare)
