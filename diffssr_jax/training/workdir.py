"""A training workdir's config: WORKDIR/config.json (`save_config`, `load_config`), the settings recorded
with every checkpoint step (`recorded_settings`, `check_recorded_settings`), and one workdir, one model:
the check run before training writes anything into a workdir (`check_config`).

A workdir's checkpoints only make sense with the config that made them. Restarting with a config that
builds another model used to fail the restore, train from step 0, rewrite config.json and let checkpoint
retention delete the good steps; `check_config` refuses such a start before anything is written.

Settings are compared with WORKDIR/config.json (flattened to dotted keys) and fall in two groups:

* Identity settings, never changeable in a workdir (a new workdir is the way):
  - `task`, `model.*`: the networks and the scale; the checkpoint's arrays have their shapes;
  - `diffusion.*`: schedule, timesteps, modulation and loss define what the U-Net predicts;
  - `data.patch_size`, `data.scale`, `data.lr_up_divisor`, `data.reduce_constant_spe`: the layout of the
    training inputs and targets the model has learnt (patch size, LR/lr_up and SPE definitions);
  - `optim.train_rrdb`, `train.rrdb_checkpoint`, `rrdb_pretrain.*`: which encoder the U-Net is trained on
    and whether it is part of the trained parameters (the checkpoint layout changes with it);
  - `optim.ema_decay` and `optim.grad_clip` switched between 0 and non-zero: the optimizer/EMA state in
    the checkpoint changes structure (other values of them are safe);
  - any other key not named below (default deny: an unknown setting is treated as identity).
* Safe settings, changeable with `allow_config_change` (`--allow_config_change`): they change how
  training proceeds, not what is trained: `seed`, `compilation_cache`, `model.dtype` and `model.remat_*`
  (how the same float32 params are computed with), `train.*` (steps, batch size, log /
  eval / checkpoint intervals, retention), `optim.*` (learning rate and schedule, Adam settings,
  clipping and EMA values), `eval.*` (validation), and the data source and augmentation
  (`data.train_files`, `data.demo_dir`, `data.hflip`, `data.rot90`, shuffling and reader settings).

Without the flag any difference is refused; with it only safe ones may differ, and config.json then
records the new config (the old one is kept as config.<time>.json, see `save_config`).
A key added to configs/base.py since the run started, at its default, is no difference (`added_since`: a new
key's default keeps the old behaviour). Any other key present in only one of the two (added with another
value, or removed from the code) counts as a safe difference: refused without the flag, so it is seen, but
never locking a workdir out of newer code.
A workdir without any checkpoint has nothing to protect: its config.json is replaced (and kept).

The comparison is `diffssr_jax.run_settings` (the rule evaluate and the export follow too); this module adds
training's policy on top of it.
"""
from __future__ import annotations

import json
import logging
import time

import ml_collections

from diffssr_jax import fileio, run_settings, storage
from diffssr_jax.run_settings import ABSENT as _MISSING, flatten  # noqa: F401  (flatten: part of this API)
from diffssr_jax.training import integrity

log = logging.getLogger(__name__)

IDENTITY_KEYS = ("optim.train_rrdb", "train.rrdb_checkpoint")
SAFE_PREFIXES = ("train.", "optim.", "eval.")
SAFE_KEYS = frozenset({
    "seed", "distributed", "compilation_cache", "model.dtype", "model.remat_rrdb", "model.remat_unet",
    "model.rrdb_unroll",
    "data.with_metadata", "data.train_files", "data.demo_dir", "data.hflip", "data.rot90", "data.shuffle",
    "data.num_epochs", "data.num_workers", "data.prefetch_buffer", "data.read_threads", "data.read_buffer",
    "data.verify_crc", "data.check_manifest"})
# Safe as values, but 0 <-> non-zero changes the structure of the train state in the checkpoints.
ON_OFF_KEYS = ("optim.ema_decay", "optim.grad_clip")


class ConfigMismatchError(ValueError):
  """The config given differs from the one the workdir's checkpoints were made with."""


def is_safe(key: str, before, after) -> bool:
  """Whether `key` may change from `before` to `after` in a workdir that holds checkpoints."""
  if _MISSING in (before, after):
    return True
  if key in IDENTITY_KEYS:
    return False
  if key in ON_OFF_KEYS:
    on = [v not in (None, _MISSING) and float(v) > 0 for v in (before, after)]
    return on[0] == on[1]
  return key in SAFE_KEYS or key.startswith(SAFE_PREFIXES)


def added_since(key: str, before, after) -> bool:
  """Whether `key` is a setting added to configs/base.py after the run's config.json was written, at its
  default: a new key's default keeps the behaviour from before it existed (e.g. `model.cond_sam` = False), so
  that is the setting the run's checkpoints were made with, and resuming them needs no --allow_config_change."""
  if before != _MISSING:
    return False
  from diffssr_jax.configs import base
  defaults = flatten(json.loads(base.get_config().to_json()))
  return key in defaults and defaults[key] == after


def has_checkpoints(workdir) -> bool:
  """Whether anything in the workdir looks like a checkpoint step (finished, damaged or in progress),
  including the RRDB pre-training stage's (WORKDIR/rrdb/)."""
  workdir = storage.native(workdir)
  for sub in ("checkpoints", "best", "rrdb/checkpoints", "rrdb/best"):
    d = workdir / sub
    if d.is_dir() and any(p.name[:1].isdigit() for p in d.iterdir()):
      return True
  return False


def check_config(config, workdir, allow_config_change: bool = False) -> dict:
  """Refuses (ConfigMismatchError) to train `config` in a workdir whose checkpoints were made with other
  settings; returns the differences let through by `allow_config_change` (empty when the configs are equal
  or the workdir holds no checkpoint).

  Reads only: config.json is written afterwards by the training job (save_config keeps the
  previous version).
  """
  workdir = storage.native(workdir)
  path = workdir / "config.json"
  protected = has_checkpoints(workdir)
  try:
    saved = run_settings.read(path)
  except json.JSONDecodeError as e:
    if protected:
      raise ConfigMismatchError(f"{path} is not valid JSON ({e}); put the run's config.json back or train in "
                                "a new --workdir") from None
    return {}
  if saved is None:
    if protected:
      raise ConfigMismatchError(
          f"{workdir} holds checkpoints but no config.json, so there is no telling which model they belong "
          "to; put the run's config.json back or train in a new --workdir")
    return {}
  diff = {k: v for k, v in run_settings.differences(saved, json.loads(config.to_json())).items()
          if not added_since(k, *v)}
  if not diff or not protected:
    return {}
  identity = {k: v for k, v in diff.items() if not is_safe(k, *v)}
  shown = identity if allow_config_change else diff
  lines = [f"  {k}: {a!r} in {path.name}, {b!r} now{'' if k not in identity else '  (changes the model)'}"
           for k, (a, b) in shown.items()]
  if identity:
    raise ConfigMismatchError(
        f"{workdir} holds checkpoints of another model; refusing to train there (nothing was written):\n"
        + "\n".join(lines) + "\nTrain this config in a new --workdir. Model, diffusion and data-layout settings "
        "can never change within a workdir (not even with --allow_config_change).")
  if not allow_config_change:
    raise ConfigMismatchError(
        f"{workdir} holds checkpoints made with other settings; refusing to train there (nothing was "
        "written):\n" + "\n".join(lines) + "\nEither train in a new --workdir, or, since these settings are "
        "safe to change in a running job, pass --allow_config_change (config.json then records the new "
        "settings; the old file is kept as config.<time>.json).")
  return diff


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
  """WORKDIR/config.json as a ConfigDict (NoCheckpointError when there is none: not a training workdir)."""
  path = storage.native(workdir) / "config.json"
  if not path.is_file():
    raise integrity.NoCheckpointError(f"{path}: not found (is {workdir} a training workdir?)")
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
    raise integrity.CheckpointMismatchError(
        f"config.json disagrees with the settings checkpoint {where} was trained with: {detail}; put the run's "
        "config.json back (earlier versions are kept as config.<time>.json)")
