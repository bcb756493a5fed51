"""Stage 1 for x2: RRDB pre-training on DF2K x2 shards (see diffssr_jax/configs/diffssr_df2k_x2.py).

  python -m diffssr_jax.main --config rrdb_df2k_x2 --workdir runs/rrdb_df2k_x2 \
      --config.data.train_files=data/df2k_x2
"""
from diffssr_jax.configs import rrdb_df2k_x4


def get_config():
  c = rrdb_df2k_x4.get_config()
  c.model.scale = 2
  return c
