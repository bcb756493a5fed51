"""Compile the train step and the sampler for a GPU or TPU that is not there: memory, FLOPs and HLO facts.

  diffssr-benchmark compile --target h200 --batch_size 16 --program train
  diffssr-benchmark compile --target h200 --dtype float32 --size 1356x2040 --program sample
  diffssr-benchmark compile --target v5e --program both

Each program is lowered and compiled ahead of time ("deviceless") by the target's own compiler: XLA's GPU
compiler through the compile-only CUDA client of `jax-cuda12-plugin`, or libtpu's compiler for a TPU topology
(`targets`). What the target would run is then fully known except kernel speed (nothing is autotuned: every
cuDNN conv has algorithm -1), so this measures structure, dtypes, layouts, loops and memory, not time.

The programs are those the commands run: `train_step.make_train_step` on a mesh over the target's devices
(random batch of --batch_size x --patch_size², the config's optimizer, EMA and --grad_accum_steps), and the
sampler as the Upscaler runs it (`sampling.make_image_sampler`: one image per key, batch split over the mesh,
the LR padded to the U-Net's multiple). `--dtype auto` is the target's compute dtype (bfloat16 on GPU/TPU), not
the host's. Compiles are cold: the persistent compilation cache is not used.

One JSON line per program; keys:
  program, target, device_kind, dtype, batch_size, patch_size / size (padded_size: what the sampler runs at),
  sampler, steps, remat, grad_accum_steps, jax, cpu_count, load_avg_1m (the host is often shared),
  exec_time_optimization_effort    jax's setting (env JAX_EXEC_TIME_OPTIMIZATION_EFFORT, -1 to 1, default 0):
                                   below 0 XLA spends less time optimising, see README "TPU v5e target".
  lower_seconds, compile_seconds   tracing + lowering to StableHLO; XLA's compile for the target.
  compile_cpu_seconds              the CPU time of the compile (all of this process's threads): on a shared
                                   host wall time grows with the load, this much less.
  memory                           compiled.memory_analysis() in bytes: arguments, outputs, aliases (outputs
                                   written into donated arguments: the train state), temp (XLA's scratch and
                                   activations), generated_code (TPU; null where not reported: GPU);
                                   peak = arguments + outputs - aliases + temp, what the device holds while the
                                   program runs; *_gib the same in GiB.
  tflop                            XLA's cost analysis of the lowered (pre-optimisation) HLO (the compile-only
                                   GPU client has none after compilation), every loop trip counted: XLA's
                                   analysis counts a loop body once, so for it the RRDB trunk is lowered
                                   unrolled, the sampler adds steps - 1 reverse steps lowered alone, and a
                                   train step with gradient accumulation is lowered as one pass over the batch.
  state_layouts                    train: auto (the state in layouts XLA chooses, `train_step.LaidOutStep`) or
                                   default (row-major); --state_layouts, else the config's train.state_layouts,
                                   which is what the training loop runs.
  state_relaid_out, _mib           train: the state arrays the step takes in a layout other than row-major.
  convs, convs_total, dilated_convs, dilated_conv_windows, transposes_1mib, transposes_mib, loops,
  host_transfers                   HLO facts of the optimised program, see `diffssr_jax.benchmarks.hlo`.
"""
from __future__ import annotations

import os
import time

from diffssr_jax import conventions
from diffssr_jax.benchmarks import targets as targets_mod

PROGRAMS = ("train", "sample")


def use_cpu_host() -> None:
  """Keeps jax's device backends on the CPU (see `targets`): set before jax initialises them."""
  if not os.environ.get("JAX_PLATFORMS"):
    os.environ["JAX_PLATFORMS"] = "cpu"


def build(target, config, dtype: str = "config", remat: bool = False):
  """The SRDiffusion model of `config` with the compute dtype the target gets (`dtype`: config, auto,
  float32 or bfloat16)."""
  from diffssr_jax.diffusion.model import build_model
  if remat:
    config.model.remat_unet = config.model.remat_rrdb = True
  return build_model(config, dtype=None if dtype == "config" else dtype, platform=target.platform)


def _abstract(tree, sharding):
  import jax
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def train_program(model, config, mesh, batch_size: int, patch_size: int, grad_accum_steps: int = 0,
                  state_layouts: str | None = None):
  """(train step, abstract (state, batch)) for a global batch on `mesh`: the training loop's step, with the
  state in `state_layouts` (None: the config's train.state_layouts, as the loop runs it)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from diffssr_jax import parallel
  from diffssr_jax.training.train_step import create_train_state, make_optimizer, make_train_step
  s, b, p = model.scale, batch_size, patch_size
  mult = int(np.lcm(model.unet.size_multiple, s))
  if p % mult:
    raise ValueError(f"--patch_size must be a multiple of {mult} (the scale and the U-Net's multiple), got {p}")
  accum = grad_accum_steps or config.optim.grad_accum_steps
  if b % (mesh.size * accum):
    raise ValueError(f"--batch_size {b} is not divisible by the {mesh.size} devices x {accum} micro-batches")
  tx = make_optimizer(config.optim, total_steps=config.train.num_steps)
  state = jax.eval_shape(lambda params: create_train_state(
      model, params, tx, seed=config.seed, train_rrdb=config.optim.train_rrdb, use_ema=config.optim.ema_decay > 0),
      model.param_shapes())
  step = make_train_step(model, tx, mesh, loss_type=config.diffusion.loss, aux_l1_weight=config.optim.aux_l1_weight,
                         ema_decay=config.optim.ema_decay, grad_accum_steps=accum,
                         state_layouts=state_layouts or config.train.state_layouts)
  rows = parallel.batch_sharding(mesh)
  f32 = jnp.float32
  batch = {"hr": jax.ShapeDtypeStruct((b, p, p, 3), f32, sharding=rows),
           "lr": jax.ShapeDtypeStruct((b, p // s, p // s, 3), f32, sharding=rows),
           "lr_up": jax.ShapeDtypeStruct((b, p, p, 3), f32, sharding=rows),
           "spe": jax.ShapeDtypeStruct((b, p, p, 1), f32, sharding=rows)}
  return step, (_abstract(state, parallel.replicated(mesh)), batch), {"grad_accum_steps": accum}


def relaid_out_state(compiled) -> dict:
  """How many train-state arrays the compiled step takes in a layout other than row-major, and their bytes."""
  import jax
  import numpy as np
  n = nbytes = 0
  for fmt, aval in zip(jax.tree.leaves(compiled.input_formats[0][0]), jax.tree.leaves(compiled.in_avals[0][0])):
    layout = getattr(fmt, "layout", None)
    if layout is not None and tuple(layout.major_to_minor) != tuple(range(len(aval.shape))):
      n += 1
      nbytes += int(np.prod(aval.shape)) * aval.dtype.itemsize
  return {"state_relaid_out": n, "state_relaid_out_mib": round(nbytes / 2**20, 2)}


def sampler_program(model, mesh, size: tuple[int, int], batch_size: int = 1, sampler: str = "ddpm",
                    steps: int | None = None, eta: float = conventions.DEFAULT_ETA):
  """(the Upscaler's jitted sampler, abstract (params, lr, lr_up, keys)) for `batch_size` HR images of `size`."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from diffssr_jax import parallel
  from diffssr_jax.diffusion import sampling
  from diffssr_jax.inference.upscaler import hr_multiple, lr_multiple, padded_lr_size
  s = model.scale
  h, w = size
  if h % s or w % s:
    raise ValueError(f"--size {h}x{w} must be a multiple of the scale {s} (an HR image's LR has integer size)")
  if sampler == "ddpm" and steps == model.num_timesteps:
    steps = None
  n_steps = len(sampling.timesteps_for(model, sampler, steps))
  # The LR padded as Upscaler.lr_padding pads it: to the LR multiple, and the U-Net's lowest level >= 2x2.
  hr_mult = hr_multiple(model)
  lr_mult, min_lr = lr_multiple(hr_mult, s), -(-2 * hr_mult // s)
  lh, lw = padded_lr_size(h // s, lr_mult, min_lr), padded_lr_size(w // s, lr_mult, min_lr)
  fn = sampling.make_image_sampler(model, mode="diffusion", sampler=sampler, steps=steps, eta=eta, mesh=mesh)
  rows = parallel.batch_sharding(mesh)
  keys = jax.eval_shape(lambda: sampling.image_keys(0, np.arange(batch_size)))
  args = (_abstract(model.param_shapes(), parallel.replicated(mesh)),
          jax.ShapeDtypeStruct((batch_size, lh, lw, 3), jnp.float32, sharding=rows),
          jax.ShapeDtypeStruct((batch_size, lh * s, lw * s, 3), jnp.float32, sharding=rows),
          jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=rows))
  return fn, args, {"steps": n_steps, "padded_size": f"{lh * s}x{lw * s}"}


def lowered_flops(lowered) -> float | None:
  """XLA's cost analysis (HloCostAnalysis) of the lowered module, run by the CPU client: the analysis of the
  unoptimised HLO is the program's arithmetic, whatever the backend. `Lowered.cost_analysis()` does exactly
  this for built-in backends but raises for PJRT plugins such as the compile-only CUDA client."""
  import jax
  from jax._src.lib import _jax  # no public entry point runs the analysis on another backend's lowering
  try:
    cost = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, lowered.compiler_ir("hlo").as_hlo_module())
  except Exception:  # noqa: BLE001 - a cost analysis is a report, never a reason to fail
    return None
  return float(cost["flops"]) if cost and "flops" in cost else None


def program_flops(program: str, target, config, dtype, remat, mesh, **kw) -> float | None:
  """The whole program's FLOPs with every loop trip counted (see the module docstring); lowering only."""
  import jax
  import jax.numpy as jnp
  from diffssr_jax.diffusion import sampling
  config = config.copy_and_resolve_references()
  config.model.rrdb_unroll = config.model.rrdb_num_blocks
  model = build(target, config, dtype, remat)
  if program == "train":
    fn, args, _ = train_program(model, config, mesh, kw["batch_size"], kw["patch_size"], grad_accum_steps=1)
    return lowered_flops(fn.lower(*args))
  fn, args, info = sampler_program(model, mesh, kw["size"], kw["batch_size"], kw["sampler"], kw["steps"], kw["eta"])
  total = lowered_flops(fn.lower(*args))
  params, lr, lr_up, _ = args
  cond = jax.eval_shape(lambda p, lr: sampling.prepare(model, p, lr)[1], params, lr)
  t = jax.ShapeDtypeStruct((), jnp.int32)
  if kw["sampler"] == "ddpm":
    step = lambda u, c, x, t: sampling.ddpm_step(model, u, c, x, t, x)[0]  # noqa: E731
  elif kw["sampler"] == "student":
    from diffssr_jax.diffusion import student
    step = lambda u, c, x, t: student.step(model, u, c, x, t, t - 1, x)[0]  # noqa: E731
  else:
    step = lambda u, c, x, t: sampling.ddim_step(model, u, c, x, t, t - 1, x, kw["eta"])[0]  # noqa: E731
  unet = jax.eval_shape(model.cast_for_compute, params["unet"])
  one = lowered_flops(jax.jit(step).lower(unet, cond, lr_up, t))
  return None if total is None or one is None else total + (info["steps"] - 1) * one


def memory(compiled) -> dict:
  m = compiled.memory_analysis()
  out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
         "aliases": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes,
         "generated_code": m.generated_code_size_in_bytes or None}
  out["peak"] = out["arguments"] + out["outputs"] - out["aliases"] + out["temp"]
  out.update({f"{k}_gib": round(v / 2**30, 3) for k, v in list(out.items()) if v is not None})
  return out


def weight_sizes(model) -> frozenset:
  """The element counts of the model's parameters (to tell weight transposes from activation ones)."""
  import jax
  import numpy as np
  return frozenset(int(np.prod(a.shape)) for a in jax.tree.leaves(model.param_shapes()))


def compile_one(fn, args, model=None, flops=None) -> tuple[dict, object]:
  """(timings, memory, FLOPs and HLO facts; the compiled executable) of jitted `fn` at abstract `args`."""
  from diffssr_jax.benchmarks import hlo
  t0 = time.perf_counter()
  lowered = fn.lower(*args)
  t1, c1 = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  t2, c2 = time.perf_counter(), time.process_time()
  flops = lowered_flops(lowered) if flops is None else flops()
  return {"lower_seconds": round(t1 - t0, 2), "compile_seconds": round(t2 - t1, 2),
          "compile_cpu_seconds": round(c2 - c1, 2), "memory": memory(compiled),
          "tflop": None if flops is None else float(f"{flops / 1e12:.4g}"), **hlo.facts(compiled.as_text(), weight_sizes=weight_sizes(model) if model is not None else frozenset())}, compiled


def target_mesh(target):
  from diffssr_jax import parallel
  return parallel.make_mesh(targets_mod.topology(target).devices)


def run(args) -> list[dict]:
  """The `compile` subcommand: one result per program, each printed as a JSON line as soon as it is known."""
  import json
  import jax
  import numpy as np
  from diffssr_jax.benchmarks.model import load_config
  target = targets_mod.get(args.target)
  mesh = target_mesh(target)
  config = load_config(args.config)
  model = build(target, config, args.dtype, args.remat)
  common = {"target": target.name, "device_kind": mesh.devices.flat[0].device_kind, "num_devices": mesh.size,
            "dtype": np.dtype(model.dtype).name, "remat": bool(args.remat), "jax": jax.__version__,
            "cpu_count": os.cpu_count(), "config": args.config or "diffssr_jax/configs/base.py",
            # XLA's trade of compile time against run time (JAX_EXEC_TIME_OPTIMIZATION_EFFORT, default 0)
            "exec_time_optimization_effort": jax.config.jax_exec_time_optimization_effort}
  programs = PROGRAMS if args.program == "both" else (args.program,)
  flops_of = lambda name, **kw: (lambda: program_flops(name, target, config, args.dtype, args.remat, mesh, **kw))  # noqa: E731
  results = []
  for name in programs:
    load = os.getloadavg()[0]
    if name == "train":
      layouts = getattr(args, "state_layouts", None) or config.train.state_layouts
      fn, fargs, info = train_program(model, config, mesh, args.batch_size, args.patch_size, args.grad_accum_steps,
                                      layouts)
      info = {"batch_size": args.batch_size, "patch_size": args.patch_size, "state_layouts": layouts, **info}
      flops = flops_of(name, batch_size=args.batch_size, patch_size=args.patch_size)
    else:
      fn, fargs, info = sampler_program(model, mesh, args.size, args.sample_batch_size, args.sampler, args.steps,
                                        args.eta)
      info = {"batch_size": args.sample_batch_size, "size": "x".join(map(str, args.size)), "sampler": args.sampler,
              **info}
      flops = flops_of(name, size=args.size, batch_size=args.sample_batch_size, sampler=args.sampler,
                       steps=args.steps, eta=args.eta)
    result, compiled = compile_one(fn, fargs, model, flops)
    if name == "train":
      result.update(relaid_out_state(compiled))
    result = {"program": name, **common, **info, **result,
              "load_avg_1m": round(max(load, os.getloadavg()[0]), 2)}
    print(json.dumps(result), flush=True)
    results.append(result)
  return results
