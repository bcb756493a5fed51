"""Orbax checkpoints of training runs, and loading weights for inference.

Workdir layout:
  WORKDIR/config.json           the run's full config (rebuilds the model for evaluation/inference)
  WORKDIR/checkpoints/<step>/   the last K checkpoints: items `state` (TrainState as a nested dict),
                                `data` (the grain iterator state) and `meta` (step, metrics)
  WORKDIR/best/<step>/          the best checkpoint by validation PSNR-Y (same items)

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a crash never
leaves a half-written step that looks finished. A checkpoint that fails to restore is skipped with a
warning in favour of the previous one and left on disk for inspection.
"""
from __future__ import annotations

import json
import logging
import pathlib
import warnings

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from diffssr_jax import fileio

log = logging.getLogger(__name__)


class NoCheckpointError(FileNotFoundError):
  pass


def save_config(config, workdir) -> None:
  fileio.atomic_write(pathlib.Path(workdir) / "config.json", config.to_json(indent=2))


def load_config(workdir) -> ml_collections.ConfigDict:
  path = pathlib.Path(workdir) / "config.json"
  if not path.is_file():
    raise NoCheckpointError(f"{path}: not found (is {workdir} a training workdir?)")
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None


def _state_to_tree(state) -> dict:
  return flax.serialization.to_state_dict(state)


class Checkpointer:
  """The last `keep` checkpoints plus the best one by validation PSNR-Y, with async saving."""

  def __init__(self, workdir, keep: int = 3, use_async: bool = True):
    self.workdir = pathlib.Path(workdir).absolute()  # orbax requires absolute paths
    opts = dict(enable_async_checkpointing=use_async, create=True)
    self.last = ocp.CheckpointManager(self.workdir / "checkpoints",
                                      options=ocp.CheckpointManagerOptions(max_to_keep=keep, **opts))
    self.best = ocp.CheckpointManager(
        self.workdir / "best",
        options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: float(m["psnr_y"]), best_mode="max",
                                             **opts))

  @staticmethod
  def _args(state, data_state, meta):
    return ocp.args.Composite(state=ocp.args.StandardSave(_state_to_tree(state)),
                              data=ocp.args.JsonSave(data_state if data_state is not None else {}),
                              meta=ocp.args.JsonSave(meta or {}))

  def save(self, step: int, state, data_state=None, meta=None) -> None:
    if step in self.last.all_steps():
      return
    self.last.save(step, args=self._args(state, data_state, {"step": step, **(meta or {})}), force=True)

  def save_best(self, step: int, state, psnr_y: float, data_state=None, meta=None) -> None:
    """Offers this step as the best checkpoint; orbax keeps it only if its PSNR-Y is the highest."""
    if not np.isfinite(psnr_y) or step in self.best.all_steps():
      return
    meta = {"step": step, "psnr_y": float(psnr_y), **(meta or {})}
    self.best.save(step, args=self._args(state, data_state, meta), metrics={"psnr_y": float(psnr_y)}, force=True)

  def restore_latest(self, state_template):
    """(state, data_state, meta) of the newest checkpoint that restores, or None when there is none."""
    return restore_latest(self.last, state_template)

  def wait(self):
    self.last.wait_until_finished()
    self.best.wait_until_finished()

  def close(self):
    self.last.close()
    self.best.close()


def restore_latest(manager: ocp.CheckpointManager, state_template=None):
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return restore_step(manager, step, state_template)
    except Exception as e:  # a damaged checkpoint: warn, keep it, try the previous one
      msg = (f"checkpoint {manager.directory}/{step} could not be restored ({type(e).__name__}: "
             f"{str(e)[:300]}); trying the previous one (the damaged directory is left in place)")
      warnings.warn(msg)
      log.warning(msg)
  return None


def restore_step(manager: ocp.CheckpointManager, step: int, state_template=None):
  if state_template is None:
    state_args = ocp.args.StandardRestore()
  else:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_to_tree(state_template))
    state_args = ocp.args.StandardRestore(abstract)
  out = manager.restore(step, args=ocp.args.Composite(state=state_args, data=ocp.args.JsonRestore(),
                                                      meta=ocp.args.JsonRestore()))
  tree = out["state"]
  if state_template is not None:
    tree = flax.serialization.from_state_dict(state_template, tree)
  return tree, out["data"] or None, out["meta"] or {"step": step}


def _params_from_state_tree(tree: dict, use_ema: bool) -> dict:
  params = tree.get("ema_params") if use_ema and tree.get("ema_params") else tree["params"]
  return {**(tree.get("frozen") or {}), **params}


def load_workdir_params(workdir, step: int | None = None, use_ema: bool = True, which: str = "checkpoints"):
  """Params dict ({"unet", "rrdb"} or {"rrdb"}) from a training workdir's checkpoint (latest by default)."""
  directory = pathlib.Path(workdir).absolute() / which
  if not directory.is_dir():
    raise NoCheckpointError(f"{directory}: no checkpoints (is {workdir} a training workdir?)")
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    if step is None:
      got = restore_latest(manager)
      if got is None:
        raise NoCheckpointError(f"{directory}: no restorable checkpoint")
    else:
      if step not in manager.all_steps():
        raise NoCheckpointError(f"{directory}: no checkpoint for step {step} (have {sorted(manager.all_steps())})")
      got = restore_step(manager, step)
  finally:
    manager.close()
  tree, _, meta = got
  return _params_from_state_tree(tree, use_ema), int(meta.get("step", step or -1))


def load_rrdb_params(path) -> dict:
  """RRDB encoder weights {"params": ...} from our RRDB (or diffusion) workdir or an official checkpoint."""
  from diffssr_jax.models import convert
  path = pathlib.Path(path)
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
  """(config, model, params) for sampling, from a training workdir or an official PyTorch checkpoint.

  workdir: reads WORKDIR/config.json and the latest (or `step`) checkpoint. checkpoint: an official
  `.ckpt` (`state_dict['model']` with denoise_fn.* and rrdb.*), converted on the fly; `config`
  defaults to the paper setting (configs/base.py).
  """
  from diffssr_jax.models import convert
  from diffssr_jax.diffusion.model import build_model
  if (workdir is None) == (checkpoint is None):
    raise ValueError("give exactly one of workdir or checkpoint")
  if workdir is not None:
    config = config or load_config(workdir)
    params, step = load_workdir_params(workdir, step, use_ema)
  else:
    if config is None:
      from configs import base
      config = base.get_config()
    params = convert.torch_to_flax(convert.load_torch_checkpoint(checkpoint))
  model = build_model(config)
  if "unet" not in params or "rrdb" not in params:
    raise ValueError(f"{workdir or checkpoint}: needs both U-Net and RRDB weights, found {sorted(params)}")
  template = model.param_shapes()
  convert.check_against(jax.tree.map(np.asarray, params), template)
  params = jax.tree.map(jax.numpy.asarray, params)
  return config, model, params
