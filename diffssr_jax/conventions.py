"""Pixel, size and sampling conventions shared by the data pipeline, validation, evaluation and inference.

One home for what used to be written in each of those modules:

* pixels <-> the network's [-1, 1] space: `to_signed` is torchvision's ToTensor + Normalize(0.5, 0.5)
  ((v / white - 0.5) / 0.5 in float32), `signed_to_uint8` the official `Measure.measure` rounding
  round((x + 1) * 127.5) clipped, `signed_to_uint16` its 16-bit analogue;
* the bicubic condition lr_up = (imresize(lr / divisor, scale) - 0.5) / 0.5 (`make_lr_up`) and the official
  divisor 256 (the official code divides by 256, not 255), used where no config says otherwise (a config's
  `data.lr_up_divisor` is the configured value); HR images trimmed to a multiple of the scale (`trim_to_scale`);
* the U-Net's size rules: the HR size must be a multiple of 2 ** (levels - 1), and at least twice that, so
  the lowest level's maps are at least 2x2 (its reflection-padded convs need two pixels to reflect);
* which Pillow modes mean "greyscale" (outputs of such inputs are written back as greyscale);
* the default reverse process of `evaluate` and `upscale`.

numpy only, no jax: the torch-only export tool and the grain pipeline's worker processes import it.
"""
from __future__ import annotations

import numpy as np

from diffssr_jax.data.imresize import imresize

# lr_up = (imresize(lr_uint8 / divisor, scale) - 0.5) / 0.5: the official dataset divides by 256 (a quirk kept
# so converted official weights see their training inputs).
OFFICIAL_LR_UP_DIVISOR = 256.0


def make_lr_up(lr: np.ndarray, scale: int, divisor: float = OFFICIAL_LR_UP_DIVISOR) -> np.ndarray:
  """Bicubic up-scaled LR in [-1, 1]-ish: (imresize(lr / divisor, scale) - 0.5) / 0.5, float32.

  Computed in float64 and cast at the end, as the official dataset does (`.float()` after Normalize).
  """
  up = imresize(lr.astype(np.float64) / divisor, scale)
  return ((up - 0.5) / 0.5).astype(np.float32)


def trim_to_scale(img: np.ndarray, scale: int) -> np.ndarray:
  """The top-left part of `img` whose height and width are multiples of `scale` (HR images are trimmed so
  their LR has an integer size, as the official dataset code does)."""
  h, w = img.shape[:2]
  return img[:h - h % scale, :w - w % scale]

# `images.LoadedImage.source_mode` values that hold no colour. The loader produces "L" and "LA" (bit depth is
# in `LoadedImage.bits`); Pillow's other grey modes are accepted for LoadedImages that callers build themselves.
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})

# The reverse process evaluate, upscale, the benchmark and training's validation use unless told otherwise:
# the official DDPM sampler over all T steps (what the paper's tables use). `--sampler ddim --steps 25` is ~4x
# faster and was within 0.01 dB PSNR-Y of it on the demo model with eta 1 (README, "Fewer sampling steps");
# eta 0 (deterministic DDIM) was 5.3 dB worse there, so the default eta is 1: asking for ddim never silently
# gives the bad sampler.
DEFAULT_SAMPLER = "ddpm"
SAMPLERS = ("ddpm", "ddim", "student")
DEFAULT_DDIM_STEPS = 25
DEFAULT_ETA = 1.0
SAMPLER_HELP = ("Reverse process: ddpm (the official sampler, all T steps, as in the paper's tables) or ddim "
                "(strided: '--sampler ddim --steps 25' is ~4x faster, within 0.01 dB PSNR-Y of ddpm on the demo "
                "model with the default eta 1; eta 0 is deterministic but was 5.3 dB worse there) or student (a "
                "distilled student workdir, config task distill: '--sampler student --steps 1|2|4').")


def white_level(dtype) -> float:
  """The value of white: 255 for uint8 and for floats (which hold 8-bit values), 65535 for uint16."""
  dtype = np.dtype(dtype)
  if dtype == np.uint8 or dtype.kind == "f":
    return 255.0
  if dtype == np.uint16:
    return 65535.0
  raise TypeError(f"expected uint8 or uint16 pixels (or floats holding 8-bit values), got {dtype}")


def to_signed(pixels) -> np.ndarray:
  """Pixels -> float32 in [-1, 1] as ToTensor + Normalize(0.5, 0.5): (v / white - 0.5) / 0.5, in float32
  arithmetic as torchvision does. uint8, uint16, or floats holding 8-bit values."""
  pixels = np.asarray(pixels)
  white = np.float32(white_level(pixels.dtype))
  return (pixels.astype(np.float32) / white - np.float32(0.5)) / np.float32(0.5)


def _float(x) -> np.ndarray:
  """float64 stays float64; anything else (float32, bfloat16, float16, ints) becomes float32, the dtype the
  official code rounds in (rounding (x + 1) * 127.5 in another precision can flip values on a half step)."""
  x = np.asarray(x)
  return x if x.dtype == np.float64 else x.astype(np.float32)


def signed_to_uint8(x) -> np.ndarray:
  """[-1, 1] -> uint8 as the official `Measure.measure`: round((x + 1) * 127.5) clipped to [0, 255] (np.round
  rounds halves to even, as torch.round)."""
  return np.round((_float(x) + 1) * 127.5).clip(0, 255).astype(np.uint8)


def signed_to_uint16(x) -> np.ndarray:
  """[-1, 1] -> uint16, the 16-bit analogue: round((x + 1) * 32767.5) clipped to [0, 65535] (in float64, since
  float32 cannot hold every 16-bit level plus a fraction)."""
  x = np.asarray(x, np.float64)
  return np.round((x + 1.0) * 32767.5).clip(0, 65535).astype(np.uint16)


def signed_to_pixels(x, dtype) -> np.ndarray:
  """[-1, 1] -> uint8 or uint16 pixels (`dtype`), by the rounding above."""
  if np.dtype(dtype) == np.uint8:
    return signed_to_uint8(x)
  if np.dtype(dtype) == np.uint16:
    return signed_to_uint16(x)
  raise TypeError(f"expected uint8 or uint16, got {np.dtype(dtype)}")


def unet_multiple(levels: int) -> int:
  """The multiple the HR height and width must be for a U-Net of `levels` resolutions (len(dim_mults)): it
  halves the resolution once per level but the last, so 2 ** (levels - 1) (8 for the paper's four)."""
  if levels < 1:
    raise ValueError(f"a U-Net has at least one level, got {levels}")
  return 2 ** (levels - 1)


def min_hr_size(levels: int) -> int:
  """The smallest HR height/width a U-Net of `levels` resolutions takes: twice its multiple, so its lowest
  level's maps are at least 2x2 (reflection padding of a 1-pixel map is undefined in PyTorch and refused by
  our convs)."""
  return 2 * unet_multiple(levels)
