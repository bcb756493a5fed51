r"""Benchmark evaluation: super-resolve every image of benchmark folders, write per-image metrics and a table.

  python -m diffssr_jax.evaluation.evaluate --workdir runs/x4 \
      --datasets Set5=data/Set5/HR,Urban100=data/Urban100/HR --rrdb --bicubic

For each dataset and method, under WORKDIR/eval/<dataset>/<tag>/ (or --output instead of WORKDIR/eval), tag
`<step>` for the diffusion model (`<step>_srdiff` / `<step>_sam_srdiff` for Table 7's SRDiff / SAM+SRDiff),
`<step>_rrdb` for its RRDB encoder alone and `bicubic` for MATLAB bicubic:
  metrics.csv    one row per image: image, psnr_y, ssim_y, psnr_rgb, lr_psnr, artifact[, lpips]
  maniqa.csv     per-image MANIQA (with --maniqa; pyiqa)
  summary.json   the means, FID when asked for, and the settings (sampler, steps, seed, crop_border, step, ...)
  <name>.png     the SR images, named as the inputs (subfolders kept)
  run.json       the settings the results were made with (and the weights' SHA-256); a resumed run must use
                 the same ones
and WORKDIR/eval/table_<step>.md (and .csv), a table laid out like the paper's Table 2 over every dataset with
results for that step, one row per method found on disk (bicubic, the step's RRDB and diffusion results),
whichever of them this run made: re-running without --rrdb --bicubic keeps their rows.

An interrupted evaluation resumes: images with a row in metrics.csv and their PNG are skipped, rows are
appended durably one by one (results.MetricsCSV) after their PNG is written, so earlier results are never
rewritten. Each PNG's SHA-256 is recorded in sha256sums.txt (results.DigestLog) before its row; every PNG a
resumed run would skip is first checked against it (or, in folders from before, decoded and its size
checked), and the ones that fail are made again, with one warning saying how many. Every image's noise comes from the seed and a hash of its name, so the resumed images are those
the uninterrupted run would have produced. Images of equal size are batched together (one compiled
sampler per size and batch). PSNR/SSIM are on the BT.601 Y channel with `--crop_border` pixels cropped per
side (default: the scale, as BasicSR; the official evaluation used 0). The sampler defaults to the official
DDPM, as in `upscale` (`conventions.DEFAULT_SAMPLER`). A SAM+SRDiff model (Table 7, `model.cond_sam`) is given
each image's SPE map from `--spe_masks NAME=DIR` (the mask export's --keep_masks output; `data.spe_masks`).

Errors the user can fix (a missing folder, workdir or checkpoint, an unreadable image, results made with other
settings) print one line and exit with status 1; a bad command line exits with 2.
"""
from __future__ import annotations

import math
import pathlib
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from absl import app, flags
from tqdm import tqdm

from diffssr_jax import cli as shared_cli
from diffssr_jax import conventions, fileio, images, preemption, run_settings, storage
from diffssr_jax.evaluation import maniqa, paper_table, results
from diffssr_jax.data.eval_sources import EvalSourceError, PairedFolders, open_eval_source
from diffssr_jax.data import spe_masks as spe_masks_lib
from diffssr_jax.data.spe_masks import SpeMaskError, SpeMasks
from diffssr_jax.evaluation.metrics import sr_metrics
from diffssr_jax.evaluation.methods import Method, make_methods, table_tags



class SettingsMismatchError(run_settings.SettingsMismatchError):
  """Results already on disk were made with other settings than this run's."""


# ---------------------------------------------------------------- command-line values
def parse_named_paths(items: Sequence[str], flag: str = "datasets") -> dict[str, str]:
  """`NAME=PATH` items (or a bare PATH, named after its folder, or the parent's name when the folder is
  called HR/LR) -> {name: path}, in order."""
  out = {}
  for item in items:
    item = item.strip()
    if not item:
      continue
    if "=" in item:
      name, path = (s.strip() for s in item.split("=", 1))
    else:
      p = pathlib.Path(item)
      path, name = item, (p.parent.name if p.name.upper() in ("HR", "LR") else p.name)
    if not name or not path:
      raise ValueError(f"--{flag}: expected NAME=PATH, got {item!r}")
    if name in out:
      raise ValueError(f"--{flag}: dataset {name!r} given twice")
    out[name] = path
  return out


# ---------------------------------------------------------------- sources
def lr_shapes(source) -> list[tuple[int, int]]:
  """The LR (h, w) of every image of an eval source, read from file headers: finds unreadable files,
  images smaller than the scale and HR/LR size mismatches before any model runs."""
  s = source.scale
  if isinstance(source, PairedFolders):
    shapes = []
    for hp, lp in source.pairs:
      (hh, hw), (lh, lw) = images.header_hw(hp), images.header_hw(lp)
      if not (lh * s <= hh < lh * s + s and lw * s <= hw < lw * s + s):
        raise EvalSourceError(f"{hp} is {hh}x{hw} but {lp} x{s} is {lh * s}x{lw * s}")
      shapes.append((lh, lw))
    return shapes
  shapes = []
  for p in source.paths:
    h, w = images.header_hw(p)
    if h < s or w < s:
      raise EvalSourceError(f"{p}: {h}x{w} is smaller than the scale {s}")
    shapes.append((h // s, w // s))
  return shapes


def plan_batches(shapes: Sequence[tuple[int, int]], todo: Sequence[int], batch_size: int) -> list[list[int]]:
  """Indices of `todo` grouped by equal shape (groups in order of first appearance), split into batches of at
  most `batch_size`."""
  groups: dict[tuple[int, int], list[int]] = {}
  for i in todo:
    groups.setdefault(tuple(shapes[i]), []).append(i)
  return [g[k:k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]


# ---------------------------------------------------------------- one dataset, one method
def check_settings(out_dir: pathlib.Path, settings: Mapping) -> None:
  """Records the settings in out_dir/run.json, or checks them against those of the results already there
  (`run_settings.check`, the rule training and the export follow too)."""
  run_settings.check(out_dir / "run.json", settings, holder=f"{out_dir} holds results",
                     remedy="pass another --output or delete that folder", error=SettingsMismatchError)


def _sr_path(out_dir: pathlib.Path, name: str) -> pathlib.Path:
  return out_dir / f"{name}.png"


def verify_output(out_dir: pathlib.Path, name: str, hw: tuple[int, int], digests: results.DigestLog) -> str | None:
  """None when out_dir/name is the file this evaluation wrote, else why not: missing, not matching its
  recorded SHA-256, or (results from before digests were recorded) not decoding to an RGB image of `hw`."""
  path = out_dir / name
  if not path.is_file():
    return "missing"
  want = digests.get(name)
  if want is not None:
    return None if fileio.file_sha256(path) == want else "its bytes differ from the recorded SHA-256"
  try:
    arr = images.read_rgb8(path, warn=False)
  except images.ImageReadError as e:
    return f"cannot be decoded ({e})"
  if arr.shape[:2] != tuple(hw):
    return f"is {arr.shape[0]}x{arr.shape[1]}, {hw[0]}x{hw[1]} expected"
  return None


def evaluate_dataset(source, out_dir, method: Method, *, crop_border: int | None = None, batch_size: int = 4,
                     lpips_fn=None, fid_fn=None, extra_summary: Mapping | None = None,
                     on_image: Callable[[str], None] | None = None, show_progress: bool = True,
                     maniqa_fn=None) -> dict:
  """Evaluates one method on one eval source (resuming what out_dir already holds); returns the summary.

  `lpips_fn` (lpips.make_lpips_fn) adds an `lpips` column; `fid_fn` (fid.make_feature_fn) adds the
  dataset's FID to the summary, computed from the SR PNGs and the HR images; `maniqa_fn` (maniqa.make_maniqa_fn)
  its MANIQA (per image in maniqa.csv). `on_image(name)` is called after
  each image's row is recorded (a hook for progress reporting and tests).
  """
  out_dir = storage.native(out_dir)
  scale = source.scale
  crop = scale if crop_border is None else crop_border
  shapes = lr_shapes(source)
  out_dir.mkdir(parents=True, exist_ok=True)
  check_settings(out_dir, method.settings)
  table = results.MetricsCSV(out_dir / "metrics.csv", extra=("lpips",) if lpips_fn is not None else ())
  digests = results.DigestLog(out_dir / results.DIGESTS_NAME)
  done = table.done
  failed = {}  # recorded images whose PNG is not the one written: made again (their rows are kept)
  for i, name in enumerate(source.names):
    if name in done:
      h, w = shapes[i]
      why = verify_output(out_dir, f"{name}.png", (h * scale, w * scale), digests)
      if why:
        failed[name] = why
  todo = [i for i, n in enumerate(source.names) if n not in done or n in failed]
  if failed:
    name, why = next(iter(failed.items()))
    lost = sum(why == "missing" for why in failed.values())
    warnings.warn(f"{out_dir}: {len(failed)} of {len(done)} recorded images failed verification "
                  f"({lost} lost their PNG; e.g. {name}.png: {why}); making them again, their rows are kept")
  bar = tqdm(total=len(todo), desc=f"{out_dir.parent.name}/{out_dir.name}", unit="img", disable=not show_progress)
  try:
    for batch in plan_batches(shapes, todo, batch_size):
      items = [source[i] for i in batch]
      srs = method.sr_fn(items)
      for item, sr in zip(items, srs):
        images.save_png(_sr_path(out_dir, item.name), sr)
        digests.record(f"{item.name}.png", _sr_path(out_dir, item.name))
        if item.name not in done:
          row = sr_metrics(sr, item.hr, item.lr, scale, crop)
          if lpips_fn is not None:
            from diffssr_jax.evaluation.lpips import lpips_images
            row["lpips"] = float(lpips_images(lpips_fn, sr, item.hr)[0])
          table.append(item.name, row)
          if on_image is not None:
            on_image(item.name)
        bar.update(1)
      if preemption.requested():  # the batch's PNGs and rows are durable: stop before the next batch
        raise preemption.Preempted(f"SIGTERM: {len(table)} of {len(source)} images of {out_dir} are done; run "
                                   "the same command again to continue")
  finally:
    bar.close()
  summary = {"dataset": out_dir.parent.name, "label": method.label, **method.settings, "crop_border": crop,
             **(extra_summary or {}), "num_images": len(table), **table.means()}
  if fid_fn is not None:
    summary["fid"] = dataset_fid(source, out_dir, fid_fn)
  if maniqa_fn is not None:
    summary["maniqa"] = maniqa.dataset_maniqa(out_dir, source.names, maniqa_fn)
  results.write_summary_json(out_dir / "summary.json", summary)
  return summary


def dataset_fid(source, out_dir: pathlib.Path, fid_fn) -> float:
  """FID between the SR PNGs in out_dir and the HR images of the source (NaN, with a warning, below 2)."""
  from diffssr_jax.evaluation import fid
  if len(source) < 2:
    warnings.warn(f"{out_dir}: FID needs at least 2 images, the dataset has {len(source)}")
    return math.nan
  sr_feats, hr_feats = [], []
  for i, name in enumerate(source.names):
    sr = images.read_rgb8(_sr_path(out_dir, name), warn=False)
    sr_feats.append(fid.image_features(fid_fn, [sr], batch_size=1))
    hr_feats.append(fid.image_features(fid_fn, [source[i].hr], batch_size=1))
  return fid.fid_from_features(np.concatenate(sr_feats), np.concatenate(hr_feats))


# ---------------------------------------------------------------- the table
# ---------------------------------------------------------------- everything
def evaluate_all(upscaler, datasets: Mapping[str, str], root, *, step_tag: str | None = None,
                 paired_lr: Mapping[str, str] | None = None, methods: Sequence[str] = ("diffusion",),
                 crop_border: int | None = None, batch_size: int = 4, seed: int = 0, scale: int | None = None,
                 lpips_fn=None, lpips_net: str | None = None, fid_fn=None, run_settings: Mapping | None = None,
                 extra_summary: Mapping | None = None, on_image: Callable[[str], None] | None = None,
                 show_progress: bool = True, compare: bool = False, maniqa_fn=None,
                 spe_masks: Mapping[str, str] | None = None) -> pathlib.Path:
  """Evaluates `methods` on every dataset ({name: HR folder}, LR by MATLAB bicubic unless `paired_lr` names
  an LR folder) into root/<dataset>/<tag>/, then writes the table (every method's results on disk for the
  step, not only this run's); returns the table's path. All sources are opened and checked (folders, headers,
  HR/LR sizes) before the first image is super-resolved.
  `run_settings` join the settings a resumed run must match; `extra_summary` only goes into summary.json.
  `spe_masks` ({dataset: mask export folder}): every dataset's masks, for a SAM+SRDiff model (`needs_spe`) only;
  checked for every image before any sampling."""
  paired_lr = dict(paired_lr or {})
  unknown = set(paired_lr) - set(datasets)
  if unknown:
    raise ValueError(f"--paired_lr names datasets not in --datasets: {sorted(unknown)}")
  needs_spe = upscaler is not None and upscaler.needs_spe and "diffusion" in methods
  spe_masks = spe_masks_lib.check_flag(spe_masks, datasets, needs_spe, upscaler.source if upscaler else None)
  scale = upscaler.scale if upscaler is not None else (scale or 4)
  divisor = upscaler.lr_up_divisor if upscaler is not None else conventions.OFFICIAL_LR_UP_DIVISOR
  sources = {}
  for name, hr_dir in datasets.items():
    if not storage.native(hr_dir).is_dir():
      raise FileNotFoundError(f"dataset {name}: {hr_dir} is not a folder")
    if name in paired_lr and not storage.native(paired_lr[name]).is_dir():
      raise FileNotFoundError(f"dataset {name}: LR folder {paired_lr[name]} is not a folder")
    sources[name] = open_eval_source(hr_dir, paired_lr.get(name), scale, divisor)
    shapes = lr_shapes(sources[name])
    if needs_spe:
      spe_masks[name] = SpeMasks(spe_masks[name])
      spe_masks[name].check(sources[name].names, [(h * scale, w * scale) for h, w in shapes])
  crop = scale if crop_border is None else int(crop_border)
  root = storage.native(root)
  for name, source in sources.items():
    # Setting names must differ from metric names: the table reads metrics from the same summary.
    common = {"scale": scale, "crop_border": crop, "lr_source": "paired" if name in paired_lr else "bicubic",
              "lpips_net": lpips_net if lpips_fn is not None else None, **(run_settings or {})}
    for method in make_methods(methods, upscaler, step_tag, seed, common, spe_masks.get(name)):
      evaluate_dataset(source, root / name / method.tag, method, crop_border=crop, batch_size=batch_size,
                       lpips_fn=lpips_fn, fid_fn=fid_fn, extra_summary=extra_summary, on_image=on_image,
                       show_progress=show_progress, maniqa_fn=maniqa_fn)
  return paper_table.write_table(root, step_tag if step_tag is not None else "bicubic", table_tags(step_tag),
                                 list(datasets), compare=compare)


# ---------------------------------------------------------------- CLI
def define_flags(fv: flags.FlagValues) -> None:
  """Defines the CLI's flags in `fv` (a private FlagValues: see `cli`). Nothing is defined at import, so other
  CLIs' flags of the same names never clash in one process."""
  d = dict(flag_values=fv)
  shared_cli.define_model_flags(
      fv, "Training workdir (config.json + checkpoints/<step>) (default: none; needed unless --checkpoint, or "
      "only --bicubic with --output).", "Checkpoint step to evaluate (default: the newest verified one).")
  flags.DEFINE_list("datasets", [], "Benchmarks as NAME=HR_FOLDER,... (LR made by MATLAB bicubic); required.", **d)
  flags.DEFINE_list("paired_lr", [], "Given LR folders as NAME=LR_FOLDER,... for datasets of --datasets.", **d)
  flags.DEFINE_list("spe_masks", [], "A SAM+SRDiff model's (model.cond_sam) test masks: NAME=DIR,... per dataset of "
                    "--datasets, DIR the mask export's --out for that set's HR images (run with --keep_masks).", **d)
  flags.DEFINE_integer("crop_border", None, "Pixels cropped per side for PSNR/SSIM (default: the scale; the "
                       "official evaluation used 0).", **d)
  flags.DEFINE_string("output", None, "Results root (default: WORKDIR/eval).", **d)
  flags.DEFINE_integer("batch_size", 4, "Images of equal size super-resolved together.", **d)
  flags.DEFINE_integer("seed", 0, "Noise seed (each image's noise also depends on its name).", **d)
  flags.DEFINE_bool("diffusion", True, "Evaluate the diffusion model (--nodiffusion: baselines only).", **d)
  flags.DEFINE_bool("rrdb", False, "Also evaluate the RRDB encoder alone (a deterministic baseline).", **d)
  flags.DEFINE_bool("bicubic", False, "Also evaluate MATLAB bicubic up-scaling.", **d)
  flags.DEFINE_integer("scale", 4, "Scale when only --bicubic runs (otherwise the model's).", **d)
  flags.DEFINE_string("lpips_backbone", None, "torchvision AlexNet/VGG16 weights (.pth) for LPIPS (default: none, "
                      "no LPIPS).", **d)
  flags.DEFINE_string("lpips_lin", None, "LPIPS v0.1 linear-layer weights (.pth) (default: none).", **d)
  flags.DEFINE_enum("lpips_net", "alex", ["alex", "vgg"], "LPIPS backbone.", **d)
  flags.DEFINE_string("fid_inception", None, "pytorch-fid Inception weights (pt_inception-*.pth) for FID (default: "
                      "none, no FID).", **d)
  flags.DEFINE_enum("fid_protocol", "pytorch-fid", ["pytorch-fid", "pyiqa"], "How images are resized for the FID "
                    "Inception: pytorch-fid's bilinear, or pyiqa's clean bicubic (the paper's; see "
                    "evaluation/fid_protocols.py).", **d)
  flags.DEFINE_string("maniqa", None, "Local MANIQA weights (pyiqa's ckpt_koniq10k.pt) for a MANIQA column; needs the "
                      "optional pyiqa package (default: none, no MANIQA).", **d)
  flags.DEFINE_bool("compare", False, "Add the published rows (the official README's SAM-DiffSR results, cited) to "
                    "the table, for the datasets evaluated (see evaluation/paper_table.py).", **d)
  flags.DEFINE_bool("progress", True, "Show progress bars.", **d)


# Errors the user can fix, printed as one line (exit status 1); the model loader's are `errors.UserError`s.
USER_ERRORS = (EvalSourceError, images.ImageReadError, FileNotFoundError, NotADirectoryError, SettingsMismatchError,
               results.CorruptResultsError, storage.StorageError, maniqa.MissingExtraError, SpeMaskError)


def _checkpoint_tag(step, checkpoint) -> str:
  """The results folder name for a checkpoint: its step, or an official .ckpt's file stem."""
  return str(step) if checkpoint is None else pathlib.Path(checkpoint).stem


def run_from_flags(fv: flags.FlagValues) -> pathlib.Path:
  """Loads what the flags ask for and runs `evaluate_all`; returns the table's path."""
  from diffssr_jax.inference.upscaler import Upscaler
  if not fv.datasets:
    raise app.UsageError("--datasets is required (NAME=HR_FOLDER,...)")
  methods = [m for m in ("diffusion", "rrdb", "bicubic") if fv[m].value]
  if not methods:
    raise app.UsageError("nothing to evaluate: --nodiffusion without --rrdb or --bicubic")
  needs_model = methods != ["bicubic"]
  shared_cli.check_model_flags(fv, needs_model=needs_model, workdir_also_output=True)
  if fv.workdir is None and fv.output is None:
    raise app.UsageError("--output is required without --workdir")
  if bool(fv.lpips_backbone) != bool(fv.lpips_lin):
    raise app.UsageError("LPIPS needs both --lpips_backbone and --lpips_lin")
  try:
    datasets = parse_named_paths(fv.datasets, "datasets")
    paired = parse_named_paths(fv.paired_lr, "paired_lr")
    spe_masks = parse_named_paths(fv.spe_masks, "spe_masks")
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  for flag, named in (("paired_lr", paired), ("spe_masks", spe_masks)):
    unknown = set(named) - set(datasets)
    if unknown:
      raise app.UsageError(f"--{flag} names datasets not in --datasets: {sorted(unknown)}")
  # Every location is checked before any work: an unservable one is refused in one line (StorageError).
  storage.check_all({"--workdir": fv.workdir, "--checkpoint": fv.checkpoint, "--output": fv.output,
                     "--datasets": list(datasets.values()), "--paired_lr": list(paired.values()),
                     "--spe_masks": list(spe_masks.values()),
                     "--lpips_backbone": fv.lpips_backbone, "--lpips_lin": fv.lpips_lin,
                     "--fid_inception": fv.fid_inception, "--maniqa": fv.maniqa})
  if fv["fid_protocol"].present and not fv.fid_inception:
    raise app.UsageError("--fid_protocol needs --fid_inception (the pytorch-fid Inception weights both protocols use)")
  root = storage.native(fv.output) if fv.output else storage.native(fv.workdir) / "eval"
  # Before the model is loaded: a missing extra or weights file is one line, before any work.
  maniqa_fn = maniqa.make_maniqa_fn(fv.maniqa) if fv.maniqa else None
  upscaler, step_tag, extra, settings = None, None, {}, {}
  if needs_model:
    workdir = fv.workdir if fv.checkpoint is None else None
    upscaler = Upscaler.load(workdir=workdir, checkpoint=fv.checkpoint, step=fv.step, sampler=fv.sampler,
                             steps=fv.steps, eta=fv.eta, use_ema=fv.use_ema)
    print(f"model: {upscaler.describe_source()}; {upscaler.describe()}", file=sys.stderr)
    step_tag = _checkpoint_tag(upscaler.step, fv.checkpoint)
    extra = {"checkpoint": upscaler.source}
    settings = {"use_ema": fv.use_ema}
  lpips_fn = fid_fn = None
  if fv.lpips_backbone:
    from diffssr_jax.evaluation import lpips
    lpips_fn = lpips.make_lpips_fn(fv.lpips_net, lpips.load_weights(fv.lpips_net, fv.lpips_backbone, fv.lpips_lin))
  if fv.fid_inception:
    from diffssr_jax.evaluation import fid, fid_protocols
    fid_fn = fid_protocols.make_feature_fn(fid.load_weights(fv.fid_inception), fv.fid_protocol)
    extra["fid_protocol"] = fv.fid_protocol
  return evaluate_all(upscaler, datasets, root, step_tag=step_tag, paired_lr=paired, methods=methods,
                      crop_border=fv.crop_border, batch_size=fv.batch_size, seed=fv.seed, scale=fv.scale,
                      lpips_fn=lpips_fn, lpips_net=fv.lpips_net, fid_fn=fid_fn, run_settings=settings,
                      extra_summary=extra, show_progress=fv.progress, compare=fv.compare, maniqa_fn=maniqa_fn,
                      spe_masks=spe_masks)


def main(argv, fv: flags.FlagValues) -> int:
  """Runs the evaluation and prints the table; returns the exit status (user errors are handled by `cli`)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  shared_cli.enable_compilation_cache(fv.compilation_cache)
  with preemption.handle_sigterm():  # SIGTERM: the batch in progress is finished, then a clean exit (143)
    table = run_from_flags(fv)
  print(table.read_text(encoding="utf-8"))
  print(f"table written to {table}")
  return shared_cli.EXIT_OK


def cli(argv: Sequence[str] | None = None) -> int:
  """diffssr-evaluate (pyproject's console script; argv default sys.argv), in-process with its own flag
  values: `cli(["evaluate", "--workdir", ...])`; returns the exit status (user errors print one line and give
  1, a bad command line 2)."""
  return shared_cli.run(sys.argv if argv is None else argv, define_flags=define_flags, main=main, doc=__doc__,
                        user_errors=USER_ERRORS)


if __name__ == "__main__":
  sys.exit(cli())
