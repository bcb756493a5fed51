"""Evaluation results on disk: a per-image metrics CSV that survives crashes, summary JSON, paper-style tables.

The CSV is the evaluation's resume point: each finished image is one line, appended with a single write and
made durable (flush + fsync) before the next image starts. A crash can therefore only leave the *last* line
incomplete; reopening detects it (no trailing newline, NUL padding or a wrong field count) and truncates the
file back to the last complete row. A malformed row anywhere else is real corruption and raises.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence

from diffssr_jax import fileio, storage

METRIC_COLUMNS = ("image", "psnr_y", "ssim_y", "psnr_rgb", "lr_psnr", "artifact")

# Whether a larger value is better, for choosing the bold entry in tables (unknown metrics: higher is better).
HIGHER_IS_BETTER = {"psnr_y": True, "ssim_y": True, "psnr_rgb": True, "lr_psnr": True, "psnr": True,
                    "ssim": True, "artifact": False, "lpips": False, "fid": False, "maniqa": True}
METRIC_LABELS = {"psnr_y": "PSNR-Y", "ssim_y": "SSIM-Y", "psnr_rgb": "PSNR", "lr_psnr": "LR-PSNR",
                 "artifact": "Artifact", "lpips": "LPIPS", "fid": "FID", "psnr": "PSNR", "ssim": "SSIM", "maniqa": "MANIQA"}
METRIC_FORMATS = {"psnr_y": ".2f", "psnr_rgb": ".2f", "lr_psnr": ".2f", "psnr": ".2f", "ssim_y": ".4f",
                  "ssim": ".4f", "lpips": ".4f", "fid": ".2f", "artifact": ".3e", "maniqa": ".4f"}


class CorruptResultsError(ValueError):
  """A results file is damaged somewhere other than a torn last line (or has a different header)."""


def _format_value(v) -> str:
  """A CSV field: '' for missing, repr for floats (round-trips exactly, including inf and nan)."""
  if v is None:
    return ""
  if isinstance(v, float) or hasattr(v, "dtype"):
    return repr(float(v))
  return str(v)


def _parse_value(s: str) -> float | None:
  return None if s == "" else float(s)


def _csv_line(fields: Sequence[str]) -> bytes:
  buf = io.StringIO()
  csv.writer(buf, lineterminator="\n").writerow(fields)
  return buf.getvalue().encode("utf-8")


_fsync_dir = fileio.fsync_dir


class MetricsCSV:
  """Append-only per-image metrics table `image, psnr_y, ssim_y, psnr_rgb, lr_psnr, artifact[, extra...]`.

  `MetricsCSV(path, extra=("lpips",))` creates the file with its header or reopens an existing one (whose
  header must equal these columns), dropping a torn last line. `done` is the set of images already
  recorded, `append(image, metrics)` records one more, durably; `rows()` reads them back as dicts of floats
  (None for a missing optional metric).
  """

  def __init__(self, path, extra: Sequence[str] = ()):
    # A bucket object cannot be truncated or appended to: there each change rewrites the (small) object in one
    # all-or-nothing upload instead (see diffssr_jax.storage).
    self.path = storage.native(path)
    self.remote = storage.is_remote(self.path)
    self.columns = METRIC_COLUMNS + tuple(c for c in extra if c not in METRIC_COLUMNS)
    if len(set(self.columns)) != len(self.columns):
      raise ValueError(f"duplicate columns in {self.columns}")
    self._rows: list[dict] = []
    self._recover_or_create()

  @property
  def done(self) -> set[str]:
    return {r["image"] for r in self._rows}

  def rows(self) -> list[dict]:
    return [dict(r) for r in self._rows]

  def __len__(self) -> int:
    return len(self._rows)

  def _recover_or_create(self) -> None:
    header = _csv_line(self.columns)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    data = self.path.read_bytes() if self.path.exists() else b""
    if not data.startswith(header):
      if header.startswith(data.rstrip(b"\0")):  # empty file, or a crash while writing the header
        self._write_fresh(header)
        return
      first = data.split(b"\n", 1)[0].decode("utf-8", "replace")
      raise CorruptResultsError(f"{self.path}: header {first!r} differs from the expected columns "
                                f"{','.join(self.columns)} (another run's file? use a new path)")
    keep = len(header)
    body = data[len(header):]
    lines = body.split(b"\n")
    # The text after the last newline is an unfinished line (a crash mid-append): everything before it is
    # complete. Each complete line must parse; a bad one can only be forgiven if it is the final line, where
    # zero-filled blocks or a partial line can appear after a power loss.
    complete, tail = lines[:-1], lines[-1]
    for i, raw in enumerate(complete):
      row = self._parse_line(raw)
      if row is None:
        if i == len(complete) - 1 and not tail.strip(b"\0"):
          break
        raise CorruptResultsError(f"{self.path}: malformed row {i + 2}: {raw[:200]!r}")
      if row["image"] in self.done:
        raise CorruptResultsError(f"{self.path}: image {row['image']!r} recorded twice (row {i + 2})")
      self._rows.append(row)
      keep += len(raw) + 1
    if keep != len(data) and self.remote:
      fileio.atomic_write(self.path, data[:keep])
    elif keep != len(data):
      with open(self.path, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())

  def _parse_line(self, raw: bytes) -> dict | None:
    """The row of one complete line, or None when it does not hold exactly our fields."""
    if b"\0" in raw:
      return None
    try:
      fields = next(csv.reader([raw.decode("utf-8")]))
      if len(fields) != len(self.columns) or not fields[0]:
        return None
      return {"image": fields[0], **{c: _parse_value(v) for c, v in zip(self.columns[1:], fields[1:])}}
    except (UnicodeDecodeError, ValueError, StopIteration, csv.Error):
      return None

  def _write_fresh(self, header: bytes) -> None:
    if self.remote:
      fileio.atomic_write(self.path, header)
      return
    with open(self.path, "wb") as f:
      f.write(header)
      f.flush()
      os.fsync(f.fileno())
    _fsync_dir(self.path.parent)

  def append(self, image: str, metrics: Mapping[str, float | None]) -> None:
    """Records `image`'s metrics as one line, durably. Required metrics must be present (NaN allowed);
    optional ones may be missing; unknown keys and already-recorded images are errors."""
    image = str(image)
    if not image or any(ch in image for ch in "\r\n\0"):
      raise ValueError(f"image name {image!r} must be non-empty and on one line")
    if image in self.done:
      raise ValueError(f"{self.path}: {image!r} is already recorded")
    unknown = set(metrics) - set(self.columns[1:])
    if unknown:
      raise ValueError(f"unknown metric columns {sorted(unknown)}; this file has {self.columns}")
    missing = [c for c in METRIC_COLUMNS[1:] if metrics.get(c) is None]
    if missing:
      raise ValueError(f"{image}: required metrics missing: {missing}")
    values = {c: None if metrics.get(c) is None else float(metrics[c]) for c in self.columns[1:]}
    line = _csv_line([image] + [_format_value(values[c]) for c in self.columns[1:]])
    if self.remote:
      fileio.atomic_write(self.path, self.path.read_bytes() + line)
      self._rows.append({"image": image, **values})
      return
    _append_durably(self.path, line)
    self._rows.append({"image": image, **values})

  def means(self) -> dict[str, float]:
    """Per-column means over the recorded images (see `column_means`)."""
    return column_means(self._rows, self.columns[1:])


def _append_durably(path, line: bytes) -> None:
  """One write of the whole line on an O_APPEND descriptor, then fsync: a crash leaves at most a prefix."""
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    view = memoryview(line)
    while view:
      n = os.write(fd, view)
      view = view[n:]
    os.fsync(fd)
  finally:
    os.close(fd)


DIGESTS_NAME = "sha256sums.txt"
_DIGEST_LINE = re.compile(r"([0-9a-f]{64})  (.+)")


class DigestLog:
  """The SHA-256 of every output file of a results folder, so a resumed run can tell that the files it
  would skip are still the ones it wrote (bytes flipped or a file cut short decode as garbage or not at all).

  One line per file in `sha256sum`'s format (`<hex>  <name>`, so `sha256sum -c sha256sums.txt` checks the
  folder by hand), appended durably after the file is complete and before its metrics row. A file written
  again gets a new line; the last one counts. A torn last line (a crash mid-append) is cut off on open.
  """

  def __init__(self, path):
    self.path = storage.native(path)
    self.remote = storage.is_remote(self.path)  # a bucket object: rewritten whole at each change
    self._digests: dict[str, str] = {}
    data = self.path.read_bytes() if self.path.exists() else b""
    complete = data[:data.rfind(b"\n") + 1]
    for raw in complete.decode("utf-8", "replace").splitlines():
      m = _DIGEST_LINE.fullmatch(raw)
      if m:  # anything else (a damaged line) just leaves that file unrecorded: it is then decoded instead
        self._digests[m.group(2)] = m.group(1)
    if len(complete) != len(data):
      if self.remote:
        fileio.atomic_write(self.path, complete)
      else:
        with open(self.path, "r+b") as f:
          f.truncate(len(complete))
          os.fsync(f.fileno())

  def get(self, name: str) -> str | None:
    return self._digests.get(name)

  def record(self, name: str, path) -> None:
    """Records the digest of the (complete) file at `path` under `name`."""
    if any(ch in name for ch in "\r\n"):
      raise ValueError(f"file name {name!r} must be on one line")
    digest = fileio.file_sha256(path)
    line = f"{digest}  {name}\n".encode("utf-8")
    if self.remote:
      old = self.path.read_bytes() if self.path.exists() else b""
      fileio.atomic_write(self.path, old + line)
    else:
      _append_durably(self.path, line)
    self._digests[name] = digest


def column_means(rows: Iterable[Mapping], columns: Sequence[str]) -> dict[str, float]:
  """Mean of each column over rows, skipping missing values and NaN (e.g. LR-PSNR without an LR). +inf
  (PSNR of an exact reconstruction) is kept, so a mean of inf says so. A column with no values gives NaN."""
  rows = list(rows)
  out = {}
  for c in columns:
    vals = [float(r[c]) for r in rows if r.get(c) is not None and not math.isnan(float(r[c]))]
    if not vals:
      out[c] = math.nan
    elif any(math.isinf(v) for v in vals):
      out[c] = sum(vals) / len(vals)  # inf (or nan for +inf and -inf together)
    else:
      out[c] = math.fsum(vals) / len(vals)
  return out


def _json_safe(x):
  """JSON has no inf/nan: non-finite floats become the strings 'inf', '-inf', 'nan'."""
  if isinstance(x, Mapping):
    return {str(k): _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  if hasattr(x, "dtype") and getattr(x, "ndim", 0) == 0:
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
  return x


def write_summary_json(path, means: Mapping) -> None:
  """Writes `means` (any JSON-able mapping, e.g. {metric: mean} or {dataset: {metric: mean}}) atomically:
  to a temporary file in the same folder, fsynced, then renamed over `path`; non-finite floats as strings."""
  path = storage.native(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  text = json.dumps(_json_safe(means), indent=2, sort_keys=False, allow_nan=False) + "\n"
  fileio.atomic_write(path, text)


def read_summary_json(path) -> dict:
  """Inverse of `write_summary_json` (the strings 'inf', '-inf', 'nan' become floats again)."""
  def back(x):
    if isinstance(x, dict):
      return {k: back(v) for k, v in x.items()}
    if isinstance(x, list):
      return [back(v) for v in x]
    if x in ("inf", "-inf", "nan"):
      return float(x)
    return x
  return back(json.loads(storage.native(path).read_text(encoding="utf-8")))


def _best(values: list[float | None], higher: bool) -> set[int]:
  """Indices of the best finite-or-inf value (all ties), ignoring missing and NaN."""
  ok = [(i, v) for i, v in enumerate(values) if v is not None and not math.isnan(v)]
  if not ok:
    return set()
  target = max(v for _, v in ok) if higher else min(v for _, v in ok)
  return {i for i, v in ok if v == target}


def markdown_table(results: Mapping[str, Mapping[str, Mapping[str, float]]],
                   metrics: Sequence[str] = ("psnr_y", "ssim_y", "fid"),
                   datasets: Sequence[str] | None = None) -> str:
  """A Markdown table laid out like SAM-DiffSR's Table 2: one row per method/checkpoint, for each dataset
  (in order, e.g. Urban100, BSDS100, Manga109, General100, DIV2K) a group of metric columns, the best value
  of every column in bold (higher PSNR/SSIM, lower FID/LPIPS/artifact).

  `results[method][dataset][metric]` holds the values; missing ones print as '-', and metrics no method has
  for any dataset are left out. Markdown has no merged header cells, so each column is titled
  "<dataset> <metric>".
  """
  methods = list(results)
  if datasets is None:
    datasets = []
    for m in methods:
      datasets += [d for d in results[m] if d not in datasets]
  present = [k for k in metrics if any(k in results[m].get(d, {}) for m in methods for d in datasets)]
  columns = [(d, k) for d in datasets for k in present
             if any(k in results[m].get(d, {}) for m in methods)]
  cells = [["" for _ in columns] for _ in methods]
  for j, (d, k) in enumerate(columns):
    vals = [results[m].get(d, {}).get(k) for m in methods]
    vals = [None if v is None else float(v) for v in vals]
    best = _best(vals, HIGHER_IS_BETTER.get(k, True)) if len(methods) > 1 else set()
    for i, v in enumerate(vals):
      text = "-" if v is None else format(v, METRIC_FORMATS.get(k, ".4g"))
      cells[i][j] = f"**{text}**" if i in best else text
  arrows = {True: "↑", False: "↓"}
  head = ["Method"] + [f"{d} {METRIC_LABELS.get(k, k)}{arrows[HIGHER_IS_BETTER.get(k, True)]}"
                       for d, k in columns]
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join([":---"] + [":---:"] * len(columns)) + "|"]
  for m, row in zip(methods, cells):
    lines.append("| " + " | ".join([str(m)] + row) + " |")
  return "\n".join(lines) + "\n"
