"""The training config checked before any work: every key's type, range and choices, in one message.

`validate(config, device_count=...)` runs first in `train.train_and_evaluate`, before the workdir is locked,
created or read. Without it a bad value surfaced wherever it was first used: a sampler name in the first
validation (after training, and the step was never saved), a NaN learning rate as a NaN loss after the whole
RRDB stage, a negative batch size after the RRDB stage had already written config.json and checkpoints
(so the corrected rerun was refused as a config change). Now every problem is collected and reported in
one `ConfigError` naming each key; nothing has been written, so fixing the value and rerunning just works.

Keys are those of diffssr_jax/configs/base.py; a key the code does not know (a typo in a config file) is a problem
too (`--config.x.y=1` on the command line is already refused by ml_collections' locked config flags, which
`diffssr_jax.main` reports in one line).
"""
from __future__ import annotations

import math
import numbers

from etils import epath

from diffssr_jax import conventions


class ConfigError(ValueError):
  """The config has invalid values; the message names every key and problem."""


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


class _Checker:
  def __init__(self, config):
    self.c = config
    self.problems: list[str] = []

  def get(self, key):
    node = self.c
    for part in key.split("."):
      node = node[part]
    return node

  def bad(self, key, why: str) -> None:
    try:
      value = self.get(key)
    except (KeyError, AttributeError):
      value = "<missing>"
    self.problems.append(f"{key}={value!r}: {why}")

  def has(self, key) -> bool:
    try:
      self.get(key)
      return True
    except (KeyError, AttributeError):
      self.problems.append(f"{key}: missing (diffssr_jax/configs/base.py defines it)")
      return False

  # -- one check per kind of value; each returns whether the value passed (for dependent checks)
  def int_(self, key, lo=None, hi=None) -> bool:
    if not self.has(key):
      return False
    v = self.get(key)
    if not _is_int(v):
      self.bad(key, "must be an integer")
      return False
    if (lo is not None and v < lo) or (hi is not None and v > hi):
      rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
      self.bad(key, f"must be {rng}")
      return False
    return True

  def real(self, key, lo=None, hi=None, lo_open=False, hi_open=False) -> bool:
    if not self.has(key):
      return False
    v = self.get(key)
    if not _is_real(v) or not math.isfinite(v):
      self.bad(key, "must be a finite number")
      return False
    if lo is not None and (v <= lo if lo_open else v < lo) or hi is not None and (v >= hi if hi_open else v > hi):
      left, right = "(" if lo_open else "[", ")" if hi_open else "]"
      self.bad(key, f"must be in {left}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}{right}")
      return False
    return True

  def bool_(self, key) -> bool:
    if not self.has(key):
      return False
    if not isinstance(self.get(key), bool):
      self.bad(key, "must be True or False")
      return False
    return True

  def choice(self, key, choices) -> bool:
    if not self.has(key):
      return False
    if self.get(key) not in choices:
      self.bad(key, f"must be one of {', '.join(map(str, choices))}")
      return False
    return True

  def string(self, key) -> bool:
    if not self.has(key):
      return False
    if not isinstance(self.get(key), str):
      self.bad(key, "must be a string")
      return False
    return True

  def folder(self, key, required=False) -> None:
    if not self.string(key):
      return
    v = self.get(key)
    if not v:
      if required:
        self.bad(key, "is required")
      return
    if not epath.Path(v).is_dir():
      self.bad(key, "is not a folder")

  def path(self, key) -> None:
    if self.string(key) and self.get(key) and not epath.Path(self.get(key)).exists():
      self.bad(key, "does not exist")


def _inside(path, folder) -> bool:
  """Whether `path` (a config string) is `folder` or below it, compared as normalised local paths."""
  if not isinstance(path, str) or not path or not isinstance(folder, str) or not folder:
    return False
  import os
  path, folder = os.path.normpath(os.path.abspath(path)), os.path.normpath(os.path.abspath(folder))
  return path == folder or path.startswith(folder + os.sep)


def _unknown_keys(config) -> list[str]:
  from diffssr_jax.configs import base
  from diffssr_jax.training import workdir as workdir_lib
  known = set(workdir_lib.flatten(base.get_config().to_dict()))
  given = set(workdir_lib.flatten(config.to_dict()))
  return sorted(given - known)


def problems(config, device_count: int = 1, process_count: int = 1) -> list[str]:
  """Every problem of a training config, one string per key ("key=value: why")."""
  k = _Checker(config)
  k.problems += [f"{key}: unknown key (not in diffssr_jax/configs/base.py)" for key in _unknown_keys(config)]
  k.int_("seed", 0, 2**32 - 1)
  k.choice("task", ("diffusion", "rrdb", "distill"))
  if k.get("task") == "distill":
    from diffssr_jax.training import distill
    distill.problems(k)
  k.string("compilation_cache")

  scale_ok = k.int_("model.scale", 1, 16)
  for key in ("model.unet_dim", "model.rrdb_num_feat", "model.rrdb_num_blocks", "model.rrdb_growth",
              "model.rrdb_unroll"):
    k.int_(key, 1)
  levels = None
  if k.has("model.unet_dim_mults"):
    mults = k.get("model.unet_dim_mults")
    if not isinstance(mults, (tuple, list)) or not mults or not all(_is_int(m) and m >= 1 for m in mults):
      k.bad("model.unet_dim_mults", "must be a non-empty tuple of positive integers")
    else:
      levels = len(mults)
  k.choice("model.dtype", ("auto", "float32", "bfloat16"))
  k.bool_("model.remat_rrdb")
  k.bool_("model.remat_unet")
  if k.bool_("model.cond_sam") and k.get("model.cond_sam"):
    if k.get("task") == "distill":
      k.bad("model.cond_sam", "a SAM+SRDiff teacher needs SPE maps when sampling; distillation does not support it")
    if k.get("eval.hr_dir"):
      k.bad("eval.hr_dir", "validation images have no SPE maps for a model.cond_sam model; leave it empty and "
            "run diffssr-evaluate --spe_masks on the checkpoints")

  from diffssr_jax.diffusion import process
  t_ok = k.int_("diffusion.timesteps", 1)
  if k.choice("diffusion.beta_schedule", ("cosine", "linear")) and k.get("diffusion.beta_schedule") == "linear":
    if k.real("diffusion.beta_start", 0, 1, lo_open=True) & k.real("diffusion.beta_end", 0, 1, lo_open=True):
      if k.get("diffusion.beta_start") >= k.get("diffusion.beta_end"):
        k.bad("diffusion.beta_end", f"must be above diffusion.beta_start ({k.get('diffusion.beta_start')})")
  else:
    k.real("diffusion.beta_s", 0, lo_open=True)
  k.choice("diffusion.modulation", process.MODULATIONS)
  k.choice("diffusion.loss", ("l1", "l2"))
  k.real("diffusion.res_rescale", 0, lo_open=True)
  k.bool_("diffusion.clip_input")

  k.real("optim.lr", 0, lo_open=True)
  k.real("optim.b1", 0, 1, hi_open=True)
  k.real("optim.b2", 0, 1, hi_open=True)
  k.real("optim.eps", 0, lo_open=True)
  schedules = ("step", "cosine", "constant")
  k.choice("optim.schedule", schedules)
  k.int_("optim.decay_steps", 1)
  k.real("optim.decay_rate", 0, lo_open=True)
  k.real("optim.min_lr_ratio", 0, 1)
  accum_ok = k.int_("optim.grad_accum_steps", 1)
  k.real("optim.grad_clip", 0)
  k.real("optim.ema_decay", 0, 1, hi_open=True)
  k.bool_("optim.train_rrdb")
  k.real("optim.aux_l1_weight", 0)

  demo = k.string("data.demo_dir") and bool(k.get("data.demo_dir"))
  if k.string("data.train_files"):
    files = k.get("data.train_files")
    if not files:
      k.bad("data.train_files", "is required (TFRecord shards: a glob, folder or file), or set data.demo_dir")
    elif not demo:
      from diffssr_jax.data import tfrecord
      try:
        tfrecord.expand_files(files)
      except FileNotFoundError:
        k.bad("data.train_files", "matches no TFRecord file")
      else:
        if k.get("data.check_manifest") is True:
          from diffssr_jax.data import source
          try:  # every shard's export manifest entry: one split and one tile geometry
            man = source.manifest_for(files)
          except source.MixedExportError as e:
            k.bad("data.train_files", str(e))
          else:
            exported = (man or {}).get("config", {}).get("scale")
            if exported is not None and scale_ok and int(exported) != k.get("model.scale"):
              k.bad("data.train_files", f"exported at scale {exported}, the model's is {k.get('model.scale')}")
  if k.int_("data.patch_size", 1) and scale_ok and levels:
    import numpy as np
    unit = int(np.lcm(k.get("model.scale"), conventions.unet_multiple(levels)))
    if k.get("data.patch_size") % unit:
      k.bad("data.patch_size", f"must be a multiple of {unit} (the scale {k.get('model.scale')} and the U-Net's "
                               f"{conventions.unet_multiple(levels)} for {levels} levels)")
  for key in ("data.hflip", "data.rot90", "data.reduce_constant_spe", "data.shuffle", "data.verify_crc",
              "data.with_metadata", "data.check_manifest"):
    k.bool_(key)
  k.real("data.lr_up_divisor", 0, lo_open=True)
  for key, lo in (("data.num_epochs", 0), ("data.num_workers", 0), ("data.prefetch_buffer", 1),
                  ("data.read_threads", 1), ("data.read_buffer", 1)):
    k.int_(key, lo)

  for key in ("eval.hr_dir", "eval.lr_dir"):
    if demo and _inside(k.get(key), k.get("data.demo_dir")):
      continue  # the demo builds its own held-out photos there before training (train._train_and_evaluate)
    k.folder(key)
  k.int_("eval.max_images", 0)
  k.int_("eval.batch_size", 1)
  if k.int_("eval.crop_size", 1) and scale_ok and levels:
    import numpy as np
    unit = int(np.lcm(k.get("model.scale"), conventions.unet_multiple(levels)))
    if k.get("eval.crop_size") < unit:
      k.bad("eval.crop_size", f"must be at least {unit} px (a multiple of the scale and the U-Net's multiple)")
  sampler_ok = k.choice("eval.sampler", conventions.SAMPLERS)
  if k.int_("eval.steps", 0) and sampler_ok and t_ok:
    steps, t = k.get("eval.steps"), k.get("diffusion.timesteps")
    if k.get("eval.sampler") == "ddim" and steps > t:
      k.bad("eval.steps", f"ddim takes at most diffusion.timesteps={t} steps (0: all of them)")
    elif k.get("eval.sampler") == "student" and steps > t:
      k.bad("eval.steps", f"the student takes at most diffusion.timesteps={t} steps (0: one)")
    elif k.get("eval.sampler") == "student" and k.get("task") != "distill":
      k.bad("eval.sampler", "student samples a distilled student (task distill), not this task's model")
    elif k.get("eval.sampler") == "ddpm" and steps not in (0, t):
      k.bad("eval.steps", f"ddpm runs all diffusion.timesteps={t} steps: leave it 0")
  k.real("eval.eta", 0, 1)

  def batch(key):
    if not k.int_(key, 1):
      return
    b = k.get(key)
    if b % device_count:
      k.bad(key, f"is not divisible by the {device_count} devices ({process_count} processes x "
                 f"{device_count // max(1, process_count)} local devices)")
    elif accum_ok and (b // device_count) % k.get("optim.grad_accum_steps"):
      k.bad(key, f"the per-device batch {b // device_count} is not divisible by optim.grad_accum_steps "
                 f"{k.get('optim.grad_accum_steps')}")

  pretrain = k.int_("rrdb_pretrain.num_steps", 0) and k.get("rrdb_pretrain.num_steps") > 0
  if pretrain:
    batch("rrdb_pretrain.batch_size")
    k.real("rrdb_pretrain.lr", 0, lo_open=True)
    k.choice("rrdb_pretrain.schedule", schedules)

  batch("train.batch_size")
  k.int_("train.num_steps", 1)
  for key in ("train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
              "train.profile_steps"):
    k.int_(key, 1)
  k.int_("train.profile_at", 0)
  k.choice("train.state_layouts", ("auto", "default"))
  k.path("train.rrdb_checkpoint")
  if (k.get("task") == "diffusion" and not pretrain and not k.get("train.rrdb_checkpoint")
      and k.get("optim.train_rrdb") is False):
    k.problems.append("train.rrdb_checkpoint: the RRDB encoder is frozen (optim.train_rrdb=False) but no weights "
                      "are given: set train.rrdb_checkpoint, or rrdb_pretrain.num_steps > 0")
  return k.problems


def validate(config, device_count: int = 1, process_count: int = 1) -> None:
  """Raises ConfigError listing every problem of `config` (see `problems`) in one line."""
  found = problems(config, device_count, process_count)
  if found:
    raise ConfigError(f"invalid config ({len(found)} problem{'s' * (len(found) > 1)}, nothing was done): "
                      + "; ".join(found))
