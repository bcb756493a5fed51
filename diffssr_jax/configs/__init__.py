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


def load(spec: str | None, default: str = "base"):
  """`get_config()` of a `--config` value: a packaged config's name or a local file (the packaged `default` when
  None). Refusals are one-line `errors.UserError`s naming the value: a bucket path (a config is a Python module,
  imported from a local file), a missing file, a module without get_config().

  For the commands whose `--config` is an ordinary flag (benchmark, convert); training parses its config
  with ml_collections' config_flags, which also applies `--config.key=value` overrides."""
  import importlib.util

  from diffssr_jax import storage
  from diffssr_jax.errors import UserError
  if spec and storage.is_remote(spec):
    raise UserError(f"--config {spec}: a config is a Python module and is read from a local file only (copy it "
                    "here first)")
  path = pathlib.Path(resolve(spec) if spec else HERE / f"{default}.py")
  if not path.is_file():
    raise UserError(f"--config {spec}: no such file, and not a packaged config ({', '.join(names())})")
  module_spec = importlib.util.spec_from_file_location(f"_diffssr_config_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise UserError(f"--config {spec}: {path} has no get_config()")
  return module.get_config()


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
