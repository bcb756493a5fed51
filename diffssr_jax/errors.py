"""Errors a user can fix, shared by the library and the commands: `UserError`, and `os_error_message` (a full
disk or another OS error told in one line naming the path).

Its own module so that library code (`inference.upscaler`, ...) can raise and read them without importing the
command-line helpers (`diffssr_jax.cli`), and the helpers can catch them without importing the library.
"""
from __future__ import annotations

import errno
import os
import re


class UserError(Exception):
  """An error the user can fix (a missing folder, a file that is not a checkpoint, ...): commands print its
  message as one line and exit with status 1, without a traceback."""


# tensorstore (orbax's array writer) reports OS errors inside a ValueError's text:
#   ... Failed writing: "/w/checkpoints/2.orbax-checkpoint-tmp/.../d/5421f0": ...: File too large [os_error_code='27']
_TENSORSTORE_OS_ERROR = re.compile(r'"(?P<path>/[^"]+)"[^"]*?\[os_error_code=\'(?P<code>\d+)\'\]')
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def os_error_message(exc: BaseException) -> str | None:
  """'<path>: <cause>' for an exception that is (or was caused by) an OS error, such as a full disk, from
  Python's own file calls or from tensorstore (orbax's checkpoint writes); None for anything else."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    code, path = None, None
    if isinstance(exc, OSError) and exc.errno:
      code, path = exc.errno, exc.filename
    else:
      m = _TENSORSTORE_OS_ERROR.search(str(exc))
      if m:
        code, path = int(m["code"]), m["path"]
    if code is not None:
      hint = " (free some space and run the same command again: finished results and checkpoints are kept)" \
          if code in _FULL else ""
      return f"{path or '?'}: {os.strerror(code)}{hint}"
    exc = exc.__cause__ or exc.__context__
  return None
