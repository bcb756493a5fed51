"""The model benchmark CLI (diffssr_jax.benchmarks.model) on a tiny network: output keys, sane values, sizes,
and the persistent compilation cache that every entry point uses.

No timing assertions (the machine is shared); only that both subcommands run and report consistent numbers.
"""
import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from diffssr_jax.benchmarks import model as benchmark

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "configs" / "tiny_train.py")
COMMON_KEYS = {"seconds_per_step", "images_per_second", "compile_seconds", "init_seconds", "peak_memory_mb",
               "device", "gflops_per_step", "achieved_gflops_per_s", "compile_cache_hits", "dtype"}


def _run(capsys, argv):
  result = benchmark.main(argv)
  lines = [l for l in capsys.readouterr().out.splitlines() if l.strip()]
  assert len(lines) == 1, lines
  assert json.loads(lines[0]) == result
  return result


def _check_common(r):
  assert COMMON_KEYS <= set(r)
  assert r["seconds_per_step"] > 0 and r["compile_seconds"] > 0 and r["peak_memory_mb"] > 10
  assert 0 < r["init_seconds"] < 60
  assert r["device"].startswith("cpu") and r["dtype"] == "float32"   # model.dtype "auto" is float32 on CPU
  assert r["gflops_per_step"] is not None and r["gflops_per_step"] > 0
  assert r["achieved_gflops_per_s"] == pytest.approx(r["gflops_per_step"] / r["seconds_per_step"], rel=0.05)


def test_train_subcommand(capsys):
  b = 2 * jax.device_count()  # conftest simulates several CPU devices; the batch is split over them
  r = _run(capsys, ["train", "--config", TINY, "--batch-size", str(b), "--patch_size", "16", "--repeats", "2",
                    "--compilation_cache", ""])
  _check_common(r)
  assert r["benchmark"] == "train" and r["batch_size"] == b and r["patch_size"] == 16
  assert r["network"]["unet_dim"] == 8 and r["num_devices"] == jax.device_count()
  assert r["images_per_second"] == pytest.approx(b / r["seconds_per_step"], rel=0.05)
  assert r["startup_seconds"] == pytest.approx(r["init_seconds"] + r["compile_seconds"], abs=0.02)
  assert len(r["step_times"]) == 2 and r["compile_cache_hits"] == 0
  # Two micro-batches per device: the same global batch, half the examples per pass.
  r = _run(capsys, ["train", "--config", TINY, "--batch_size", str(b), "--patch_size", "16", "--repeats", "1",
                    "--grad_accum_steps", "2", "--compilation_cache", ""])
  assert r["grad_accum_steps"] == 2 and r["batch_size"] == b


def test_sample_subcommand(capsys):
  r = _run(capsys, ["sample", "--config", TINY, "--size", "20x36", "--sampler", "ddim", "--steps", "3",
                    "--repeats", "2", "--runs", "1", "--compilation_cache", ""])
  _check_common(r)
  assert r["benchmark"] == "sample" and r["sampler"] == "ddim" and r["steps"] == 3
  assert r["size"] == r["padded_size"] == "20x36"   # this 2-level U-Net takes any multiple of 2 (HR)
  assert not r["seconds_per_image_estimated"] and len(r["run_times"]) == 1
  assert r["seconds_per_image"] > 0 and r["gflops_per_image"] > 3 * r["gflops_per_step"]
  assert r["images_per_second"] == pytest.approx(1 / r["seconds_per_image"], rel=0.05)
  # --runs 0: the whole-run time is estimated from the parts; the DDPM runs all T steps.
  r = _run(capsys, ["sample", "--config", TINY, "--size", "16", "--repeats", "1", "--runs", "0",
                    "--compilation_cache", ""])
  assert r["seconds_per_image_estimated"] and r["steps"] == 10 and r["run_times"] == []
  assert r["padded_size"] == "16x16"


@pytest.mark.parametrize("size,padded", [("20x36", "24x40"), ("4", "16x16")])
def test_sample_sizes_are_padded_like_the_upscaler(capsys, size, padded):
  """The demo's 4-level U-Net needs HR multiples of 8 and at least 16 px: a 20x36 request (LR 5x9) runs at
  24x40, a 4x4 one (LR 1x1) at 16x16, as the Upscaler pads user images; the times are for that size."""
  r = _run(capsys, ["sample", "--config", "demo", "--size", size, "--sampler", "ddim",
                    "--steps", "2", "--repeats", "1", "--runs", "1", "--compilation_cache", ""])
  assert r["padded_size"] == padded and r["seconds_per_image"] > 0


def test_cli_rejects_bad_sizes():
  with pytest.raises(SystemExit):
    benchmark.main(["sample", "--config", TINY, "--size", "18"])  # not a multiple of the scale
  with pytest.raises(SystemExit):
    benchmark.main(["sample", "--config", TINY, "--size", "16x0"])
  with pytest.raises(SystemExit):
    benchmark.main(["train", "--config", TINY, "--batch_size", "3", "--patch_size", "16"])
  out = subprocess.run([sys.executable, "-m", "diffssr_jax.benchmarks.model", "sample", "--help"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert out.returncode == 0 and "--batch_size" in out.stdout and "(default: ddpm)" in out.stdout


def test_second_process_hits_the_persistent_compilation_cache(tmp_path):
  """Two launches of the same benchmark: the first compiles and stores, the second loads its executables."""
  env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": ""}
  cmd = [sys.executable, "-m", "diffssr_jax.benchmarks.model", "sample", "--config", TINY, "--size", "16",
         "--sampler", "ddim", "--steps", "2", "--repeats", "1", "--compilation_cache", str(tmp_path / "xla")]
  first, second = (json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT,
                                             env=env).stdout.splitlines()[-1]) for _ in range(2))
  assert first["compile_cache_hits"] == 0 and any((tmp_path / "xla").iterdir())
  assert second["compile_cache_hits"] >= 1
