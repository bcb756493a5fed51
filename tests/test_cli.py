"""The shared command-line conventions (diffssr_jax.cli): one flag style with dashed aliases, quiet library
logging, --help with every default, subcommands, one sampler default, and console scripts that resolve."""
import importlib.metadata
import json
import logging
import pathlib
import re
import tomllib

import pytest
from absl import flags

from diffssr_jax import cli, conventions, errors, logging_setup
from diffssr_jax.data import export_cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Each entry point owns its console script (diffssr_jax.cli, the flags helper, names none of them).
SCRIPTS = {"diffssr-train": "diffssr_jax.main:cli", "diffssr-evaluate": "diffssr_jax.evaluation.evaluate:cli",
           "diffssr-upscale": "diffssr_jax.inference.upscale:cli",
           "diffssr-benchmark": "diffssr_jax.benchmarks.model:cli",
           "diffssr-export-masks": "diffssr_jax.data.export_cli:cli",
           "diffssr-convert": "diffssr_jax.convert_cli:cli"}


def _fv():
  fv = flags.FlagValues()
  cli.define_common_flags(fv)
  flags.DEFINE_integer("batch_size", 4, "", flag_values=fv)
  flags.DEFINE_bool("progress", True, "", flag_values=fv)
  flags.DEFINE_string("no_ema", None, "a non-boolean whose name starts with no", flag_values=fv)
  flags.DEFINE_list("datasets", [], "", flag_values=fv)
  return fv


def test_normalize_argv_for_absl():
  fv = _fv()
  names, booleans = cli.absl_flag_names(fv)
  argv = ["prog", "--batch-size", "2", "--no-progress", "in-put/", "--datasets=A=x-y,B=z", "--no_ema=a-b",
          "--unknown-flag", "-vv", "--", "--batch-size"]
  assert cli.normalize_argv(argv, names, booleans) == [
      "prog", "--batch_size", "2", "--noprogress", "in-put/", "--datasets=A=x-y,B=z", "--no_ema=a-b",
      "--unknown-flag", "--verbosity=2", "--", "--batch-size"]
  assert cli.normalize_argv(["p", "--no_progress", "--batch_size=3", "-v", "x"], names, booleans) == [
      "p", "--noprogress", "--batch_size=3", "--verbosity=1", "x"]
  assert cli.normalize_argv(["p", "-v", "2", "x"], names, booleans) == ["p", "-v", "2", "x"]  # absl's short form
  rest = fv(cli.normalize_argv(["p", "--batch-size=7", "--no-progress", "-vv", "pos"], names, booleans))
  assert rest == ["p", "pos"] and fv.batch_size == 7 and not fv.progress and fv.verbosity == 2


def test_subcommands_have_their_own_flags(capsys):
  """`PROG SUB [flags]` (the benchmarks): each subcommand parses its own flags in both spellings; help lists
  the subcommands or one's flags; a missing or unknown subcommand, a bad or missing required flag, or a stray
  argument is one line and exit 2."""
  def define_a(fv):
    flags.DEFINE_integer("batch_size", 4, "Batch.", flag_values=fv)
    flags.DEFINE_bool("progress", True, "Bars.", flag_values=fv)

  def define_b(fv):
    flags.DEFINE_string("target", None, "Where.", flag_values=fv)
    cli.mark_required(["target"], fv)

  commands = {"a": ("the first", define_a), "b": ("the second", define_b)}
  name, fv = cli.parse_subcommand(["p", "a", "--batch-size", "2", "--no-progress"], commands, "Doc.")
  assert (name, fv.batch_size, fv.progress) == ("a", 2, False) and "target" not in fv
  for argv in (["p"], ["p", "c"], ["p", "a", "--batch_size=x"], ["p", "b"], ["p", "a", "extra"]):
    with pytest.raises(SystemExit) as e:
      cli.parse_subcommand(argv, commands, "Doc.")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), (argv, err)
  with pytest.raises(SystemExit) as e:
    cli.parse_subcommand(["p", "--help"], commands, "Doc.")
  out = capsys.readouterr().out
  assert e.value.code == 0 and out.startswith("Doc.") and "  a  the first\n  b  the second" in out
  with pytest.raises(SystemExit) as e:
    cli.parse_subcommand(["p", "b", "-h"], commands, "Doc.")
  blocks = _flag_blocks(capsys.readouterr().out)
  assert e.value.code == 0 and "required" in blocks["target"] and "batch_size" not in blocks


def test_required_is_told_by_mark_required_not_by_message_text(capsys):
  """--help says "required" for the flags marked through `cli.mark_required`, and only for those: a flag with
  a validator whose message happens to read like absl's own is not one."""
  fv = flags.FlagValues()
  flags.DEFINE_string("needed", None, "A.", flag_values=fv)
  flags.DEFINE_string("checked", None, "B.", flag_values=fv)
  cli.mark_required(["needed"], fv)
  flags.register_validator("checked", lambda v: True, message="Flag --checked must have a value other than None.",
                           flag_values=fv)
  blocks = _flag_blocks(cli.render_help(fv, "Doc."))
  assert "required" in blocks["needed"] and "required" not in blocks["checked"], blocks


def test_setup_logging_quiets_libraries_until_verbosity():
  try:
    logging_setup.setup_logging(0)
    for name in ("absl", "orbax", "jax._src.xla_bridge"):
      assert not logging.getLogger(name).isEnabledFor(logging.WARNING), name
      assert logging.getLogger(name).isEnabledFor(logging.ERROR)
    assert logging.getLogger("diffssr_jax.inference").isEnabledFor(logging.INFO)
    logging_setup.setup_logging(1)
    assert logging.getLogger("absl").isEnabledFor(logging.INFO)
    assert logging.getLogger("orbax.checkpoint").isEnabledFor(logging.INFO)
    assert not logging.getLogger("diffssr_jax").isEnabledFor(logging.DEBUG)
    logging_setup.setup_logging(2)
    assert logging.getLogger("diffssr_jax").isEnabledFor(logging.DEBUG)
  finally:
    logging_setup.setup_logging(0)


def test_run_turns_errors_into_one_line(capsys):
  def define(fv):
    flags.DEFINE_integer("n", 1, "A number.", flag_values=fv)

  def main(argv, fv):
    if fv.n == 0:
      raise errors.UserError("the thing\nis missing")
    if fv.n == 1:
      raise FileNotFoundError("nope.txt")
    if fv.n == 2:
      raise KeyboardInterrupt
    raise RuntimeError("a bug")  # not a user error: the traceback is kept

  assert cli.run(["p", "--n=0"], define_flags=define, main=main, doc="Doc.") == 1
  assert capsys.readouterr().err == "error: the thing is missing\n"
  assert cli.run(["p", "--n=1"], define_flags=define, main=main, doc="Doc.", user_errors=(FileNotFoundError,)) == 1
  assert capsys.readouterr().err == "error: nope.txt\n"
  assert cli.run(["p", "--n=2"], define_flags=define, main=main, doc="Doc.") == 130
  assert cli.run(["p", "--n=x"], define_flags=define, main=main, doc="Doc.") == 2
  assert capsys.readouterr().err.count("\n") == 2
  with pytest.raises(RuntimeError, match="a bug"):
    cli.run(["p", "--n=3"], define_flags=define, main=main, doc="Doc.")
  assert cli.run(["p", "--help"], define_flags=define, main=main, doc="Doc.") == 0
  out = capsys.readouterr().out
  assert out.startswith("Doc.") and "--n\n      A number. (default: 1)" in out


def test_console_scripts_resolve():
  """pyproject's [project.scripts] name these six entry points, and each resolves to a callable (through
  importlib.metadata, as the installed scripts do)."""
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert project["project"]["scripts"] == SCRIPTS
  assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["diffssr_jax*"]
  for name, value in SCRIPTS.items():
    assert callable(importlib.metadata.EntryPoint(name, value, "console_scripts").load())
  assert (ROOT / "requirements.txt").read_text().splitlines()[-1].strip() == "-e ."
  if _installed_from_here():  # when this checkout is the installed package, its metadata says the same
    installed = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")
                 if e.name.startswith("diffssr-")}
    assert installed == SCRIPTS


def _installed_from_here() -> bool:
  """Whether the installed diffssr-jax is this checkout (an editable install of another checkout, such as a
  worktree's main one, has that checkout's entry points)."""
  try:
    url = json.loads(importlib.metadata.distribution("diffssr-jax").read_text("direct_url.json") or "{}")
  except importlib.metadata.PackageNotFoundError:
    return False
  return url.get("url", "").removeprefix("file://") == str(ROOT)


ENTRY_MODULES = {"diffssr_jax.main", "diffssr_jax.evaluation.evaluate", "diffssr_jax.inference.upscale",
                 "diffssr_jax.data.export_cli", "diffssr_jax.benchmarks.model", "diffssr_jax.benchmarks.data",
                 "diffssr_jax.convert_cli"}


def _imports(path: pathlib.Path) -> set[str]:
  """The diffssr_jax modules a file imports (anywhere in it, also inside functions)."""
  import ast
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
  return {m for m in found if m.startswith("diffssr_jax")}


def test_no_import_circle_through_the_flags_helper():
  """diffssr_jax.cli (the flags helper) imports no entry point, and only entry points import it: the library
  (the Upscaler's load errors, ...) raises errors.UserError without the command line."""
  modules = {".".join(p.relative_to(ROOT).with_suffix("").parts): p for p in (ROOT / "diffssr_jax").rglob("*.py")}
  assert not _imports(modules["diffssr_jax.cli"]) & ENTRY_MODULES
  importers = {name for name, path in modules.items() if "diffssr_jax.cli" in _imports(path)}
  assert importers == ENTRY_MODULES, importers


def _flag_blocks(text):
  """{flag: its help block} from our --help output."""
  blocks, name = {}, None
  for line in text.splitlines():
    m = re.match(r"  --(\w+)", line)
    if m:
      name = m.group(1)
      blocks[name] = line
    elif name and line.startswith("      "):
      blocks[name] += " " + line.strip()
  return blocks


@pytest.mark.parametrize("script", ["diffssr-train", "diffssr-evaluate", "diffssr-upscale", "diffssr-export-masks",
                                    "diffssr-convert"])
def test_help_shows_every_default(script, capsys):
  fn = importlib.metadata.EntryPoint(script, SCRIPTS[script], "console_scripts").load()
  try:
    status = fn([script, "--help"])
  except SystemExit as e:  # the training entry point exits through absl.app
    status = e.code
  assert status in (0, None)
  blocks = _flag_blocks(capsys.readouterr().out)
  assert len(blocks) >= 3 and "verbosity" in blocks
  for name, block in blocks.items():
    assert "default" in block or "required" in block, (script, name, block)
  if script == "diffssr-export-masks":
    assert "(default: sam)" in blocks["segmenter"] and "(default: 16)" in blocks["num_shards"]
  if script in ("diffssr-evaluate", "diffssr-upscale"):
    assert "(default: ddpm)" in blocks["sampler"] and "--sampler ddim --steps 25' is ~4x faster" in blocks["sampler"]
    assert "(default: 4)" in blocks["batch_size"]
  if script == "diffssr-train":
    assert "required" in blocks["workdir"] and "required" in blocks["config"]


def test_benchmark_script_runs_its_parser(capsys):
  fn = importlib.metadata.EntryPoint("b", SCRIPTS["diffssr-benchmark"], "console_scripts").load()
  with pytest.raises(SystemExit) as e:
    fn(["diffssr-benchmark", "--help"])
  out = capsys.readouterr().out
  assert e.value.code == 0 and "  train    one data-parallel optimizer step\n  sample" in out and "  compile  " in out
  with pytest.raises(SystemExit) as e:
    fn(["diffssr-benchmark", "compile", "--target", "no-such-chip"])
  assert e.value.code == 2
  assert "error: flag --target=no-such-chip" in capsys.readouterr().err


def test_one_sampler_default_for_evaluate_and_upscale():
  from diffssr_jax.evaluation import evaluate
  from diffssr_jax.inference import upscale
  for module in (evaluate, upscale):
    fv = flags.FlagValues()
    module.define_flags(fv)
    assert fv["sampler"].default == conventions.DEFAULT_SAMPLER == "ddpm", module.__name__
    assert fv["eta"].default == conventions.DEFAULT_ETA
  # DDIM's eta: the value the README measured best (eta 0 was 5.3 dB worse), the same everywhere.
  from diffssr_jax.configs import base
  from diffssr_jax.benchmarks import model as benchmark
  assert conventions.DEFAULT_ETA == 1.0 and base.get_config().eval.eta == conventions.DEFAULT_ETA
  assert benchmark.parse_args(["sample"]).eta == benchmark.parse_args(["compile", "--target", "h200"]).eta == 1.0


def test_both_spellings_reach_the_commands(tmp_path, capsys):
  """`upscale --batch-size 2 --no-progress` (which used to fail) parses like the underscored form."""
  from diffssr_jax.inference import upscale
  seen = {}

  def main(argv, fv):
    seen.update(batch_size=fv.batch_size, progress=fv.progress, fail_fast=fv.fail_fast, inputs=argv[1:])
    return 0

  status = cli.run(["upscale", "--batch-size", "2", "--no-progress", "--fail-fast", "in-dir"],
                   define_flags=upscale.define_flags, main=main, doc=upscale.__doc__)
  assert status == 0 and seen == {"batch_size": 2, "progress": False, "fail_fast": True, "inputs": ["in-dir"]}
  assert export_cli.parse_shard_list("0,2-4, 7") == [0, 2, 3, 4, 7] and export_cli.parse_shard_list("") is None


def test_cpu_if_no_accelerator_follows_the_device_nodes(monkeypatch):
  """JAX_PLATFORMS=cpu only when it is unset and no GPU/TPU device node exists; never overrides the user's."""
  present = set()
  monkeypatch.setattr(cli.glob, "glob", lambda pattern: [pattern] if pattern in present else [])
  env = {}
  assert cli.cpu_if_no_accelerator(env) and env == {"JAX_PLATFORMS": "cpu"}
  for given in ("", "cuda", "tpu,cpu"):
    env = {"JAX_PLATFORMS": given}
    assert not cli.cpu_if_no_accelerator(env) and env == {"JAX_PLATFORMS": given}
  for node in cli.ACCELERATOR_DEVICE_NODES:
    present = {node}
    env = {}
    assert not cli.cpu_if_no_accelerator(env) and env == {}, node


def test_cpu_only_machine_starts_jax_quietly():
  """On this machine (no accelerator nodes) a command's start-up (importing diffssr_jax.cli before jax) puts jax on
  the CPU before any installed plugin tries its device: no CUDA-plugin traceback, no libtpu warnings."""
  import glob
  import os
  import subprocess
  import sys
  if any(glob.glob(p) for p in cli.ACCELERATOR_DEVICE_NODES):
    pytest.skip("this machine has accelerator device nodes")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  code = ("import os, diffssr_jax.cli, jax; print(os.environ['JAX_PLATFORMS'], jax.default_backend(), "
          "len(jax.devices()))")
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split()[:2] == ["cpu", "cpu"]
  assert "Traceback" not in proc.stderr and "plugin" not in proc.stderr.lower() and "TPU" not in proc.stderr, \
      proc.stderr


def test_log_lines_start_on_their_own_line_while_a_bar_is_active(capsys):
  """A log record written while a tqdm bar is on stderr starts its own line (the bar is cleared and redrawn
  below it) instead of continuing the bar's line; without a bar it is written as is."""
  import sys
  from tqdm import tqdm
  log = logging.getLogger("diffssr_jax.test_bars")
  log.propagate, log.handlers = False, [logging_setup.stderr_handler()]
  log.setLevel(logging.INFO)
  try:
    log.info("before")
    bar = tqdm(total=10, file=sys.stderr, mininterval=0, ascii=True)
    bar.update(3)
    log.info("while the bar runs")
    bar.update(1)
    bar.close()
    log.warning("after")
  finally:
    log.handlers = []
  err = capsys.readouterr().err
  assert err.startswith("before\n") and err.endswith("warning: after\n"), err
  line = next(ln for ln in err.split("\n") if "while the bar runs" in ln)
  assert line.rsplit("\r", 1)[-1] == "while the bar runs", repr(line)
  assert "4/10" in err.split("while the bar runs")[1]  # the bar is redrawn below the line
  # absl's handler (the training entry point's) writes to the same stream.
  from absl import logging as absl_logging
  handler = absl_logging.ABSLHandler(absl_logging.PythonFormatter())
  root = logging.getLogger()
  root.addHandler(handler)
  try:
    logging_setup.setup_logging(0)
    assert handler.python_handler.stream is logging_setup.BAR_SAFE_STDERR
    assert logging_setup.BAR_SAFE_STDERR == sys.stderr  # so absl does not copy each record to stderr again
  finally:
    root.removeHandler(handler)
