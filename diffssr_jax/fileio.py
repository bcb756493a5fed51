"""Crash-safe file writes shared by every writer of results, manifests, configs and images.

A local file is written to a temporary name in its own folder, flushed and fsynced, then renamed over the
destination, so readers (and a resumed run) only ever see the old file or the complete new one. A bucket
object (gs://...) has no rename, but its upload is all-or-nothing, so it is written in place to the same
effect (see `diffssr_jax.storage`). numpy-free and jax-free: the torch-only export tool uses it too.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import tempfile

from diffssr_jax import storage


def fsync_dir(path) -> None:
  """Makes a rename or file creation in folder `path` durable (best effort: some filesystems refuse)."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


@contextlib.contextmanager
def atomic_path(path, mode: int = 0o644):
  """Yields a temporary path beside `path`; on normal exit it is fsynced and renamed over `path`, on an
  exception it is removed and `path` is left untouched. For a bucket object the temporary file is local and
  uploaded once complete (the upload is all-or-nothing)."""
  if storage.is_remote(path):
    with _remote_atomic_path(storage.path(path)) as tmp:
      yield tmp
    return
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  os.close(fd)
  try:
    os.chmod(tmp, mode)  # mkstemp makes 0600; outputs are meant to be shared
    yield tmp
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  fsync_dir(path.parent)


@contextlib.contextmanager
def _remote_atomic_path(path):
  with tempfile.TemporaryDirectory(prefix="diffssr-upload-") as d:
    tmp = os.path.join(d, path.name)
    yield tmp
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.path(tmp).copy(path, overwrite=True)


def atomic_write(path, data: bytes | str) -> None:
  """Writes bytes or UTF-8 text to `path` atomically."""
  data = data.encode("utf-8") if isinstance(data, str) else data
  if storage.is_remote(path):  # one upload: the object appears complete or not at all
    path = storage.path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)


def atomic_write_json(path, obj, **dump_kwargs) -> None:
  atomic_write(path, json.dumps(obj, **dump_kwargs) + "\n")


def file_sha256(path) -> str:
  """Hex SHA-256 of a file's contents (export shards, the SAM checkpoint, checkpoint manifests);
  `hashlib.file_digest` releases the GIL while hashing large chunks."""
  if storage.is_remote(path):  # fsspec files: plain chunked reads
    h = hashlib.sha256()
    with storage.path(path).open("rb") as f:
      while chunk := f.read(1 << 22):
        h.update(chunk)
    return h.hexdigest()
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def append_text(path, text: str) -> None:
  """Appends to a text file (a log). A bucket object cannot be appended to: it is rewritten whole (one
  all-or-nothing upload), which suits the small logs this is used for."""
  if storage.is_remote(path):
    path = storage.path(path)
    old = path.read_text() if path.exists() else ""
    atomic_write(path, old + text)
    return
  with open(path, "a") as f:
    f.write(text)
