"""ml_collections configs, installed with the package; each file has get_config(). Shared defaults live in
base.py (the single source of every key's default), the others change what differs.

`--config` of diffssr-train and diffssr-benchmark takes a file path, or the name of one of these files
(`--config demo`, `--config diffssr_df2k_x4`), so that an installed package needs no checkout. A config file
of one's own (a copy of one of these, edited) imports its defaults as `from diffssr_jax.configs import base`.
ml_collections' `--config path:arg` form and `--config.key=value` overrides keep working: `resolve` changes
only the path part of the value.
"""
from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

HERE = pathlib.Path(__file__).resolve().parent


def names() -> list[str]:
  """The packaged configs' names (file stems), base included."""
  return sorted(p.stem for p in HERE.glob("*.py") if p.stem != "__init__")


def resolve(spec: str) -> str:
  """A `--config` value with a packaged config's name replaced by its file path; anything else (a file path,
  a name that is not packaged) unchanged, for the loader to use or to refuse. "NAME:arg" keeps its ":arg"."""
  path, colon, arg = spec.partition(":")
  if os.path.exists(path) or os.sep in path or "/" in path:
    return spec
  stem = path.removesuffix(".py")
  if stem in names():
    return f"{HERE / (stem + '.py')}{colon}{arg}"
  return spec


def resolve_argv(argv: Sequence[str], flag: str = "config") -> list[str]:
  """argv with the value of `--config` (given as `--config X` or `--config=X`) passed through `resolve`;
  overrides such as `--config.train.lr=1` are other flags and kept."""
  out, argv = [], list(argv)
  i = 0
  while i < len(argv):
    tok = argv[i]
    if tok == "--":
      out += argv[i:]
      break
    if tok == f"--{flag}" and i + 1 < len(argv):
      out += [tok, resolve(argv[i + 1])]
      i += 2
      continue
    if tok.startswith(f"--{flag}="):
      tok = f"--{flag}=" + resolve(tok.split("=", 1)[1])
    out.append(tok)
    i += 1
  return out
