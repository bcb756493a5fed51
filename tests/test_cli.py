"""The shared command-line conventions (diffssr_jax.cli): one flag style with dashed aliases, quiet library
logging, --help with every default, one sampler default, and console scripts that resolve."""
import argparse
import importlib.metadata
import logging
import pathlib
import re
import tomllib

import pytest
from absl import flags

from diffssr_jax import cli, conventions
from diffssr_jax.data import export_cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = {"diffssr-train": "diffssr_jax.cli:train", "diffssr-evaluate": "diffssr_jax.cli:evaluate",
           "diffssr-upscale": "diffssr_jax.cli:upscale", "diffssr-benchmark": "diffssr_jax.cli:benchmark",
           "diffssr-export-masks": "diffssr_jax.cli:export_masks", "diffssr-convert": "diffssr_jax.cli:convert"}


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


def test_normalize_argv_for_argparse():
  """An argparse command (dashed or underscored names, subcommands) accepts both spellings via
  `parse_argparse`, as the benchmark will."""
  parser = argparse.ArgumentParser()
  parser.add_argument("--top-level", type=int, default=0)
  sub = parser.add_subparsers(dest="cmd", required=True)
  tr = sub.add_parser("train")
  tr.add_argument("--batch-size", type=int, default=4)
  tr.add_argument("--no-progress", action="store_true")
  tr.add_argument("--patch_size", type=int, default=160)
  assert cli.argparse_flag_names(parser) >= {"top-level", "batch-size", "no-progress", "patch_size", "help"}
  args = cli.parse_argparse(parser, ["--top_level", "1", "train", "--batch_size", "2", "--no_progress",
                                     "--patch-size", "64"])
  assert (args.top_level, args.batch_size, args.no_progress, args.patch_size) == (1, 2, True, 64)


def test_setup_logging_quiets_libraries_until_verbosity():
  try:
    cli.setup_logging(0)
    for name in ("absl", "orbax", "jax._src.xla_bridge"):
      assert not logging.getLogger(name).isEnabledFor(logging.WARNING), name
      assert logging.getLogger(name).isEnabledFor(logging.ERROR)
    assert logging.getLogger("diffssr_jax.inference").isEnabledFor(logging.INFO)
    cli.setup_logging(1)
    assert logging.getLogger("absl").isEnabledFor(logging.INFO)
    assert logging.getLogger("orbax.checkpoint").isEnabledFor(logging.INFO)
    assert not logging.getLogger("diffssr_jax").isEnabledFor(logging.DEBUG)
    cli.setup_logging(2)
    assert logging.getLogger("diffssr_jax").isEnabledFor(logging.DEBUG)
  finally:
    cli.setup_logging(0)


def test_run_turns_errors_into_one_line(capsys):
  def define(fv):
    flags.DEFINE_integer("n", 1, "A number.", flag_values=fv)

  def main(argv, fv):
    if fv.n == 0:
      raise cli.UserError("the thing\nis missing")
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
  assert set(project["tool"]["setuptools"]["packages"]["find"]["include"]) == {"diffssr_jax*", "configs"}
  for name, value in SCRIPTS.items():
    assert callable(importlib.metadata.EntryPoint(name, value, "console_scripts").load())
  assert (ROOT / "requirements.txt").read_text().splitlines()[-1].strip() == "-e ."
  try:
    installed = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")
                 if e.name.startswith("diffssr-")}
  except Exception:  # noqa: BLE001
    installed = {}
  if installed:  # when the package is installed, its metadata says the same
    assert installed == SCRIPTS


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
    assert "(default: ddpm)" in blocks["sampler"] and "--sampler ddim --steps 25 --eta 1" in blocks["sampler"]
    assert "(default: 4)" in blocks["batch_size"]
  if script == "diffssr-train":
    assert "required" in blocks["workdir"] and "required" in blocks["config"]


def test_benchmark_script_runs_its_parser(capsys):
  fn = importlib.metadata.EntryPoint("b", SCRIPTS["diffssr-benchmark"], "console_scripts").load()
  with pytest.raises(SystemExit) as e:
    fn(["diffssr-benchmark", "--help"])
  assert e.value.code == 0 and "{train,sample,compile}" in capsys.readouterr().out


def test_one_sampler_default_for_evaluate_and_upscale():
  from diffssr_jax.evaluation import evaluate
  from diffssr_jax.inference import upscale
  for module in (evaluate, upscale):
    fv = flags.FlagValues()
    module.define_flags(fv)
    assert fv["sampler"].default == conventions.DEFAULT_SAMPLER == "ddpm", module.__name__
    assert fv["eta"].default == conventions.DEFAULT_ETA


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
