"""Super-resolving images of any size in overlapping tiles, blended without seams, in bounded memory.

The LR image is cut into equal `tile` x `tile` tiles overlapping by at least `overlap` pixels (the last tile of
each row/column flush with the image edge), the tiles are super-resolved in batches of equal shape (so a
jit-compiled model compiles once), and each HR tile is added into two float32 buffers of the output's size,
`sum(w * tile)` and `sum(w)`, with a separable window `w`. The output is their ratio, so the blend weights are
normalised per pixel whatever the tiles' actual overlaps. Memory: the two HR buffers plus one batch of tiles.
The default tile size follows the device's memory (`tile_for_memory`).

The window is 1 inside a tile and on every side lying on the image border; on a side shared with a
neighbour it is 0 for the outer `margin` pixels (where a network sees the tile's artificial edge) and then
rises with a raised-cosine over the rest of the overlap. Two opposite ramps over a common overlap sum to
exactly 1, so with the regular overlap the blend is a partition of unity, and any sr_fn whose output at a
pixel depends only on LR pixels within `margin` of it gives the untiled result exactly.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np


# The default tile (LR pixels) where the device reports no memory size (the CPU: host memory is not the limit
# that matters there, time is).
DEFAULT_TILE = 256
# The sampler's memory (`diffssr-benchmark compile --program sample`, H200 target, paper network, memory
# analysis): affine in the HR pixels of a call, peak = fixed + per pixel x HR pixels x tiles (README, "Memory
# guidance"). Fixed: the params and the RRDB's per-call buffers. Measured at 256² and 1356x2040, one image:
#   bfloat16  165.4 MB and 1692.6 MB  ->  564 B per HR pixel + 128.5 MB
#   float32   214.4 MB and 3177.4 MB  -> 1094 B per HR pixel + 142.7 MB
# (the sampler pads 1356x2040 to 1360x2040: the slope is per computed HR pixel, (peak2 - peak1) / 2,708,864).
SAMPLING_BYTES_PER_HR_PIXEL = {"bfloat16": 564, "float32": 1094}
SAMPLING_FIXED_BYTES = 143 * 10**6
# Share of the device's limit a call may plan for: the rest is headroom for the allocator's fragmentation, the
# next batch's transfers and the executables themselves.
TILE_MEMORY_FRACTION = 0.8
TILE_STEP, MIN_TILE, MAX_TILE = 64, 64, 1024


def tile_for_memory(bytes_limit: int | None, batch_size: int, scale: int, dtype="bfloat16") -> int:
  """The default tile (LR pixels a side) for a device with `bytes_limit` bytes (None: unknown -> DEFAULT_TILE):
  the largest multiple of TILE_STEP whose `batch_size` tiles fit in TILE_MEMORY_FRACTION of it by the measured
  sampler memory of `dtype`, within [MIN_TILE, MAX_TILE]. Larger tiles mean fewer overlapping pixels computed
  twice; past MAX_TILE (a 4096² HR tile) there is little left to gain and a compile per odd image size."""
  if not bytes_limit:
    return DEFAULT_TILE
  per_pixel = SAMPLING_BYTES_PER_HR_PIXEL.get(np.dtype(dtype).name, SAMPLING_BYTES_PER_HR_PIXEL["float32"])
  budget = TILE_MEMORY_FRACTION * bytes_limit - SAMPLING_FIXED_BYTES
  side_hr = math.sqrt(max(budget, 0) / (batch_size * per_pixel))
  tile = int(side_hr / scale) // TILE_STEP * TILE_STEP
  return min(max(tile, MIN_TILE), MAX_TILE)


def device_bytes_limit(device) -> int | None:
  """The memory XLA may allocate on `device` (memory_stats()['bytes_limit']), or None when not reported (CPU)."""
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 - backends without memory statistics raise or return None
    return None
  return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def axis_starts(n: int, tile: int, overlap: int) -> list[int]:
  """Tile start offsets along one axis of length `n`: stride tile - overlap, the last flush with the end
  (so the final overlap may exceed `overlap`); [0] when the axis fits in one tile."""
  if not 0 <= overlap < tile:
    raise ValueError(f"need 0 <= overlap < tile, got overlap={overlap}, tile={tile}")
  if n <= tile:
    return [0]
  starts = list(range(0, n - tile, tile - overlap))
  return starts + [n - tile]


def plan_tiles(h: int, w: int, tile: int, overlap: int) -> list[tuple[int, int]]:
  """(top, left) LR corners of the tiles covering an h x w image, row-major. Every tile is tile x tile;
  an axis shorter than `tile` has one tile at 0 and must be padded to `tile` by the caller."""
  if h < 1 or w < 1:
    raise ValueError(f"empty image {h}x{w}")
  return [(y, x) for y in axis_starts(h, tile, overlap) for x in axis_starts(w, tile, overlap)]


def ramp_1d(n: int, overlap: int, margin: int = 0, start: bool = True, end: bool = True) -> np.ndarray:
  """1-D blend window of length n (float64): on a ramped side, `margin` zeros then a raised cosine
  0.5 - 0.5 cos(pi (j + 0.5) / L), L = overlap - 2 margin, then ones. The cosine satisfies r(j) + r(L-1-j) = 1,
  so a falling and a rising ramp over the same overlap sum to one. Unramped sides are all ones."""
  if overlap and not 0 <= 2 * margin < overlap:
    raise ValueError(f"need 0 <= 2 * margin < overlap, got margin={margin}, overlap={overlap}")
  if 2 * overlap > n:
    raise ValueError(f"overlap {overlap} is more than half the tile ({n})")
  w = np.ones(n)
  if overlap == 0:
    return w
  ramp_len = overlap - 2 * margin
  r = 0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp_len) + 0.5) / ramp_len)
  head = np.concatenate([np.zeros(margin), r])
  if start:
    w[:len(head)] = head
  if end:
    w[n - len(head):] = head[::-1]
  return w


def blend_weights(tile_hr: int, overlap_hr: int, margin_hr: int = 0,
                  sides: tuple[bool, bool, bool, bool] = (True, True, True, True)) -> np.ndarray:
  """Separable (tile_hr, tile_hr) float32 window, the outer product of `ramp_1d` along rows and columns;
  `sides` = (top, bottom, left, right) says which sides are shared with a neighbour and so ramp."""
  top, bottom, left, right = sides
  rows = ramp_1d(tile_hr, overlap_hr, margin_hr, top, bottom)
  cols = ramp_1d(tile_hr, overlap_hr, margin_hr, left, right)
  return np.outer(rows, cols).astype(np.float32)


def _pad_to(lr: np.ndarray, tile: int) -> np.ndarray:
  """Pads bottom/right by mirror reflection (edge pixel not repeated; repeated reflections for tiny
  images) so both sides are at least `tile`."""
  ph, pw = max(0, tile - lr.shape[0]), max(0, tile - lr.shape[1])
  if ph == 0 and pw == 0:
    return lr
  mode = "reflect" if min(lr.shape[:2]) > 1 else "symmetric"  # a 1-pixel axis has nothing to reflect
  return np.pad(lr, ((0, ph), (0, pw), (0, 0)), mode=mode)


def upscale_tiled(lr: np.ndarray, sr_fn: Callable[[np.ndarray], np.ndarray], scale: int, tile: int = 256,
                  overlap: int = 32, batch_size: int = 4, margin: int | None = None,
                  progress: Callable[[int, int], None] | None = None, hr_side: np.ndarray | None = None) -> np.ndarray:
  """Super-resolves an (H, W, 3) float LR image tile by tile; returns (H*scale, W*scale, 3) float32.

  `sr_fn` maps a float32 batch (N, tile, tile, 3) to (N, tile*scale, tile*scale, 3) (numpy or jax); every call
  gets exactly `batch_size` tiles (the last batch is filled with copies of its last tile, discarded), so a
  jit-compiled function compiles once. An image smaller than a tile is reflect-padded first. `margin`
  (LR pixels, default overlap // 4) is the band at each shared tile edge that gets zero weight.
  `progress(done, total)` is called after each batch. `hr_side` (H*scale, W*scale, k), e.g. a SAM+SRDiff
  model's SPE map: cut with the same windows (in HR pixels, reflect-padded as the image) and given to
  `sr_fn(batch, side_batch)` as its second argument.
  """
  lr = np.asarray(lr, np.float32)
  if lr.ndim != 3:
    raise ValueError(f"upscale_tiled takes an (H, W, C) image, got {lr.shape}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if 2 * overlap > tile:
    raise ValueError(f"overlap {overlap} must be at most half the tile {tile}")
  margin = overlap // 4 if margin is None else margin
  h, w, c = lr.shape
  padded = _pad_to(lr, tile)
  ph, pw = padded.shape[:2]
  side = None
  if hr_side is not None:
    hr_side = np.asarray(hr_side, np.float32)
    if hr_side.ndim != 3 or hr_side.shape[:2] != (h * scale, w * scale):
      raise ValueError(f"hr_side has shape {hr_side.shape}, expected ({h * scale}, {w * scale}, k)")
    side = _pad_to(hr_side, tile * scale)
  tiles = plan_tiles(ph, pw, tile, overlap)
  t_hr = tile * scale
  acc = np.zeros((ph * scale, pw * scale, c), np.float32)
  wsum = np.zeros((ph * scale, pw * scale), np.float32)
  windows = {}  # one window per combination of shared sides
  last_y, last_x = ph - tile, pw - tile
  for b0 in range(0, len(tiles), batch_size):
    chunk = tiles[b0:b0 + batch_size]
    batch = np.stack([padded[y:y + tile, x:x + tile] for y, x in chunk])
    if len(chunk) < batch_size:
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - len(chunk), axis=0)])
    if side is None:
      out = np.asarray(sr_fn(batch), dtype=np.float32)
    else:
      side_batch = np.stack([side[y * scale:y * scale + t_hr, x * scale:x * scale + t_hr] for y, x in chunk])
      side_batch = np.concatenate([side_batch, np.repeat(side_batch[-1:], len(batch) - len(chunk), axis=0)])
      out = np.asarray(sr_fn(batch, side_batch), dtype=np.float32)
    if out.shape != (batch_size, t_hr, t_hr, c):
      raise ValueError(f"sr_fn returned {out.shape}, expected {(batch_size, t_hr, t_hr, c)}")
    for (y, x), hr_tile in zip(chunk, out):
      sides = (y > 0, y < last_y, x > 0, x < last_x)
      if sides not in windows:
        windows[sides] = blend_weights(t_hr, overlap * scale, margin * scale, sides)
      win = windows[sides]
      ys, xs = slice(y * scale, y * scale + t_hr), slice(x * scale, x * scale + t_hr)
      acc[ys, xs] += win[:, :, None] * hr_tile
      wsum[ys, xs] += win
    if progress is not None:
      progress(min(b0 + batch_size, len(tiles)), len(tiles))
  out = acc[:h * scale, :w * scale]
  out /= wsum[:h * scale, :w * scale, None]
  return out


def tile_count(h: int, w: int, tile: int, overlap: int) -> int:
  """How many tiles `upscale_tiled` runs for an h x w image (for progress bars and cost estimates)."""
  return len(axis_starts(max(h, tile), tile, overlap)) * len(axis_starts(max(w, tile), tile, overlap))

