"""MANIQA (Yang et al. 2022), the paper's no-reference metric, through pyiqa (an optional extra), from local
weights only.

Why pyiqa is called rather than reimplemented: the official evaluation used it, and MANIQA is a ViT-B/8
plus transposed-attention and Swin blocks whose scores depend on pyiqa's exact crops (20 uniform 224x224
crops) and normalisation; calling pyiqa's own `create_metric('maniqa')` on each SR PNG gives its numbers by
construction. Two things keep it offline: pyiqa's MANIQA constructor always asks timm for the ImageNet ViT
weights (`timm.create_model('vit_base_patch8_224', pretrained=True)`, a download), which the MANIQA
checkpoint replaces anyway (it holds the whole network, ViT included, loaded strictly), so the ViT is
built without them; and the MANIQA weights come from the file given (`--maniqa`), never from pyiqa's URLs.
`weights=None` builds a randomly initialised MANIQA (tests).

Per-image scores go to `<results>/maniqa.csv` (image, maniqa), their mean to summary.json as `maniqa`.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math

from diffssr_jax import fileio, storage

METRIC = "maniqa"        # pyiqa's name: MANIQA trained on KonIQ-10k (`ckpt_koniq10k.pt`), pyiqa's default


class MissingExtraError(ImportError):
  """pyiqa (and a torchvision that matches the installed torch) is not installed."""


def _import_pyiqa():
  try:
    import pyiqa
    import timm
  except (ImportError, RuntimeError, OSError) as e:  # torchvision's failure to load its ops is a RuntimeError
    raise MissingExtraError(
        f"MANIQA needs the optional pyiqa package and a torchvision built for the installed torch "
        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); see README, 'Reproducing the paper'"
    ) from None
  return pyiqa, timm


@contextlib.contextmanager
def _no_timm_downloads(timm):
  """timm.create_model with pretrained=False while pyiqa builds the network (its weights come from the file)."""
  original = timm.create_model

  def create_model(*args, **kwargs):
    kwargs["pretrained"] = False
    return original(*args, **kwargs)

  timm.create_model = create_model
  try:
    yield
  finally:
    timm.create_model = original


def make_maniqa_fn(weights=None, device: str = "cpu", metric: str = METRIC):
  """`fn(png_path) -> float`: pyiqa's MANIQA score of one image file. `weights`: a local MANIQA checkpoint
  (pyiqa's `ckpt_koniq10k.pt` for the default); None: random initialisation (tests only)."""
  if weights is not None and not storage.native(weights).is_file():
    raise FileNotFoundError(f"--maniqa {weights}: no such file (MANIQA weights, e.g. pyiqa's ckpt_koniq10k.pt)")
  pyiqa, timm = _import_pyiqa()
  import torch
  opts = {"pretrained": False} if weights is None else {"pretrained_model_path": str(storage.native(weights))}
  with _no_timm_downloads(timm):
    model = pyiqa.create_metric(metric, device=torch.device(device), **opts)

  def fn(path) -> float:
    return float(model(str(storage.native(path))).reshape(-1)[0])

  return fn


def dataset_maniqa(out_dir, names, fn) -> float:
  """Scores every `<name>.png` of out_dir, writes out_dir/maniqa.csv and returns the mean (NaN when empty)."""
  out_dir = storage.native(out_dir)
  scores = {name: fn(out_dir / f"{name}.png") for name in names}
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["image", "maniqa"])
  for name, s in scores.items():
    w.writerow([name, repr(s)])
  fileio.atomic_write(out_dir / "maniqa.csv", buf.getvalue())
  return math.fsum(scores.values()) / len(scores) if scores else math.nan
