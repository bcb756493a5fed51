"""Verified orbax checkpoints of training runs: saving, retention and restoring (`Checkpointer`, `restore_*`).

Workdir layout:
  WORKDIR/config.json           the run's full config (rebuilds the model for evaluation/inference);
                                earlier versions are kept as config.<time>.json (see `save_config`)
  WORKDIR/checkpoints/<step>/   the newest K verified checkpoints: items `state` (TrainState as a nested
                                dict), `data` (each process' grain iterator state, one file per process
                                written by grain's own orbax handler) and `meta` (step, metrics), plus
                                `diffssr_manifest.json` (size and SHA-256 of every file of the step)
  WORKDIR/best/<step>/          the best verified checkpoint by validation PSNR-Y (same items)
  WORKDIR/checkpoints/<step>.damaged-<time>/   a damaged step moved aside when that step was saved again

Restore (`restore_newest`, used for resuming training, `evaluate`, `upscale` and `load_for_inference`):
newest step first; a step whose files do not match their manifest, whose arrays are not finite, or that
orbax cannot read is skipped with ONE warning line naming the step and the reason, and the previous step
is tried. Damaged steps are never deleted. A step whose files DO match but which does not restore into
the given model is a configuration mismatch, not damage: it raises `CheckpointMismatchError` instead of
falling back (falling back would restart training and let retention delete the run).

Steps without a manifest (written by diffssr-jax before checkpoints were verified, or by another
tool) are not trusted: if no verified step is left, `UnverifiedCheckpointError` names the way to accept
them, DIFFSSR_TRUST_UNVERIFIED_CHECKPOINTS=1, with which such steps are accepted after the finite check;
a training run that resumes from one then records its manifest, so it is trusted from then on.

Retention (training): the newest `keep` verified steps stay in checkpoints/, the verified step with the
highest PSNR-Y in best/; older verified steps are deleted once a newer save has finished. Damaged and
unverified steps are never deleted and never counted. Saving a step whose folder already exists but is
not a verified checkpoint moves it aside to `<step>.damaged-<time>` (or `.unverified-<time>`) first. A
state holding NaN/inf is never saved (`NonFiniteStateError`).

Manifests, the finite check and the errors: training/integrity.py. Loading weights for sampling:
inference/loading.py. (~430 lines: saving, retention and restoring stay one module because they share
the rules of what counts as a good, damaged or unverified step.)
"""
from __future__ import annotations

import atexit
import json
import logging
import time
from typing import NamedTuple

import flax
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from diffssr_jax import fileio, orbax_logging, storage
from diffssr_jax.training import integrity
from diffssr_jax.training.integrity import (CheckpointMismatchError, DamagedCheckpointError, MANIFEST_NAME,
                                            NoCheckpointError, TRUST_ENV, UnverifiedCheckpointError)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- restore
class Restored(NamedTuple):
  tree: object          # the state (TrainState when a template was given, else a nested dict)
  data_state: object    # the grain iterator state or None
  meta: dict
  step: int             # the step folder's number
  verified: bool        # False: a step without manifest accepted through DIFFSSR_TRUST_UNVERIFIED_CHECKPOINTS
  path: object          # the step folder


def state_to_tree(state) -> dict:
  """A TrainState (or any flax struct) as the nested dict the `state` item holds."""
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
  with orbax_logging.quiet():
    tree = ocp.StandardCheckpointHandler().metadata(item_dir).tree
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree,
                      is_leaf=lambda x: isinstance(x, ocp_metadata.ArrayMetadata))


def restore_step(manager: ocp.CheckpointManager, step: int, state_template=None, *, trust: bool | None = None
                 ) -> Restored:
  """One step, verified: manifest checksums, then orbax's restore, then finite arrays.

  Raises DamagedCheckpointError, UnverifiedCheckpointError (no manifest and not trusted) or
  CheckpointMismatchError (intact files that do not restore into `state_template`'s structure).
  """
  trust = integrity.trust_unverified() if trust is None else trust
  step_dir = _step_dir(manager, step)
  verified = integrity.verify_files(step_dir)
  if not verified and not trust:
    raise UnverifiedCheckpointError(
        f"checkpoint {step_dir} has no {MANIFEST_NAME} (written by diffssr-jax before checkpoints were "
        f"verified, or by another tool), so its bytes cannot be checked; set {TRUST_ENV}=1 to accept such "
        "steps after a check that their arrays are finite")
  if state_template is None:
    state_args = ocp.args.StandardRestore(_local_target(step_dir / "state"))
  else:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_to_tree(state_template))
    state_args = ocp.args.StandardRestore(abstract)
  orbax_logging.install()  # before: the abandoned reads report while orbax is still unwinding
  try:
    with orbax_logging.quiet():
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
  problem = integrity.nonfinite_report(out["state"])
  if problem:
    raise DamagedCheckpointError(step_dir, f"the restored arrays hold {problem}")
  tree = out["state"]
  if state_template is not None:
    tree = flax.serialization.from_state_dict(state_template, tree)
  return Restored(tree, None, out["meta"] or {"step": step}, step, verified, step_dir)


class IteratorState:
  """A grain iterator's position as grain's orbax handler (`grain.checkpoint`) saves and restores it: each
  process writes and reads its own `process_<i>-of-<n>.json`. Holds the state a `loop.Prefetcher` recorded
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
    with orbax_logging.quiet():
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


def _read_only_manager(directory) -> ocp.CheckpointManager:
  # Explicit values for what read_only would otherwise override with a warning each.
  with orbax_logging.quiet():
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        read_only=True, create=False, save_interval_steps=0))


def _checkpoint_dir(workdir, which: str):
  directory = storage.absolute(workdir) / which  # orbax requires absolute paths
  if not directory.is_dir():
    raise NoCheckpointError(f"{directory}: no checkpoints (is {workdir} a training workdir?)")
  return directory


def restore_from_workdir(workdir, step: int | None, which: str = "checkpoints") -> Restored:
  """WORKDIR/<which>'s newest verified step (damaged ones skipped with a warning), or exactly `step`, as
  nested dicts on this process' first device (read-only: nothing in the workdir changes)."""
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
    with orbax_logging.quiet():
      manager.close()


# ----------------------------------------------------------------------------- training checkpoints
def _finite_tree(state, step: int) -> dict:
  """The state as a nested dict, refused (NonFiniteStateError) when it holds NaN/inf: possible with finite
  losses, since the loss at step s is computed before the update that makes the state of step s."""
  tree = state_to_tree(state)
  problem = integrity.nonfinite_report(tree)
  if problem:
    raise integrity.NonFiniteStateError(f"the train state of step {step} holds {problem}: not saved; the last "
                                        "good checkpoint is kept (lower the learning rate or check the data)")
  return tree


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
                temporary_path_class=integrity.temporary_path_class(self.workdir))
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
    self._closed = False
    self._settings = dict(settings or {})  # recorded_settings(config), in every step's meta
    # A failed save (disk full) abandons its other array writes the same way a failed restore abandons its
    # reads: their "never retrieved" reports are dropped too (the error itself reaches the caller).
    orbax_logging.install()
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
      if integrity.verify_files(_step_dir(manager, step)):
        return "good", ""
    except DamagedCheckpointError as e:
      return "damaged", e.reason
    return ("good", "") if integrity.trust_unverified() else ("unverified", f"no {MANIFEST_NAME}")

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
    with orbax_logging.quiet():
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
    tree = _finite_tree(state, step)
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
    tree = _finite_tree(state, step)
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
  def restore_latest(self, state_template) -> Restored | None:
    """The newest verified checkpoint restored into `state_template`'s structure, or None when there is none.
    Its data_state is this process' iterator state, None when the checkpoint holds none for this process
    index and count.

    A step without manifest accepted through DIFFSSR_TRUST_UNVERIFIED_CHECKPOINTS gets its manifest
    written now (trusted from then on); `verified` stays False to say it was accepted that way.
    """
    got = restore_newest(self.last, state_template, bad=self._bad["checkpoints"])
    if got is None:
      return None
    got = got._replace(data_state=restore_data_state(self.last, got.step))
    if not got.verified:
      if jax.process_index() == 0:
        integrity.write_manifest(_step_dir(self.last, got.step))
      self._sync(f"adopt_{got.step}")
      log.warning("checkpoint %s had no %s; accepted through %s (finite arrays) and its checksums are now "
                  "recorded", _step_dir(self.last, got.step), MANIFEST_NAME, TRUST_ENV)
    return got

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
