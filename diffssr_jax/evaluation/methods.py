"""The rows of an evaluation table: bicubic, the RRDB encoder alone, the diffusion model (`make_methods`).

Each `Method` says how to super-resolve a batch of equal-size eval images, which results folder it writes
(`method_tag`: `bicubic`, `<step>_rrdb`, `<step>` for SAM-DiffSR, `<step>_srdiff` / `<step>_sam_srdiff` for Table
7's SRDiff and SAM+SRDiff), the row's label, and the settings a resumed evaluation must match (checked by
`evaluate.check_settings`). The variants' own folders let the three models of Table 7, evaluated into one
`--output`, give one table with a row each (in one folder the later model would take the earlier one's images
for its own).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from diffssr_jax.conventions import signed_to_uint8
from diffssr_jax.data.eval_sources import EvalImage
from diffssr_jax.data.imresize import imresize

METHODS = ("bicubic", "rrdb", "diffusion")  # also the order of the table's rows
# Suffixes of the diffusion row's folder per model variant, in Table 7's row order (SRDiff, SAM+SRDiff, ours).
VARIANTS = ("_srdiff", "_sam_srdiff", "")


def method_tag(kind: str, step_tag: str | None, variant: str = "") -> str:
  """The results folder of a method: `bicubic`, `<step>_rrdb` or `<step><variant>` (`model_variant`)."""
  if kind == "bicubic":
    return "bicubic"
  if step_tag is None:
    raise ValueError(f"the {kind} method needs a checkpoint step tag")
  return f"{step_tag}_rrdb" if kind == "rrdb" else f"{step_tag}{variant}"


def model_variant(upscaler) -> str:
  """The diffusion folder's suffix (VARIANTS) for a model: SAM+SRDiff (`model.cond_sam`), SRDiff (no
  modulation) or SAM-DiffSR (none)."""
  if upscaler.model.needs_spe:
    return "_sam_srdiff"
  return "_srdiff" if upscaler.model.modulation == "none" else ""


def table_tags(step_tag: str | None) -> list[str]:
  """The results folders a step's table reads, in row order: every method and variant, whether or not this run
  made it."""
  if step_tag is None:
    return ["bicubic"]
  return ["bicubic", method_tag("rrdb", step_tag)] + [method_tag("diffusion", step_tag, v) for v in VARIANTS]


@dataclasses.dataclass
class Method:
  """One row of the table: how to super-resolve a batch, where its results go, what must match to resume."""
  kind: str                                             # bicubic | rrdb | diffusion
  tag: str                                              # the results folder name
  label: str                                            # the table's row title
  sr_fn: Callable[[list[EvalImage]], np.ndarray]        # equal-size items -> (N, H, W, 3) uint8
  settings: dict


def bicubic_sr_fn(scale: int):
  """MATLAB-bicubic up-scaling of the uint8 LR (the paper's 'Bicubic' row)."""
  return lambda items: np.stack([imresize(it.lr, scale) for it in items])


def model_sr_fn(upscaler, seed: int, spe_masks=None):
  """SR of a batch with an `inference.Upscaler` (diffusion or rrdb mode), noise keyed by image name. A
  SAM+SRDiff model (`upscaler.needs_spe`) gets each image's SPE map from `spe_masks` (`data.spe_masks.SpeMasks`)."""
  from diffssr_jax.inference.upscaler import name_index

  def fn(items):
    lr = np.stack([it.lr for it in items])
    lr_up = np.stack([it.lr_up for it in items])
    spe = np.stack([spe_masks.spe(it.name, it.hr.shape[:2]) for it in items]) if upscaler.needs_spe else None
    sr, _ = upscaler.super_resolve_batch(lr, seed=seed, indices=[name_index(it.name) for it in items],
                                         lr_up=lr_up, spe=spe)
    return signed_to_uint8(sr)

  return fn


def model_label(upscaler) -> str:
  """'SAM-DiffSR (ddpm, 100 steps)', 'SRDiff (...)' for an unmodulated model, 'SAM+SRDiff (...)' for one given
  the masks as an input (Table 7's baseline, `model.cond_sam`), or 'RRDB'."""
  if upscaler.mode == "rrdb":
    return "RRDB"
  if upscaler.model.needs_spe:
    name = "SAM+SRDiff"
  else:
    name = "SRDiff" if upscaler.model.modulation == "none" else "SAM-DiffSR"
  return f"{name} ({upscaler.describe()})"


def make_methods(kinds: Sequence[str], upscaler, step_tag: str | None, seed: int, common: Mapping,
                 spe_masks=None) -> list[Method]:
  """The requested methods in table order. `upscaler` (diffusion mode) may be None for bicubic alone.
  `spe_masks` (`data.spe_masks.SpeMasks`): the dataset's masks, needed by a SAM+SRDiff model's diffusion row."""
  from diffssr_jax.inference.upscaler import Upscaler
  unknown = set(kinds) - set(METHODS)
  if unknown:
    raise ValueError(f"unknown methods {sorted(unknown)} (expected {METHODS})")
  out = []
  for kind in METHODS:
    if kind not in kinds:
      continue
    if kind == "bicubic":
      out.append(Method(kind, "bicubic", "Bicubic", bicubic_sr_fn(common["scale"]), {"method": kind, **common}))
      continue
    if upscaler is None:
      raise ValueError(f"the {kind} method needs a checkpoint (--workdir or --checkpoint)")
    if kind == "rrdb":
      up = Upscaler(upscaler.model, upscaler.params, config=upscaler.config, mode="rrdb",
                    lr_up_divisor=upscaler.lr_up_divisor)
      settings = {"method": kind, **common, "step": step_tag,
                  "weights_sha256": upscaler.weights_sha256("rrdb")}
      out.append(Method(kind, method_tag(kind, step_tag), model_label(up), model_sr_fn(up, seed), settings))
    else:
      settings = {"method": kind, **common, "step": step_tag,
                  "weights_sha256": upscaler.weights_sha256(), "sampler": upscaler.sampler,
                  "steps": upscaler.num_steps, "eta": upscaler.eta, "seed": seed,
                  "lr_up_divisor": upscaler.lr_up_divisor}
      if upscaler.needs_spe:
        if spe_masks is None:
          raise ValueError("a SAM+SRDiff model (model.cond_sam) needs the test images' masks (--spe_masks)")
        settings.update(spe_masks.describe())  # a resumed run must use the same masks
      out.append(Method(kind, method_tag(kind, step_tag, model_variant(upscaler)), model_label(upscaler),
                        model_sr_fn(upscaler, seed, spe_masks), settings))
  return out
