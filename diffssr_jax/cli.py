"""What every diffssr command line shares: flag spelling, logging, help, errors, and the console scripts.

One style for all commands: absl flags spelled with underscores (`--batch_size`, booleans `--progress` /
`--noprogress`), as the flax examples; the dashed spellings (`--batch-size`, `--no-progress`, `--no_progress`)
are accepted as aliases by `normalize_argv`, which works from the flag names of an absl `FlagValues`
(`absl_flag_names`) or an argparse parser (`argparse_flag_names`, `parse_argparse`).

Logging: libraries (orbax, absl, jax, grain, ...) are quiet by default (errors only); `--verbosity 1` (`-v`)
shows their info and warnings, `--verbosity 2` (`-vv`) debug output and the traceback behind a one-line
error. Our own progress (loggers under `diffssr_jax`) stays at INFO.

`run` is the body of the evaluate, upscale and export commands: private flag values (so several commands can
run in one process, e.g. in tests), `--help` listing every flag with its default, usage errors (exit 2) and
user errors such as missing folders or checkpoints (exit 1) as one line on stderr instead of a traceback.
`run_absl` does the same for the training entry point, which keeps absl's global flags (ml_collections'
config flags need them).

Start-up: importing this module (every command imports it before anything imports jax) calls
`cpu_if_no_accelerator`, which sets JAX_PLATFORMS=cpu on machines without GPU or TPU device nodes, so that an
installed accelerator plugin (the CUDA compiler plugin `diffssr-benchmark compile` uses, or libtpu) does not
print its failed start-up on CPU-only machines.

Console scripts (pyproject.toml): diffssr-train, diffssr-evaluate, diffssr-upscale, diffssr-benchmark and
diffssr-export-masks are the functions at the end of this module. This module imports no jax (the export tool
must run on machines without it), and the commands import theirs lazily.
"""
from __future__ import annotations

import argparse
import errno
import glob
import logging
import os
import re
import sys
import textwrap
import traceback
from collections.abc import Callable, Iterable, Sequence

from absl import app, flags

# Loggers of the libraries whose INFO/WARNING chatter is hidden by default (orbax logs through absl).
LIBRARY_LOGGERS = ("absl", "orbax", "jax", "jaxlib", "flax", "grain", "tensorflow", "tensorflow_datasets",
                   "PIL", "torch", "urllib3", "h5py")
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


class UserError(Exception):
  """An error the user can fix (a missing folder, a file that is not a checkpoint, ...): commands print its
  message as one line and exit with status 1, without a traceback."""


# ---------------------------------------------------------------- flag spelling
def _key(name: str) -> str:
  return name.replace("-", "_")


def normalize_argv(argv: Sequence[str], names: Iterable[str], booleans: Iterable[str] = ()) -> list[str]:
  """argv with every `--flag` spelled as the command defines it.

  `names` are the flag names as defined (absl: `batch_size`; argparse: `batch-size` or `batch_size`), and
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


def argparse_flag_names(parser: argparse.ArgumentParser) -> set[str]:
  """The long option names (without `--`) of an argparse parser and of its subcommands, for
  `normalize_argv`."""
  names = set()
  for action in parser._actions:  # argparse has no public accessor; _actions is stable since Python 2.7
    names.update(s[2:] for s in action.option_strings if s.startswith("--"))
    if isinstance(action, argparse._SubParsersAction):
      for sub in action.choices.values():
        names |= argparse_flag_names(sub)
  return names


def parse_argparse(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
  """`parser.parse_args` accepting both the dashed and the underscored spelling of every option (argv
  without the program name, as argparse takes it; default sys.argv[1:])."""
  argv = sys.argv[1:] if argv is None else list(argv)
  return parser.parse_args(normalize_argv(["prog", *argv], argparse_flag_names(parser))[1:])


class ArgparseHelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
  """For argparse commands: the description kept as written, and every option's default in its help."""


# ---------------------------------------------------------------- logging
class _StderrHandler(logging.Handler):
  """Writes records to whatever sys.stderr is at the time (test runners and progress bars swap it)."""

  def emit(self, record):
    try:
      sys.stderr.write(self.format(record) + "\n")
    except Exception:  # noqa: BLE001  (logging must never raise; the standard handlers do the same)
      self.handleError(record)


class _Formatter(logging.Formatter):
  def format(self, record):
    msg = super().format(record)
    return msg if record.levelno == logging.INFO else f"{record.levelname.lower()}: {msg}"


def library_level(verbosity: int) -> int:
  """The logging level of third-party libraries at a `--verbosity`."""
  return logging.ERROR if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG


def setup_logging(verbosity: int = 0) -> None:
  """Libraries at ERROR (verbosity <= 0), INFO (1) or DEBUG (>= 2); our `diffssr_jax` loggers at INFO (DEBUG
  from 2, WARNING below 0). Adds a stderr handler to the root logger when it has none (absl.app.run installs
  its own, which is kept)."""
  lib = library_level(verbosity)
  root = logging.getLogger()
  root.setLevel(lib)
  for name in LIBRARY_LOGGERS:
    logging.getLogger(name).setLevel(lib)
  ours = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity >= 2 else logging.INFO
  logging.getLogger("diffssr_jax").setLevel(ours)
  absl_logger = logging.getLogger("absl")
  for f in [f for f in absl_logger.filters if isinstance(f, _BackgroundErrorFilter)]:
    absl_logger.removeFilter(f)
  if verbosity <= 0:
    absl_logger.addFilter(_BackgroundErrorFilter())
  if not root.handlers:
    handler = _StderrHandler()
    handler.setFormatter(_Formatter("%(message)s"))
    root.addHandler(handler)


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


def define_compilation_cache_flag(fv: flags.FlagValues) -> None:
  """--compilation_cache, for the commands that compile with jax (see `diffssr_jax.compilation_cache`)."""
  flags.DEFINE_string("compilation_cache", "auto", 'JAX persistent compilation cache folder: "auto" is '
                      "$JAX_COMPILATION_CACHE_DIR or ~/.cache/diffssr_jax/xla; \"\" turns it off.", flag_values=fv)


def enable_compilation_cache(setting: str) -> None:
  """`compilation_cache.enable`, imported only when called (the export tool never imports jax)."""
  from diffssr_jax import compilation_cache
  compilation_cache.enable(setting)


# ---------------------------------------------------------------- help
def _is_required(flag) -> bool:
  # absl's mark_flag_as_required registers a validator with this message; there is no public accessor.
  return any("must have a value other than None" in str(getattr(v, "message", "")) for v in flag.validators)


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


# tensorstore (orbax's array writer) reports OS errors inside a ValueError's text:
#   ... Failed writing: "/w/checkpoints/2.orbax-checkpoint-tmp/.../d/5421f0": ...: File too large [os_error_code='27']
_TENSORSTORE_OS_ERROR = re.compile(r'"(?P<path>/[^"]+)"[^"]*?\[os_error_code=\'(?P<code>\d+)\'\]')
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def os_error_message(exc: BaseException) -> str | None:
  """'<path>: <cause>' for an exception that is (or was caused by) an OS error, such as a full disk, from
  Python's own file calls or from tensorstore (orbax's checkpoint writes); None for anything else."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    code, path = None, None
    if isinstance(exc, OSError) and exc.errno:
      code, path = exc.errno, exc.filename
    else:
      m = _TENSORSTORE_OS_ERROR.search(str(exc))
      if m:
        code, path = int(m["code"]), m["path"]
    if code is not None:
      hint = " (free some space and run the same command again: finished results and checkpoints are kept)" \
          if code in _FULL else ""
      return f"{path or '?'}: {os.strerror(code)}{hint}"
    exc = exc.__cause__ or exc.__context__
  return None


class _BackgroundErrorFilter(logging.Filter):
  """Drops the tracebacks orbax logs from its background threads when a save fails (four of them per
  failed checkpoint): the same error reaches the main thread, which reports it in one line. Shown from
  --verbosity 1."""

  def filter(self, record):
    return not (record.exc_info and "orbax" in record.pathname)


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
  names, booleans = absl_flag_names(fv)
  argv = normalize_argv(argv, names, booleans)
  try:
    rest = fv(argv)
  except flags.Error as e:
    error(f"{e} (see --help)")
    return EXIT_USAGE
  setup_logging(fv.verbosity)
  from diffssr_jax import images  # numpy + cv2 only
  images.set_exif_orientation(fv.exif_orientation)
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
          "keys of configs/base.py")
    sys.exit(EXIT_USAGE)


# ---------------------------------------------------------------- console scripts
def _argv(argv):
  return list(sys.argv if argv is None else argv)


def train(argv: Sequence[str] | None = None):
  """diffssr-train: `python -m diffssr_jax.main`."""
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as diffssr_jax.main sets before numpy loads
  from diffssr_jax import main as train_main
  run_absl(train_main.main, _argv(argv), train_main.__doc__)


def evaluate(argv: Sequence[str] | None = None) -> int:
  """diffssr-evaluate: `python -m diffssr_jax.evaluation.evaluate`."""
  from diffssr_jax.evaluation import evaluate as evaluate_cmd
  return evaluate_cmd.cli(_argv(argv))


def upscale(argv: Sequence[str] | None = None) -> int:
  """diffssr-upscale: `python -m diffssr_jax.inference.upscale`."""
  from diffssr_jax.inference import upscale as upscale_cmd
  return upscale_cmd.cli(_argv(argv))


def export_masks(argv: Sequence[str] | None = None) -> int:
  """diffssr-export-masks: `python tools/export_sam_masks.py` (torch only, never imports jax)."""
  from diffssr_jax.data import export_cli
  return export_cli.cli(_argv(argv))


def benchmark(argv: Sequence[str] | None = None) -> int:
  """diffssr-benchmark: `python -m diffssr_jax.benchmarks.model` (its main prints a JSON line and returns the
  result dict, which must not become the exit status)."""
  from diffssr_jax.benchmarks import model as benchmark_cmd
  result = benchmark_cmd.main(_argv(argv)[1:])
  return result if isinstance(result, int) else EXIT_OK
