"""The official checkpoints as whole models: which config a state dict needs, and our weights back in the
official layout (what `diffssr-convert` and `load_for_inference(checkpoint=...)` use).

`config_from_state_dict` reads the model's size from the tensor shapes (pure, numpy only):
  U-Net width      `denoise_fn.mlp.2.weight` (Linear(4 dim, dim)): dim
  U-Net mults      `denoise_fn.downs.<i>.0.block1.block.1.weight` out channels / dim, one per level
  scale            `denoise_fn.cond_proj.weight` (ConvTranspose2d(in, dim, 2 s, stride s)): kernel / 2; a bare
                   RRDB state dict: 2 ** (number of `upconv<i>` convs)
  RRDB             `conv_first.weight` out channels (features), `RRDB_trunk.<n>` count (blocks),
                   `RRDB_trunk.0.RDB1.conv1.weight` out channels (growth)
  timesteps        the length of the `betas` buffer
  cond_sam         whether `denoise_fn.sam_conv.0.weight` exists (Table 7's SAM+SRDiff, models/unet.py)
The official RRDBNet always has `upconv1` and `upconv2` (and `upconv3` at x8), whatever `sr_scale` says,
so an official x2 checkpoint carries an `upconv2` our x2 RRDB has not got: it only shapes the RRDB's own
image, never the features the U-Net is conditioned on, so it is dropped on import (one warning) and
written as zeros on export (the official `load_state_dict` is strict).
"""
from __future__ import annotations

import logging
import re
from typing import Mapping

import numpy as np

from diffssr_jax.models import convert

log = logging.getLogger(__name__)

ConversionError = convert.ConversionError


def _shape(sd: Mapping, key: str) -> tuple:
  if key not in sd:
    raise ConversionError(f"state dict has no {key} (needed to read the model's size from the checkpoint)")
  return tuple(np.shape(sd[key]))


def _rrdb_prefix(sd: Mapping) -> str | None:
  if any(k.startswith("rrdb.") for k in sd):
    return "rrdb."
  if any(k.startswith("denoise_fn.") for k in sd):
    return None  # a U-Net without its encoder
  return ""       # a bare RRDB state dict (the official RRDB pre-training)


def config_from_state_dict(state_dict: Mapping) -> dict:
  """{dotted config key: value} for the model the state dict holds (see the module docstring); raises
  ConversionError naming the key whose shape does not fit the others."""
  sd = state_dict
  out: dict = {}
  p = _rrdb_prefix(sd)
  upconvs = 0
  if p is not None:
    nf = _shape(sd, p + "conv_first.weight")[0]
    blocks = {int(m[1]) for k in sd if (m := re.match(re.escape(p) + r"RRDB_trunk\.(\d+)\.", k))}
    if not blocks:
      raise ConversionError(f"state dict has no {p}RRDB_trunk.* blocks")
    out["model.rrdb_num_feat"] = nf
    out["model.rrdb_num_blocks"] = max(blocks) + 1
    out["model.rrdb_growth"] = _shape(sd, p + "RRDB_trunk.0.RDB1.conv1.weight")[0]
    upconvs = sum(f"{p}upconv{i}.weight" in sd for i in (1, 2, 3))
    out["model.scale"] = 2 ** upconvs
  if any(k.startswith("denoise_fn.") for k in sd):
    dim = _shape(sd, "denoise_fn.mlp.2.weight")[0]
    mults, i = [], 0
    while f"denoise_fn.downs.{i}.0.block1.block.1.weight" in sd:
      width = _shape(sd, f"denoise_fn.downs.{i}.0.block1.block.1.weight")[0]
      if width % dim:
        raise ConversionError(f"denoise_fn.downs.{i}.0.block1.block.1.weight has {width} output channels, not a "
                              f"multiple of the U-Net width {dim} (denoise_fn.mlp.2.weight)")
      mults.append(width // dim)
      i += 1
    if not mults:
      raise ConversionError("state dict has no denoise_fn.downs.0.0.block1.block.1.weight (no U-Net levels)")
    cin, cout, k, _ = _shape(sd, "denoise_fn.cond_proj.weight")
    if cout != dim or k % 2 or k < 4:
      raise ConversionError(f"denoise_fn.cond_proj.weight has shape {(cin, cout, k, k)}: expected (in, {dim}, 2 s, "
                            "2 s) for scale s")
    scale = k // 2
    if p is not None:
      want = out["model.rrdb_num_feat"] * ((out["model.rrdb_num_blocks"] + 1) // 3)
      if cin != want:
        raise ConversionError(f"denoise_fn.cond_proj.weight takes {cin} channels, but the RRDB's features give "
                              f"{want} ({out['model.rrdb_num_feat']} x every third of "
                              f"{out['model.rrdb_num_blocks'] + 1} feature maps)")
      if scale != 2 ** upconvs and not (scale == 2 and upconvs == 2):
        raise ConversionError(f"denoise_fn.cond_proj.weight is for scale x{scale}, but the RRDB has {upconvs} "
                              f"upsampling convs ({p}upconv*)")
    out.update({"model.scale": scale, "model.unet_dim": dim, "model.unet_dim_mults": tuple(mults)})
    # sam_config.cond_sam (Table 7's SAM+SRDiff): the SPE map joins the condition through sam_conv.0-2.
    out["model.cond_sam"] = "denoise_fn.sam_conv.0.weight" in sd
  if "betas" in sd:
    out["diffusion.timesteps"] = int(_shape(sd, "betas")[0])
  return out


def apply_overrides(config, overrides: Mapping):
  """A copy of `config` with the dotted keys of `overrides` set (a ConfigDict)."""
  import ml_collections
  c = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return c


def check_schedule(state_dict: Mapping, config) -> None:
  """The checkpoint's `betas` buffer must be the config's schedule (a U-Net trained on another schedule
  loads just as well and samples garbage)."""
  if "betas" not in state_dict:
    return
  from diffssr_jax.diffusion.schedules import schedule_from_config
  ours = schedule_from_config(config.diffusion).betas
  theirs = np.asarray(state_dict["betas"], np.float64)
  if ours.shape != theirs.shape or not np.allclose(ours, theirs, rtol=1e-5, atol=1e-7):
    raise ConversionError(f"betas: the checkpoint's noise schedule ({theirs.shape[0]} steps, "
                          f"{theirs[:2].tolist()}...) is not the config's diffusion.beta_schedule="
                          f"{config.diffusion.beta_schedule!r} with {config.diffusion.timesteps} steps; give a config "
                          "with the checkpoint's schedule")


def from_official(state_dict: Mapping) -> tuple[dict, dict]:
  """(config overrides, our params) of an official state dict (x2: its unused `upconv2` dropped)."""
  overrides = config_from_state_dict(state_dict)
  sd = dict(state_dict)
  p = _rrdb_prefix(sd)
  if overrides.get("model.scale") == 2 and p is not None and f"{p}upconv2.weight" in sd:
    for key in (f"{p}upconv2.weight", f"{p}upconv2.bias"):
      sd.pop(key, None)
    log.warning("x2 checkpoint: dropped %supconv2 (the official RRDB always has it; it shapes only the RRDB's "
                "own image, not the features the diffusion model uses)", p)
  return overrides, convert.torch_to_flax(sd)


def to_official(params: dict, config) -> dict[str, np.ndarray]:
  """Our {"unet", "rrdb"} params -> an official-layout state dict (float32 numpy), with the schedule buffers
  the official GaussianDiffusion registers (its `load_state_dict` is strict); {"rrdb"} alone (an RRDB
  pre-training workdir) -> RRDBNet's bare keys, as the official `rrdb_ckpt` files hold them."""
  sd = {k: np.ascontiguousarray(v, np.float32) for k, v in convert.flax_to_torch(params).items()}
  if "unet" not in params:  # an RRDB alone: the official RRDB pre-training saves RRDBNet's bare keys
    sd = {k.removeprefix("rrdb."): v for k, v in sd.items()}
  if "unet" in params:
    from diffssr_jax.diffusion.schedules import schedule_from_config
    schedule = schedule_from_config(config.diffusion)
    for name in sorted(convert._SCHEDULE_BUFFERS):
      sd[name] = np.asarray(getattr(schedule, name), np.float32)
  if config.model.scale == 2 and "rrdb" in params:
    nf, p = config.model.rrdb_num_feat, "rrdb." if "unet" in params else ""
    sd[f"{p}upconv2.weight"] = np.zeros((nf, nf, 3, 3), np.float32)
    sd[f"{p}upconv2.bias"] = np.zeros((nf,), np.float32)
    log.warning("x2: wrote rrdb.upconv2 as zeros (the official RRDB always has that layer; ours at x2 has not; it "
                "does not affect the diffusion model's output)")
  return sd
