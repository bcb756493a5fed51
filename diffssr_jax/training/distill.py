"""The distillation task (`config.task = "distill"`): a few-step student trained from a trained workdir's
teacher, with the training machinery (`train.fit`: the shard_map step, checkpoints, resume, workdir
protection, validation).

Method: consistency distillation (Song et al. 2023, CD) on the teacher's own discrete schedule, with the
target network of improved consistency training (Song & Dhariwal 2023: the target is the student itself
under stop-gradient, no EMA copy), and a v-parameterised student (diffusion/student.py). Why this and not
progressive distillation (Salimans & Ho 2022), which google-research `diffusion_distillation` implements:

  * PD halves the step count per round, each round a training run of its own whose student only samples at
    that round's step count; 1, 2 and 4 steps would be three students after ~6 rounds (from a 64-step grid:
    the teacher's T = 100 is no power of two). CD trains one student that samples at any step count
    (consistency sampling), which is what `--sampler student --steps 1|2|4` asks for, in one run with one
    checkpoint layout, so resume, validation and the CLIs are those of training.
  * The teacher's schedule is discrete (T = 100, cosine), which CD takes as is: the ODE solver is the
    teacher's deterministic DDIM step from t to t - `distill.skip` (the skipping-step of latent consistency
    models, so the consistency target propagates over T / skip points instead of T); the boundary
    condition is exact: a step that reaches t < 0 lands on the teacher's clipped x0 estimate, which is the
    target there.

The loss for example (x0, LR), t ~ U{0..T-1}, eps ~ N(0, I) (one line per pure function below):

    x_t  = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps                         (q_sample)
    y    = DDIM_teacher(x_t, t -> t - k)  (eta 0, teacher's x0 clipped)    (process.ddim_step)
    goal = clip(f_sg(y, t - k))  if t - k >= 0  else  teacher's x0 estimate
    loss = d((f_theta(x_t, t) - sg(goal)) / sqrt(1 - abar_t)),   d = L2 (or L1)

The division puts the error in the student's own output units: f = sqrt(abar_t) x_t - sqrt(1 - abar_t) v,
so an x0 error is sqrt(1 - abar_t) times the v error that caused it, and d on it is Salimans & Ho's "SNR+1"
weighting (the loss of a v-parameterised model). Measured without it (README, "A 1-4 step student"): the
unweighted x0 error weights t = 9 36x and t = 25 6x less than t = 99, and the small U-Net gave up the low
noise levels for the high ones: f drifted from the teacher's denoiser (its init) towards f(x_t, t) ~ x_t at
t <= 74, so every sampler that re-noises (2 and 4 steps) returned noisy images, 21.6 dB, whatever the teacher.

What a converged student reproduces: the fixed point of this target is the teacher's deterministic (eta 0)
ODE, not its ancestral DDPM sampler: f(x_t, t) becomes the end of the teacher's DDIM chain t, t - k, ..., so
a perfect 1-step student is the teacher's eta-0 DDIM run and a K-step one re-noises between such ODE maps.
At convergence the student is therefore bounded by the teacher's eta-0 sampler; measure that first
(tools/measure_student.py, its DDIM eta 0 row). On the demo teacher (540 steps) that sampler is 4.7 dB below
DDPM-100, on the same teacher trained 10x longer 0.21 dB (README, "A 1-4 step student").

Structure modulation: the student distils the teacher's reverse process, which SAM-DiffSR's SPE-modulated
noise target shaped (that training is how the teacher learnt to put structure into its eps), and which
itself needs no SPE map (eq. 15). So the distillation inputs are the states the sampler meets, drawn without
E: the reverse process starts from pure noise and its steps (teacher DDIM, student re-noising) never add E.
Adding E to x_t here would train the student on inputs it never sees when sampling. (In the official
`reference` mode the E term in x_t is also tiny: (1 - abar_t) beta_t E.)

The teacher's U-Net and the RRDB encoder are frozen (`TrainState.frozen`: {"rrdb", "teacher"}); the student
U-Net starts from the teacher's weights. Inference reads the student's {"unet", "rrdb"} like any workdir's
(checkpointing leaves "teacher" out), and refuses to sample a student with another sampler or a teacher with
the student sampler (its output is v, not eps).
"""
from __future__ import annotations

import functools
import json
import logging

import jax
import jax.numpy as jnp
import ml_collections

from diffssr_jax import run_settings, storage
from diffssr_jax.diffusion import process, sampling, student
from diffssr_jax.diffusion.model import build_model
from diffssr_jax.training import train_step

log = logging.getLogger(__name__)

# Settings the student must share with its teacher (the networks, schedule and inputs it reproduces).
SHARED_PREFIXES = ("model.", "diffusion.")
SHARED_KEYS = ("data.lr_up_divisor",)


class TeacherError(ValueError):
  """The teacher workdir is missing, untrained or of another model."""


def problems(checker) -> None:
  """config_check's checks of the distill section (task distill only; its defaults: configs/base.py)."""
  if checker.string("distill.teacher_workdir") and not checker.get("distill.teacher_workdir"):
    checker.bad("distill.teacher_workdir", "is required for task distill (a trained diffusion workdir)")
  checker.int_("distill.teacher_step", 0)
  checker.bool_("distill.teacher_use_ema")
  checker.int_("distill.skip", 1)
  checker.choice("distill.loss", ("l1", "l2"))
  if checker.has("eval.sampler") and checker.get("eval.sampler") != "student":
    checker.bad("eval.sampler", "must be student for task distill (the student's output is v, not eps)")


# ----------------------------------------------------------------------------- the teacher
def _shared(flat: dict) -> dict:
  from diffssr_jax.training import workdir as workdir_lib
  return {k: v for k, v in flat.items() if (k.startswith(SHARED_PREFIXES) or k in SHARED_KEYS)
          and k not in workdir_lib.SAFE_KEYS}


def check_teacher(config) -> None:
  """Raises TeacherError (one line) unless distill.teacher_workdir is a trained diffusion workdir of the same
  model and schedule as `config`: reads its config.json and checkpoint folder names only (no weights)."""
  from diffssr_jax.training import workdir as workdir_lib
  d = config.distill
  where = storage.native(d.teacher_workdir)
  if not where.is_dir():
    raise TeacherError(f"distill.teacher_workdir {where}: no such folder (a trained diffusion workdir)")
  path = where / "config.json"
  if not path.is_file():
    raise TeacherError(f"distill.teacher_workdir {where}: no config.json (is it a training workdir?)")
  try:
    saved = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise TeacherError(f"{path}: not valid JSON ({e})") from None
  if saved.get("task", "diffusion") != "diffusion":
    raise TeacherError(f"distill.teacher_workdir {where}: a {saved.get('task')!r} workdir; the teacher is a "
                       "trained diffusion workdir")
  ckpts = where / "checkpoints"
  steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.is_dir() else []
  if not steps:
    raise TeacherError(f"distill.teacher_workdir {where}: no checkpoint (an untrained teacher); train it first")
  if d.teacher_step and d.teacher_step not in steps:
    raise TeacherError(f"distill.teacher_step {d.teacher_step}: not saved in {where} (saved steps: {steps})")
  theirs = _shared(workdir_lib.flatten(saved))
  ours = _shared(workdir_lib.flatten(json.loads(config.to_json())))
  absent = run_settings.ABSENT
  diff = {k: (theirs.get(k, absent), ours.get(k, absent)) for k in sorted(set(theirs) | set(ours))
          if theirs.get(k, absent) != ours.get(k, absent)
          and not workdir_lib.added_since(k, theirs.get(k, absent), ours.get(k, absent))}  # a newer key at its default
  if diff:
    detail = ", ".join(f"{k}={a!r} there, {b!r} here" for k, (a, b) in diff.items())
    raise TeacherError(f"distill.teacher_workdir {where}: the student has its teacher's model and schedule, "
                       f"but {detail}")


def load_teacher(config) -> tuple[dict, int]:
  """(teacher params {"unet", "rrdb"}, its step), after `check_teacher`."""
  from diffssr_jax.inference.loading import load_workdir_params
  check_teacher(config)
  d = config.distill
  params, step = load_workdir_params(d.teacher_workdir, step=d.teacher_step or None,
                                     use_ema=d.teacher_use_ema)
  if "unet" not in params or "rrdb" not in params:
    raise TeacherError(f"distill.teacher_workdir {d.teacher_workdir}: step {step} holds {sorted(params)}, not a "
                       "U-Net and an RRDB")
  log.info("distilling the teacher %s, step %d", d.teacher_workdir, step)
  return params, step


# ----------------------------------------------------------------------------- the objective
def teacher_solver_step(model, teacher_vars, feats, x_t, t, skip: int):
  """(y, teacher's clipped x0, t_prev): the teacher's deterministic DDIM step (eta 0) from t to
  t_prev = t - skip, or to x0 (t_prev = -1) when that is below 0 (Song et al. 2021 eq. 12)."""
  t_prev = jnp.where(t - skip >= 0, t - skip, -1)
  eps = model.predict_noise(teacher_vars, x_t, t, model.condition(teacher_vars, feats))
  y, x0 = process.ddim_step(model.schedule, x_t, t, t_prev, eps, jnp.zeros_like(x_t), eta=0.0, clip_denoised=True)
  return y, x0, t_prev


def consistency_target(model, student_vars, cond, y, t_prev, teacher_x0):
  """clip(f(y, t_prev)) where t_prev >= 0, else the teacher's x0 (the boundary condition), under
  stop-gradient (iCT's target network: the student itself)."""
  student_vars, cond = jax.lax.stop_gradient((student_vars, cond))
  nxt = jnp.clip(student.consistency_fn(model, student_vars, cond, y, jnp.maximum(t_prev, 0)), -1.0, 1.0)
  on_boundary = (t_prev < 0).reshape((-1,) + (1,) * (y.ndim - 1))
  return jax.lax.stop_gradient(jnp.where(on_boundary, teacher_x0, nxt))


def loss_given_noise(model, params, frozen, batch, t, eps, *, skip: int, loss_type: str = "l2"):
  """The distillation loss for given timesteps and noise (module docstring). Returns (loss, metrics)."""
  _, feats = model.encode(frozen["rrdb"], batch["lr"], decode=False)
  feats = jax.lax.stop_gradient(feats)
  x0 = model.img2res(batch["hr"], batch["lr_up"])
  x_t = process.q_sample(model.schedule, x0, t, eps)  # no E: the states the sampler meets (module docstring)
  y, teacher_x0, t_prev = teacher_solver_step(model, jax.lax.stop_gradient(frozen["teacher"]), feats, x_t, t, skip)
  cond = model.condition(params["unet"], feats)
  goal = consistency_target(model, params["unet"], cond, y, t_prev, teacher_x0)
  err = student.consistency_fn(model, params["unet"], cond, x_t, t) - goal
  loss = train_step.mean_error(err / process.extract(model.schedule.sqrt_one_minus_alphas_cumprod, t, err), loss_type)
  return loss, {"loss": loss}


def distill_loss(model, params, frozen, batch, key, example_ids, **kw):
  """`loss_given_noise` with t ~ U{0..T-1} and eps ~ N(0, I) per example, drawn as the diffusion loss draws."""
  t, eps = train_step.per_example_noise(key, example_ids, batch["hr"].shape[1:], model.num_timesteps)
  return loss_given_noise(model, params, frozen, batch, t, eps, **kw)


def make_distill_step(model, tx, mesh, *, skip: int, loss_type: str = "l2", ema_decay: float = 0.0,
                      grad_accum_steps: int = 1, state_layouts: str = "auto"):
  """The distillation train step: `train_step.make_step` (jit(shard_map)) on `distill_loss`."""
  loss_fn = functools.partial(distill_loss, model, skip=skip, loss_type=loss_type)
  return train_step.make_step(loss_fn, tx, mesh, ema_decay=ema_decay, grad_accum_steps=grad_accum_steps,
                              state_layouts=state_layouts)


def init_state(config, teacher_params: dict, tx) -> train_step.TrainState:
  """The student U-Net initialised from the teacher's; RRDB and teacher U-Net frozen."""
  # Copies: the train step donates the state's buffers, which must not be the caller's arrays.
  copy = lambda tree: jax.tree.map(lambda a: jnp.array(a, copy=True), tree)  # noqa: E731
  return train_step.init_train_state({"unet": copy(teacher_params["unet"])},
                                     {"rrdb": copy(teacher_params["rrdb"]), "teacher": copy(teacher_params["unet"])},
                                     tx, seed=config.seed, use_ema=config.optim.ema_decay > 0)


def distill_task(config, teacher_params: dict, mesh):
  """The `train.Task` of the distillation on `mesh`: step, schedule and validation with the student sampler."""
  from diffssr_jax.training import train
  model = build_model(config)
  total = config.train.num_steps
  tx = train_step.make_optimizer(config.optim, total)
  state = init_state(config, teacher_params, tx)
  step_fn = make_distill_step(model, tx, mesh, skip=config.distill.skip, loss_type=config.distill.loss,
                              ema_decay=config.optim.ema_decay, grad_accum_steps=config.optim.grad_accum_steps,
                              state_layouts=config.train.state_layouts)
  fn = sampling.make_image_sampler(model, sampler="student", steps=config.eval.steps or 1, mesh=mesh)
  key = jax.random.key(config.seed + 1)
  # Validation samples with {"unet": student, "rrdb"}: the frozen teacher is left out of the sampler's params.
  model_fn = lambda p: train._wrap(  # noqa: E731
      train._sharded_model_fn(fn, mesh, {"unet": p["unet"], "rrdb": p["rrdb"]}, key),
      lambda out: {"diffusion": out[0], "rrdb": out[1]})
  return train.Task("distill", state, step_fn, train_step.learning_rate_schedule(config.optim, total), model_fn,
                    lambda out: {"psnr_y": out["diffusion"]["psnr_y"], "ssim_y": out["diffusion"]["ssim_y"],
                                 "rrdb_psnr_y": out["rrdb"]["psnr_y"], "bicubic_psnr_y": out["bicubic"]["psnr_y"]})


def run(config, workdir, mesh):
  """Distils config.distill.teacher_workdir's teacher into a student in `workdir` on `mesh` (resuming);
  returns the state."""
  from diffssr_jax.training import train
  teacher_params, _ = load_teacher(config)
  state, summary = train.fit(config, workdir, distill_task(config, teacher_params, mesh), mesh)
  if summary and train.is_main_process():
    train.write_summary(workdir, summary, int(jax.device_get(state.step)), config)
  return state
