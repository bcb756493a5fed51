"""diffssr-convert: official .ckpt <-> workdir, the model's size read from the shapes, fine-tuning a converted run."""
import logging

import jax
import numpy as np
import pytest
import torch

import reference_data as rd
from diffssr_jax import parallel
from diffssr_jax.diffusion.model import build_model
from diffssr_jax import convert_cli
from diffssr_jax.models import convert, official
from diffssr_jax.inference import loading
from diffssr_jax.training import checkpointing, train, train_step
from diffssr_jax.training import workdir as workdir_lib
from helpers import reference_state_dict, tiny_config


def _official_sd(cfg, seed=0):
  """A random official-layout state dict of `cfg`'s model (with the schedule buffers)."""
  params = jax.tree.map(np.asarray, build_model(cfg).init(jax.random.key(seed)))
  return official.to_official(params, cfg)


def _save_ckpt(path, sd, step=1234):
  torch.save({"global_step": step, "state_dict": {"model": {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}}},
             path)
  return path


def _convert(capsys, *args):
  code = convert_cli.cli(["diffssr-convert", *map(str, args)])
  return code, capsys.readouterr().err


def _round_trip(tmp_path, capsys, sd, step):
  src = _save_ckpt(tmp_path / "in.ckpt", sd, step)
  assert _convert(capsys, "--input", src, "--output", tmp_path / "wd")[0] == 0
  assert _convert(capsys, "--input", tmp_path / "wd", "--output", tmp_path / "out.ckpt")[0] == 0
  saved = torch.load(tmp_path / "out.ckpt", weights_only=True)
  assert saved["global_step"] == step
  return {k: v.numpy() for k, v in saved["state_dict"]["model"].items()}


def test_tiny_checkpoint_round_trips_and_loads_for_inference(tmp_path, capsys):
  cfg = tiny_config()
  sd = _official_sd(cfg)
  back = _round_trip(tmp_path, capsys, sd, 1234)
  assert set(back) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  # The workdir rebuilds the tiny model (not configs/base.py) for evaluation, as the .ckpt does directly.
  c_wd, _, p_wd, step = loading.load_for_inference(workdir=tmp_path / "wd")
  c_ck, _, p_ck, _ = loading.load_for_inference(checkpoint=tmp_path / "in.ckpt")
  assert step == 1234 and c_wd.model.unet_dim == c_ck.model.unet_dim == 8
  assert tuple(c_wd.model.unet_dim_mults) == (1, 2) and c_wd.diffusion.timesteps == 10
  jax.tree.map(np.testing.assert_array_equal, p_wd, p_ck)


@rd.reference
def test_reference_weights_round_trip_exactly(tmp_path, capsys):
  ref = rd.load()
  if ref is None or "sdq/denoise_fn.cond_proj.weight" not in ref:
    pytest.skip("no reference weights")
  sd = reference_state_dict(ref)
  back = _round_trip(tmp_path, capsys, sd, 400_000)
  assert set(back) == set(sd)
  for k, v in sd.items():
    if k in convert._SCHEDULE_BUFFERS:  # recomputed from the config: the official float32 values
      np.testing.assert_allclose(back[k], v, rtol=1e-6, err_msg=k)
    else:
      np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_config_from_shapes_x2_and_other_widths():
  cfg = tiny_config()
  cfg.model.scale = 2
  cfg.model.unet_dim, cfg.model.unet_dim_mults = 4, (1, 3, 2)
  cfg.model.rrdb_num_blocks, cfg.model.rrdb_growth = 5, 6
  sd = _official_sd(cfg)
  assert sd["rrdb.upconv2.weight"].shape == (8, 8, 3, 3)  # the official RRDB's layer, present at x2 too
  assert official.config_from_state_dict(sd) == {
      "model.scale": 2, "model.unet_dim": 4, "model.unet_dim_mults": (1, 3, 2), "model.rrdb_num_feat": 8,
      "model.rrdb_num_blocks": 5, "model.rrdb_growth": 6, "diffusion.timesteps": 10, "model.cond_sam": False}
  overrides, params = official.from_official(sd)
  built = official.apply_overrides(tiny_config(), overrides)
  convert.check_against(params, build_model(built).param_shapes())  # upconv2 dropped: fits our x2 RRDB
  # x8: a third upsampling conv and an 16x16 cond_proj kernel.
  cfg.model.scale = 8
  assert official.config_from_state_dict(_official_sd(cfg))["model.scale"] == 8
  # A bare RRDB state dict (the official RRDB pre-training).
  bare = {k[len("rrdb."):]: v for k, v in _official_sd(tiny_config()).items() if k.startswith("rrdb.")}
  assert official.config_from_state_dict(bare) == {"model.scale": 4, "model.rrdb_num_feat": 8,
                                                   "model.rrdb_num_blocks": 2, "model.rrdb_growth": 4}


def test_wrong_or_truncated_checkpoint_is_one_line_naming_the_key(tmp_path, capsys):
  sd = _official_sd(tiny_config())
  bad = dict(sd)
  bad["denoise_fn.downs.1.0.block2.block.1.weight"] = np.zeros((16, 15, 3, 3), np.float32)
  code, err = _convert(capsys, "--input", _save_ckpt(tmp_path / "bad.ckpt", bad), "--output", tmp_path / "w1")
  assert code == 1 and len(err.strip().splitlines()) == 1
  assert "denoise_fn.downs.1.0.block2.block.1.weight" in err and "(16, 15, 3, 3)" in err
  missing = {k: v for k, v in sd.items() if k != "rrdb.RRDB_trunk.1.RDB2.conv3.bias"}
  code, err = _convert(capsys, "--input", _save_ckpt(tmp_path / "missing.ckpt", missing), "--output", tmp_path / "w2")
  assert code == 1 and len(err.strip().splitlines()) == 1 and "no rrdb.RRDB_trunk.1.RDB2.conv3.bias" in err
  block = dict(sd)
  block["rrdb.RRDB_trunk.1.RDB1.conv2.weight"] = np.zeros((4, 11, 3, 3), np.float32)
  code, err = _convert(capsys, "--input", _save_ckpt(tmp_path / "block.ckpt", block), "--output", tmp_path / "w5")
  assert code == 1 and len(err.strip().splitlines()) == 1
  assert "rrdb.RRDB_trunk.1.RDB1.conv2.weight: shape (4, 11, 3, 3), but rrdb.RRDB_trunk.0.RDB1.conv2.weight" in err
  wrong_cond = dict(sd)
  wrong_cond["denoise_fn.cond_proj.weight"] = np.zeros((24, 8, 8, 8), np.float32)
  code, err = _convert(capsys, "--input", _save_ckpt(tmp_path / "c.ckpt", wrong_cond), "--output", tmp_path / "w3")
  assert code == 1 and "denoise_fn.cond_proj.weight takes 24 channels" in err
  full = (tmp_path / "bad.ckpt").read_bytes()
  (tmp_path / "truncated.ckpt").write_bytes(full[: len(full) // 2])
  code, err = _convert(capsys, "--input", tmp_path / "truncated.ckpt", "--output", tmp_path / "w4")
  assert code == 1 and len(err.strip().splitlines()) == 1 and "truncated.ckpt" in err
  assert not any((tmp_path / f"w{i}").exists() and any((tmp_path / f"w{i}").iterdir()) for i in range(1, 6))


def test_existing_outputs_are_never_overwritten(tmp_path, capsys):
  src = _save_ckpt(tmp_path / "in.ckpt", _official_sd(tiny_config()))
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "mine.txt").write_text("keep")
  code, err = _convert(capsys, "--input", src, "--output", tmp_path / "busy")
  assert code == 1 and "refusing" in err and sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["mine.txt"]
  assert _convert(capsys, "--input", src, "--output", tmp_path / "wd")[0] == 0
  (tmp_path / "taken.ckpt").write_bytes(b"mine")
  code, err = _convert(capsys, "--input", tmp_path / "wd", "--output", tmp_path / "taken.ckpt")
  assert code == 1 and "refusing" in err and (tmp_path / "taken.ckpt").read_bytes() == b"mine"


def test_training_resumes_from_converted_weights_with_fresh_optimizer(tmp_path, capsys, caplog):
  cfg = tiny_config()
  cfg.optim.ema_decay = 0.9
  sd = _official_sd(cfg, seed=3)
  assert _convert(capsys, "--input", _save_ckpt(tmp_path / "in.ckpt", sd, 50), "--output", tmp_path / "wd")[0] == 0
  model = build_model(cfg)
  tx = train_step.make_optimizer(cfg.optim, 100)
  fresh = train_step.create_train_state(model, model.init(jax.random.key(0)), tx, seed=0, use_ema=True)
  mesh = parallel.make_mesh(jax.devices()[:1])
  with caplog.at_level(logging.INFO):
    state, restored, ckpt = train._restore_or_start(fresh, cfg, tmp_path / "wd", mesh)
  try:
    assert "fresh optimizer state" in caplog.text and restored.data_state is None and int(state.step) == 50
    want = official.from_official(sd)[1]
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.model_params()), want)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.ema_params), {"unet": want["unet"]})
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.opt_state),
                 jax.tree.map(np.asarray, fresh.opt_state))
    ckpt.save(51, state.replace(step=state.step + 1))  # the next save is a full train state, restored the normal way afterwards
    ckpt.wait()
  finally:
    ckpt.close()
  state2, _, ckpt2 = train._restore_or_start(fresh, cfg, tmp_path / "wd", mesh)
  ckpt2.close()
  assert int(state2.step) == 51
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state2.params),
               jax.tree.map(np.asarray, state.params))


def test_rrdb_workdir_exports_the_official_rrdb_layout(tmp_path, capsys):
  """An RRDB pre-training workdir -> the bare RRDBNet keys of the official `rrdb_ckpt` files, which load back."""
  cfg = tiny_config()
  rrdb = jax.tree.map(np.asarray, build_model(cfg).init(jax.random.key(1))["rrdb"])
  workdir_lib.save_config(cfg, tmp_path / "rrdb")
  ckpt = checkpointing.Checkpointer(tmp_path / "rrdb", keep=1, use_async=False)
  ckpt.save(5, {"step": np.asarray(5, np.int32), "params": {"rrdb": rrdb}, "frozen": {}})
  ckpt.close()
  assert _convert(capsys, "--input", tmp_path / "rrdb", "--output", tmp_path / "rrdb.ckpt")[0] == 0
  sd = torch.load(tmp_path / "rrdb.ckpt", weights_only=True)["state_dict"]["model"]
  assert "conv_first.weight" in sd and not any(k.startswith(("rrdb.", "denoise_fn.")) or k == "betas" for k in sd)
  jax.tree.map(np.testing.assert_array_equal, train.load_rrdb_params(tmp_path / "rrdb.ckpt"), rrdb)
