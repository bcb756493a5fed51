"""Training input pipeline (grain): tile shards -> random aligned patches -> normalised batches.

Per example, as the official `Df2kDataSet_sam.__getitem__` does for SAM-DiffSR training:

* random HR patch (default 160 px) whose top-left is a multiple of the scale, the LR patch at the same
  place (/scale) and the SPE patch at the same HR place;
* optional horizontal flip and rot90 (off by default: the official config has data_augmentation off),
  applied identically to HR, LR and SPE;
* "reduce" (`reduce_constant_spe`, on by default here, off in the official config): an SPE patch with one
  single value becomes zeros (the official `all_same_mask_to_zero`);
* `lr_up` = MATLAB-bicubic `imresize(lr_uint8 / lr_up_divisor, scale)`; the official code divides by 256
  (not 255), kept as the default so converted official weights see their training inputs;
* hr, lr -> `(x/255 - 0.5) / 0.5`, lr_up -> `(v - 0.5) / 0.5`; SPE values are left raw.

Order and randomness: the record order is a seeded global shuffle, reshuffled each epoch and repeated
(forever by default): one global stream of examples. The patch position and flips of the example at
position n of that stream come from a generator seeded by (seed, n), so they depend only on the seed and
the position, never on worker timing or on how many processes read. Global batch s is the examples
[s * B, (s + 1) * B) of the stream (B = batch_size * process_count); process p reads only its contiguous
part of it, [s * B + p * batch_size, s * B + (p + 1) * batch_size), so the processes' parts put together
in process order are exactly the batch one process would read, and no process reads another's records.
Batch s of a process is therefore a pure function of (seed, s, p, process count): `start_step` starts a
stream at any batch (a resume with another number of processes), and `get_state()`/`set_state()` on the
iterator restore a process' own position exactly; the output does not change with `num_workers`.

Batches: dict of numpy arrays, NHWC float32: `hr` (B, P, P, 3), `lr` (B, P/s, P/s, 3), `lr_up`
(B, P, P, 3), `spe` (B, P, P, 1); with `with_metadata`, also `record_index` (B,) int64 (global record
number in the sorted shards) and `patch_yx` (B, 2) int32 (patch top-left in the whole HR image).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from diffssr_jax import conventions
from diffssr_jax.data import spe as spe_lib
from diffssr_jax.data.source import TileSource, manifest_for

def default_data_config():
  """The `data` section of diffssr_jax/configs/base.py, the single source of its defaults; set `train_files`."""
  from diffssr_jax.configs import base
  return base.get_config().data


def _as_dict(data_cfg, scale: int) -> dict:
  """`data_cfg` (a ConfigDict, dataclass or dict, possibly partial) over the defaults; unknown fields are an
  error naming them."""
  defaults = default_data_config().to_dict()
  if dataclasses.is_dataclass(data_cfg):
    d = dataclasses.asdict(data_cfg)
  elif hasattr(data_cfg, "to_dict"):
    d = data_cfg.to_dict()
  else:
    d = dict(data_cfg or {})
  unknown = set(d) - set(defaults)
  if unknown:
    raise ValueError(f"unknown data config fields {sorted(unknown)}; known: {sorted(defaults)}")
  cfg = {**defaults, **d, "scale": int(scale)}
  if not cfg["train_files"]:
    raise ValueError("data config: train_files is required (glob, folder or list of TFRecord shards)")
  s, p = cfg["scale"], int(cfg["patch_size"])
  if s < 1 or p <= 0 or p % s:
    raise ValueError(f"patch_size {p} must be a positive multiple of scale {s}")
  return cfg


def random_patch_origin(h: int, w: int, patch: int, scale: int, rng: np.random.Generator) -> tuple[int, int]:
  """Top-left (y, x) of a random patch in an (h, w) tile, multiples of the scale."""
  if h < patch or w < patch:
    raise ValueError(f"tile of {h}x{w} is smaller than the {patch}px patch (export with min_tile >= patch)")
  y = int(rng.integers(0, (h - patch) // scale + 1)) * scale
  x = int(rng.integers(0, (w - patch) // scale + 1)) * scale
  return y, x


def crop_aligned(hr, lr, spe, y: int, x: int, patch: int, scale: int):
  """HR and SPE patches at (y, x) and the LR patch at (y/scale, x/scale)."""
  pl = patch // scale
  return (hr[y:y + patch, x:x + patch], lr[y // scale:y // scale + pl, x // scale:x // scale + pl],
          spe[y:y + patch, x:x + patch])


def augment(arrays, hflip: bool, k_rot: int):
  """The same horizontal flip and rotation by k_rot * 90 degrees applied to each (H, W, ...) array."""
  out = []
  for a in arrays:
    if hflip:
      a = a[:, ::-1]
    if k_rot:
      a = np.rot90(a, k_rot, axes=(0, 1))
    out.append(np.ascontiguousarray(a))
  return out


@dataclasses.dataclass(frozen=True)
class TrainTransform:
  """Tile -> training example (a picklable grain random map)."""
  patch_size: int = 160
  scale: int = 4
  hflip: bool = False
  rot90: bool = False
  reduce_constant_spe: bool = True
  lr_up_divisor: float = conventions.OFFICIAL_LR_UP_DIVISOR
  with_metadata: bool = False

  def __call__(self, tile: dict, rng: np.random.Generator) -> dict:
    hr, lr, spe = tile["hr"], tile["lr"], tile["spe"]
    y, x = random_patch_origin(hr.shape[0], hr.shape[1], self.patch_size, self.scale, rng)
    hr, lr, spe = crop_aligned(hr, lr, spe, y, x, self.patch_size, self.scale)
    flip = bool(rng.integers(0, 2)) if self.hflip else False
    k = int(rng.integers(0, 4)) if self.rot90 else 0
    if flip or k:
      hr, lr, spe = augment((hr, lr, spe), flip, k)
    if self.reduce_constant_spe:
      spe = spe_lib.reduce_constant(spe)
    out = {
        "hr": conventions.to_signed(hr),
        "lr": conventions.to_signed(lr),
        "lr_up": conventions.make_lr_up(lr, self.scale, self.lr_up_divisor),
        "spe": np.ascontiguousarray(spe, dtype=np.float32)[:, :, None],
    }
    if self.with_metadata:
      out["record_index"] = np.int64(tile["index"])
      out["patch_yx"] = np.array([tile["y"] + y, tile["x"] + x], dtype=np.int32)
    return out


def make_source(cfg: dict) -> TileSource:
  """The tile source of a (validated) config, checking the scale against the export manifest."""
  src = TileSource(cfg["train_files"], scale=int(cfg["scale"]), verify_crc=bool(cfg["verify_crc"]))
  if cfg["check_manifest"]:
    man = manifest_for(cfg["train_files"])
    if man is not None:
      exported = man.get("config", {}).get("scale")
      if exported is not None and int(exported) != int(cfg["scale"]):
        raise ValueError(f"data config scale {cfg['scale']} differs from the export's scale {exported}")
  if len(src) == 0:
    raise ValueError(f"no records in {cfg['train_files']}")
  return src


def _ensure_absl_flags_parsed() -> None:
  """grain's worker processes read absl flags; outside `absl.app.run` nobody parsed them, which makes
  `mp_prefetch` fail (UnparsedFlagAccessError). Marking them parsed keeps every flag at its default."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_train_dataset(data_cfg, *, scale: int, seed: int, batch_size: int, process_index: int = 0,
                       process_count: int = 1, start_step: int = 0):
  """The grain IterDataset of this process' training batches from batch `start_step` on (see the module
  docstring). `data_cfg` is the config's `data` section (or a partial dict of it); `scale` the model's;
  `batch_size` the per-process batch."""
  import grain
  cfg = _as_dict(data_cfg, scale)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if batch_size < 1:
    raise ValueError("batch_size must be >= 1")
  src = make_source(cfg)
  seed = int(seed) % 2**32
  ds = grain.MapDataset.source(src)
  if cfg["shuffle"]:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(int(cfg["num_epochs"]) or None)
  transform = TrainTransform(
      patch_size=int(cfg["patch_size"]), scale=int(cfg["scale"]), hflip=bool(cfg["hflip"]),
      rot90=bool(cfg["rot90"]), reduce_constant_spe=bool(cfg["reduce_constant_spe"]),
      lr_up_divisor=float(cfg["lr_up_divisor"]), with_metadata=bool(cfg["with_metadata"]))
  ds = ds.random_map(transform, seed=(seed + 0x5EED) % 2**32)
  # Chunks of `batch_size` consecutive examples; chunk s * process_count + p is process p's part of global
  # batch s. A finite stream is cut to whole global batches, so every process runs the same number of steps.
  ds = ds.batch(batch_size, drop_remainder=True)
  if process_count > 1:
    ds = ds[:len(ds) // process_count * process_count][process_index::process_count]
  ds = ds[int(start_step):]
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(cfg["read_threads"]),
                                            prefetch_buffer_size=int(cfg["read_buffer"])))
  if int(cfg["num_workers"]) > 0:
    _ensure_absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(cfg["num_workers"]),
                                                     per_worker_buffer_size=int(cfg["prefetch_buffer"])))
  return it


def make_train_iterator(data_cfg, *, scale: int, seed: int, batch_size: int, process_index: int = 0,
                        process_count: int = 1, start_step: int = 0):
  """A checkpointable iterator (`get_state()` / `set_state()`) over this process' training batches.

  `batch_size` is the per-process batch size; pass `jax.process_index()` / `jax.process_count()` on
  multi-host runs. See the module docstring for the batch layout and `default_data_config` for fields.
  """
  return iter(make_train_dataset(data_cfg, scale=scale, seed=seed, batch_size=batch_size,
                                 process_index=process_index, process_count=process_count, start_step=start_step))
