"""What every diffssr command line shares: flag spelling, help, errors, and the command body (`run`).

A helper module: it knows no entry point. Each command (diffssr_jax.main, evaluation.evaluate,
inference.upscale, data.export_cli, benchmarks.model) defines its flags, owns its `cli(argv=None)` (the console
script pyproject.toml names) and calls `run`, `run_subcommand` or `run_absl` from here.

One style for all commands: absl flags spelled with underscores (`--batch_size`, booleans `--progress` /
`--noprogress`), as the flax examples; the dashed spellings (`--batch-size`, `--no-progress`, `--no_progress`)
are accepted as aliases by `normalize_argv`, which works from the flag names of an absl `FlagValues`
(`absl_flag_names`).

`run` is the body of the evaluate, upscale and export commands: private flag values (so several commands can
run in one process, e.g. in tests), `--help` listing every flag with its default, usage errors (exit 2) and
user errors (`errors.UserError`: missing folders or checkpoints, exit 1) as one line on stderr instead of a
traceback. `run_subcommand` does the same for a command with subcommands (the benchmark: `train`, `sample`,
`compile`, each with its own flags). `run_absl` does it for the training entry point, which keeps absl's
global flags (ml_collections' config flags need them). Logging is set up by `diffssr_jax.logging_setup`.

Start-up: importing this module (every command imports it before anything imports jax) calls
`cpu_if_no_accelerator`, which sets JAX_PLATFORMS=cpu on machines without GPU or TPU device nodes, so that an
installed accelerator plugin (the CUDA compiler plugin `diffssr-benchmark compile` uses, or libtpu) does not
print its failed start-up on CPU-only machines. This module imports no jax (the export tool must run on
machines without it).
"""
from __future__ import annotations

import glob
import os
import re
import sys
import textwrap
import traceback
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence

from absl import app, flags

from diffssr_jax.errors import UserError, os_error_message
from diffssr_jax.logging_setup import setup_logging

HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull")
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

_VERBOSITY_HELP = ("0: our progress only, libraries' messages hidden (errors still shown); 1 (-v): libraries' "
                   "info and warnings too; 2 (-vv): debug output, and the traceback behind an error.")


# What the accelerator drivers create: NVIDIA's (/dev/nvidia0, /dev/nvidiactl), AMD's ROCm (/dev/kfd), TPU VMs'
# (/dev/accel0.. on v2-v5e, VFIO groups /dev/vfio/0.. on v5p/v6e).
ACCELERATOR_DEVICE_NODES = ("/dev/nvidia*", "/dev/kfd", "/dev/accel*", "/dev/vfio/[0-9]*")


def cpu_if_no_accelerator(environ=os.environ) -> bool:
  """Sets JAX_PLATFORMS=cpu when it is unset and the machine has no accelerator device nodes; returns whether
  it did. Must run before jax is imported (jax reads JAX_PLATFORMS when it loads).

  Not a guess: without a device node no GPU or TPU backend can start (the nodes are what the kernel drivers
  create for each chip, and every backend opens them), so jax would end up on the CPU anyway, but only after
  each installed plugin has tried and failed: the CUDA plugin prints a ~30-line traceback, libtpu a page of
  warnings. An explicit JAX_PLATFORMS (even "") is the user's choice and left alone."""
  if "JAX_PLATFORMS" in environ or any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICE_NODES):
    return False
  environ["JAX_PLATFORMS"] = "cpu"
  return True


cpu_if_no_accelerator()


# ---------------------------------------------------------------- flag spelling
def _key(name: str) -> str:
  return name.replace("-", "_")


def normalize_argv(argv: Sequence[str], names: Iterable[str], booleans: Iterable[str] = ()) -> list[str]:
  """argv with every `--flag` spelled as the command defines it.

  `names` are the flag names as defined (`batch_size`, or a dashed `batch-size`), and
  `--batch-size`, `--batch_size` both become the defined spelling. For `booleans` (absl booleans, negated as
  `--no<name>`), `--no-name` and `--no_name` become `--noname`. Values after `=` and other arguments are kept;
  everything after a bare `--` is left alone, as are unknown flags (the parser reports them as typed). When
  the command has a `verbosity` flag, `-v` / `-vv` / `-vvv` become `--verbosity=1/2/3` (`-v N` is absl's own
  short form and is kept). argv[0] (the program) is kept.
  """
  argv = list(argv)
  if not argv:
    return argv
  table, clashes = {}, set()
  for n in names:
    k = _key(n)
    if k in table and table[k] != n:
      clashes.add(k)  # e.g. both `a-b` and `a_b` defined: leave those exactly as typed
    table[k] = n
  for k in clashes:
    del table[k]
  bools = {_key(n): n for n in booleans if _key(n) in table}
  out = [argv[0]]
  rest = argv[1:]
  for i, tok in enumerate(rest):
    if tok == "--":
      out += rest[i:]
      break
    if tok.startswith("--") and len(tok) > 2 and not tok.startswith("---"):
      name, eq, value = tok[2:].partition("=")
      k = _key(name)
      if k in table:
        tok = f"--{table[k]}{eq}{value}"
      elif k.startswith("no_") and k[3:] in bools:
        tok = f"--no{bools[k[3:]]}{eq}{value}"
      elif k.startswith("no") and k[2:] in bools:
        tok = f"--no{bools[k[2:]]}{eq}{value}"
    elif "verbosity" in table and re.fullmatch(r"-v+", tok):
      nxt = rest[i + 1] if i + 1 < len(rest) else ""
      if not (tok == "-v" and re.fullmatch(r"-?\d+", nxt)):
        tok = f"--verbosity={len(tok) - 1}"
    out.append(tok)
  return out


def absl_flag_names(fv: flags.FlagValues) -> tuple[set[str], set[str]]:
  """(names, boolean names) of the flags defined in an absl FlagValues, for `normalize_argv`."""
  names = set(fv)
  return names, {n for n in names if fv[n].boolean}


def define_common_flags(fv: flags.FlagValues) -> None:
  """The flags every command has: --verbosity (-v), --exif_orientation (every command reads images)."""
  flags.DEFINE_integer("verbosity", 0, _VERBOSITY_HELP, short_name="v", flag_values=fv)
  flags.DEFINE_enum("exif_orientation", "apply", ["apply", "ignore"], "Input photos' EXIF orientation: apply "
                    "it (turn them upright, as viewers show them) or ignore it with a warning (pixels as stored).",
                    flag_values=fv)


def define_model_flags(fv: flags.FlagValues, workdir_help: str, step_help: str) -> None:
  """The flags of the commands that load a trained model and sample from it (evaluate, upscale): where the
  weights come from, the sampler, EMA and the compilation cache."""
  from diffssr_jax import conventions
  d = dict(flag_values=fv)
  define_compilation_cache_flag(fv)
  flags.DEFINE_string("workdir", None, workdir_help, **d)
  flags.DEFINE_integer("step", None, step_help, **d)
  flags.DEFINE_string("checkpoint", None, "An official SAM-DiffSR PyTorch .ckpt instead of a workdir (default: "
                      "none).", **d)
  flags.DEFINE_enum("sampler", conventions.DEFAULT_SAMPLER, list(conventions.SAMPLERS), conventions.SAMPLER_HELP,
                    **d)
  flags.DEFINE_integer("steps", None, f"Denoising steps for ddim (default: {conventions.DEFAULT_DDIM_STEPS}; ddpm "
                       "runs all T steps) or student (1, 2 or 4; default 1).", **d)
  flags.DEFINE_float("eta", conventions.DEFAULT_ETA, "DDIM eta (0: deterministic given the initial noise; 1: "
                     "ancestral, as DDPM).", **d)
  flags.DEFINE_bool("use_ema", True, "Use the EMA weights when the checkpoint has them.", **d)


def check_model_flags(fv: flags.FlagValues, *, needs_model: bool = True, workdir_also_output: bool = False) -> None:
  """The usage rules of `define_model_flags`' flags, in one place for evaluate and upscale (app.UsageError):
  where the weights come from (exactly one of --workdir / --checkpoint; at least one where --workdir also
  names the output folder, so both may be given) and --steps only for ddim (ddpm runs all T steps)."""
  if needs_model and workdir_also_output and fv.workdir is None and fv.checkpoint is None:
    raise app.UsageError("give --workdir or --checkpoint")
  if needs_model and not workdir_also_output and (fv.workdir is None) == (fv.checkpoint is None):
    raise app.UsageError("give exactly one of --workdir or --checkpoint")
  if fv.sampler == "ddpm" and fv.steps is not None:
    raise app.UsageError("--steps is for --sampler ddim (ddpm runs all T steps)")


def define_compilation_cache_flag(fv: flags.FlagValues) -> None:
  """--compilation_cache, for the commands that compile with jax (see `diffssr_jax.compilation_cache`)."""
  flags.DEFINE_string("compilation_cache", "auto", 'JAX persistent compilation cache folder: "auto" is '
                      "$JAX_COMPILATION_CACHE_DIR or ~/.cache/diffssr_jax/xla; \"\" turns it off.", flag_values=fv)


def enable_compilation_cache(setting: str) -> None:
  """`compilation_cache.enable`, imported only when called (the export tool never imports jax)."""
  from diffssr_jax import compilation_cache
  compilation_cache.enable(setting)


# ---------------------------------------------------------------- help
# The flags made required through `mark_required` (absl keeps "required" only as an anonymous validator).
_REQUIRED: weakref.WeakSet = weakref.WeakSet()


def mark_required(names: Iterable[str], fv: flags.FlagValues = flags.FLAGS) -> None:
  """absl's `mark_flags_as_required`, remembered so that --help can say "required"."""
  names = list(names)
  flags.mark_flags_as_required(names, flag_values=fv)
  _REQUIRED.update(fv[n] for n in names)


def _is_required(flag) -> bool:
  return flag in _REQUIRED


def flag_help(flag) -> str:
  """One flag's help: name (and short name), text, and its default (or 'required')."""
  head = f"--{flag.name}" + (f" (-{flag.short_name})" if flag.short_name else "")
  text = flag.help or ""
  if flag.name == "verbosity":  # absl's own flag (training entry point) explains absl's levels, not ours
    return f"  {head}\n" + textwrap.fill(f"{_VERBOSITY_HELP} (default: 0)", width=100, initial_indent="      ",
                                           subsequent_indent="      ")
  notes = []  # (absl already starts an enum's help with <a|b|c>)
  if flag.boolean:
    notes.append(f"--no{flag.name} to turn off")
  if flag.default is not None and flag.default_as_str is not None:
    default = flag.default_as_str
    default = default[1:-1] if len(default) >= 2 and default[0] == default[-1] == "'" else default
    notes.append(f"default: {default if default != '' else 'empty'}")
  elif _is_required(flag):
    notes.append("required")
  elif "default" not in text.lower() and "required" not in text.lower():
    notes.append("default: none")
  body = textwrap.fill(text + (f" ({'; '.join(notes)})" if notes else ""), width=100, initial_indent="      ",
                       subsequent_indent="      ")
  return f"  {head}\n{body}"


def render_help(fv: flags.FlagValues, doc: str | None, names: Iterable[str] | None = None) -> str:
  """The --help text: the command's docstring, then every flag (or those in `names`) with its default."""
  seen, blocks = set(), []
  order = list(fv if names is None else names)  # definition order: commands define related flags together
  order = [n for n in order if fv[n].name == n and n != "verbosity"] + ["verbosity"] * ("verbosity" in order)
  for n in order:
    flag = fv[n]
    if flag.name in seen:
      continue
    seen.add(flag.name)
    blocks.append(flag_help(flag))
  intro = textwrap.dedent(doc or "").strip()
  spelling = ("Flags are spelled --name_with_underscores or --name-with-dashes; booleans --flag / --noflag "
              "(or --no-flag).")
  return f"{intro}\n\n{spelling}\n\nflags:\n" + "\n".join(blocks) + "\n"


def print_help(text: str) -> None:
  """Prints help text to stdout; a closed pipe (`--help | head`) is not an error."""
  try:
    sys.stdout.write(text)
    sys.stdout.flush()
  except BrokenPipeError:
    # Python's recommended handling: point stdout at devnull so the interpreter's final flush stays quiet.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def wants_help(argv: Sequence[str]) -> bool:
  args = list(argv[1:])
  if "--" in args:
    args = args[:args.index("--")]
  return any(a in HELP_FLAGS for a in args)


# ---------------------------------------------------------------- errors and the command body
def error(message: str) -> None:
  """Prints a one-line error on stderr."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)


def _parse(argv: list[str], fv: flags.FlagValues) -> list[str] | None:
  """fv parsed from argv (both spellings accepted); the positional arguments, or None after printing a
  one-line usage error."""
  names, booleans = absl_flag_names(fv)
  try:
    return fv(normalize_argv(argv, names, booleans))
  except flags.Error as e:
    error(f"{e} (see --help)")
    return None


def _start(fv: flags.FlagValues) -> None:
  """What every command does once its flags are parsed: logging, and how images' EXIF orientation is read."""
  setup_logging(fv.verbosity)
  from diffssr_jax import images  # numpy + cv2 only
  images.set_exif_orientation(fv.exif_orientation)


def run(argv: Sequence[str], *, define_flags: Callable[[flags.FlagValues], None],
        main: Callable[[list[str], flags.FlagValues], int], doc: str | None,
        user_errors: tuple[type[BaseException], ...] = ()) -> int:
  """Runs one command with its own flag values; returns the exit status.

  argv[0] is the program. `define_flags(fv)` defines the command's flags (--verbosity is added), `main(rest,
  fv)` gets the positional arguments (rest[0] the program) and returns the status. Help requests print
  `render_help` (exit 0); bad flags and `app.UsageError` print one line (exit 2); `UserError` and the
  exceptions of `user_errors` print one line (exit 1; the traceback too from --verbosity 2); Ctrl-C exits 130.
  """
  fv = flags.FlagValues()
  define_common_flags(fv)
  define_flags(fv)
  argv = list(argv) or ["prog"]
  if wants_help(argv):
    print_help(render_help(fv, doc))
    return EXIT_OK
  rest = _parse(argv, fv)
  if rest is None:
    return EXIT_USAGE
  _start(fv)
  from diffssr_jax.storage import StorageError  # a location that cannot be served: one line, like UserError
  user_errors = (*user_errors, StorageError)
  try:
    return int(main(rest, fv))
  except app.UsageError as e:
    error(f"{e} (see --help)")
    return EXIT_USAGE
  except KeyboardInterrupt:
    error("interrupted")
    return EXIT_INTERRUPTED
  except (UserError, *user_errors) as e:
    if fv.verbosity >= 2:
      traceback.print_exc()
    error(str(e) or type(e).__name__)
    return EXIT_ERROR
  except Exception as e:  # noqa: BLE001 - only OS errors (disk full, ...) are turned into one line
    from diffssr_jax import preemption
    if isinstance(e, preemption.Preempted):  # the unit in progress was finished: a rerun continues
      error(str(e))
      return preemption.EXIT_PREEMPTED
    message = os_error_message(e)
    if message is None:
      raise
    if fv.verbosity >= 2:
      traceback.print_exc()
    error(message)
    return EXIT_ERROR


def render_subcommands(commands: Mapping[str, tuple[str, Callable]], doc: str | None, prog: str) -> str:
  """The --help text of a command with subcommands: its docstring and one line per subcommand."""
  width = max(map(len, commands))
  lines = [f"  {name:<{width}}  {summary}" for name, (summary, _) in commands.items()]
  return (f"{textwrap.dedent(doc or '').strip()}\n\nsubcommands ({prog} SUBCOMMAND --help lists its flags):\n"
          + "\n".join(lines) + "\n")


def parse_subcommand(argv: Sequence[str], commands: Mapping[str, tuple[str, Callable[[flags.FlagValues], None]]],
                     doc: str | None) -> tuple[str, flags.FlagValues]:
  """(subcommand, its parsed flag values) for `PROG SUBCOMMAND [flags]`; argv[0] is the program.

  `commands` maps each subcommand to (one-line summary, define_flags(fv)); each gets its own FlagValues with
  the common flags, spelled as in `run`. `PROG --help` lists the subcommands, `PROG SUB --help` the flags of
  one (exit 0); a missing or unknown subcommand, a bad flag or a stray positional argument prints one line
  (exit 2). Exits by SystemExit, as argparse's `parse_args` does, so that the caller's result stays its own.
  Logging is set up as in `run`."""
  argv = list(argv) or ["prog"]
  prog = os.path.basename(argv[0])
  name = argv[1] if len(argv) > 1 else None
  if name not in commands:
    if name in HELP_FLAGS:
      print_help(render_subcommands(commands, doc, prog))
      raise SystemExit(EXIT_OK)
    choices = ", ".join(commands)
    error(f"unknown subcommand {name!r}: expected one of {choices} (see --help)" if name is not None else
          f"give a subcommand: one of {choices} (see --help)")
    raise SystemExit(EXIT_USAGE)
  summary, define_flags = commands[name]
  fv = flags.FlagValues()
  define_common_flags(fv)
  define_flags(fv)
  sub_argv = [f"{argv[0]} {name}", *argv[2:]]
  if wants_help(sub_argv):
    print_help(render_help(fv, f"{prog} {name}: {summary}"))
    raise SystemExit(EXIT_OK)
  rest = _parse(sub_argv, fv)
  if rest is None:
    raise SystemExit(EXIT_USAGE)
  if len(rest) > 1:
    error(f"unexpected arguments: {' '.join(rest[1:])} (see --help)")
    raise SystemExit(EXIT_USAGE)
  _start(fv)
  return name, fv


def run_absl(main: Callable[[list[str]], object], argv: Sequence[str] | None = None, doc: str | None = None):
  """Runs an absl app that keeps the global FLAGS (the training entry point): argv normalised as in `run`,
  `--help` listing the flags of `main`'s module with their defaults, then `absl.app.run` (which exits)."""
  argv = list(sys.argv if argv is None else argv)
  fv = flags.FLAGS
  module = sys.modules.get(main.__module__)
  # absl files flags defined by the __main__ module under the script path (sys.argv[0]).
  key = sys.argv[0] if main.__module__ == "__main__" else main.__module__
  if wants_help(argv) and "--helpfull" not in argv:
    own = [f.name for f in fv.get_flags_for_module(key)] + ["verbosity"]
    print_help(render_help(fv, doc or getattr(module, "__doc__", None), own))
    sys.exit(EXIT_OK)
  names, booleans = absl_flag_names(fv)
  argv = normalize_argv(argv, names, booleans)
  try:
    app.run(main, argv=argv)
  except (AttributeError, KeyError) as e:
    if fv.is_parsed():
      raise
    # ml_collections' locked config flags raise these from absl's parser for an override of a key the
    # config has not got (--config.train.bogus=1): a typo, told in one line instead of a 60-line traceback.
    key = str(e).strip("'\"")
    given = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--") and "." in a.split("=", 1)[0]]
    given = [a for a in given if key in a[2:].split(".")] or given
    error(f"unknown config key {key!r} ({', '.join(given) or 'command line'}): not in the config file; see the "
          "keys of diffssr_jax/configs/base.py")
    sys.exit(EXIT_USAGE)
