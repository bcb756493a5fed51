r"""Super-resolve image files and folder trees of any size.

  python -m diffssr_jax.inference.upscale --workdir runs/x4 photos/ extra.jpg --output out/
  python -m diffssr_jax.inference.upscale --checkpoint model_ckpt_steps_400000.ckpt big.tif --output out/ --tile 128

A folder input is mirrored under --output (its subfolders kept), a file input goes to --output/<stem>.png;
outputs are PNG. Images larger than --tile LR pixels on a side are super-resolved in overlapping tiles blended
without seams (tiling.upscale_tiled), --batch_size tiles at a time, so memory is bounded by the tile size;
smaller images go through in one piece. Inputs keep their layout and depth: 16-bit images give 16-bit PNGs
(quantised from the float SR), an alpha channel is up-scaled by MATLAB bicubic and re-attached (RGBA
output), greyscale without alpha stays greyscale. Existing outputs are skipped unless --overwrite. An unreadable file is reported by path
and the rest are still done; the exit status is then 1 (--fail_fast stops at the first one).
"""
from __future__ import annotations

import pathlib
import sys
from collections.abc import Callable, Sequence

from absl import app, flags
from tqdm import tqdm

from diffssr_jax import images


class JobError(ValueError):
  """The inputs cannot be mapped to outputs unambiguously."""


def _is_within(path: pathlib.Path, folder: pathlib.Path) -> bool:
  try:
    path.resolve().relative_to(folder.resolve())
    return True
  except ValueError:
    return False


def collect_jobs(inputs: Sequence[str], output) -> tuple[list[tuple[pathlib.Path, pathlib.Path]], list[str]]:
  """(source, destination) pairs for the inputs, and errors for inputs that do not exist. Folders are mirrored
  under `output` (files already under `output` skipped, so an output folder inside an input is not re-read);
  files map to output/<stem>.png. Two inputs mapping to one output raise `JobError`."""
  output = pathlib.Path(output)
  jobs, errors, owner = [], [], {}
  for item in inputs:
    p = pathlib.Path(item)
    if p.is_dir():
      pairs = [(f, output / f.relative_to(p).with_suffix(".png")) for f in images.list_images(p)
               if not _is_within(f, output)]
    elif p.is_file():
      pairs = [(p, output / f"{p.stem}.png")]
    else:
      errors.append(f"{p}: no such file or folder")
      continue
    for src, dst in pairs:
      key = dst.resolve()
      if key in owner and owner[key] != src.resolve():
        raise JobError(f"{owner[key]} and {src} would both be written to {dst}; upscale them separately")
      if key not in owner:
        owner[key] = src.resolve()
        jobs.append((src, dst))
  return jobs, errors


def upscale_files(make_upscaler: Callable[[], object], jobs, *, overwrite: bool = False, fail_fast: bool = False,
                  seed: int = 0, tile: int = 256, overlap: int = 32, batch_size: int = 4, margin: int | None = None,
                  show_progress: bool = True, log: Callable[[str], None] | None = None) -> dict[str, list]:
  """Runs the jobs; returns {"written": [dst...], "skipped": [dst...], "failed": [message...]}. The model is
  made by `make_upscaler()` only when some output is to be written."""
  log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
  done = {"written": [], "skipped": [], "failed": []}
  todo = []
  for src, dst in jobs:
    if dst.exists() and not overwrite:
      log(f"skip {dst}: exists (pass --overwrite to replace it)")
      done["skipped"].append(dst)
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
      except images.ImageReadError as e:
        log(f"error: {e}")
        done["failed"].append(str(e))
        if fail_fast:
          break
        continue
      tiles = lambda k, n: bar.set_postfix_str(f"{src.name} tile {k}/{n}")  # noqa: E731
      out = upscaler.upscale_like_input(image, seed=seed, tile=tile, overlap=overlap, batch_size=batch_size,
                                        margin=margin, progress=tiles)
      images.save_png(dst, out)
      done["written"].append(dst)
  finally:
    bar.close()
  return done


# ---------------------------------------------------------------- CLI
def define_flags(fv: flags.FlagValues) -> None:
  """Defines the CLI's flags in `fv`: the global FLAGS when run as a script, a private FlagValues in `cli`.
  Nothing is defined at import, so other CLIs' flags of the same names never clash in one process."""
  d = dict(flag_values=fv)
  flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/<step>).", **d)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", **d)
  flags.DEFINE_string("checkpoint", None, "An official SAM-DiffSR PyTorch .ckpt instead of a workdir.", **d)
  flags.DEFINE_string("output", None, "Output folder (required).", **d)
  flags.DEFINE_enum("sampler", "ddim", ["ddpm", "ddim"], "Reverse process.", **d)
  flags.DEFINE_integer("steps", None, "Denoising steps for ddim (default 25).", **d)
  flags.DEFINE_float("eta", 0.0, "DDIM eta.", **d)
  flags.DEFINE_bool("rrdb", False, "Use the RRDB encoder's output alone (fast, deterministic, less detail).", **d)
  flags.DEFINE_integer("tile", 256, "Tile size in LR pixels; larger images are tiled.", **d)
  flags.DEFINE_integer("overlap", 32, "Overlap between tiles in LR pixels.", **d)
  flags.DEFINE_integer("margin", None, "LR pixels at each shared tile edge given no weight (default overlap/4).",
                       **d)
  flags.DEFINE_integer("batch_size", 4, "Tiles super-resolved together.", **d)
  flags.DEFINE_integer("seed", 0, "Noise seed.", **d)
  flags.DEFINE_bool("overwrite", False, "Replace existing outputs (default: skip them).", **d)
  flags.DEFINE_bool("fail_fast", False, "Stop at the first unreadable file.", **d)
  flags.DEFINE_bool("use_ema", True, "Use the EMA weights when the checkpoint has them.", **d)
  flags.DEFINE_bool("progress", True, "Show a progress bar.", **d)


def main(argv, fv: flags.FlagValues = flags.FLAGS) -> int:
  """Upscales argv[1:] (files and folders); returns the exit status: 0, or 1 when some file failed."""
  from diffssr_jax.inference.upscaler import Upscaler
  inputs = argv[1:]
  if not inputs:
    raise app.UsageError("give at least one input file or folder")
  if fv.output is None:
    raise app.UsageError("--output is required")
  if (fv.workdir is None) == (fv.checkpoint is None):
    raise app.UsageError("give exactly one of --workdir or --checkpoint")
  if fv.sampler == "ddpm" and fv.steps is not None:
    raise app.UsageError("--steps is for --sampler ddim (ddpm runs all T steps)")
  try:
    jobs, errors = collect_jobs(inputs, fv.output)
  except JobError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for msg in errors:
    print(f"error: {msg}", file=sys.stderr)
  if errors and fv.fail_fast:
    return 1

  def make_upscaler():
    return Upscaler.load(workdir=fv.workdir, checkpoint=fv.checkpoint, step=fv.step, sampler=fv.sampler,
                         steps=fv.steps, eta=fv.eta, use_ema=fv.use_ema, mode="rrdb" if fv.rrdb else "diffusion")

  done = upscale_files(make_upscaler, jobs, overwrite=fv.overwrite, fail_fast=fv.fail_fast, seed=fv.seed,
                       tile=fv.tile, overlap=fv.overlap, batch_size=fv.batch_size, margin=fv.margin,
                       show_progress=fv.progress)
  failed = errors + done["failed"]
  print(f"{len(done['written'])} written, {len(done['skipped'])} skipped (existing), {len(failed)} failed",
        file=sys.stderr)
  for msg in failed:
    print(f"  failed: {msg}", file=sys.stderr)
  return 1 if failed else 0


def cli(argv: Sequence[str]) -> int:
  """The command line in-process, with its own flag values: `cli(["upscale", "in/", "--output", "out"])`."""
  fv = flags.FlagValues()
  define_flags(fv)
  return main(fv(list(argv)), fv)


if __name__ == "__main__":
  define_flags(flags.FLAGS)
  app.run(lambda argv: sys.exit(main(argv)))
