"""RRDBNet (ESRGAN's Residual-in-Residual Dense Block network): SRDiff's frozen LR encoder.

Module names mirror the PyTorch keys (`RRDB_trunk_3/RDB1/conv2` <-> `RRDB_trunk.3.RDB1.conv2`) so the
converter is a mechanical rename.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffssr_jax.models.layers import Dtype, conv3x3


def lrelu(x):
  return jax.nn.leaky_relu(x, negative_slope=0.2)


class ResidualDenseBlock(nn.Module):
  """Five densely connected 3x3 convs (growth `gc`), LeakyReLU(0.2), residual scaled by 0.2."""
  nf: int = 64
  gc: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    feats = [x]
    for i in range(1, 5):
      feats.append(lrelu(conv3x3(self.gc, f"conv{i}", self.dtype)(jnp.concatenate(feats, -1))))
    out = conv3x3(self.nf, "conv5", self.dtype)(jnp.concatenate(feats, -1))
    return out * 0.2 + x


class RRDB(nn.Module):
  nf: int = 64
  gc: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    out = x
    for i in range(1, 4):
      out = ResidualDenseBlock(self.nf, self.gc, self.dtype, name=f"RDB{i}")(out)
    return out * 0.2 + x


class RRDBNet(nn.Module):
  """LR image in [-1, 1] -> (SR image in [-1, 1], features).

  features: the `num_blocks` block outputs followed by conv_first + trunk_conv (the official code's
  `feas`, num_blocks + 1 entries); the U-Net conditions on every third one (`feas[2::3]`).
  With `decode=False` the upsampling tail is skipped and the image is None: the diffusion model only
  needs the features, so the train step and sampler do not pay for the tail unless they use it.
  """
  num_feat: int = 64
  num_blocks: int = 17
  growth: int = 32
  scale: int = 4
  out_channels: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, lr, decode: bool = True):
    if self.scale not in (2, 4, 8):
      raise ValueError(f"RRDBNet supports scales 2, 4, 8, got {self.scale}")
    x = ((lr + 1.0) / 2.0).astype(self.dtype)  # the official network works on [0, 1]
    first = conv3x3(self.num_feat, "conv_first", self.dtype)(x)
    fea, feats = first, []
    for i in range(self.num_blocks):
      fea = RRDB(self.num_feat, self.growth, self.dtype, name=f"RRDB_trunk_{i}")(fea)
      feats.append(fea)
    fea = first + conv3x3(self.num_feat, "trunk_conv", self.dtype)(fea)
    feats.append(fea)
    if not decode:
      return None, feats
    n_up = {2: 1, 4: 2, 8: 3}[self.scale]
    for i in range(1, n_up + 1):
      fea = jnp.repeat(jnp.repeat(fea, 2, axis=1), 2, axis=2)  # nearest x2
      fea = lrelu(conv3x3(self.num_feat, f"upconv{i}", self.dtype)(fea))
    fea = conv3x3(self.num_feat, "HRconv", self.dtype)(fea)
    out = conv3x3(self.out_channels, "conv_last", self.dtype)(lrelu(fea))
    out = jnp.clip(out.astype(jnp.float32), 0.0, 1.0) * 2.0 - 1.0
    return out, feats
