"""Super-resolution with a trained model: the Python API behind `evaluate` and `upscale`.

  up = Upscaler.load(workdir="runs/x4")                  # or checkpoint="model_ckpt_steps_400000.ckpt"
  sr = up.upscale("photo.png", seed=0)                    # (4H, 4W, 3) uint8 (uint16 for 16-bit input)
  sr, rrdb = up.super_resolve_batch(lr_batch)             # equal-size LR images, float in [-1, 1] space

Conventions (those of the official `tasks/infer.py` and dataset code; `diffssr_jax.conventions`):
  * LR network input  = (v / maxval - 0.5) / 0.5, maxval 255 (or 65535 for 16-bit images);
  * lr_up             = (imresize(v8 / divisor, scale) - 0.5) / 0.5 with v8 the 8-bit value and divisor 256
                        (the official quirk; `config.data.lr_up_divisor` when the config has it);
  * output            = round((x + 1) * 127.5) clipped to [0, 255] (or the 16-bit equivalent).
The U-Net halves the resolution len(dim_mults) - 1 times, so the HR size must be a multiple of 2 ** that, and
at least twice that so its lowest level is at least 2x2: inputs are reflect-padded at the bottom/right to
such a size (any input down to 1x1 works) and the outputs cropped back.

The sampler defaults to the official DDPM (`conventions.DEFAULT_SAMPLER`), as in `evaluate` and `upscale`.

Noise: image i of a batch gets the key fold_in(key(seed), index_i), so its result does not depend on which
other images share its batch (the evaluation names each image's index by a hash of its name, so a resumed run
reproduces an interrupted one). `mode="rrdb"` returns the RRDB encoder's own SR image: a deterministic
baseline that needs no sampling.
"""
from __future__ import annotations

import functools
import itertools
import logging
import math
import pathlib
import re
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from diffssr_jax import conventions, images, parallel, storage
from diffssr_jax.errors import UserError
from diffssr_jax.diffusion import sampling
from diffssr_jax.data.imresize import imresize
from diffssr_jax.diffusion.model import SRDiffusion
from diffssr_jax.inference.tiling import DEFAULT_TILE, device_bytes_limit, tile_for_memory, upscale_tiled

log = logging.getLogger(__name__)

MODES = ("diffusion", "rrdb")

class ModelLoadError(UserError, ValueError):
  """A workdir or checkpoint could not be loaded; the message names it and says why."""


def unet_levels(model: SRDiffusion) -> int:
  """The number of resolutions of the model's U-Net (len(dim_mults))."""
  return len(model.unet.dim_mults)


def hr_multiple(model: SRDiffusion) -> int:
  """The multiple the HR height and width must be (`conventions.unet_multiple`; 8 for the paper's U-Net)."""
  return conventions.unet_multiple(unet_levels(model))


def lr_multiple(hr_mult: int, scale: int) -> int:
  """The smallest LR multiple m such that m * scale is a multiple of hr_mult."""
  return hr_mult // math.gcd(hr_mult, scale)


def padded_lr_size(n: int, multiple: int, minimum: int) -> int:
  """The LR size an axis of `n` pixels is padded to: at least `minimum`, rounded up to `multiple`."""
  n = max(n, minimum)
  return -(-n // multiple) * multiple


def pad_bottom_right(x: np.ndarray, ph: int, pw: int) -> np.ndarray:
  """Mirror-pads the two spatial axes of a (..., H, W, C) array at the bottom and right. Reflection (edge
  pixel not repeated) as SRDiff's convs; a 1-pixel axis has nothing to reflect, so it is repeated instead."""
  if ph == 0 and pw == 0:
    return x
  mode = "reflect" if min(x.shape[-3:-1]) > 1 else "symmetric"
  pads = [(0, 0)] * (x.ndim - 3) + [(0, ph), (0, pw), (0, 0)]
  return np.pad(x, pads, mode=mode)


def name_index(name: str) -> int:
  """A stable 31-bit index for an image name (CRC-32), for per-image noise keys independent of batching."""
  return zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF


def _maxval(dtype) -> float:
  """The white level of integer pixels (uint8 or uint16 only)."""
  if np.dtype(dtype).kind == "f":
    raise TypeError(f"expected uint8 or uint16 pixels, got {dtype}")
  return conventions.white_level(dtype)




def step_from_checkpoint_name(path) -> int | None:
  """The training step in an official checkpoint's file name (`model_ckpt_steps_400000.ckpt`), or None."""
  m = re.search(r"steps?_(\d+)", pathlib.Path(path).stem)
  return int(m.group(1)) if m else None


def _as_rgb(arr: np.ndarray) -> np.ndarray:
  """(H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA -> (H, W, 3) (alpha dropped)."""
  arr = np.asarray(arr)
  if arr.ndim == 2:
    return np.repeat(arr[:, :, None], 3, axis=2)
  if arr.ndim == 3 and arr.shape[2] in (3, 4):
    return arr[:, :, :3]
  raise ValueError(f"expected an (H, W), (H, W, 3) or (H, W, 4) image, got shape {arr.shape}")


def upscale_alpha(alpha: np.ndarray, scale: int) -> np.ndarray:
  """An alpha channel up-scaled by MATLAB bicubic, in its own dtype (uint8 or uint16)."""
  if alpha.dtype == np.uint8:
    return imresize(alpha, scale)
  return np.round(imresize(alpha.astype(np.float64), scale)).clip(0, 65535).astype(np.uint16)


def _saved_steps(workdir) -> list[int]:
  directory = storage.native(workdir) / "checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


class Upscaler:
  """A model, its params and a sampler setting, ready to super-resolve images of any size."""

  def __init__(self, model: SRDiffusion, params, *, config=None, sampler: str = conventions.DEFAULT_SAMPLER,
               steps: int | None = None, eta: float = conventions.DEFAULT_ETA, mode: str = "diffusion",
               lr_up_divisor: float | None = None, multiple: int | None = None, step: int | None = None,
               source: str | None = None, mesh=None):
    """`steps` defaults to 25 for ddim and to all T steps for ddpm. `lr_up_divisor` defaults to
    `config.data.lr_up_divisor` when present, else 256. `multiple` (the HR size multiple) defaults to what the
    U-Net needs, and the HR size to at least twice it; only the diffusion mode pads. `step` and `source` (the
    checkpoint's training step and where the weights came from) are recorded for reporting (`load` sets them).
    `mesh` (default: every local device, `parallel.local_mesh()`) splits each batch over its devices: images
    draw their noise from their own keys, so results do not depend on the number of devices."""
    if mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if sampler == "ddim" and steps is None:
      steps = min(conventions.DEFAULT_DDIM_STEPS, model.num_timesteps)
    if sampler == "ddpm" and steps == model.num_timesteps:
      steps = None
    sampling.timesteps_for(model, sampler, steps)  # validates sampler and steps now, not at the first image
    self.mesh = mesh if mesh is not None else parallel.local_mesh()
    self.model, self.params, self.config = model, parallel.replicate(params, self.mesh), config
    self.sampler, self.steps, self.eta, self.mode = sampler, steps, float(eta), mode
    if lr_up_divisor is None:
      lr_up_divisor = config.data.lr_up_divisor if config is not None else conventions.OFFICIAL_LR_UP_DIVISOR
    self.lr_up_divisor = float(lr_up_divisor)
    self.step, self.source = step, source
    self._digests = {}
    hr_mult = (multiple or hr_multiple(model)) if mode == "diffusion" else 1
    self.lr_multiple = lr_multiple(hr_mult, self.scale)
    # The U-Net's lowest level must be at least 2x2 (its reflection-padded convs need two pixels).
    min_hr = 2 * hr_mult if mode == "diffusion" else 1
    self.min_lr = -(-min_hr // self.scale)
    setting = dict(sampler=sampler, steps=steps, eta=self.eta) if mode == "diffusion" else {}  # rrdb: one per model
    self._fn = sampling.make_image_sampler(model, mode=mode, mesh=self.mesh, **setting)

  @classmethod
  def load(cls, workdir=None, checkpoint=None, step: int | None = None, sampler: str = conventions.DEFAULT_SAMPLER,
           steps: int | None = None, eta: float = conventions.DEFAULT_ETA, use_ema: bool = True,
           mode: str = "diffusion", config=None, lr_up_divisor: float | None = None) -> "Upscaler":
    """From a training workdir (latest or `step` checkpoint) or an official PyTorch `.ckpt`. The checkpoint's
    step and path are kept in `.step` / `.source` (an official file's step is read from its name). Anything
    that stops the weights from loading (missing folder or file, no checkpoint, a file that is not a
    checkpoint, weights of another shape) raises `ModelLoadError` naming the path."""
    from diffssr_jax.inference.loading import load_for_inference  # lazy: orbax is only needed for loading
    if (workdir is None) == (checkpoint is None):
      raise ValueError("give exactly one of workdir or checkpoint")
    if workdir is not None:
      workdir = storage.native(workdir)
      if not workdir.is_dir():
        raise ModelLoadError(f"{workdir}: no such folder (a training workdir holds config.json and checkpoints/)")
      if not (workdir / "config.json").is_file():
        raise ModelLoadError(f"{workdir}: no config.json (is it a training workdir?)")
      if step is not None and step not in _saved_steps(workdir):
        raise ModelLoadError(f"{workdir}: no checkpoint for step {step} (saved steps: {_saved_steps(workdir)})")
      if not _saved_steps(workdir):
        raise ModelLoadError(f"{workdir / 'checkpoints'}: no checkpoints (is {workdir} a training workdir that has "
                             "saved one?)")
      # No step: the newest verified one (damaged steps are skipped with a warning); the step loaded is reported.
      where = workdir / "checkpoints" / (str(step) if step is not None else "")
      hint, load_step = f" (saved steps: {_saved_steps(workdir)})", step
    else:
      where, hint, load_step = storage.native(checkpoint), "", None
      if not where.is_file():
        raise ModelLoadError(f"{where}: no such file (--checkpoint takes an official SAM-DiffSR .ckpt)")
      step = step_from_checkpoint_name(where)
    try:
      config, model, params, loaded = load_for_inference(workdir=workdir, checkpoint=checkpoint, step=load_step,
                                                         use_ema=use_ema, config=config)
    except Exception as e:  # noqa: BLE001  (any failure to read the weights is the user's file: say which)
      detail = " ".join(str(e).split()).removeprefix(f"{where}: ")
      detail = detail if len(detail) <= 300 else detail[:297].rsplit(" ", 1)[0] + " ..."
      raise ModelLoadError(f"{where}: cannot load the model ({type(e).__name__}: {detail}){hint}") from e
    if workdir is not None:
      step = loaded
      where = workdir / "checkpoints" / str(step)
    is_student = config.get("task") == "distill"
    if mode == "diffusion" and is_student != (sampler == "student"):
      raise ModelLoadError(f"{where}: a distilled student samples only with '--sampler student --steps 1|2|4'" if
                           is_student else f"{where}: --sampler student needs a distilled student's workdir "
                           "(config task distill); this model predicts noise: use ddpm or ddim")
    log.debug("model: %s (step %s)", where, "unknown" if step is None else step)
    return cls(model, params, config=config, sampler=sampler, steps=steps, eta=eta, mode=mode,
               lr_up_divisor=lr_up_divisor, step=step, source=str(where))

  @property
  def scale(self) -> int:
    return self.model.scale

  @property
  def num_steps(self) -> int:
    """How many denoising steps one image takes (0 in rrdb mode)."""
    if self.mode == "rrdb":
      return 0
    return len(sampling.timesteps_for(self.model, self.sampler, self.steps))

  def describe(self) -> str:
    if self.mode == "rrdb":
      return "RRDB encoder"
    eta = f", eta {self.eta:g}" if self.sampler == "ddim" else ""
    return f"{self.sampler}, {self.num_steps} steps{eta}"

  def describe_source(self) -> str:
    """Where the weights came from and their training step, e.g. 'runs/x4/checkpoints/40000 (step 40000)'."""
    step = "step unknown" if self.step is None else f"step {self.step}"
    return f"{self.source or 'weights given in memory'} ({step})"

  # ------------------------------------------------------------------ batches
  def lr_up_batch(self, lr_batch: np.ndarray) -> np.ndarray:
    """The bicubic-upscaled conditions (N, h*s, w*s, 3) in [-1, 1] space of an LR batch (see `conventions.to_signed`)."""
    lr_batch = np.asarray(lr_batch)
    maxval = conventions.white_level(lr_batch.dtype)
    v8 = lr_batch if maxval == 255.0 else lr_batch.astype(np.float64) * (255.0 / maxval)
    return np.stack([conventions.make_lr_up(v, self.scale, self.lr_up_divisor) for v in v8])

  def lr_padding(self, h: int, w: int) -> tuple[int, int]:
    """LR pixels added at the bottom and right of an h x w LR image before the networks see it."""
    return padded_lr_size(h, self.lr_multiple, self.min_lr) - h, padded_lr_size(w, self.lr_multiple, self.min_lr) - w

  def weights_sha256(self, part: str | None = None) -> str:
    """`loading.params_sha256` of the weights (of `params[part]` when given), computed once per Upscaler:
    evaluate records it in every results folder it writes."""
    if part not in self._digests:
      from diffssr_jax.inference import loading
      self._digests[part] = loading.params_sha256(self.params if part is None else self.params[part])
    return self._digests[part]

  @property
  def needs_spe(self) -> bool:
    """True when every call must give the images' SPE maps (a SAM+SRDiff model sampling; see
    `SRDiffusion.needs_spe`)."""
    return self.mode == "diffusion" and self.model.needs_spe

  def super_resolve_batch(self, lr_batch, seed: int = 0, indices: Sequence[int] | None = None,
                          lr_up: np.ndarray | None = None, spe: np.ndarray | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Super-resolves N equal-size LR images: (sr, rrdb), float32 (N, h*s, w*s, 3) in [-1, 1] space (SR is
    not clipped, as the official sampler's output). `lr_batch` is uint8/uint16 (N, h, w, 3) (or one (h, w, 3)
    image) or floats holding 8-bit values. Image i's noise comes from fold_in(key(seed), indices[i])
    (default i). `lr_up` (N, h*s, w*s, 3) may be passed when already computed. `spe` (N, h*s, w*s[, 1]): the
    images' SPE maps, required by a SAM+SRDiff model (`needs_spe`) and refused otherwise."""
    lr_batch = np.asarray(lr_batch)
    if lr_batch.ndim == 3:
      lr_batch = lr_batch[None]
    if lr_batch.ndim != 4 or lr_batch.shape[-1] != 3:
      raise ValueError(f"expected an (N, h, w, 3) LR batch, got shape {lr_batch.shape}")
    n, h, w, _ = lr_batch.shape
    s = self.scale
    lr = conventions.to_signed(lr_batch)
    if self.mode == "rrdb":
      lr_up = np.zeros((n, h * s, w * s, 0), np.float32)  # unused by the RRDB: skip the bicubic
    elif lr_up is None:
      lr_up = self.lr_up_batch(lr_batch)
    else:
      lr_up = np.asarray(lr_up, np.float32)
      lr_up = lr_up[None] if lr_up.ndim == 3 else lr_up
      if lr_up.shape != (n, h * s, w * s, 3):
        raise ValueError(f"lr_up has shape {lr_up.shape}, expected {(n, h * s, w * s, 3)}")
    if self.needs_spe != (spe is not None):
      raise ValueError("this model (model.cond_sam) needs the images' SPE maps (spe=...)" if self.needs_spe else
                       "spe= is only for a SAM+SRDiff model (model.cond_sam) sampling; this one takes no SPE map")
    if spe is not None:
      spe = np.asarray(spe, np.float32)
      spe = spe[..., None] if spe.ndim == 3 else spe
      if spe.shape != (n, h * s, w * s, 1):
        raise ValueError(f"spe has shape {spe.shape}, expected {(n, h * s, w * s, 1)}")
    indices = list(range(n) if indices is None else indices)
    if len(indices) != n:
      raise ValueError(f"{len(indices)} indices for {n} images")
    ph, pw = self.lr_padding(h, w)
    # lr_up is computed from the unpadded LR (exactly the official values inside the image) and padded in
    # HR space, rather than up-scaled from the padded LR.
    lr = pad_bottom_right(lr, ph, pw)
    lr_up = pad_bottom_right(lr_up, ph * s, pw * s)
    extra = () if spe is None else (parallel.pad_to_multiple(pad_bottom_right(spe, ph * s, pw * s), self.mesh.size),)
    # The batch is split over the mesh's devices: filled up to a multiple of their number with copies of
    # the last image (and its key), which are dropped again.
    m = self.mesh.size
    lr, lr_up = parallel.pad_to_multiple(lr, m), parallel.pad_to_multiple(lr_up, m)
    keys = sampling.image_keys(seed, parallel.pad_to_multiple(np.asarray(indices, np.int64), m))
    sr, rrdb = self._fn(self.params, lr, lr_up, keys, *extra)
    return np.asarray(sr)[:n, :h * s, :w * s], np.asarray(rrdb)[:n, :h * s, :w * s]

  # ------------------------------------------------------------------ whole images
  def default_tile(self, batch_size: int = 4) -> int:
    """The tile size (LR pixels) used when none is given: from the device's memory (`tile_for_memory`; the
    smallest device of the mesh, each holds its share of a batch), DEFAULT_TILE where it reports none."""
    if self.mode == "rrdb":
      return DEFAULT_TILE
    limits = [device_bytes_limit(d) for d in self.mesh.devices.flat]
    per_device = -(-batch_size // self.mesh.size)
    return tile_for_memory(None if None in limits else min(limits), per_device, self.scale, self.model.dtype)

  def upscale_signed(self, rgb: np.ndarray, seed: int = 0, tile: int | None = None, overlap: int = 32,
                     batch_size: int = 4, margin: int | None = None,
                     progress: Callable[[int, int], None] | None = None, spe: np.ndarray | None = None
                     ) -> np.ndarray:
    """One (H, W, 3) uint8/uint16 image -> float32 (H*s, W*s, 3) SR in [-1, 1] space. Images no larger than
    `tile` (LR pixels; None: `default_tile`) on both sides go through in one piece (key index 0); larger ones in
    overlapping tiles blended by `tiling.upscale_tiled`, `batch_size` tiles per call, tile k (in order) with key
    index k + 1. `spe` (H*s, W*s): the image's SPE map for a SAM+SRDiff model, cut into the same tiles."""
    tile = self.default_tile(batch_size) if tile is None else tile
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
      raise ValueError(f"expected an (H, W, 3) image, got shape {rgb.shape}")
    maxval = _maxval(rgb.dtype)
    h, w = rgb.shape[:2]
    if spe is not None:
      spe = np.asarray(spe, np.float32)
      spe = spe[:, :, 0] if spe.ndim == 3 else spe
      if spe.shape != (h * self.scale, w * self.scale):
        raise ValueError(f"spe has shape {spe.shape}, expected the SR size {(h * self.scale, w * self.scale)}")
    if h <= tile and w <= tile:
      out = self.super_resolve_batch(rgb[None], seed=seed, indices=[0],
                                     spe=None if spe is None else spe[None])[0][0]
      if progress is not None:
        progress(1, 1)
      return out
    counter = itertools.count(1)
    # Tiles travel as float 8-bit values (exact for uint8; 16-bit keeps its precision as fractions).
    v8 = rgb.astype(np.float32) if maxval == 255.0 else (rgb.astype(np.float64) * (255.0 / maxval)).astype(np.float32)

    def sr_fn(batch, spe_batch=None):
      idx = [next(counter) for _ in range(len(batch))]
      return self.super_resolve_batch(batch, seed=seed, indices=idx, spe=spe_batch)[0]

    return upscale_tiled(v8, sr_fn, self.scale, tile=tile, overlap=overlap, batch_size=batch_size, margin=margin,
                         progress=progress, hr_side=None if spe is None else spe[:, :, None])

  def upscale(self, image, seed: int = 0, tile: int | None = None, overlap: int = 32, batch_size: int = 4,
              margin: int | None = None, progress: Callable[[int, int], None] | None = None,
              spe: np.ndarray | None = None) -> np.ndarray:
    """An image (path, `images.LoadedImage`, or (H, W[, 3|4]) uint8/uint16 array; alpha ignored) -> its
    (H*s, W*s, 3) SR in the input's dtype, by the official rounding. `spe`: see `upscale_signed`."""
    if isinstance(image, (str, pathlib.PurePath)):  # epath paths are PurePaths too
      image = images.load_image(image)
    rgb = image.rgb if isinstance(image, images.LoadedImage) else _as_rgb(image)
    sr = self.upscale_signed(rgb, seed, tile, overlap, batch_size, margin, progress, spe)
    return conventions.signed_to_pixels(sr, rgb.dtype)

  def upscale_like_input(self, image: images.LoadedImage, seed: int = 0, tile: int | None = None, overlap: int = 32,
                         batch_size: int = 4, margin: int | None = None,
                         progress: Callable[[int, int], None] | None = None,
                         spe: np.ndarray | None = None) -> np.ndarray:
    """The SR of a loaded image in the input's layout and bit depth: greyscale (mean of the SR channels,
    since the model always makes colour), RGB, or with the alpha channel up-scaled by MATLAB bicubic. `spe`:
    see `upscale_signed`."""
    sr = self.upscale_signed(image.rgb, seed, tile, overlap, batch_size, margin, progress, spe)
    to_int = functools.partial(conventions.signed_to_pixels, dtype=image.rgb.dtype)
    if image.alpha is not None:
      return np.concatenate([to_int(sr), upscale_alpha(image.alpha, self.scale)[:, :, None]], axis=2)
    if image.grey:
      return to_int(sr.mean(axis=2))
    return to_int(sr)


def load_model(workdir=None, checkpoint=None, step: int | None = None, sampler: str = conventions.DEFAULT_SAMPLER,
               steps: int | None = None, eta: float = conventions.DEFAULT_ETA, use_ema: bool = True,
               mode: str = "diffusion") -> Upscaler:
  """`Upscaler.load` under a function name."""
  return Upscaler.load(workdir=workdir, checkpoint=checkpoint, step=step, sampler=sampler, steps=steps, eta=eta,
                       use_ema=use_ema, mode=mode)
