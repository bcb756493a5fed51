"""Every shipped config builds its model and has consistent settings."""
import importlib

import jax
import jax.numpy as jnp
import pytest

from diffssr_jax.diffusion.model import build_model

CONFIGS = ["base", "demo", "diffssr_df2k_x4", "diffssr_paper_df2k_x4", "srdiff_df2k_x4", "rrdb_df2k_x4",
           "diffssr_df2k_x2", "rrdb_df2k_x2", "distill_demo"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds(name):
  cfg = importlib.import_module(f"configs.{name}").get_config()
  model = build_model(cfg)
  shapes = model.param_shapes()
  assert set(shapes) == {"unet", "rrdb"}
  assert cfg.data.patch_size % cfg.model.scale == 0
  assert cfg.task in ("diffusion", "rrdb", "distill")


def test_paper_settings():
  from configs import diffssr_df2k_x4, diffssr_paper_df2k_x4, srdiff_df2k_x4
  c = diffssr_df2k_x4.get_config()
  assert (c.diffusion.timesteps, c.diffusion.beta_schedule, c.model.unet_dim, tuple(c.model.unet_dim_mults),
          c.model.rrdb_num_blocks, c.optim.lr, c.train.batch_size) == (100, "cosine", 64, (1, 2, 3, 4), 17, 2e-4, 64)
  assert c.diffusion.modulation == "reference" and c.diffusion.loss == "l1"
  assert diffssr_paper_df2k_x4.get_config().diffusion.modulation == "paper"
  assert srdiff_df2k_x4.get_config().diffusion.modulation == "none"


def test_x2_model_shapes():
  from configs import diffssr_df2k_x2
  model = build_model(diffssr_df2k_x2.get_config())
  params = model.param_shapes()
  assert params["unet"]["params"]["cond_proj"]["kernel"].shape == (4, 4, 64, 384)  # (k, k, out, in)
  out = jax.eval_shape(lambda p, x: model.encode(p, x, decode=True)[0], params["rrdb"], jnp.zeros((1, 8, 8, 3)))
  assert out.shape == (1, 16, 16, 3)
