"""Flax (linen) networks: the RRDB LR encoder and the SRDiff U-Net."""
from diffssr_jax.models.rrdb import RRDBNet
from diffssr_jax.models.unet import UNet


def build_rrdb(model_cfg, dtype=None):
  import jax.numpy as jnp
  return RRDBNet(num_feat=model_cfg.rrdb_num_feat, num_blocks=model_cfg.rrdb_num_blocks,
                 growth=model_cfg.get("rrdb_growth", model_cfg.rrdb_num_feat // 2), scale=model_cfg.scale,
                 dtype=dtype or jnp.dtype(model_cfg.get("dtype", "float32")))


def build_unet(model_cfg, dtype=None):
  import jax.numpy as jnp
  return UNet(dim=model_cfg.unet_dim, dim_mults=tuple(model_cfg.unet_dim_mults),
              cond_dim=model_cfg.rrdb_num_feat, rrdb_num_blocks=model_cfg.rrdb_num_blocks,
              scale=model_cfg.scale, dtype=dtype or jnp.dtype(model_cfg.get("dtype", "float32")))


__all__ = ["RRDBNet", "UNet", "build_rrdb", "build_unet"]
