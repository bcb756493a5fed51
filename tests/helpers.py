"""Small shared test utilities: tiny configs and the reference state dict."""
import re

import numpy as np

from diffssr_jax.configs import base


def tiny_config(modulation="reference", loss="l1"):
  """A model small enough to compile and run in seconds on CPU, same structure as the paper's."""
  c = base.get_config()
  c.model.unet_dim = 8
  c.model.unet_dim_mults = (1, 2)
  c.model.rrdb_num_feat = 8
  c.model.rrdb_num_blocks = 2
  c.model.rrdb_growth = 4
  c.model.rrdb_unroll = 2
  c.diffusion.timesteps = 10
  c.diffusion.modulation = modulation
  c.diffusion.loss = loss
  return c


def reference_state_dict(ref) -> dict:
  """The official state dict from the reference file: parameters rebuilt from their snapped codes."""
  sd = {}
  for k in ref:
    if k.startswith("sdq/"):
      key = k[4:]
      sd[key] = ref[k].astype(np.float32) * np.float32(2.0) ** ref["sdexp/" + key].astype(np.float32)
    elif k.startswith("sd/"):
      sd[k[3:]] = ref[k]
  return sd


def nchw_to_nhwc(a):
  return np.transpose(np.asarray(a), (0, 2, 3, 1))


def nhwc_to_nchw(a):
  return np.transpose(np.asarray(a), (0, 3, 1, 2))


# The two lines each CUDA extension module of jax-cuda12-plugin (requirements.txt: the compile-only client)
# writes when jax loads it on a machine without CUDA: absl's notice that logging is not initialised yet and the
# cudart stub's INFO line. They come from C++ static initialisation before any logging set-up (no environment
# variable or Python logging level reaches them), so they are the one output a command cannot silence.
CUDA_STUB_LINE = re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
                            r"STDERR$|^I\d{4} [\d:.]+ +\d+ cudart_stub\.cc:\d+\] Could not find cuda drivers on your "
                            r"machine, GPU will not be used\.$")


def our_stderr_lines(stderr: str) -> list[str]:
  """A command's stderr lines without the CUDA plugin's native start-up lines (see CUDA_STUB_LINE)."""
  return [line for line in stderr.splitlines() if not CUDA_STUB_LINE.match(line)]
