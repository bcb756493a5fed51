"""The one "a resumed run has the settings it started with" rule (diffssr_jax.run_settings) that training,
evaluation and the mask export share: first use records, a difference is refused naming each key."""
import json

import pytest

from diffssr_jax import run_settings
from diffssr_jax.data import export
from diffssr_jax.evaluation import evaluate
from diffssr_jax.training import workdir


def test_differences_are_dotted_keys_with_absent_sides():
  before = {"a": {"b": 1, "c": (1, 2)}, "gone": 0}
  now = {"a": {"b": 2, "c": [1, 2]}, "new": {"x": None}}
  assert run_settings.differences(before, now) == {"a.b": (1, 2), "gone": (0, run_settings.ABSENT),
                                                   "new.x": (run_settings.ABSENT, None)}
  assert run_settings.differences(now, json.loads(json.dumps(now))) == {}  # tuples and lists as on disk
  assert run_settings.describe({"seed": (1, 2)}) == "seed: 1 there, 2 now"


def test_check_records_then_refuses_other_settings(tmp_path):
  path = tmp_path / "out" / "run.json"
  kw = dict(holder="out holds results", remedy="use another folder")
  run_settings.check(path, {"seed": 1, "size": (2, 3)}, **kw)
  assert json.loads(path.read_text()) == {"seed": 1, "size": [2, 3]}
  run_settings.check(path, {"seed": 1, "size": (2, 3)}, **kw)  # the same settings: continue
  with pytest.raises(run_settings.SettingsMismatchError) as e:
    run_settings.check(path, {"seed": 2, "size": (2, 3)}, **kw)
  assert str(e.value) == "out holds results made with other settings (seed: 1 there, 2 now); use another folder"
  path.write_text("{not json")
  with pytest.raises(run_settings.SettingsMismatchError, match=r"run.json is not valid JSON .*; use another"):
    run_settings.check(path, {"seed": 1}, **kw)
  # Settings kept under a key of a larger record (the export's fingerprint beside them).
  other = tmp_path / "state.json"
  run_settings.check(other, {"n": 1}, key="settings", record={"fingerprint": "f", "settings": {"n": 1}}, **kw)
  assert json.loads(other.read_text()) == {"fingerprint": "f", "settings": {"n": 1}}
  with pytest.raises(ValueError, match=r"\(n: 1 there, 2 now\)"):
    run_settings.check(other, {"n": 2}, key="settings", error=ValueError, **kw)


def test_the_three_jobs_use_it():
  """Training's workdir check, evaluation's run.json and the export's state share the comparison (and the
  evaluation's refusal is a run_settings error)."""
  assert workdir.flatten is run_settings.flatten
  assert issubclass(evaluate.SettingsMismatchError, run_settings.SettingsMismatchError)
  import inspect
  for fn in (workdir.check_config, evaluate.check_settings, export.check_run_settings):
    assert "run_settings." in inspect.getsource(fn), fn.__qualname__
