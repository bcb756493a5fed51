"""Flax (linen) networks: the RRDB LR encoder and the SRDiff U-Net, built from a config's `model` section."""
from diffssr_jax.models.rrdb import RRDBNet
from diffssr_jax.models.unet import UNet


def build_rrdb(model_cfg, dtype) -> RRDBNet:
  return RRDBNet(num_feat=model_cfg.rrdb_num_feat, num_blocks=model_cfg.rrdb_num_blocks,
                 growth=model_cfg.rrdb_growth, scale=model_cfg.scale, dtype=dtype, remat=model_cfg.remat_rrdb,
                 unroll=model_cfg.rrdb_unroll)


def build_unet(model_cfg, dtype) -> UNet:
  # `cond_sam` is read with .get: a config.json saved before the key existed describes a U-Net without it.
  return UNet(dim=model_cfg.unet_dim, dim_mults=tuple(model_cfg.unet_dim_mults), scale=model_cfg.scale,
              dtype=dtype, remat=model_cfg.remat_unet,
              cond_sam=bool(model_cfg.get("cond_sam", False)))


__all__ = ["RRDBNet", "UNet", "build_rrdb", "build_unet"]
