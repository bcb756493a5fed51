"""The SR diffusion model as one object: RRDB encoder + U-Net + schedule + how they are combined.

Pure functions of explicit params; nothing here holds state. Param layout (also the checkpoint layout):
{"unet": {"params": ...}, "rrdb": {"params": ...}}.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from diffssr_jax.diffusion import process
from diffssr_jax.diffusion.schedules import Schedule, schedule_from_config
from diffssr_jax.models import RRDBNet, UNet, build_rrdb, build_unet
from diffssr_jax.models.initializers import draw_params, seed_of


@dataclasses.dataclass(frozen=True, eq=False)
class SRDiffusion:
  rrdb: RRDBNet
  unet: UNet
  schedule: Schedule
  modulation: str = "reference"   # none | reference | paper (see process.py)
  res_rescale: float = 2.0
  clip_input: bool = True

  @property
  def scale(self) -> int:
    return self.rrdb.scale

  @property
  def needs_spe(self) -> bool:
    """True for Table 7's SAM+SRDiff (`model.cond_sam`): the U-Net's condition takes each image's SPE map, so
    training, sampling and evaluation must give it one (B, H, W, 1) at the HR size."""
    return bool(self.unet.cond_sam)

  @property
  def num_timesteps(self) -> int:
    return self.schedule.num_timesteps

  def _init_variables(self, rng):
    lr = jnp.zeros((1, 8, 8, 3), jnp.float32)
    k1, k2 = jax.random.split(rng)
    rrdb_vars = self.rrdb.init(k1, lr)
    _, feats = self.rrdb.apply(rrdb_vars, lr, decode=False)
    hr = jnp.zeros((1, 8 * self.scale, 8 * self.scale, 3), jnp.float32)
    spe = jnp.zeros(hr.shape[:3] + (1,), jnp.float32) if self.needs_spe else None
    return {"unet": self.unet.init(k2, hr, jnp.zeros((1,), jnp.int32), feats, spe), "rrdb": rrdb_vars}

  def param_shapes(self) -> dict:
    """The params' ShapeDtypeStructs (traced, nothing computed): the checkpoint layout."""
    return jax.eval_shape(self._init_variables, jax.random.key(0))

  def init(self, rng) -> dict:
    """Random params for both networks, Flax's default layer init (lecun_normal kernels, zero biases) drawn
    on the host from `rng` (`models.initializers`: seconds faster than compiling ~170 initialisers) and put on
    the device."""
    return jax.device_put(draw_params(self.param_shapes(), seed_of(rng)))

  @property
  def dtype(self):
    """The networks' compute dtype."""
    return jnp.dtype(self.unet.dtype)

  def cast_for_compute(self, variables):
    """`variables` with floating leaves in the compute dtype. The layers cast their float32 params on every
    call; a loop that calls them many times with the same params (the sampler's reverse steps) casts once
    before the loop instead, so its body holds no converts of weights (the layers' own cast is then a no-op)."""
    return jax.tree.map(lambda a: a.astype(self.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, variables)

  def encode(self, rrdb_vars, lr, decode: bool = False):
    """(RRDB image or None, RRDB features)."""
    return self.rrdb.apply(rrdb_vars, lr, decode=decode)

  def condition(self, unet_vars, feats, spe=None):
    """The U-Net's projected LR condition: time-independent, computed once per image when sampling. `spe`
    (B, H, W, 1): the SPE map a `needs_spe` model takes (None otherwise)."""
    return self.unet.apply(unet_vars, feats, spe, method=UNet.project_cond)

  def predict_noise(self, unet_vars, x_t, t, cond):
    return self.unet.apply(unet_vars, x_t, t, cond, method=UNet.denoise)

  def img2res(self, hr, lr_up):
    return process.img2res(hr, lr_up, self.res_rescale, self.clip_input)

  def res2img(self, res, lr_up):
    return process.res2img(res, lr_up, self.res_rescale, self.clip_input)


ACCELERATOR_PLATFORMS = ("gpu", "cuda", "rocm", "tpu")


def compute_dtype(name: str, platform: str | None = None):
  """The networks' compute dtype for `model.dtype`: "auto" is bfloat16 for a GPU/TPU program and float32
  for a CPU one (XLA:CPU has no fast bfloat16 convolutions); params, optimizer state and the diffusion
  math are float32 either way. `platform` is the platform the program is compiled for (`jax.Device.platform`,
  or a deviceless target's); None means the default backend's. It matters when the two differ: a GPU
  program compiled ahead of time on a CPU host is still a GPU program."""
  if name == "auto":
    platform = (platform or jax.default_backend()).lower()
    return jnp.bfloat16 if platform in ACCELERATOR_PLATFORMS else jnp.float32
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"model.dtype must be auto, float32 or bfloat16, got {name!r}")
  return jnp.dtype(name)


def build_model(config, dtype: str | None = None, platform: str | None = None) -> SRDiffusion:
  """From a config with `model` and `diffusion` sections (see diffssr_jax/configs/base.py); `dtype` overrides
  `config.model.dtype`; `platform` is the one the model's programs are compiled for (see `compute_dtype`)."""
  m, d = config.model, config.diffusion
  if d.modulation not in process.MODULATIONS:
    raise ValueError(f"diffusion.modulation must be one of {process.MODULATIONS}, got {d.modulation!r}")
  dt = compute_dtype(dtype or m.dtype, platform)
  return SRDiffusion(rrdb=build_rrdb(m, dt), unet=build_unet(m, dt), schedule=schedule_from_config(d),
                     modulation=d.modulation, res_rescale=d.res_rescale, clip_input=d.clip_input)
