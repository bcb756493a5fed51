"""One stage's training loop (`run_loop`) and what it runs with: the input prefetcher, the logs (metrics.jsonl,
TensorBoard, the `diffssr_jax` logger, a tqdm bar) and the profiler.

The host syncs only at log / checkpoint / eval intervals: a step's metrics stay on the device until its
log line. Checkpoints are saved only after the losses of every step up to them were checked (a NaN loss
stops the run with the step named and the last good checkpoint kept). SIGTERM (see diffssr_jax.preemption)
saves the step reached and raises Preempted once that checkpoint is on disk.

Logs: metrics.jsonl (one JSON line per logged step), TensorBoard events (tensorboardX) under tb/ with the
validation's sample panels (LR | bicubic | RRDB | SR | HR), the `diffssr_jax` logger and a tqdm progress
bar with steps/s and ETA; `train.profile_at` writes a JAX profiler trace of `train.profile_steps` steps to
profile/. (clu's metric writers and periodic actions, which the flax examples use, import TensorFlow, which
this project does not install.) Only process 0 writes them.
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
import ml_collections
import numpy as np
import tqdm

from diffssr_jax import fileio, parallel, preemption, storage
from diffssr_jax.training import checkpointing, integrity

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  pass


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

  def close(self, timeout_s: float = 60.0):
    """Stops the thread and waits for it (a batch being read or placed is finished first). A daemon thread
    left running when the process exits can be ended by the interpreter inside native code (jax's transfer to
    the devices), which aborts the process (exit -6, "FATAL: exception not rethrown") after a clean error line.
    The iterator it reads is closed by its owner (`train.fit`)."""
    self._stop.set()
    self.thread.join(timeout_s)
    if self.thread.is_alive():
      log.warning("the input thread did not stop within %.0f s (a read still blocked)", timeout_s)
    while not self.q.empty():  # the device buffers of batches read ahead
      self.q.get_nowait()


# ----------------------------------------------------------------------------- logs
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

  def images(self, step: int, panels, most: int = 4):
    """The first `most` of [(name, uint8 HxWx3 image)] as TensorBoard images `samples/<name>`."""
    if not self.enabled:
      return
    for name, image in panels[:most]:
      self.tb.add_image(f"samples/{name}", image, step, dataformats="HWC")

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
@dataclasses.dataclass
class Loop:
  """What one stage's loop runs with, besides the state and the input stream."""
  workdir: pathlib.Path
  train_cfg: ml_collections.ConfigDict          # log_every, eval_every, checkpoint_every, profile_at/steps
  num_steps: int                                # trains until the state's step is this
  step_fn: Callable                             # (state, batch) -> (state, metrics with "loss")
  lr_schedule: Callable                         # step -> learning rate (logged)
  mesh: jax.sharding.Mesh                       # the batches are sharded over it
  checkpointer: checkpointing.Checkpointer | None = None
  resumed: checkpointing.Restored | None = None  # what the state was restored from (named by a NaN loss)
  # (state, step) -> (metrics with "psnr_y", [(name, panel image)]) or None; every process calls it.
  evaluate_fn: Callable | None = None
  name: str = "train"                           # progress-bar label, and the stage in messages
  stop_after: int | None = None                 # stop after this many steps of this process (tests)


def check_finite(losses, first_step: int, resumed: checkpointing.Restored | None = None) -> None:
  """Raises NonFiniteLossError naming the first step (after `first_step`) whose loss is NaN or infinite and,
  when the run resumed from a checkpoint, which one and whether its bytes were verified."""
  losses = np.asarray(jax.device_get(losses))
  bad = np.nonzero(~np.isfinite(losses))[0]
  if not bad.size:
    return
  step = first_step + int(bad[0]) + 1
  msg = f"loss is {losses[bad[0]]} at step {step}: stopping; the last good checkpoint is kept"
  if resumed is not None and not resumed.verified:
    msg += (f". This run resumed at step {resumed.step} from {resumed.path}, which had no checksum manifest "
            f"(accepted through {integrity.TRUST_ENV}): a NaN {step - resumed.step} step(s) after such a "
            "restore points to a damaged checkpoint; move that folder aside and run again to resume from the "
            "previous step")
  else:
    if resumed is not None:
      msg += f" (resumed at step {resumed.step} from {resumed.path}, whose checksums matched)"
    msg += " (lower the learning rate or check the data)"
  raise NonFiniteLossError(msg)


class _Window:
  """The metrics of the steps since the last log line, kept on the device until `flush`."""

  def __init__(self, step: int):
    self.metrics, self.start, self.t0 = [], step, time.time()

  def flush(self, step: int, loop: Loop) -> dict | None:
    """Their means (+ steps/s, lr) after checking the losses; None when no step ran since the last flush."""
    if not self.metrics:
      return None
    got = jax.device_get(self.metrics)  # one transfer of the window's metrics
    check_finite([m["loss"] for m in got], self.start, loop.resumed)
    means = {k: float(np.mean([m[k] for m in got])) for k in got[0]}
    means["steps_per_s"] = len(self.metrics) / max(time.time() - self.t0, 1e-9)
    means["lr"] = float(loop.lr_schedule(step - 1))
    self.metrics, self.start, self.t0 = [], step, time.time()
    return means


def _log_train(step: int, means: dict, loop: Loop, logger: Logger, bar) -> None:
  eta = (loop.num_steps - step) / max(means["steps_per_s"], 1e-9)
  logger.scalars(step, means)
  bar.set_postfix(loss=f"{means['loss']:.4f}", eta=f"{eta / 60:.1f}min")
  if is_main_process():
    log.info("step %d loss %.5f grad_norm %.3f lr %.2e %.2f steps/s ETA %.1f min", step, means["loss"],
             means.get("grad_norm", float("nan")), means["lr"], means["steps_per_s"], eta / 60)


def run_loop(loop: Loop, state, data_iter, data_start: int = 0):
  """Trains `state` until `loop.num_steps` (or `loop.stop_after` steps of this process). Returns (state,
  history): history is the list of (step, means) logged.

  `data_iter` yields this process' part of each global batch; `data_start` is the step its stream started
  at (saved with its position).
  """
  workdir = storage.native(loop.workdir)
  cfg, num_steps = loop.train_cfg, loop.num_steps
  step = start = int(jax.device_get(state.step))
  logger = Logger(workdir, start)
  profiler = Profiler(workdir, cfg.profile_at, cfg.profile_steps)
  prefetch = Prefetcher(data_iter, loop.mesh, data_start)
  window = _Window(start)
  log_every = max(1, cfg.log_every)
  bar = tqdm.tqdm(total=num_steps, initial=start, desc=loop.name, disable=not is_main_process(), mininterval=2.0,
                  dynamic_ncols=True)
  history, data_state, done_here, preempted = [], None, 0, False

  def flush(step):
    means = window.flush(step, loop)
    if means is not None:
      history.append((step, means))
      _log_train(step, means, loop, logger, bar)

  try:
    with preemption.handle_sigterm():
      while step < num_steps:
        batch, data_state = prefetch.next()
        profiler.step(step + 1)
        state, metrics = loop.step_fn(state, batch)
        step += 1
        done_here += 1
        window.metrics.append(metrics)
        bar.update(1)
        # Asked at every step on every process: with several processes JAX's preemption service makes
        # them all answer True at the same step (see diffssr_jax.preemption).
        preempted = preemption.reached_sync_point(step)
        last = step == num_steps or (loop.stop_after is not None and done_here >= loop.stop_after)
        if step % log_every == 0 or last or preempted:
          flush(step)
        val = None
        if loop.evaluate_fn is not None and (step % cfg.eval_every == 0 or step == num_steps):
          flush(step)
          out = loop.evaluate_fn(state, step)
          if out:
            val, panels = out
            logger.scalars(step, val, kind="val")
            logger.images(step, panels)
          # A SIGTERM during validation: this step is saved (with its metrics) and the run stops here.
          preempted = preempted or preemption.reached_sync_point(step)
        if step % cfg.checkpoint_every == 0 or last or preempted or val:
          flush(step)  # never checkpoint a state whose losses were not checked
          if loop.checkpointer is not None:
            loop.checkpointer.save(step, state, data_state)
            if val and "psnr_y" in val:
              loop.checkpointer.save_best(step, state, val["psnr_y"], data_state)
        if (preempted and step < num_steps) or (loop.stop_after is not None and done_here >= loop.stop_after):
          break
  finally:
    profiler.stop()
    prefetch.close()
    bar.close()
    if loop.checkpointer is not None:
      loop.checkpointer.wait()
    logger.close()
  if preempted and step < num_steps:  # raised only once the step's checkpoint is complete on disk
    raise preemption.Preempted(f"SIGTERM: saved {loop.name} step {step} of {num_steps} in {workdir}; run the "
                               "same command again to continue from there")
  return state, history
