"""gs:// paths end to end, against a real GCS API: the local emulator of the `gcs` fixture (conftest.py).

With the tiny config and every location in the bucket: the export tool writes shards into the bucket (the
same bytes as a local export); the TFRecord index reads only record headers from it; training reads the
shards from the bucket, checkpoints into a bucket workdir, is killed and resumes from the bucket to the same
params and losses as an uninterrupted run; evaluate and upscale read that workdir and images from the bucket
and write their results there (the same bytes as written locally). And each command refuses, in one line
and before any work, a location that cannot be served, without creating a local folder named `gs:`.
(The two-process checkpoint into a bucket is in test_multiprocess.py.)
"""
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from etils import epath

from conftest import GCS_ENV
from diffssr_jax import fileio, storage
from diffssr_jax.data import export_cli, tfrecord
from diffssr_jax.data.source import TileSource
from diffssr_jax.evaluation import evaluate
from diffssr_jax.inference import upscale
from diffssr_jax.inference import loading
from diffssr_jax.training import integrity

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN_STEPS = ["--config.rrdb_pretrain.num_steps=0", "--config.optim.train_rrdb=True",
               "--config.train.num_steps=4", "--config.train.checkpoint_every=2"]


def _upload(local: pathlib.Path, url: str) -> None:
  for f in sorted(local.rglob("*")):
    if f.is_file():
      epath.Path(f).copy(epath.Path(url) / f.relative_to(local).as_posix(), overwrite=True)


@pytest.fixture(scope="module")
def bucket(gcs, shards):
  """The `shards` fixture's HR and validation photos uploaded, then exported into the bucket by the CLI."""
  _upload(shards / "hr", f"{gcs}/hr")
  _upload(shards / "val", f"{gcs}/val")
  code = export_cli.cli(["export", "--images", f"{gcs}/hr", "--out", f"{gcs}/shards", "--segmenter",
                         "felzenszwalb", "--tile_size", "64", "--tile_step", "64", "--min_tile", "32",
                         "--num_shards", "2", "--noprogress"])
  assert code == 0
  return gcs


def test_export_writes_the_local_shards_into_the_bucket(bucket, shards):
  local = sorted(p.name for p in (shards / "shards").glob("*.tfrecord"))
  remote = sorted(p.name for p in epath.Path(f"{bucket}/shards").iterdir() if ".tfrecord" in p.name)
  assert remote == local and len(local) == 2
  for name in local:
    assert (epath.Path(f"{bucket}/shards") / name).read_bytes() == (shards / "shards" / name).read_bytes()
  man = json.loads(epath.Path(f"{bucket}/shards/manifest.json").read_text())
  assert man["splits"]["train"]["complete"] and man["splits"]["train"]["num_records"] > 0
  assert not any(".partial" in p.name for p in epath.Path(f"{bucket}/shards/.export").iterdir())


def test_bucket_index_reads_headers_only_and_records_match(bucket, shards, monkeypatch):
  fetched = []
  read_range = tfrecord.read_range

  def counting(path, start, end):
    fetched.append(end - start)
    return read_range(path, start, end)
  monkeypatch.setattr(tfrecord, "read_range", counting)
  remote, local = TileSource(f"{bucket}/shards"), TileSource(shards / "shards")
  assert len(remote) == len(local) > 0
  # Indexing: one header (12 bytes) per record, never a shard start to finish.
  assert fetched == [tfrecord.HEADER] * len(local)
  total = sum(storage.size(f) for f in remote.files)
  assert sum(fetched) < total / 100
  for i in (0, len(local) // 2, len(local) - 1):  # each record: one ranged read of its bytes, CRC-checked
    assert remote.read(i) == local.read(i)
  # Globs are expanded in the bucket.
  assert [str(p) for p in tfrecord.expand_files(f"{bucket}/shards/train-*.tfrecord")] == remote.files


def test_grain_worker_processes_read_bucket_shards(bucket, shards):
  """The training input pipeline with a grain worker process (which reopens the shards itself) gives the
  same batches from the bucket as from the local shards."""
  from diffssr_jax.data import pipeline

  def batches(files, workers):
    c = pipeline.default_data_config()
    c.train_files, c.patch_size, c.num_workers = str(files), 32, workers
    it = pipeline.make_train_iterator(c, scale=4, seed=3, batch_size=2)
    return [next(it) for _ in range(3)]
  for a, b in zip(batches(shards / "shards", 0), batches(f"{bucket}/shards", 1)):
    assert sorted(a) == sorted(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_bucket_writes_and_damage_checks(gcs):
  path = f"{gcs}/misc/x.json"
  fileio.atomic_write_json(path, {"a": 1})
  fileio.append_text(f"{gcs}/misc/log.jsonl", "1\n")
  fileio.append_text(f"{gcs}/misc/log.jsonl", "2\n")
  assert json.loads(epath.Path(path).read_text()) == {"a": 1}
  assert epath.Path(f"{gcs}/misc/log.jsonl").read_text() == "1\n2\n"
  assert storage.size(path) == len(epath.Path(path).read_bytes())
  assert storage.files_below(f"{gcs}/misc") == ["log.jsonl", "x.json"]
  # A record flipped in a bucket shard is reported by its CRC check, naming the object.
  good = tfrecord.frame(b"x" * 100) + tfrecord.frame(b"y" * 50)
  bad = bytearray(good)
  bad[20] ^= 1
  epath.Path(f"{gcs}/misc/bad.tfrecord").write_bytes(bytes(bad))
  index = tfrecord.RecordIndex([f"{gcs}/misc/bad.tfrecord"])
  assert index.read(1) == b"y" * 50
  with pytest.raises(tfrecord.RecordError, match="bad.tfrecord: record 0 at offset 0: data CRC mismatch"):
    index.read(0)


def _train_cmd(workdir, data, cache):
  return [sys.executable, "-m", "diffssr_jax.main", "--config", str(ROOT / "tests/configs/tiny_train.py"),
          "--workdir", workdir, f"--config.data.train_files={data}", f"--config.compilation_cache={cache}",
          *TRAIN_STEPS]


LEASE_S = 3  # the bucket workdir lock's lease in these runs (60 s by default): a killed run's expires quickly


def _env():
  return dict(os.environ, XLA_FLAGS="", PYTHONPATH=str(ROOT), DIFFSSR_GCS_LOCK_LEASE_S=str(LEASE_S))


def _losses(workdir):
  rows = [json.loads(l) for l in epath.Path(f"{workdir}/metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


@pytest.fixture(scope="module")
def trained(bucket, tmp_path_factory):
  """An uninterrupted tiny run, and one killed after its step-2 checkpoint and restarted, both in the bucket."""
  cache = tmp_path_factory.mktemp("xla")
  ref, run = f"{bucket}/runs/ref", f"{bucket}/runs/run"
  out = subprocess.run(_train_cmd(ref, f"{bucket}/shards", cache), env=_env(), cwd=ROOT, capture_output=True,
                       text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  p = subprocess.Popen(_train_cmd(run, f"{bucket}/shards/train-*.tfrecord", cache), env=_env(), cwd=ROOT,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  commit = epath.Path(f"{run}/checkpoints/2/commit_success.txt")  # orbax publishes a gs:// step with it
  t0 = time.time()
  while not commit.exists():
    assert p.poll() is None, p.stdout.read().decode()[-3000:]
    assert time.time() - t0 < 240, "no step-2 checkpoint in the bucket"
    time.sleep(0.2)
  p.kill()
  p.wait()
  # The killed run left its workdir lease in the bucket (no kernel releases it): the restart can take it once
  # the lease has expired (test_bucket_workdir_lock_... checks the refusal before that).
  time.sleep(LEASE_S + 1)
  out = subprocess.run(_train_cmd(run, f"{bucket}/shards/train-*.tfrecord", cache), env=_env(), cwd=ROOT,
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  return ref, run, out.stderr + out.stdout


@pytest.mark.slow
def test_training_in_a_bucket_is_killed_and_resumes_exactly(trained):
  ref, run, log = trained
  assert not pathlib.Path(ROOT, "gs:").exists()
  assert "from step 2" in log or "from step 4" in log, log[-2000:]
  a, sa = loading.load_workdir_params(ref, use_ema=False)
  b, sb = loading.load_workdir_params(run, use_ema=False)
  assert sa == sb == 4
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert _losses(ref) == _losses(run) and sorted(_losses(run)) == [1, 2, 3, 4]
  # Each saved step carries our manifest, checked on restore (a flipped byte would be found).
  step_dir = epath.Path(f"{run}/checkpoints/4")
  assert integrity.verify_files(step_dir)
  assert json.loads(epath.Path(f"{run}/config.json").read_text())["train"]["num_steps"] == 4
  assert list(epath.Path(f"{ref}/tb").iterdir()), "TensorBoard events in the bucket"


@pytest.mark.slow
def test_evaluate_and_upscale_read_and_write_the_bucket(trained, bucket, tmp_path):
  ref = trained[0]
  args = ["--workdir", ref, "--datasets", f"val={bucket}/val", "--rrdb", "--nodiffusion", "--bicubic",
          "--noprogress"]
  assert evaluate.cli(["evaluate", *args, "--output", f"{bucket}/eval"]) == 0
  assert evaluate.cli(["evaluate", *args, "--output", str(tmp_path / "eval")]) == 0
  for rel in ("val/4_rrdb/metrics.csv", "val/bicubic/summary.json", "table_4.md"):
    assert (epath.Path(f"{bucket}/eval") / rel).read_bytes() == (tmp_path / "eval" / rel).read_bytes(), rel
  # A rerun finds every image done in the bucket's metrics.csv (resume), and changes nothing.
  before = epath.Path(f"{bucket}/eval/val/4_rrdb/metrics.csv").read_bytes()
  assert evaluate.cli(["evaluate", *args, "--output", f"{bucket}/eval"]) == 0
  assert epath.Path(f"{bucket}/eval/val/4_rrdb/metrics.csv").read_bytes() == before

  up = ["--workdir", ref, "--rrdb", "--noprogress"]
  assert upscale.cli(["upscale", f"{bucket}/val", *up, "--output", f"{bucket}/sr"]) == 0
  assert upscale.cli(["upscale", f"{bucket}/val/rocket.png", *up, "--output", str(tmp_path / "sr")]) == 0
  remote = epath.Path(f"{bucket}/sr/rocket.png")
  assert remote.read_bytes() == (tmp_path / "sr" / "rocket.png").read_bytes()
  assert upscale.is_upscale_output(remote)
  # Existing outputs in the bucket are seen (skipped), not rewritten.
  assert upscale.cli(["upscale", f"{bucket}/val", *up, "--output", f"{bucket}/sr"]) == 0
  assert not pathlib.Path(ROOT, "gs:").exists()


# ---------------------------------------------------------------- refusals
def _no_gcs_env(home):
  env = {k: v for k, v in os.environ.items() if k not in GCS_ENV}
  # No credentials anywhere: no gcloud config in HOME, and google-auth skips the GCE metadata server probe.
  env.update(HOME=str(home), NO_GCE_CHECK="True", CLOUDSDK_CONFIG=str(home / "gcloud"), XLA_FLAGS="",
             PYTHONPATH=str(ROOT))
  return env


REFUSED = {
    "train": lambda u, d: [sys.executable, "-m", "diffssr_jax.main", "--config",
                           str(ROOT / "tests/configs/tiny_train.py"), "--workdir", u,
                           f"--config.data.train_files={d}"],
    "evaluate": lambda u, d: [sys.executable, "-m", "diffssr_jax.evaluation.evaluate", "--workdir", str(d),
                              "--datasets", f"val={d}", "--output", u],
    "upscale": lambda u, d: [sys.executable, "-m", "diffssr_jax.inference.upscale", str(d), "--workdir", str(d),
                             "--output", u],
    "export": lambda u, d: [sys.executable, "-m", "diffssr_jax.data.export_cli", "--images", str(d), "--out", u,
                            "--segmenter", "felzenszwalb"],
    "benchmark": lambda u, d: [sys.executable, "-m", "diffssr_jax.benchmarks.data", "pipeline", "--files", u],
}


CASES = [(c, "gs://no-such-bucket/x", "no Google Cloud credentials") for c in sorted(REFUSED)] + [
    (c, "foo://bucket/x", "no storage backend serves 'foo://'") for c in ("train", "upscale")]


@pytest.mark.parametrize("command,url,reason", CASES)
def test_unservable_locations_are_refused_in_one_line(command, url, reason, shards, tmp_path):
  out = subprocess.run(REFUSED[command](url, shards / "val"), env=_no_gcs_env(tmp_path), cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  lines = [l for l in out.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and url in lines[0] and reason in lines[0], out.stderr[-2000:]
  assert not [p for p in tmp_path.rglob("*") if p.name in ("gs:", "foo:")]


def test_bucket_workdir_lock_is_exclusive_and_a_dead_runs_lease_expires(gcs, monkeypatch):
  """One writer per gs:// workdir (issue 19): the lock object is created only if absent, so a second run is
  refused in one line naming the holder; released, it can be taken again; a holder that dies (stops refreshing
  its lease, leaves the object behind) blocks a restart only until its lease expires, then it is taken over,
  and the dead holder's late refresh cannot take it back."""
  from diffssr_jax.training import lock
  monkeypatch.setenv(lock.GcsLeaseLock.LEASE_ENV, "2")
  wd = f"{gcs}/locked_run"
  first = lock.acquire(wd)
  assert isinstance(first, lock.GcsLeaseLock)
  time.sleep(1.2)  # refreshed at least once: still held, and not stale although older than one refresh
  with pytest.raises(lock.WorkdirLockedError) as e:
    lock.acquire(wd)
  assert "\n" not in str(e.value) and f"pid {os.getpid()}" in str(e.value) and wd in str(e.value)
  first.release()
  assert not epath.Path(wd, lock.LOCK_NAME).exists()

  dead = lock.acquire(wd)
  dead.stop_refreshing()  # the process died: the object stays, nobody refreshes it
  with pytest.raises(lock.WorkdirLockedError):
    lock.acquire(wd)  # the lease is still fresh
  time.sleep(2.5)
  taken = lock.acquire(wd)  # stale: taken over
  assert taken.generation != dead.generation
  with pytest.raises(Exception):  # the dead holder's generation no longer matches: it cannot write or delete
    dead._write(dead.generation)
  dead.release()
  assert epath.Path(wd, lock.LOCK_NAME).exists(), "the dead holder's release leaves the new holder's lock"
  taken.release()
