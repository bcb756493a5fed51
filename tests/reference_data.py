"""Access to the official implementation's reference outputs, shared by the parity tests.

The file comes from `$DIFFSSR_REFERENCE` when set, else `../shared/reference/reference.npz` beside the
project root. Tests that use it carry `pytest.mark.reference` and parametrize over the cases the file
holds (`cases("spe/")`), so another file with the same key scheme is checked the same way; with no
file every such test is skipped.
"""
import functools
import os
import pathlib

import numpy as np
import pytest

_DEFAULT = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "reference.npz"


def reference_path():
  env = os.environ.get("DIFFSSR_REFERENCE")
  path = pathlib.Path(env) if env else _DEFAULT
  return path if path.is_file() else None


@functools.lru_cache(maxsize=1)
def load():
  """The reference arrays as a dict (loaded once), or None when there is no file."""
  path = reference_path()
  if path is None:
    return None
  with np.load(path, allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def keys():
  ref = load()
  return sorted(ref) if ref is not None else []


def cases(prefix, leaf=None):
  """Case names under `prefix` (e.g. cases("spe/", "rope") -> ["128x128", ...]), sorted."""
  out = set()
  for k in keys():
    if not k.startswith(prefix):
      continue
    rest = k[len(prefix):].split("/")
    if leaf is None or (len(rest) >= 2 and rest[-1] == leaf):
      out.add(rest[0])
  return sorted(out)


def require(*names):
  """Returns the named arrays, skipping the test when the file or a key is absent."""
  ref = load()
  if ref is None:
    pytest.skip("no reference file (set $DIFFSSR_REFERENCE or provide ../shared/reference/reference.npz)")
  missing = [n for n in names if n not in ref]
  if missing:
    pytest.skip(f"reference file lacks {missing}")
  return [ref[n] for n in names] if len(names) > 1 else ref[names[0]]


reference = pytest.mark.reference
