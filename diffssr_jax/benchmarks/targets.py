"""Accelerators to compile for without having one: GPU target configs and TPU topologies for `compile`.

A GPU target is XLA's `GpuTargetConfigProto` in text form, written here from each chip's published hardware
facts (NVIDIA's data sheets and CUDA's per-compute-capability limits); it is what XLA's GPU compiler would read
from the device, so the compile-only CUDA client (`jax-cuda12-plugin` + `jax-cuda12-pjrt`, no driver or GPU)
produces the code it would produce on that chip, minus autotuning. Only the fields the compiler reads are set.
A TPU target is a libtpu topology name (`v5e:1x1`): libtpu knows its chips itself.

The compile-only clients are reached through `jax.experimental.topologies.get_topology_desc`; the device
backends must stay on the CPU (`JAX_PLATFORMS=cpu`): on a machine without a GPU the CUDA plugin would otherwise
fail its driver and cuDNN checks at start-up, and on a machine with one nothing should touch it.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os

GIB = 2**30
CUDA_PLUGIN_INSTALL = "pip install jax-cuda12-plugin=={v} jax-cuda12-pjrt=={v}"
LIBTPU_INSTALL = "pip install \"jax[tpu]=={v}\""


class TargetUnavailable(RuntimeError):
  """The compiler for a target is not installed; the message is one line saying what to pip install."""


@dataclasses.dataclass(frozen=True)
class GpuTarget:
  """One NVIDIA GPU's hardware facts: what XLA's GPU compiler reads from a device (`se::DeviceDescription`)."""
  name: str
  description: str             # the CUDA device name (jax's device_kind)
  compute_capability: tuple[int, int]
  sm_count: int
  memory_bytes: int
  memory_bandwidth: int        # bytes/s
  l2_cache_bytes: int
  clock_ghz: float             # boost clock
  smem_per_sm: int             # shared memory per multiprocessor
  smem_per_block_optin: int    # opt-in maximum per block (cudaDevAttrMaxSharedMemoryPerBlockOptin)
  fp32_units_per_sm: int
  cudnn_version: tuple[int, int] = (9, 8)
  platform = "cuda"

  @property
  def memory_gib(self) -> float:
    return self.memory_bytes / GIB

  def target_config(self) -> str:
    """The GpuTargetConfigProto text. The per-thread/block limits are those of every compute capability
    from 7.0 on (CUDA programming guide, "Technical Specifications per Compute Capability")."""
    major, minor = self.compute_capability
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {self.smem_per_sm}
  shared_memory_per_block_optin: {self.smem_per_block_optin}
  threads_per_core_limit: 2048
  core_count: {self.sm_count}
  fpus_per_core: {self.fp32_units_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {self.memory_bandwidth}
  l2_cache_size: {self.l2_cache_bytes}
  clock_rate_ghz: {self.clock_ghz}
  device_memory_size: {self.memory_bytes}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: {self.cudnn_version[0]} minor: {self.cudnn_version[1]} }}
device_description_str: "{self.description}"
"""


@dataclasses.dataclass(frozen=True)
class TpuTarget:
  """A single-chip libtpu topology; `memory_bytes` is the chip's HBM (Google Cloud's TPU pages)."""
  name: str
  topology: str
  memory_bytes: int
  platform = "tpu"

  @property
  def memory_gib(self) -> float:
    return self.memory_bytes / GIB


# Hopper SMs: 228 KiB shared memory, up to 227 KiB per block; Ampere (A100): 164 KiB, up to 163 KiB per block.
# 128 FP32 units per SM on Hopper, 64 on the A100.
TARGETS = {
    "h200": GpuTarget("h200", "NVIDIA H200", (9, 0), sm_count=132, memory_bytes=151397597184,
                      memory_bandwidth=4_800_000_000_000, l2_cache_bytes=50 * 2**20, clock_ghz=1.98,
                      smem_per_sm=228 * 1024, smem_per_block_optin=227 * 1024, fp32_units_per_sm=128),
    "h100": GpuTarget("h100", "NVIDIA H100 80GB HBM3", (9, 0), sm_count=132, memory_bytes=80 * 10**9,
                      memory_bandwidth=3_350_000_000_000, l2_cache_bytes=50 * 2**20, clock_ghz=1.98,
                      smem_per_sm=228 * 1024, smem_per_block_optin=227 * 1024, fp32_units_per_sm=128),
    "a100": GpuTarget("a100", "NVIDIA A100-SXM4-80GB", (8, 0), sm_count=108, memory_bytes=80 * 10**9,
                      memory_bandwidth=2_039_000_000_000, l2_cache_bytes=40 * 2**20, clock_ghz=1.41,
                      smem_per_sm=164 * 1024, smem_per_block_optin=163 * 1024, fp32_units_per_sm=64),
    "v5e": TpuTarget("v5e", "v5e:1x1", memory_bytes=16 * GIB),
    "v6e": TpuTarget("v6e", "v6e:1x1", memory_bytes=32 * GIB),
}


def get(name: str):
  try:
    return TARGETS[name]
  except KeyError:
    raise ValueError(f"unknown target {name!r} (known: {', '.join(TARGETS)})") from None


def _jax_version() -> str:
  from importlib.metadata import version
  return version("jax")


def check_installed(target) -> None:
  """Raises `TargetUnavailable` (one line: what to pip install) when the target's compiler is missing."""
  if target.platform == "cuda":
    if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
      raise TargetUnavailable(f"compiling for {target.name} needs the CUDA compiler plugin (no GPU or driver): "
                              + CUDA_PLUGIN_INSTALL.format(v=_jax_version()))
  elif importlib.util.find_spec("libtpu") is None:
    raise TargetUnavailable(f"compiling for {target.name} needs libtpu (no TPU): "
                            + LIBTPU_INSTALL.format(v=_jax_version()))


def topology(target):
  """The compile-only topology of one chip of `target` (its `.devices` are what a Mesh is built over)."""
  check_installed(target)
  from jax.experimental import topologies
  if target.platform == "cuda":
    return topologies.get_topology_desc(platform="cuda", target_config=target.target_config(), topology="1x1x1")
  # libtpu takes a lock file so that two processes never drive one chip; a compile-only client drives none, and
  # with the lock another process's libtpu (a second compile, a test) would make this one fail.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  return topologies.get_topology_desc(topology_name=target.topology, platform="tpu", chips_per_host_bounds=[1, 1, 1])
