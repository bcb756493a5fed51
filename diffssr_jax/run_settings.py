"""One rule for every job that continues from files on disk: a resumed run must have the settings it started with.

Used by training (WORKDIR/config.json, `training.workdir.check_config`), evaluation
(OUT/<dataset>/<method>/run.json) and the mask export (OUT/.export/<split>-config.json). A job records its
settings beside its files on first use; a later start compares the settings it would run with against those
recorded (`differences`: flattened to dotted keys, a key present on one side only counts) and refuses a
mismatch, before any work, in one line naming the folder, each differing key with both values, and the way out
(`check`). Training puts a policy on top of the same `read` and `differences` (some settings may change with
--allow_config_change; see training/workdir.py).

json + fileio only (no jax): the torch-only export tool imports it.
"""
from __future__ import annotations

import json
from collections.abc import Mapping

from diffssr_jax import fileio, storage

ABSENT = "<absent>"  # the value shown for a key that one side has not got


class SettingsMismatchError(ValueError):
  """The settings given differ from those recorded for the files a run would continue."""


def flatten(tree: Mapping, prefix: str = "") -> dict:
  """{"a": {"b": 1}} -> {"a.b": 1} (lists and tuples are leaves)."""
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten(v, key + "."))
    else:
      out[key] = v
  return out


def as_recorded(settings: Mapping) -> dict:
  """`settings` in the form they take on disk (tuples become lists, keys strings)."""
  return json.loads(json.dumps(settings))


def differences(recorded: Mapping, now: Mapping) -> dict:
  """{dotted key: (recorded value, value now)} for every key whose values differ (`ABSENT` where a side has
  not got the key), sorted by key."""
  a, b = flatten(as_recorded(recorded)), flatten(as_recorded(now))
  return {k: (a.get(k, ABSENT), b.get(k, ABSENT)) for k in sorted(set(a) | set(b))
          if a.get(k, ABSENT) != b.get(k, ABSENT)}


def describe(diff: Mapping, there: str = "there") -> str:
  """"key: a there, b now, ..." for a `differences` result."""
  return ", ".join(f"{k}: {a!r} {there}, {b!r} now" for k, (a, b) in diff.items())


def read(path) -> dict | None:
  """The settings recorded at `path`, None when there is no such file (json.JSONDecodeError if damaged)."""
  path = storage.native(path)
  if not path.is_file():
    return None
  return json.loads(path.read_text(encoding="utf-8"))


def check(path, settings: Mapping, *, holder: str, remedy: str, key: str | None = None,
          record: Mapping | None = None, error: type[Exception] = SettingsMismatchError) -> None:
  """Records `settings` at `path` when nothing is recorded there; otherwise refuses other settings.

  `holder` says what the folder holds ("runs/x/A holds results"), `remedy` the way out; the error (`error`,
  SettingsMismatchError by default) reads "<holder> made with other settings (<key: a there, b now, ...>);
  <remedy>". `key`: the settings are the `key` entry of the recorded JSON, which is `record` (default: the
  settings themselves), written atomically.
  """
  path = storage.native(path)
  try:
    saved = read(path)
  except json.JSONDecodeError as e:
    raise error(f"{path} is not valid JSON ({e}); {remedy}") from None
  if saved is None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fileio.atomic_write_json(path, as_recorded(settings if record is None else record), indent=1, sort_keys=True)
    return
  diff = differences(saved.get(key, {}) if key is not None else saved, settings)
  if diff:
    raise error(f"{holder} made with other settings ({describe(diff)}); {remedy}")
