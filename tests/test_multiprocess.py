"""Multi-process training, for real: two processes on localhost (gloo CPU collectives), two CPU devices each,
train the tiny config on a 4-device global mesh, against one process with 4 devices.

Shown here: the same loss curve and final params (1e-5) as the single-process run of the same global
batches; identical params in both processes; only process 0 writes logs, TensorBoard events, sample panels
and summary.json; the checkpoint both processes write restores in a single process; a single-process
checkpoint resumes on two processes; and when one process dies the other stops with a clear error in
bounded time, after which a restart of both resumes from the last complete checkpoint.
"""
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from diffssr_jax.inference import loading
from diffssr_jax.training import integrity

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 8


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _overrides(shards, cache):
  # The RRDB is trained with the U-Net (no pre-training stage), validation at steps 4 and 8 on one held-out
  # photo (a batch of 4: one image and three copies, split over the 4 devices), checkpoints every 2 steps.
  return [f"--config.data.train_files={shards / 'shards'}", f"--config.eval.hr_dir={shards / 'val'}",
          "--config.optim.train_rrdb=True", "--config.rrdb_pretrain.num_steps=0", f"--config.train.num_steps={STEPS}",
          "--config.train.eval_every=4", "--config.eval.batch_size=1", f"--config.compilation_cache={cache}"]


def _launch(workdir, shards, cache, tmp, n_proc, extra=(), crash=None, sigterm=None):
  """Starts the processes of one run; returns [(process, out npz path)]."""
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
  procs = []
  for pid in range(n_proc):
    out = tmp / f"{workdir.name}_p{pid}.npz"
    cmd = [sys.executable, str(ROOT / "tests" / "mp_worker.py"), "--workdir", str(workdir),
           "--devices", str(4 // n_proc), "--num_processes", str(n_proc), "--process_id", str(pid),
           "--port", str(port), "--out", str(out), *_overrides(shards, cache), *extra]
    if crash and crash[0] == pid:
      cmd += ["--crash_at", str(crash[1])]
    if sigterm and sigterm[0] == pid:
      cmd += ["--sigterm_at", str(sigterm[1])]
    log = open(tmp / f"{workdir.name}_p{pid}.log", "w")
    procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), out, log))
  return procs


def _finish(procs, timeout=300):
  """Waits for the processes of one run; returns their exit codes and their logs."""
  codes = []
  for p, _, log in procs:
    codes.append(p.wait(timeout=timeout))
    log.close()
  return codes, [pathlib.Path(log.name).read_text() for _, _, log in procs]


def _run(workdir, shards, cache, tmp, n_proc, extra=()):
  procs = _launch(workdir, shards, cache, tmp, n_proc, extra)
  codes, logs = _finish(procs)
  assert codes == [0] * n_proc, "\n".join(l[-3000:] for l in logs)
  return [dict(np.load(out)) for _, out, _ in procs], logs


def _losses(workdir):
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]
  assert len(train) == len({s for s, _ in train}), "each step logged once (by process 0 only)"
  return dict(train)


def _close(a: dict, b: dict, atol=1e-5):
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=0, err_msg=k)


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
  """The reference single-process run (4 devices) and the same run on two processes (2 devices each)."""
  tmp = tmp_path_factory.mktemp("mp")
  cache = tmp / "xla"
  (one,), _ = _run(tmp / "one", shards, cache, tmp, 1)
  (p0, p1), logs = _run(tmp / "two", shards, cache, tmp, 2)
  return tmp, cache, one, p0, p1, logs, shards


def test_two_processes_train_like_one(runs):
  tmp, _, one, p0, p1, logs, _ = runs
  assert int(one["step"]) == int(p0["step"]) == STEPS
  # Both processes hold exactly the same params, equal to the single-process run's.
  _close(p0, p1, atol=0)
  _close(one, p0)
  l1, l2 = _losses(tmp / "one"), _losses(tmp / "two")
  assert sorted(l1) == sorted(l2) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([l2[s] for s in l1], list(l1.values()), rtol=1e-5)
  # Validation (sharded over both processes' devices, gathered) gives the single-process metrics.
  s1, s2 = (json.loads((tmp / w / "summary.json").read_text()) for w in ("one", "two"))
  for method in ("bicubic", "rrdb", "diffusion"):
    assert s2[method]["psnr_y"] == pytest.approx(s1[method]["psnr_y"], abs=1e-3)


def test_only_process_zero_writes_logs_and_results(runs):
  tmp, *_, logs, _ = runs
  wd = tmp / "two"
  assert len(list((wd / "tb").iterdir())) == 1                                  # one TensorBoard event file
  assert sorted(p.name for p in (wd / "samples").iterdir()) == ["rocket_step4.png", "rocket_step8.png"]
  assert (wd / "summary.json").is_file() and (wd / "config.json").is_file()
  assert "step 8 loss" in logs[0] and "loss" not in logs[1]                     # progress lines: process 0


def test_checkpoint_written_by_two_processes_restores_in_one(runs):
  tmp, _, _, p0, *_ = runs
  # Each process saved its own input position (grain's orbax handler: one file per process).
  assert sorted(p.name for p in (tmp / "two" / "checkpoints" / str(STEPS) / "data").glob("*.json")) == \
      ["process_0-of-2.json", "process_1-of-2.json"]
  params, step = loading.load_workdir_params(tmp / "two", use_ema=False)
  assert step == STEPS
  import flax
  flat = flax.traverse_util.flatten_dict({"unet": params["unet"], "rrdb": params["rrdb"]}, sep="/")
  _close({k: v for k, v in p0.items() if k != "step"}, {k: np.asarray(v) for k, v in flat.items()}, atol=0)


def test_single_process_checkpoint_resumes_on_two_processes(runs):
  """Steps 1-4 by one process (its checkpoint at step 4), steps 5-8 by two: the run of one process
  throughout, loss by loss (the input stream is positioned from the step: no saved position fits two
  processes)."""
  tmp, cache, one, *_, shards = runs
  wd = tmp / "resumed"
  shutil.copytree(tmp / "one", wd)
  for step in ("6", "8"):
    shutil.rmtree(wd / "checkpoints" / step)
  (p0, p1), logs = _run(wd, shards, cache, tmp, 2)
  assert all("from step 4" in log and "positioned from the step" in log for log in logs)
  _close(one, p0)
  _close(p0, p1, atol=0)
  l1, l2 = _losses(tmp / "one"), _losses(wd)
  np.testing.assert_allclose([l2[s] for s in (5, 6, 7, 8)], [l1[s] for s in (5, 6, 7, 8)], rtol=1e-5)


def test_sigterm_to_one_process_then_a_dead_process_then_a_restart(runs):
  """One run interrupted twice, then finished (three launches instead of four for the two faults):

  1. A preemption notice (SIGTERM) to process 1 only, during step 3: JAX's preemption sync point makes both
     processes save the same step and exit 143 (the old code: process 1 saved and left, process 0 trained on
     and hung in the next collective until the heartbeat timeout).
  2. Restarted, process 1 dies (SIGKILL) when step 7 starts: process 0 does not hang but stops with JAX's
     error naming the cause, within the 10 s heartbeat timeout of noticing.
  3. Restarted again, both resume from the last complete checkpoint, each from its own saved input position,
     and end as the uninterrupted run."""
  tmp, cache, one, *_, shards = runs
  wd = tmp / "interrupted"
  codes, logs = _finish(_launch(wd, shards, cache, tmp, 2, sigterm=(1, 3)), timeout=240)
  assert codes == [143, 143], "\n".join(l[-3000:] for l in logs)
  saved = [[l for l in log.splitlines() if l.startswith("error: SIGTERM: saved diffusion step")] for log in logs]
  assert len(saved[0]) == len(saved[1]) == 1 and saved[0][0] == saved[1][0], saved
  stopped = max(int(d.name) for d in (wd / "checkpoints").iterdir() if d.name.isdigit())
  assert 3 <= stopped < 7 and f"step {stopped} of {STEPS}" in saved[0][0]
  assert sorted(p.name for p in (wd / "checkpoints" / str(stopped) / "data").glob("*.json")) == \
      ["process_0-of-2.json", "process_1-of-2.json"]

  t0 = time.time()
  codes, logs = _finish(_launch(wd, shards, cache, tmp, 2, crash=(1, 7)), timeout=240)
  assert codes[1] == -9, logs[1][-3000:]
  assert codes[0] != 0 and "another task died" in logs[0], logs[0][-3000:]
  assert time.time() - t0 < 200
  assert all(f"from step {stopped}" in log for log in logs)
  done = [int(d.name) for d in (wd / "checkpoints").iterdir() if d.name.isdigit()]
  assert stopped <= max(done) <= 6 and STEPS not in done

  (p0, p1), logs = _run(wd, shards, cache, tmp, 2)
  for log in logs:
    assert f"from step {max(done)}" in log and "positioned from the step" not in log
  _close(one, p0)
  _close(p0, p1, atol=0)


def test_two_processes_write_one_checkpoint_into_a_bucket_and_it_restores(gcs, shards, tmp_path):
  """A gs:// workdir (the GCS emulator): both processes write into one checkpoint step, published by orbax's
  commit file after our manifest (a bucket has no atomic rename), which verifies and restores in this single
  process to the params both processes hold."""
  from etils import epath
  wd = epath.Path(f"{gcs}/mp")
  (p0, p1), _ = _run(wd, shards, tmp_path / "xla", tmp_path, 2, extra=["--config.train.num_steps=2"])
  step = wd / "checkpoints" / "2"
  assert (step / "commit_success.txt").exists() and integrity.verify_files(step)
  assert sorted(p.name for p in (step / "data").glob("*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]
  params, got = loading.load_workdir_params(wd, use_ema=False)
  assert got == 2
  import flax
  flat = flax.traverse_util.flatten_dict({"unet": params["unet"], "rrdb": params["rrdb"]}, sep="/")
  _close(p0, p1, atol=0)
  _close({k: v for k, v in p0.items() if k != "step"}, {k: np.asarray(v) for k, v in flat.items()}, atol=0)
  assert not (pathlib.Path(ROOT) / "gs:").exists()
