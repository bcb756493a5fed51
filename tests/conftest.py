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
