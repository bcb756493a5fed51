"""The training job: exact resume after a kill, SIGTERM save, corrupt checkpoints, NaN stop, RRDB loading."""
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffssr_jax import parallel
from diffssr_jax.inference import loading
from diffssr_jax.training import checkpointing, integrity, loop, train, train_step
from diffssr_jax.diffusion.model import build_model

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cmd(workdir, shards, *extra):
  return [sys.executable, "-m", "diffssr_jax.main", "--config", str(ROOT / "tests/configs/tiny_train.py"),
          "--workdir", str(workdir), f"--config.data.train_files={shards / 'shards'}", *extra]


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = ""  # one CPU device in the child: the job's own default
  env["PYTHONPATH"] = str(ROOT)
  return env


def _losses(workdir):
  rows = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def _final_params(workdir, step):
  params, got = loading.load_workdir_params(workdir, step=step, use_ema=False)
  assert got == step
  return params


def _wait_for(path, proc, timeout=240):
  t0 = time.time()
  while not path.exists():
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    assert time.time() - t0 < timeout, f"{path} did not appear"
    time.sleep(0.2)


def _signal_when(proc, text, sig, timeout=240):
  """Sends `sig` to `proc` as soon as a line of its output contains `text`; returns its whole output once it
  has exited. Fails at once if the process ends without printing `text`."""
  lines, seen = [], threading.Event()

  def pump():
    for raw in proc.stdout:
      lines.append(raw.decode(errors="replace"))
      if text in lines[-1]:
        seen.set()
    seen.set()  # end of output: the waiter below checks whether `text` came

  reader = threading.Thread(target=pump, daemon=True)
  reader.start()
  seen.wait(timeout)
  assert any(text in l for l in lines), f"{text!r} never appeared:\n" + "".join(lines)[-3000:]
  proc.send_signal(sig)
  proc.wait(timeout=timeout)
  reader.join(timeout=10)
  return "".join(lines)


@pytest.mark.slow
def test_killed_and_preempted_runs_resume_exactly(shards, tmp_path):
  """A run SIGKILLed mid-way, restarted, SIGTERMed (preemption), restarted again, ends bit-identical to an
  uninterrupted run, with the same loss curve."""
  ref = tmp_path / "ref"
  subprocess.run(_cmd(ref, shards), env=_env(), check=True, cwd=ROOT, capture_output=True)
  assert (ref / "rrdb" / "checkpoints").is_dir(), "the RRDB stage ran first"

  run = tmp_path / "run"
  p = subprocess.Popen(_cmd(run, shards), env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  _wait_for(run / "checkpoints" / "2", p)
  p.kill()
  p.wait()
  assert not (run / "checkpoints" / "8").exists()

  # SIGTERM once the resumed diffusion stage has logged where it resumes (it is compiling then, seconds before
  # its first step): earlier versions waited for the step-4 checkpoint, by which time a fast machine had
  # sometimes finished all 8 steps, and a finished run rightly exits 0.
  p = subprocess.Popen(_cmd(run, shards), env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  out = _signal_when(p, f"resuming {run} from step", signal.SIGTERM)
  # Preempted: saved, then a non-zero exit (a scheduler reruns the job) with one line, no traceback.
  assert p.returncode == 143, out[-3000:]
  assert "Traceback" not in out and [l for l in out.splitlines() if l.startswith("error: SIGTERM: saved diffusion step")]
  saved = sorted(int(d.name) for d in (run / "checkpoints").iterdir() if d.name.isdigit())
  assert 3 <= saved[-1] < 8

  subprocess.run(_cmd(run, shards), env=_env(), check=True, cwd=ROOT, capture_output=True)
  a, b = _final_params(ref, 8), _final_params(run, 8)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert _losses(ref) == _losses(run)
  assert len(_losses(run)) == 8


def _tiny_state(cfg):
  model = build_model(cfg)
  params = model.init(jax.random.key(0))
  tx = train_step.make_optimizer(cfg.optim, 10)
  return model, tx, train_step.create_train_state(model, params, tx, seed=0)


def test_corrupt_checkpoint_is_skipped_not_deleted(tmp_path, caplog):
  from helpers import tiny_config
  cfg = tiny_config()
  _, _, state = _tiny_state(cfg)
  ck = checkpointing.Checkpointer(tmp_path, keep=5, use_async=False)
  ck.save(2, state, {"pos": 2})
  ck.save(4, state.replace(step=jnp.int32(4)), {"pos": 4})
  ck.wait()
  ck.close()
  # Damage step 4's array data (every file of its state item that holds more than metadata).
  damaged = 0
  for f in (tmp_path / "checkpoints" / "4" / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 100:
      f.write_bytes(b"\0garbage")
      damaged += 1
  assert damaged
  ck = checkpointing.Checkpointer(tmp_path, keep=5, use_async=False)
  caplog.set_level(logging.WARNING)
  got = ck.restore_latest(state)
  assert got.meta["step"] == 2 and got.data_state == {"pos": 2} and int(got.tree.step) == 0
  (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert "checkpoints/4" in warning and "skipping" in warning
  assert (tmp_path / "checkpoints" / "4").is_dir(), "the damaged checkpoint is kept for inspection"
  ck.close()


def test_nan_loss_stops_with_the_step_and_keeps_last_good_checkpoint(tmp_path, shards):
  from helpers import tiny_config
  cfg = tiny_config()
  cfg.train.checkpoint_every = 2
  cfg.train.log_every = 1
  model, tx, state = _tiny_state(cfg)
  mesh = parallel.make_mesh(jax.devices()[:1])
  real = train_step.make_train_step(model, tx, mesh)

  def poisoned(st, batch):
    new, m = real(st, batch)
    m = dict(m)
    m["loss"] = jnp.where(new.step == 3, jnp.nan, m["loss"])
    return new, m

  data_cfg = {"train_files": str(shards / "shards"), "patch_size": 16, "num_workers": 0}
  from diffssr_jax.data import pipeline
  dc = pipeline.default_data_config()
  dc.update(data_cfg)
  it = pipeline.make_train_iterator(dc, scale=4, seed=0, batch_size=2)
  ck = checkpointing.Checkpointer(tmp_path, keep=5, use_async=False)
  with pytest.raises(loop.NonFiniteLossError, match="at step 3"):
    loop.run_loop(loop.Loop(tmp_path, cfg.train, 6, poisoned, train_step.learning_rate_schedule(cfg.optim, 6), mesh,
                            checkpointer=ck), state, it)
  ck.close()
  assert sorted(int(d.name) for d in (tmp_path / "checkpoints").iterdir()) == [2]


def test_nan_after_an_unverified_restore_names_the_checkpoint(tmp_path, shards, monkeypatch):
  """A checkpoint without manifest (older code) accepted through the trust variable, whose weights were
  damaged into huge finite values (flipped bytes gave 2.3e38), passes the finite check but makes the loss
  non-finite right after the restore; the error points at the checkpoint, not at the learning rate."""
  import orbax.checkpoint as ocp
  from helpers import tiny_config
  cfg = tiny_config()
  cfg.train.checkpoint_every = 100
  cfg.train.log_every = 1
  cfg.train.keep_checkpoints = 5
  model, tx, state = _tiny_state(cfg)
  mesh = parallel.make_mesh(jax.devices()[:1])
  damaged = state.replace(step=jnp.int32(2), params=jax.tree.map(lambda x: jnp.full_like(x, 2.3e38), state.params))
  m = ocp.CheckpointManager((tmp_path / "checkpoints").absolute())  # as the code before manifests wrote it
  m.save(2, args=checkpointing.Checkpointer._args(checkpointing.state_to_tree(damaged), None, {"step": 2}))
  m.wait_until_finished()
  m.close()
  monkeypatch.setenv(integrity.TRUST_ENV, "1")
  restored, resumed, ck = train._restore_or_start(state, cfg, tmp_path, mesh)
  assert int(restored.step) == 2 and resumed.step == 2 and not resumed.verified
  from diffssr_jax.data import pipeline
  dc = pipeline.default_data_config()
  dc.update({"train_files": str(shards / "shards"), "patch_size": 16, "num_workers": 0})
  it = pipeline.make_train_iterator(dc, scale=4, seed=0, batch_size=2)
  with pytest.raises(loop.NonFiniteLossError) as e:
    loop.run_loop(loop.Loop(tmp_path, cfg.train, 8, train_step.make_train_step(model, tx, mesh),
                            train_step.learning_rate_schedule(cfg.optim, 8), mesh, checkpointer=ck, resumed=resumed),
                  restored, it)
  ck.close()
  msg = str(e.value)
  assert "resumed at step 2" in msg and "damaged checkpoint" in msg and integrity.TRUST_ENV in msg
  assert "lower the learning rate" not in msg


def test_rrdb_weights_load_from_workdir_and_official_checkpoint(tmp_path):
  import torch
  from helpers import tiny_config
  from diffssr_jax.models import convert
  cfg = tiny_config()
  model = build_model(cfg)
  params = jax.device_get(model.init(jax.random.key(3)))
  tx = train_step.make_optimizer(cfg.optim, 10)
  st = train_step.init_train_state({"rrdb": params["rrdb"]}, {}, tx, seed=0)
  ck = checkpointing.Checkpointer(tmp_path / "rrdb_run", use_async=False)
  ck.save(5, st)
  ck.close()
  got = train.load_rrdb_params(tmp_path / "rrdb_run")
  jax.tree.map(np.testing.assert_array_equal, got, params["rrdb"])
  sd = {k: torch.from_numpy(np.array(v)) for k, v in convert.flax_to_torch({"rrdb": params["rrdb"]}).items()}
  torch.save({"state_dict": {"model": {k[len("rrdb."):]: v for k, v in sd.items()}}}, tmp_path / "rrdb.ckpt")
  got = train.load_rrdb_params(tmp_path / "rrdb.ckpt")
  jax.tree.map(np.testing.assert_array_equal, got, params["rrdb"])
  with pytest.raises(integrity.NoCheckpointError):
    train.load_rrdb_params(tmp_path)


def test_indivisible_batch_is_rejected_at_start(tmp_path, shards):
  sys.path.insert(0, str(ROOT / "tests" / "configs"))
  import tiny_train
  cfg = tiny_train.get_config()
  cfg.train.batch_size = 5
  cfg.data.train_files = str(shards / "shards")
  with pytest.raises(ValueError, match="not divisible by the 4 devices"):
    train.train_and_evaluate(cfg, tmp_path)


def test_relative_workdir(tmp_path, monkeypatch):
  """Workdirs given relative to the current folder (as in the README commands) save and restore."""
  from helpers import tiny_config
  _, _, state = _tiny_state(tiny_config())
  monkeypatch.chdir(tmp_path)
  ck = checkpointing.Checkpointer("runs/rel", use_async=False)
  ck.save(3, state)
  ck.close()
  params, step = loading.load_workdir_params("runs/rel", use_ema=False)
  assert step == 3 and set(params) == {"unet", "rrdb"}


def test_validation_panel_is_labelled_lr_bicubic_rrdb_sr_hr():
  """A validation panel: LR (nearest-upscaled) | bicubic | RRDB | SR | HR, each under a strip with its name."""
  from diffssr_jax.data.eval_sources import EvalImage
  from diffssr_jax.training import validate
  rng = np.random.default_rng(0)
  hr = rng.integers(0, 256, (32, 24, 3), dtype=np.uint8)
  lr = hr[::4, ::4]
  outs = {k: rng.integers(0, 256, hr.shape, dtype=np.uint8) for k in ("bicubic", "rrdb", "diffusion")}
  panel = validate.panel(EvalImage("a/b", hr, lr, None), outs)
  strip = 16
  assert panel.shape == (strip + 32, 5 * 24 + 4 * 4, 3)
  columns = [np.repeat(np.repeat(lr, 4, 0), 4, 1), outs["bicubic"], outs["rrdb"], outs["diffusion"], hr]
  for i, want in enumerate(columns):
    x = i * (24 + 4)
    np.testing.assert_array_equal(panel[strip:, x:x + 24], want)
    assert (panel[:strip, x:x + 24] < 128).any(), f"column {i} has no label"
    if i < 4:
      assert (panel[:, x + 24:x + 28] == 255).all()  # the white gap
  # Without a diffusion output (the RRDB stage) there is no SR column; the label strip differs per column.
  small = validate.panel(EvalImage("a/b", hr, lr, None), {k: outs[k] for k in ("bicubic", "rrdb")})
  assert small.shape == (strip + 32, 4 * 24 + 3 * 4, 3)
  assert not np.array_equal(panel[:strip, 2 * 28:2 * 28 + 24], panel[:strip, 3 * 28:3 * 28 + 24])


def test_train_state_in_other_layouts_trains_saves_and_restores_as_row_major(tmp_path, shards):
  """`train.state_layouts = "auto"` (`train_step.LaidOutStep`): on a GPU XLA keeps the conv kernels and Adam's
  moments OHWI, so the train state lives in non-row-major layouts from the first step on. The CPU keeps
  row-major, so here every state array of 2+ dimensions is forced to its reversed layout (the hook the class
  has for this) and the loop must give what the row-major step gives, bit for bit: the same losses, params,
  EMA and samples, checkpoints that restore into a row-major state, and a restored state moved back into
  the step's layouts when training resumes."""
  from helpers import tiny_config
  from jax.experimental.layout import Layout
  from diffssr_jax.data import pipeline
  from diffssr_jax.diffusion import sampling
  cfg = tiny_config()
  cfg.train.checkpoint_every = 2
  cfg.train.log_every = 1
  cfg.train.keep_checkpoints = 5
  model, _, _ = _tiny_state(cfg)
  tx = train_step.make_optimizer(cfg.optim, 10)
  fresh = lambda: train_step.create_train_state(model, model.init(jax.random.key(0)), tx, seed=0, use_ema=True)  # noqa: E731
  mesh = parallel.make_mesh(jax.devices()[:1])
  reverse = lambda a: Layout(tuple(range(a.ndim))[::-1]) if a.ndim >= 2 else Layout(tuple(range(a.ndim)))  # noqa: E731
  dc = pipeline.default_data_config()
  dc.update({"train_files": str(shards / "shards"), "patch_size": 16, "num_workers": 0})

  def make(layouts):
    step = train_step.make_train_step(model, tx, mesh, ema_decay=0.9, state_layouts=layouts)
    if layouts == "auto":
      step.layout = reverse
    return step

  def run(step, workdir, state, start=0, steps=4):
    ck = checkpointing.Checkpointer(workdir, keep=5, use_async=False)
    it = pipeline.make_train_iterator(dc, scale=4, seed=0, batch_size=2, start_step=start)
    state, history = loop.run_loop(loop.Loop(workdir, cfg.train, steps, step, train_step.learning_rate_schedule(
        cfg.optim, steps), mesh, checkpointer=ck), parallel.replicate(state, mesh), it, start)
    ck.close()
    return state, [m["loss"] for _, m in history]

  row_major, losses = run(make("default"), tmp_path / "a", fresh())
  laid_out_step = make("auto")
  laid_out, losses_laid_out = run(laid_out_step, tmp_path / "b", fresh())
  kernel = max(jax.tree.leaves(laid_out.params), key=lambda a: a.ndim)
  assert kernel.ndim == 4 and kernel.format.layout.major_to_minor == (3, 2, 1, 0)  # the state really moved
  for tree in (laid_out.params, laid_out.ema_params, laid_out.opt_state):  # EMA and Adam's moments too
    for a in jax.tree.leaves(tree):
      assert a.format.layout.major_to_minor == reverse(a).major_to_minor, a.shape
  assert losses_laid_out == losses and len(losses) == 4
  for a, b in zip(jax.tree.leaves(row_major), jax.tree.leaves(laid_out)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  lr = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 4, 4, 3)), jnp.float32)
  lr_up = jnp.repeat(jnp.repeat(lr, 4, 1), 4, 2)
  sample = lambda st: sampling.sample(model, st.model_params(use_ema=True), lr, lr_up, jax.random.key(1),  # noqa: E731
                                      sampler="ddim", steps=3)[0]
  np.testing.assert_array_equal(np.asarray(sample(laid_out)), np.asarray(sample(row_major)))
  for step in (2, 4):  # the laid-out run's checkpoints hold the row-major run's values
    a, _ = loading.load_workdir_params(tmp_path / "a", step=step, use_ema=False)
    b, _ = loading.load_workdir_params(tmp_path / "b", step=step, use_ema=False)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)
  # Resume the laid-out run from its step-2 checkpoint (restored row-major) to step 4 with the same compiled
  # step, which moves the restored state into its layouts (it refuses row-major arrays): the same state.
  ck = checkpointing.Checkpointer(tmp_path / "b", use_async=False)
  restored = checkpointing.restore_step(ck.last, 2, parallel.replicate(fresh(), mesh))
  ck.close()
  assert int(restored.tree.step) == 2 and restored.verified
  resumed, _ = run(laid_out_step, tmp_path / "c", restored.tree, start=2)
  for a, b in zip(jax.tree.leaves(row_major), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
