"""TFRecord files without TensorFlow: framing, a writer, an offset index and a random-access reader.

Each record is framed as

  uint64 length (little-endian) | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)

(uncompressed TFRecord, the format `tf.io.TFRecordWriter` writes; CRC-32C from google-crc32c). Random
access works from an index of record offsets, built by walking the length headers (checking each header's
CRC and that the record fits in the file), so a truncated or damaged file is reported when it is opened,
and every read checks the data CRC. Errors are `RecordError`s naming the file, the record number and its
byte offset: a broken record is never skipped silently.

The framing and index stay hand-written (~150 lines) because grain's data source needs random access by
record number with CRC checks: TensorFlow's reader needs TensorFlow, and grain's own
`experimental.TFRecordIterDataset` reads sequentially and checks no CRC. The records themselves are
`tf.train.Example` messages from tensorflow-datasets' protobuf definitions (see `records`).

Shards in a bucket (gs://...) are read with ranged reads through fsspec: indexing reads each record's
12-byte header only (one small ranged read per record, the shards indexed in parallel threads), never a
shard start to finish, and each record is one ranged read of its exact bytes.
"""
from __future__ import annotations

import os
import pathlib
import struct
import threading

import google_crc32c
import numpy as np

from diffssr_jax import storage

HEADER = 12  # length (8) + length CRC (4)
FOOTER = 4  # data CRC


def masked_crc32c(data) -> int:
  """TFRecord's masked CRC-32C: rotated right by 15 bits plus a constant (CRCs of data holding CRCs)."""
  c = google_crc32c.value(bytes(data))
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class RecordError(IOError):
  """A TFRecord file is corrupt or truncated; the message names the file and byte offset."""


def frame(data) -> bytes:
  """One framed TFRecord record holding `data`."""
  data = bytes(data)
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", masked_crc32c(length)) + data
          + struct.pack("<I", masked_crc32c(data)))


class TFRecordWriter:
  """Appends framed records to a file; `write` returns the record's byte offset.

  The caller decides where the file goes (the exporter writes to a temporary name and renames once the
  shard is complete). `append=True` continues an existing file (used to resume a partial shard).
  """

  def __init__(self, path, append: bool = False):
    self.path = str(path)
    self._f = open(self.path, "ab" if append else "wb")
    self._f.seek(0, os.SEEK_END)

  def write(self, data) -> int:
    off = self._f.tell()
    self._f.write(frame(data))
    return off

  def tell(self) -> int:
    return self._f.tell()

  def flush(self, fsync: bool = False) -> None:
    self._f.flush()
    if fsync:
      os.fsync(self._f.fileno())

  def close(self) -> None:
    if not self._f.closed:
      self._f.flush()
      self._f.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _check_header(path, i, off, head) -> int:
  if len(head) < HEADER:
    raise RecordError(f"{path}: record {i} at offset {off}: truncated header ({len(head)} of {HEADER} bytes)")
  length_bytes = head[:8]
  (want,) = struct.unpack("<I", head[8:12])
  if masked_crc32c(length_bytes) != want:
    raise RecordError(f"{path}: record {i} at offset {off}: length CRC mismatch (corrupt header)")
  return struct.unpack("<Q", length_bytes)[0]


def _remote_fs(path: str):
  """(fsspec filesystem, its path) of a bucket URL; fsspec caches the filesystem per process."""
  import fsspec
  return fsspec.core.url_to_fs(path)


def read_range(path: str, start: int, end: int) -> bytes:
  """Bytes [start, end) of a bucket object (one ranged read; fewer at the end of the object)."""
  fs, p = _remote_fs(path)
  return fs.cat_file(p, start=start, end=end)


class _RangedReader:
  """seek/read over ranged reads of a bucket object, for the header walk of `build_index`."""

  def __init__(self, path: str):
    self.path, self.off = path, 0

  def seek(self, off: int):
    self.off = off

  def read(self, n: int) -> bytes:
    return read_range(self.path, self.off, self.off + n)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    pass


def build_index(path) -> tuple[np.ndarray, np.ndarray]:
  """(offsets, lengths) int64 arrays of every record of a TFRecord file, headers verified.

  Raises RecordError naming the file and offset when a header is damaged or the last record is cut off.
  A bucket object is walked with ranged reads of the headers only.
  """
  path = str(path)
  remote = storage.is_remote(path)
  size = storage.size(path) if remote else os.path.getsize(path)
  offsets, lengths = [], []
  with (_RangedReader(path) if remote else open(path, "rb")) as f:
    off = 0
    i = 0
    while off < size:
      f.seek(off)
      n = _check_header(path, i, off, f.read(HEADER))
      end = off + HEADER + n + FOOTER
      if end > size:
        raise RecordError(f"{path}: record {i} at offset {off}: truncated (needs {end - off} bytes, "
                          f"file has {size - off} left)")
      offsets.append(off)
      lengths.append(n)
      off = end
      i += 1
  return np.asarray(offsets, dtype=np.int64), np.asarray(lengths, dtype=np.int64)


def read_at(fd: int | None, path: str, index: int, offset: int, length: int, verify: bool = True) -> bytes:
  """The data of the record at `offset` (of known `length`), read with pread (a ranged read for a bucket
  object, fd None) and CRC-checked."""
  end = offset + HEADER + length + FOOTER
  buf = os.pread(fd, HEADER + length + FOOTER, offset) if fd is not None else read_range(path, offset, end)
  if len(buf) < HEADER + length + FOOTER:
    raise RecordError(f"{path}: record {index} at offset {offset}: truncated (file shrank?)")
  if verify:
    n = _check_header(path, index, offset, buf[:HEADER])
    if n != length:
      raise RecordError(f"{path}: record {index} at offset {offset}: length {n} differs from index {length}")
  data = buf[HEADER:HEADER + length]
  if verify:
    (want,) = struct.unpack("<I", buf[HEADER + length:])
    if masked_crc32c(data) != want:
      raise RecordError(f"{path}: record {index} at offset {offset}: data CRC mismatch (corrupt record)")
  return data


def iter_records(path, verify: bool = True):
  """Yields the data of every record of a file in order (sequential read, CRC-checked)."""
  path = str(path)
  with storage.path(path).open("rb") if storage.is_remote(path) else open(path, "rb") as f:
    off = 0
    i = 0
    while True:
      head = f.read(HEADER)
      if not head:
        return
      n = _check_header(path, i, off, head) if verify else struct.unpack("<Q", head[:8])[0]
      body = f.read(n + FOOTER)
      if len(body) < n + FOOTER:
        raise RecordError(f"{path}: record {i} at offset {off}: truncated")
      data = body[:n]
      if verify and masked_crc32c(data) != struct.unpack("<I", body[n:])[0]:
        raise RecordError(f"{path}: record {i} at offset {off}: data CRC mismatch (corrupt record)")
      yield data
      off += HEADER + n + FOOTER
      i += 1


class RecordIndex:
  """Global record numbering over several TFRecord files (offsets indexed once, picklable).

  `locate(i)` gives (file number, record number in the file, offset, length). File descriptors are opened
  lazily per process and thread, so the object can be sent to data-loading worker processes.
  """

  def __init__(self, paths, indexes=None):
    self.paths = [str(p) for p in paths]
    if not self.paths:
      raise FileNotFoundError("no TFRecord files given")
    if indexes is None and any(storage.is_remote(p) for p in self.paths):
      # Bucket shards: header walks are latency-bound small reads, so the shards are walked in parallel.
      import concurrent.futures
      with concurrent.futures.ThreadPoolExecutor(min(16, len(self.paths))) as pool:
        indexes = list(pool.map(build_index, self.paths))
    idx = indexes if indexes is not None else [build_index(p) for p in self.paths]
    self.offsets = [np.asarray(o, dtype=np.int64) for o, _ in idx]
    self.lengths = [np.asarray(n, dtype=np.int64) for _, n in idx]
    counts = np.array([len(o) for o in self.offsets], dtype=np.int64)
    self.starts = np.concatenate([[0], np.cumsum(counts)])
    self._local = threading.local()

  def __len__(self) -> int:
    return int(self.starts[-1])

  def locate(self, i: int) -> tuple[int, int, int, int]:
    n = len(self)
    if not -n <= i < n:
      raise IndexError(f"record {i} out of range ({n} records)")
    i %= n
    f = int(np.searchsorted(self.starts, i, side="right") - 1)
    j = i - int(self.starts[f])
    return f, j, int(self.offsets[f][j]), int(self.lengths[f][j])

  def _fd(self, f: int) -> int | None:
    if storage.is_remote(self.paths[f]):
      return None  # read_at makes ranged reads
    fds = getattr(self._local, "fds", None)
    if fds is None or getattr(self._local, "pid", None) != os.getpid():
      fds = self._local.fds = {}
      self._local.pid = os.getpid()
    if f not in fds:
      fds[f] = os.open(self.paths[f], os.O_RDONLY)
    return fds[f]

  def read(self, i: int, verify: bool = True) -> bytes:
    f, j, off, n = self.locate(i)
    return read_at(self._fd(f), self.paths[f], j, off, n, verify)

  def where(self, i: int) -> str:
    """'file, record j at offset o' of global record i (for error messages)."""
    f, j, off, _ = self.locate(i)
    return f"{self.paths[f]}: record {j} at offset {off}"

  def __getstate__(self):
    state = dict(self.__dict__)
    state.pop("_local")  # descriptors and thread-locals do not cross processes
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._local = threading.local()


def expand_files(spec) -> list[pathlib.Path]:
  """TFRecord files named by a glob, a directory (its `*.tfrecord*` files), a file or a list, sorted.
  Bucket URLs (gs://...) give epath paths, listed and globbed in the bucket."""
  import glob as _glob
  if isinstance(spec, (list, tuple)):
    out = []
    for s in spec:
      out.extend(expand_files(s))
    return sorted(set(out), key=lambda q: q.parts)  # pathlib's own order for local paths
  spec = str(spec)
  if storage.is_remote(spec):
    return _expand_remote(spec)
  p = pathlib.Path(spec)
  if p.is_dir():
    files = sorted(q for q in p.iterdir() if q.is_file() and ".tfrecord" in q.name
                   and not q.name.endswith((".json", ".tmp", ".partial")) and not q.name.startswith("."))
  elif p.is_file():
    files = [p]
  else:
    files = sorted(pathlib.Path(q) for q in _glob.glob(spec))
  if not files:
    raise FileNotFoundError(f"no TFRecord files match {spec!r}")
  return files


def _expand_remote(spec: str) -> list:
  p = storage.path(spec)
  if any(c in spec for c in "*?["):
    # epath globs relative to a folder: split the URL at its first component holding a wildcard.
    parts = spec.split("/")
    k = next(i for i, c in enumerate(parts) if any(ch in c for ch in "*?["))
    files = sorted((q for q in storage.path("/".join(parts[:k])).glob("/".join(parts[k:])) if q.is_file()),
                   key=str)
  elif p.is_dir():
    files = sorted((q for q in p.iterdir() if ".tfrecord" in q.name
                    and not q.name.endswith((".json", ".tmp", ".partial")) and not q.name.startswith(".")
                    and q.is_file()), key=str)
  elif p.exists():
    files = [p]
  else:
    files = []
  if not files:
    raise FileNotFoundError(f"no TFRecord files match {spec!r}")
  return files
