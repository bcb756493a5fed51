"""Where files live: one path type (`etils.epath.Path`) for every user-given location, local or in a bucket.

Every location a user gives (workdir, data.train_files, eval folders, evaluate/upscale inputs and outputs,
checkpoints, the export tool's --images/--out, the SAM checkpoint, metric weights) goes through `path` (an
epath.Path always) or `native` (an epath.Path for a URL, a pathlib.Path for a local path, where code relies on
pathlib's stat/rglob/resolve, which epath's differ from), so `gs://bucket/...` (and the other schemes epath
serves: s3://, az://, hf:// through fsspec) works wherever a local path does, and local paths behave exactly
as before.

`check` refuses, before any work, a location that cannot be served: a scheme no backend handles, a bucket
scheme whose fsspec backend is not installed, or a gs:// path with neither Google credentials nor an emulator
endpoint. The refusal is one line naming the path and the reason (`StorageError`), and nothing is created
(a bucket URL handed to pathlib would become a local folder named `gs:`; epath never does that, and neither
does `absolute` below, which leaves URLs alone: epath's own `absolute()` prefixes a URL with the current
folder).

Writes to a bucket: GCS has no rename (a "rename" is copy + delete, not atomic), but an object upload is
all-or-nothing: the object appears with its full content when the upload is finalised, or not at all. So a
single-file write (`fileio.atomic_write`) writes the object in place: a reader sees the old object or the
complete new one, never a torn file. Multi-file writes publish a small object last: orbax's checkpoint
steps its `commit_success.txt` (after our manifest; see training/integrity.py), export shards their
metadata object before the shard itself (data/export.py). Appends (metrics.jsonl, results) rewrite the whole
object, which stays small.

The GCS emulator (tests, trying a pod recipe without a bucket): when STORAGE_EMULATOR_HOST is set (the
variable gcsfs and google-cloud-storage read), `point_at_emulator` also points orbax's TensorStore GCS driver
at it (TENSORSTORE_GCS_HTTP_URL, and GOOGLE_AUTH_TOKEN_FOR_TESTING so it does not look for credentials), uses
anonymous gcsfs access, and turns off gcsfs' zonal/hierarchical-bucket probe
(GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false): that probe calls the Storage Control gRPC API, which emulators do
not serve, and retries it for 60 s per bucket before falling back to the JSON API.
"""
from __future__ import annotations

import functools
import os
import re

from etils import epath

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
# fsspec backend module of each bucket scheme epath serves (epath maps gs/s3/az/hf URLs to fsspec).
_BACKENDS = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs", "hf": "huggingface_hub"}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class StorageError(ValueError):
  """A location that cannot be served; the message is one line naming the path and the reason."""


def scheme(p) -> str:
  """'gs', 's3', ... for a URL; '' for a local path."""
  m = _URL.match(os.fspath(p) if not isinstance(p, str) else p)
  return m.group(1).lower() if m else ""


def is_remote(p) -> bool:
  return bool(scheme(p))


def path(p) -> epath.Path:
  """`p` (str, pathlib or epath) as an epath.Path; StorageError for a URL scheme no backend serves."""
  s = scheme(str(p))
  if s and s not in _BACKENDS and s != "file":
    raise StorageError(f"{p}: no storage backend serves '{s}://' (served: local paths, "
                       + ", ".join(f"{k}://" for k in _BACKENDS) + ")")
  if s == "file":
    p = str(p)[len("file://"):]
  return epath.Path(p)


def native(p):
  """pathlib.Path for a local path (code that lists, stats and relates local files stays exactly as it
  was), epath.Path for a URL."""
  import pathlib
  return path(p) if is_remote(str(p)) else pathlib.Path(p)


def absolute(p):
  """An absolute path (orbax requires them): local paths against the current folder, URLs unchanged."""
  q = native(p)
  return q if is_remote(q) else q.absolute()


def size(p) -> int:
  """Bytes in a file (epath's stat has `length`, not st_size)."""
  q = path(p)
  return os.path.getsize(q) if not is_remote(q) else int(q.stat().length)


def files_below(folder) -> list[str]:
  """Relative POSIX names of every file below `folder`, sorted (epath refuses `**` globs on buckets: one
  listing per folder could be thousands of requests, so bucket folders are walked)."""
  q = native(folder)
  if not is_remote(q):
    return sorted(p.relative_to(q).as_posix() for p in q.rglob("*") if p.is_file())
  def bare(p) -> str:  # epath's walk yields its roots without the "gs://" prefix
    return _URL.sub("", str(p)).rstrip("/")
  base = bare(q)
  out = []
  for root, _, names in q.walk():
    rel = bare(root)[len(base):].lstrip("/")
    out.extend(f"{rel}/{n}" if rel else n for n in names)
  return sorted(out)


def point_at_emulator() -> str | None:
  """When STORAGE_EMULATOR_HOST is set: makes every GCS client of the process (and its children) use it;
  returns the endpoint. Variables already set are left alone."""
  host = os.environ.get(EMULATOR_ENV, "").strip()
  if not host:
    return None
  url = host if "://" in host else f"http://{host}"
  os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
  os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
  os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
  os.environ.setdefault("FSSPEC_GCS_TOKEN", "anon")
  import fsspec.config
  fsspec.config.conf.setdefault("gcs", {}).setdefault("token", "anon")
  return url


@functools.lru_cache(maxsize=None)
def _gcs_credentials_problem() -> str | None:
  if point_at_emulator():
    return None
  try:
    import google.auth
    import google.auth.exceptions
    google.auth.default()
  except Exception as e:  # DefaultCredentialsError, or a metadata server that does not answer
    return (f"no Google Cloud credentials ({type(e).__name__}): run `gcloud auth application-default login`, "
            f"set GOOGLE_APPLICATION_CREDENTIALS, run on a GCP VM with a service account, or set "
            f"{EMULATOR_ENV} for an emulator")
  return None


def check(p, what: str | None = None) -> epath.Path:
  """`path(p)`, after making sure its backend can serve it; StorageError (one line) otherwise. Creates
  nothing and reads nothing from the location itself."""
  label = f"{what} {p}" if what else f"{p}"
  try:
    q = path(p)
  except StorageError as e:
    raise StorageError(f"{what + ' ' if what else ''}{e}") from None
  s = scheme(q)
  if not s:
    return q
  module = _BACKENDS[s]
  try:
    __import__(module)
  except ImportError:
    raise StorageError(f"{label}: '{s}://' needs the Python package {module} (pip install {module})") from None
  if s == "gs":
    problem = _gcs_credentials_problem()
    if problem:
      raise StorageError(f"{label}: {problem}")
  return q


def check_all(locations: dict) -> None:
  """`check` for each {what: location} (None, '' and empty lists skipped); lists are checked item by item."""
  for what, value in locations.items():
    if not value:
      continue
    for v in (value if isinstance(value, (list, tuple)) else [value]):
      if v:
        check(v, what)


point_at_emulator()  # before anything imports gcsfs (it reads its zonal-bucket switch at import)
