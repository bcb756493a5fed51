"""Converting official SAM-DiffSR / SRDiff PyTorch weights to our Flax params (and back, for tests).

Layouts: Conv2d weight (O, I, kH, kW) -> HWIO kernel; ConvTranspose2d weight (I, O, kH, kW) -> our
`ConvTransposeTorch` kernel (kH, kW, I, O) (same tap order, see models/layers.py); Linear (O, I) -> (I, O).

Works on plain numpy state dicts; `load_torch_checkpoint` reads an official `.ckpt`/`.pth` with torch
(`weights_only=True`: no official code and no pickled classes are needed or executed).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

# (torch key regex, our param path template, tensor kind)
_UNET_RULES = [
    (r"cond_proj\.(weight|bias)", "cond_proj/{p}", "convT"),
    (r"mlp\.(0|2)\.(weight|bias)", "mlp_{0}/{p}", "dense"),
    (r"downs\.(\d+)\.([01])\.(.+)", "downs_{0}_res{1}/{res}", "res"),
    (r"downs\.(\d+)\.2\.conv\.1\.(weight|bias)", "downs_{0}_down/conv/{p}", "conv"),
    (r"(mid_block[12])\.(.+)", "{0}/{res}", "res"),
    (r"ups\.(\d+)\.([01])\.(.+)", "ups_{0}_res{1}/{res}", "res"),
    (r"ups\.(\d+)\.2\.conv\.0\.(weight|bias)", "ups_{0}_up/{p}", "convT"),
    (r"final_conv\.0\.block\.1\.(weight|bias)", "final_block/block/conv/{p}", "conv"),
    (r"final_conv\.1\.(weight|bias)", "final_conv/{p}", "conv"),
]
_RES_RULES = [
    (r"mlp\.1\.(weight|bias)", "mlp/{p}", "dense"),
    (r"block([12])\.block\.1\.(weight|bias)", "block{0}/block/conv/{p}", "conv"),
    (r"res_conv\.(weight|bias)", "res_conv/{p}", "conv"),
]
_RRDB_RULES = [
    (r"RRDB_trunk\.(\d+)\.RDB([123])\.conv([1-5])\.(weight|bias)", "RRDB_trunk_{0}/RDB{1}/conv{2}/{p}", "conv"),
    (r"(conv_first|trunk_conv|upconv[123]|HRconv|conv_last)\.(weight|bias)", "{0}/{p}", "conv"),
]
# Buffers of the official GaussianDiffusion (the schedule, recomputed by us) are not parameters.
_SCHEDULE_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
}


class ConversionError(ValueError):
  pass


def _to_flax(kind: str, which: str, w: np.ndarray) -> np.ndarray:
  if which == "bias":
    return w
  if kind == "conv":
    return np.transpose(w, (2, 3, 1, 0))   # OIHW -> HWIO
  if kind == "convT":
    return np.transpose(w, (2, 3, 0, 1))   # IOHW -> (kH, kW, I, O)
  if kind == "dense":
    return np.transpose(w, (1, 0))
  raise AssertionError(kind)


def _to_torch(kind: str, which: str, w: np.ndarray) -> np.ndarray:
  if which == "bias":
    return w
  return {"conv": lambda a: np.transpose(a, (3, 2, 0, 1)), "convT": lambda a: np.transpose(a, (2, 3, 0, 1)),
          "dense": lambda a: np.transpose(a, (1, 0))}[kind](w)


def _match(rules, key):
  for pattern, template, kind in rules:
    m = re.fullmatch(pattern, key)
    if m is None:
      continue
    groups = m.groups()
    which = "weight" if key.endswith("weight") else "bias"
    p = "kernel" if which == "weight" else "bias"
    if kind == "res":
      sub = _match(_RES_RULES, groups[-1])
      if sub is None:
        return None
      sub_path, kind, which = sub
      return template.format(*groups[:-1], res=sub_path), kind, which
    return template.format(*groups, p=p), kind, which
  return None


def _set(tree: dict, path: str, value):
  parts = path.split("/")
  node = tree
  for part in parts[:-1]:
    node = node.setdefault(part, {})
  if parts[-1] in node:
    raise ConversionError(f"two torch keys map to {path}")
  node[parts[-1]] = value


def torch_to_flax(state_dict: Mapping[str, Any], dtype=np.float32) -> dict:
  """Official state dict (keys `denoise_fn.*`, `rrdb.*`; or a bare RRDB state dict as saved by the
  official RRDB pre-training) -> {"unet": {"params": ...}, "rrdb": {"params": ...}} (parts absent
  from the input are absent from the output). Unknown keys are an error naming them."""
  unet, rrdb, unknown = {}, {}, []
  keys = list(state_dict)
  bare_rrdb = keys and all(not k.startswith(("denoise_fn.", "rrdb.")) for k in keys)
  for key in keys:
    w = np.asarray(_as_numpy(state_dict[key]), dtype=dtype)
    if key in _SCHEDULE_BUFFERS or key.endswith("num_batches_tracked"):
      continue
    if key.startswith("denoise_fn."):
      hit, target = _match(_UNET_RULES, key[len("denoise_fn."):]), unet
    elif key.startswith("rrdb.") or bare_rrdb:
      hit, target = _match(_RRDB_RULES, key[len("rrdb."):] if key.startswith("rrdb.") else key), rrdb
    else:
      hit, target = None, None
    if hit is None:
      unknown.append(key)
      continue
    path, kind, which = hit
    _set(target, path, _to_flax(kind, which, w))
  if unknown:
    raise ConversionError(
        f"{len(unknown)} state-dict keys have no counterpart in our model, e.g. {unknown[:5]} "
        "(configurations with cond_sam, attention, weight norm or up_input are not supported)")
  out = {}
  if unet:
    out["unet"] = {"params": unet}
  if rrdb:
    out["rrdb"] = {"params": rrdb}
  return out


def flax_to_torch(params: dict) -> dict[str, np.ndarray]:
  """Inverse of `torch_to_flax` (for exporting weights to the official code and for round-trip tests)."""
  out = {}
  for part, prefix, rules in (("unet", "denoise_fn.", _UNET_RULES), ("rrdb", "rrdb.", _RRDB_RULES)):
    if part not in params:
      continue
    flat = _flatten(params[part]["params"])
    for key in _torch_keys_for(flat, rules):
      path, kind, which = _match(rules, key)
      out[prefix + key] = _to_torch(kind, which, np.asarray(flat[path]))
  return out


def _torch_keys_for(flat, rules):
  """Enumerates torch keys by inverting the path templates on our flat param paths."""
  keys = []
  for path in flat:
    parts = path.split("/")
    which = "weight" if parts[-1] == "kernel" else "bias"
    head = parts[0]
    if m := re.fullmatch(r"(downs|ups)_(\d+)_res([01])", head):
      keys.append(f"{m[1]}.{m[2]}.{m[3]}." + _res_key(parts[1:], which))
    elif m := re.fullmatch(r"downs_(\d+)_down", head):
      keys.append(f"downs.{m[1]}.2.conv.1.{which}")
    elif m := re.fullmatch(r"ups_(\d+)_up", head):
      keys.append(f"ups.{m[1]}.2.conv.0.{which}")
    elif head in ("mid_block1", "mid_block2"):
      keys.append(f"{head}." + _res_key(parts[1:], which))
    elif head in ("mlp_0", "mlp_2"):
      keys.append(f"mlp.{head[-1]}.{which}")
    elif head == "cond_proj":
      keys.append(f"cond_proj.{which}")
    elif head == "final_block":
      keys.append(f"final_conv.0.block.1.{which}")
    elif head == "final_conv":
      keys.append(f"final_conv.1.{which}")
    elif m := re.fullmatch(r"RRDB_trunk_(\d+)", head):
      keys.append(f"RRDB_trunk.{m[1]}.{parts[1]}.{parts[2]}.{which}")
    else:
      keys.append(f"{head}.{which}")
  return keys


def _res_key(parts, which):
  if parts[0] == "mlp":
    return f"mlp.1.{which}"
  if parts[0] in ("block1", "block2"):
    return f"{parts[0]}.block.1.{which}"
  return f"res_conv.{which}"


def _flatten(tree, prefix=""):
  flat = {}
  for k, v in tree.items():
    p = f"{prefix}/{k}" if prefix else k
    if isinstance(v, Mapping):
      flat.update(_flatten(v, p))
    else:
      flat[p] = v
  return flat


def _as_numpy(x):
  if hasattr(x, "detach"):  # a torch tensor
    return x.detach().cpu().float().numpy()
  return np.asarray(x)


def check_against(converted: dict, reference: dict) -> None:
  """Raises ConversionError unless `converted` has exactly the param paths and shapes of `reference`
  (a freshly initialised param tree), naming the first differences."""
  for part, ref in reference.items():
    if part not in converted:
      raise ConversionError(f"checkpoint has no {part} weights")
    a, b = _flatten(converted[part]), _flatten(ref)
    missing, extra = sorted(set(b) - set(a)), sorted(set(a) - set(b))
    bad = [f"{k}: {np.shape(a[k])} vs {np.shape(b[k])}" for k in set(a) & set(b) if np.shape(a[k]) != np.shape(b[k])]
    if missing or extra or bad:
      raise ConversionError(f"{part}: missing {missing[:5]}, unexpected {extra[:5]}, shape mismatches {bad[:5]} "
                            "(does the model config match the checkpoint?)")


def load_torch_checkpoint(path) -> dict[str, np.ndarray]:
  """Reads an official checkpoint (`ckpt['state_dict']['model']`), a `{'model': ...}` dict or a bare
  state dict, returning numpy arrays. Uses torch.load(weights_only=True): no pickled code runs."""
  import torch  # only needed here; the rest of the converter is numpy
  try:
    ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: checkpoint not found") from None
  except Exception as e:
    raise ConversionError(f"{path}: cannot read as a PyTorch checkpoint ({type(e).__name__}: {e})") from None
  sd = ckpt
  if isinstance(sd, Mapping) and "state_dict" in sd:
    sd = sd["state_dict"]
  if isinstance(sd, Mapping) and "model" in sd and isinstance(sd["model"], Mapping):
    sd = sd["model"]
  if not isinstance(sd, Mapping) or not sd:
    raise ConversionError(f"{path}: no state dict found (expected ckpt['state_dict']['model'])")
  return {k: _as_numpy(v) for k, v in sd.items() if hasattr(v, "shape")}
