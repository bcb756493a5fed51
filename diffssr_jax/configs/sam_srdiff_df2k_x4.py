"""SAM+SRDiff x4 on DF2K: the paper's Table 7 baseline, SRDiff given the SAM masks as an input.

  python -m diffssr_jax.main --config sam_srdiff_df2k_x4 --workdir runs/sam_srdiff_df2k_x4 \
      --config.data.train_files=data/df2k_x4 --config.train.rrdb_checkpoint=runs/rrdb_df2k_x4

What it is: the official code's `sam_config.cond_sam: true` (lose4578/SAM-DiffSR `models_sr/diffsr_modules.py`:
the one-channel SPE map joins the projected LR condition through three 1x1 convs, see models/unet.py) with
`p_losses_sam: false`, i.e. no noise modulation ("none", as the SRDiff baseline); the official repository
ships no yaml for it, so everything else is the SAM-DiffSR setting (diffssr_jax/configs/diffssr_df2k_x4.py:
same shards, U-Net, RRDB, schedule, optimiser and data options), so the three rows of Table 7 differ only in
how the masks are used. Unlike SAM-DiffSR it needs masks at test time: `diffssr-evaluate --spe_masks` (from
`tools/export_sam_masks.py --keep_masks` on the test images). No validation during training (eval.hr_dir
stays empty: validation images have no masks); evaluate the saved checkpoints instead.
"""
from diffssr_jax.configs import diffssr_df2k_x4


def get_config():
  c = diffssr_df2k_x4.get_config()
  c.model.cond_sam = True
  c.diffusion.modulation = "none"
  return c
