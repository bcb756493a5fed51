"""Native XLA:CPU convolutions, built on first use: forward and weight gradient as blocked SGEMMs.

XLA:CPU computes conv weight gradients (contractions over B*H*W with a small Cin x Cout result) at
25-65 GFLOP/s on 2 cores and the RRDB's convs at 95-140; MKL's SGEMM, which PyTorch's CPU library
carries, blocked for L2 and run on two threads, does both at 150-240 (4x160x160x64 -> 64 weight
gradient: 32 vs 240 ms). 3x3 and 2x2 stride-1 convs (almost every conv of the U-Net and the RRDB,
their input gradients included, and the transposed convs' sub-pixel form) go through Winograd F(2x2, 3x3)
and F(2x2, 2x2) handlers instead, 2.25x / 1.78x fewer multiplies (e.g. 4x160x160x64 -> 64 forward: 17.5
vs 43 ms), which also read zero or reflection padding in place. `conv_sgemm.cc` holds the XLA FFI handlers; this module compiles it with the
machine's C++ compiler into a cache folder (once per source / jaxlib version), loads torch's library by
path (torch itself is not imported) and registers the handlers for the CPU platform.

Everything is optional: without a compiler, without torch, or with `DIFFSSR_NATIVE=0`, `available()`
is False and the models keep XLA's own formulation (same values to float32 rounding). On GPU/TPU the
handlers are never used (`layers` picks them per platform).
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp

WEIGHT_GRAD_TARGET = "diffssr_conv_weight_grad"
FORWARD_TARGET = "diffssr_conv_forward"
WINO_FORWARD_TARGET = "diffssr_wino_forward"
WINO_WEIGHT_GRAD_TARGET = "diffssr_wino_weight_grad"
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conv_sgemm.cc")
_log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict = {}


def cache_dir() -> str:
  """Where built libraries go: $DIFFSSR_CACHE, else $XDG_CACHE_HOME/diffssr_jax, else ~/.cache/diffssr_jax."""
  root = os.environ.get("DIFFSSR_CACHE")
  if not root:
    root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "diffssr_jax")
  return os.path.join(root, "native")


def blas_library() -> str | None:
  """PyTorch's CPU library (it exports MKL's `sgemm_`), found without importing torch."""
  spec = importlib.util.find_spec("torch")
  if spec is None or not spec.origin:
    return None
  path = os.path.join(os.path.dirname(spec.origin), "lib", "libtorch_cpu.so")
  return path if os.path.isfile(path) else None


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _cpu_identity() -> bytes:
  """The CPU model and feature flags (what -march=native compiles for)."""
  try:
    with open("/proc/cpuinfo", "rb") as f:
      lines = [ln for ln in f.read().splitlines() if ln.startswith((b"model name", b"flags"))]
    return b"\n".join(sorted(set(lines)))
  except OSError:
    import platform
    return platform.processor().encode()


def build(out_dir: str | None = None) -> str:
  """Compiles the handler (if not already built) and returns the shared library's path.

  The name carries a hash of the source, the jaxlib version and the compiler, so a stale build is
  never loaded; the library is written to a temporary name and renamed, so concurrent builds (several
  test processes) cannot leave a half-written file behind.
  """
  cxx = _compiler()
  if cxx is None:
    raise RuntimeError("no C++ compiler found (set CXX)")
  with open(_SOURCE, "rb") as f:
    source = f.read()
  import jaxlib
  # -march=native: the Winograd transforms vectorise over channels with the machine's widest vectors;
  # the CPU's identity is part of the cache key, so a cache shared between machines stays correct.
  flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", f"-I{jax.ffi.include_dir()}"]
  parts = [source, jaxlib.__version__.encode(), cxx.encode(), _cpu_identity(), *map(str.encode, flags)]
  key = hashlib.sha256(b"\0".join(parts))
  key = key.hexdigest()[:16]
  out_dir = out_dir or cache_dir()
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"conv_sgemm-{key}.so")
  if os.path.isfile(path):
    return path
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
  os.close(fd)
  cmd = [cxx, *flags, _SOURCE, "-o", tmp, "-ldl"]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      raise RuntimeError(f"compiling {_SOURCE} failed:\n{proc.stderr[-4000:]}")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def _load() -> None:
  if os.environ.get("DIFFSSR_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
    raise RuntimeError("disabled by DIFFSSR_NATIVE=0")
  blas = blas_library()
  if blas is None:
    raise RuntimeError("torch's libtorch_cpu.so (the MKL SGEMM) was not found")
  lib = ctypes.CDLL(build())
  code = lib.diffssr_load_blas(blas.encode())
  if code != 0:
    raise RuntimeError(f"{blas}: " + ("could not be loaded" if code == 1 else "has no sgemm_ symbol"))
  jax.ffi.register_ffi_target(WEIGHT_GRAD_TARGET, jax.ffi.pycapsule(lib.DiffssrConvWeightGrad), platform="cpu")
  jax.ffi.register_ffi_target(FORWARD_TARGET, jax.ffi.pycapsule(lib.DiffssrConvForward), platform="cpu")
  jax.ffi.register_ffi_target(WINO_FORWARD_TARGET, jax.ffi.pycapsule(lib.DiffssrWinoForward), platform="cpu")
  jax.ffi.register_ffi_target(WINO_WEIGHT_GRAD_TARGET, jax.ffi.pycapsule(lib.DiffssrWinoWeightGrad),
                              platform="cpu")
  _state["lib"] = lib


def available() -> bool:
  """True once the handler is built, loaded and registered; the first call does that (a few seconds).

  A failure is logged once and remembered: the caller falls back to XLA's formulation."""
  with _lock:
    if "ok" not in _state:
      try:
        _load()
        _state["ok"] = True
      except Exception as e:  # noqa: BLE001 - any failure means "use the portable path"
        _state["ok"] = False
        _state["error"] = str(e)
        _log.warning("diffssr_jax: native CPU convolutions unavailable (%s); using XLA's", e)
    return _state["ok"]


def unavailable_reason() -> str | None:
  return _state.get("error")


def _phase_split(xp, strides):
  """[B, Hp, Wp, Cin] -> [sy, B, Hs, sx * Wq, Cin] (zero-extended to multiples of the strides), the
  layout `conv_sgemm.cc` reads; a free reshape for stride 1 when nothing needs extending."""
  sy, sx = strides
  b, hp, wp, cin = xp.shape
  hs, wq = -(-hp // sy), -(-wp // sx)
  xp = jnp.pad(xp, ((0, 0), (0, hs * sy - hp), (0, wq * sx - wp), (0, 0)))
  return jnp.moveaxis(xp.reshape(b, hs, sy, wq * sx, cin), 2, 0).astype(jnp.float32), hs, wq


def _as_varying_like(out, *inputs):
  """Inside shard_map: the FFI result is typed device-invariant; it varies over the mesh axes its inputs
  vary over, as XLA's own conv result would."""
  varying = frozenset().union(*(jax.typeof(a).manual_axis_type.varying for a in inputs))
  return jax.lax.pcast(out, tuple(sorted(varying)), to="varying") if varying else out


def conv_forward(xp, w, strides):
  """VALID NHWC/HWIO conv of the already padded input `xp` ([B, Hp, Wp, Cin]) with `w` ([kh, kw, Cin,
  Cout]), float32. Emits the FFI call: only for CPU lowering with `available()` True."""
  kh, kw, _, cout = w.shape
  sy, sx = strides
  b, hp, wp, _ = xp.shape
  ho, wo = (hp - kh) // sy + 1, (wp - kw) // sx + 1
  xs, hs, wq = _phase_split(xp, strides)
  grid = jax.ShapeDtypeStruct((b, hs, wq, cout), jnp.float32)
  # Under vmap (inference vmaps over images) the calls run one per mapped element: each is a whole
  # batched conv already, large enough to keep both threads busy.
  call = jax.ffi.ffi_call(FORWARD_TARGET, grid, vmap_method="sequential")
  y = call(xs, w.astype(jnp.float32), sy=int(sy), sx=int(sx), ho=int(ho), wo=int(wo))
  return _as_varying_like(y, xs, w)[:, :ho, :wo]


def conv_weight_grad(xp, dy, kernel_hw, strides):
  """Weight gradient of a VALID NHWC/HWIO conv of the already padded input `xp` ([B, Hp, Wp, Cin],
  float32) with output gradient `dy` ([B, Ho, Wo, Cout]): [kh, kw, Cin, Cout]. Emits the FFI call, so
  only for CPU lowering with `available()` True."""
  kh, kw = kernel_hw
  sy, sx = strides
  _, ho, wo, cout = dy.shape
  xs, hs, wq = _phase_split(xp, strides)
  cin = xs.shape[-1]
  dyp = jnp.pad(dy, ((0, 0), (0, hs - ho), (0, wq - wo), (0, 0))).astype(jnp.float32)
  out = jax.ShapeDtypeStruct((kh, kw, cin, cout), jnp.float32)
  call = jax.ffi.ffi_call(WEIGHT_GRAD_TARGET, out, vmap_method="sequential")
  dw = call(xs, dyp, sy=int(sy), sx=int(sx), ho=int(ho), wo=int(wo))
  return _as_varying_like(dw, xs, dyp)


def wino_ok(x, kernel_hw, strides, pad: int = 0) -> bool:
  """Whether the Winograd handlers serve this conv of `x` padded by `pad` on every side: a 3x3 (F(2x2,
  3x3)) or 2x2 (F(2x2, 2x2)) kernel, stride 1, padding up to kernel - 1, and at least 8 input channels
  (thinner GEMMs gain little)."""
  _, h, w, cin = x.shape
  r = kernel_hw[0]
  return (tuple(kernel_hw) in ((3, 3), (2, 2)) and tuple(strides) == (1, 1) and 0 <= pad <= r - 1
          and h + 2 * pad - r + 1 >= 1 and w + 2 * pad - r + 1 >= 1 and cin >= 8)


def wino_forward(x, w, pad: int = 0, reflect: bool = False, flip: bool = False):
  """Stride-1 NHWC/HWIO conv (3x3 or 2x2 kernel, `wino_ok`) of `x` ([B, H, W, Cin]) padded by `pad` on
  every side (zeros, or with `reflect` ReflectionPad2d(1); the padding is read in place, never
  materialised), as Winograd F(2x2, r x r): kernel and tile transforms and the GEMMs all in the handler.
  Output [B, H + 2 pad - r + 1, W + 2 pad - r + 1, Cout]. With `flip`, `w` is the kernel [r, r, Cout,
  Cin] of the conv whose input gradient this is: the handler reads it flipped and transposed."""
  b, h, wd, _ = x.shape
  r = w.shape[0]
  cout = w.shape[2] if flip else w.shape[3]
  out = jax.ShapeDtypeStruct((b, h + 2 * pad - r + 1, wd + 2 * pad - r + 1, cout), jnp.float32)
  call = jax.ffi.ffi_call(WINO_FORWARD_TARGET, out, vmap_method="sequential")
  xs, ws = x.astype(jnp.float32), w.astype(jnp.float32)
  y = call(xs, ws, pad=int(pad), reflect=int(bool(reflect)), flip=int(bool(flip)))
  return _as_varying_like(y, xs, ws)


def wino_weight_grad(x, dy, pad: int = 0, reflect: bool = False, kernel_size: int = 3):
  """Weight gradient [r, r, Cin, Cout] (r = `kernel_size`) of `wino_forward(x, w, pad, reflect)` given
  the output gradient `dy`."""
  cin, cout = x.shape[-1], dy.shape[-1]
  out = jax.ShapeDtypeStruct((kernel_size, kernel_size, cin, cout), jnp.float32)
  call = jax.ffi.ffi_call(WINO_WEIGHT_GRAD_TARGET, out, vmap_method="sequential")
  xs, dys = x.astype(jnp.float32), dy.astype(jnp.float32)
  return _as_varying_like(call(xs, dys, pad=int(pad), reflect=int(bool(reflect))), xs, dys)


_CALL = re.compile(r"= f32\[([\d,]+)\][^\n]*? custom-call\(.*?custom_call_target=\"(diffssr_(?:conv|wino)_\w+)\""
                   r".*?operand_layout_constraints=(.*)")
_SHAPE = re.compile(r"f32\[([\d,]+)\]")


def hlo_flops(hlo_text: str) -> float:
  """FLOPs of the native conv calls in a compiled module's HLO text (XLA's cost analysis counts custom
  calls as zero): the multiply-adds the SGEMMs do, x 2. Direct convs: grid pixels x kh x kw x Cin x
  Cout (including the grid's padding columns); Winograd F(2x2, 3x3): 16 per 2x2 tile, i.e. 4 x output
  pixels x Cin x Cout, rounded up to whole tiles (3x3: 9 per pixel done 2.25x cheaper); F(2x2, 2x2): 9
  per tile (2x2: 4 per pixel, 1.78x cheaper). The tile transforms are not counted."""
  total = 0.0
  for line in hlo_text.splitlines():
    m = _CALL.search(line)
    if not m:
      continue
    result = [int(v) for v in m.group(1).split(",")]
    operands = [[int(v) for v in s.split(",")] for s in _SHAPE.findall(m.group(3))[:2]]
    if m.group(2) == FORWARD_TARGET and len(operands) == 2:
      grid, kernel = result, operands[1]
    elif m.group(2) == WEIGHT_GRAD_TARGET and len(operands) == 2:
      grid, kernel = operands[1], result
    elif m.group(2) in (WINO_FORWARD_TARGET, WINO_WEIGHT_GRAD_TARGET) and len(operands) == 2:
      if m.group(2) == WINO_FORWARD_TARGET:
        out, cin, r = result, operands[0][3], operands[1][0]
      else:
        out, cin, r = operands[1], result[2], result[0]
      tiles = out[0] * -(-out[1] // 2) * -(-out[2] // 2)
      total += 2.0 * (r + 1) ** 2 * tiles * cin * out[3]
      continue
    else:
      continue
    total += 2.0 * grid[0] * grid[1] * grid[2] * kernel[0] * kernel[1] * kernel[2] * kernel[3]
  return total
