"""Speed of the diffusion model's train step and sampler, printed as one JSON line (a measurement tool).

  python -m diffssr_jax.benchmarks.model train --batch-size 4 --patch-size 160
  python -m diffssr_jax.benchmarks.model sample --size 256 --steps 100 --sampler ddpm
  python -m diffssr_jax.benchmarks.model sample --size 256 --steps 25 --sampler ddim [--runs 0]

The network is the paper's (configs/base.py) unless `--config path/to/config.py` names another file
with a `get_config()`; `--dtype bfloat16` sets the compute dtype. Params are random (speed does not
depend on them) and inputs are random arrays already on the device, so the numbers are the model's
alone, without the data pipeline.

Every function is lowered and compiled once, explicitly, and the compiled executable is what gets
timed: a recompilation cannot hide inside the timings. Times are medians over `--repeats` calls after
one warm-up call.

Keys of the JSON line:
  seconds_per_step       train: one optimizer step; sample: one reverse step (one U-Net evaluation plus
                         the update), timed as its own compiled function.
  seconds_per_image      sample: a whole run (RRDB + condition + all steps, one lax.scan) per image,
                         timed with `--runs` full runs (with --runs 0: estimated from the parts).
  images_per_second      batch / seconds per step (train) or per image run (sample).
  compile_seconds        lower + compile of the timed function (train step; whole sampling run).
  peak_memory_mb         device peak bytes in use when the backend reports it, else the process's
                         max RSS (CPU); `peak_memory_source` says which.
  gflops_per_step        XLA's cost analysis of the compiled step ("flops"; for the data-parallel
                         train step one device's program times the device count): what the compiled
                         program executes, including any redundant work it does.
  model_gflops_per_step  the network's own conv FLOPs (2 * MACs of the PyTorch layer definitions;
                         backward = 2x forward). The paper network costs 98.6 GFLOP per U-Net
                         evaluation at 256x256 as the official code runs it, 12.9 of which are the
                         condition projection that our sampler computes once per image (so 85.7 per
                         step here); 38.5 per 160x160 patch; the RRDB 43.6 per 40x40 LR patch with
                         its upsampling tail (39.2 without, as the train step runs it).
  achieved_gflops_per_s / model_gflops_per_s   the two counts divided by seconds_per_step.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import resource
import statistics
import sys
import time

_DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "base.py"


def load_config(path: str | None):
  """`get_config()` of a config file (configs/base.py when None)."""
  path = pathlib.Path(path) if path else _DEFAULT_CONFIG
  if not path.is_file():
    raise SystemExit(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location(f"_bench_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise SystemExit(f"{path} has no get_config()")
  return module.get_config()


# ----------------------------------------------------------------------------- analytic FLOP counts
def _conv(h, w, cin, cout, k):
  """FLOPs (2 * MACs) of a k x k conv producing an h x w map."""
  return 2.0 * h * w * cin * cout * k * k


def unet_flops(model_cfg, h: int, w: int) -> float:
  """FLOPs of one U-Net evaluation (denoise only: the condition projection runs once per image) at an
  h x w output, counted from the layer definitions of the official Unet (groups = 0, no attention)."""
  d = model_cfg.unet_dim
  dims = [3] + [d * m for m in model_cfg.unet_dim_mults]
  in_out = list(zip(dims[:-1], dims[1:]))
  n = len(in_out)

  def resnet(hh, ww, cin, cout):
    f = _conv(hh, ww, cin, cout, 3) + _conv(hh, ww, cout, cout, 3)
    return f + (_conv(hh, ww, cin, cout, 1) if cin != cout else 0.0)

  total = 0.0
  for i, (cin, cout) in enumerate(in_out):
    hh, ww = h >> i, w >> i
    total += resnet(hh, ww, cin, cout) + resnet(hh, ww, cout, cout)
    if i < n - 1:
      total += _conv(hh // 2, ww // 2, cout, cout, 3)   # stride-2 downsample
  hm, wm = h >> (n - 1), w >> (n - 1)
  total += 2 * resnet(hm, wm, dims[-1], dims[-1])
  for j, (cin, cout) in enumerate(reversed(in_out[1:])):
    level = n - 1 - j                                  # input resolution of this up level
    hh, ww = h >> level, w >> level
    total += resnet(hh, ww, 2 * cout, cin) + resnet(hh, ww, cin, cin)
    total += _conv(hh, ww, cin, cin, 4)                # ConvTranspose(k=4, s=2): k*k taps per input pixel
  total += _conv(h, w, d, d, 3) + _conv(h, w, d, model_cfg.get("out_channels", 3), 1)
  return total


def cond_proj_flops(model_cfg, h: int, w: int) -> float:
  """The U-Net's transposed-conv condition projection (k = 2s, stride s) from the h/s x w/s LR grid."""
  s = model_cfg.scale
  cin = model_cfg.rrdb_num_feat * ((model_cfg.rrdb_num_blocks + 1) // 3)
  return _conv(h // s, w // s, cin, model_cfg.unet_dim, 2 * s)


def rrdb_flops(model_cfg, h: int, w: int, decode: bool) -> float:
  """RRDBNet on an h x w LR input; `decode` adds the upsampling tail (nearest x2 + conv, HRconv, conv_last)."""
  nf, gc, nb = model_cfg.rrdb_num_feat, model_cfg.get("rrdb_growth", model_cfg.rrdb_num_feat // 2), \
      model_cfg.rrdb_num_blocks
  rdb = sum(_conv(h, w, nf + i * gc, gc, 3) for i in range(4)) + _conv(h, w, nf + 4 * gc, nf, 3)
  total = _conv(h, w, 3, nf, 3) + nb * 3 * rdb + _conv(h, w, nf, nf, 3)
  if decode:
    n_up = {2: 1, 4: 2, 8: 3}[model_cfg.scale]
    hh, ww = h, w
    for _ in range(n_up):
      hh, ww = 2 * hh, 2 * ww
      total += _conv(hh, ww, nf, nf, 3)
    total += _conv(hh, ww, nf, nf, 3) + _conv(hh, ww, nf, 3, 3)
  return total


# ----------------------------------------------------------------------------- measurement helpers
def _median_time(fn, repeats: int) -> tuple[float, list[float]]:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def _compile(jitted, *args):
  """(compiled executable, seconds to lower + compile, XLA flops or None)."""
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  seconds = time.perf_counter() - t0
  return compiled, seconds, xla_flops(compiled)


def xla_flops(compiled) -> float | None:
  """The "flops" entry of XLA's cost analysis (summed over partitions), plus the native CPU convs'
  FLOPs (custom calls, which the cost analysis counts as zero), or None when unavailable."""
  from diffssr_jax import native
  try:
    cost = compiled.cost_analysis()
  except Exception:  # not every backend implements it
    return None
  if isinstance(cost, (list, tuple)):
    cost = [c for c in cost if c]
    if not cost:
      return None
    flops = float(sum(c.get("flops", 0.0) for c in cost))
  elif not cost or "flops" not in cost:
    return None
  else:
    flops = float(cost["flops"])
  try:
    text = compiled.as_text()
  except Exception:  # noqa: BLE001 - no HLO text: XLA's count alone
    return flops
  return flops + native.hlo_flops(text)


def peak_memory():
  """(MB, source): device peak bytes in use when reported, else the process's max RSS."""
  import jax
  peaks = []
  for d in jax.local_devices():
    try:
      stats = d.memory_stats()
    except Exception:
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(stats["peak_bytes_in_use"])
  if peaks:
    return max(peaks) / 2**20, "device_peak_bytes_in_use"
  rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
  return rss_kb / 1024, "process_max_rss"


def _common_info(args, config) -> dict:
  import jax
  devs = jax.devices()
  m = config.model
  return {
      "device": f"{devs[0].platform}:{devs[0].device_kind}",
      "num_devices": len(devs),
      "cpu_count": os.cpu_count(),
      "load_avg_1m": round(os.getloadavg()[0], 2),
      "jax": jax.__version__,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "config": str(args.config or _DEFAULT_CONFIG),
      "network": {"unet_dim": m.unet_dim, "unet_dim_mults": list(m.unet_dim_mults),
                  "rrdb_num_feat": m.rrdb_num_feat, "rrdb_num_blocks": m.rrdb_num_blocks,
                  "timesteps": config.diffusion.timesteps},
      "dtype": args.dtype,
  }


def _sig(x: float, digits: int = 4) -> float:
  """x rounded to `digits` significant digits (JSON stays readable at any scale)."""
  return float(f"{x:.{digits}g}")


def _gflops_fields(xla, model, seconds) -> dict:
  return {"gflops_per_step": None if xla is None else _sig(xla / 1e9),
          "model_gflops_per_step": _sig(model / 1e9),
          "achieved_gflops_per_s": None if xla is None else _sig(xla / 1e9 / seconds),
          "model_gflops_per_s": _sig(model / 1e9 / seconds)}


def _build(config, dtype_name):
  import jax.numpy as jnp
  from diffssr_jax.diffusion.model import build_model
  dtype = None if dtype_name == "config" else jnp.dtype(dtype_name)
  return build_model(config, dtype=dtype)


def _check_size(size: int, scale: int, what: str):
  if size % scale or size % 8:
    raise SystemExit(f"{what} must be a multiple of the scale ({scale}) and of 8 (U-Net), got {size}")


# ----------------------------------------------------------------------------- train
def bench_train(args) -> dict:
  import jax
  import numpy as np
  from diffssr_jax.training.train_step import create_train_state, make_mesh, make_optimizer, make_train_step, shard_batch

  config = load_config(args.config)
  model = _build(config, args.dtype)
  s, b, p = model.scale, args.batch_size, args.patch_size
  _check_size(p, s, "--patch-size")
  mesh = make_mesh()
  if b % mesh.size:
    raise SystemExit(f"--batch-size {b} is not divisible by the {mesh.size} devices")
  params = model.init(jax.random.key(config.seed), lr_size=8)
  tx = make_optimizer(config.optim, total_steps=config.train.num_steps)
  state = create_train_state(model, params, tx, seed=config.seed, train_rrdb=config.optim.train_rrdb,
                             use_ema=config.optim.ema_decay > 0)
  step = make_train_step(model, tx, mesh, loss_type=config.diffusion.loss,
                         aux_l1_weight=config.optim.aux_l1_weight, ema_decay=config.optim.ema_decay)
  rng = np.random.default_rng(0)
  lr = rng.uniform(-1, 1, (b, p // s, p // s, 3)).astype(np.float32)
  batch = shard_batch({
      "hr": rng.uniform(-1, 1, (b, p, p, 3)).astype(np.float32),
      "lr": lr,
      "lr_up": np.repeat(np.repeat(lr, s, 1), s, 2),
      "spe": rng.uniform(-0.3, 0.7, (b, p, p, 1)).astype(np.float32),
  }, mesh)
  compiled, compile_s, xla = _compile(step, state, batch)
  if xla is not None:
    xla *= mesh.size  # the cost analysis describes one device's program (shard_map: local batch)

  def run():
    nonlocal state
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))

  run()  # warm-up: first-call allocations
  seconds, times = _median_time(run, args.repeats)
  # Model FLOPs: frozen encoder forward without its tail (what the step runs), condition projection and
  # U-Net forward + backward (2x forward); with a trained encoder its tail and backward are added.
  m = config.model
  unet_fwd = unet_flops(m, p, p) + cond_proj_flops(m, p, p)
  if config.optim.train_rrdb:
    enc = 3 * rrdb_flops(m, p // s, p // s, decode=config.optim.aux_l1_weight > 0)
  else:
    enc = rrdb_flops(m, p // s, p // s, decode=False)
  model_flops = b * (3 * unet_fwd + enc)
  mem, mem_src = peak_memory()
  out = {"benchmark": "train", **_common_info(args, config), "batch_size": b, "patch_size": p,
         "seconds_per_step": _sig(seconds), "images_per_second": _sig(b / seconds),
         "compile_seconds": round(compile_s, 2), "peak_memory_mb": round(mem, 1), "peak_memory_source": mem_src,
         **_gflops_fields(xla, model_flops, seconds), "step_times": [_sig(t) for t in times]}
  return out


# ----------------------------------------------------------------------------- sample
def bench_sample(args) -> dict:
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np
  from diffssr_jax.diffusion import sampling

  config = load_config(args.config)
  model = _build(config, args.dtype)
  s, b, size = model.scale, args.batch_size, args.size
  _check_size(size, s, "--size")
  ts = sampling.timesteps_for(model, args.sampler, args.steps)
  n_steps = len(ts)
  params = model.init(jax.random.key(config.seed), lr_size=8)
  rng = np.random.default_rng(0)
  lr_np = rng.uniform(-1, 1, (b, size // s, size // s, 3)).astype(np.float32)
  lr = jnp.asarray(lr_np)
  lr_up = jnp.asarray(np.repeat(np.repeat(lr_np, s, 1), s, 2))
  key = jax.random.key(0)

  # Per-image part: RRDB (with its tail: the sampler returns the RRDB image) + condition projection.
  prep_c, _, prep_xla = _compile(jax.jit(functools.partial(sampling.prepare, model)), params, lr)
  cond = prep_c(params, lr)[1]
  jax.block_until_ready(cond)
  prep_s, _ = _median_time(lambda: jax.block_until_ready(prep_c(params, lr)), max(1, min(args.repeats, 3)))

  # One reverse step (the scan body) as its own executable; t is traced, so all steps share it.
  if args.sampler == "ddpm":
    def one_step(unet_vars, cond, x, t, z):
      return sampling.ddpm_step(model, unet_vars, cond, x, t, z)[0]
  else:
    def one_step(unet_vars, cond, x, t, z):
      return sampling.ddim_step(model, unet_vars, cond, x, t, jnp.maximum(t - 1, -1), z, args.eta)[0]
  x = jax.random.normal(key, lr_up.shape, jnp.float32)
  t0 = jnp.asarray(int(ts[0]), jnp.int32)
  step_c, step_compile_s, step_xla = _compile(jax.jit(one_step), params["unet"], cond, x, t0, x)
  state = {"x": x, "i": 0}

  def run_step():
    t = jnp.asarray(int(ts[state["i"] % n_steps]), jnp.int32)
    state["i"] += 1
    state["x"] = step_c(params["unet"], cond, state["x"], t, x)
    jax.block_until_ready(state["x"])

  run_step()
  step_s, step_times = _median_time(run_step, args.repeats)

  # The whole sampling run: one executable with a lax.scan over the steps.
  sampler = sampling.make_sampler(model, sampler=args.sampler, steps=args.steps, eta=args.eta)
  full_c, full_compile_s, _ = _compile(sampler, params, lr, lr_up, key)
  run_times = []
  if args.runs > 0:
    jax.block_until_ready(full_c(params, lr, lr_up, key))  # warm-up (also checks it runs)
    _, run_times = _median_time(lambda: jax.block_until_ready(full_c(params, lr, lr_up, key)), args.runs)
    run_s = statistics.median(run_times)
    estimated = False
  else:
    run_s = prep_s + n_steps * step_s
    estimated = True
  m = config.model
  model_step = b * unet_flops(m, size, size)
  model_image = rrdb_flops(m, size // s, size // s, decode=True) + cond_proj_flops(m, size, size) \
      + n_steps * unet_flops(m, size, size)
  mem, mem_src = peak_memory()
  out = {"benchmark": "sample", **_common_info(args, config), "sampler": args.sampler, "steps": n_steps,
         "size": size, "batch_size": b,
         "seconds_per_step": _sig(step_s),
         "seconds_per_image": _sig(run_s / b), "seconds_per_image_estimated": estimated,
         "images_per_second": _sig(b / run_s),
         "seconds_prepare": _sig(prep_s),
         "seconds_per_step_in_run": None if estimated else _sig((run_s - prep_s) / n_steps),
         "compile_seconds": round(full_compile_s, 2), "step_compile_seconds": round(step_compile_s, 2),
         "peak_memory_mb": round(mem, 1), "peak_memory_source": mem_src,
         **_gflops_fields(step_xla, model_step, step_s),
         "gflops_per_image": None if step_xla is None or prep_xla is None
         else _sig((prep_xla + n_steps * step_xla) / b / 1e9),
         "model_gflops_per_image": _sig(model_image / 1e9),
         "step_times": [_sig(t) for t in step_times], "run_times": [_sig(t) for t in run_times]}
  return out


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
  parser = argparse.ArgumentParser(prog="python -m diffssr_jax.benchmarks.model", description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)

  def common(p):
    p.add_argument("--config", default=None, help="config file with get_config() (default: configs/base.py)")
    p.add_argument("--dtype", default="config", choices=["config", "float32", "bfloat16"],
                   help="compute dtype (default: the config's model.dtype)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls after one warm-up call (median)")

  tr = sub.add_parser("train", help="one data-parallel optimizer step")
  common(tr)
  tr.add_argument("--batch-size", type=int, default=4, help="global batch (split over devices)")
  tr.add_argument("--patch-size", type=int, default=160, help="HR patch size")
  sa = sub.add_parser("sample", help="reverse steps and whole sampling runs")
  common(sa)
  sa.add_argument("--size", type=int, default=256, help="HR output size (square)")
  sa.add_argument("--batch-size", type=int, default=1)
  sa.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"])
  sa.add_argument("--steps", type=int, default=None, help="reverse steps (ddpm: all T; ddim: default T)")
  sa.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
  sa.add_argument("--runs", type=int, default=1,
                  help="timed whole sampling runs after a warm-up run; 0 skips them (estimate from the parts)")
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error("--repeats must be at least 1")
  return args


def main(argv=None):
  args = parse_args(argv)
  result = bench_train(args) if args.command == "train" else bench_sample(args)
  print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
