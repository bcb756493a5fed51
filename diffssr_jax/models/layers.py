"""Stock Flax layers with PyTorch's layer semantics, as both networks use them.

Params are float32 with Flax's default initialisation (see `initializers`); compute runs in the `dtype`
given (bfloat16 on accelerators). PyTorch's `ReflectionPad2d(1) + Conv2d(k=3)` is `ReflectPadConv`
(stock `nn.Conv` on an explicitly reflection-padded input that XLA keeps as one array, see there why; the
same params and values as `nn.Conv(padding="REFLECT")`) and
`ConvTranspose2d(2s, s, s/2)` is `SubpixelConvTranspose` (same params as
`nn.ConvTranspose(padding=k-1-p, transpose_kernel=True)`, computed as one 2x2 conv + a depth-to-space
without a transpose, `interleave_phases`).
`mish` is `jax.nn.mish` under `jax.checkpoint`: its backward pass keeps only its input (see there why).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


# Mish (Misra 2019) as `jax.nn.mish` recomputed in the backward pass (`jax.checkpoint`: only the input is saved).
# Why: jax.nn.mish's autodiff saves x, tanh(softplus(x)) and softplus's sigmoid, three activation-sized arrays
# per Mish where one suffices (at b64 x 160^2 in bf16 each is 200 MiB; the U-Net's bf16 train step held 3.9 GiB
# of them at its peak: 9.17 -> 5.29 GiB temp on an H200 target). The recomputation is elementwise and fuses
# into the backward's own elementwise pass.
mish = jax.checkpoint(jax.nn.mish)


def conv3x3(features: int, name: str | None, dtype) -> nn.Conv:
  """PyTorch Conv2d(k=3, s=1, p=1): zero padding."""
  return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype, name=name)


class ReflectPadConv(nn.Conv):
  """`nn.Conv(padding="REFLECT")` for a 3x3 kernel (PyTorch's ReflectionPad2d(1) + Conv2d), with the padded
  input kept as one array: the pad (1, 1) that flax applies, then an optimisation barrier, then the VALID conv.

  Why: a reflection pad is slices, reversals and concatenations, and libtpu (TPU) fuses them, with the skip
  connection's concatenation and the Mish before them, into each consumer: the forward conv and the weight
  gradient's conv, which then builds its padded operand inside the conv kernel. libtpu's compile of such
  a weight-gradient conv is far slower (one 192 -> 128 channel weight gradient at b16 x 40^2: 30-33 s on one
  core, against 1.0 s with the padded input as an argument), and some need retries after running out of
  scoped VMEM. With the barrier both convs read the one padded array: the v5e train step at b16 x 160^2
  compiles in 90 s instead of 205 s on 2 cores (README "TPU v5e target"), for 10.7% more bytes written per
  step (the padded activations, 1.9 GiB at b16) and 0.26 GiB more temp. The GPU program is unchanged (XLA
  already materialises the padded input of a cuDNN conv), and so are the params and every value.
  """
  padding: Any = "VALID"

  def __call__(self, inputs):
    if self.padding != "VALID" or tuple(np.broadcast_to(self.kernel_size, 2)) != (3, 3):
      raise ValueError(f"ReflectPadConv pads (1, 1) for a 3x3 kernel itself; got kernel_size={self.kernel_size}, "
                       f"padding={self.padding!r}")
    padded = jnp.pad(inputs, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    return super().__call__(jax.lax.optimization_barrier(padded))


def reflect_conv3x3(features: int, name: str | None, dtype, strides: int = 1) -> ReflectPadConv:
  """PyTorch ReflectionPad2d(1) + Conv2d(k=3, stride): SRDiff's conv."""
  return ReflectPadConv(features, (3, 3), strides=strides, dtype=dtype, name=name)


def subpixel_taps(stride: int) -> np.ndarray:
  """For each 2x2 window tap a in {0, 1} and block offset j in [0, s): the transposed-conv kernel index
  s * (1 - a) + j that `SubpixelConvTranspose` reads (shape (2, s)).

  ConvTranspose2d(k=2s, s, p=s/2) computes y[o] = sum_i x[i] w[o - s i + p] over 0 <= o - s i + p < 2s, so
  every output reads exactly two adjacent inputs. Output o = s m + s/2 + j (j in [0, s)) reads inputs m
  (tap a = 0) and m + 1 (a = 1) with kernel index o - s (m + a) + s/2 = s (1 - a) + j."""
  return stride * (1 - np.arange(2))[:, None] + np.arange(stride)[None, :]


def subpixel_kernel(kernel: jax.Array, stride: int) -> jax.Array:
  """The (k, k, out, in) transposed-conv kernel as the (2, 2, in, s*s*out) kernel of its sub-pixel conv
  (output channels ordered (row offset, column offset, out)): a gather of the weights, no arithmetic."""
  idx = subpixel_taps(stride)
  # [a, jh, b, jw, out, in] = kernel[idx[a, jh], idx[b, jw], out, in]
  k = kernel[idx[:, :, None, None], idx[None, None, :, :]]
  out, cin = kernel.shape[2], kernel.shape[3]
  return k.transpose(0, 2, 5, 1, 3, 4).reshape(2, 2, cin, stride * stride * out)


def interleave_phases(y: jax.Array, stride: int) -> jax.Array:
  """The sub-pixel conv's output (b, h+1, w+1, s*s*f) (window k, row offset i, column offset j, channel) as the
  transposed conv's (b, s h, s w, f): depth-to-space and the crop of s/2 pixels per side, without a transpose.

  Window k (k = m + 1 of `subpixel_taps`) at offset i holds full-size row R = s k + i; the crop keeps R in
  [s/2, s/2 + s h), so output row s q + i' is window q + (i' >= s/2) at offset (i' + s/2) % s (the same for
  columns). Columns: the channels (j, f) are contiguous, so a reshape interleaves them (free) and a slice
  crops. Rows: each offset's rows are put in place by `lax.pad` with interior padding s - 1 and summed.
  Why not `reshape(b, h+1, w+1, s, s, f).transpose(0, 1, 3, 2, 4, 5)`: the same data movement, but XLA keeps
  that a transpose (fused into the consumer forward; a standalone transpose fusion over each output gradient
  backward: 281 MiB of transposes per bf16 train step at b16 x 160^2, H200 target). In this form XLA makes
  the same fusions with no transpose in them (the backward's pads become strided slices, one loop fusion
  per layer writing the conv's output gradient); the bytes the step writes are unchanged (measured).
  """
  s, (b, hp, wp, c) = stride, y.shape
  h, w, f = hp - 1, wp - 1, c // (stride * stride)
  zero = jnp.zeros((), y.dtype)
  out = None
  for i in range(s):
    src, k = (i + s // 2) % s, int(i >= s // 2)
    rows = y[:, k:k + h, :, src * s * f:(src + 1) * s * f].reshape(b, h, wp * s, f)[:, :, s // 2: s // 2 + w * s]
    rows = jax.lax.pad(rows, zero, ((0, 0, 0), (i, s - 1 - i, s - 1), (0, 0, 0), (0, 0, 0)))
    out = rows if out is None else out + rows  # disjoint rows: each output element is one phase's value
  return out


class SubpixelConvTranspose(nn.Module):
  """PyTorch's ConvTranspose2d(in, features, kernel=2s, stride=s, padding=s/2) (output = s x input), with
  `nn.ConvTranspose(transpose_kernel=True)`'s params (kernel (2s, 2s, features, in) = the torch weight
  transposed (2, 3, 1, 0), bias (features,)), computed in its sub-pixel form: one stride-1 2x2 conv of the
  zero-padded input to s*s*features channels, then depth-to-space and a crop of s/2 pixels per side
  (`interleave_phases`: no transpose).

  Why not `nn.ConvTranspose` itself: its lhs-dilated conv has a weight gradient that XLA lowers (on GPU
  and TPU) to a forward conv whose window is the whole dilated activation (40x40 to 80x80 windows with
  rhs_dilation s, fed by reversed and transposed copies of the activations): a slow path of cuDNN and XLA.
  Here forward, input gradient and weight gradient are all plain stride-1 convs with the same FLOPs
  (4 taps per output, as the transposed conv), and the depth-to-space is no transpose.
  """
  features: int
  stride: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x):
    s, f = self.stride, self.features
    if s % 2:
      raise ValueError(f"SubpixelConvTranspose needs an even stride (kernel 2s, padding s/2), got {s}")
    kernel = self.param("kernel", self.kernel_init, (2 * s, 2 * s, f, x.shape[-1]), self.param_dtype)
    bias = self.param("bias", self.bias_init, (f,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    # The input is zero-padded explicitly, behind an optimisation barrier, and the conv is VALID. With the
    # padding inside the conv, the weight gradient's "kernel" (the output gradient, h+1 wide) is larger than
    # its input (h wide), XLA swaps the two operands (a window reversal) and its GPU conv rewriter can no
    # longer map it to a cuDNN backward-filter conv: it ran as a forward conv with an 80x80 (40x40, 20x20)
    # window fed by NHWC->CHWN transposes. The barrier stops XLA folding the pad back into the conv.
    x = jax.lax.optimization_barrier(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))))
    y = jax.lax.conv_general_dilated(x, subpixel_kernel(kernel, s), (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return interleave_phases(y, s) + bias


def conv_transpose_torch(features: int, stride: int, name: str | None, dtype) -> SubpixelConvTranspose:
  """PyTorch ConvTranspose2d(in, features, kernel=2*stride, stride, padding=stride//2): output = stride x
  input (see `SubpixelConvTranspose`)."""
  return SubpixelConvTranspose(features, stride, dtype=dtype, name=name)
