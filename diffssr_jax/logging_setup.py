"""Logging for the commands: one stderr handler, library loggers quiet unless `--verbosity`, and log lines
kept off the progress bars.

Levels: libraries (orbax, absl, jax, grain, ...) at ERROR by default; `--verbosity 1` (`-v`) shows their info
and warnings, `--verbosity 2` (`-vv`) debug output. Our own progress (loggers under `diffssr_jax`) stays at
INFO.

Progress bars: tqdm redraws its bar on stderr with a carriage return and no newline, so a log line written
while a bar is on screen would continue the bar's line. Log records go to `BAR_SAFE_STDERR`, which writes
through `tqdm.write` whenever a bar is active (tqdm clears the bar, prints the line, redraws the bar below
it), as tqdm's own `tqdm.contrib.logging.logging_redirect_tqdm` does, but for every bar at once instead of
inside a context each caller would have to open; both our handler and absl's (the training entry point runs
under absl.app.run, which installs its own) write to it.

numpy/absl/tqdm only (no jax): the torch-only export tool uses it.
"""
from __future__ import annotations

import logging
import sys

# Loggers of the libraries whose INFO/WARNING chatter is hidden by default (orbax logs through absl).
LIBRARY_LOGGERS = ("absl", "orbax", "jax", "jaxlib", "flax", "grain", "tensorflow", "tensorflow_datasets",
                   "PIL", "torch", "urllib3", "h5py")


def _bars_active() -> bool:
  """Whether a tqdm bar is on screen (tqdm keeps its live bars in the class attribute `_instances`)."""
  tqdm = sys.modules.get("tqdm")  # not imported: no bar can be active
  if tqdm is None:
    return False
  return any(not getattr(bar, "disable", False) for bar in list(getattr(tqdm.tqdm, "_instances", ())))


class _BarSafeStderr:
  """A stream for logging handlers: whatever sys.stderr is at the time (test runners swap it), through
  `tqdm.write` while a progress bar is active so that each record starts on a line of its own."""

  def write(self, text: str) -> None:
    if text.strip() and _bars_active():
      from tqdm import tqdm
      tqdm.write(text.rstrip("\n"), file=sys.stderr)
    else:
      sys.stderr.write(text)

  def flush(self) -> None:
    sys.stderr.flush()

  # absl's handler also copies records to sys.stderr when its stream is not sys.stderr: this stream is stderr.
  def __eq__(self, other):
    return other is self or other is sys.stderr

  __hash__ = object.__hash__


BAR_SAFE_STDERR = _BarSafeStderr()


def stderr_handler() -> logging.Handler:
  """A handler writing our format (INFO plain, other levels prefixed) to `BAR_SAFE_STDERR`."""
  handler = logging.StreamHandler(BAR_SAFE_STDERR)
  handler.setFormatter(_Formatter("%(message)s"))
  return handler


class _Formatter(logging.Formatter):
  def format(self, record):
    msg = super().format(record)
    return msg if record.levelno == logging.INFO else f"{record.levelname.lower()}: {msg}"


class _BackgroundErrorFilter(logging.Filter):
  """Drops the tracebacks orbax logs from its background threads when a save fails (four of them per
  failed checkpoint): the same error reaches the main thread, which reports it in one line. Shown from
  --verbosity 1."""

  def filter(self, record):
    return not (record.exc_info and "orbax" in record.pathname)


def library_level(verbosity: int) -> int:
  """The logging level of third-party libraries at a `--verbosity`."""
  return logging.ERROR if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG


def setup_logging(verbosity: int = 0) -> None:
  """Libraries at ERROR (verbosity <= 0), INFO (1) or DEBUG (>= 2); our `diffssr_jax` loggers at INFO (DEBUG
  from 2, WARNING below 0). Adds a `stderr_handler` to the root logger when it has none; the handler
  absl.app.run installs keeps its format and writes to `BAR_SAFE_STDERR` too."""
  lib = library_level(verbosity)
  root = logging.getLogger()
  root.setLevel(lib)
  for name in LIBRARY_LOGGERS:
    logging.getLogger(name).setLevel(lib)
  ours = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity >= 2 else logging.INFO
  logging.getLogger("diffssr_jax").setLevel(ours)
  absl_logger = logging.getLogger("absl")
  for f in [f for f in absl_logger.filters if isinstance(f, _BackgroundErrorFilter)]:
    absl_logger.removeFilter(f)
  if verbosity <= 0:
    absl_logger.addFilter(_BackgroundErrorFilter())
  from absl import logging as absl_logging
  for handler in root.handlers:
    if isinstance(handler, absl_logging.ABSLHandler):
      handler.python_handler.stream = BAR_SAFE_STDERR
  if not root.handlers:
    root.addHandler(stderr_handler())
