"""Preemption (SIGTERM) in every stage: the current unit is finished or saved, then the command stops cleanly.

Schedulers (Kubernetes, SLURM, spot/preemptible VMs, TPU maintenance) send SIGTERM some seconds before they
kill a job. Every long-running command (training's RRDB and diffusion stages with their validation,
evaluate, export) runs inside `handle_sigterm()`; its loops call `requested()` at the end of each unit (a
training step, an evaluated image, an exported image) and, when it is set, make that unit durable and raise
`Preempted`. The command line turns that into one line on stderr and exit status `EXIT_PREEMPTED` (143,
the shell's status of a SIGTERMed process): non-zero, so a scheduler retries the job, but no traceback, and
the rerun continues where the uninterrupted run would be.

Several processes (multi-host training): JAX's preemption service (on by default in
`jax.distributed.initialize`) catches SIGTERM on whichever host gets it and agrees on one step for all of
them, which `multihost_utils.reached_preemption_sync_point` reports; `handle_sigterm` then leaves SIGTERM to
JAX (a Python handler would replace JAX's), and training asks `reached_sync_point(step)`, so every process
saves the same step and stops together instead of one waiting forever in a collective for the others.

jax-free (the torch-only export tool uses it); jax is imported only in `reached_sync_point`.
"""
from __future__ import annotations

import contextlib
import signal
import threading

EXIT_PREEMPTED = 143  # 128 + SIGTERM

_flag = threading.Event()
_depth = [0]  # nesting of handle_sigterm (train_and_evaluate around each stage's loop)


class Preempted(Exception):
  """SIGTERM was received; what was done is saved. The message says what and how to continue."""


def requested() -> bool:
  """Whether this process received SIGTERM inside `handle_sigterm`."""
  return _flag.is_set()


def request() -> None:
  """Marks preemption as requested (what the SIGTERM handler does)."""
  _flag.set()


def _multi_process() -> bool:
  import sys
  jax = sys.modules.get("jax")  # never import jax here (export runs without it)
  return jax is not None and jax.process_count() > 1


def reached_sync_point(step: int) -> bool:
  """Whether training should save and stop after `step`: with several processes JAX's preemption sync point
  (the same step on every process, see the module docstring), otherwise this process' own SIGTERM flag.
  Call it at every step, on every process."""
  if _multi_process():
    from jax.experimental import multihost_utils
    return multihost_utils.reached_preemption_sync_point(int(step))
  return requested()


@contextlib.contextmanager
def handle_sigterm():
  """Within the block SIGTERM sets the flag instead of killing the process (main thread only: signal
  handlers cannot be installed elsewhere; in a multi-process JAX run JAX's own handler is kept). The
  outermost block clears the flag on entry and exit and restores the previous handler on exit; nested
  blocks keep both (a SIGTERM between two training stages is still seen by the second)."""
  if _depth[0]:
    _depth[0] += 1
    try:
      yield
    finally:
      _depth[0] -= 1
    return
  _flag.clear()
  own = threading.current_thread() is threading.main_thread() and not _multi_process()
  previous = signal.getsignal(signal.SIGTERM) if own else None
  if own:
    signal.signal(signal.SIGTERM, lambda *_: _flag.set())
  _depth[0] += 1
  try:
    yield
  finally:
    _depth[0] -= 1
    _flag.clear()  # answered inside the block; code run after it (another command in-process) starts anew
    if own:
      signal.signal(signal.SIGTERM, previous)
