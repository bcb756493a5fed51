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
* gs:// buckets: no kernel to release a lock, so `GcsLeaseLock` uses the storage's own primitive: the object
  WORKDIR/.diffssr.lock is created only if absent (GCS `ifGenerationMatch=0`, atomic on the server), holds
  the holder's record, and is rewritten every `REFRESH_S` as a lease (each rewrite conditional on the
  generation it wrote last). A run that dies stops refreshing; once the object is older than `LEASE_S` the
  next run takes it over (again conditional on the stale generation, so of two runs starting at once only
  one wins). A restart after a crash therefore waits at most `LEASE_S` (60 s; `DIFFSSR_GCS_LOCK_LEASE_S`
  sets it, the refresh runs every quarter of it), never forever; a run stopped by SIGTERM or an error
  deletes its lease on the way out, so its restart does not wait. Other
  schemes (s3://, ...) have no backend yet and get a warning that nothing prevents a second writer
  (`UnlockedLock`).

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
import threading
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


def _gcs_client():
  """A google-cloud-storage client (gcsfs' own dependency): the emulator's when STORAGE_EMULATOR_HOST is set
  (the client library reads it itself; no credentials there), else Application Default Credentials."""
  from google.cloud import storage as gcs
  if os.environ.get("STORAGE_EMULATOR_HOST"):
    from google.auth.credentials import AnonymousCredentials
    return gcs.Client(project="emulator", credentials=AnonymousCredentials())
  return gcs.Client()


class GcsLeaseLock(Lock):
  """A create-if-absent lease object in a gs:// workdir (see the module docstring)."""
  LEASE_S = 60.0
  REFRESH_S = 15.0
  LEASE_ENV = "DIFFSSR_GCS_LOCK_LEASE_S"

  def __init__(self, workdir: epath.Path):
    from google.api_core import exceptions
    self._exceptions = exceptions
    self.lease_s = float(os.environ.get(self.LEASE_ENV) or self.LEASE_S)
    self.refresh_s = min(self.REFRESH_S, self.lease_s / 4)
    bucket, _, prefix = os.fspath(workdir).split("://", 1)[1].partition("/")
    name = f"{prefix.strip('/')}/{LOCK_NAME}" if prefix.strip("/") else LOCK_NAME
    self.blob = _gcs_client().bucket(bucket).blob(name)
    self._workdir = workdir
    self._record = _holder_record()
    try:
      self.generation = self._write(0)
    except exceptions.PreconditionFailed:
      self.generation = self._take_over_if_stale()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._refresh, name="diffssr-workdir-lease", daemon=True)
    self._thread.start()

  def _write(self, generation: int) -> int:
    self.blob.upload_from_string(json.dumps(self._record), content_type="application/json",
                                 if_generation_match=generation)
    return int(self.blob.generation)

  def _refused(self, record: dict | None) -> WorkdirLockedError:
    return WorkdirLockedError(f"{self._workdir} is in use by another training run ({_describe(record)}); wait "
                              f"for it to end or stop it (a crashed run's lease expires after {self.lease_s:g} s), "
                              "or train in another --workdir")

  def _take_over_if_stale(self) -> int:
    try:
      self.blob.reload()
      record = json.loads(self.blob.download_as_bytes(if_generation_match=self.blob.generation) or b"null")
    except self._exceptions.NotFound:  # released meanwhile: try once more to create it
      return self._write(0)
    except (self._exceptions.PreconditionFailed, ValueError):
      record = None
    age = time.time() - self.blob.updated.timestamp()
    if age <= self.lease_s:
      raise self._refused(record)
    log.warning("%s: taking over the lease of a run that stopped refreshing it %.0f s ago (%s)", self._workdir,
                age, _describe(record))
    try:
      return self._write(int(self.blob.generation))
    except self._exceptions.PreconditionFailed:  # another run took it over first
      raise self._refused(None) from None

  def _refresh(self) -> None:
    while not self._stop.wait(self.refresh_s):
      try:
        self.generation = self._write(self.generation)
      except self._exceptions.PreconditionFailed:
        log.error("%s: the workdir lease was taken over by another run; this run no longer holds the lock",
                  self._workdir)
        return
      except Exception as e:  # noqa: BLE001 - a transient storage error: retry at the next refresh
        log.warning("%s: could not refresh the workdir lease (%s); retrying", self._workdir, e)

  def stop_refreshing(self) -> None:
    """Stops the lease's refresh (what a dead process does); `release` also deletes the object."""
    self._stop.set()
    self._thread.join()

  def release(self) -> None:
    if self.blob is None:
      return
    self.stop_refreshing()
    try:
      # The delete is conditional on our generation (a run that took the lease over keeps it); the reload
      # first also covers servers that ignore preconditions on deletes (fake-gcs-server does).
      self.blob.reload()
      if int(self.blob.generation) == self.generation:
        self.blob.delete(if_generation_match=self.generation)
    except (self._exceptions.NotFound, self._exceptions.PreconditionFailed):
      pass  # already taken over or gone: nothing of ours to remove
    self.blob = None


class UnlockedLock(Lock):
  """For workdirs whose storage has no lock backend yet (see the module docstring)."""

  def __init__(self, workdir: epath.Path):
    log.warning("%s: no workdir lock on this storage yet; make sure no other run writes there", workdir)

  def release(self) -> None:
    pass


_BACKENDS: dict[str, type[Lock]] = {"": FlockLock, "gs": GcsLeaseLock}


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
