"""Convolution building blocks with PyTorch semantics, in NHWC (the fast layout for XLA on CPU/GPU/TPU).

Kernels are stored HWIO (flax's layout); `diffssr_jax.models.convert` maps PyTorch OIHW / IOHW weights here.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffssr_jax import native

Dtype = Any


@jax.custom_vjp
def mish(x):
  """Mish (Misra 2019): x * tanh(softplus(x)), evaluated as x * n / (n + 2) with n = e^x (e^x + 2).

  The same function (tanh(log(1 + e^x)) = ((1 + e^x)^2 - 1) / ((1 + e^x)^2 + 1)) with one exp instead
  of exp + log1p + tanh: 4-5x faster on XLA:CPU, where Mish was ~20% of a U-Net evaluation.
  Relative error vs. the textbook form < 1e-6. The exp argument is capped at 20, beyond which
  n / (n + 2) is 1 in float32, so large inputs cannot overflow to inf / inf.

  Its gradient is written out (`_mish_bwd`): only x is kept for the backward pass, which recomputes
  e^x in the same loop, instead of autodiff's several saved intermediates and passes over them.
  """
  e = jnp.exp(jnp.minimum(x, 20.0))
  n = e * (e + 2.0)
  return x * (n / (n + 2.0))


def _mish_fwd(x):
  return mish(x), x


def _mish_bwd(x, g):
  # d/dx [x n / (n + 2)] = n / (n + 2) + x * 2 n' / (n + 2)^2 with n' = 2 e (e + 1); past the cap
  # (x > 20) n / (n + 2) is 1 and its derivative 0 in float32, as with the capped exp.
  e = jnp.exp(jnp.minimum(x, 20.0))
  n = e * (e + 2.0)
  d = n + 2.0
  slope = jnp.where(x > 20.0, 0.0, 4.0 * e * (e + 1.0) / (d * d))
  return (g * (n / d + x * slope),)


mish.defvjp(_mish_fwd, _mish_bwd)


def reflect_pad(x, pad: int = 1):
  """ReflectionPad2d on NHWC."""
  return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")


_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_nhwc(x, w, strides, padding):
  """`lax.conv_general_dilated` on NHWC input / HWIO kernel (no dilation, no groups)."""
  return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC)


def _native_ok(*arrays) -> bool:
  """Whether the native CPU convolutions (`diffssr_jax.native`) can serve these operands: float32 and the
  handlers built. They are then chosen per platform (`lax.platform_dependent`): CPU only."""
  # Only when CPU is the default backend: a GPU/TPU process does not build a CPU library it won't use.
  return (all(a.dtype == jnp.float32 for a in arrays) and jax.default_backend() == "cpu"
          and native.available())


def _symmetric_pad(padding) -> int | None:
  """p when `padding` is ((p, p), (p, p)), else None."""
  (t, b), (l, r) = padding
  return t if t == b == l == r else None


def conv_forward(x, w, strides, padding):
  """`conv_nhwc` with explicit padding; on CPU the native convs (see `diffssr_jax/native`): Winograd
  F(2x2, 3x3) / F(2x2, 2x2) for 3x3 / 2x2 stride-1 convs (padding read in place), else the
  blocked-SGEMM direct conv (1.3-1.6x XLA's on the RRDB's and the U-Net's middle levels)."""
  if not _native_ok(x, w):
    return conv_nhwc(x, w, strides, padding)

  def fast(x, w):
    pad = _symmetric_pad(padding)
    if pad is not None and native.wino_ok(x, w.shape[:2], strides, pad):
      return native.wino_forward(x, w, pad=pad)
    xp = jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))
    return native.conv_forward(xp, w, strides)
  return jax.lax.platform_dependent(x, w, cpu=fast, default=lambda x, w: conv_nhwc(x, w, strides, padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_fast_grad(x, w, strides, padding):
  """`lax.conv_general_dilated` (NHWC / HWIO, explicit padding, no dilation) with a backward pass
  that stays on fast paths; used for every conv of the U-Net and the RRDB.

  With XLA's own rules (measured on XLA:CPU / YNNPACK, 2 threads):
  * the input gradient is a conv with zero padding (VALID), which YNNPACK runs 2-3x slower than
    the same conv with padding (67 vs 32 ms for 4x81x81x256 -> 64). We pad one more row/column
    and slice the result.
  * the weight gradient is a convolution whose window is the whole image, with a reversed kernel
    for these 2x2 windows, which XLA:CPU runs as a naive loop (37 s for the condition projection
    at batch 4 x 160 px, 100x the forward). Here it is one matmul per kernel tap,
    x_padded[shifted window]^T @ dy over all batch and spatial positions: on CPU the native blocked
    SGEMM (7x XLA's matmuls for 4x160x160x64 -> 64: 32 vs 240 ms), elsewhere `jnp.dot` per tap.
  On CPU the forward and the stride-1 input gradient are the native conv (`conv_forward`).
  """
  return conv_forward(x, w, strides, padding)


def _conv_fast_grad_fwd(x, w, strides, padding):
  return conv_fast_grad(x, w, strides, padding), (x, w)


def _conv_input_grad(x, w, strides, padding, dy):
  if tuple(strides) != (1, 1):  # strided: XLA's rule (an lhs-dilated conv)
    _, vjp = jax.vjp(lambda x_: conv_nhwc(x_, w, strides, padding), x)
    return vjp(dy)[0]
  kh, kw = w.shape[:2]
  flipped = lambda w: jnp.swapaxes(w[::-1, ::-1], 2, 3)   # correlation with the flipped kernel, in <-> out
  if _native_ok(dy, w):
    full = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip((kh, kw), padding))

    def fast(dy, w):
      pad = _symmetric_pad(full)
      if pad is not None and native.wino_ok(dy, (kh, kw), (1, 1), pad):   # reads w flipped: no copy
        return native.wino_forward(dy, w, pad=pad, flip=True)
      return native.conv_forward(jnp.pad(dy, ((0, 0), *full, (0, 0))), flipped(w), (1, 1))
    xla = lambda dy, w: _conv_input_grad_xla(dy, flipped(w), shape=x.shape, padding=padding)
    return jax.lax.platform_dependent(dy, w, cpu=fast, default=xla)
  return _conv_input_grad_xla(dy, flipped(w), shape=x.shape, padding=padding)


def _conv_input_grad_xla(dy, w_t, *, shape, padding):
  kh, kw = w_t.shape[:2]
  pads, crop = [], []
  for k, (lo, hi), n in zip((kh, kw), padding, shape[1:3]):
    lo_t, hi_t = k - 1 - lo, k - 1 - hi
    extra = 1 if k > 1 and lo_t <= 0 and hi_t <= 0 else 0   # avoid the slow unpadded form
    pads.append((lo_t, hi_t + extra))
    crop.append(n)
  dx = conv_nhwc(dy, w_t, (1, 1), pads)
  return dx[:, :crop[0], :crop[1]]


def _weight_grad_taps(xp, dy, kernel_hw, strides):
  """Conv weight gradient as one matmul per kernel tap, x_padded[shifted window]^T @ dy (portable)."""
  kh, kw = kernel_hw
  sy, sx = strides
  cin, cout = xp.shape[-1], dy.shape[-1]
  ho, wo = dy.shape[1], dy.shape[2]
  dyf = dy.reshape(-1, cout)
  taps = []
  for ky in range(kh):
    for kx in range(kw):
      win = jax.lax.slice(xp, (0, ky, kx, 0), (xp.shape[0], ky + sy * (ho - 1) + 1, kx + sx * (wo - 1) + 1, cin),
                          (1, sy, sx, 1))
      taps.append(jnp.dot(win.reshape(-1, cin).T, dyf, preferred_element_type=jnp.float32))
  return jnp.stack(taps).reshape(kh, kw, cin, cout)


def conv_weight_grad(x, dy, kernel_hw, strides, padding):
  """Weight gradient of the conv of `x` (explicit zero `padding`) given the output gradient `dy` (float32).

  On CPU, with float32 and the native handlers built (`diffssr_jax.native`): Winograd for 3x3 and 2x2
  stride-1 convs (padding read in place), else blocked MKL SGEMMs per tap (7x XLA:CPU's
  matmuls for 4x160x160x64 -> 64); elsewhere (GPU/TPU, bfloat16, no compiler or torch,
  DIFFSSR_NATIVE=0) `_weight_grad_taps`."""
  pads = ((0, 0), *map(tuple, padding), (0, 0))
  portable = lambda x, dy: _weight_grad_taps(jnp.pad(x, pads), dy, kernel_hw=kernel_hw, strides=strides)
  if not _native_ok(x, dy):
    return portable(x, dy)
  pad = _symmetric_pad(padding)
  if pad is not None and native.wino_ok(x, kernel_hw, strides, pad):
    fast = functools.partial(native.wino_weight_grad, pad=pad, kernel_size=kernel_hw[0])
  else:
    fast = lambda x, dy: native.conv_weight_grad(jnp.pad(x, pads), dy, kernel_hw=kernel_hw, strides=strides)
  return jax.lax.platform_dependent(x, dy, cpu=fast, default=portable)


def _conv_fast_grad_bwd(strides, padding, res, dy):
  x, w = res
  dx = _conv_input_grad(x, w, strides, padding, dy).astype(x.dtype)
  dw = conv_weight_grad(x, dy, w.shape[:2], strides, padding).astype(w.dtype)
  return dx, dw


conv_fast_grad.defvjp(_conv_fast_grad_fwd, _conv_fast_grad_bwd)


def fast_grad_conv_hook(lhs, rhs, window_strides, padding, *, lhs_dilation=None, rhs_dilation=None,
                        feature_group_count=1, **kwargs):
  """`conv_fast_grad` behind flax's `nn.Conv(conv_general_dilated=...)` hook (explicit padding only).

  Used for the U-Net's 1x1 shortcut convs, whose weight gradient (a plain matmul) XLA also writes as
  an image-sized window: 3x faster this way (measured 56 vs 155 ms for 4x80x80x256 -> 64).
  """
  del kwargs
  if (isinstance(padding, str) or feature_group_count != 1 or any(d != 1 for d in (lhs_dilation or ()))
      or any(d != 1 for d in (rhs_dilation or ()))):
    raise ValueError("fast_grad_conv_hook needs explicit padding, no dilation and no feature groups")
  return conv_fast_grad(lhs, rhs, tuple(window_strides), tuple(map(tuple, padding)))


# Below this many output pixels per call (batch x height x width) the column/row split of
# `reflect_pad1_conv` costs more in small extra ops than it saves; measured on XLA:CPU, 2 threads.
_ROW_FIX_MIN_PIXELS = 128 * 128
# Small-map convs use `conv_fast_grad` from this many input and output channels on (see `_reflect_conv_ring`).
_TAP_GRAD_MIN_CHANNELS = 96


def _reflect_conv_ring(x, w, strides):
  """Reflect pad + conv with one extra ring of zeros, outer ring of outputs dropped (small maps)."""
  h, w_ = x.shape[1], x.shape[2]
  sy, sx = strides
  pads = tuple((1, 1) if s == 1 else (0, 1) for s in (sy, sx))
  oy, ox = (1 if sy == 1 else 0), (1 if sx == 1 else 0)
  # Per-tap weight gradients pay off on wide layers (the paper U-Net's 128-256 channels: ~10% faster
  # backward); on narrow ones (the demo's 16-64) XLA's rule was ~4% faster.
  conv = conv_fast_grad if min(w.shape[2], w.shape[3]) >= _TAP_GRAD_MIN_CHANNELS else conv_nhwc
  y = conv(reflect_pad(x, 1), w, (sy, sx), pads)
  return y[:, oy:oy + (h - 1) // sy + 1, ox:ox + (w_ - 1) // sx + 1]


def _reflect_conv_row_fix(x, w, strides):
  """Columns reflect-padded, rows zero-padded by the conv itself; the border output rows then get
  the taps that fall on the reflected rows (x[1] above the top, x[H-2] below the bottom) added back.
  The conv's output is the final size, so no slice copy of a full-resolution map is made. Its weight
  gradient is `conv_fast_grad`'s one matmul per tap: with this and the row fix, a U-Net forward +
  backward at 4x160x160 measured 4.65 s against 5.82 s for the ring form with XLA's gradients."""
  sy, sx = strides
  h = x.shape[1]
  xc = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)), mode="reflect")
  no_pad = ((0, 0), (0, 0))
  if sy == 1:
    y = conv_fast_grad(xc, w, (1, sx), ((1, 1), (0, 0)))
    top = conv_nhwc(xc[:, 1:2], w[0:1], (1, sx), no_pad)
    bottom = conv_nhwc(xc[:, h - 2:h - 1], w[2:3], (1, sx), no_pad)
    return y.at[:, :1].add(top).at[:, -1:].add(bottom)
  # stride 2: output row i reads padded rows 2i-1..2i+1; only the top one reaches the reflected row
  # when H is even (the bottom window ends on row H-1); an odd H also reaches row H below.
  y = conv_fast_grad(xc, w, (2, sx), ((1, h % 2), (0, 0)))
  top = conv_nhwc(xc[:, 1:2], w[0:1], (1, sx), no_pad)
  y = y.at[:, :1].add(top)
  if h % 2:
    bottom = conv_nhwc(xc[:, h - 2:h - 1], w[2:3], (1, sx), no_pad)
    y = y.at[:, -1:].add(bottom)
  return y


def reflect_pad1_conv(lhs, rhs, window_strides, padding, *, lhs_dilation=None, rhs_dilation=None,
                      dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
  """ReflectionPad2d(1) + 3x3 conv (optionally strided), without a VALID convolution.

  Drop-in for `lax.conv_general_dilated` (flax's `nn.Conv(conv_general_dilated=...)` hook) on NHWC
  input / HWIO kernel, where `padding` ((1, 1), (1, 1)) means reflection. Why: XLA:CPU (YNNPACK)
  runs a VALID conv on the reflect-padded input 3-4x slower than a zero-padded one of the same
  size (82 vs 27 ms for 258x258x64 -> 64, 2 threads), while a conv that is VALID along one axis only
  is fast. Two exact rewrites (same products, sums in another order: differences ~1e-6):
  * large maps (`_reflect_conv_row_fix`): reflect-pad the columns, let the conv zero-pad the rows,
    add the reflected rows' taps to the two border rows (42 -> 30 ms for 256x256x64 -> 64 with bias
    and Mish; 22 -> 10 ms for the stride-2 downsampling there);
  * small maps (`_reflect_conv_ring`): one more ring of zero padding, outer ring of outputs dropped.
  On CPU with the native convs (`diffssr_jax/native`): stride 1 is one Winograd call that reads the
  reflection in place (`_reflect_conv_wino`); stride 2 the reflect pad followed by `conv_fast_grad` (the
  native direct conv has no slow VALID form).
  """
  del kwargs, dimension_numbers, precision
  simple = (lhs.ndim == 4 and rhs.shape[:2] == (3, 3) and tuple(map(tuple, padding)) == ((1, 1), (1, 1))
            and feature_group_count == 1 and not any(d != 1 for d in (lhs_dilation or ()))
            and not any(d != 1 for d in (rhs_dilation or ())) and min(lhs.shape[1:3]) >= 2)
  if not simple:
    raise ValueError("reflect_pad1_conv supports 3x3 NHWC convs with padding 1, no dilation and maps of at "
                     "least 2x2")
  strides = tuple(window_strides)
  if _native_ok(lhs, rhs):
    if native.wino_ok(lhs, (3, 3), strides, 1):   # Winograd reads the reflection in place
      native_conv = _reflect_conv_wino
    else:   # the native direct conv has no slow VALID form: pad, then conv
      native_conv = lambda x, w: conv_fast_grad(reflect_pad(x, 1), w, strides, ((0, 0), (0, 0)))
    return jax.lax.platform_dependent(lhs, rhs, cpu=native_conv,
                                      default=lambda x, w: _reflect_conv_xla(x, w, strides))
  return _reflect_conv_xla(lhs, rhs, strides)


@jax.custom_vjp
def _reflect_conv_wino(x, w):
  """ReflectionPad2d(1) + 3x3 stride-1 conv as one native Winograd call that reads the reflected border
  in place (CPU only; no padded copy of the input in the forward or kept for the backward)."""
  return native.wino_forward(x, w, pad=1, reflect=True).astype(x.dtype)


def _reflect_conv_wino_fwd(x, w):
  return _reflect_conv_wino(x, w), (x, w)


def _reflect_conv_wino_bwd(res, dy):
  x, w = res
  # Gradient w.r.t. the padded input (a "full" conv with the flipped kernel), folded back through the
  # reflection by the pad's own transpose.
  dxp = native.wino_forward(dy, w, pad=2, flip=True)
  _, unpad = jax.vjp(lambda v: reflect_pad(v, 1), x)
  dw = native.wino_weight_grad(x, dy, pad=1, reflect=True)
  return unpad(dxp.astype(x.dtype))[0], dw.astype(w.dtype)


_reflect_conv_wino.defvjp(_reflect_conv_wino_fwd, _reflect_conv_wino_bwd)


def _reflect_conv_xla(x, w, strides):
  out_pixels = x.shape[0] * -(-x.shape[1] // strides[0]) * -(-x.shape[2] // strides[1])
  if out_pixels >= _ROW_FIX_MIN_PIXELS:
    return _reflect_conv_row_fix(x, w, strides)
  return _reflect_conv_ring(x, w, strides)


class ReflectConv(nn.Module):
  """ReflectionPad2d(1) followed by a 3x3 convolution (optionally strided): SRDiff's conv.

  Params are those of `nn.Conv` named "conv" (the converter's layout); the conv itself is
  `reflect_pad1_conv` (see there for why not `jnp.pad` + a VALID conv).
  """
  features: int
  strides: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = nn.Conv(self.features, (3, 3), strides=(self.strides, self.strides), padding=((1, 1), (1, 1)),
                   dtype=self.dtype, conv_general_dilated=reflect_pad1_conv, name="conv")
    return conv(x)


def conv3x3(features, name=None, dtype=jnp.float32):
  """3x3 conv with zero padding 1 (PyTorch Conv2d(k=3, s=1, p=1)), through `conv_fast_grad`."""
  return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype, name=name,
                 conv_general_dilated=fast_grad_conv_hook)


def phase_transpose_kernel(kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """Rewrites a PyTorch ConvTranspose2d kernel as one 2x2 conv producing every output phase.

  `kernel` is (k, k, in, out), with kernel[ky, kx, i, o] = torch_weight[i, o, ky, kx], k = 2 * stride,
  padding = stride // 2 (stride even), so that the output is exactly `stride` times the input. Output
  pixel y = stride * q + r receives input q + d through tap ky = r + padding - stride * d; each phase r
  uses two consecutive inputs: d in {-1, 0} for the "low" phases r < stride / 2, d in {0, 1} for the
  "high" ones. A 2x2 window over the input zero-padded by 1 covers inputs (q - 1 + j), j in {0, 1}, at
  window position q, so low phases read window q and high phases window q + 1 (see
  `ConvTransposeTorch`). Returns (2, 2, in, s * s * out), output channel (ry, rx, o) = phase (ry, rx).

  This is the exact multiply count of the transposed conv (k * k taps per input pixel); the earlier
  3x3 sub-pixel form did 2.25x that (and ran 2-2.5x slower on XLA:CPU, e.g. 256 vs 116 ms for the
  condition projection 64x64x384 -> 256x256x64), a zero-inserted ("lhs-dilated") conv 4x.
  """
  k = kernel.shape[0]
  s, p = stride, padding
  if k != 2 * s or k - 2 * p != s or s % 2:
    raise ValueError(f"phase transpose conv needs kernel = 2*stride, padding = stride/2 and an even stride, "
                     f"got kernel {k}, stride {s}, padding {p}")
  # table[j, r]: the tap of window row j for phase r (static).
  table = np.array([[r + p - s * (d + (0 if r < s // 2 else 1)) for r in range(s)] for d in (-1, 0)])
  assert ((table >= 0) & (table < k)).all()
  # sub[jy, ry, jx, rx, i, o] = kernel[table[jy, ry], table[jx, rx], i, o]
  sub = kernel[table[:, :, None, None], table[None, None, :, :]]
  cin, cout = kernel.shape[2], kernel.shape[3]
  # -> (jy, jx, i, ry, rx, o) -> (2, 2, in, s*s*out)
  sub = jnp.transpose(sub, (0, 2, 4, 1, 3, 5))
  return sub.reshape(2, 2, cin, s * s * cout)


def assemble_phases(y, stride: int):
  """(B, H+1, W+1, s*s*C) phase maps from `phase_transpose_kernel`'s conv -> (B, H*s, W*s, C).

  Low phases come from window rows/cols [0, H), high ones from [1, H+1). Written as four slices stacked
  and one transpose so that XLA emits a single copy fusion (two concatenations + a transpose measured
  up to 2x slower on CPU).
  """
  b, h1, w1, c = y.shape
  h, w, s = h1 - 1, w1 - 1, stride
  half, cout = s // 2, c // (s * s)
  y = y.reshape(b, h1, w1, 2, half, 2, half, cout)                 # (.., gy, ry', gx, rx', c)
  parts = jnp.stack([jnp.stack([y[:, gy:gy + h, gx:gx + w, gy, :, gx] for gx in (0, 1)]) for gy in (0, 1)])
  parts = jnp.transpose(parts, (2, 3, 0, 5, 4, 1, 6, 7))          # (b, h, gy, ry', w, gx, rx', c)
  return parts.reshape(b, h * s, w * s, cout)


class ConvTransposeTorch(nn.Module):
  """PyTorch ConvTranspose2d(in, out, kernel=2*stride, stride, padding=stride//2): output = stride x input.

  The parameter `kernel` keeps PyTorch's tap order, (k, k, in, out) = torch weight (in, out, k, k)
  transposed, so conversion is a transpose; the forward pass runs it as one zero-padded 2x2 conv that
  yields all stride^2 output phases, then interleaves them (`phase_transpose_kernel`,
  `assemble_phases`).
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
    sub = phase_transpose_kernel(kernel, self.stride, self.stride // 2).astype(self.dtype)
    y = conv_fast_grad(x.astype(self.dtype), sub, (1, 1), ((1, 1), (1, 1)))
    return assemble_phases(y, self.stride) + bias.astype(self.dtype)
