"""A tiny diffusion training config for the training tests (seconds per run on CPU).

  python -m diffssr_jax.main --config tests/configs/tiny_train.py --workdir W --config.data.train_files=SHARDS
"""
from diffssr_jax.configs import base


def get_config():
  c = base.get_config()
  c.seed = 7
  c.model.unet_dim = 8
  c.model.unet_dim_mults = (1, 2)
  c.model.rrdb_num_feat = 8
  c.model.rrdb_num_blocks = 2
  c.model.rrdb_growth = 4
  c.model.rrdb_unroll = 2                        # trained RRDBs on the CPU: unrolled (see models/rrdb.py)
  c.diffusion.timesteps = 10
  c.data.patch_size = 32
  c.data.num_workers = 0
  c.data.hflip = True
  c.optim.lr = 1e-3
  c.optim.ema_decay = 0.9
  c.train.batch_size = 4
  c.train.num_steps = 8
  c.train.log_every = 1
  c.train.eval_every = 1000
  c.train.checkpoint_every = 2
  c.train.keep_checkpoints = 10
  c.rrdb_pretrain.num_steps = 2
  c.rrdb_pretrain.batch_size = 4
  c.eval.crop_size = 32
  c.eval.batch_size = 2
  c.eval.sampler = "ddim"
  c.eval.steps = 2
  return c
