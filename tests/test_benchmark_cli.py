"""The model benchmark CLI (diffssr_jax.benchmarks.model) on a tiny network: output keys and sane values.

No timing assertions (the machine is shared); only that both subcommands run and report consistent
numbers. Also pins the analytic FLOP counts to the paper network's known values, and checks that the
layer rewrites done for speed compute exactly what the plain formulation does.
"""
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffssr_jax.benchmarks import model as benchmark
from diffssr_jax.models import layers
from diffssr_jax.models.layers import conv_fast_grad, mish, reflect_pad, reflect_pad1_conv

COMMON_KEYS = {"seconds_per_step", "images_per_second", "compile_seconds", "peak_memory_mb", "device",
               "gflops_per_step", "model_gflops_per_step", "achieved_gflops_per_s", "model_gflops_per_s"}


@pytest.fixture(scope="module")
def tiny_config():
  """The training tests' tiny network (U-Net 8 (1, 2), RRDB 2 x 8, T = 10) as a config file."""
  return str(pathlib.Path(__file__).parent / "configs" / "tiny_train.py")


def _run(capsys, argv):
  result = benchmark.main(argv)
  lines = [l for l in capsys.readouterr().out.splitlines() if l.strip()]
  assert len(lines) == 1, lines
  assert json.loads(lines[0]) == result
  return result


def _check_common(r):
  assert COMMON_KEYS <= set(r)
  assert r["seconds_per_step"] > 0 and r["compile_seconds"] > 0 and r["peak_memory_mb"] > 10
  assert r["device"].startswith("cpu")
  # XLA's count and ours measure the same convolutions up to padding/border details.
  assert r["gflops_per_step"] is not None
  assert 0.5 < r["gflops_per_step"] / r["model_gflops_per_step"] < 2.0
  assert r["achieved_gflops_per_s"] == pytest.approx(r["gflops_per_step"] / r["seconds_per_step"], rel=0.05)


def test_train_subcommand(tiny_config, capsys):
  b = jax.device_count()  # conftest simulates several CPU devices; the batch is split over them
  r = _run(capsys, ["train", "--config", tiny_config, "--batch-size", str(b), "--patch-size", "16",
                    "--repeats", "2"])
  _check_common(r)
  assert r["benchmark"] == "train" and r["batch_size"] == b and r["patch_size"] == 16
  assert r["network"]["unet_dim"] == 8 and r["num_devices"] == b
  assert r["images_per_second"] == pytest.approx(b / r["seconds_per_step"], rel=0.05)
  assert len(r["step_times"]) == 2


def test_sample_subcommand(tiny_config, capsys):
  r = _run(capsys, ["sample", "--config", tiny_config, "--size", "16", "--sampler", "ddim", "--steps", "3",
                    "--repeats", "2", "--runs", "1"])
  _check_common(r)
  assert r["benchmark"] == "sample" and r["sampler"] == "ddim" and r["steps"] == 3
  assert not r["seconds_per_image_estimated"] and len(r["run_times"]) == 1
  assert r["seconds_per_image"] > 0 and r["gflops_per_image"] > 3 * r["gflops_per_step"]
  assert r["images_per_second"] == pytest.approx(1 / r["seconds_per_image"], rel=0.05)
  # --runs 0: the whole-run time is estimated from the parts; the DDPM runs all T steps.
  r = _run(capsys, ["sample", "--config", tiny_config, "--size", "16", "--repeats", "1", "--runs", "0"])
  assert r["seconds_per_image_estimated"] and r["steps"] == 10 and r["run_times"] == []


def test_cli_rejects_bad_sizes(tiny_config):
  with pytest.raises(SystemExit):
    benchmark.main(["sample", "--config", tiny_config, "--size", "20"])  # not a multiple of 8
  with pytest.raises(SystemExit):
    benchmark.main(["train", "--config", tiny_config, "--batch-size", "3", "--patch-size", "16"])
  out = subprocess.run([sys.executable, "-m", "diffssr_jax.benchmarks.model", "--help"], capture_output=True, text=True)
  assert out.returncode == 0 and "train" in out.stdout and "sample" in out.stdout


def test_analytic_flops_match_the_paper_network():
  m = benchmark.load_config(None).model
  # Per U-Net evaluation as the official forward runs it (with the condition projection).
  assert (benchmark.unet_flops(m, 256, 256) + benchmark.cond_proj_flops(m, 256, 256)) / 1e9 == pytest.approx(98.6, abs=0.05)
  assert (benchmark.unet_flops(m, 160, 160) + benchmark.cond_proj_flops(m, 160, 160)) / 1e9 == pytest.approx(38.5, abs=0.05)
  assert benchmark.rrdb_flops(m, 40, 40, decode=True) / 1e9 == pytest.approx(43.6, abs=0.05)


@pytest.mark.parametrize("path", ["ring", "row_fix"])
@pytest.mark.parametrize("shape,stride", [((2, 9, 12, 3), 1), ((2, 9, 12, 3), 2), ((1, 8, 7, 4), 2),
                                          ((1, 7, 9, 3), 2), ((1, 2, 5, 2), 1), ((1, 3, 2, 2), 2),
                                          ((1, 5, 6, 96), 1), ((1, 5, 7, 96), 2)])
def test_reflect_conv_rewrite_is_exact(shape, stride, path, monkeypatch):
  """Both rewrites of ReflectionPad2d(1) + conv (chosen by map size) equal the padded VALID conv, values
  and gradients, for odd and even sizes, both strides, and wide layers (per-tap weight gradients)."""
  monkeypatch.setattr(layers, "_ROW_FIX_MIN_PIXELS", 0 if path == "row_fix" else 10**9)
  rng = np.random.default_rng(sum(shape) + stride)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  cout = shape[-1] if shape[-1] >= layers._TAP_GRAD_MIN_CHANNELS else 5
  w = jnp.asarray(rng.normal(size=(3, 3, shape[-1], cout)) / np.sqrt(9 * shape[-1]), jnp.float32)

  def ref_fn(x, w):
    return jax.lax.conv_general_dilated(reflect_pad(x, 1), w, (stride, stride), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def our_fn(x, w):
    return reflect_pad1_conv(x, w, (stride, stride), ((1, 1), (1, 1)))

  ref, out = ref_fn(x, w), our_fn(x, w)
  assert out.shape == ref.shape
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-5)
  dy = jnp.asarray(rng.normal(size=ref.shape), jnp.float32)
  g_ref = jax.vjp(ref_fn, x, w)[1](dy)
  g_out = jax.vjp(our_fn, x, w)[1](dy)
  for a, b in zip(g_out, g_ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)


def test_mish_equals_textbook_form():
  x = jnp.concatenate([jnp.linspace(-60.0, 60.0, 20001), jnp.array([-1e4, -90.0, 25.0, 1e4])])
  ref = x * jnp.tanh(jax.nn.softplus(x))
  out = mish(x)
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-6, atol=1e-7)


def test_mish_gradient_equals_the_analytic_derivative():
  """mish's hand-written backward against the float64 derivative of the textbook form, across the exp
  cap at 20 and the underflow of e^x."""
  x = jnp.concatenate([jnp.linspace(-40.0, 40.0, 8001), jnp.array([-1e4, 19.99, 20.0, 20.01, 1e4])])
  grad = np.asarray(jax.vmap(jax.grad(mish))(x.astype(jnp.float32)))
  x64 = np.asarray(x, np.float64)
  sig = 1.0 / (1.0 + np.exp(-np.clip(x64, -700, 700)))
  t = np.tanh(np.logaddexp(0.0, x64))
  ref = t + x64 * (1.0 - t * t) * sig
  assert np.isfinite(grad).all()
  np.testing.assert_allclose(grad, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel,stride,padding", [(2, 1, ((1, 1), (1, 1))), (1, 1, ((0, 0), (0, 0))),
                                                   (3, 1, ((1, 1), (1, 1))), (3, 2, ((0, 1), (0, 1)))])
def test_conv_fast_grad_matches_xla_gradients(kernel, stride, padding):
  rng = np.random.default_rng(kernel + stride)
  x = jnp.asarray(rng.normal(size=(2, 7, 8, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 5, 6)), jnp.float32)
  plain = lambda x, w: jax.lax.conv_general_dilated(x, w, (stride, stride), padding,
                                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
  fast = lambda x, w: conv_fast_grad(x, w, (stride, stride), padding)
  loss = lambda conv: (lambda x, w: jnp.sum(jnp.sin(conv(x, w))))
  # On CPU the forward is the native conv (sums in another order): equal to float32 rounding.
  np.testing.assert_allclose(np.asarray(fast(x, w)), np.asarray(plain(x, w)), rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.grad(loss(fast), (0, 1))(x, w), jax.grad(loss(plain), (0, 1))(x, w)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)
