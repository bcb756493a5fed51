"""SRDiff x4 on DF2K: the baseline without structure modulation (official `configs/diffsr_df2k4x.yaml`).

  python -m diffssr_jax.main --config srdiff_df2k_x4 --workdir runs/srdiff_df2k_x4 \
      --config.data.train_files=data/df2k_x4 --config.train.rrdb_checkpoint=runs/rrdb_df2k_x4

The SPE maps in the shards are read but unused ("none" modulation): the same shards serve both models.
"""
from diffssr_jax.configs import diffssr_df2k_x4


def get_config():
  c = diffssr_df2k_x4.get_config()
  c.diffusion.modulation = "none"
  return c
