"""Verified orbax checkpoints of training runs, and loading weights for inference.

Workdir layout:
  WORKDIR/config.json           the run's full config (rebuilds the model for evaluation/inference);
                                earlier versions are kept as config.<time>.json (see `save_config`)
  WORKDIR/checkpoints/<step>/   the newest K verified checkpoints: items `state` (TrainState as a nested
                                dict), `data` (each process' grain iterator state, one file per process
                                written by grain's own orbax handler) and `meta` (step, metrics), plus
                                `diffssr_manifest.json` (size and SHA-256 of every file of the step)
  WORKDIR/best/<step>/          the best verified checkpoint by validation PSNR-Y (same items)
  WORKDIR/checkpoints/<step>.damaged-<time>/   a damaged step moved aside when that step was saved again

Why a manifest of our own: orbax (0.12.8) writes each step to a temporary folder and renames it when
complete, so a crash never leaves a half-written step that looks finished, but it has no check that the
bytes read back are those written. OCDBT checksums its manifests and b-tree nodes and zarr3 the shard
index (crc32c), but the array chunks themselves carry no checksum: bytes flipped in
`state/ocdbt.process_0/d/*` restore silently as garbage (NaN, 1e38 in Adam moments), and a deleted or
truncated data file fails deep inside tensorstore. So every step records the SHA-256 of its files and a
restore checks them first, then checks that the restored floating-point arrays are finite.

When the manifest is written: inside orbax's commit of the step, after every item has been written and
finalised (OCDBT merged) and just before the temporary folder is renamed to `<step>` (a
`TemporaryPath` subclass, `_SealingTemporaryPath`, on orbax's own background thread for async saves). A
step folder therefore never exists without its manifest; only orbax's commit bookkeeping written after
it (`_CHECKPOINT_METADATA`, the top-level `commit_success.txt`) is not covered. Local (POSIX) workdirs
use orbax's atomic-rename commit. A bucket has no atomic rename, so bucket workdirs (gs://...) use orbax's
own commit protocol for them, `CommitFileTemporaryPath`: the step is written in place and published by the
small `commit_success.txt` object written last (orbax lists a gs:// step only once that exists);
`_SealingCommitFilePath` writes our manifest just before it.

Restore (`restore_newest`, used for resuming training, `evaluate`, `upscale` and `load_for_inference`):
newest step first; a step whose files do not match their manifest, whose arrays are not finite, or that
orbax cannot read is skipped with ONE warning line naming the step and the reason, and the previous step
is tried. Damaged steps are never deleted. A step whose files DO match but which does not restore into
the given model is a configuration mismatch, not damage: it raises `CheckpointMismatchError` instead of
falling back (falling back would restart training and let retention delete the run).

Steps without a manifest were written by diffssr-jax before checkpoints were verified (or by another
tool). They are not trusted: if no verified step is left, `UnverifiedCheckpointError` names the way to
accept them, the environment variable DIFFSSR_TRUST_UNVERIFIED_CHECKPOINTS=1, with which such steps are
accepted after the finite check; a training run that resumes from one then records its manifest, so it
is trusted from then on without the variable.

Retention (training): the newest `keep` verified steps stay in checkpoints/, the verified step with the
highest PSNR-Y in best/; older verified steps are deleted once a newer save has finished. Damaged and
unverified steps are never deleted and never counted. Saving a step whose folder already exists but is
not a verified checkpoint moves it aside to `<step>.damaged-<time>` (or `.unverified-<time>`) first. A
state holding NaN/inf is never saved (`NonFiniteStateError`).

Cost: one SHA-256 pass over a step's files when it is saved (on orbax's thread), at each retention pass
(every step on disk) and when it is restored; SHA-256 runs at ~1.7 GB/s on the 2-core development CPU,
so ~0.15 s per pass over a 256 MB paper-size train state.
"""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import pathlib
import sys
import time
from typing import NamedTuple

import flax
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from diffssr_jax import fileio, storage

log = logging.getLogger(__name__)

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


# ----------------------------------------------------------------------------- config.json
def save_config(config, workdir) -> None:
  """Writes WORKDIR/config.json; a different existing one is first kept as config.<UTC time>.json."""
  path = storage.native(workdir) / "config.json"
  text = config.to_json(indent=2)
  if path.is_file():
    old = path.read_text()
    if old == text:
      return
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    kept = path.with_name(f"config.{stamp}.json")
    n = 1
    while kept.exists():
      kept, n = path.with_name(f"config.{stamp}-{n}.json"), n + 1
    fileio.atomic_write(kept, old)
    log.info("%s changed; the previous version is kept as %s", path, kept.name)
  fileio.atomic_write(path, text)


def load_config(workdir) -> ml_collections.ConfigDict:
  path = storage.native(workdir) / "config.json"
  if not path.is_file():
    raise NoCheckpointError(f"{path}: not found (is {workdir} a training workdir?)")
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None


# ----------------------------------------------------------------------------- recorded settings
# What the weights cannot show: a U-Net trained for T=10 steps loads into a T=20 schedule just as well and
# then samples garbage. Every step records these settings in its meta; inference refuses a config.json that
# disagrees with them (an edited or replaced file) instead of sampling wrongly.
RECORDED_PREFIXES = ("diffusion.",)
RECORDED_KEYS = ("model.scale", "data.lr_up_divisor")


def recorded_settings(config) -> dict:
  """{dotted key: value} of the config's settings recorded with each checkpoint step (JSON values)."""
  from diffssr_jax.training.workdir import flatten
  flat = flatten(json.loads(config.to_json()))
  return {k: v for k, v in flat.items() if k in RECORDED_KEYS or k.startswith(RECORDED_PREFIXES)}


def check_recorded_settings(config, meta: dict, where) -> None:
  """Raises CheckpointMismatchError when `config` disagrees with the settings recorded in a step's meta
  (steps saved before settings were recorded have none: nothing to check)."""
  recorded = (meta or {}).get("settings")
  if not recorded:
    return
  now = recorded_settings(config)
  diff = {k: (v, now.get(k)) for k, v in recorded.items() if now.get(k) != v}
  if diff:
    detail = ", ".join(f"{k}={a!r} (config.json: {b!r})" for k, (a, b) in diff.items())
    raise CheckpointMismatchError(f"config.json disagrees with the settings checkpoint {where} was trained with: "
                                  f"{detail}; put the run's config.json back (earlier versions are kept as "
                                  "config.<time>.json)")


# ----------------------------------------------------------------------------- manifests
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


def _temporary_path_class(directory):
  return _SealingCommitFilePath if storage.is_remote(directory) else _SealingTemporaryPath


# ----------------------------------------------------------------------------- finite checks
def _nonfinite_report(tree) -> str | None:
  """None when every floating-point leaf is finite, else a one-line description."""
  nan = inf = 0
  first = None
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      continue
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:  # multi-host: reduce on device
      n_nan, n_inf = int(jnp.isnan(leaf).sum()), int(jnp.isinf(leaf).sum())
    else:
      a = np.asarray(leaf)
      n_nan, n_inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
    if n_nan or n_inf:
      nan, inf = nan + n_nan, inf + n_inf
      first = first or jax.tree_util.keystr(path)
  if first is None:
    return None
  return f"{nan} NaN and {inf} inf values in the restored arrays (first in {first})"


@jax.jit
def _count_nonfinite(leaves):
  return sum(jnp.sum(~jnp.isfinite(x)) for x in leaves)


def _require_finite_state(tree, step: int) -> None:
  """Refuses to save a state with NaN/inf values (possible with finite losses: the loss at step s is
  computed before the update that makes the state of step s)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  if leaves and int(jax.device_get(_count_nonfinite(leaves))):
    raise NonFiniteStateError(f"the train state of step {step} holds NaN/inf values: not saved; the last good "
                              "checkpoint is kept (lower the learning rate or check the data)")


# ----------------------------------------------------------------------------- quiet orbax
@contextlib.contextmanager
def _quiet_orbax():
  """orbax logs every step it opens (INFO) and read-only managers warn at WARNING level through absl;
  restores report their own outcome in one line, so that chatter is held back while they run, unless the
  absl logger's level was set (the CLIs set it from --verbosity: -v shows it)."""
  logger = logging.getLogger("absl")
  level = logger.level
  if level != logging.NOTSET:
    yield
    return
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


_ABANDONED_READ_ERRORS = ("Event loop is closed", "Encountered error while reading array index", "in OCDBT database")


def _is_abandoned_read_error(exc) -> bool:
  return any(s in str(exc) for s in _ABANDONED_READ_ERRORS)


class _AbandonedReadsFilter(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" reports of abandoned checkpoint reads."""

  def filter(self, record):
    exc = record.exc_info[1] if record.exc_info else None
    return not ("never retrieved" in str(record.msg) and exc is not None and _is_abandoned_read_error(exc))


def _drop_abandoned_read_errors() -> None:
  """Silences the after-effects of an orbax restore that failed on a damaged file.

  orbax runs all array reads of a restore as tensorstore futures in a fresh asyncio loop and closes the
  loop as soon as the first read fails; each read still in flight then completes into the closed loop and
  tensorstore reports `RuntimeError: Event loop is closed` (and the unretrieved read errors) through
  sys.unraisablehook, and asyncio logs the unretrieved tasks' errors: a traceback per array, ~1,200 for
  the demo model. Verified steps never get there (a missing or changed file fails the manifest check
  before orbax reads anything); for steps without manifest these filters, installed before the first
  restore, drop exactly those reports (the failure itself is reported in one line by the caller).
  """
  previous = sys.unraisablehook
  if not getattr(previous, "_diffssr_drops_abandoned_reads", False):
    def hook(unraisable):
      if not _is_abandoned_read_error(unraisable.exc_value):
        previous(unraisable)

    hook._diffssr_drops_abandoned_reads = True
    sys.unraisablehook = hook
  asyncio_log = logging.getLogger("asyncio")
  if not any(isinstance(f, _AbandonedReadsFilter) for f in asyncio_log.filters):
    asyncio_log.addFilter(_AbandonedReadsFilter())


# ----------------------------------------------------------------------------- restore
class Restored(NamedTuple):
  tree: object          # the state (TrainState when a template was given, else a nested dict)
  data_state: object    # the grain iterator state or None
  meta: dict
  step: int             # the step folder's number
  verified: bool        # False: a step without manifest accepted through DIFFSSR_TRUST_UNVERIFIED_CHECKPOINTS


def _state_to_tree(state) -> dict:
  return flax.serialization.to_state_dict(state)


def _one_line(text: str, limit: int = 300) -> str:
  text = " ".join(str(text).split())
  return text if len(text) <= limit else text[:limit] + "..."


def _step_dir(manager: ocp.CheckpointManager, step: int):
  return storage.native(str(manager.directory)) / str(step)


def _local_target(item_dir):
  """The saved arrays' shapes and dtypes placed on this process' first device: the restore target when no
  template is given (orbax refuses to restore onto the saving topology when it differs, e.g. a checkpoint
  written by two processes read by one)."""
  from orbax.checkpoint import metadata as ocp_metadata
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with _quiet_orbax():
    tree = ocp.StandardCheckpointHandler().metadata(item_dir).tree
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree,
                      is_leaf=lambda x: isinstance(x, ocp_metadata.ArrayMetadata))


def restore_step(manager: ocp.CheckpointManager, step: int, state_template=None, *, trust: bool | None = None
                 ) -> Restored:
  """One step, verified: manifest checksums, then orbax's restore, then finite arrays.

  Raises DamagedCheckpointError, UnverifiedCheckpointError (no manifest and not trusted) or
  CheckpointMismatchError (intact files that do not restore into `state_template`'s structure).
  """
  trust = trust_unverified() if trust is None else trust
  step_dir = _step_dir(manager, step)
  verified = verify_files(step_dir)
  if not verified and not trust:
    raise UnverifiedCheckpointError(
        f"checkpoint {step_dir} has no {MANIFEST_NAME} (written by diffssr-jax before checkpoints were "
        f"verified, or by another tool), so its bytes cannot be checked; set {TRUST_ENV}=1 to accept such "
        "steps after a check that their arrays are finite")
  if state_template is None:
    state_args = ocp.args.StandardRestore(_local_target(step_dir / "state"))
  else:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_to_tree(state_template))
    state_args = ocp.args.StandardRestore(abstract)
  _drop_abandoned_read_errors()  # before: the abandoned reads report while orbax is still unwinding
  try:
    with _quiet_orbax():
      out = manager.restore(step, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore()))
  except Exception as e:
    if verified:
      target = "this configuration's model" if state_template is not None else "arrays"
      raise CheckpointMismatchError(
          f"checkpoint {step_dir}: its files match their checksums but do not restore into {target} "
          f"({type(e).__name__}: {_one_line(e)}); it was made with another configuration (see config.json) "
          "or another orbax version; nothing was changed") from None
    raise DamagedCheckpointError(step_dir, f"orbax could not restore it ({type(e).__name__}: {_one_line(e, 200)})"
                                 ) from None
  problem = _nonfinite_report(out["state"])
  if problem:
    raise DamagedCheckpointError(step_dir, problem)
  tree = out["state"]
  if state_template is not None:
    tree = flax.serialization.from_state_dict(state_template, tree)
  return Restored(tree, None, out["meta"] or {"step": step}, step, verified)


class IteratorState:
  """A grain iterator's position as grain's orbax handler (`grain.checkpoint`) saves and restores it: each
  process writes and reads its own `process_<i>-of-<n>.json`. Holds the state a `train.Prefetcher` recorded
  for the last batch the step consumed (the iterator itself has read ahead)."""

  def __init__(self, state=None):
    self.state = state

  def get_state(self) -> bytes:
    return json.dumps(self.state).encode()

  def set_state(self, state: bytes) -> None:
    self.state = json.loads(state)

  def start_prefetch(self) -> None:  # grain's handler calls it after set_state
    pass


def restore_data_state(manager: ocp.CheckpointManager, step: int):
  """This process' iterator state saved with `step`, or None when there is none for this process index and
  count (a checkpoint written by another number of processes, or with no data item)."""
  holder = IteratorState()
  try:
    with _quiet_orbax():
      manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(holder)))
  except Exception as e:  # noqa: BLE001 - orbax/grain raise several kinds for a missing item or file
    log.info("no iterator state for process %d of %d in %s (%s)", jax.process_index(), jax.process_count(),
             _step_dir(manager, step), _one_line(e, 120))
    return None
  return holder.state


def _warn_skipped(step_dir, reason: str) -> None:
  log.warning("skipping checkpoint %s: %s; using the previous step (the folder is left in place)", step_dir,
              _one_line(reason))


def restore_newest(manager: ocp.CheckpointManager, state_template=None, *, bad: dict | None = None,
                   trust: bool | None = None) -> Restored | None:
  """The newest step that passes `restore_step`, or None when there are no steps.

  Each failing step is reported in one warning line and recorded in `bad` ({step: reason}). Raises
  UnverifiedCheckpointError when only steps without manifest (not trusted) are left, and
  CheckpointMismatchError at once (no fallback) for an intact step of another model.
  """
  bad = {} if bad is None else bad
  unverified = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      got = restore_step(manager, step, state_template, trust=trust)
    except UnverifiedCheckpointError:
      unverified.append(step)
      continue
    except DamagedCheckpointError as e:
      bad[step] = e.reason
      _warn_skipped(e.path, e.reason)
      continue
    for s in unverified:  # newer than the step used: say why they were passed over
      _warn_skipped(_step_dir(manager, s), f"no {MANIFEST_NAME} (set {TRUST_ENV}=1 to accept such steps)")
    return got
  if unverified:
    raise UnverifiedCheckpointError(
        f"{manager.directory}: steps {sorted(unverified)} have no {MANIFEST_NAME} (written by diffssr-jax before "
        "checkpoints were verified, or by another tool) and no verified step is left; to use them, run again "
        f"with {TRUST_ENV}=1 (each is accepted if its arrays are finite; a training run records the manifest "
        "of the step it resumes from, which is trusted from then on)")
  return None


def restore_latest(manager: ocp.CheckpointManager, state_template=None):
  """(state, data_state, meta) of the newest verified checkpoint, or None when there is none."""
  got = restore_newest(manager, state_template)
  return None if got is None else tuple(got[:3])


def _read_only_manager(directory) -> ocp.CheckpointManager:
  # Explicit values for what read_only would otherwise override with a warning each.
  with _quiet_orbax():
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        read_only=True, create=False, save_interval_steps=0))


def _checkpoint_dir(workdir, which: str):
  directory = storage.absolute(workdir) / which  # orbax requires absolute paths
  if not directory.is_dir():
    raise NoCheckpointError(f"{directory}: no checkpoints (is {workdir} a training workdir?)")
  return directory


def _restore_from_workdir(workdir, step: int | None, which: str) -> Restored:
  directory = _checkpoint_dir(workdir, which)
  manager = _read_only_manager(directory)
  try:
    if step is None:
      got = restore_newest(manager)
      if got is None:
        raise NoCheckpointError(f"{directory}: no checkpoint")
      return got
    if step not in manager.all_steps():
      raise NoCheckpointError(f"{directory}: no checkpoint for step {step} (have {sorted(manager.all_steps())})")
    try:
      return restore_step(manager, step)
    except DamagedCheckpointError as e:
      raise DamagedCheckpointError(e.path, f"{e.reason} (leave out the step to use the newest verified one)"
                                   ) from None
  finally:
    with _quiet_orbax():
      manager.close()


def _step_dir_of(workdir, step: int) -> pathlib.Path:
  return pathlib.Path(workdir) / "checkpoints" / str(step)


def latest_verified_step(workdir, which: str = "checkpoints") -> int:
  """The newest step of WORKDIR/<which> that verifies (checksums, restore, finite arrays); damaged steps
  are skipped with one warning line each."""
  return _restore_from_workdir(workdir, None, which).step


def _params_from_state_tree(tree: dict, use_ema: bool) -> dict:
  params = tree.get("ema_params") if use_ema and tree.get("ema_params") else tree["params"]
  # A distilled student's frozen teacher U-Net (training/distill.py) is training state, not the model.
  frozen = {k: v for k, v in (tree.get("frozen") or {}).items() if k != "teacher"}
  return {**frozen, **params}


def load_workdir_params(workdir, step: int | None = None, use_ema: bool = True, which: str = "checkpoints"):
  """(params, step): params dict ({"unet", "rrdb"} or {"rrdb"}) of a training workdir's checkpoint, the
  newest verified one by default (damaged steps skipped with a warning), or exactly `step`."""
  got = _restore_from_workdir(workdir, step, which)
  return _params_from_state_tree(got.tree, use_ema), got.step


# ----------------------------------------------------------------------------- training checkpoints
class Checkpointer:
  """The newest `keep` verified checkpoints plus the best one by validation PSNR-Y, with async saving.

  Retention runs when a save has finished (at the next save, `wait` or `close`), so while a save is in
  flight one more step than `keep` may be on disk.
  """

  def __init__(self, workdir, keep: int = 3, use_async: bool = True, settings: dict | None = None):
    self.workdir = storage.absolute(workdir)  # orbax requires absolute paths
    self.keep = max(1, int(keep))
    # Retention is ours (orbax would count damaged steps and delete good ones): max_to_keep stays None.
    opts = dict(enable_async_checkpointing=use_async, create=True,
                temporary_path_class=_temporary_path_class(self.workdir))
    # Each manager gets its own barrier names: on several processes both save step N at the same time, and
    # orbax names its barriers by step only ("Barrier _async_write_complete.N is already ongoing").
    mp = lambda prefix: ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=prefix)  # noqa: E731
    self.last = ocp.CheckpointManager(self.workdir / "checkpoints", options=ocp.CheckpointManagerOptions(
        multiprocessing_options=mp("last"), **opts))
    self.best = ocp.CheckpointManager(self.workdir / "best", options=ocp.CheckpointManagerOptions(
        multiprocessing_options=mp("best"), **opts))
    self._bad = {"checkpoints": {}, "best": {}}   # steps found damaged in this process: {step: reason}
    self._warned: set = set()
    self._unfinished: set = set()                # managers with a save whose retention has not run
    self.restored: Restored | None = None         # what restore_latest resumed from
    self._closed = False
    self._settings = dict(settings or {})  # recorded_settings(config), in every step's meta
    # A failed save (disk full) abandons its other array writes the same way a failed restore abandons its
    # reads: their "never retrieved" reports are dropped too (the error itself reaches the caller).
    _drop_abandoned_read_errors()
    atexit.register(self.close)  # an exception out of the training loop must not leave orbax threads behind

  @staticmethod
  def _args(tree, data_state, meta):
    items = dict(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta or {}))
    if data_state is not None:
      items["data"] = grain.checkpoint.CheckpointSave(IteratorState(data_state))
    return ocp.args.Composite(**items)

  def _name(self, manager) -> str:
    return "checkpoints" if manager is self.last else "best"

  # -- status of steps on disk
  def _status(self, manager, step: int) -> tuple[str, str]:
    """("good" | "damaged" | "unverified", reason) from the manifest (no restore)."""
    known = self._bad[self._name(manager)].get(step)
    if known:
      return "damaged", known
    try:
      if verify_files(_step_dir(manager, step)):
        return "good", ""
    except DamagedCheckpointError as e:
      return "damaged", e.reason
    return ("good", "") if trust_unverified() else ("unverified", f"no {MANIFEST_NAME}")

  def _warn_once(self, manager, step: int, status: str, reason: str) -> None:
    key = (self._name(manager), step)
    if key not in self._warned:
      self._warned.add(key)
      log.warning("checkpoint %s is %s (%s): kept on disk, not counted as a checkpoint",
                  _step_dir(manager, step), status, _one_line(reason))

  def _sync(self, name: str) -> None:
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes(f"diffssr_checkpointing_{name}")

  def _make_room(self, manager, step: int) -> bool:
    """False when `step` already holds a verified checkpoint (nothing to save); otherwise True, after
    moving a damaged or unverified folder of that step aside (never deleting it)."""
    path = _step_dir(manager, step)
    if not path.exists():
      return True
    status, reason = self._status(manager, step)
    if status == "good":
      return False
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{step}.{status}-{stamp}")
    if jax.process_index() == 0:
      n = 1
      while aside.exists():
        aside, n = path.with_name(f"{step}.{status}-{stamp}-{n}"), n + 1
      path.rename(aside)
      fileio.fsync_dir(path.parent)
    self._sync(f"aside_{step}")
    log.warning("checkpoint %s is %s (%s): moved to %s before saving step %d again", path, status,
                _one_line(reason), aside.name, step)
    self._bad[self._name(manager)].pop(step, None)
    manager.reload()
    return True

  def _prune(self, manager) -> None:
    """Deletes verified steps beyond the newest `keep` (checkpoints/) or all but the best (best/)."""
    good = []
    for step in sorted(manager.all_steps(), reverse=True):
      status, reason = self._status(manager, step)
      if status == "good":
        good.append(step)
      else:
        self._warn_once(manager, step, status, reason)
    if manager is self.last:
      drop = good[self.keep:]
    else:
      scores = {s: self._psnr(manager, s) for s in good}
      best = max(good, key=lambda s: (scores[s], s)) if good else None
      drop = [s for s in good if s != best]
    for step in drop:
      manager.delete(step)

  def _psnr(self, manager, step: int) -> float:
    with _quiet_orbax():
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] or {}
    return float(meta.get("psnr_y", -np.inf))

  def _finish(self, managers) -> None:
    for manager in managers:
      manager.wait_until_finished()
      if manager in self._unfinished:
        self._unfinished.discard(manager)
        self._prune(manager)

  # -- saving
  def save(self, step: int, state, data_state=None, meta=None) -> None:
    tree = _state_to_tree(state)
    _require_finite_state(tree, step)
    self._finish([self.last])  # orbax's save waits for the previous one anyway
    if not self._make_room(self.last, step):
      return
    meta = {"step": step, **({"settings": self._settings} if self._settings else {}), **(meta or {})}
    self.last.save(step, args=self._args(tree, data_state, meta), force=True)
    self._unfinished.add(self.last)

  def save_best(self, step: int, state, psnr_y: float, data_state=None, meta=None) -> None:
    """Saves this step as the best checkpoint if its PSNR-Y beats the best verified one's."""
    if not np.isfinite(psnr_y):
      return
    tree = _state_to_tree(state)
    _require_finite_state(tree, step)
    self._finish([self.best])
    good = [s for s in self.best.all_steps() if self._status(self.best, s)[0] == "good"]
    if good and max(self._psnr(self.best, s) for s in good) >= psnr_y:
      return
    if not self._make_room(self.best, step):
      return
    meta = {"step": step, "psnr_y": float(psnr_y), **({"settings": self._settings} if self._settings else {}),
            **(meta or {})}
    self.best.save(step, args=self._args(tree, data_state, meta), force=True)
    self._unfinished.add(self.best)

  # -- restoring
  def restore_latest(self, state_template):
    """(state, data_state, meta) of the newest verified checkpoint, or None when there is none. data_state is
    this process' iterator state, None when the checkpoint holds none for this process index and count.

    A step without manifest accepted through DIFFSSR_TRUST_UNVERIFIED_CHECKPOINTS gets its manifest
    written now (trusted from then on).
    """
    got = restore_newest(self.last, state_template, bad=self._bad["checkpoints"])
    if got is not None:
      got = got._replace(data_state=restore_data_state(self.last, got.step))
    self.restored = got
    if got is None:
      return None
    if not got.verified:
      if jax.process_index() == 0:
        write_manifest(_step_dir(self.last, got.step))
      self._sync(f"adopt_{got.step}")
      log.warning("checkpoint %s had no %s; accepted through %s (finite arrays) and its checksums are now "
                  "recorded", _step_dir(self.last, got.step), MANIFEST_NAME, TRUST_ENV)
    return tuple(got[:3])

  def wait(self):
    self._finish([self.last, self.best])

  def close(self):
    if self._closed:
      return
    self._closed = True
    atexit.unregister(self.close)
    try:
      self.wait()
    finally:
      self.last.close()
      self.best.close()


# ----------------------------------------------------------------------------- inference
def load_rrdb_params(path) -> dict:
  """RRDB encoder weights {"params": ...} from our RRDB (or diffusion) workdir or an official checkpoint."""
  from diffssr_jax.models import convert
  path = storage.native(path)
  if path.is_dir():
    params, _ = load_workdir_params(path, use_ema=False)
    if "rrdb" not in params:
      raise ValueError(f"{path}: the checkpoint holds no RRDB weights")
    return params["rrdb"]
  converted = convert.torch_to_flax(convert.load_torch_checkpoint(path))
  if "rrdb" not in converted:
    raise ValueError(f"{path}: the checkpoint holds no RRDB weights")
  return converted["rrdb"]


def load_for_inference(workdir=None, checkpoint=None, step: int | None = None, use_ema: bool = True,
                       config=None):
  """(config, model, params, step) for sampling, from a training workdir or an official PyTorch checkpoint
  (step: the checkpoint's, None for an official file).

  workdir: reads WORKDIR/config.json and the newest verified (or exactly `step`) checkpoint. checkpoint:
  an official `.ckpt` (`state_dict['model']` with denoise_fn.* and rrdb.*), converted on the fly;
  `config` defaults to the paper setting (configs/base.py).
  """
  from diffssr_jax.models import convert
  from diffssr_jax.diffusion.model import build_model
  if (workdir is None) == (checkpoint is None):
    raise ValueError("give exactly one of workdir or checkpoint")
  if workdir is not None:
    config = config or load_config(workdir)
    got = _restore_from_workdir(workdir, step, "checkpoints")
    params, step = _params_from_state_tree(got.tree, use_ema), got.step
    check_recorded_settings(config, got.meta, _step_dir_of(workdir, step))
  else:
    if config is None:
      from configs import base
      config = base.get_config()
    params = convert.torch_to_flax(convert.load_torch_checkpoint(checkpoint))
    step = None
  model = build_model(config)
  if "unet" not in params or "rrdb" not in params:
    raise ValueError(f"{workdir or checkpoint}: needs both U-Net and RRDB weights, found {sorted(params)}")
  template = model.param_shapes()
  convert.check_against(jax.tree.map(np.asarray, params), template)
  params = jax.tree.map(jax.numpy.asarray, params)
  return config, model, params, step
