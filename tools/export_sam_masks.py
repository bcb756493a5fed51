#!/usr/bin/env python
"""Export SAM-DiffSR training data (masks -> SPE -> aligned HR/LR/SPE TFRecord tiles): a thin script over
`diffssr_jax.data.export_cli`, which documents the flags (`--help`). Torch-only: never imports jax.

  python tools/export_sam_masks.py --images data/DF2K_train_HR --out data/df2k_sam \\
      --segmenter sam --checkpoint weights/sam_vit_h_4b8939.pth --model_type vit_h
"""
import os
import sys

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffssr_jax.data import export_cli  # noqa: E402

if __name__ == "__main__":
  sys.exit(export_cli.cli(sys.argv))
