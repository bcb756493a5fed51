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
