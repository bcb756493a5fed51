"""Converting official SAM-DiffSR / SRDiff PyTorch weights to our Flax params and back (key names and layouts).

Layouts: Conv2d weight (O, I, kH, kW) -> HWIO kernel; ConvTranspose2d weight (I, O, kH, kW) -> the
(kH, kW, O, I) kernel of `nn.ConvTranspose(transpose_kernel=True)`; Linear (O, I) -> (I, O). The 17
`RRDB_trunk.N.*` blocks are stacked on a leading axis (our trunk is one `nn.scan`), in N order.

Works on plain numpy state dicts; `load_torch_checkpoint` reads an official `.ckpt`/`.pth` with torch
(`weights_only=True`: no official code and no pickled classes are needed or executed).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from diffssr_jax import storage

# (torch key regex, our param path template, tensor kind); {p} is kernel|bias.
_UNET_RULES = [
    (r"cond_proj\.(weight|bias)", "cond_proj/{p}", "convT"),
    (r"sam_conv\.([012])\.(weight|bias)", "sam_conv_{0}/{p}", "conv"),   # cond_sam (Table 7's SAM+SRDiff)
    (r"mlp\.(0|2)\.(weight|bias)", "mlp_{0}/{p}", "dense"),
    (r"downs\.(\d+)\.([01])\.(.+)", "downs_{0}_res{1}/{res}", "res"),
    (r"downs\.(\d+)\.2\.conv\.1\.(weight|bias)", "downs_{0}_down/{p}", "conv"),
    (r"(mid_block[12])\.(.+)", "{0}/{res}", "res"),
    (r"ups\.(\d+)\.([01])\.(.+)", "ups_{0}_res{1}/{res}", "res"),
    (r"ups\.(\d+)\.2\.conv\.0\.(weight|bias)", "ups_{0}_up/{p}", "convT"),
    (r"final_conv\.0\.block\.1\.(weight|bias)", "final_block/{p}", "conv"),
    (r"final_conv\.1\.(weight|bias)", "final_conv/{p}", "conv"),
]
_RES_RULES = [
    (r"mlp\.1\.(weight|bias)", "mlp/{p}", "dense"),
    (r"block([12])\.block\.1\.(weight|bias)", "block{0}/{p}", "conv"),
    (r"res_conv\.(weight|bias)", "res_conv/{p}", "conv"),
]
# RRDB_trunk.N.* paths carry "[N]": the block index on the stacked axis.
_RRDB_RULES = [
    (r"RRDB_trunk\.(\d+)\.RDB([123])\.conv([1-5])\.(weight|bias)", "RRDB_trunk/RDB{1}/conv{2}/{p}[{0}]", "conv"),
    (r"(conv_first|trunk_conv|upconv[123]|HRconv|conv_last)\.(weight|bias)", "{0}/{p}", "conv"),
]
# Buffers of the official GaussianDiffusion (the schedule, recomputed by us) are not parameters.
_SCHEDULE_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
}
_TO_FLAX = {"conv": (2, 3, 1, 0), "convT": (2, 3, 1, 0), "dense": (1, 0)}   # torch -> flax axes
_TO_TORCH = {"conv": (3, 2, 0, 1), "convT": (3, 2, 0, 1), "dense": (1, 0)}  # their inverses


class ConversionError(ValueError):
  pass


def _match(rules, key):
  """(our path, kind) for a torch key, or None."""
  for pattern, template, kind in rules:
    m = re.fullmatch(pattern, key)
    if m is None:
      continue
    groups = m.groups()
    p = "kernel" if key.endswith("weight") else "bias"
    if kind == "res":
      sub = _match(_RES_RULES, groups[-1])
      if sub is None:
        return None
      return template.format(*groups[:-1], res=sub[0]), sub[1]
    return template.format(*groups, p=p), kind
  return None


def _to_flax(kind: str, path: str, w: np.ndarray) -> np.ndarray:
  return w if path.endswith("bias") else np.transpose(w, _TO_FLAX[kind])


def _to_torch(kind: str, path: str, w: np.ndarray) -> np.ndarray:
  return w if path.endswith("bias") else np.transpose(w, _TO_TORCH[kind])


def _set(tree: dict, path: str, value):
  parts = path.split("/")
  node = tree
  for part in parts[:-1]:
    node = node.setdefault(part, {})
  if parts[-1] in node:
    raise ConversionError(f"two torch keys map to {path}")
  node[parts[-1]] = value


def _stack_blocks(blocks: dict, tree: dict, prefix: str = "rrdb.") -> None:
  """{path: {block index: array}} -> tree[path] = the arrays stacked in block order. Every block 0..N-1 (N from
  the highest index of any trunk key) must have every key, with the shape of block 0's (else the first
  offending torch key is named)."""
  if not blocks:
    return
  n = max(max(by_index) for by_index in blocks.values()) + 1
  tshape = lambda s: tuple(s[i] for i in _TO_TORCH["conv"]) if len(s) == 4 else tuple(s)  # noqa: E731
  for path, by_index in sorted(blocks.items()):
    key = prefix + _torch_key(path)
    missing = [i for i in range(n) if i not in by_index]
    if missing:
      raise ConversionError(f"state dict has no {key.format(n=missing[0])} (the trunk has {n} blocks)")
    want = np.shape(by_index[0])
    for i in range(1, n):
      if np.shape(by_index[i]) != want:
        raise ConversionError(f"{key.format(n=i)}: shape {tshape(np.shape(by_index[i]))}, but {key.format(n=0)} "
                              f"has {tshape(want)}")
    _set(tree, path, np.stack([by_index[i] for i in range(n)]))


def torch_to_flax(state_dict: Mapping[str, Any], dtype=np.float32) -> dict:
  """Official state dict (keys `denoise_fn.*`, `rrdb.*`; or a bare RRDB state dict as saved by the
  official RRDB pre-training) -> {"unet": {"params": ...}, "rrdb": {"params": ...}} (parts absent
  from the input are absent from the output). Unknown keys are an error naming them."""
  unet, rrdb, blocks, unknown = {}, {}, {}, []
  keys = list(state_dict)
  bare_rrdb = keys and all(not k.startswith(("denoise_fn.", "rrdb.")) for k in keys)
  for key in keys:
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
    path, kind = hit
    w = _to_flax(kind, path.split("[")[0], np.asarray(_as_numpy(state_dict[key]), dtype=dtype))
    if m := re.fullmatch(r"(.+)\[(\d+)\]", path):
      blocks.setdefault(m[1], {})[int(m[2])] = w
    else:
      _set(target, path, w)
  if unknown:
    raise ConversionError(
        f"{len(unknown)} state-dict keys have no counterpart in our model, e.g. {unknown[:5]} "
        "(configurations with attention, weight norm or up_input are not supported)")
  _stack_blocks(blocks, rrdb, "" if bare_rrdb else "rrdb.")
  out = {}
  if unet:
    out["unet"] = {"params": unet}
  if rrdb:
    out["rrdb"] = {"params": rrdb}
  return out


def _torch_key(path: str) -> str:
  """Our param path (no block index) -> the torch key, with "{n}" for a trunk block index."""
  parts = path.split("/")
  which = "weight" if parts[-1] == "kernel" else "bias"
  head = parts[0]
  res = {"mlp": "mlp.1", "block1": "block1.block.1", "block2": "block2.block.1", "res_conv": "res_conv"}
  if m := re.fullmatch(r"(downs|ups)_(\d+)_res([01])", head):
    return f"{m[1]}.{m[2]}.{m[3]}.{res[parts[1]]}.{which}"
  if m := re.fullmatch(r"downs_(\d+)_down", head):
    return f"downs.{m[1]}.2.conv.1.{which}"
  if m := re.fullmatch(r"ups_(\d+)_up", head):
    return f"ups.{m[1]}.2.conv.0.{which}"
  if head in ("mid_block1", "mid_block2"):
    return f"{head}.{res[parts[1]]}.{which}"
  if head in ("mlp_0", "mlp_2"):
    return f"mlp.{head[-1]}.{which}"
  if m := re.fullmatch(r"sam_conv_([012])", head):
    return f"sam_conv.{m[1]}.{which}"
  if head == "final_block":
    return f"final_conv.0.block.1.{which}"
  if head == "final_conv":
    return f"final_conv.1.{which}"
  if head == "RRDB_trunk":
    return f"RRDB_trunk.{{n}}.{parts[1]}.{parts[2]}.{which}"
  return f"{head}.{which}"   # cond_proj and the RRDB's single convs


def flax_to_torch(params: dict) -> dict[str, np.ndarray]:
  """Inverse of `torch_to_flax` (for exporting weights to the official code and for round-trip tests)."""
  out = {}
  for part, prefix, rules in (("unet", "denoise_fn.", _UNET_RULES), ("rrdb", "rrdb.", _RRDB_RULES)):
    if part not in params:
      continue
    for path, value in _flatten(params[part]["params"]).items():
      key = _torch_key(path)
      value = np.asarray(value)
      if "{n}" in key:
        for n, block in enumerate(value):
          k = key.format(n=n)
          out[prefix + k] = _to_torch(_match(rules, k)[1], path, block)
      else:
        out[prefix + key] = _to_torch(_match(rules, key)[1], path, value)
  return out


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
    bad = [f"{_official_name(part, k)}: {_torch_shape(part, k, np.shape(a[k]))} vs "
           f"{_torch_shape(part, k, np.shape(b[k]))}"
           for k in sorted(set(a) & set(b)) if np.shape(a[k]) != np.shape(b[k])]
    if missing or extra or bad:
      name = lambda keys: [_official_name(part, k) for k in keys[:5]]  # noqa: E731
      raise ConversionError(f"{part}: missing {name(missing)}, unexpected {name(extra)}, shape mismatches "
                            f"{bad[:5]} (checkpoint vs model; does the model config match the checkpoint?)")


def _official_name(part: str, path: str) -> str:
  """`params/downs_1_res0/block2/kernel` -> `denoise_fn.downs.1.0.block2.block.1.weight` (the key a user can
  find in the official state dict; trunk blocks as `RRDB_trunk.*`)."""
  prefix = {"unet": "denoise_fn.", "rrdb": "rrdb."}.get(part, "")
  inner = path[len("params/"):] if path.startswith("params/") else path
  try:
    return prefix + _torch_key(inner).replace("{n}", "*")
  except (KeyError, IndexError):
    return f"{part}/{path}"


def _torch_shape(part: str, path: str, shape: tuple) -> tuple:
  """A Flax param shape in the torch layout of its key (what the official state dict shows)."""
  inner = path[len("params/"):] if path.startswith("params/") else path
  if path.endswith("bias"):
    return tuple(shape)
  stacked = inner.startswith("RRDB_trunk/")
  dims = tuple(shape[1:] if stacked else shape)
  axes = _TO_TORCH["dense" if len(dims) == 2 else "conv"]
  out = tuple(dims[i] for i in axes) if len(dims) == len(axes) else dims
  return ((shape[0],) + out) if stacked else out


def load_torch_checkpoint(path, info: dict | None = None) -> dict[str, np.ndarray]:
  """Reads an official checkpoint (`ckpt['state_dict']['model']`), a `{'model': ...}` dict or a bare
  state dict, returning numpy arrays. Uses torch.load(weights_only=True): no pickled code runs. `info`, when
  given, receives the checkpoint's `global_step` (when it has one)."""
  import torch  # only needed here; the rest of the converter is numpy
  try:
    if storage.is_remote(path):  # torch reads a file object as well as a file name
      with storage.path(path).open("rb") as f:
        ckpt = torch.load(f, map_location="cpu", weights_only=True)
    else:
      ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: checkpoint not found") from None
  except Exception as e:
    raise ConversionError(f"{path}: cannot read as a PyTorch checkpoint ({type(e).__name__}: {e})") from None
  sd = ckpt
  if info is not None and isinstance(ckpt, Mapping) and "global_step" in ckpt:
    info["global_step"] = int(ckpt["global_step"])
  if isinstance(sd, Mapping) and "state_dict" in sd:
    sd = sd["state_dict"]
  if isinstance(sd, Mapping) and "model" in sd and isinstance(sd["model"], Mapping):
    sd = sd["model"]
  if not isinstance(sd, Mapping) or not sd:
    raise ConversionError(f"{path}: no state dict found (expected ckpt['state_dict']['model'])")
  # Models trained under torch.nn.DataParallel save their keys with a `module.` prefix (the official loaders
  # strip it too).
  return {k.removeprefix("module."): _as_numpy(v) for k, v in sd.items() if hasattr(v, "shape")}
