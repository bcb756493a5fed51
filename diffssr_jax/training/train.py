"""The training job: RRDB pre-training and diffusion training on one skeleton (`fit`), with checkpoints,
exact resume, validation and logs, on one process or many.

`train_and_evaluate(config, workdir)` is what `python -m diffssr_jax.main` runs. One compiled train step per
run (`train_step.make_step`); the host syncs only at log / checkpoint / eval intervals.

Several processes (multi-host GPU or TPU): every process runs this same code on its own devices; the mesh
spans all of them (`diffssr_jax.parallel`), each process feeds its contiguous part of every global batch
(`data.pipeline`), saves and restores its own iterator position, and takes part in every collective
(train step, validation sampling, checkpoint saves). Only process 0 writes config.json, metrics.jsonl,
TensorBoard events, sample panels and summary.json.

Logs: metrics.jsonl (one JSON line per logged step), TensorBoard events (tensorboardX) under tb/, the
`diffssr_jax` logger and a tqdm progress bar with steps/s and ETA; `train.profile_at` writes a JAX profiler
trace of `train.profile_steps` steps to profile/. (clu's metric writers and periodic actions, which the
flax examples use, import TensorFlow, which this project does not install.)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import queue
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from diffssr_jax import compilation_cache, fileio, parallel, preemption, storage
from diffssr_jax.data import pipeline
from diffssr_jax.diffusion import sampling
from diffssr_jax.diffusion.model import build_model, compute_dtype
from diffssr_jax.models import build_rrdb
from diffssr_jax.models.initializers import init_params
from diffssr_jax.training import checkpointing, train_step, validate
from diffssr_jax.training import workdir as workdir_lib

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  pass


# The checkpoint this process last resumed from (set by _restore_or_start), for _check_finite's message.
_RESUMED_FROM: dict = {}


def is_main_process() -> bool:
  return jax.process_index() == 0


# ----------------------------------------------------------------------------- input
class Prefetcher:
  """Reads and shards the next batches on a background thread while the devices compute.

  Each batch travels with the position *after* it was read ({"start_step", "iterator": grain state}), so
  the position saved with a checkpoint is exactly that of the batches consumed, not of those read ahead.
  """

  def __init__(self, iterator, mesh, start_step: int, size: int = 2):
    self.iterator, self.mesh, self.start_step = iterator, mesh, start_step
    self.q: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self.thread = threading.Thread(target=self._run, daemon=True)
    self.thread.start()

  def _run(self):
    try:
      while not self._stop.is_set():
        batch = next(self.iterator)
        state = {"start_step": self.start_step, "iterator": self.iterator.get_state()}
        item = (parallel.shard_batch(batch, self.mesh), state)
        while not self._stop.is_set():
          try:
            self.q.put(item, timeout=0.2)
            break
          except queue.Full:
            continue
    except BaseException as e:  # surfaced to the consumer
      self.q.put(e)

  def next(self):
    item = self.q.get()
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self):
    self._stop.set()


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


# ----------------------------------------------------------------------------- logging
class Logger:
  """metrics.jsonl + TensorBoard (tensorboardX) + the `diffssr_jax` logger; writes on process 0 only."""

  def __init__(self, workdir, resume_step: int):
    self.enabled = is_main_process()
    self.jsonl = workdir / "metrics.jsonl"
    self.tb = None
    if not self.enabled:
      return
    # Drop entries logged after the checkpoint we resume from, so the file is the run's true history.
    if self.jsonl.exists():
      kept = [l for l in self.jsonl.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= resume_step]
      fileio.atomic_write(self.jsonl, "".join(l + "\n" for l in kept))
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(str(workdir / "tb"))

  def scalars(self, step: int, values: dict, kind: str = "train"):
    if not self.enabled:
      return
    fileio.append_text(self.jsonl, json.dumps({"step": step, "kind": kind, **{k: float(v) for k, v in values.items()}})
                       + "\n")
    for k, v in values.items():
      self.tb.add_scalar(f"{kind}/{k}", float(v), step)

  def images(self, step: int, paths):
    if not self.enabled:
      return
    from diffssr_jax.images import read_rgb8
    for p in paths[:4]:
      self.tb.add_image(f"samples/{pathlib.Path(p).stem.split('_step')[0]}", read_rgb8(p, warn=False), step,
                        dataformats="HWC")

  def close(self):
    if self.tb is not None:
      self.tb.close()


class Profiler:
  """A JAX profiler trace of steps [at, at + steps) into WORKDIR/profile (process 0; off when at is 0)."""

  def __init__(self, workdir, at: int, steps: int):
    self.dir, self.at, self.end, self.on = workdir / "profile", at, at + steps, False

  def step(self, step: int):
    """Called before running step `step` (1-based)."""
    if not self.at or not is_main_process():
      return
    if step == self.at and not self.on:
      jax.profiler.start_trace(str(self.dir))
      self.on = True
    elif step == self.end and self.on:
      self.stop()
      log.info("profiler trace of steps %d-%d written to %s", self.at, self.end - 1, self.dir)

  def stop(self):
    if self.on:
      jax.profiler.stop_trace()
      self.on = False


# ----------------------------------------------------------------------------- the loop
def _check_finite(history, first_step):
  """Raises NonFiniteLossError naming the first step whose loss is NaN or infinite (and, when this process
  resumed from a checkpoint, which one and whether its bytes were verified)."""
  losses = np.asarray(jax.device_get([m["loss"] for m in history]))
  bad = np.nonzero(~np.isfinite(losses))[0]
  if bad.size:
    step = first_step + int(bad[0]) + 1
    msg = f"loss is {losses[bad[0]]} at step {step}: stopping; the last good checkpoint is kept"
    resumed = _RESUMED_FROM.get("step")
    if resumed is not None and not _RESUMED_FROM["verified"]:
      msg += (f". This run resumed at step {resumed} from {_RESUMED_FROM['path']}, which had no checksum "
              f"manifest (accepted through {checkpointing.TRUST_ENV}): a NaN {step - resumed} step(s) after "
              "such a restore points to a damaged checkpoint; move that folder aside and run again to resume "
              "from the previous step")
    else:
      if resumed is not None:
        msg += f" (resumed at step {resumed} from {_RESUMED_FROM['path']}, whose checksums matched)"
      msg += " (lower the learning rate or check the data)"
    raise NonFiniteLossError(msg)


def run_loop(*, workdir, state, step_fn, data_iter, mesh, train_cfg, num_steps, lr_schedule, evaluate_fn=None,
             checkpointer=None, data_start: int = 0, stop_after: int | None = None, desc="train"):
  """Trains until `num_steps` (or `stop_after` steps of this process, for tests). Returns (state, history).

  `data_iter` yields this process' part of each global batch; `data_start` is the step its stream started
  at (saved with its position). history: list of (step, metrics dict) logged. evaluate_fn(state, step) ->
  dict of metrics with "psnr_y" (used for the best checkpoint) or None; every process calls it.
  """
  workdir = storage.native(workdir)
  start = int(jax.device_get(state.step))
  logger = Logger(workdir, start)
  profiler = Profiler(workdir, train_cfg.profile_at, train_cfg.profile_steps)
  prefetch = Prefetcher(data_iter, mesh, data_start)
  pending, pending_start = [], start
  data_state = None
  t_last, steps_since = time.time(), 0
  log_every = max(1, train_cfg.log_every)
  bar = tqdm.tqdm(total=num_steps, initial=start, desc=desc, disable=not is_main_process(), mininterval=2.0,
                  dynamic_ncols=True)
  done_here = 0
  history = []

  def flush_metrics(step):
    nonlocal pending, pending_start, t_last, steps_since
    if not pending:
      return
    _check_finite(pending, pending_start)
    means = {k: float(np.mean(jax.device_get([m[k] for m in pending]))) for k in pending[0]}
    dt = time.time() - t_last
    means["steps_per_s"] = steps_since / max(dt, 1e-9)
    means["lr"] = float(lr_schedule(step - 1))
    eta = (num_steps - step) / max(means["steps_per_s"], 1e-9)
    logger.scalars(step, means)
    history.append((step, means))
    bar.set_postfix(loss=f"{means['loss']:.4f}", eta=f"{eta / 60:.1f}min")
    if is_main_process():
      log.info("step %d loss %.5f grad_norm %.3f lr %.2e %.2f steps/s ETA %.1f min", step, means["loss"],
               means.get("grad_norm", float("nan")), means["lr"], means["steps_per_s"], eta / 60)
    pending, pending_start, t_last, steps_since = [], step, time.time(), 0

  def save(step, eval_metrics=None):
    if checkpointer is None:
      return
    checkpointer.save(step, state, data_state)
    if eval_metrics and "psnr_y" in eval_metrics:
      checkpointer.save_best(step, state, eval_metrics["psnr_y"], data_state)

  preempted = False
  try:
    with preemption.handle_sigterm():
      step = start
      while step < num_steps:
        batch, data_state = prefetch.next()
        profiler.step(step + 1)
        state, metrics = step_fn(state, batch)
        step += 1
        done_here += 1
        steps_since += 1
        pending.append(metrics)
        bar.update(1)
        # Asked at every step on every process: with several processes JAX's preemption service makes
        # them all answer True at the same step (see diffssr_jax.preemption).
        preempted = preemption.reached_sync_point(step)
        last = step == num_steps or (stop_after is not None and done_here >= stop_after)
        if step % log_every == 0 or last or preempted:
          flush_metrics(step)
        eval_metrics = None
        if evaluate_fn is not None and (step % train_cfg.eval_every == 0 or step == num_steps):
          flush_metrics(step)
          eval_metrics = evaluate_fn(state, step)
          if eval_metrics:
            logger.scalars(step, {k: v for k, v in eval_metrics.items() if not k.startswith("_")}, kind="val")
            if eval_metrics.get("_panels"):
              logger.images(step, eval_metrics["_panels"])
          # A SIGTERM during validation: this step is saved (with its metrics) and the run stops here.
          preempted = preempted or preemption.reached_sync_point(step)
        if step % train_cfg.checkpoint_every == 0 or last or preempted or eval_metrics:
          flush_metrics(step)  # never checkpoint a state whose losses were not checked
          save(step, {k: v for k, v in (eval_metrics or {}).items() if not k.startswith("_")})
        if preempted and step < num_steps:
          break
        if stop_after is not None and done_here >= stop_after:
          break
  finally:
    profiler.stop()
    prefetch.close()
    bar.close()
    if checkpointer is not None:
      checkpointer.wait()
    logger.close()
  if preempted and step < num_steps:  # raised only once the step's checkpoint is complete on disk
    raise preemption.Preempted(f"SIGTERM: saved {desc} step {step} of {num_steps} in {workdir}; run the same "
                               "command again to continue from there")
  return state, history


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


def _mesh_and_batch(config):
  mesh = parallel.make_mesh()
  global_batch = config.train.batch_size
  n_dev = jax.device_count()
  if global_batch % n_dev:
    raise ValueError(f"train.batch_size {global_batch} is not divisible by the {n_dev} devices "
                     f"({jax.process_count()} processes x {jax.local_device_count()} local devices)")
  return mesh, global_batch // jax.process_count()


def _restore_or_start(state, config, workdir, mesh):
  """(state, data position or None, checkpointer): the newest verified checkpoint of the workdir (damaged
  steps skipped, see checkpointing), or the fresh `state`; replicated over the mesh either way."""
  ckpt = checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints,
                                    settings=checkpointing.recorded_settings(config))
  # Replicated first, so the checkpoint is restored straight into the mesh's layout (each process reads its
  # own replicas), whatever number of processes wrote it.
  state = parallel.replicate(state, mesh)
  restored = ckpt.restore_latest(state)
  data_state = None
  _RESUMED_FROM.clear()
  if restored is not None:
    state, data_state, meta = restored
    _RESUMED_FROM.update(step=int(meta["step"]), verified=ckpt.restored.verified,
                         path=str(ckpt.last.directory / str(ckpt.restored.step)))
    log.info("resuming %s from step %d%s", workdir, int(meta["step"]),
             "" if data_state else " (input stream positioned from the step: no saved position for "
             f"process {jax.process_index()} of {jax.process_count()})")
  elif ckpt.last.all_steps():
    log.warning("%s: no checkpoint could be verified; starting from step 0 (the damaged steps stay on disk and "
                "are moved aside when their step is saved again)", ckpt.last.directory)
  return state, data_state, ckpt


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


def fit(config, workdir, task: Task, stop_after=None):
  """Trains `task` in `workdir` to config.train.num_steps, resuming from its newest verified checkpoint;
  validates every train.eval_every steps on config.eval's images. Returns (state, last validation summary)."""
  workdir = storage.native(workdir)
  if is_main_process():
    checkpointing.save_config(config, workdir)
  mesh, per_process = _mesh_and_batch(config)
  state, data_state, ckpt = _restore_or_start(task.state, config, workdir, mesh)
  val = _validation_images(config) if task.validation_fn is not None else []
  # Validation batches are split over every device of every process.
  n_dev = jax.device_count()
  val_batch = -(-config.eval.batch_size // n_dev) * n_dev
  last_summary = {}

  def evaluate(st, step):
    if not val:
      return None
    out = validate.run_validation(val, config.model.scale, model_fn=task.validation_fn(st.model_params(use_ema=True)),
                                  batch_size=val_batch, out_dir=workdir / "samples" if is_main_process() else None,
                                  step=step)
    last_summary.clear()
    last_summary.update(out)
    return task.val_metrics(out)

  step = int(jax.device_get(state.step))
  total = config.train.num_steps
  try:
    if step < total:
      data_iter, data_start = data_iterator(config, per_process, step, data_state)
      state, _ = run_loop(workdir=workdir, state=state, step_fn=task.step_fn, data_iter=data_iter, mesh=mesh,
                          train_cfg=config.train, num_steps=total, lr_schedule=task.lr_schedule,
                          evaluate_fn=evaluate, checkpointer=ckpt, data_start=data_start, stop_after=stop_after,
                          desc=task.name)
  finally:
    ckpt.close()
  return state, dict(last_summary)


def rrdb_task(config) -> Task:
  """Stage 1 of the official recipe: the RRDB encoder trained alone with L1."""
  rrdb = build_rrdb(config.model, compute_dtype(config.model.dtype))
  mesh = parallel.make_mesh()
  params = init_params(rrdb, jax.random.key(config.seed), jnp.zeros((1, 8, 8, 3)))
  total = config.train.num_steps
  tx = train_step.make_optimizer(config.optim, total)
  state = train_step.init_train_state({"rrdb": params}, {}, tx, seed=config.seed, use_ema=config.optim.ema_decay > 0)
  step_fn = train_step.make_rrdb_train_step(rrdb, tx, mesh, ema_decay=config.optim.ema_decay,
                                            grad_accum_steps=config.optim.grad_accum_steps)

  def apply(params, lr, lr_up, keys):
    del lr_up, keys
    return rrdb.apply(params["rrdb"], lr, decode=True)[0]

  rows, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  fn = jax.jit(apply, in_shardings=(rep, rows, rows, rows), out_shardings=rows)
  key = jax.random.key(config.seed + 1)
  return Task("rrdb", state, step_fn, train_step.learning_rate_schedule(config.optim, total),
              lambda p: _wrap(_sharded_model_fn(fn, mesh, p, key), lambda out: {"rrdb": out}),
              lambda out: {"psnr_y": out["rrdb"]["psnr_y"], "ssim_y": out["rrdb"]["ssim_y"],
                           "bicubic_psnr_y": out["bicubic"]["psnr_y"]})


def diffusion_task(config, rrdb_params) -> Task:
  """Stage 2: the diffusion U-Net on the (frozen) RRDB features."""
  model = build_model(config)
  mesh = parallel.make_mesh()
  params = model.init(jax.random.key(config.seed))
  if rrdb_params is not None:
    params["rrdb"] = jax.tree.map(jnp.asarray, rrdb_params)
  total = config.train.num_steps
  tx = train_step.make_optimizer(config.optim, total)
  state = train_step.create_train_state(model, params, tx, seed=config.seed, train_rrdb=config.optim.train_rrdb,
                                        use_ema=config.optim.ema_decay > 0)
  step_fn = train_step.make_train_step(model, tx, mesh, loss_type=config.diffusion.loss,
                                       aux_l1_weight=config.optim.aux_l1_weight, ema_decay=config.optim.ema_decay,
                                       grad_accum_steps=config.optim.grad_accum_steps)
  fn = sampling.make_image_sampler(model, sampler=config.eval.sampler, steps=config.eval.steps or None,
                                   eta=config.eval.eta, mesh=mesh)
  key = jax.random.key(config.seed + 1)
  return Task("diffusion", state, step_fn, train_step.learning_rate_schedule(config.optim, total),
              lambda p: _wrap(_sharded_model_fn(fn, mesh, p, key), lambda out: {"diffusion": out[0], "rrdb": out[1]}),
              lambda out: {"psnr_y": out["diffusion"]["psnr_y"], "ssim_y": out["diffusion"]["ssim_y"],
                           "rrdb_psnr_y": out["rrdb"]["psnr_y"], "bicubic_psnr_y": out["bicubic"]["psnr_y"]})


def _wrap(fn, name_outputs):
  return lambda lr, lr_up, indices: name_outputs(fn(lr, lr_up, indices))


def _rrdb_params(config, workdir, stop_after=None):
  """The frozen encoder: from train.rrdb_checkpoint, or pre-trained here first (rrdb_pretrain section)."""
  if config.train.rrdb_checkpoint:
    return checkpointing.load_rrdb_params(config.train.rrdb_checkpoint)
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
    state, _ = fit(sub, storage.native(workdir) / "rrdb", rrdb_task(sub), stop_after=stop_after)
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
    checkpointing.save_config(config, workdir)
  if config.data.demo_dir:
    from diffssr_jax.data.demo import build_demo_dataset
    if is_main_process():
      build_demo_dataset(config.data.demo_dir, scale=config.model.scale)
    parallel.barrier("demo_data")
  if config.task == "rrdb":
    state, _ = fit(config, workdir, rrdb_task(config))
    return state
  if config.task == "distill":
    from diffssr_jax.training import distill
    return distill.run(config, workdir)
  if config.task != "diffusion":
    raise ValueError(f"unknown task {config.task!r} (expected 'diffusion', 'rrdb' or 'distill')")
  rrdb_params = _rrdb_params(config, workdir)
  if preemption.requested():  # SIGTERM after the RRDB stage's last step: stop before the next stage starts
    raise preemption.Preempted(f"SIGTERM: the RRDB pre-training is complete in {workdir / 'rrdb'}; run the same "
                               "command again to train the diffusion model")
  state, summary = fit(config, workdir, diffusion_task(config, rrdb_params))
  if summary and is_main_process():
    write_summary(workdir, summary, int(jax.device_get(state.step)), config)
  return state
