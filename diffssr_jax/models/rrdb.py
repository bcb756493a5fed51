"""RRDBNet (ESRGAN's Residual-in-Residual Dense Block network): SRDiff's frozen LR encoder.

Module names mirror the PyTorch keys (`RRDB_trunk_3/RDB1/conv2` <-> `RRDB_trunk.3.RDB1.conv2`) so the
converter is a mechanical rename.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffssr_jax.models.layers import Dtype, conv3x3, conv_fast_grad


def lrelu(x):
  return jax.nn.leaky_relu(x, negative_slope=0.2)


class _ConvWeights(nn.Module):
  """The params of a 3x3 conv (`kernel` HWIO, `bias`), laid out as `nn.Conv`'s, without applying it."""
  features: int

  @nn.compact
  def __call__(self, in_features: int):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, in_features, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return kernel, bias


class ResidualDenseBlock(nn.Module):
  """Five densely connected 3x3 convs (growth `gc`), LeakyReLU(0.2), residual scaled by 0.2.

  conv_i reads concat(x, x_1, .., x_{i-1}). Evaluated "push" style: as soon as a feature map exists,
  one conv computes its contribution to every later conv (x: 64 -> 4*32 + 64 channels, x_1: 32 -> 160,
  ...), and conv_i's output is the sum of those parts. Same products (sums in another order), but
  five convs with wide outputs instead of narrow 32-channel ones: 1.3x faster on XLA:CPU (81 vs 107 ms
  for three blocks at 4x40x40), and the RRDB forward is a third of a training step.
  """
  nf: int = 64
  gc: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    nf, gc = self.nf, self.gc
    outs = [gc] * 4 + [nf]
    weights = [_ConvWeights(c, name=f"conv{i + 1}")(nf + i * gc) for i, c in enumerate(outs)]

    def part(i, j):   # rows of conv_i's kernel that read input j (0: x, j >= 1: x_j)
      lo = 0 if j == 0 else nf + (j - 1) * gc
      return weights[i][0][:, :, lo:lo + (nf if j == 0 else gc)]

    acc = [b.astype(self.dtype) for _, b in weights]
    cur = x
    for j in range(5):
      kernel = jnp.concatenate([part(i, j) for i in range(j, 5)], axis=-1).astype(self.dtype)
      pushed = conv_fast_grad(cur, kernel, (1, 1), ((1, 1), (1, 1)))
      start = 0
      for i in range(j, 5):
        acc[i] = acc[i] + pushed[..., start:start + outs[i]]
        start += outs[i]
      if j < 4:
        cur = lrelu(acc[j])
    return acc[4] * 0.2 + x


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
