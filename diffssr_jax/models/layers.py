"""Stock Flax layers with PyTorch's layer semantics, as both networks use them.

Params are float32 with Flax's default initialisation (see `initializers`); compute runs in the `dtype`
given (bfloat16 on accelerators). PyTorch's `ReflectionPad2d(1) + Conv2d(k=3)` is
`nn.Conv(padding="REFLECT")` (flax reflects (1, 1) for a 3x3 kernel at any stride) and
`ConvTranspose2d(k, s, p)` is `nn.ConvTranspose(padding=k-1-p, transpose_kernel=True)`.
"""
from __future__ import annotations

import flax.linen as nn


def conv3x3(features: int, name: str | None, dtype) -> nn.Conv:
  """PyTorch Conv2d(k=3, s=1, p=1): zero padding."""
  return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype, name=name)


def reflect_conv3x3(features: int, name: str | None, dtype, strides: int = 1) -> nn.Conv:
  """PyTorch ReflectionPad2d(1) + Conv2d(k=3, stride): SRDiff's conv."""
  return nn.Conv(features, (3, 3), strides=strides, padding="REFLECT", dtype=dtype, name=name)


def conv_transpose_torch(features: int, stride: int, name: str | None, dtype) -> nn.ConvTranspose:
  """PyTorch ConvTranspose2d(in, features, kernel=2*stride, stride, padding=stride//2): output = stride x
  input. The kernel is (k, k, features, in): the torch weight (in, out, k, k) transposed (2, 3, 1, 0)."""
  k, p = 2 * stride, stride // 2
  return nn.ConvTranspose(features, (k, k), strides=(stride, stride), padding=((k - 1 - p, k - 1 - p),) * 2,
                          transpose_kernel=True, dtype=dtype, name=name)
