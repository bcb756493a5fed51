"""SRDiff's conditional U-Net noise predictor (Li et al. 2022), as used unchanged by SAM-DiffSR.

No normalisation and no attention (the paper network: groups = 0, use_attn = False). The LR condition
is the concatenation of every third RRDB feature map, projected to the HR grid by a transposed conv
and added after the first level. Stock Flax layers (`models.layers`): float32 params, compute in
`dtype`, float32 output. Submodule names mirror the PyTorch keys for the converter.

`cond_sam` (off by default) is the paper's Table 7 "SAM+SRDiff" baseline, the SAM masks given to the network
as an input: the official `Unet` with `sam_config.cond_sam: true` (lose4578/SAM-DiffSR
`models_sr/diffsr_modules.py`) concatenates the one-channel SPE map E at the HR size to the projected LR
condition and maps the dim + 1 channels back to dim with three 1x1 convs (`sam_conv.0-2`, biases, no
activation between them) before the condition is added after the first level. We follow that code rather
than widening the first conv of x_t (the other reading of "masks concatenated to the U-Net input"): it is
what the authors ran, its weights convert one to one, and E stays time-independent, so the sampler still
computes the condition once per image.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from diffssr_jax.models.layers import conv_transpose_torch, mish, reflect_conv3x3

Dtype = Any


def sinusoidal_embedding(t, dim: int):
  """SRDiff's time embedding: [sin(t w_k), cos(t w_k)], w_k = exp(-log(1e4) k / (dim/2 - 1))."""
  half = dim // 2
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - 1)))
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class ResnetBlock(nn.Module):
  """Mish(conv) -> + Dense(Mish(t_emb)) -> Mish(conv), plus a 1x1 shortcut when the width changes."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, t_emb):
    h = mish(reflect_conv3x3(self.features, "block1", self.dtype)(x))
    h = h + nn.Dense(self.features, dtype=self.dtype, name="mlp")(mish(t_emb))[:, None, None]
    h = mish(reflect_conv3x3(self.features, "block2", self.dtype)(h))
    if x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), dtype=self.dtype, name="res_conv")(x)
    return h + x


class UNet(nn.Module):
  """eps-prediction network: (x_t, t, RRDB features) -> predicted noise, all NHWC.

  `project_cond` (time-independent) and `denoise` are separate methods so the sampler computes the
  condition projection once per image instead of once per step. `remat` recomputes each ResnetBlock's
  activations in the backward pass (less memory, ~1/3 more compute).
  """
  dim: int = 64
  dim_mults: Sequence[int] = (1, 2, 3, 4)
  out_channels: int = 3
  scale: int = 4
  dtype: Dtype = jnp.float32
  remat: bool = False
  cond_sam: bool = False     # E (B, H, W, 1) joins the condition through `sam_conv_0-2` (see the module doc)

  def setup(self):
    dims = [3] + [self.dim * m for m in self.dim_mults]
    in_out = list(zip(dims[:-1], dims[1:]))
    res = nn.remat(ResnetBlock) if self.remat else ResnetBlock
    self.cond_proj = conv_transpose_torch(self.dim, self.scale, "cond_proj", self.dtype)
    if self.cond_sam:
      self.sam_convs = [nn.Conv(self.dim, (1, 1), dtype=self.dtype, name=f"sam_conv_{i}") for i in range(3)]
    self.mlp_0 = nn.Dense(self.dim * 4, dtype=self.dtype)
    self.mlp_2 = nn.Dense(self.dim, dtype=self.dtype)
    downs = []
    for i, (_, d_out) in enumerate(in_out):
      level = {"res0": res(d_out, self.dtype), "res1": res(d_out, self.dtype)}
      if i < len(in_out) - 1:
        level["down"] = reflect_conv3x3(d_out, None, self.dtype, strides=2)
      downs.append(level)
    self.downs = downs
    self.mid_block1 = res(dims[-1], self.dtype)
    self.mid_block2 = res(dims[-1], self.dtype)
    # The up path consumes the three lower skips; the full-resolution skip is never used (as in SRDiff).
    self.ups = [{"res0": res(d_in, self.dtype), "res1": res(d_in, self.dtype),
                 "up": conv_transpose_torch(d_in, 2, None, self.dtype)}
                for d_in, _ in reversed(in_out[1:])]
    self.final_block = reflect_conv3x3(self.dim, None, self.dtype)
    self.final_conv = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype)

  @property
  def size_multiple(self) -> int:
    """HR height and width must be multiples of this: one 2x downsampling per level but the last."""
    return 2 ** (len(self.dim_mults) - 1)

  def project_cond(self, feats, spe=None):
    """RRDB features ((N, B, h, w, C) array or list of N maps) -> condition map at the HR resolution; with
    `cond_sam`, the SPE map `spe` (B, H, W, 1) at that resolution joins it (official `sam_conv`)."""
    cond = self.cond_proj(jnp.concatenate(list(feats[2::3]), axis=-1).astype(self.dtype))
    if not self.cond_sam:
      if spe is not None:
        raise ValueError("this U-Net takes no SPE map (model.cond_sam is off)")
      return cond
    if spe is None:
      raise ValueError("a cond_sam U-Net needs the SPE map E (B, H, W, 1) of its images")
    if spe.shape[:3] != cond.shape[:3] or spe.shape[3] != 1:
      raise ValueError(f"the SPE map has shape {spe.shape}, expected {cond.shape[:3] + (1,)} (one channel at the "
                       "HR size)")
    h = jnp.concatenate([cond, spe.astype(self.dtype)], axis=-1)
    for conv in self.sam_convs:
      h = conv(h)
    return h

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
    return self.final_conv(mish(self.final_block(h))).astype(jnp.float32)

  def __call__(self, x, t, feats, spe=None):
    return self.denoise(x, t, self.project_cond(feats, spe))
