"""Train state, optimizer and the data-parallel train step.

The step is one jit-compiled function: `jax.shard_map` over a 1-D device mesh (axis "data"), with the
batch split across devices, params replicated and gradients averaged with `pmean` (what `jax.pmap`
lowers to in current JAX). It works unchanged across hosts when the batch is a global jax.Array.

Randomness is per example: example i of the global batch at step s draws its timestep and noise from
fold_in(fold_in(key, s), i), so results do not depend on how the batch is split over devices.
"""
from __future__ import annotations

import functools
import weakref
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from diffssr_jax import parallel
from diffssr_jax.diffusion import process
from diffssr_jax.parallel import DATA_AXIS
from diffssr_jax.diffusion.model import SRDiffusion



@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any          # trainable: {"unet": vars} (+ "rrdb" when the encoder is trained)
  frozen: Any          # {"rrdb": vars} when the encoder is frozen, else {}
  opt_state: Any
  ema_params: Any      # EMA of `params` (same structure) or None
  rng: jax.Array       # raw uint32 key data (checkpointable)

  def model_params(self, use_ema: bool = False) -> dict:
    """{"unet": ..., "rrdb": ...} for sampling, optionally with the EMA weights."""
    p = self.ema_params if (use_ema and self.ema_params is not None) else self.params
    return {**self.frozen, **p}


def learning_rate_schedule(optim_cfg, total_steps: int):
  """'step': lr * 0.5 ** floor(step / decay_steps) (the official StepLR); 'cosine': cosine decay to
  lr * min_lr_ratio over total_steps; 'constant'."""
  kind = optim_cfg.schedule
  lr = optim_cfg.lr
  if kind == "step":
    return optax.exponential_decay(lr, optim_cfg.decay_steps, optim_cfg.decay_rate, staircase=True)
  if kind == "cosine":
    return optax.cosine_decay_schedule(lr, max(1, total_steps), alpha=optim_cfg.min_lr_ratio)
  if kind == "constant":
    return optax.constant_schedule(lr)
  raise ValueError(f"unknown optim.schedule {kind!r} (expected step, cosine or constant)")


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  """Adam (torch defaults b1 .9, b2 .999, eps 1e-8) after global-norm clipping, as the official trainer."""
  parts = []
  if optim_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
  parts.append(optax.adam(learning_rate_schedule(optim_cfg, total_steps),
                          b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps))
  return optax.chain(*parts)


def init_train_state(trainable: dict, frozen: dict, tx: optax.GradientTransformation, *, seed: int,
                     use_ema: bool = False) -> TrainState:
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=trainable,
      frozen=frozen,
      opt_state=tx.init(trainable),
      ema_params=jax.tree.map(jnp.copy, trainable) if use_ema else None,
      rng=jax.random.key_data(jax.random.key(seed)),
  )


def create_train_state(model: SRDiffusion, params: dict, tx: optax.GradientTransformation, *, seed: int,
                       train_rrdb: bool = False, use_ema: bool = False) -> TrainState:
  """Diffusion training: the U-Net is trained; the RRDB encoder is frozen unless `train_rrdb`."""
  if train_rrdb:
    trainable, frozen = {"unet": params["unet"], "rrdb": params["rrdb"]}, {}
  else:
    trainable, frozen = {"unet": params["unet"]}, {"rrdb": params["rrdb"]}
  return init_train_state(trainable, frozen, tx, seed=seed, use_ema=use_ema)


def per_example_noise(key, example_ids, shape, num_timesteps):
  """(t, eps) for each example, from fold_in(key, global example index)."""
  def one(i):
    k_t, k_eps = jax.random.split(jax.random.fold_in(key, i))
    return jax.random.randint(k_t, (), 0, num_timesteps), jax.random.normal(k_eps, shape, jnp.float32)
  return jax.vmap(one)(example_ids)


def mean_error(err, loss_type: str):
  """mean |err| ("l1", the official loss) or mean err^2 ("l2", paper eq. 5; consistency distillation's d)."""
  if loss_type == "l1":
    return jnp.mean(jnp.abs(err))
  if loss_type == "l2":
    return jnp.mean(jnp.square(err))
  raise ValueError(f"unknown loss {loss_type!r} (expected l1 or l2)")


def loss_given_noise(model: SRDiffusion, params, frozen, batch, t, eps, *, loss_type="l1", aux_l1_weight=0.0):
  """Noise-prediction loss for a batch with given timesteps and noise: L1 (official) or L2 (paper
  eq. 5) between the U-Net output and the (modulated) target, plus an L1 loss on the RRDB image when
  the encoder is trained. Returns (loss, metrics)."""
  rrdb_vars = params["rrdb"] if "rrdb" in params else frozen["rrdb"]
  train_rrdb = "rrdb" in params
  need_image = train_rrdb and aux_l1_weight > 0
  # The frozen encoder's upsampling tail is skipped: the loss does not use its image.
  rrdb_out, feats = model.encode(rrdb_vars, batch["lr"], decode=need_image)
  if not train_rrdb:
    feats = jax.lax.stop_gradient(feats)
  x0 = model.img2res(batch["hr"], batch["lr_up"])
  spe = batch.get("spe") if model.modulation != "none" else None
  x_t, target = process.forward_and_target(model.schedule, model.modulation, x0, t, eps, spe)
  # SAM+SRDiff (Table 7): the patch's SPE map also enters the U-Net's condition, unscaled (official p_losses).
  cond = model.condition(params["unet"], feats, batch["spe"] if model.needs_spe else None)
  pred = model.predict_noise(params["unet"], x_t, t, cond)
  loss = mean_error(pred - target, loss_type)
  metrics = {"loss_noise": loss}
  if need_image:
    aux = jnp.mean(jnp.abs(rrdb_out - batch["hr"]))
    metrics["loss_rrdb_l1"] = aux
    loss = loss + aux_l1_weight * aux
  metrics["loss"] = loss
  return loss, metrics


def diffusion_loss(model: SRDiffusion, params, frozen, batch, key, example_ids, **kw):
  """`loss_given_noise` with t ~ U{0..T-1} and eps ~ N(0, I) drawn per example from `key`."""
  t, eps = per_example_noise(key, example_ids, batch["hr"].shape[1:], model.num_timesteps)
  return loss_given_noise(model, params, frozen, batch, t, eps, **kw)


def rrdb_l1_loss(rrdb, params, frozen, batch, key, example_ids):
  """RRDB pre-training (the first stage of the official recipe): L1 between its output and the HR."""
  del frozen, key, example_ids
  out, _ = rrdb.apply(params["rrdb"], batch["lr"], decode=True)
  loss = jnp.mean(jnp.abs(out - batch["hr"]))
  return loss, {"loss": loss}


def make_step(loss_fn, tx: optax.GradientTransformation, mesh: Mesh, *, ema_decay: float = 0.0,
              grad_accum_steps: int = 1, state_layouts: str = "auto"):
  """jit(shard_map(step)) : (state, batch) -> (state, metrics) for any
  loss_fn(params, frozen, batch, key, example_ids) -> (loss, metrics); state buffers donated.

  `state_layouts` (config train.state_layouts): "auto" compiles the step with the train state in the
  device layouts XLA picks (`LaidOutStep`), "default" keeps jax's row-major layouts (a plain `jax.jit`).

  `batch` holds global arrays (B, ...) sharded over the mesh's data axis (B divisible by its size).
  With `grad_accum_steps` k > 1 each device's share is split into k micro-batches run one after the
  other in a `lax.scan` whose carry sums their gradients: activation memory is that of B / k
  examples, the update is the one of the whole batch (every example keeps its own noise, drawn from its
  global index). Not `optax.MultiSteps`: that accumulates across calls, so each call would be a
  micro-step with its own all-reduce and an accumulator in the checkpointed optimizer state; here the
  k micro-batches of one update live in one call and the devices all-reduce once.
  """
  k = int(grad_accum_steps)
  if k < 1:
    raise ValueError(f"grad_accum_steps must be >= 1, got {k}")

  def local_grads(params, frozen, batch, key, example_ids):
    # Differentiate w.r.t. a device-varying view of the replicated params so that each device gets
    # its local gradient (without it, shard_map's transpose would already psum them).
    local_params = jax.lax.pcast(params, DATA_AXIS, to="varying")
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if k == 1:
      (_, metrics), grads = grad_fn(local_params, frozen, batch, key, example_ids)
      return grads, metrics
    split = lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:])
    zeros = jax.tree.map(jnp.zeros_like, local_params)

    def micro(acc, xs):
      mb, ids = xs
      (_, m), g = grad_fn(local_params, frozen, mb, key, ids)
      return jax.tree.map(jnp.add, acc, g), m

    grads, metrics = jax.lax.scan(micro, zeros, (jax.tree.map(split, batch), split(example_ids)))
    return jax.tree.map(lambda g: g / k, grads), jax.tree.map(lambda m: jnp.mean(m, 0), metrics)

  def step_fn(state: TrainState, batch):
    local_b = jax.tree.leaves(batch)[0].shape[0]
    if local_b % k:
      raise ValueError(f"the per-device batch {local_b} is not divisible by grad_accum_steps {k}")
    example_ids = jax.lax.axis_index(DATA_AXIS) * local_b + jnp.arange(local_b)
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    grads, metrics = local_grads(state.params, state.frozen, batch, key, example_ids)
    # With equal local batches the mean of per-device means is the global mean.
    grads = jax.lax.pmean(grads, DATA_AXIS)
    metrics = jax.lax.pmean(metrics, DATA_AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
      ema = jax.tree.map(lambda e, p: e * ema_decay + p * (1.0 - ema_decay), ema, params)
    metrics["grad_norm"] = optax.tree.norm(grads)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
    return new_state, metrics

  sharded = jax.shard_map(step_fn, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=(P(), P()))
  if state_layouts == "auto":
    return LaidOutStep(sharded, mesh)
  if state_layouts != "default":
    raise ValueError(f"unknown state_layouts {state_layouts!r} (expected auto or default)")
  return jax.jit(sharded, donate_argnums=(0,))


def _abstract(tree):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def place_state(state, compiled):
  """`state` in the layouts the compiled step takes it in (a no-op where they are already those)."""
  return jax.device_put(state, compiled.input_formats[0][0])


class LaidOutStep:
  """The train step compiled ahead of time with the train state in the device layouts XLA chooses
  (jax's `Layout.AUTO`, in and out: the state stays donated, each output aliasing its input).

  Why: on a GPU, XLA's layout assignment gives the NHWC convolutions OHWI filters, while jax's default
  layout of a Flax kernel (HWIO) is row-major; with the state in that layout every step transposes the
  weights for their bf16 casts, the optimizer's update (the weight gradients come out OHWI) and the
  frozen RRDB's stacked kernels (253 MiB per step for the paper network at any batch; 8 MiB with this, README
  "The weight layouts"). Stock `nn.Conv` has no layout field and a conv's dimension numbers are logical, so
  the state's own layout is the one place to fix it. On the CPU XLA keeps row-major layouts.

  Called like the jitted step. The first call compiles for the state and batch it is given and moves the
  state into the chosen layouts (a copy on the device); the state it returns is already in them, so later
  calls pass straight through. Any other state (a restored one) is moved again. Arrays in these layouts
  are ordinary jax arrays: checkpoints, EMA and validation read them as they read any other (jax relays
  them out where a program or the host wants another layout). `layout(aval)` (tests) gives a concrete
  `Layout` per state array instead of `Layout.AUTO`.
  """

  def __init__(self, fn, mesh: Mesh, layout=None):
    self.fn, self.mesh, self.layout = fn, mesh, layout
    self.compiled = None
    self._last = None  # weak reference to the last state returned: already in the compiled layouts

  def _jit(self, state_formats):
    return jax.jit(self.fn, in_shardings=(state_formats, parallel.batch_sharding(self.mesh)),
                   out_shardings=(state_formats, parallel.replicated(self.mesh)), donate_argnums=(0,))

  def lower(self, state, batch):
    """Lowers for (arrays or ShapeDtypeStructs of) the state and batch."""
    from jax.experimental.layout import Format, Layout
    rep = parallel.replicated(self.mesh)
    formats = jax.tree.map(lambda a: Format(Layout.AUTO if self.layout is None else self.layout(a), rep), state)
    return self._jit(formats).lower(_abstract(state), _abstract(batch))

  def compile(self, state, batch):
    compiled = self.lower(state, batch).compile()
    ins, outs = compiled.input_formats[0][0], compiled.output_formats[0]
    if [f.layout for f in jax.tree.leaves(ins)] != [f.layout for f in jax.tree.leaves(outs)]:
      # Donation makes XLA alias each output to its input, so they agree; were they not to, pin the outputs to
      # the inputs' layouts, so that each step's state is the next one's without a copy.
      compiled = self._jit(ins).lower(_abstract(state), _abstract(batch)).compile()
    return compiled

  def __call__(self, state, batch):
    if self.compiled is None:
      self.compiled = self.compile(state, batch)
    if self._last is None or self._last() is not state:
      state = place_state(state, self.compiled)
    state, metrics = self.compiled(state, batch)
    self._last = weakref.ref(state)
    return state, metrics


def make_train_step(model: SRDiffusion, tx: optax.GradientTransformation, mesh: Mesh, *, loss_type="l1",
                    aux_l1_weight=0.0, ema_decay=0.0, grad_accum_steps=1, state_layouts="auto"):
  """The diffusion train step (see `make_step`)."""
  loss_fn = functools.partial(diffusion_loss, model, loss_type=loss_type, aux_l1_weight=aux_l1_weight)
  return make_step(loss_fn, tx, mesh, ema_decay=ema_decay, grad_accum_steps=grad_accum_steps,
                   state_layouts=state_layouts)


def make_rrdb_train_step(rrdb, tx: optax.GradientTransformation, mesh: Mesh, *, ema_decay=0.0, grad_accum_steps=1,
                         state_layouts="auto"):
  return make_step(functools.partial(rrdb_l1_loss, rrdb), tx, mesh, ema_decay=ema_decay,
                   grad_accum_steps=grad_accum_steps, state_layouts=state_layouts)
