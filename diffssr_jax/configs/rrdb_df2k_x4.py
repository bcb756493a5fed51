"""Stage 1: pre-training the RRDB LR encoder with L1 on DF2K x4 (official `configs/rrdb/df2k4x_pretrain.yaml`).

  python -m diffssr_jax.main --config rrdb_df2k_x4 --workdir runs/rrdb_df2k_x4 \
      --config.data.train_files=data/df2k_x4 --config.eval.hr_dir=benchmarks/DIV2K_valid_HR

17 blocks x 64 features, batch 64, Adam 2e-4 halved every 200k steps (`RRDBTask.build_scheduler`),
100k steps (`max_updates`). The diffusion configs then load it with --config.train.rrdb_checkpoint.
"""
from diffssr_jax.configs import base


def get_config():
  c = base.get_config()
  c.task = "rrdb"
  c.train.batch_size = 64
  c.train.num_steps = 100_000
  c.optim.schedule = "step"
  c.optim.decay_steps = 200_000
  c.optim.grad_clip = 0.0          # the official RRDB task sets no clipping
  c.eval.max_images = 4
  return c
