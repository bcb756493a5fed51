"""Weights for sampling: a training workdir's verified checkpoint or an official SAM-DiffSR checkpoint,
with the config that builds their model.

A workdir's checkpoint is read with training/checkpointing.py's verified restore (damaged steps skipped
with one warning line) and checked against the settings recorded with its step (training/workdir.py), so
an edited config.json cannot silently sample with another schedule. Orbax is imported by this module only
(upscaler.py imports it lazily: upscaling an in-memory model needs no checkpoint library).
"""
from __future__ import annotations

import hashlib
import pathlib

import jax
import numpy as np

from diffssr_jax.diffusion.model import build_model
from diffssr_jax.models import convert
from diffssr_jax.training import checkpointing
from diffssr_jax.training import workdir as workdir_lib


def _params_from_state_tree(tree: dict, use_ema: bool) -> dict:
  params = tree.get("ema_params") if use_ema and tree.get("ema_params") else tree["params"]
  # A distilled student's frozen teacher U-Net (training/distill.py) is training state, not the model.
  frozen = {k: v for k, v in (tree.get("frozen") or {}).items() if k != "teacher"}
  return {**frozen, **params}


def params_sha256(params) -> str:
  """The SHA-256 of a params tree: every leaf's path, dtype, shape and bytes, in key order. The identity of
  the weights a result was made with: evaluate records it in each results folder's run.json, so results of
  two models (two workdirs evaluated into one --output) never share a folder or resume each other's images.
  (A checkpoint's manifest digests its files, not the weights that were chosen from it, e.g. EMA or raw.)"""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    arr = np.asarray(jax.device_get(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}|{arr.dtype}|{arr.shape}|".encode())
    digest.update(np.ascontiguousarray(arr).tobytes())
  return digest.hexdigest()


def load_workdir_params(workdir, step: int | None = None, use_ema: bool = True, which: str = "checkpoints"):
  """(params, step): params dict ({"unet", "rrdb"} or {"rrdb"}) of a training workdir's checkpoint, the
  newest verified one by default (damaged steps skipped with a warning), or exactly `step`."""
  got = checkpointing.restore_from_workdir(workdir, step, which)
  return _params_from_state_tree(got.tree, use_ema), got.step


def load_for_inference(workdir=None, checkpoint=None, step: int | None = None, use_ema: bool = True,
                       config=None):
  """(config, model, params, step) for sampling, from a training workdir or an official PyTorch checkpoint
  (step: the checkpoint's, None for an official file).

  workdir: reads WORKDIR/config.json and the newest verified (or exactly `step`) checkpoint. checkpoint:
  an official `.ckpt` (`state_dict['model']` with denoise_fn.* and rrdb.*), converted on the fly;
  `config` defaults to diffssr_jax/configs/base.py with the model's size read from the checkpoint's shapes.
  """
  if (workdir is None) == (checkpoint is None):
    raise ValueError("give exactly one of workdir or checkpoint")
  if workdir is not None:
    config = config or workdir_lib.load_config(workdir)
    got = checkpointing.restore_from_workdir(workdir, step, "checkpoints")
    params, step = _params_from_state_tree(got.tree, use_ema), got.step
    workdir_lib.check_recorded_settings(config, got.meta, pathlib.Path(workdir) / "checkpoints" / str(step))
  else:
    from diffssr_jax.models import official
    state_dict = convert.load_torch_checkpoint(checkpoint)
    overrides, params = official.from_official(state_dict)  # the model's size from the tensor shapes
    if config is None:
      from diffssr_jax.configs import base
      config = official.apply_overrides(base.get_config(), overrides)
    official.check_schedule(state_dict, config)
    step = None
  model = build_model(config)
  if "unet" not in params or "rrdb" not in params:
    raise ValueError(f"{workdir or checkpoint}: needs both U-Net and RRDB weights, found {sorted(params)}")
  template = model.param_shapes()
  convert.check_against(jax.tree.map(np.asarray, params), template)
  params = jax.tree.map(jax.numpy.asarray, params)
  return config, model, params, step
