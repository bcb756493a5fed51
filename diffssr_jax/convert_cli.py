"""diffssr-convert: official SAM-DiffSR / SRDiff PyTorch checkpoints <-> our training workdirs.

  diffssr-convert --input model_ckpt_steps_400000.ckpt --output runs/official_x4
  diffssr-convert --input runs/diffssr_df2k_x4 --output model_ckpt_steps_400000.ckpt [--step N] [--use_ema]

.ckpt -> workdir: the model's size (scale, U-Net width and mults, RRDB features/blocks/growth, timesteps) is
read from the tensor shapes (`models.official.config_from_state_dict`); everything the weights cannot show
(modulation, loss, data and training settings) comes from --config (default diffssr_df2k_x4 (a packaged config's name or a file), the
official SAM-DiffSR x4 setting). The workdir gets that config.json and one verified checkpoint step (the
`.ckpt`'s global_step) with the weights only, which `diffssr-evaluate` / `diffssr-upscale --workdir` use like
any run, and from which `diffssr-train --workdir` fine-tunes with a fresh optimizer state
(`training.weights_only`). Its train.rrdb_checkpoint names the `.ckpt` (where the frozen encoder came from).

workdir -> .ckpt: `{'global_step', 'state_dict': {'model': state dict}}` as the official trainer saves it,
with the official key names and layouts and the schedule buffers, so the official `load_state_dict`
(strict) loads it; the EMA weights with --use_ema.

Nothing is overwritten: an existing non-empty output folder or an existing output file is refused.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

from absl import app, flags

from diffssr_jax import cli as shared_cli
from diffssr_jax import configs, storage
from diffssr_jax.errors import UserError

log = logging.getLogger("diffssr_jax.convert_cli")  # also when run as __main__
_CHECKPOINT_SUFFIXES = (".ckpt", ".pth", ".pt")


def define_flags(fv: flags.FlagValues) -> None:
  d = dict(flag_values=fv)
  flags.DEFINE_string("input", None, "An official .ckpt/.pth (converted to a workdir) or a training workdir "
                      "(converted to a .ckpt).", **d)
  flags.DEFINE_string("output", None, "The workdir to create (must not exist or be empty) or the .ckpt file to "
                      "write (must not exist).", **d)
  flags.DEFINE_string("config", None, "Config for the settings the weights cannot show (modulation, loss, "
                      "training): a packaged config's name or a file; default diffssr_df2k_x4. .ckpt -> workdir "
                      "only.", **d)
  flags.DEFINE_integer("step", None, "Workdir -> .ckpt: this checkpoint step (default: the newest verified).", **d)
  flags.DEFINE_bool("use_ema", False, "Workdir -> .ckpt: export the EMA weights (when the run kept them).", **d)
  shared_cli.mark_required(["input", "output"], fv)


def checkpoint_to_workdir(checkpoint, workdir, config) -> int:
  """Writes `workdir` (config.json + one weights-only verified step) from an official checkpoint; returns the
  step. `config` supplies the settings the weights cannot show."""
  import jax
  import numpy as np
  from diffssr_jax.diffusion.model import build_model
  from diffssr_jax.models import convert, official
  from diffssr_jax.training import checkpointing, weights_only
  from diffssr_jax.training import workdir as workdir_lib
  info: dict = {}
  sd = convert.load_torch_checkpoint(checkpoint, info)
  overrides, params = official.from_official(sd)
  if "unet" not in params or "rrdb" not in params:
    raise convert.ConversionError(f"{checkpoint}: needs both U-Net (denoise_fn.*) and RRDB (rrdb.*) weights, found "
                                  f"{sorted(params) or 'neither'}")
  config = official.apply_overrides(config, {**overrides, "train.rrdb_checkpoint": str(storage.absolute(checkpoint))})
  official.check_schedule(sd, config)
  convert.check_against(params, build_model(config).param_shapes())
  step = int(info.get("global_step", 0))
  trainable, frozen = ({"unet": params["unet"], "rrdb": params["rrdb"]}, {}) if config.optim.train_rrdb else (
      {"unet": params["unet"]}, {"rrdb": params["rrdb"]})
  tree = {"step": np.asarray(step, np.int32), "params": trainable, "frozen": frozen}
  if config.optim.ema_decay > 0:
    tree["ema_params"] = jax.tree.map(np.copy, trainable)
  workdir = storage.native(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  workdir_lib.save_config(config, workdir)
  ckpt = checkpointing.Checkpointer(workdir, keep=1, use_async=False,
                                    settings=workdir_lib.recorded_settings(config))
  try:
    ckpt.save(step, tree, meta={weights_only.WEIGHTS_ONLY: True, "converted_from": str(checkpoint)})
  finally:
    ckpt.close()
  m = config.model
  log.info("%s: x%d, U-Net %d %s, RRDB %d x %d (from the checkpoint's shapes); config.json from the config file "
           "for the rest", workdir, m.scale, m.unet_dim, tuple(m.unet_dim_mults), m.rrdb_num_blocks, m.rrdb_num_feat)
  return step


def workdir_to_checkpoint(workdir, output, step: int | None = None, use_ema: bool = False) -> int:
  """Writes the official-layout `.ckpt` of a workdir's checkpoint (the newest verified, or `step`); returns
  the step written."""
  import numpy as np
  import torch
  from diffssr_jax.models import official
  from diffssr_jax.inference.loading import load_workdir_params
  from diffssr_jax.training import workdir as workdir_lib
  config = workdir_lib.load_config(workdir)
  params, step = load_workdir_params(workdir, step=step, use_ema=use_ema)
  sd = official.to_official(params, config)
  state = {"global_step": int(step), "state_dict": {"model": {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}},
           "optimizer_states": []}
  output = storage.native(output)
  tmp = output.with_name(output.name + ".partial")
  with tmp.open("wb") as f:  # the official trainer's own format (torch.save, legacy serialisation)
    torch.save(state, f, _use_new_zipfile_serialization=False)
  tmp.rename(output)
  return int(step)


def main(argv, fv: flags.FlagValues) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not fv.input or not fv.output:
    raise app.UsageError("--input and --output are required")
  storage.check_all({"--input": fv.input, "--output": fv.output})
  src, dst = storage.native(fv.input), storage.native(fv.output)
  if not src.exists():
    raise UserError(f"--input {fv.input}: not found")
  if src.is_dir():
    if fv.config:
      raise app.UsageError("--config is for .ckpt -> workdir only (a workdir has its config.json)")
    if dst.exists():
      raise UserError(f"--output {fv.output}: exists; refusing to overwrite it (give a new file name)")
    if dst.suffix not in _CHECKPOINT_SUFFIXES:
      raise app.UsageError(f"--output {fv.output}: expected a file name ending in {'/'.join(_CHECKPOINT_SUFFIXES)}")
    step = workdir_to_checkpoint(src, dst, step=fv.step, use_ema=fv.use_ema)
    log.info("wrote %s (step %d, official layout%s)", dst, step, ", EMA weights" if fv.use_ema else "")
    return shared_cli.EXIT_OK
  if fv.step is not None or fv.use_ema:
    raise app.UsageError("--step and --use_ema are for workdir -> .ckpt only")
  if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
    raise UserError(f"--output {fv.output}: exists and is not an empty folder; refusing to write into it "
                        "(give a new workdir)")
  config = configs.load(fv.config, default="diffssr_df2k_x4")
  step = checkpoint_to_workdir(src, dst, config)
  log.info("wrote %s (config.json + weights-only checkpoint step %d)", dst, step)
  return shared_cli.EXIT_OK


def _main(argv, fv: flags.FlagValues) -> int:
  from diffssr_jax.training.integrity import CheckpointMismatchError  # jax and orbax: after flag parsing
  try:
    return main(argv, fv)
  except CheckpointMismatchError as e:
    raise UserError(str(e)) from None


def cli(argv: Sequence[str] | None = None) -> int:
  """diffssr-convert (pyproject's console script; argv default sys.argv); returns the exit status."""
  import sys
  from diffssr_jax.models.convert import ConversionError  # numpy only
  # FileNotFoundError covers integrity.NoCheckpointError (a workdir without config.json or checkpoints).
  return shared_cli.run(sys.argv if argv is None else argv, define_flags=define_flags, main=_main, doc=__doc__,
                 user_errors=(ConversionError, FileNotFoundError))


if __name__ == "__main__":
  raise SystemExit(cli())
