"""One writer per workdir: an exclusive lock held for the whole training run.

Two runs in one workdir interleave their checkpoints, metrics and config.json, and orbax's temporary folders
of one are clobbered by the other. `workdir_lock(workdir)` is taken before anything is written there and held
until the run ends; a second run fails at once with `WorkdirLockedError`, whose one-line message names the
holder (host, pid, start time).

Interface: `acquire(workdir) -> Lock` (`.release()`, also a context manager via `workdir_lock`). The
implementation is chosen from the workdir's kind by `_BACKENDS` (scheme -> class):

* local (POSIX) folders: `FlockLock`, `flock(2)` on WORKDIR/.diffssr.lock. The kernel releases the lock when
  the process dies however it dies (kill -9, OOM, power loss of the client), so a stale lock never blocks
  a restart: the file left behind only records the last holder, and is not the lock itself. Linux NFS maps
  flock to POSIX byte-range locks, so the lock also holds between hosts sharing the folder. (The `filelock`
  package opens the file with O_TRUNC before locking, which would erase the holder's record that the
  refusal message reads; flock is three lines from the standard library.)
* buckets (gs://, s3://): no kernel to release a lock. The backend to add there uses the storage's own
  primitive: create WORKDIR/.diffssr.lock only if absent (GCS `ifGenerationMatch=0`, S3 `If-None-Match: *`),
  refresh it as a lease while the run lives, and treat a lease older than its timeout as stale. It
  implements the same `Lock` interface and registers under its scheme; until then such workdirs get a
  warning that nothing prevents a second writer (`UnlockedLock`).

Multi-process runs: process 0 takes the lock for all (the others would find it held by process 0) and
tells the others whether it got it, so they all stop together with the same message.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time

from etils import epath

log = logging.getLogger(__name__)

LOCK_NAME = ".diffssr.lock"


class WorkdirLockedError(RuntimeError):
  """Another process holds the workdir's lock."""


class Lock:
  """A held workdir lock."""

  def release(self) -> None:
    raise NotImplementedError


def _holder_record() -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _describe(record: dict | None) -> str:
  if not record:
    return "another process (holder not recorded yet)"
  return f"pid {record.get('pid')} on host {record.get('host')} since {record.get('start')}"


class FlockLock(Lock):
  """flock(2) on WORKDIR/.diffssr.lock (see the module docstring)."""

  def __init__(self, workdir: epath.Path):
    self.path = workdir / LOCK_NAME
    workdir.mkdir(parents=True, exist_ok=True)
    self._fd = os.open(os.fspath(self.path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      held = e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
      record = self._read() if held else None
      os.close(self._fd)
      if not held:
        raise
      raise WorkdirLockedError(f"{workdir} is in use by another training run ({_describe(record)}); wait for it "
                               "to end or stop it, or train in another --workdir") from None
    # The holder's record, for the message of a refused second run; written only once we hold the lock.
    data = json.dumps(_holder_record()).encode()
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, data, 0)
    os.fsync(self._fd)

  def _read(self) -> dict | None:
    try:
      return json.loads(os.pread(self._fd, 4096, 0) or b"null")
    except ValueError:
      return None

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing the descriptor releases the flock; the record file stays
      self._fd = None


class UnlockedLock(Lock):
  """For workdirs whose storage has no lock backend yet (see the module docstring)."""

  def __init__(self, workdir: epath.Path):
    log.warning("%s: no workdir lock on this storage yet; make sure no other run writes there", workdir)

  def release(self) -> None:
    pass


_BACKENDS: dict[str, type[Lock]] = {"": FlockLock}


def _scheme(workdir) -> str:
  text = os.fspath(workdir) if not isinstance(workdir, str) else workdir
  return text.split("://", 1)[0] if "://" in text else ""


def acquire(workdir) -> Lock:
  """Takes the workdir's exclusive lock (creating the folder); raises WorkdirLockedError when it is held."""
  backend = _BACKENDS.get(_scheme(workdir), UnlockedLock)
  return backend(epath.Path(workdir))


@contextlib.contextmanager
def workdir_lock(workdir, *, process_index: int = 0, broadcast=None):
  """Holds the workdir's lock for the block. With several processes only process 0 takes it; `broadcast(ok)`
  (every process calls it; returns process 0's value) tells the others whether it did."""
  lock, error = None, None
  if process_index == 0:
    try:
      lock = acquire(workdir)
    except WorkdirLockedError as e:
      error = e
  if broadcast is not None and not broadcast(error is None):
    raise error or WorkdirLockedError(f"{workdir} is in use by another training run (see process 0's message)")
  if error is not None:
    raise error
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()
