"""The distilled student (issue 22): its parameterisation and 1-step closed form, the distillation step
lowering the student's loss with teacher and RRDB frozen, the task's refusals of a bad teacher, and a student
workdir trained by the task restoring and sampling through upscale."""
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffssr_jax import images, parallel
from diffssr_jax.diffusion import process, sampling, student
from diffssr_jax.training import distill
from test_inference import tiny_model

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_student_timesteps_and_v_round_trip():
  assert student.timesteps(100, 1).tolist() == [99]
  assert student.timesteps(100, 2).tolist() == [99, 50]
  assert student.timesteps(100, 4).tolist() == [99, 74, 50, 25]
  with pytest.raises(ValueError, match="1 to 10"):
    student.timesteps(10, 11)
  _, model, _ = tiny_model()
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.uniform(-1, 1, (3, 8, 8, 3)), jnp.float32)
  eps = jnp.asarray(rng.normal(size=(3, 8, 8, 3)), jnp.float32)
  t = jnp.array([0, 4, 9])
  x_t = process.q_sample(model.schedule, x0, t, eps)
  v = student.v_from_x0(model.schedule, x0, t, eps)
  np.testing.assert_allclose(student.x0_from_v(model.schedule, x_t, t, v), x0, atol=1e-5)


def test_one_step_student_sample_is_the_closed_form():
  _, model, params = tiny_model()
  rng = np.random.default_rng(1)
  lr = jnp.asarray(rng.uniform(-1, 1, (2, 4, 4, 3)), jnp.float32)
  lr_up = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  key = jax.random.key(3)
  sr, _ = sampling.make_sampler(model, sampler="student", steps=1)(params, lr, lr_up, key)
  # Closed form: x_T from the first half of the key, x0 = clip(sqrt(abar) x_T - sqrt(1 - abar) v) at T-1.
  x_T = jax.random.normal(jax.random.split(key)[0], lr_up.shape, jnp.float32)

  @jax.jit
  def network_v(params, lr, x_T):
    _, feats = model.encode(params["rrdb"], lr)
    t = jnp.full((x_T.shape[0],), model.num_timesteps - 1)
    return model.predict_noise(params["unet"], x_T, t, model.condition(params["unet"], feats))

  v = np.asarray(network_v(params, lr, x_T))
  abar = model.schedule.alphas_cumprod[-1]
  want = np.clip(np.sqrt(abar) * np.asarray(x_T) - np.sqrt(1 - abar) * v, -1, 1) / 2 + np.asarray(lr_up)
  np.testing.assert_allclose(np.asarray(sr), want, atol=2e-5)


def _batch(seed=0, n=4):
  rng = np.random.default_rng(seed)
  lr = rng.uniform(-1, 1, (n, 2, 2, 3)).astype(np.float32)
  lr_up = np.repeat(np.repeat(lr, 4, 1), 4, 2)
  hr = np.clip(lr_up + 0.2 * rng.normal(size=lr_up.shape), -1, 1).astype(np.float32)
  return {"lr": lr, "lr_up": lr_up, "hr": hr}


def test_distillation_lowers_the_students_loss_with_teacher_and_rrdb_frozen():
  """Six sharded distillation steps on one batch and one draw of (t, eps) (the step counter is held at 0, so
  every step draws the same noise): the loss of that draw falls, the frozen teacher and RRDB do not move."""
  cfg, model, params = tiny_model()
  cfg = cfg.copy_and_resolve_references()
  cfg.optim.ema_decay = 0.0
  mesh = parallel.make_mesh()
  tx = optax.adam(3e-3)
  # Replicated over the mesh as `train.fit` does, so every call has the layout of the step's outputs (one compile).
  state = parallel.replicate(distill.init_state(cfg, params, tx), mesh)
  step_zero = lambda: jax.device_put(jnp.zeros((), jnp.int32), parallel.replicated(mesh))  # noqa: E731 (donated)
  step = distill.make_distill_step(model, tx, mesh, skip=3)
  batch = _batch()
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0)  # the step's key at step 0
  loss = jax.jit(lambda p, f: distill.distill_loss(model, p, f, batch, key, jnp.arange(4), skip=3)[0])
  frozen = jax.device_get(state.frozen)
  before = float(loss(state.params, state.frozen))
  sharded = parallel.shard_batch(batch, mesh)
  for _ in range(6):
    state, metrics = step(state.replace(step=step_zero()), sharded)
  after = float(loss(state.params, state.frozen))
  assert np.isfinite(float(metrics["loss"]))
  assert after < 0.8 * before, (before, after)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.frozen), frozen)
  jax.tree.map(np.testing.assert_array_equal, frozen["teacher"], jax.device_get(params["unet"]))


def test_distillation_loss_is_the_students_v_error_at_every_noise_level():
  """The loss is d(v_student - v_goal), v_goal the v that would give the target: the same weight for an error
  of the network's output at every t. The unweighted x0 error it replaced is (1 - abar_t) times this (L2),
  36x less at t = 9 than at t = 99 of the paper's schedule, and the demo student, trained on it, lost its
  denoising at t <= 74: 21.6 dB at 2 and 4 steps, whatever the teacher (README)."""
  _, model, params = tiny_model()
  sp = jax.tree.map(lambda a: a * 1.01, params["unet"])  # a student that is not its teacher
  frozen = {"rrdb": params["rrdb"], "teacher": params["unet"]}
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  eps = jax.random.normal(jax.random.key(5), batch["hr"].shape)
  _, feats = model.encode(params["rrdb"], batch["lr"])
  cond = model.condition(sp, feats)
  x0 = model.img2res(batch["hr"], batch["lr_up"])
  for t_value in (0, 2, model.num_timesteps - 1):  # the boundary (t - skip < 0) and a consistency link
    t = jnp.full((4,), t_value)
    x_t = process.q_sample(model.schedule, x0, t, eps)
    y, teacher_x0, t_prev = distill.teacher_solver_step(model, params["unet"], feats, x_t, t, 3)
    goal = distill.consistency_target(model, sp, cond, y, t_prev, teacher_x0)
    abar = model.schedule.alphas_cumprod[t_value]
    v_goal = (np.sqrt(abar) * x_t - goal) / np.sqrt(1 - abar)
    v_err = np.asarray(model.predict_noise(sp, x_t, t, cond) - v_goal)
    for loss_type, want in (("l2", np.mean(v_err ** 2)), ("l1", np.mean(np.abs(v_err)))):
      got, _ = distill.loss_given_noise(model, {"unet": sp}, frozen, batch, t, eps, skip=3, loss_type=loss_type)
      np.testing.assert_allclose(float(got), want, rtol=2e-4, err_msg=f"{loss_type} at t = {t_value}")


def _teacher_workdir(work, step=1):
  from diffssr_jax.training import checkpointing
  from diffssr_jax.training import workdir as workdir_lib
  sys.path.insert(0, str(ROOT / "tests" / "configs"))
  import tiny_train
  cfg = tiny_train.get_config()
  _, model, params = tiny_model()
  workdir_lib.save_config(cfg, work)
  if step is not None:
    ckpt = checkpointing.Checkpointer(work, use_async=False)
    ckpt.save(step, {"params": params})
    ckpt.wait()
    ckpt.close()
  return cfg


def _student_config(teacher, shards):
  import tiny_train
  c = tiny_train.get_config()
  c.task = "distill"
  c.distill.teacher_workdir, c.distill.skip = str(teacher), 3
  c.data.train_files = str(shards / "shards")
  c.rrdb_pretrain.num_steps = 0
  c.train.num_steps = 2
  c.eval.sampler, c.eval.steps = "student", 2
  return c


def test_bad_teachers_are_refused_in_one_line_before_any_work(tmp_path, shards):
  from diffssr_jax.configs import base
  from diffssr_jax.training import config_check, train
  cfg = base.get_config()
  cfg.task = "distill"
  assert any(p.startswith("distill.teacher_workdir='': is required for task distill") for p in config_check.problems(cfg))
  cfg.task, cfg.eval.sampler = "diffusion", "student"
  assert any(p.startswith("eval.sampler='student': student samples a distilled") for p in config_check.problems(cfg))
  _teacher_workdir(tmp_path / "untrained", step=None)
  cfg = _student_config(tmp_path / "untrained", shards)
  out = tmp_path / "student"
  with pytest.raises(distill.TeacherError, match="no checkpoint .an untrained teacher"):
    train.train_and_evaluate(cfg, out)
  cfg.distill.teacher_workdir = str(tmp_path / "missing")
  with pytest.raises(distill.TeacherError, match="missing: no such folder"):
    train.train_and_evaluate(cfg, out)
  _teacher_workdir(tmp_path / "teacher")
  cfg = _student_config(tmp_path / "teacher", shards)
  cfg.model.unet_dim = 16
  with pytest.raises(distill.TeacherError, match="model.unet_dim=8 there, 16 here"):
    train.train_and_evaluate(cfg, out)
  assert not out.exists()
  # A teacher trained before a model key existed (its config.json lacks model.cond_sam) is the same model
  # as a student at that key's default, and another one when the student sets it.
  saved = json.loads((tmp_path / "teacher" / "config.json").read_text())
  del saved["model"]["cond_sam"]
  (tmp_path / "teacher" / "config.json").write_text(json.dumps(saved))
  cfg = _student_config(tmp_path / "teacher", shards)
  distill.check_teacher(cfg)
  cfg.model.cond_sam = True
  with pytest.raises(distill.TeacherError, match="model.cond_sam='<absent>' there, True here"):
    distill.check_teacher(cfg)


@pytest.mark.slow
def test_student_trains_resumes_and_samples_through_the_clis(tmp_path, shards, capsys):
  from diffssr_jax.evaluation import evaluate
  from diffssr_jax.inference import upscale
  from diffssr_jax.training import checkpointing, train
  _teacher_workdir(tmp_path / "teacher")
  cfg = _student_config(tmp_path / "teacher", shards)
  work = tmp_path / "student"
  train.train_and_evaluate(cfg, work)
  assert checkpointing.restore_from_workdir(work, None).step == 2
  cfg.train.num_steps = 4
  state = train.train_and_evaluate(cfg, work, allow_config_change=True)  # resumes at 2
  assert int(state.step) == 4
  assert json.loads((work / "config.json").read_text())["task"] == "distill"
  src = tmp_path / "in"
  images.save_png(src / "a.png", np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8))
  assert upscale.cli(["upscale", str(src), "--output", str(tmp_path / "out"), "--workdir", str(work),
                      "--sampler", "student", "--steps", "2", "--noprogress"]) == 0
  out = tmp_path / "out" / "a.png"
  assert images.read_rgb8(out, warn=False).shape == (32, 32, 3)
  assert "student, 2 steps" in images.png_text(out)["diffssr:sampler"]
  # The student's output is v, the teacher's eps: each refuses the other's sampler.
  assert upscale.cli(["upscale", str(src), "--output", str(tmp_path / "o2"), "--workdir", str(work),
                      "--sampler", "ddpm", "--noprogress"]) == 1
  assert upscale.cli(["upscale", str(src), "--output", str(tmp_path / "o3"), "--workdir", str(tmp_path / "teacher"),
                      "--sampler", "student", "--noprogress"]) == 1
  # evaluate: PSNR/SSIM of the 1-step student on the held-out photo, the sampler recorded with the results.
  assert evaluate.cli(["evaluate", "--workdir", str(work), "--datasets", f"V={shards / 'val'}", "--sampler", "student",
                       "--steps", "1", "--crop_border", "0", "--noprogress"]) == 0
  run = json.loads((work / "eval" / "V" / "4" / "run.json").read_text())
  assert run["sampler"] == "student" and run["steps"] == 1
  # benchmark: the student's reverse step and whole run (one compiled scan of 2 steps).
  from diffssr_jax.benchmarks import model as benchmark
  capsys.readouterr()
  r = benchmark.main(["sample", "--config", str(ROOT / "tests/configs/tiny_train.py"), "--size", "16", "--sampler",
                      "student", "--steps", "2", "--repeats", "1", "--runs", "1", "--compilation_cache", ""])
  assert r["sampler"] == "student" and r["steps"] == 2 and r["seconds_per_image"] > 0
  assert r["gflops_per_image"] > 2 * r["gflops_per_step"]
