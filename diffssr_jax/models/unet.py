"""SRDiff's conditional U-Net noise predictor (Li et al. 2022), as used unchanged by SAM-DiffSR.

No normalisation and no attention (the paper network: groups = 0, use_attn = False). The LR condition
is the concatenation of every third RRDB feature map, projected to the HR grid by a transposed conv
and added after the first level. Submodule names mirror the PyTorch keys for the converter.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from diffssr_jax.models.layers import ConvTransposeTorch, Dtype, ReflectConv, fast_grad_conv_hook, mish


def sinusoidal_embedding(t, dim: int):
  """SRDiff's time embedding: [sin(t w_k), cos(t w_k)], w_k = exp(-log(1e4) k / (dim/2 - 1))."""
  half = dim // 2
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - 1)))
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class Block(nn.Module):
  """Reflection-padded 3x3 conv + Mish."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return mish(ReflectConv(self.features, dtype=self.dtype, name="block")(x))


class ResnetBlock(nn.Module):
  """Block -> + Dense(Mish(t_emb)) -> Block, plus a 1x1 shortcut when the width changes."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, t_emb):
    h = Block(self.features, self.dtype, name="block1")(x)
    h = h + nn.Dense(self.features, dtype=self.dtype, name="mlp")(mish(t_emb))[:, None, None, :]
    h = Block(self.features, self.dtype, name="block2")(h)
    if x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), padding=((0, 0), (0, 0)), dtype=self.dtype,
                  conv_general_dilated=fast_grad_conv_hook, name="res_conv")(x)
    return h + x


class UNet(nn.Module):
  """eps-prediction network: (x_t, t, RRDB features) -> predicted noise, all NHWC.

  `project_cond` (time-independent) and `denoise` are separate methods so the sampler computes the
  condition projection once per image instead of once per step.
  """
  dim: int = 64
  dim_mults: Sequence[int] = (1, 2, 3, 4)
  out_channels: int = 3
  cond_dim: int = 64          # RRDB feature width
  rrdb_num_blocks: int = 17   # the condition concatenates (rrdb_num_blocks + 1) // 3 feature maps
  scale: int = 4
  dtype: Dtype = jnp.float32

  def setup(self):
    dims = [3] + [self.dim * m for m in self.dim_mults]
    in_out = list(zip(dims[:-1], dims[1:]))
    n = len(in_out)
    self.cond_proj = ConvTransposeTorch(self.dim, self.scale, dtype=self.dtype)
    self.mlp_0 = nn.Dense(self.dim * 4, dtype=self.dtype)
    self.mlp_2 = nn.Dense(self.dim, dtype=self.dtype)
    downs = []
    for i, (_, d_out) in enumerate(in_out):
      level = {"res0": ResnetBlock(d_out, self.dtype), "res1": ResnetBlock(d_out, self.dtype)}
      if i < n - 1:
        level["down"] = ReflectConv(d_out, strides=2, dtype=self.dtype)
      downs.append(level)
    self.downs = downs
    mid = dims[-1]
    self.mid_block1 = ResnetBlock(mid, self.dtype)
    self.mid_block2 = ResnetBlock(mid, self.dtype)
    # The up path consumes the three lower skips; the full-resolution skip is never used (as in SRDiff).
    self.ups = [{"res0": ResnetBlock(d_in, self.dtype), "res1": ResnetBlock(d_in, self.dtype),
                 "up": ConvTransposeTorch(d_in, 2, dtype=self.dtype)}
                for d_in, _ in reversed(in_out[1:])]
    self.final_block = Block(self.dim, self.dtype)
    self.final_conv = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype)

  def project_cond(self, feats):
    """RRDB features (list) -> condition map at the HR resolution, (B, H, W, dim)."""
    return self.cond_proj(jnp.concatenate(list(feats[2::3]), axis=-1))

  def time_embedding(self, t):
    """Sinusoidal embedding of t followed by the MLP (Linear, Mish, Linear)."""
    return self.mlp_2(mish(self.mlp_0(sinusoidal_embedding(t, self.dim).astype(self.dtype))))

  def denoise(self, x, t, cond):
    t_emb = self.time_embedding(t)
    h = x.astype(self.dtype)
    skips = []
    for i, level in enumerate(self.downs):
      h = level["res1"](level["res0"](h, t_emb), t_emb)
      if i == 0:
        h = h + cond.astype(self.dtype)
      skips.append(h)
      if "down" in level:
        h = level["down"](h)
    h = self.mid_block2(self.mid_block1(h, t_emb), t_emb)
    for level in self.ups:
      h = jnp.concatenate([h, skips.pop()], axis=-1)
      h = level["up"](level["res1"](level["res0"](h, t_emb), t_emb))
    return self.final_conv(self.final_block(h)).astype(jnp.float32)

  def __call__(self, x, t, feats):
    return self.denoise(x, t, self.project_cond(feats))
