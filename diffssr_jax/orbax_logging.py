"""What orbax and tensorstore report on their own that this project reports in one line instead.

Two process-wide adjustments, both narrow:

* `quiet()`: orbax logs every step it opens (INFO) and read-only managers warn at WARNING level through
  absl; our restores report their own outcome in one line, so that chatter is held back while they run,
  unless the absl logger's level was set (the CLIs set it from --verbosity: -v shows it).
* `install()`: the after-effects of an orbax restore (or save) that failed on a damaged file or a full
  disk are dropped. orbax runs all array reads of a restore as tensorstore futures in a fresh asyncio loop
  and closes the loop as soon as the first read fails; each read still in flight then completes into the
  closed loop and tensorstore reports `RuntimeError: Event loop is closed` (and the unretrieved read
  errors) through sys.unraisablehook, and asyncio logs the unretrieved tasks' errors: a traceback per
  array, ~1,200 for the demo model. Verified steps never get there (a missing or changed file fails the
  manifest check before orbax reads anything); for steps without manifest these filters drop exactly
  those reports (the failure itself reaches the caller and is reported in one line).

Written here rather than configured: neither orbax nor tensorstore has a setting for either.
"""
from __future__ import annotations

import contextlib
import logging
import sys

_ABANDONED_READ_ERRORS = ("Event loop is closed", "Encountered error while reading array index", "in OCDBT database")


@contextlib.contextmanager
def quiet():
  """Holds absl's (orbax's) INFO and WARNING lines back while the block runs, unless absl's level was set."""
  logger = logging.getLogger("absl")
  level = logger.level
  if level != logging.NOTSET:
    yield
    return
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def is_abandoned_read_error(exc) -> bool:
  """Whether `exc` is the error of an array read (or write) orbax abandoned after another one failed."""
  return any(s in str(exc) for s in _ABANDONED_READ_ERRORS)


class _AbandonedReadsFilter(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" reports of abandoned checkpoint reads."""

  def filter(self, record):
    exc = record.exc_info[1] if record.exc_info else None
    return not ("never retrieved" in str(record.msg) and exc is not None and is_abandoned_read_error(exc))


def install() -> None:
  """Drops the reports of abandoned checkpoint reads from sys.unraisablehook and the asyncio logger
  (idempotent; installed before the first restore, since they arrive while orbax is still unwinding)."""
  previous = sys.unraisablehook
  if not getattr(previous, "_diffssr_drops_abandoned_reads", False):
    def hook(unraisable):
      if not is_abandoned_read_error(unraisable.exc_value):
        previous(unraisable)

    hook._diffssr_drops_abandoned_reads = True
    sys.unraisablehook = hook
  asyncio_log = logging.getLogger("asyncio")
  if not any(isinstance(f, _AbandonedReadsFilter) for f in asyncio_log.filters):
    asyncio_log.addFilter(_AbandonedReadsFilter())
