"""Resuming training from a weights-only checkpoint step (what `diffssr-convert` writes from an official `.ckpt`).

A converted step holds `step`, `params`, `frozen` (and `ema_params` when the config keeps an EMA) but no
optimizer state and no RNG key, and its meta says `"weights_only": true`. Restoring it into a full train
state would fail orbax's structure check, so `restore_latest` puts its weights into the fresh state instead,
keeping that state's freshly initialised optimizer state (Adam: zero moments, count 0) and RNG key, and
says so in one log line. Any other newest step goes through the Checkpointer's normal restore.
"""
from __future__ import annotations

import logging

import jax
import numpy as np
import orbax.checkpoint as ocp

from diffssr_jax import orbax_logging
from diffssr_jax.training import checkpointing, integrity

log = logging.getLogger(__name__)

WEIGHTS_ONLY = "weights_only"   # the meta key a converted step carries


def step_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  """The JSON meta item of one step ({} when unreadable: the normal restore then reports the damage)."""
  try:
    with orbax_logging.quiet():
      return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] or {}
  except Exception:  # noqa: BLE001 - damage is diagnosed (in one line) by the verified restore that follows
    return {}


def _placed(new, like, where: str):
  """`new` (numpy) as an array with `like`'s shape, dtype and sharding (replicated over the mesh)."""
  new = np.asarray(new)
  if new.shape != like.shape:
    raise integrity.CheckpointMismatchError(
        f"{where}: shape {new.shape} in the converted checkpoint, {like.shape} in this configuration's model")
  new = new.astype(like.dtype)
  return jax.make_array_from_callback(like.shape, like.sharding, lambda index: new[index])


def _fill(template, weights: dict, where: str):
  """`template`'s tree ({"unet": ..., ["rrdb": ...]}) with its leaves taken from `weights`."""
  if not template:
    return template
  missing = sorted(set(template) - set(weights))
  if missing:
    raise integrity.CheckpointMismatchError(f"{where}: the converted checkpoint has no {missing} weights")
  got = {k: weights[k] for k in template}
  try:
    return jax.tree.map(lambda like, new: _placed(new, like, where), template, got)
  except ValueError as e:  # tree structures differ
    raise integrity.CheckpointMismatchError(f"{where}: the converted weights do not fit this configuration's "
                                                f"model ({checkpointing._one_line(e, 200)})") from None


def restore_latest(ckpt: checkpointing.Checkpointer, state):
  """`ckpt.restore_latest(state)`, except that a newest step marked weights-only resumes with its weights, its
  step and `state`'s fresh optimizer state (see the module docstring)."""
  steps = sorted(ckpt.last.all_steps())
  if not steps:
    return ckpt.restore_latest(state)
  newest = steps[-1]
  meta = step_meta(ckpt.last, newest)
  if not meta.get(WEIGHTS_ONLY):
    return ckpt.restore_latest(state)
  got = checkpointing.restore_step(ckpt.last, newest)  # checksums and finite arrays, no template
  tree = got.tree
  where = str(ckpt.last.directory / str(newest))
  weights = {**(tree.get("frozen") or {}), **tree["params"]}
  ema = tree.get("ema_params") or tree["params"]
  state = state.replace(
      step=_placed(np.asarray(tree["step"]), state.step, where),
      params=_fill(state.params, weights, where),
      frozen=_fill(state.frozen, weights, where),
      ema_params=None if state.ema_params is None else _fill(state.ema_params, {**weights, **ema}, where))
  log.info("%s holds converted weights only (step %d, from %s): training continues from them with a fresh "
           "optimizer state", where, newest, meta.get("converted_from", "an official checkpoint"))
  return got._replace(tree=state, data_state=None)
