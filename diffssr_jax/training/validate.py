"""Validation during training: bicubic, RRDB and diffusion outputs on held-out images, PSNR-Y/SSIM-Y,
and labelled side-by-side panels (LR | bicubic | RRDB | SR | HR) for PNGs and TensorBoard.

Images are centre-cropped to `eval.crop_size` (rounded down to a multiple of the U-Net's size multiple and
of the scale, what the U-Net accepts; `conventions`) so every validation batch has one shape and the sampler
compiles once per run.
"""
from __future__ import annotations

import pathlib

import cv2
import jax
import numpy as np

from diffssr_jax import conventions, storage
from diffssr_jax import images as image_io
from diffssr_jax.evaluation import metrics
from diffssr_jax.data.eval_sources import EvalImage, open_eval_source
from diffssr_jax.data.imresize import imresize

def centre_crop(img: EvalImage, crop: int | None, scale: int, divisor: float,
                unet_levels: int) -> EvalImage:
  """Crops HR to at most `crop` pixels per side (a multiple of the U-Net's multiple and of the scale), LR to
  match."""
  h, w = img.hr.shape[:2]
  unit = int(np.lcm(conventions.unet_multiple(unet_levels), scale))
  ch = (min(h, crop or h) // unit) * unit
  cw = (min(w, crop or w) // unit) * unit
  if min(ch, cw) < conventions.min_hr_size(unet_levels):
    raise ValueError(f"{img.name}: a {h}x{w} image cropped to multiples of {unit} px is {ch}x{cw}, smaller than "
                     f"the U-Net's minimum {conventions.min_hr_size(unet_levels)} px")
  y0 = ((h - ch) // 2) // scale * scale
  x0 = ((w - cw) // 2) // scale * scale
  hr = img.hr[y0:y0 + ch, x0:x0 + cw]
  lr = img.lr[y0 // scale:(y0 + ch) // scale, x0 // scale:(x0 + cw) // scale]
  return EvalImage(img.name, hr, lr, conventions.make_lr_up(lr, scale, divisor))


def load_validation_images(eval_cfg, scale: int, lr_up_divisor: float, unet_levels: int) -> list[EvalImage]:
  """The config's `eval` section's held-out images (max_images of them, 0 = all), centre-cropped."""
  src = open_eval_source(eval_cfg.hr_dir, eval_cfg.lr_dir or None, scale=scale, lr_up_divisor=lr_up_divisor)
  n = min(len(src), eval_cfg.max_images or len(src))
  return [centre_crop(src[i], eval_cfg.crop_size, scale, lr_up_divisor, unet_levels) for i in range(n)]


def run_validation(val_images, scale: int, *, model_fn, batch_size: int = 4, crop_border: int | None = None
                   ) -> tuple[dict, list]:
  """(summary, panels): means of psnr_y / ssim_y (and psnr_rgb) for bicubic and for each output of
  `model_fn`, and [(image name, labelled panel)] (see `panel`) in the order of `val_images`.

  model_fn(lr, lr_up, indices) -> {"rrdb": ..., "diffusion": ...} (either or both) takes float batches in
  [-1, 1] and the images' positions in `val_images` (for per-image noise keys). Batches are padded to
  `batch_size` (repeating the last image) so it compiles once.
  """
  crop = scale if crop_border is None else crop_border
  rows = {"bicubic": [], "rrdb": [], "diffusion": []}
  panels = []
  for start in range(0, len(val_images), batch_size):
    chunk = val_images[start:start + batch_size]
    indices = list(range(start, start + len(chunk)))
    pad = batch_size - len(chunk)
    full, indices = chunk + [chunk[-1]] * pad, indices + [indices[-1]] * pad
    lr = np.stack([conventions.to_signed(im.lr) for im in full])
    lr_up = np.stack([im.lr_up for im in full])
    results = jax.device_get(model_fn(lr, lr_up, np.asarray(indices)))
    for i, im in enumerate(chunk):
      outs = {"bicubic": imresize(im.lr, scale)}
      for name in ("rrdb", "diffusion"):
        if name in results:
          outs[name] = conventions.signed_to_uint8(results[name][i])
      for name, out in outs.items():
        rows[name].append({"psnr_y": metrics.psnr_y(out, im.hr, crop), "ssim_y": metrics.ssim_y(out, im.hr, crop),
                           "psnr_rgb": metrics.psnr_rgb(out, im.hr, crop)})
      panels.append((im.name.replace("/", "_"), panel(im, outs)))
  summary = {k: {m: float(np.mean([r[m] for r in v])) for m in ("psnr_y", "ssim_y", "psnr_rgb")}
             for k, v in rows.items() if v}
  return summary, panels


PANEL_LABELS = {"bicubic": "bicubic", "rrdb": "RRDB", "diffusion": "SR"}
_LABEL_HEIGHT = 16


def panel(im: EvalImage, outs: dict) -> np.ndarray:
  """LR (nearest-upscaled) | bicubic | RRDB | SR | HR side by side (the outputs in `outs`), each column under
  a white strip with its name, 4 px white gaps between columns (uint8 HxWx3)."""
  s = im.hr.shape[0] // im.lr.shape[0]
  columns = [("LR", np.repeat(np.repeat(im.lr, s, 0), s, 1))]
  columns += [(PANEL_LABELS[k], outs[k]) for k in ("bicubic", "rrdb", "diffusion") if k in outs]
  columns.append(("HR", im.hr))
  h, w = im.hr.shape[:2]
  cells = []
  for label, image in columns:
    strip = np.full((_LABEL_HEIGHT, w, 3), 255, np.uint8)
    cv2.putText(strip, label, (2, _LABEL_HEIGHT - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cells += [np.concatenate([strip, image]), np.full((_LABEL_HEIGHT + h, 4, 3), 255, np.uint8)]
  return np.concatenate(cells[:-1], axis=1)


def save_panels(panels, out_dir, step=None) -> list[pathlib.Path]:
  """One PNG per (name, panel) of `run_validation`: OUT_DIR/<name>[_step<step>].png."""
  out_dir = storage.native(out_dir)
  paths = []
  for name, image in panels:
    path = out_dir / (name + (f"_step{step}" if step is not None else "") + ".png")
    image_io.save_png(path, image)
    paths.append(path)
  return paths
