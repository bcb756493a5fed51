"""Whether a checkpoint step holds the bytes and the numbers that were saved: manifests and the finite check.

Why a manifest of our own: orbax (0.12.8) writes each step to a temporary folder and renames it when
complete, so a crash never leaves a half-written step that looks finished, but it has no check that the
bytes read back are those written. OCDBT checksums its manifests and b-tree nodes and zarr3 the shard
index (crc32c), but the array chunks themselves carry no checksum: bytes flipped in
`state/ocdbt.process_0/d/*` restore silently as garbage (NaN, 1e38 in Adam moments), and a deleted or
truncated data file fails deep inside tensorstore. So every step records the size and SHA-256 of its files
in `diffssr_manifest.json`, a restore checks them first, then checks that the restored floating-point
arrays are finite (`nonfinite_report`, also what refuses to save a state holding NaN/inf).

When the manifest is written: inside orbax's commit of the step, after every item has been written and
finalised (OCDBT merged) and just before the temporary folder is renamed to `<step>` (a
`TemporaryPath` subclass, `_SealingTemporaryPath`, on orbax's own background thread for async saves). A
step folder therefore never exists without its manifest; only orbax's commit bookkeeping written after
it (`_CHECKPOINT_METADATA`, the top-level `commit_success.txt`) is not covered. Local (POSIX) workdirs
use orbax's atomic-rename commit. A bucket has no atomic rename, so bucket workdirs (gs://...) use orbax's
own commit protocol for them, `CommitFileTemporaryPath`: the step is written in place and published by the
small `commit_success.txt` object written last (orbax lists a gs:// step only once that exists);
`_SealingCommitFilePath` writes our manifest just before it.

Steps without a manifest were written by diffssr-jax before checkpoints were verified (or by another
tool). They are not trusted unless the environment variable DIFFSSR_TRUST_UNVERIFIED_CHECKPOINTS=1 is
set (`trust_unverified`); see training/checkpointing.py for what restores do with them.

Cost: one SHA-256 pass over a step's files when it is saved (on orbax's thread), at each retention pass
(every step on disk) and when it is restored; SHA-256 runs at ~1.7 GB/s on the 2-core development CPU,
so ~0.15 s per pass over a 256 MB paper-size train state.
"""
from __future__ import annotations

import asyncio
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from diffssr_jax import fileio, storage

MANIFEST_NAME = "diffssr_manifest.json"
MANIFEST_FORMAT = "diffssr-checkpoint-manifest/1"
TRUST_ENV = "DIFFSSR_TRUST_UNVERIFIED_CHECKPOINTS"
# Written by orbax's commit after the manifest (top level of a step folder only): bookkeeping, no arrays.
_NOT_SEALED = frozenset({MANIFEST_NAME, "_CHECKPOINT_METADATA", "commit_success.txt"})


class NoCheckpointError(FileNotFoundError):
  """No usable checkpoint where one was asked for."""


class DamagedCheckpointError(NoCheckpointError):
  """A checkpoint step whose files or arrays are not those that were saved."""

  def __init__(self, path, reason: str):
    self.path, self.reason = storage.native(path), reason
    super().__init__(f"checkpoint {path} is damaged: {reason}")


class UnverifiedCheckpointError(NoCheckpointError):
  """Only checkpoint steps without a checksum manifest (older diffssr-jax) are there."""


class CheckpointMismatchError(ValueError):
  """An intact checkpoint (checksums match) that does not restore into the requested model."""


class NonFiniteStateError(FloatingPointError):
  """A train state with NaN/inf values was offered for saving."""


def trust_unverified() -> bool:
  """Whether DIFFSSR_TRUST_UNVERIFIED_CHECKPOINTS accepts steps without a manifest."""
  return os.environ.get(TRUST_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _sealed_files(step_dir) -> list[str]:
  return [rel for rel in storage.files_below(step_dir) if not ("/" not in rel and rel in _NOT_SEALED)]


def write_manifest(step_dir) -> None:
  """Records size and SHA-256 of every file of a finished checkpoint step (atomically)."""
  step_dir = storage.native(step_dir)
  files = {rel: {"size": storage.size(step_dir / rel), "sha256": fileio.file_sha256(step_dir / rel)}
           for rel in _sealed_files(step_dir)}
  fileio.atomic_write_json(step_dir / MANIFEST_NAME, {"format": MANIFEST_FORMAT, "files": files}, indent=1)


def verify_files(step_dir) -> bool:
  """True when the step's files match its manifest, False when it has no manifest; raises
  DamagedCheckpointError when the manifest is unreadable or a file is missing, resized or changed."""
  step_dir = storage.native(step_dir)
  path = step_dir / MANIFEST_NAME
  if not path.is_file():
    return False
  try:
    manifest = json.loads(path.read_text())
    files = manifest["files"]
    if manifest.get("format") != MANIFEST_FORMAT or not files:
      raise ValueError(f"format {manifest.get('format')!r} with {len(files)} files")
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise DamagedCheckpointError(step_dir, f"unreadable {MANIFEST_NAME} ({e})") from None
  for rel, want in files.items():  # sizes first: cheap, and what a truncation or deletion changes
    f = step_dir / rel
    if not f.is_file():
      raise DamagedCheckpointError(step_dir, f"file {rel} is missing")
    if storage.size(f) != want["size"]:
      raise DamagedCheckpointError(step_dir, f"file {rel} has {storage.size(f)} bytes, {want['size']} were saved")
  for rel, want in files.items():
    if fileio.file_sha256(step_dir / rel) != want["sha256"]:
      raise DamagedCheckpointError(step_dir, f"file {rel} does not match its SHA-256 (bytes changed on disk)")
  return True


class _SealingTemporaryPath(ocp.path.atomicity.AtomicRenameTemporaryPath):
  """orbax's atomic-rename commit, writing our manifest into a step folder just before it is renamed.

  orbax uses the class for the item folders too (state/, data/, meta/); only step folders (numeric
  names) get a manifest. Runs after all items are finalised, on orbax's commit thread for async saves.
  """

  async def finalize(self, *args, **kwargs):
    final = storage.native(str(self.get_final()))
    if final.name.isdigit():
      await asyncio.to_thread(write_manifest, storage.native(str(self.get())))
    return await super().finalize(*args, **kwargs)


class _SealingCommitFilePath(ocp.path.atomicity.CommitFileTemporaryPath):
  """orbax's commit-file protocol (bucket workdirs: the step is written in place, `commit_success.txt` written
  last publishes it), writing our manifest just before that file."""

  async def finalize(self, *args, **kwargs):
    final = storage.native(str(self.get_final()))
    if final.name.isdigit():
      await asyncio.to_thread(write_manifest, storage.native(str(self.get())))
    return await super().finalize(*args, **kwargs)


def temporary_path_class(directory):
  return _SealingCommitFilePath if storage.is_remote(directory) else _SealingTemporaryPath


# ----------------------------------------------------------------------------- finite check
@jax.jit
def _nonfinite_counts(leaves):
  """[[NaN count, inf count] per leaf]: one reduction on the arrays' own devices (sharded over several
  processes too), so only two numbers per leaf reach the host."""
  return jnp.stack([jnp.stack([jnp.isnan(x).sum(), jnp.isinf(x).sum()]) for x in leaves])


def nonfinite_report(tree) -> str | None:
  """None when every floating-point leaf of `tree` is finite, else "N NaN and M inf values (first in PATH)".

  The one finite check of checkpoints: a restored step that fails it is damaged, a state that fails it is
  not saved (possible with finite losses: the loss at step s is computed before the update that makes the
  state of step s). Every process calls it on a multi-process state (it is a collective there).
  """
  named = [(path, leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
           if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
  if not named:
    return None
  counts = np.asarray(jax.device_get(_nonfinite_counts([leaf for _, leaf in named])))
  bad = np.nonzero(counts.sum(axis=1))[0]
  if not bad.size:
    return None
  nan, inf = (int(n) for n in counts.sum(axis=0))
  return f"{nan} NaN and {inf} inf values (first in {jax.tree_util.keystr(named[bad[0]][0])})"
