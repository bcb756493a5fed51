"""Stock Flax layers configured as both networks use them, with PyTorch's layer semantics.

Every layer keeps float32 params initialised like PyTorch's (`initializers.TORCH_KERNEL_INIT`) and
computes in the `dtype` it is given (bfloat16 on accelerators). PyTorch's `ReflectionPad2d(1) + Conv2d(k=3)`
is `nn.Conv(padding="REFLECT")` (flax reflects (1, 1) for a 3x3 kernel at any stride) and
`ConvTranspose2d(k, s, p)` is `nn.ConvTranspose(padding=k-1-p, transpose_kernel=True)`.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from diffssr_jax.models.initializers import TORCH_KERNEL_INIT

Conv = functools.partial(nn.Conv, param_dtype=jnp.float32, kernel_init=TORCH_KERNEL_INIT)
Dense = functools.partial(nn.Dense, param_dtype=jnp.float32, kernel_init=TORCH_KERNEL_INIT)


def conv3x3(features: int, name: str | None, dtype) -> nn.Conv:
  """PyTorch Conv2d(k=3, s=1, p=1): zero padding."""
  return Conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype, name=name)


def reflect_conv3x3(features: int, name: str | None, dtype, strides: int = 1) -> nn.Conv:
  """PyTorch ReflectionPad2d(1) + Conv2d(k=3, stride): SRDiff's conv."""
  return Conv(features, (3, 3), strides=strides, padding="REFLECT", dtype=dtype, name=name)


def conv_transpose_torch(features: int, stride: int, name: str | None, dtype) -> nn.ConvTranspose:
  """PyTorch ConvTranspose2d(in, features, kernel=2*stride, stride, padding=stride//2): output = stride x
  input. The kernel is (k, k, features, in): the torch weight (in, out, k, k) transposed (2, 3, 1, 0)."""
  k, p = 2 * stride, stride // 2
  return nn.ConvTranspose(features, (k, k), strides=(stride, stride), padding=((k - 1 - p, k - 1 - p),) * 2,
                          transpose_kernel=True, dtype=dtype, param_dtype=jnp.float32,
                          kernel_init=TORCH_KERNEL_INIT, name=name)
