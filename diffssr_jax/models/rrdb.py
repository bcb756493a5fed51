"""RRDBNet (ESRGAN's Residual-in-Residual Dense Block network): SRDiff's frozen LR encoder.

Stock Flax layers only. The 17 identical trunk blocks are one `nn.scan` (params stacked on a leading
axis of length `num_blocks`), so tracing, compiling and initialising the network cost the same for 2
blocks as for 17; `remat=True` recomputes each block's activations in the backward pass instead of
storing them (only matters when the encoder is trained). `unroll` is the scan's: 1 keeps one loop body
(the accelerator setting); XLA:CPU runs the convolutions of a loop's backward pass ~35x slower than
unrolled ones (0.24 vs 0.007 s for three 32-channel 3x3 convs at 16x16x16), so configs that train an RRDB
on the CPU (the demo, the tests) unroll its few blocks.

Module names mirror the PyTorch keys (`RRDB_trunk/RDB1/conv2/kernel[i]` <-> `RRDB_trunk.i.RDB1.conv2.weight`),
so the converter is a rename plus a stack (`diffssr_jax.models.convert`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffssr_jax.models.layers import conv3x3

Dtype = Any


def lrelu(x):
  return jax.nn.leaky_relu(x, negative_slope=0.2)


class ResidualDenseBlock(nn.Module):
  """Five densely connected 3x3 convs (growth `gc`), LeakyReLU(0.2), residual scaled by 0.2:
  conv_i reads concat(x, x_1, .., x_{i-1})."""
  nf: int = 64
  gc: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    feats = x
    for i in range(4):
      out = lrelu(conv3x3(self.gc, f"conv{i + 1}", self.dtype)(feats))
      feats = jnp.concatenate([feats, out], axis=-1)
    return conv3x3(self.nf, "conv5", self.dtype)(feats) * 0.2 + x


class RRDB(nn.Module):
  """Three dense blocks and a residual scaled by 0.2. Called as a scan body: (carry, _) -> (out, out),
  so the scan returns every block's output as its stacked `ys`."""
  nf: int = 64
  gc: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, _=None):
    out = x
    for i in range(1, 4):
      out = ResidualDenseBlock(self.nf, self.gc, self.dtype, name=f"RDB{i}")(out)
    out = out * 0.2 + x
    return out, out


class RRDBNet(nn.Module):
  """LR image in [-1, 1] -> (SR image in [-1, 1], features).

  features: (num_blocks + 1, B, h, w, num_feat): the block outputs followed by conv_first + trunk_conv
  (the official code's `feas`); the U-Net conditions on every third one (`feas[2::3]`). With
  `decode=False` the upsampling tail is skipped and the image is None: the diffusion model only needs
  the features.
  """
  num_feat: int = 64
  num_blocks: int = 17
  growth: int = 32
  scale: int = 4
  out_channels: int = 3
  dtype: Dtype = jnp.float32
  remat: bool = False
  unroll: int = 1

  @nn.compact
  def __call__(self, lr, decode: bool = True):
    if self.scale not in (2, 4, 8):
      raise ValueError(f"RRDBNet supports scales 2, 4, 8, got {self.scale}")
    x = ((lr + 1.0) / 2.0).astype(self.dtype)  # the official network works on [0, 1]
    first = conv3x3(self.num_feat, "conv_first", self.dtype)(x)
    block = nn.remat(RRDB) if self.remat else RRDB
    trunk = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.num_blocks,
                    unroll=self.unroll)
    fea, block_feats = trunk(self.num_feat, self.growth, self.dtype, name="RRDB_trunk")(first, None)
    fea = first + conv3x3(self.num_feat, "trunk_conv", self.dtype)(fea)
    feats = jnp.concatenate([block_feats, fea[None]], axis=0)
    if not decode:
      return None, feats
    for i in range(1, {2: 1, 4: 2, 8: 3}[self.scale] + 1):
      fea = jnp.repeat(jnp.repeat(fea, 2, axis=1), 2, axis=2)  # nearest x2
      fea = lrelu(conv3x3(self.num_feat, f"upconv{i}", self.dtype)(fea))
    fea = conv3x3(self.num_feat, "HRconv", self.dtype)(fea)
    out = conv3x3(self.out_channels, "conv_last", self.dtype)(lrelu(fea))
    out = jnp.clip(out.astype(jnp.float32), 0.0, 1.0) * 2.0 - 1.0
    return out, feats
