"""The native CPU convolutions (`diffssr_jax.native`): build, fallback, and equality with XLA's convs.

The models use them through `layers.conv_fast_grad` / `reflect_pad1_conv` on CPU, so every model and
training test also runs on them; these tests pin the kernels themselves, including the block / thread
split of large problems and strided (phase-split) inputs.
"""
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffssr_jax import native
from diffssr_jax.models import layers

_NHWC = ("NHWC", "HWIO", "NHWC")


def _prerequisites() -> bool:
  return (native.blas_library() is not None and native._compiler() is not None
          and os.environ.get("DIFFSSR_NATIVE", "1") != "0")


needs_native = pytest.mark.skipif(not (_prerequisites() and native.available()),
                                  reason=f"native convs unavailable: {native.unavailable_reason()}")


def test_native_builds_where_it_can():
  """With a C++ compiler and torch installed (as on CI), the handlers must build and load: a silent
  fallback would leave training on CPU 1.5-2x slower."""
  if not _prerequisites():
    pytest.skip("no compiler or torch here")
  assert native.available(), native.unavailable_reason()


# (batch, height, width, in channels, out channels, kernel, stride); the last two span several blocks
# of rows (the block / helper-thread split and the per-thread accumulators).
CASES = [(2, 9, 7, 5, 6, 3, 1), (2, 10, 9, 5, 6, 3, 2), (1, 9, 8, 3, 5, 3, 2), (1, 8, 8, 4, 3, 2, 1),
         (3, 7, 8, 4, 3, 1, 1), (2, 11, 11, 3, 4, 3, 2), (1, 6, 9, 2, 3, 2, 2),
         (3, 50, 46, 64, 64, 3, 1), (2, 61, 47, 32, 96, 3, 2)]


def _xla_reference(xp, kernel, stride, rng):
  """XLA's VALID conv of the padded input, a random output gradient and XLA's weight gradient for it."""
  plain = lambda x, wt: jax.lax.conv_general_dilated(x, wt, (stride, stride), "VALID", dimension_numbers=_NHWC,
                                                     precision="highest")
  ref, vjp = jax.vjp(plain, xp, kernel)
  dy = jnp.asarray(rng.normal(size=ref.shape), jnp.float32)
  return ref, dy, vjp(dy)[1]


def _assert_conv_close(out, ref, dw, ref_dw):
  assert out.shape == ref.shape and dw.shape == ref_dw.shape
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
  scale = float(jnp.abs(ref_dw).max())
  np.testing.assert_allclose(np.asarray(dw), np.asarray(ref_dw), rtol=1e-5, atol=1e-5 * scale)


@needs_native
@pytest.mark.parametrize("case", CASES)
def test_forward_and_weight_gradient_equal_xla(case):
  b, h, w, cin, cout, k, s = case
  rng = np.random.default_rng(sum(case))
  xp = jnp.asarray(rng.normal(size=(b, h, w, cin)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, k, cin, cout)) / np.sqrt(k * k * cin), jnp.float32)
  ref, dy, ref_dw = _xla_reference(xp, kernel, s, rng)
  out = jax.jit(lambda x, wt: native.conv_forward(x, wt, (s, s)))(xp, kernel)
  dw = jax.jit(lambda x, g: native.conv_weight_grad(x, g, (k, k), (s, s)))(xp, dy)
  _assert_conv_close(out, ref, dw, ref_dw)


@needs_native
def test_models_use_the_native_kernels_on_cpu():
  """The gradient of a reflect conv lowers to the native forward and weight-gradient calls on CPU."""
  x = jnp.ones((1, 6, 6, 4), jnp.float32)
  w = jnp.ones((3, 3, 4, 4), jnp.float32)
  loss = lambda x, w: jnp.sum(layers.reflect_pad1_conv(x, w, (1, 1), ((1, 1), (1, 1))) ** 2)
  hlo = jax.jit(jax.grad(loss, (0, 1))).lower(x, w).as_text()
  assert native.FORWARD_TARGET in hlo and native.WEIGHT_GRAD_TARGET in hlo


@needs_native
def test_inconsistent_shapes_are_a_clear_error():
  xs = jnp.zeros((1, 1, 6, 6, 3), jnp.float32)   # phase-split input for stride 1
  grid = jax.ShapeDtypeStruct((1, 6, 6, 4), jnp.float32)
  call = jax.ffi.ffi_call(native.FORWARD_TARGET, grid)
  with pytest.raises(Exception, match="inconsistent shapes"):
    jax.block_until_ready(call(xs, jnp.zeros((3, 3, 3, 4), jnp.float32), sy=1, sx=1, ho=6, wo=6))  # ho too big


def test_disabled_by_environment():
  code = "from diffssr_jax import native; print(native.available(), '|', native.unavailable_reason())"
  env = {**os.environ, "DIFFSSR_NATIVE": "0"}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  available, reason = out.stdout.strip().split("|")
  assert available.strip() == "False" and "DIFFSSR_NATIVE" in reason


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
  """A compiler error is reported with the source file, and no partial library is left in the cache."""
  if shutil.which("false") is None:
    pytest.skip("no `false` command")
  monkeypatch.setenv("CXX", shutil.which("false"))
  with pytest.raises(RuntimeError, match="conv_sgemm.cc"):
    native.build(str(tmp_path))
  assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not _prerequisites(), reason="no compiler or torch here")
def test_build_is_cached(tmp_path):
  first = native.build(str(tmp_path))
  mtime = os.path.getmtime(first)
  assert native.build(str(tmp_path)) == first and os.path.getmtime(first) == mtime
  assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(first)]



@needs_native
def test_vmapped_forward_equals_batched():
  """Inference vmaps the model over images; the FFI call then runs per mapped element."""
  rng = np.random.default_rng(3)
  xp = jnp.asarray(rng.normal(size=(3, 2, 8, 9, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 4, 5)), jnp.float32)
  mapped = jax.jit(jax.vmap(lambda x: native.conv_forward(x, w, (1, 1))))(xp)
  whole = native.conv_forward(xp.reshape(6, 8, 9, 4), w, (1, 1)).reshape(mapped.shape)
  np.testing.assert_allclose(np.asarray(mapped), np.asarray(whole), rtol=1e-6, atol=1e-6)


# Winograd handlers: (batch, height, width, in, out, kernel, padding, reflect). The padding is read in
# place (zeros, or the reflection for padding 1); odd output sizes give ragged edge tiles; the larger
# cases span several blocks of tiles with a partial last block and the helper thread's own accumulator.
WINO_CASES = [(1, 4, 4, 8, 3, 3, 0, False), (2, 8, 10, 8, 5, 3, 1, False), (2, 6, 8, 16, 4, 3, 2, False),
              (2, 8, 10, 8, 5, 3, 1, True), (1, 2, 4, 8, 8, 3, 1, True), (2, 7, 9, 8, 6, 3, 1, True),
              (1, 5, 6, 8, 3, 3, 0, False), (2, 9, 7, 12, 5, 3, 2, False), (3, 20, 16, 64, 192, 3, 1, False),
              (4, 40, 40, 64, 64, 3, 1, True), (2, 80, 80, 32, 160, 3, 1, False),
              (2, 6, 8, 8, 12, 2, 1, False), (2, 7, 5, 8, 12, 2, 0, False), (1, 1, 1, 8, 4, 2, 1, False),
              (2, 20, 20, 96, 256, 2, 1, False)]


def _padded(x, pad, reflect):
  return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect" if reflect else "constant")


@needs_native
@pytest.mark.parametrize("case", WINO_CASES)
def test_winograd_forward_and_weight_gradient_equal_xla(case):
  b, h, w, cin, cout, k, pad, reflect = case
  rng = np.random.default_rng(sum(map(int, case)))
  x = jnp.asarray(rng.normal(size=(b, h, w, cin)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, k, cin, cout)) / np.sqrt(k * k * cin), jnp.float32)
  ref, dy, ref_dw = _xla_reference(_padded(x, pad, reflect), kernel, 1, rng)
  assert native.wino_ok(x, (k, k), (1, 1), pad)
  out = jax.jit(lambda x, g: native.wino_forward(x, g, pad=pad, reflect=reflect))(x, kernel)
  dw = jax.jit(lambda x, g: native.wino_weight_grad(x, g, pad=pad, reflect=reflect, kernel_size=k))(x, dy)
  _assert_conv_close(out, ref, dw, ref_dw)


@needs_native
def test_winograd_flip_is_the_input_gradient_kernel():
  """flip=True reads a [3, 3, Cout, Cin] kernel flipped and transposed: the conv of the input gradient."""
  rng = np.random.default_rng(5)
  dy = jnp.asarray(rng.normal(size=(2, 6, 8, 12)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 7, 12)), jnp.float32)
  ref = jax.lax.conv_general_dilated(_padded(dy, 2, False), jnp.swapaxes(w[::-1, ::-1], 2, 3), (1, 1), "VALID",
                                     dimension_numbers=_NHWC, precision="highest")
  out = jax.jit(lambda a, b: native.wino_forward(a, b, pad=2, flip=True))(dy, w)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k,pad,reflect", [(3, 1, False), (3, 0, False), (3, 2, False), (3, 1, True), (2, 1, False),
                                           (2, 0, False)])
@pytest.mark.parametrize("height", [8, 9])
def test_convs_on_the_winograd_path_have_xla_gradients(k, pad, reflect, height):
  """conv_fast_grad (zero padding) and reflect_pad1_conv, even and odd sizes, forward and both gradients:
  on CPU with the handlers built these are the Winograd calls (input gradient: flip), else XLA's."""
  padding = ((pad, pad), (pad, pad))
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(2, height, 10, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, 16, 12)) / 12.0, jnp.float32)
  if reflect:
    ours = lambda x, w: layers.reflect_pad1_conv(x, w, (1, 1), padding)
  else:
    ours = lambda x, w: layers.conv_fast_grad(x, w, (1, 1), padding)
  plain = lambda x, w: jax.lax.conv_general_dilated(_padded(x, pad, reflect), w, (1, 1), "VALID",
                                                    dimension_numbers=_NHWC, precision="highest")
  loss = lambda f: (lambda x, w: jnp.sum(jnp.sin(f(x, w))))
  np.testing.assert_allclose(np.asarray(jax.jit(ours)(x, w)), np.asarray(plain(x, w)), rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.jit(jax.grad(loss(ours), (0, 1)))(x, w), jax.grad(loss(plain), (0, 1))(x, w)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))
  if native.available():
    hlo = jax.jit(jax.grad(loss(ours), (0, 1))).lower(x, w).as_text()
    assert native.WINO_FORWARD_TARGET in hlo and native.WINO_WEIGHT_GRAD_TARGET in hlo
    assert "flip = 1" in hlo


def test_winograd_only_where_it_applies():
  x = jnp.zeros((1, 10, 10, 16), jnp.float32)
  assert native.wino_ok(x, (3, 3), (1, 1)) and native.wino_ok(x, (3, 3), (1, 1), pad=1)
  assert native.wino_ok(x, (2, 2), (1, 1), pad=1) and native.wino_ok(jnp.zeros((1, 9, 7, 16)), (3, 3), (1, 1), 1)
  assert not native.wino_ok(x, (3, 3), (2, 2))                              # strided
  assert not native.wino_ok(x, (1, 1), (1, 1))                              # 1x1: a plain matmul
  assert not native.wino_ok(jnp.zeros((1, 10, 10, 4)), (3, 3), (1, 1))     # too few input channels
  assert not native.wino_ok(x, (3, 3), (1, 1), pad=3)                       # padding beyond kernel - 1
  assert not native.wino_ok(x, (2, 2), (1, 1), pad=2)


@needs_native
def test_winograd_rejects_inconsistent_shapes_clearly():
  call = jax.ffi.ffi_call(native.WINO_FORWARD_TARGET, jax.ShapeDtypeStruct((1, 6, 8, 4), jnp.float32))
  with pytest.raises(Exception, match="inconsistent shapes"):   # 7 x 8 input, padding 1 -> 7 x 8, not 6 x 8
    jax.block_until_ready(call(jnp.zeros((1, 7, 8, 8), jnp.float32), jnp.zeros((3, 3, 8, 4), jnp.float32),
                               pad=1, reflect=0, flip=0))
  with pytest.raises(Exception, match="r = 2 or 3"):
    jax.block_until_ready(call(jnp.zeros((1, 7, 8, 8), jnp.float32), jnp.zeros((16, 8, 4), jnp.float32),
                               pad=1, reflect=0, flip=0))


@needs_native
def test_hlo_flops_counts_winograd_calls():
  x = jnp.ones((2, 8, 10, 16), jnp.float32)
  text = jax.jit(lambda a, b: native.wino_forward(a, b, pad=1)).lower(x, jnp.ones((3, 3, 16, 8))).compile().as_text()
  assert native.hlo_flops(text) == 2.0 * 16 * (2 * 4 * 5) * 16 * 8   # 16 products per 2x2 tile
  text = jax.jit(lambda a, b: native.wino_forward(a, b, pad=1)).lower(x, jnp.ones((2, 2, 16, 8))).compile().as_text()
  assert native.hlo_flops(text) == 2.0 * 9 * (2 * 5 * 6) * 16 * 8    # 9 per tile, 9 x 11 outputs
