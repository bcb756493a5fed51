"""The SR diffusion model as one object: RRDB encoder + U-Net + schedule + how they are combined.

Pure functions of explicit params; nothing here holds state. Param layout (also the checkpoint layout):
{"unet": {"params": ...}, "rrdb": {"params": ...}}.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from diffssr_jax.diffusion import process as diffusion
from diffssr_jax.models import RRDBNet, UNet, build_rrdb, build_unet
from diffssr_jax.diffusion.schedules import Schedule, schedule_from_config


def init_key(rng):
  """A key of the 'rbg' generator derived from `rng`, for parameter initialisation only: XLA:CPU compiles
  the threefry hash of ~700 initialisers 5x slower (14 s vs 3 s for a small RRDB); the values are
  drawn from the same distributions, deterministically in `rng`."""
  return jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl="rbg")


@dataclasses.dataclass(frozen=True, eq=False)
class SRDiffusion:
  rrdb: RRDBNet
  unet: UNet
  schedule: Schedule
  modulation: str = "reference"   # none | reference | paper (see diffusion.py)
  res_rescale: float = 2.0
  clip_input: bool = True

  @property
  def scale(self) -> int:
    return self.rrdb.scale

  @property
  def num_timesteps(self) -> int:
    return self.schedule.num_timesteps

  def init(self, rng, lr_size: int = 8) -> dict:
    """Random params for both networks (shapes do not depend on the image size). Compiled as one
    function: op-by-op initialisation of the 17-block RRDB costs far more in dispatch than in math."""
    return jax.jit(self._init, static_argnums=1)(rng, lr_size)

  def _init(self, rng, lr_size):
    k1, k2 = jax.random.split(init_key(rng))
    lr = jnp.zeros((1, lr_size, lr_size, 3), jnp.float32)
    rrdb_vars = self.rrdb.init(k1, lr)
    _, feats = self.rrdb.apply(rrdb_vars, lr, decode=False)
    hr = lr_size * self.scale
    unet_vars = self.unet.init(k2, jnp.zeros((1, hr, hr, 3)), jnp.zeros((1,), jnp.int32), feats)
    return {"unet": unet_vars, "rrdb": rrdb_vars}

  def encode(self, rrdb_vars, lr, decode: bool = False):
    """(RRDB image or None, RRDB features)."""
    return self.rrdb.apply(rrdb_vars, lr, decode=decode)

  def condition(self, unet_vars, feats):
    """The U-Net's projected LR condition: time-independent, computed once per image when sampling."""
    return self.unet.apply(unet_vars, feats, method=UNet.project_cond)

  def predict_noise(self, unet_vars, x_t, t, cond):
    return self.unet.apply(unet_vars, x_t, t, cond, method=UNet.denoise)

  def img2res(self, hr, lr_up):
    return diffusion.img2res(hr, lr_up, self.res_rescale, self.clip_input)

  def res2img(self, res, lr_up):
    return diffusion.res2img(res, lr_up, self.res_rescale, self.clip_input)


def build_model(config, dtype=None) -> SRDiffusion:
  """From a config with `model` and `diffusion` sections (see configs/base.py)."""
  m, d = config.model, config.diffusion
  if d.modulation not in diffusion.MODULATIONS:
    raise ValueError(f"diffusion.modulation must be one of {diffusion.MODULATIONS}, got {d.modulation!r}")
  return SRDiffusion(rrdb=build_rrdb(m, dtype), unet=build_unet(m, dtype), schedule=schedule_from_config(d),
                     modulation=d.modulation, res_rescale=d.res_rescale, clip_input=d.clip_input)
