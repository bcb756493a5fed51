"""JAX's persistent compilation cache, switched on by every entry point (train, evaluate, upscale, benchmark).

A second launch of the same program (same model and shapes, jax/XLA version and device kind) loads its
executables from disk instead of compiling them again: the train step, the whole-run sampler and the
validation sampler take seconds to tens of seconds to compile. Programs that compile in under
`jax_persistent_cache_min_compile_time_secs` (jax's default 1 s; env JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS)
are not stored.

Setting (config key `compilation_cache`, flag `--compilation_cache`):
  "auto"        $JAX_COMPILATION_CACHE_DIR if set, else $XDG_CACHE_HOME/diffssr_jax/xla (~/.cache/...)
  a path        that folder
  "" or "off"   no persistent cache
"""
from __future__ import annotations

import os
import pathlib

import jax

from diffssr_jax import storage

AUTO = "auto"
_OFF = ("", "off", "none", "false")


def default_dir() -> pathlib.Path:
  env = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if env:
    return pathlib.Path(env).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "diffssr_jax" / "xla"


def enable(setting: str | None = AUTO) -> pathlib.Path | None:
  """Points jax's persistent cache at the folder `setting` names (see the module docstring); returns it,
  or None when the cache is off. Call before the first compilation."""
  if setting is None or str(setting).strip().lower() in _OFF:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  if setting != AUTO and storage.is_remote(setting):  # jax's cache reads and writes URLs itself (through epath)
    path = storage.check(setting, "compilation_cache")
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    return path
  path = default_dir() if setting == AUTO else pathlib.Path(setting).expanduser()
  path.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", str(path.absolute()))
  return path


_EVENTS = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "misses"}
_counts = {"hits": 0, "misses": 0}
_listening = False


def _on_event(name, **kwargs):
  del kwargs
  if name in _EVENTS:
    _counts[_EVENTS[name]] += 1


def counts() -> dict:
  """{"hits": n, "misses": m}: persistent-cache lookups since the first call of this function (take the
  difference around a compilation to see whether it came from the cache)."""
  global _listening
  if not _listening:
    jax.monitoring.register_event_listener(_on_event)
    _listening = True
  return dict(_counts)
