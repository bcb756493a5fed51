"""SAM-DiffSR x2 on DF2K (our extension: the paper reports x4 only).

  python tools/export_sam_masks.py --images DF2K_HR/ --out data/df2k_x2 --scale 2 --segmenter sam \
      --checkpoint sam_vit_h_4b8939.pth
  python -m diffssr_jax.main --config rrdb_df2k_x2 --workdir runs/rrdb_df2k_x2 \
      --config.data.train_files=data/df2k_x2
  python -m diffssr_jax.main --config diffssr_df2k_x2 --workdir runs/diffssr_df2k_x2 \
      --config.data.train_files=data/df2k_x2 --config.train.rrdb_checkpoint=runs/rrdb_df2k_x2

x2: the RRDB has one nearest-upsample stage and the U-Net's condition projection is a stride-2
transposed conv (kernel 4, padding 1), following the official code's sr_scale-dependent layers.
The HR patch stays 160 (LR 80).
"""
from diffssr_jax.configs import diffssr_df2k_x4


def get_config():
  c = diffssr_df2k_x4.get_config()
  c.model.scale = 2
  return c
