"""The training job: RRDB pre-training and diffusion training on one skeleton (`fit`), with checkpoints,
exact resume, validation and logs, on one process or many.

`train_and_evaluate(config, workdir)` is what `python -m diffssr_jax.main` runs. One compiled train step per
run (`train_step.make_step`); the host syncs only at log / checkpoint / eval intervals.

Several processes (multi-host GPU or TPU): every process runs this same code on its own devices; the mesh
spans all of them (`diffssr_jax.parallel`), each process feeds its contiguous part of every global batch
(`data.pipeline`), saves and restores its own iterator position, and takes part in every collective
(train step, validation sampling, checkpoint saves). Only process 0 writes config.json, metrics.jsonl,
TensorBoard events, sample panels and summary.json.

The loop itself, its logs (metrics.jsonl, TensorBoard with sample panels, a progress bar) and the
profiler: training/loop.py. One mesh per run (`parallel.make_mesh`, made once here and passed down).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffssr_jax import compilation_cache, fileio, parallel, preemption, storage
from diffssr_jax.data import pipeline
from diffssr_jax.diffusion import sampling
from diffssr_jax.diffusion.model import build_model
from diffssr_jax.inference import loading
from diffssr_jax.models import convert
from diffssr_jax.models.initializers import init_params
from diffssr_jax.training import checkpointing, train_step, validate
from diffssr_jax.training import workdir as workdir_lib
from diffssr_jax.training import weights_only
from diffssr_jax.training.loop import Loop, is_main_process, run_loop

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- input
def data_iterator(config, per_process_batch: int, step: int, saved=None):
  """(this process' training iterator positioned after `step` batches, its start step). A saved position
  of this process (same process index and count) is restored as saved; without one (a fresh run, or a
  resume with another number of processes) the stream starts at `step`: batch s of a process depends only
  on (seed, s, process index, process count), so either way the batches are those of an uninterrupted run."""
  start = int(saved["start_step"]) if saved else int(step)
  it = pipeline.make_train_iterator(config.data, scale=config.model.scale, seed=config.seed,
                                    batch_size=per_process_batch, process_index=jax.process_index(),
                                    process_count=jax.process_count(), start_step=start)
  if saved:
    it.set_state(saved["iterator"])
  return it, start


# ----------------------------------------------------------------------------- one skeleton, two tasks
@dataclasses.dataclass
class Task:
  """What differs between the two stages of the recipe; `fit` does the rest."""
  name: str                                     # "rrdb" | "diffusion": progress-bar label
  state: train_step.TrainState                  # the fresh state (used when the workdir has no checkpoint)
  step_fn: Callable                             # train_step.make_step(...)
  lr_schedule: Callable
  # model_fn(params) -> f(lr, lr_up, indices) -> {"rrdb": ..., ["diffusion": ...]} on numpy batches (all
  # processes call it with the same batch; it shards the batch over the mesh and gathers the outputs).
  validation_fn: Callable | None
  # (validation summary) -> the metrics logged and used for the best checkpoint ("psnr_y").
  val_metrics: Callable[[dict], dict]


def _per_process_batch(config, mesh) -> int:
  global_batch, n_dev = config.train.batch_size, mesh.size
  if global_batch % n_dev:
    raise ValueError(f"train.batch_size {global_batch} is not divisible by the {n_dev} devices "
                     f"({jax.process_count()} processes x {jax.local_device_count()} local devices)")
  return global_batch // jax.process_count()


def _restore_or_start(state, config, workdir, mesh):
  """(state, what it was restored from or None, checkpointer): the newest verified checkpoint of the workdir
  (damaged steps skipped, see checkpointing), or the fresh `state`; replicated over the mesh either way."""
  ckpt = checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints,
                                    settings=workdir_lib.recorded_settings(config))
  # Replicated first, so the checkpoint is restored straight into the mesh's layout (each process reads its
  # own replicas), whatever number of processes wrote it.
  state = parallel.replicate(state, mesh)
  restored = weights_only.restore_latest(ckpt, state)  # a converted official checkpoint: fresh optimizer
  if restored is not None:
    state = restored.tree
    log.info("resuming %s from step %d%s", workdir, restored.step,
             "" if restored.data_state else " (input stream positioned from the step: no saved position for "
             f"process {jax.process_index()} of {jax.process_count()})")
  elif ckpt.last.all_steps():
    log.warning("%s: no checkpoint could be verified; starting from step 0 (the damaged steps stay on disk and "
                "are moved aside when their step is saved again)", ckpt.last.directory)
  return state, restored, ckpt


def _validation_images(config):
  if not config.eval.hr_dir:
    return []
  return validate.load_validation_images(config.eval, config.model.scale, config.data.lr_up_divisor,
                                         unet_levels=len(config.model.unet_dim_mults))


def _sharded_model_fn(fn, mesh, params, key):
  """numpy (lr, lr_up, indices) -> numpy outputs of fn(params, lr, lr_up, keys) with the batch split over the
  mesh (every process passes the whole batch and keeps its rows) and the outputs gathered on every process;
  image i draws its noise from fold_in(key, indices[i])."""
  def run(lr, lr_up, indices):
    rows = parallel.process_slice(len(lr), mesh)
    keys = jax.random.key_data(jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(indices, jnp.uint32)))
    local = {"lr": lr[rows], "lr_up": lr_up[rows], "keys": np.asarray(keys)[rows]}
    g = parallel.shard_batch(local, mesh)
    return parallel.gather(fn(params, g["lr"], g["lr_up"], jax.random.wrap_key_data(g["keys"])))
  return run


def fit(config, workdir, task: Task, mesh, stop_after=None):
  """Trains `task` in `workdir` to config.train.num_steps on `mesh`, resuming from its newest verified
  checkpoint; validates every train.eval_every steps on config.eval's images (PNG panels in samples/ and
  TensorBoard). Returns (state, last validation summary)."""
  workdir = storage.native(workdir)
  if is_main_process():
    workdir_lib.save_config(config, workdir)
  per_process = _per_process_batch(config, mesh)
  state, restored, ckpt = _restore_or_start(task.state, config, workdir, mesh)
  val = _validation_images(config) if task.validation_fn is not None else []
  # Validation batches are split over every device of every process.
  val_batch = -(-config.eval.batch_size // mesh.size) * mesh.size
  last_summary = {}

  def evaluate(st, step):
    if not val:
      return None
    out, panels = validate.run_validation(val, config.model.scale, batch_size=val_batch,
                                          model_fn=task.validation_fn(st.model_params(use_ema=True)))
    if is_main_process():
      validate.save_panels(panels, workdir / "samples", step)
    last_summary.clear()
    last_summary.update(out)
    return task.val_metrics(out), panels

  step = int(jax.device_get(state.step))
  total = config.train.num_steps
  data_iter = None
  try:
    if step < total:
      data_iter, data_start = data_iterator(config, per_process, step, restored.data_state if restored else None)
      loop = Loop(workdir, config.train, total, task.step_fn, task.lr_schedule, mesh, checkpointer=ckpt,
                  resumed=restored, evaluate_fn=evaluate, name=task.name, stop_after=stop_after)
      state, _ = run_loop(loop, state, data_iter, data_start)
  finally:
    if data_iter is not None:  # grain's read threads (and workers) end here, not in the interpreter's exit
      data_iter.close()
    ckpt.close()
  return state, dict(last_summary)


def rrdb_task(config, mesh) -> Task:
  """Stage 1 of the official recipe: the RRDB encoder trained alone with L1."""
  model = build_model(config)  # its RRDB; the U-Net is only described (no params), for the shared sampler
  rrdb = model.rrdb
  params = init_params(rrdb, jax.random.key(config.seed), jnp.zeros((1, 8, 8, 3)))
  total = config.train.num_steps
  tx = train_step.make_optimizer(config.optim, total)
  state = train_step.init_train_state({"rrdb": params}, {}, tx, seed=config.seed, use_ema=config.optim.ema_decay > 0)
  step_fn = train_step.make_rrdb_train_step(rrdb, tx, mesh, ema_decay=config.optim.ema_decay,
                                            grad_accum_steps=config.optim.grad_accum_steps,
                                            state_layouts=config.train.state_layouts)

  fn = sampling.make_image_sampler(model, mode="rrdb", mesh=mesh)  # (rrdb image, rrdb image)
  key = jax.random.key(config.seed + 1)
  return Task("rrdb", state, step_fn, train_step.learning_rate_schedule(config.optim, total),
              lambda p: _wrap(_sharded_model_fn(fn, mesh, p, key), lambda out: {"rrdb": out[1]}),
              lambda out: {"psnr_y": out["rrdb"]["psnr_y"], "ssim_y": out["rrdb"]["ssim_y"],
                           "bicubic_psnr_y": out["bicubic"]["psnr_y"]})


def diffusion_task(config, rrdb_params, mesh) -> Task:
  """Stage 2: the diffusion U-Net on the (frozen) RRDB features."""
  model = build_model(config)
  params = model.init(jax.random.key(config.seed))
  if rrdb_params is not None:
    params["rrdb"] = jax.tree.map(jnp.asarray, rrdb_params)
  total = config.train.num_steps
  tx = train_step.make_optimizer(config.optim, total)
  state = train_step.create_train_state(model, params, tx, seed=config.seed, train_rrdb=config.optim.train_rrdb,
                                        use_ema=config.optim.ema_decay > 0)
  step_fn = train_step.make_train_step(model, tx, mesh, loss_type=config.diffusion.loss,
                                       aux_l1_weight=config.optim.aux_l1_weight, ema_decay=config.optim.ema_decay,
                                       grad_accum_steps=config.optim.grad_accum_steps,
                                       state_layouts=config.train.state_layouts)
  fn = sampling.make_image_sampler(model, sampler=config.eval.sampler, steps=config.eval.steps or None,
                                   eta=config.eval.eta, mesh=mesh)
  key = jax.random.key(config.seed + 1)
  return Task("diffusion", state, step_fn, train_step.learning_rate_schedule(config.optim, total),
              lambda p: _wrap(_sharded_model_fn(fn, mesh, p, key), lambda out: {"diffusion": out[0], "rrdb": out[1]}),
              lambda out: {"psnr_y": out["diffusion"]["psnr_y"], "ssim_y": out["diffusion"]["ssim_y"],
                           "rrdb_psnr_y": out["rrdb"]["psnr_y"], "bicubic_psnr_y": out["bicubic"]["psnr_y"]})


def _wrap(fn, name_outputs):
  return lambda lr, lr_up, indices: name_outputs(fn(lr, lr_up, indices))


def load_rrdb_params(path) -> dict:
  """RRDB encoder weights {"params": ...} from our RRDB (or diffusion) workdir or an official checkpoint."""
  path = storage.native(path)
  if path.is_dir():
    params, _ = loading.load_workdir_params(path, use_ema=False)
  else:
    params = convert.torch_to_flax(convert.load_torch_checkpoint(path))
  if "rrdb" not in params:
    raise ValueError(f"{path}: the checkpoint holds no RRDB weights")
  return params["rrdb"]


def _rrdb_params(config, workdir, mesh, stop_after=None):
  """The frozen encoder: from train.rrdb_checkpoint, or pre-trained here first (rrdb_pretrain section)."""
  if config.train.rrdb_checkpoint:
    return load_rrdb_params(config.train.rrdb_checkpoint)
  pre = config.rrdb_pretrain
  if pre.num_steps > 0:
    sub = ml_collections.ConfigDict(config.to_dict())
    sub.task = "rrdb"
    sub.train.num_steps = pre.num_steps
    sub.train.batch_size = pre.batch_size
    sub.optim.lr = pre.lr
    sub.optim.schedule = pre.schedule
    sub.train.eval_every = sub.train.checkpoint_every = pre.num_steps
    sub.optim.ema_decay = 0.0
    state, _ = fit(sub, storage.native(workdir) / "rrdb", rrdb_task(sub, mesh), mesh, stop_after=stop_after)
    done = int(jax.device_get(state.step))
    # The U-Net is trained on the encoder for good (its checkpoints keep these weights): never on an
    # unfinished one. fit raises Preempted itself; this catches any other early return.
    if done < pre.num_steps:
      raise RuntimeError(f"the RRDB pre-training stopped at step {done} of {pre.num_steps}; the diffusion stage "
                         "is not started on an unfinished encoder")
    return jax.device_get(state.model_params()["rrdb"])
  if config.optim.train_rrdb:
    return None
  raise ValueError("the RRDB encoder is frozen but no weights were given: set train.rrdb_checkpoint to an RRDB "
                   "workdir or an official .ckpt, or enable rrdb_pretrain")


def write_summary(workdir, summary: dict, step: int, config):
  """WORKDIR/summary.json: {"bicubic": {...}, "rrdb": {...}, "diffusion": {...}} on the held-out images."""
  out = dict(summary)
  out["step"] = step
  steps = config.eval.steps or (config.diffusion.timesteps if config.eval.sampler == "ddpm" else None)
  out["eval"] = {"sampler": config.eval.sampler, "steps": steps, "crop_size": config.eval.crop_size,
                 "images": config.eval.hr_dir, "crop_border": config.model.scale}
  path = storage.native(workdir) / "summary.json"
  fileio.atomic_write_json(path, out, indent=2)
  return path


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool = False):
  """Runs the configured task in `workdir` (resuming from its latest verified checkpoint).

  In this order, so that a refused run leaves the workdir as it was: the config's values are checked
  (config_check.validate: every problem in one ConfigError, nothing touched yet), a workdir whose
  checkpoints were made with other settings is refused (workdir.check_config; `allow_config_change` lets
  the safe ones (steps, learning rate, intervals, ...) differ), then the workdir is locked
  (lock.workdir_lock: one writer per workdir, WorkdirLockedError naming the holder) and checked again. SIGTERM in any stage saves the current step
  and raises preemption.Preempted; the diffusion stage never starts on an unfinished RRDB encoder.
  Multi-process runs call `parallel.initialize` first (diffssr_jax.main does).
  """
  from diffssr_jax.training import config_check, lock
  config_check.validate(config, device_count=jax.device_count(), process_count=jax.process_count())
  if config.task == "distill":  # a missing, untrained or mismatched teacher: one line, before any work
    from diffssr_jax.training import distill
    distill.check_teacher(config)
  # Refusals before the lock file is made (the workdir stays byte-identical); checked again under the lock.
  workdir_lib.check_config(config, workdir, allow_config_change=allow_config_change)
  with lock.workdir_lock(workdir, process_index=jax.process_index(), broadcast=_broadcast_ok), \
       preemption.handle_sigterm():
    return _train_and_evaluate(config, workdir, allow_config_change)


def _broadcast_ok(ok: bool) -> bool:
  """Process 0's `ok` on every process (the lock's outcome); no collective in a single process."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


def _train_and_evaluate(config, workdir, allow_config_change):
  compilation_cache.enable(config.compilation_cache)
  workdir = storage.native(workdir)
  allowed = workdir_lib.check_config(config, workdir, allow_config_change=allow_config_change)
  if allowed:
    log.warning("%s: continuing with changed settings (--allow_config_change): %s", workdir,
                ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in allowed.items()))
  workdir.mkdir(parents=True, exist_ok=True)
  if is_main_process():
    # Before any stage: a run stopped in the RRDB stage (whose checkpoints protect the workdir) must find
    # the config it was started with when it is restarted.
    workdir_lib.save_config(config, workdir)
  if config.data.demo_dir:
    from diffssr_jax.data.demo import build_demo_dataset
    if is_main_process():
      build_demo_dataset(config.data.demo_dir, scale=config.model.scale)
    parallel.barrier("demo_data")
  mesh = parallel.make_mesh()  # the run's one mesh: every device of every process
  if config.task == "rrdb":
    state, _ = fit(config, workdir, rrdb_task(config, mesh), mesh)
    return state
  if config.task == "distill":
    from diffssr_jax.training import distill
    return distill.run(config, workdir, mesh)
  if config.task != "diffusion":
    raise ValueError(f"unknown task {config.task!r} (expected 'diffusion', 'rrdb' or 'distill')")
  rrdb_params = _rrdb_params(config, workdir, mesh)
  if preemption.requested():  # SIGTERM after the RRDB stage's last step: stop before the next stage starts
    raise preemption.Preempted(f"SIGTERM: the RRDB pre-training is complete in {workdir / 'rrdb'}; run the same "
                               "command again to train the diffusion model")
  state, summary = fit(config, workdir, diffusion_task(config, rrdb_params, mesh), mesh)
  if summary and is_main_process():
    write_summary(workdir, summary, int(jax.device_get(state.step)), config)
  return state
