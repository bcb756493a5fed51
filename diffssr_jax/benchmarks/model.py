"""Speed, compile time and memory of the diffusion model's init, train step and sampler: one JSON line each.

  python -m diffssr_jax.benchmarks.model train --batch_size 64 --patch_size 160
  python -m diffssr_jax.benchmarks.model sample --size 1356x2040 --sampler ddpm
  python -m diffssr_jax.benchmarks.model sample --size 1356x2040 --sampler ddim --steps 25
  python -m diffssr_jax.benchmarks.model sample --size 256 --runs 0          # parts only, no whole run
  python -m diffssr_jax.benchmarks.model compile --target h200 --program both  # for a GPU/TPU not there

`compile` (diffssr_jax.benchmarks.compile) compiles for a GPU or TPU target without the device and reports
memory, FLOPs and HLO facts; the other subcommands run on this machine's devices.

The network is the paper's (diffssr_jax/configs/base.py) unless `--config` names another config (a file, or a
packaged config's name such as `demo`); `--dtype` overrides `model.dtype` ("auto": bfloat16 on GPU/TPU, float32 on
CPU). Params are random (speed does not depend on them) and inputs are random arrays already on the device: the
numbers are the model's, without the data pipeline. Flags take underscores; the dashed spellings (--batch-size) are
accepted too, as in every command.

Every function is lowered and compiled once, explicitly, and the compiled executable is what gets timed, so a
recompilation cannot hide inside the timings. Times are medians over `--repeats` calls after one warm-up call.
JAX's persistent compilation cache is on as in every entry point (`--compilation_cache`, "" to measure cold
compiles); `compile_cache_hits` says whether a compile time is a cache load.

Keys of the JSON line:
  init_seconds           SRDiffusion.init: param shapes by jax.eval_shape, values drawn on the host, put on device.
  compile_seconds        lower + compile of the train step (train) or of the whole sampling run (sample).
  seconds_per_step       train: one optimizer step; sample: one reverse step (a U-Net evaluation plus the
                         update), timed as its own compiled function.
  seconds_per_image      sample: a whole run (RRDB + condition + every step, one lax.scan) per image, measured
                         with `--runs` runs (with --runs 0: estimated from the parts).
  images_per_second      batch / seconds per step (train) or per image run (sample).
  padded_size            sample: the HR size the sampler runs at, the requested --size padded to the U-Net's
                         multiple (8 for the paper network) as the Upscaler pads it; the times include it.
  peak_memory_mb         device peak bytes in use when the backend reports it, else the process's max RSS (CPU).
  gflops_per_step        XLA's cost analysis of the compiled step (what the program executes); for the data-
                         parallel train step one device's program times the device count.
  achieved_gflops_per_s  gflops_per_step / seconds_per_step.

(One module of ~430 lines: the three subcommands share the model set-up, the timing and FLOP counting, and
their flag definitions; the compile subcommand's own work lives in compile.py.)
"""
from __future__ import annotations

import functools
import json
import os
import resource
import statistics
import sys
import time
import types

from absl import flags

from diffssr_jax import cli as shared_cli  # noqa: E402  (numpy/absl only: --help stays fast)
from diffssr_jax import conventions  # noqa: E402  (numpy only)
from diffssr_jax import configs  # noqa: E402
from diffssr_jax.errors import UserError  # noqa: E402

def load_config(path: str | None):
  """`get_config()` of a config file or packaged config name (`configs.load`; base when None); a refusal exits
  with its one line."""
  try:
    return configs.load(path)
  except UserError as e:
    raise SystemExit(f"error: {e}") from None


def parse_size(text: str) -> tuple[int, int]:
  """"256" -> (256, 256); "1356x2040" -> (1356, 2040) (height x width)."""
  parts = text.lower().split("x")
  try:
    hw = tuple(int(p) for p in parts)
  except ValueError:
    raise ValueError(f"expected SIZE or HxW, got {text!r}") from None
  if len(hw) == 1:
    hw = hw * 2
  if len(hw) != 2 or min(hw) < 1:
    raise ValueError(f"expected SIZE or HxW with positive sides, got {text!r}")
  return hw


# ----------------------------------------------------------------------------- measurement helpers
def _median_time(fn, repeats: int) -> tuple[float, list[float]]:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def _compile(jitted, *args):
  """(compiled executable, seconds to lower + compile, XLA flops or None, persistent-cache hits)."""
  from diffssr_jax import compilation_cache
  before = compilation_cache.counts()["hits"]
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  seconds = time.perf_counter() - t0
  return compiled, seconds, xla_flops(compiled), compilation_cache.counts()["hits"] - before


def xla_flops(compiled) -> float | None:
  """The "flops" entry of XLA's cost analysis (summed over partitions), or None when unavailable."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return None
  if isinstance(cost, (list, tuple)):
    cost = [c for c in cost if c]
    return float(sum(c.get("flops", 0.0) for c in cost)) if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def peak_memory():
  """(MB, source): device peak bytes in use when reported, else the process's max RSS."""
  import jax
  peaks = []
  for d in jax.local_devices():
    try:
      stats = d.memory_stats()
    except Exception:  # noqa: BLE001 - CPU devices report nothing
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(stats["peak_bytes_in_use"])
  if peaks:
    return max(peaks) / 2**20, "device_peak_bytes_in_use"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


def _sig(x: float | None, digits: int = 4) -> float | None:
  """x rounded to `digits` significant digits (JSON stays readable at any scale)."""
  return None if x is None else float(f"{x:.{digits}g}")


def _common_info(args, config, model) -> dict:
  import jax
  import numpy as np
  devs = jax.devices()
  m = config.model
  return {
      "device": f"{devs[0].platform}:{devs[0].device_kind}",
      "num_devices": len(devs),
      "cpu_count": os.cpu_count(),
      "load_avg_1m": round(os.getloadavg()[0], 2),
      "jax": jax.__version__,
      "config": str(args.config or configs.HERE / "base.py"),
      "network": {"unet_dim": m.unet_dim, "unet_dim_mults": list(m.unet_dim_mults),
                  "rrdb_num_feat": m.rrdb_num_feat, "rrdb_num_blocks": m.rrdb_num_blocks,
                  "timesteps": config.diffusion.timesteps},
      "dtype": np.dtype(model.unet.dtype).name,
  }


def _setup(args):
  """(config, model, params, init seconds) with the flags' overrides applied."""
  import jax
  from diffssr_jax import compilation_cache
  from diffssr_jax.diffusion.model import build_model
  compilation_cache.enable(args.compilation_cache)
  config = load_config(args.config)
  if args.remat:
    config.model.remat_unet = config.model.remat_rrdb = True
  model = build_model(config, dtype=None if args.dtype == "config" else args.dtype)
  t0 = time.perf_counter()
  params = model.init(jax.random.key(config.seed))
  jax.block_until_ready(params)
  return config, model, params, time.perf_counter() - t0


def _result(kind, args, config, model, init_s, **fields) -> dict:
  mem, mem_src = peak_memory()
  return {"benchmark": kind, **_common_info(args, config, model), "init_seconds": round(init_s, 2), **fields,
          "peak_memory_mb": round(mem, 1), "peak_memory_source": mem_src}


# ----------------------------------------------------------------------------- train
def bench_train(args) -> dict:
  import jax
  import numpy as np
  from diffssr_jax.parallel import make_mesh, shard_batch
  from diffssr_jax.training.train_step import create_train_state, make_optimizer, make_train_step, place_state

  config, model, params, init_s = _setup(args)
  s, b, p = model.scale, args.batch_size, args.patch_size
  mult = int(np.lcm(model.unet.size_multiple, s))
  if p % mult:
    raise SystemExit(f"--patch_size must be a multiple of {mult} (the scale and the U-Net's multiple), got {p}")
  mesh = make_mesh()
  accum = args.grad_accum_steps or config.optim.grad_accum_steps
  if b % (mesh.size * accum):
    raise SystemExit(f"--batch_size {b} is not divisible by the {mesh.size} devices x {accum} micro-batches")
  tx = make_optimizer(config.optim, total_steps=config.train.num_steps)
  state = create_train_state(model, params, tx, seed=config.seed, train_rrdb=config.optim.train_rrdb,
                             use_ema=config.optim.ema_decay > 0)
  step = make_train_step(model, tx, mesh, loss_type=config.diffusion.loss, aux_l1_weight=config.optim.aux_l1_weight,
                         ema_decay=config.optim.ema_decay, grad_accum_steps=accum,
                         state_layouts=config.train.state_layouts)
  rng = np.random.default_rng(0)
  lr = rng.uniform(-1, 1, (b, p // s, p // s, 3)).astype(np.float32)
  batch = shard_batch({
      "hr": rng.uniform(-1, 1, (b, p, p, 3)).astype(np.float32),
      "lr": lr,
      "lr_up": np.repeat(np.repeat(lr, s, 1), s, 2),
      "spe": rng.uniform(-0.3, 0.7, (b, p, p, 1)).astype(np.float32),
  }, mesh)
  compiled, compile_s, xla, hits = _compile(step, state, batch)
  state = place_state(state, compiled)  # into the layouts the step was compiled for (config train.state_layouts)
  if xla is not None:
    xla *= mesh.size  # the cost analysis describes one device's program (shard_map: local batch)

  def run():
    nonlocal state
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))

  run()  # warm-up: first-call allocations
  seconds, times = _median_time(run, args.repeats)
  return _result("train", args, config, model, init_s, batch_size=b, patch_size=p, grad_accum_steps=accum,
                 remat=bool(config.model.remat_unet), seconds_per_step=_sig(seconds),
                 images_per_second=_sig(b / seconds), compile_seconds=round(compile_s, 2),
                 startup_seconds=round(init_s + compile_s, 2), compile_cache_hits=hits,
                 gflops_per_step=_sig(None if xla is None else xla / 1e9),
                 achieved_gflops_per_s=_sig(None if xla is None else xla / 1e9 / seconds),
                 step_times=[_sig(t) for t in times])


# ----------------------------------------------------------------------------- sample
def bench_sample(args) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from diffssr_jax.diffusion import sampling
  from diffssr_jax.inference.upscaler import Upscaler, pad_bottom_right

  config, model, params, init_s = _setup(args)
  s, b = model.scale, args.batch_size
  h, w = args.size
  if h % s or w % s:
    raise SystemExit(f"--size {h}x{w} must be a multiple of the scale {s} (an HR image's LR has integer size)")
  ts = sampling.timesteps_for(model, args.sampler, args.steps)
  n_steps = len(ts)
  # The LR is padded to the multiple the U-Net needs, exactly as the Upscaler pads user images.
  rng = np.random.default_rng(0)
  lr_np = rng.uniform(-1, 1, (b, h // s, w // s, 3)).astype(np.float32)
  lr_np = pad_bottom_right(lr_np, *Upscaler(model, params, sampler=args.sampler, steps=args.steps).lr_padding(
      h // s, w // s))
  up_np = np.repeat(np.repeat(lr_np, s, 1), s, 2)
  lr, lr_up = jnp.asarray(lr_np), jnp.asarray(up_np)
  key = jax.random.key(0)

  # Per-image part: RRDB (with its tail: the sampler returns the RRDB image) + condition projection.
  prep_c, _, prep_xla, _ = _compile(jax.jit(functools.partial(sampling.prepare, model)), params, lr)
  cond = prep_c(params, lr)[1]
  jax.block_until_ready(cond)
  prep_s, _ = _median_time(lambda: jax.block_until_ready(prep_c(params, lr)), max(1, min(args.repeats, 3)))

  # One reverse step (the scan body) as its own executable; t is traced, so all steps share it.
  if args.sampler == "ddpm":
    def one_step(unet_vars, cond, x, t, z):
      return sampling.ddpm_step(model, unet_vars, cond, x, t, z)[0]
  elif args.sampler == "student":
    from diffssr_jax.diffusion import student
    def one_step(unet_vars, cond, x, t, z):
      return student.step(model, unet_vars, cond, x, t, t - 1, z)[0]
  else:
    def one_step(unet_vars, cond, x, t, z):
      return sampling.ddim_step(model, unet_vars, cond, x, t, jnp.maximum(t - 1, -1), z, args.eta)[0]
  x = jax.random.normal(key, lr_up.shape, jnp.float32)
  step_c, step_compile_s, step_xla, _ = _compile(jax.jit(one_step), params["unet"], cond, x,
                                                 jnp.asarray(int(ts[0]), jnp.int32), x)
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
  full_c, full_compile_s, _, hits = _compile(sampler, params, lr, lr_up, key)
  run_times = []
  if args.runs > 0:
    jax.block_until_ready(full_c(params, lr, lr_up, key))  # warm-up (also checks it runs)
    run_s, run_times = _median_time(lambda: jax.block_until_ready(full_c(params, lr, lr_up, key)), args.runs)
  else:
    run_s = prep_s + n_steps * step_s
  per_image_gflops = None if step_xla is None or prep_xla is None else (prep_xla + n_steps * step_xla) / b / 1e9
  return _result("sample", args, config, model, init_s, sampler=args.sampler, steps=n_steps,
                 eta=args.eta if args.sampler == "ddim" else None, size=f"{h}x{w}",
                 padded_size=f"{up_np.shape[1]}x{up_np.shape[2]}", batch_size=b,
                 seconds_per_step=_sig(step_s), seconds_per_image=_sig(run_s / b),
                 seconds_per_image_estimated=args.runs == 0, images_per_second=_sig(b / run_s),
                 seconds_prepare=_sig(prep_s),
                 seconds_per_step_in_run=None if args.runs == 0 else _sig((run_s - prep_s) / n_steps),
                 compile_seconds=round(full_compile_s, 2), step_compile_seconds=round(step_compile_s, 2),
                 compile_cache_hits=hits, gflops_per_step=_sig(None if step_xla is None else step_xla / 1e9),
                 achieved_gflops_per_s=_sig(None if step_xla is None else step_xla / 1e9 / step_s),
                 gflops_per_image=_sig(per_image_gflops), step_times=[_sig(t) for t in step_times],
                 run_times=[_sig(t) for t in run_times])


# ----------------------------------------------------------------------------- CLI
class _SizeParser(flags.ArgumentParser):
  """absl parser of `--size`: SIZE or HxW -> (height, width)."""

  def parse(self, argument):
    return tuple(argument) if isinstance(argument, (tuple, list)) else parse_size(argument)

  def flag_type(self):
    return "size"


class _SizeSerializer(flags.ArgumentSerializer):
  def serialize(self, value):
    return "x".join(map(str, value))


def _define_size(fv, help_text):
  flags.DEFINE(_SizeParser(), "size", "256x256", help_text, serializer=_SizeSerializer(), flag_values=fv)


_DTYPES = ["config", "auto", "float32", "bfloat16"]


def _define_model(fv, dtype_help="Compute dtype (config: the config's model.dtype)."):
  d = dict(flag_values=fv)
  flags.DEFINE_string("config", None, "Config file with get_config(), or a packaged config's name (demo, "
                      "diffssr_df2k_x4, ...; default: base, the paper network).", **d)
  flags.DEFINE_enum("dtype", "config", _DTYPES, dtype_help, **d)
  flags.DEFINE_bool("remat", False, "Recompute activations in the backward pass (model.remat_*).", **d)


def _define_timing(fv):
  d = dict(flag_values=fv)
  _define_model(fv)
  flags.DEFINE_integer("repeats", 5, "Timed calls after one warm-up call (median).", lower_bound=1, **d)
  shared_cli.define_compilation_cache_flag(fv)


def define_train_flags(fv):
  d = dict(flag_values=fv)
  _define_timing(fv)
  flags.DEFINE_integer("batch_size", 4, "Global batch (split over devices).", **d)
  flags.DEFINE_integer("patch_size", 160, "HR patch size.", **d)
  flags.DEFINE_integer("grad_accum_steps", 0, "Micro-batches per step (0: the config's).", **d)


def _define_sampler(fv, prefix=""):
  d = dict(flag_values=fv)
  flags.DEFINE_enum("sampler", conventions.DEFAULT_SAMPLER, list(conventions.SAMPLERS), f"{prefix}Reverse process.",
                    **d)
  flags.DEFINE_integer("steps", None, f"{prefix}Reverse steps (ddpm: all T; ddim: default T; student: default 1).",
                       **d)
  flags.DEFINE_float("eta", conventions.DEFAULT_ETA, f"{prefix}DDIM eta.", **d)


def define_sample_flags(fv):
  d = dict(flag_values=fv)
  _define_timing(fv)
  _define_size(fv, "HR output size, SIZE or HxW (e.g. 1356x2040).")
  flags.DEFINE_integer("batch_size", 1, "Images per sampling run.", **d)
  _define_sampler(fv)
  flags.DEFINE_integer("runs", 1, "Timed whole sampling runs after a warm-up run; 0 skips them (estimate from the "
                       "parts).", **d)


def define_compile_flags(fv):
  from diffssr_jax.benchmarks import targets
  d = dict(flag_values=fv)
  flags.DEFINE_enum("target", None, list(targets.TARGETS), "The accelerator to compile for.", **d)
  shared_cli.mark_required(["target"], fv)
  flags.DEFINE_enum("program", "both", ["train", "sample", "both"], "What to compile.", **d)
  _define_model(fv, "Compute dtype (config: the config's model.dtype; auto: the target's, bfloat16 on GPU/TPU).")
  flags.DEFINE_integer("batch_size", 16, "train: global batch.", **d)
  flags.DEFINE_integer("patch_size", 160, "train: HR patch size.", **d)
  flags.DEFINE_integer("grad_accum_steps", 0, "train: micro-batches per step (0: the config's).", **d)
  flags.DEFINE_enum("state_layouts", None, ["default", "auto"], "train: the train state's device layouts (auto: "
                    "chosen by XLA, jax's Layout.AUTO; default: row-major; unset: the config's train.state_layouts, "
                    "as the training loop runs it).", **d)
  _define_size(fv, "sample: HR output size, SIZE or HxW.")
  flags.DEFINE_integer("sample_batch_size", 1, "sample: images (tiles) per sampling run.", **d)
  _define_sampler(fv, "sample: ")


COMMANDS = {
    "train": ("one data-parallel optimizer step", define_train_flags),
    "sample": ("reverse steps and whole sampling runs", define_sample_flags),
    "compile": ("compile the train step and/or sampler for a GPU/TPU not present (memory, FLOPs, HLO facts)",
                define_compile_flags),
}


def parse_args(argv=None):
  """The subcommand and its flag values as a namespace (`args.command`, `args.size`, ...); argv without the
  program name (default sys.argv[1:]). Help and usage errors exit (SystemExit), as argparse does."""
  argv = sys.argv[1:] if argv is None else list(argv)
  command, fv = shared_cli.parse_subcommand(["diffssr-benchmark", *argv], COMMANDS, __doc__)
  return types.SimpleNamespace(command=command, **fv.flag_values_dict())


def main(argv=None):
  """Runs the benchmark; returns its result (a dict, or the compile subcommand's list of dicts)."""
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.command == "compile":
    from diffssr_jax.benchmarks import compile as compile_cmd, targets
    compile_cmd.use_cpu_host()
    try:
      return compile_cmd.run(args)
    except (targets.TargetUnavailable, ValueError) as e:
      shared_cli.error(str(e))
      return shared_cli.EXIT_ERROR
  result = bench_train(args) if args.command == "train" else bench_sample(args)
  print(json.dumps(result), flush=True)
  return result


def cli(argv=None) -> int:
  """diffssr-benchmark (pyproject's console script; argv[0] the program, default sys.argv): `main`, with the
  exit status instead of the result."""
  result = main(None if argv is None else list(argv)[1:])
  return result if isinstance(result, int) else shared_cli.EXIT_OK


if __name__ == "__main__":
  sys.exit(cli())
