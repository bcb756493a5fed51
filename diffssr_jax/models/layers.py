"""Convolution building blocks with PyTorch semantics, in NHWC (the fast layout for XLA on CPU/GPU/TPU).

Kernels are stored HWIO (flax's layout); `diffssr_jax.convert` maps PyTorch OIHW / IOHW weights here.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def mish(x):
  """Mish (Misra 2019): x * tanh(softplus(x))."""
  return x * jnp.tanh(jax.nn.softplus(x))


def reflect_pad(x, pad: int = 1):
  """ReflectionPad2d on NHWC."""
  return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")


class ReflectConv(nn.Module):
  """ReflectionPad2d(1) followed by a 3x3 convolution (optionally strided): SRDiff's conv."""
  features: int
  strides: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = nn.Conv(self.features, (3, 3), strides=(self.strides, self.strides), padding="VALID",
                   dtype=self.dtype, name="conv")
    return conv(reflect_pad(x, 1))


def conv3x3(features, name=None, dtype=jnp.float32):
  """3x3 conv with zero padding 1 (PyTorch Conv2d(k=3, s=1, p=1))."""
  return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype, name=name)


def subpixel_transpose_kernel(kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """Rewrites a PyTorch ConvTranspose2d kernel as an equivalent 3x3 conv + depth-to-space.

  `kernel` is (k, k, in, out), with kernel[ky, kx, i, o] = torch_weight[i, o, ky, kx], k = 2 * stride,
  padding = stride // 2, so that the output is exactly `stride` times the input. Output pixel
  y = stride * q + r receives input q + d (d in {-1, 0, 1}) through tap ky = r + padding - stride * d.
  Returns a (3, 3, in, stride * stride * out) kernel whose output channel (ry, rx, o) is phase (ry, rx).
  Running a strided-zero-inserted ("lhs-dilated") convolution instead would multiply mostly zeros.
  """
  k = kernel.shape[0]
  s, p = stride, padding
  if k != 2 * s or k - 2 * p != s:
    raise ValueError(f"sub-pixel transpose conv needs kernel = 2*stride and padding = stride/2, "
                     f"got kernel {k}, stride {s}, padding {p}")
  # Static gather table: tap index for (j, r) with j = d + 1, or -1 where the tap does not exist.
  table = np.full((3, s), -1, dtype=np.int64)
  for j, d in enumerate((-1, 0, 1)):
    for r in range(s):
      kk = r + p - s * d
      if 0 <= kk < k:
        table[j, r] = kk
  valid = table >= 0
  idx = np.where(valid, table, 0)
  # sub[jy, ry, jx, rx, i, o] = kernel[idx[jy, ry], idx[jx, rx], i, o] masked.
  sub = kernel[idx[:, :, None, None], idx[None, None, :, :]]
  mask = (valid[:, :, None, None] & valid[None, None, :, :]).astype(kernel.dtype)
  sub = sub * mask[..., None, None]
  cin, cout = kernel.shape[2], kernel.shape[3]
  # -> (jy, jx, i, ry, rx, o) -> (3, 3, in, s*s*out)
  sub = jnp.transpose(sub, (0, 2, 4, 1, 3, 5))
  return sub.reshape(3, 3, cin, s * s * cout)


def depth_to_space(x, stride: int):
  """(B, H, W, s*s*C) with channels ordered (ry, rx, c) -> (B, H*s, W*s, C)."""
  b, h, w, c = x.shape
  cout = c // (stride * stride)
  x = x.reshape(b, h, w, stride, stride, cout)
  x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
  return x.reshape(b, h * stride, w * stride, cout)


class ConvTransposeTorch(nn.Module):
  """PyTorch ConvTranspose2d(in, out, kernel=2*stride, stride, padding=stride//2): output = stride x input.

  The parameter `kernel` keeps PyTorch's tap order, (k, k, in, out) = torch weight (in, out, k, k)
  transposed, so conversion is a transpose; the forward pass runs it as one 3x3 convolution followed
  by depth-to-space (see `subpixel_transpose_kernel`).
  """
  features: int
  stride: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = 2 * self.stride
    cin = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, cin, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    sub = subpixel_transpose_kernel(kernel, self.stride, self.stride // 2).astype(self.dtype)
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), sub, window_strides=(1, 1), padding=((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = depth_to_space(y, self.stride)
    return y + bias.astype(self.dtype)
