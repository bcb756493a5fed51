"""Parameter initialisation on the host: PyTorch's default layer init, drawn with numpy, placed on devices.

Why not `module.init` under jit: XLA compiles every random draw of an initializer into its own piece
of program. For the paper networks' 174 parameter arrays that took 14 s (rbg keys) to 35 s (threefry)
to compile on a 2-core CPU, and one large draw sliced 174 ways still 18 s (XLA fuses the generator
into every slice). Here the shapes come from `jax.eval_shape(module.init, ...)` (traced, never
compiled) and numpy draws the values in about half a second.

Distribution: PyTorch's default for Conv2d / ConvTranspose2d / Linear weights, U(-1/sqrt(fan_in),
+1/sqrt(fan_in)) (kaiming_uniform with a = sqrt(5)), which is what the official code trains from
(SAM-DiffSR does not re-initialise its layers); biases are zero. In flax's layouts fan_in is
prod(kernel.shape[:-1]) for Conv (HWIO), Dense (in, out) and ConvTranspose with transpose_kernel
(k, k, out, in: PyTorch's own fan_in for a transposed conv is out * k * k). Params of a scanned stack
(`STACKED`) carry a leading block axis, which is not part of the fan-in. The modules declare the same
kernel distribution (`TORCH_KERNEL_INIT`), so `module.init` draws from it too.
"""
from __future__ import annotations

import zlib

import flax
import flax.linen as nn
import jax
import numpy as np

TORCH_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# Module names whose params are stacked over scanned blocks (leading axis = block).
STACKED = frozenset({"RRDB_trunk"})


def _leaf_rng(seed: int, path: str) -> np.random.Generator:
  """An independent stream per parameter, keyed by its path: adding a layer never changes the others."""
  return np.random.default_rng([seed & 0xFFFFFFFF, seed >> 32, zlib.crc32(path.encode())])


def draw_params(abstract, seed: int) -> dict:
  """numpy values for an abstract param tree (ShapeDtypeStructs from `jax.eval_shape`): kernels
  U(+-1/sqrt(fan_in)), everything else zero."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(abstract))
  out = {}
  for path, leaf in flat.items():
    name = "/".join(map(str, path))
    shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
    if path[-1] == "kernel":
      stacked = 1 if STACKED & set(path[:-1]) else 0
      fan_in = int(np.prod(shape[stacked:-1]))
      bound = 1.0 / np.sqrt(fan_in)
      out[path] = _leaf_rng(seed, name).uniform(-bound, bound, shape).astype(dtype)
    else:
      out[path] = np.zeros(shape, dtype)
  return flax.traverse_util.unflatten_dict(out)


def seed_of(key) -> int:
  """A 64-bit integer seed from a jax PRNG key (typed or raw), for `draw_params`."""
  data = np.asarray(jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key)
  data = data.astype(np.uint64).ravel()
  return int(data[-1] | (data[-2] << np.uint64(32))) if data.size >= 2 else int(data[0])


def init_params(module: nn.Module, key, *args, **kwargs) -> dict:
  """`module.init(key, *args, **kwargs)`'s variables, initialised on the host by `draw_params` (seeded
  by `key`) and placed on the default device. `args` may be arrays or ShapeDtypeStructs."""
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
  return jax.device_put(draw_params(abstract, seed_of(key)))
