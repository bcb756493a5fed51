r"""Super-resolve image files and folder trees of any size.

  python -m diffssr_jax.inference.upscale --workdir runs/x4 photos/ extra.jpg --output out/
  python -m diffssr_jax.inference.upscale --checkpoint model_ckpt_steps_400000.ckpt big.tif --output out/ --tile 128
  (or diffssr-upscale ... once installed)

A folder input is mirrored under --output (its subfolders kept), a file input goes to --output/<stem>.png;
outputs are PNG. Images larger than --tile LR pixels on a side are super-resolved in overlapping tiles blended
without seams (tiling.upscale_tiled), --batch_size tiles at a time, so memory is bounded by the tile size;
smaller images go through in one piece, and images down to 1x1 are padded to what the U-Net needs. Inputs keep
their layout and depth: 16-bit images give 16-bit PNGs (quantised from the float SR), an alpha channel is
up-scaled by MATLAB bicubic and re-attached (RGBA output), greyscale without alpha stays greyscale.

Inputs are never replaced: an --output inside an input folder, or one that would map an output onto an input
file, is refused. Existing outputs are skipped unless --overwrite, which only replaces PNGs an earlier upscale
wrote (recognised by the metadata below); any other existing file is left alone and reported. Every output
PNG carries tEXt metadata: Software "diffssr-jax upscale", diffssr:checkpoint, diffssr:step (the checkpoint's
training step), diffssr:sampler, diffssr:seed and diffssr:source (the input's file name); the model's
checkpoint and step are also printed when it loads.

A SAM+SRDiff model (Table 7's baseline, `model.cond_sam`) needs each input's masks: --spe_masks DIR, the mask
export's --out run on the input images themselves (`--scale 1 --keep_masks`, a small --min_tile for small
images), each image's masks named as its output below --output (without .png). LR-size masks are brought to
the HR grid (`data.spe_masks`); large images are tiled with E cut in the same windows. The model and the
masks of every input are checked before the first image is super-resolved.

One bad image never stops the rest: whatever goes wrong with one file (unreadable, too odd to process, a
failed write) is reported by path, the others are still done, and the summary line is always printed. Exit
status: 0 when everything was written or already there, 1 when some file failed or no image was found, 2 for
a refused command line, 130 when interrupted (--fail_fast stops at the first failure).
"""
from __future__ import annotations

import pathlib
import struct
import sys
import zlib
from collections.abc import Callable, Mapping, Sequence

from absl import app, flags
from tqdm import tqdm

from diffssr_jax import cli as shared_cli
from diffssr_jax import fileio, images, storage

SOFTWARE = "diffssr-jax upscale"  # the PNG `Software` text that marks our outputs (replaceable by --overwrite)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class JobError(ValueError):
  """The inputs cannot be mapped to outputs safely (an output onto an input, two inputs onto one output)."""


def _resolve(p):
  """The resolved local path; a URL as it is (epath's resolve() prefixes URLs with the current folder)."""
  return p if storage.is_remote(p) else p.resolve()


def _is_within(path, folder) -> bool:
  try:
    _resolve(path).relative_to(_resolve(folder))
    return True
  except ValueError:
    return False


def collect_jobs(inputs: Sequence[str], output) -> tuple[list[tuple[pathlib.Path, pathlib.Path]], list[str]]:
  """(source, destination) pairs for the inputs, and errors for inputs that do not exist or hold no images.
  Folders are mirrored under `output`; files map to output/<stem>.png. Raises `JobError` when `output` is
  inside (or is) an input folder, when an output would be an input file, or when two inputs map to one
  output."""
  output = storage.native(output)
  jobs, errors, owner = [], [], {}
  for item in inputs:
    p = storage.native(item)
    if p.is_dir():
      if _is_within(output, p):
        raise JobError(f"--output {output} is inside the input folder {p}: outputs would be written among the "
                       f"inputs; give an --output outside {p}")
      found = images.list_images(p)
      if not found:
        errors.append(f"{p}: no images found (looked for {', '.join(images.IMAGE_EXTENSIONS)})")
      pairs = [(f, output / f.relative_to(p).with_suffix(".png")) for f in found]
    elif p.is_file():
      pairs = [(p, output / f"{p.stem}.png")]
    else:
      errors.append(f"{p}: no such file or folder")
      continue
    for src, dst in pairs:
      key = _resolve(dst)
      if key in owner and owner[key] != _resolve(src):
        raise JobError(f"{owner[key]} and {src} would both be written to {dst}; upscale them separately")
      if key not in owner:
        owner[key] = _resolve(src)
        jobs.append((src, dst))
  inputs_by_path = {_resolve(src): src for src, _ in jobs}
  for src, dst in jobs:
    if _resolve(dst) in inputs_by_path:
      raise JobError(f"the output for {src} would be {dst}, which is the input {inputs_by_path[_resolve(dst)]}; "
                     f"give another --output (inputs are never replaced)")
  return jobs, errors


# ---------------------------------------------------------------- output files and their metadata
def _png_chunk(tag: bytes, data: bytes) -> bytes:
  return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_with_text(data: bytes, text: Mapping[str, object]) -> bytes:
  """PNG bytes with `text` added as tEXt chunks (iTXt, UTF-8, for values outside Latin-1) right after the
  header (PNG spec 11.3.4); the pixels are untouched. Keys are 1-79 printable Latin-1 characters.

  Written here because neither maintained writer in use can: OpenCV (which writes our 8- and 16-bit PNGs)
  stores no text chunks (its metadata API takes EXIF, XMP and ICC only), and Pillow, which can, cannot write
  16-bit colour PNGs. Adding the chunks to OpenCV's bytes is a few lines of the PNG framing."""
  if data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
    raise ValueError("not a PNG (bad signature or no IHDR chunk)")
  end_of_ihdr = 8 + 12 + struct.unpack(">I", data[8:12])[0]
  chunks = []
  for key, value in text.items():
    k, v = str(key).encode("latin-1"), str(value)
    if not 1 <= len(k) <= 79:
      raise ValueError(f"PNG text key {key!r} must be 1-79 characters")
    try:
      chunks.append(_png_chunk(b"tEXt", k + b"\0" + v.encode("latin-1")))
    except UnicodeEncodeError:
      chunks.append(_png_chunk(b"iTXt", k + b"\0\0\0\0\0" + v.encode("utf-8")))
  return data[:end_of_ihdr] + b"".join(chunks) + data[end_of_ihdr:]


def save_output(path, arr, text: Mapping[str, object]) -> None:
  """Writes an SR image as PNG with `text` metadata, atomically (an interrupted write never leaves a
  truncated file where an output was expected; a bucket object is uploaded once complete)."""
  with fileio.atomic_path(path) as tmp:
    images.save_png(tmp, arr)
    tmp = pathlib.Path(tmp)
    tmp.write_bytes(png_with_text(tmp.read_bytes(), text))


def is_upscale_output(path) -> bool:
  """Whether `path` is a PNG written by this command (its `Software` text says so)."""
  return images.png_text(path).get("Software") == SOFTWARE


def output_text(upscaler, src, seed: int) -> dict[str, str]:
  """The metadata of one output: where the model came from, its step, the sampler, seed and input name."""
  step = getattr(upscaler, "step", None)
  return {"Software": SOFTWARE, "diffssr:checkpoint": str(getattr(upscaler, "source", None) or "in memory"),
          "diffssr:step": "unknown" if step is None else str(step), "diffssr:sampler": upscaler.describe(),
          "diffssr:seed": str(seed), "diffssr:source": pathlib.Path(src).name}


# ---------------------------------------------------------------- running the jobs
def _failure(src, e: Exception) -> str:
  """One line naming the file and what went wrong."""
  text = " ".join(str(e).split())
  if isinstance(e, images.ImageReadError) and str(src) in text:
    return text
  return f"{src}: {type(e).__name__}: {text}" if text else f"{src}: {type(e).__name__}"


def upscale_files(make_upscaler: Callable[[], object], jobs, *, overwrite: bool = False, fail_fast: bool = False,
                  seed: int = 0, tile: int | None = None, overlap: int = 32, batch_size: int = 4, margin: int | None = None,
                  show_progress: bool = True, log: Callable[[str], None] | None = None,
                  spe_of: Callable | None = None) -> dict[str, list]:
  """Runs the jobs; returns {"written": [dst...], "skipped": [dst...], "failed": [message...]} and, when
  Ctrl-C stopped it, "interrupted": True. The model is made by `make_upscaler()` only when some output is to
  be written. Existing outputs are skipped, or with `overwrite` replaced when an earlier upscale wrote them
  (any other existing file fails instead). An exception while doing one image is recorded as that image's
  failure and the next image is done (unless `fail_fast`). `spe_of(dst, lr_hw, scale)`: the HR-size SPE map of
  the job writing `dst`, for a SAM+SRDiff model."""
  log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
  done = {"written": [], "skipped": [], "failed": []}
  todo = []
  for src, dst in jobs:
    if dst.exists() and not overwrite:
      log(f"skip {dst}: exists (pass --overwrite to replace it)")
      done["skipped"].append(dst)
    elif dst.exists() and not is_upscale_output(dst):
      msg = (f"{dst}: exists and was not written by diffssr upscale (no '{SOFTWARE}' PNG metadata); not replacing "
             f"it: delete it or give another --output")
      log(f"error: {msg}")
      done["failed"].append(msg)
      if fail_fast:
        return done
    else:
      todo.append((src, dst))
  if not todo:
    return done
  upscaler = make_upscaler()
  bar = tqdm(todo, unit="img", disable=not show_progress)
  try:
    for src, dst in bar:
      bar.set_postfix_str(src.name)
      try:
        image = images.load_image(src)
        tiles = lambda k, n: bar.set_postfix_str(f"{src.name} tile {k}/{n}")  # noqa: E731
        spe = None if spe_of is None else spe_of(dst, image.rgb.shape[:2], upscaler.scale)
        out = upscaler.upscale_like_input(image, seed=seed, tile=tile, overlap=overlap, batch_size=batch_size,
                                          margin=margin, progress=tiles, spe=spe)
        save_output(dst, out, output_text(upscaler, src, seed))
      except Exception as e:  # noqa: BLE001  (one bad image must not stop the others; reported by path)
        msg = _failure(src, e)
        log(f"error: {msg}")
        done["failed"].append(msg)
        if fail_fast:
          break
        continue
      done["written"].append(dst)
  except KeyboardInterrupt:
    done["interrupted"] = True
  finally:
    bar.close()
  return done


def summary_line(done: Mapping[str, list], errors: Sequence[str] = ()) -> str:
  n_failed = len(errors) + len(done.get("failed", ()))
  return f"{len(done.get('written', ()))} written, {len(done.get('skipped', ()))} skipped (existing), {n_failed} failed"


# ---------------------------------------------------------------- CLI
def define_flags(fv: flags.FlagValues) -> None:
  """Defines the CLI's flags in `fv` (a private FlagValues: see `cli`)."""
  d = dict(flag_values=fv)
  shared_cli.define_model_flags(
      fv, "Training workdir (config.json + checkpoints/<step>); this or --checkpoint is required.",
      "Checkpoint step of --workdir (default: the newest verified one).")
  flags.DEFINE_string("output", None, "Output folder (required; must not be inside an input folder).", **d)
  flags.DEFINE_bool("rrdb", False, "Use the RRDB encoder's output alone (fast, deterministic, less detail).", **d)
  flags.DEFINE_integer("tile", None, "Tile size in LR pixels; larger images are tiled (default: from the device's "
                       "memory, 64 to 1024 (Upscaler.default_tile); 256 where the device reports none, as the CPU).",
                       **d)
  flags.DEFINE_integer("overlap", 32, "Overlap between tiles in LR pixels (at most half the tile).", **d)
  flags.DEFINE_integer("margin", None, "LR pixels at each shared tile edge given no weight (default: overlap/4).",
                       **d)
  flags.DEFINE_integer("batch_size", 4, "Tiles super-resolved together.", **d)
  flags.DEFINE_integer("seed", 0, "Noise seed.", **d)
  flags.DEFINE_bool("overwrite", False, "Replace outputs an earlier upscale wrote (inputs and other files are "
                    "never replaced; without it existing outputs are skipped).", **d)
  flags.DEFINE_bool("fail_fast", False, "Stop at the first file that fails.", **d)
  flags.DEFINE_bool("progress", True, "Show a progress bar.", **d)
  flags.DEFINE_string("spe_masks", None, "A SAM+SRDiff model's (model.cond_sam) input masks: the mask export's --out "
                      "for these images (--scale 1 --keep_masks), named as the outputs (default: none).", **d)


def main(argv, fv: flags.FlagValues) -> int:
  """Upscales argv[1:] (files and folders); returns the exit status (see the module docstring)."""
  from diffssr_jax.inference.upscaler import Upscaler
  inputs = argv[1:]
  if not inputs:
    raise app.UsageError("give at least one input file or folder")
  if fv.output is None:
    raise app.UsageError("--output is required")
  shared_cli.check_model_flags(fv)
  # Without --tile the tile is at least 64 (Upscaler.default_tile), so an overlap up to 32 always fits.
  tile = 64 if fv.tile is None else fv.tile
  if tile < 1 or fv.overlap < 0 or 2 * fv.overlap > tile or fv.batch_size < 1:
    raise app.UsageError(f"need --tile >= 1, 0 <= --overlap <= tile/2 and --batch_size >= 1 (got tile {fv.tile or 'default, >= 64'}, "
                         f"overlap {fv.overlap}, batch_size {fv.batch_size})")
  # Every location is checked before any work: an unservable one is refused in one line (StorageError).
  storage.check_all({"--output": fv.output, "--workdir": fv.workdir, "--checkpoint": fv.checkpoint, "input": inputs,
                     "--spe_masks": fv.spe_masks})
  from diffssr_jax.data.spe_masks import SpeMaskError, SpeMasks
  spe_masks = SpeMasks(fv.spe_masks) if fv.spe_masks else None
  try:
    jobs, errors = collect_jobs(inputs, fv.output)
  except JobError as e:
    shared_cli.error(str(e))
    return shared_cli.EXIT_USAGE
  for msg in errors:
    shared_cli.error(msg)
  if not jobs or (errors and fv.fail_fast):
    if not jobs:
      print("nothing to do: no images found in the inputs given", file=sys.stderr)
    print(summary_line({}, errors), file=sys.stderr)
    return shared_cli.EXIT_ERROR

  def make_upscaler():
    shared_cli.enable_compilation_cache(fv.compilation_cache)
    up = Upscaler.load(workdir=fv.workdir, checkpoint=fv.checkpoint, step=fv.step, sampler=fv.sampler,
                       steps=fv.steps, eta=fv.eta, use_ema=fv.use_ema, mode="rrdb" if fv.rrdb else "diffusion")
    print(f"model: {up.describe_source()}; {up.describe()}", file=sys.stderr)
    # Before the first image: the model and the masks must go together, and every input must have its masks.
    if up.needs_spe and spe_masks is None:
      raise SpeMaskError(f"{up.source}: a SAM+SRDiff model (model.cond_sam) needs the inputs' masks: --spe_masks DIR")
    if spe_masks is not None and not up.needs_spe:
      raise SpeMaskError(f"--spe_masks: {up.source} takes no masks (only a SAM+SRDiff model, model.cond_sam, does"
                         f"{'; --rrdb uses the encoder alone' if fv.rrdb else ''})")
    if spe_masks is not None:
      s = up.scale
      spe_masks.check([names[dst] for _, dst in jobs],
                      [(h * s, w * s) for h, w in (images.header_hw(src) for src, _ in jobs)], lr_scale=s)
    return up

  output = storage.native(fv.output)
  names = {dst: dst.relative_to(output).with_suffix("").as_posix() for _, dst in jobs}
  spe_of = None
  if spe_masks is not None:
    spe_of = lambda dst, hw, s: spe_masks.spe(names[dst], (hw[0] * s, hw[1] * s), lr_scale=s)  # noqa: E731
  done = upscale_files(make_upscaler, jobs, overwrite=fv.overwrite, fail_fast=fv.fail_fast, seed=fv.seed,
                       tile=fv.tile, overlap=fv.overlap, batch_size=fv.batch_size, margin=fv.margin,
                       show_progress=fv.progress, spe_of=spe_of)
  failed = errors + done["failed"]
  if not done["written"] and not failed and not done.get("interrupted"):
    print(f"nothing to do: all {len(done['skipped'])} outputs exist (pass --overwrite to replace them)",
          file=sys.stderr)
  print(summary_line(done, errors), file=sys.stderr)
  for msg in failed:
    print(f"  failed: {msg}", file=sys.stderr)
  if done.get("interrupted"):
    print("interrupted", file=sys.stderr)
    return shared_cli.EXIT_INTERRUPTED
  return shared_cli.EXIT_ERROR if failed else shared_cli.EXIT_OK


def cli(argv: Sequence[str] | None = None) -> int:
  """diffssr-upscale (pyproject's console script; argv default sys.argv), in-process with its own flag values:
  `cli(["upscale", "in/", "--output", "out"])`; returns the exit status."""
  return shared_cli.run(sys.argv if argv is None else argv, define_flags=define_flags, main=main, doc=__doc__)


if __name__ == "__main__":
  sys.exit(cli())
