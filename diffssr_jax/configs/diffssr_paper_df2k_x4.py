"""SAM-DiffSR x4 on DF2K with the process as the paper writes it (eq. 9-12) and its L2 loss (eq. 5).

  python -m diffssr_jax.main --config diffssr_paper_df2k_x4 --workdir runs/diffssr_paper_df2k_x4 \
      --config.data.train_files=data/df2k_x4 --config.train.rrdb_checkpoint=runs/rrdb_df2k_x4

x_t = sqrt(abar_t) x0 + phi_t E + sqrt(1 - abar_t) eps with phi_t = sum_{i<=t} sqrt(beta_i abar_t / abar_i)
(derived from the one-step process; the closed form printed in the paper is wrong), the network
predicting eps + sqrt(1 - abar_t) / sqrt(beta_t) E. Everything else as diffssr_jax/configs/diffssr_df2k_x4.py.
"""
from diffssr_jax.configs import diffssr_df2k_x4


def get_config():
  c = diffssr_df2k_x4.get_config()
  c.diffusion.modulation = "paper"
  c.diffusion.loss = "l2"
  return c
