"""Nothing lost: verified checkpoints and protected workdirs (issue 12).

Faults are injected as reported: bytes flipped in a checkpoint's array data, a data file deleted, the
config changed on a trained workdir. Each test fails on the code before checksum manifests and the
workdir check (which restored flipped bytes silently, printed several lines per bad step, picked the
newest step by folder name in `evaluate`, counted damaged steps in retention and retrained a changed
model from step 0).
"""
import hashlib
import json
import logging
import os
import pathlib
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from diffssr_jax import images
from diffssr_jax.evaluation import evaluate
from diffssr_jax.inference import loading
from diffssr_jax.inference.upscaler import Upscaler
from diffssr_jax.training import checkpointing, integrity, train, train_step
from diffssr_jax.training import workdir as workdir_lib
from test_inference import fast_params, tiny_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
CKPT_LOG = "diffssr_jax.training.checkpointing"


@pytest.fixture(scope="module")
def states():
  """(cfg, model, {step: TrainState}) with different weights per step, so a load shows which step it read."""
  cfg, model, params = tiny_model()
  tx = train_step.make_optimizer(cfg.optim, 10)
  out = {}
  for i, step in enumerate((2, 4, 6, 8)):
    p = params if i == 0 else fast_params(model, seed=i)
    st = train_step.create_train_state(model, p, tx, seed=0, use_ema=True)
    out[step] = st.replace(step=jnp.int32(step))
  return cfg, model, out


def _workdir(tmp_path, states, steps=(2, 4), use_async=False, keep=5):
  cfg, _, st = states
  wd = tmp_path / "wd"
  workdir_lib.save_config(cfg, wd)
  ck = checkpointing.Checkpointer(wd, keep=keep, use_async=use_async)
  for s in steps:
    ck.save(s, st[s], {"pos": s})
  ck.close()
  return wd


def _data_files(step_dir):
  """The array data files of a step (what the issue damaged: state/ocdbt.process_0/d/*), largest first."""
  files = [f for f in (step_dir / "state" / "ocdbt.process_0" / "d").iterdir() if f.is_file()]
  return sorted(files, key=lambda f: f.stat().st_size, reverse=True)


def _flip_bytes(path, n=64, seed=0):
  """XORs n bytes in the middle half of a file, as in the report (64 bytes flipped)."""
  b = bytearray(path.read_bytes())
  idx = np.random.default_rng(seed).choice(np.arange(len(b) // 4, 3 * len(b) // 4), n, replace=False)
  for i in idx:
    b[i] ^= 0xFF
  path.write_bytes(bytes(b))


def _warnings(caplog):
  return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == CKPT_LOG]


def _params_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = ""  # one CPU device in the child
  env["PYTHONPATH"] = str(ROOT)
  env.pop("DIFFSSR_TRUST_UNVERIFIED_CHECKPOINTS", None)  # the documented name
  return env


# ----------------------------------------------------------------------------- manifests
def test_each_step_records_checksums_before_its_folder_appears(tmp_path, states):
  """Async saves: the manifest is written inside orbax's commit, so a step folder is never seen without
  it, and it covers every file but orbax's commit bookkeeping."""
  seen_without = []
  stop = threading.Event()
  root = tmp_path / "wd" / "checkpoints"

  def watch():
    while not stop.is_set():
      if root.is_dir():
        for d in root.iterdir():
          if d.name.isdigit() and not (d / integrity.MANIFEST_NAME).exists():
            seen_without.append(d.name)
  t = threading.Thread(target=watch, daemon=True)
  t.start()
  try:
    wd = _workdir(tmp_path, states, steps=(2, 4), use_async=True)
  finally:
    stop.set()
    t.join()
  assert not seen_without
  for step in (2, 4):
    d = wd / "checkpoints" / str(step)
    assert integrity.verify_files(d) is True
    listed = set(json.loads((d / integrity.MANIFEST_NAME).read_text())["files"])
    on_disk = {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()}
    assert listed == on_disk - {integrity.MANIFEST_NAME, "_CHECKPOINT_METADATA", "commit_success.txt"}
    assert any(f.startswith("state/ocdbt.process_0/d/") for f in listed)
    digest = hashlib.sha256(_data_files(d)[0].read_bytes()).hexdigest()
    assert digest in {v["sha256"] for v in json.loads((d / integrity.MANIFEST_NAME).read_text())["files"].values()}


# ----------------------------------------------------------------------------- case 2: flipped bytes
def test_flipped_bytes_are_caught_by_every_reader(tmp_path, states, caplog):
  """64 bytes flipped in step 4's array data: the Python API, the Upscaler, evaluate's step choice and a
  resumed training run all use step 2, each with one warning line naming step 4 and the reason; a new
  save of step 4 moves the damaged folder aside instead of being skipped."""
  cfg, model, st = states
  wd = _workdir(tmp_path, states)
  _flip_bytes(_data_files(wd / "checkpoints" / "4")[0])
  caplog.set_level(logging.WARNING)

  params, step = loading.load_workdir_params(wd)
  assert step == 2
  _params_equal(params, st[2].model_params(use_ema=True))
  (warning,) = _warnings(caplog)
  assert "checkpoints/4" in warning and "SHA-256" in warning and "\n" not in warning

  caplog.clear()
  img = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8)
  loaded = Upscaler.load(workdir=wd, mode="rrdb")
  want = Upscaler(model, st[2].model_params(use_ema=True), config=cfg, mode="rrdb").upscale(img)
  np.testing.assert_array_equal(loaded.upscale(img), want)
  assert loaded.step == 2 and loaded.source.endswith("checkpoints/2")   # what evaluate's tag and log use
  assert len(_warnings(caplog)) == 1

  # An explicit request for the damaged step fails clearly instead of loading garbage.
  with pytest.raises(integrity.DamagedCheckpointError, match="SHA-256"):
    loading.load_workdir_params(wd, step=4)

  # Training resumes from step 2, and saving step 4 again keeps the damaged folder, moved aside.
  caplog.clear()
  ck = checkpointing.Checkpointer(wd, keep=5, use_async=False)
  got = ck.restore_latest(st[2])
  assert got.step == got.meta["step"] == 2 and got.data_state == {"pos": 2} and int(got.tree.step) == 2
  assert got.verified
  assert len(_warnings(caplog)) == 1
  ck.save(4, st[4], {"pos": 4})
  ck.close()
  aside = [d for d in (wd / "checkpoints").iterdir() if d.name.startswith("4.damaged-")]
  assert len(aside) == 1
  with pytest.raises(integrity.DamagedCheckpointError):
    integrity.verify_files(aside[0])
  params, step = loading.load_workdir_params(wd)
  assert step == 4
  _params_equal(params, st[4].model_params(use_ema=True))


def test_restored_arrays_must_be_finite(tmp_path, states, caplog):
  """A step whose files match their checksums but whose arrays hold NaN (as saved) is skipped; and a
  non-finite state is never saved."""
  _, _, st = states
  wd = _workdir(tmp_path, states, steps=(2,))
  nan_state = st[4].replace(opt_state=jax.tree.map(lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.floating)
                                                   else x, st[4].opt_state))
  with pytest.raises(integrity.NonFiniteStateError, match="step 4"):
    ck = checkpointing.Checkpointer(wd, use_async=False)
    try:
      ck.save(4, nan_state)
    finally:
      ck.close()
  assert not (wd / "checkpoints" / "4").exists()
  # Written past the guard (plain orbax), then sealed: its checksums are right, its values are not.
  m = ocp.CheckpointManager(wd / "checkpoints")
  m.save(4, args=checkpointing.Checkpointer._args(checkpointing.state_to_tree(nan_state), {}, {"step": 4}))
  m.wait_until_finished()
  m.close()
  integrity.write_manifest(wd / "checkpoints" / "4")
  caplog.set_level(logging.WARNING)
  _, step = loading.load_workdir_params(wd)
  assert step == 2
  (warning,) = _warnings(caplog)
  assert "checkpoints/4" in warning and "NaN" in warning and "opt_state" in warning


# ----------------------------------------------------------------------------- case 3: a deleted file
def test_deleted_file_is_one_line_and_evaluate_falls_back(tmp_path, states, capsys):
  """A data file of step 4 deleted: the upscale CLI prints one line about it (no orbax tracebacks) and
  writes the step-2 result; the evaluate CLI evaluates step 2 instead of failing."""
  cfg, model, st = states
  wd = _workdir(tmp_path, states)
  _data_files(wd / "checkpoints" / "4")[0].unlink()
  img = np.random.default_rng(1).integers(0, 256, (8, 8, 3)).astype(np.uint8)
  images.save_png(tmp_path / "in" / "a.png", img)
  proc = subprocess.run([sys.executable, "-m", "diffssr_jax.inference.upscale", "--workdir", str(wd),
                         str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--rrdb", "--noprogress"],
                        env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  about_4 = [l for l in proc.stderr.splitlines() if "checkpoints/4" in l]
  assert len(about_4) == 1 and "missing" in about_4[0], proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
  want = Upscaler(model, st[2].model_params(use_ema=True), config=cfg, mode="rrdb").upscale(img)
  np.testing.assert_array_equal(images.read_rgb8(tmp_path / "out" / "a.png"), want)

  hr = tmp_path / "bench" / "HR"
  images.save_png(hr / "b.png", np.random.default_rng(2).integers(0, 256, (32, 32, 3)).astype(np.uint8))
  argv = ["evaluate", "--workdir", str(wd), "--datasets", f"B={hr}", "--nodiffusion", "--rrdb", "--noprogress"]
  assert evaluate.cli(argv) == 0, capsys.readouterr().err
  assert (wd / "eval" / "B" / "2_rrdb" / "metrics.csv").is_file()
  assert not (wd / "eval" / "B" / "4_rrdb").exists()


def test_retention_keeps_newest_verified_steps_and_never_deletes_damaged(tmp_path, states, caplog):
  """keep=2 with step 4 damaged mid-run: 4 stays on disk, uncounted; 6 and 8 are the two kept, 2 goes."""
  _, _, st = states
  caplog.set_level(logging.WARNING)
  wd = tmp_path / "wd"
  ck = checkpointing.Checkpointer(wd, keep=2, use_async=True)
  ck.save(2, st[2])
  ck.save(4, st[4])
  ck.wait()
  _data_files(wd / "checkpoints" / "4")[0].unlink()
  ck.save(6, st[6])
  ck.save(8, st[8])
  ck.close()
  steps = sorted(int(d.name) for d in (wd / "checkpoints").iterdir() if d.name.isdigit())
  assert steps == [4, 6, 8]
  assert [w for w in _warnings(caplog) if "checkpoints/4" in w and "not counted" in w]
  # While only one later step is verified, the good step before the damaged one is kept.
  wd2 = tmp_path / "wd2"
  ck = checkpointing.Checkpointer(wd2, keep=2, use_async=False)
  ck.save(2, st[2])
  ck.save(4, st[4])
  _data_files(wd2 / "checkpoints" / "4")[0].unlink()
  ck.save(6, st[6])
  ck.close()
  assert sorted(int(d.name) for d in (wd2 / "checkpoints").iterdir() if d.name.isdigit()) == [2, 4, 6]


def test_best_checkpoint_ignores_damaged_steps(tmp_path, states):
  """A damaged best step does not block a new best (nor is it deleted); a lower PSNR-Y is not saved."""
  _, _, st = states
  wd = tmp_path / "wd"
  ck = checkpointing.Checkpointer(wd, use_async=False)
  ck.save_best(2, st[2], 20.0)
  ck.save_best(4, st[4], 19.0)  # worse: not saved
  ck.wait()
  assert sorted(p.name for p in (wd / "best").iterdir() if p.name.isdigit()) == ["2"]
  _flip_bytes(_data_files(wd / "best" / "2")[0])
  ck.save_best(6, st[6], 18.0)  # worse than the damaged one, better than nothing verified
  ck.close()
  assert sorted(p.name for p in (wd / "best").iterdir() if p.name.isdigit()) == ["2", "6"]
  _, step = loading.load_workdir_params(wd, which="best")
  assert step == 6


# ----------------------------------------------------------------------------- older checkpoints
def test_steps_without_manifest_need_the_trust_variable(tmp_path, states, monkeypatch):
  """Checkpoints written before manifests existed (plain orbax) are refused with the variable named; with
  it they load, and a training restore records their manifest so they are trusted from then on."""
  cfg, _, st = states
  wd = tmp_path / "wd"
  workdir_lib.save_config(cfg, wd)
  m = ocp.CheckpointManager((wd / "checkpoints").absolute())
  for s in (2, 4):
    m.save(s, args=checkpointing.Checkpointer._args(checkpointing.state_to_tree(st[s]), {"pos": s}, {"step": s}))
  m.wait_until_finished()
  m.close()
  monkeypatch.delenv(integrity.TRUST_ENV, raising=False)
  with pytest.raises(integrity.UnverifiedCheckpointError, match=integrity.TRUST_ENV):
    loading.load_workdir_params(wd)
  ck = checkpointing.Checkpointer(wd, use_async=False)
  with pytest.raises(integrity.UnverifiedCheckpointError):
    ck.restore_latest(st[2])
  ck.close()
  monkeypatch.setenv(integrity.TRUST_ENV, "1")
  assert loading.load_workdir_params(wd)[1] == 4
  ck = checkpointing.Checkpointer(wd, use_async=False)
  got = ck.restore_latest(st[2])
  assert got.meta["step"] == 4 and not got.verified  # accepted through the variable, manifest written now
  ck.close()
  monkeypatch.delenv(integrity.TRUST_ENV)
  assert integrity.verify_files(wd / "checkpoints" / "4") is True
  params, step = loading.load_workdir_params(wd)
  assert step == 4
  _params_equal(params, st[4].model_params(use_ema=True))


# ----------------------------------------------------------------------------- case 1: config changes
def _tiny_train_config(train_files):
  sys.path.insert(0, str(ROOT / "tests" / "configs"))
  import tiny_train
  cfg = tiny_train.get_config()
  cfg.data.train_files = str(train_files)
  return cfg


def _snapshot(root):
  return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
          for p in root.rglob("*") if p.is_file()}


def test_model_change_is_refused_before_anything_is_written(tmp_path, states, shards):
  """The reported command (a trained workdir, --config.model.unet_dim changed) exits with the differing
  key and the ways forward; not one file of the workdir changes, with or without --allow_config_change."""
  _, _, st = states
  wd = tmp_path / "wd"
  cfg = _tiny_train_config(shards / "shards")  # inputs that exist: the config's values are checked first
  workdir_lib.save_config(cfg, wd)
  ck = checkpointing.Checkpointer(wd, use_async=False)
  ck.save(2, st[2])
  ck.close()
  before = _snapshot(wd)
  cmd = [sys.executable, "-m", "diffssr_jax.main", "--config", str(ROOT / "tests/configs/tiny_train.py"),
         "--workdir", str(wd), f"--config.data.train_files={shards / 'shards'}", "--config.model.unet_dim=16"]
  proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "model.unet_dim: 8 in config.json, 16 now" in proc.stderr and "new --workdir" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert _snapshot(wd) == before
  cfg.model.unet_dim = 16
  with pytest.raises(workdir_lib.ConfigMismatchError, match="can never change"):
    train.train_and_evaluate(cfg, wd, allow_config_change=True)
  assert _snapshot(wd) == before


def test_safe_changes_need_the_flag_and_keep_the_old_config(tmp_path, states, shards):
  _, _, st = states
  wd = tmp_path / "wd"
  cfg = _tiny_train_config(tmp_path / "shards")
  workdir_lib.save_config(cfg, wd)
  old_text = (wd / "config.json").read_text()
  # No checkpoint yet: nothing to protect.
  other = _tiny_train_config(tmp_path / "shards")
  other.model.unet_dim = 16
  assert workdir_lib.check_config(other, wd) == {}
  ck = checkpointing.Checkpointer(wd, use_async=False)
  ck.save(2, st[2])
  ck.close()
  longer = _tiny_train_config(f"{shards}/shards/*.tfrecord")  # the same shards, named otherwise
  longer.train.num_steps = 20
  longer.optim.lr = 5e-4
  longer.optim.ema_decay = 0.99
  with pytest.raises(workdir_lib.ConfigMismatchError, match="--allow_config_change") as e:
    train.train_and_evaluate(longer, wd)
  assert "train.num_steps: 8 in config.json, 20 now" in str(e.value) and "data.train_files" in str(e.value)
  assert (wd / "config.json").read_text() == old_text
  diff = workdir_lib.check_config(longer, wd, allow_config_change=True)
  assert set(diff) == {"train.num_steps", "optim.lr", "optim.ema_decay", "data.train_files"}
  workdir_lib.save_config(longer, wd)
  assert json.loads((wd / "config.json").read_text())["train"]["num_steps"] == 20
  (kept,) = wd.glob("config.*.json")
  assert kept.read_text() == old_text
  # Switching EMA or clipping off changes the checkpoint's structure: never allowed.
  no_ema = _tiny_train_config(tmp_path / "elsewhere")
  no_ema.train.num_steps = 20
  no_ema.optim.lr = 5e-4
  no_ema.optim.ema_decay = 0.0
  with pytest.raises(workdir_lib.ConfigMismatchError, match="optim.ema_decay"):
    workdir_lib.check_config(no_ema, wd, allow_config_change=True)
  for key, value in (("diffusion.timesteps", 20), ("data.patch_size", 64), ("task", "rrdb"),
                     ("data.reduce_constant_spe", False), ("train.rrdb_checkpoint", "/x")):
    changed = _tiny_train_config(tmp_path / "elsewhere")
    section, _, name = key.rpartition(".")
    (changed[section] if section else changed)[name] = value
    with pytest.raises(workdir_lib.ConfigMismatchError, match="changes the model"):
      workdir_lib.check_config(changed, wd, allow_config_change=True)
  # A config.json from before a key existed (here model.cond_sam, added with Table 7's baseline): at the new
  # key's default the run resumes as it is; set otherwise, it is a difference to confirm.
  saved = json.loads((wd / "config.json").read_text())
  del saved["model"]["cond_sam"]
  (wd / "config.json").write_text(json.dumps(saved))
  assert workdir_lib.check_config(longer, wd) == {}
  longer.model.cond_sam = True
  with pytest.raises(workdir_lib.ConfigMismatchError, match="model.cond_sam: '<absent>' in config.json, True now"):
    workdir_lib.check_config(longer, wd)


def test_failed_restore_of_an_unverified_step_prints_no_tracebacks(tmp_path, states, monkeypatch, caplog):
  """Without a manifest a deleted data file reaches orbax, whose restore fails mid-read; the reads it
  abandons used to report `RuntimeError: Event loop is closed` through sys.unraisablehook (a traceback
  each on stderr, 1,200 for the demo model). Each attempt now gives one warning line and nothing else."""
  _, _, st = states
  wd = tmp_path / "wd"
  m = ocp.CheckpointManager((wd / "checkpoints").absolute())  # as the code before manifests wrote them
  for s in (2, 4):
    m.save(s, args=checkpointing.Checkpointer._args(checkpointing.state_to_tree(st[s]), {}, {"step": s}))
  m.wait_until_finished()
  m.close()
  _data_files(wd / "checkpoints" / "4")[0].unlink()
  monkeypatch.setenv(integrity.TRUST_ENV, "1")
  reported = []  # what Python's default hook would print to stderr (pytest would turn it into warnings)
  monkeypatch.setattr(sys, "unraisablehook", lambda u: reported.append(f"{type(u.exc_value).__name__}: {u.exc_value}"))
  caplog.set_level(logging.WARNING)
  for _ in range(8):  # the reports are timing-dependent: several attempts
    assert loading.load_workdir_params(wd)[1] == 2
  import gc
  gc.collect()
  assert not reported, reported[:3]
  assert not [r for r in caplog.records if r.name == "asyncio"]  # "Task exception was never retrieved"
  warnings = _warnings(caplog)
  assert len(warnings) == 8 and all("checkpoints/4" in w and "orbax could not restore" in w for w in warnings)


def test_config_json_disagreeing_with_the_checkpoint_is_refused(tmp_path, states, capsys):
  """The issue's edit: config.json's diffusion.timesteps changed from 10 to 20 after training. The weights
  load into either schedule, so upscale used to sample "ddpm, 20 steps" from the T=10 model with rc 0; the
  step's recorded settings now refuse it, in upscale and evaluate alike, with one line."""
  from diffssr_jax.inference import upscale
  from diffssr_jax.inference.upscaler import ModelLoadError
  cfg, _, st = states
  wd = tmp_path / "wd"
  workdir_lib.save_config(cfg, wd)
  ck = checkpointing.Checkpointer(wd, use_async=False, settings=workdir_lib.recorded_settings(cfg))
  ck.save(2, st[2])
  ck.close()
  assert Upscaler.load(workdir=wd).step == 2
  edited = json.loads((wd / "config.json").read_text())
  edited["diffusion"]["timesteps"] = 20
  (wd / "config.json").write_text(json.dumps(edited))
  with pytest.raises(ModelLoadError, match=r"diffusion.timesteps=10 \(config.json: 20\)"):
    Upscaler.load(workdir=wd)
  src = tmp_path / "in"
  images.save_png(src / "a.png", np.zeros((8, 8, 3), np.uint8))
  capsys.readouterr()
  assert upscale.cli(["upscale", "--workdir", str(wd), str(src), "--output", str(tmp_path / "out"),
                      "--noprogress"]) == 1
  err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
  assert len(err) == 1 and "diffusion.timesteps=10" in err[0]
  assert evaluate.cli(["evaluate", "--workdir", str(wd), "--datasets", f"A={src}", "--noprogress"]) == 1
  assert not (wd / "eval").exists()


def test_nonfinite_report_counts_and_names_the_first_bad_leaf():
  """The one finite check (restore and save): NaN and inf counted over floating-point leaves only, the first
  bad leaf named; None for a finite tree."""
  tree = {"a": jnp.ones(3), "b": jnp.array([np.nan, 1.0, np.inf, np.nan]), "c": jnp.array([np.inf]),
          "step": jnp.int32(7)}
  assert integrity.nonfinite_report(tree) == "2 NaN and 2 inf values (first in ['b'])"
  assert integrity.nonfinite_report({"a": jnp.ones(3), "step": jnp.int32(7)}) is None


def test_orbax_logging_install_is_idempotent():
  from diffssr_jax import orbax_logging
  orbax_logging.install()
  hook, filters = sys.unraisablehook, list(logging.getLogger("asyncio").filters)
  orbax_logging.install()
  assert sys.unraisablehook is hook and logging.getLogger("asyncio").filters == filters
  record = logging.LogRecord("asyncio", logging.ERROR, "", 0, "Task exception was never retrieved", (),
                             (RuntimeError, RuntimeError("Event loop is closed"), None))
  assert not all(f.filter(record) for f in filters)  # dropped
  record.exc_info = (ValueError, ValueError("something else"), None)
  assert all(f.filter(record) for f in filters)      # kept
