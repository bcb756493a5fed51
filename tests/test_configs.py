"""Every shipped config builds its model and has consistent settings."""
import importlib

import jax
import jax.numpy as jnp
import pytest

from diffssr_jax import configs
from diffssr_jax.diffusion.model import build_model

CONFIGS = ["base", "demo", "diffssr_df2k_x4", "diffssr_paper_df2k_x4", "srdiff_df2k_x4", "rrdb_df2k_x4",
           "diffssr_df2k_x2", "rrdb_df2k_x2", "distill_demo", "sam_srdiff_df2k_x4"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds(name):
  cfg = importlib.import_module(f"diffssr_jax.configs.{name}").get_config()
  model = build_model(cfg)
  shapes = model.param_shapes()
  assert set(shapes) == {"unet", "rrdb"}
  assert cfg.data.patch_size % cfg.model.scale == 0
  assert cfg.task in ("diffusion", "rrdb", "distill")


def test_paper_settings():
  from diffssr_jax.configs import diffssr_df2k_x4, diffssr_paper_df2k_x4, srdiff_df2k_x4
  c = diffssr_df2k_x4.get_config()
  assert (c.diffusion.timesteps, c.diffusion.beta_schedule, c.model.unet_dim, tuple(c.model.unet_dim_mults),
          c.model.rrdb_num_blocks, c.optim.lr, c.train.batch_size) == (100, "cosine", 64, (1, 2, 3, 4), 17, 2e-4, 64)
  assert c.diffusion.modulation == "reference" and c.diffusion.loss == "l1"
  assert diffssr_paper_df2k_x4.get_config().diffusion.modulation == "paper"
  assert srdiff_df2k_x4.get_config().diffusion.modulation == "none"


def test_x2_model_shapes():
  from diffssr_jax.configs import diffssr_df2k_x2
  model = build_model(diffssr_df2k_x2.get_config())
  params = model.param_shapes()
  assert params["unet"]["params"]["cond_proj"]["kernel"].shape == (4, 4, 64, 384)  # (k, k, out, in)
  out = jax.eval_shape(lambda p, x: model.encode(p, x, decode=True)[0], params["rrdb"], jnp.zeros((1, 8, 8, 3)))
  assert out.shape == (1, 16, 16, 3)


def test_packaged_config_names_resolve_for_an_installed_user(tmp_path, monkeypatch):
  """`--config demo` is the packaged diffssr_jax/configs/demo.py, from any directory (no checkout needed);
  a file path, ml_collections' `path:arg` and `--config.key=value` overrides are kept as given."""
  from absl import flags
  from ml_collections import config_flags
  assert configs.names() == sorted(CONFIGS)
  monkeypatch.chdir(tmp_path)
  demo = str(configs.HERE / "demo.py")
  assert configs.resolve("demo") == configs.resolve("demo.py") == demo
  assert configs.resolve("demo:arg") == f"{demo}:arg"
  (tmp_path / "mine.py").write_text("from diffssr_jax.configs import base\nget_config = base.get_config\n")
  for kept in ("mine.py", "sub/demo.py", "nope", str(tmp_path / "mine.py")):
    assert configs.resolve(kept) == kept
  (tmp_path / "demo").write_text("")  # a file of the user's named like a packaged config wins
  assert configs.resolve("demo") == "demo"
  argv = ["p", "--config", "base", "--config.seed=5", "--", "--config", "demo"]
  assert configs.resolve_argv(argv) == ["p", "--config", str(configs.HERE / "base.py"), "--config.seed=5", "--",
                                        "--config", "demo"]
  argv = ["p", "--config=rrdb_df2k_x4", "--config.seed=5"]
  fv = flags.FlagValues()  # as diffssr_jax.main defines it (the override flags are named from argv)
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
  fv(configs.resolve_argv(argv))
  assert fv.config.task == "rrdb" and fv.config.seed == 5


def test_load_by_name_file_or_default_and_one_line_refusals(tmp_path):
  """configs.load (benchmark and convert): a packaged name, a file, the default; a missing file, a bucket path
  and a module without get_config() are one-line UserErrors naming the --config value."""
  from diffssr_jax.errors import UserError
  assert configs.load("demo").train.num_steps == importlib.import_module("diffssr_jax.configs.demo").get_config().train.num_steps
  assert configs.load(None, default="diffssr_df2k_x2").model.scale == 2
  own = tmp_path / "mine.py"
  own.write_text("from diffssr_jax.configs import base\n\ndef get_config():\n  c = base.get_config()\n  c.seed = 7\n"
                 "  return c\n")
  assert configs.load(str(own)).seed == 7
  (tmp_path / "empty.py").write_text("X = 1\n")
  for spec, says in [("nope", "no such file, and not a packaged config"), ("gs://b/c.py", "local file only"),
                     (str(tmp_path / "empty.py"), "has no get_config()")]:
    with pytest.raises(UserError, match=f"--config {spec}: .*{says}") as e:
      configs.load(spec)
    assert "\n" not in str(e.value)
