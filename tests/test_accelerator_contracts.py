"""Accelerator contracts, proven without an accelerator: the paper network's train step and sampler compiled
ahead of time for an H200 by XLA's own GPU compiler (`diffssr-benchmark compile`: the compile-only CUDA client
of jax-cuda12-plugin), and checked for what decides their speed and memory there.

Each program is compiled once per session through the command itself (module fixtures; small batch and image:
the checks are about the programs' structure, which does not depend on the sizes). Two positive controls
compile tiny programs that have the defects on purpose, so a detector that stops seeing them fails too.
"""
import contextlib
import importlib.util
import io
import json

import jax
import jax.numpy as jnp
import pytest

if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
  pytest.skip("needs the CUDA compile plugin: pip install jax-cuda12-plugin jax-cuda12-pjrt (requirements.txt)",
              allow_module_level=True)

from diffssr_jax.benchmarks import compile as compile_cmd  # noqa: E402
from diffssr_jax.benchmarks import hlo, targets  # noqa: E402
from diffssr_jax.benchmarks import model as benchmark  # noqa: E402
from diffssr_jax.training import train_step  # noqa: E402

TARGET = "h200"
RRDB_BLOCKS = 17       # diffssr_jax/configs/base.py model.rrdb_num_blocks
SAMPLE_STEPS = 2       # the sampler's loop: a trip count other than the RRDB's tells the two loops apart


def _compile_command(*argv) -> dict:
  """The result of `diffssr-benchmark compile --target TARGET argv`, checked to be its one JSON line."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    results = benchmark.main(["compile", "--target", TARGET, *argv])
  lines = [line for line in out.getvalue().splitlines() if line.strip()]
  assert len(lines) == 1 and json.loads(lines[0]) == results[0], lines
  return results[0]


@pytest.fixture(scope="module")
def train():
  """The paper network's train step, config dtype ("auto"), batch 2 x 32² (one optimizer step, RRDB frozen)."""
  return _compile_command("--program", "train", "--batch_size", "2", "--patch_size", "32")


@pytest.fixture(scope="module")
def sampler():
  """The Upscaler's sampler (make_image_sampler), config dtype, ddim with SAMPLE_STEPS steps, one 32² image."""
  return _compile_command("--program", "sample", "--size", "32", "--sampler", "ddim", "--steps", str(SAMPLE_STEPS))


def _loop(result, trips):
  loops = [loop for loop in result["loops"] if loop["trip_count"] == trips]
  assert len(loops) == 1, result["loops"]
  return loops[0]


def test_compute_dtype_of_an_accelerator_target_is_bfloat16_on_a_cpu_host():
  """Guards defect 3 of issue 17: model.dtype "auto" followed the default backend, so a GPU program compiled
  on a CPU host (deviceless, as here) was float32."""
  assert jax.default_backend() == "cpu"
  config = benchmark.load_config(None)
  assert config.model.dtype == "auto"
  for name in ("h200", "a100", "v5e", "v6e"):
    assert compile_cmd.build(targets.get(name), config, "config").dtype == jnp.bfloat16, name
    assert compile_cmd.build(targets.get(name), config, "float32").dtype == jnp.float32, name


def test_compile_reports(train, sampler):
  """The command's JSON: the target's device, memory that adds up (the donated train state aliased into its
  outputs), FLOPs, and no host transfers or callbacks in either program."""
  for r in (train, sampler):
    assert r["device_kind"] == "NVIDIA H200" and r["dtype"] == "bfloat16"
    m = r["memory"]
    assert m["peak"] == m["arguments"] + m["outputs"] - m["aliases"] + m["temp"] and m["temp"] > 0
    assert r["tflop"] > 0 and r["compile_seconds"] > 0 and r["compile_cpu_seconds"] > 0 and r["lower_seconds"] > 0
    assert r["host_transfers"] == {}
  # The train state (params + Adam moments, ~200 MB) is donated: nearly all of the outputs are aliases.
  assert train["memory"]["aliases"] > 0.99 * train["memory"]["outputs"] > 150e6
  assert sampler["memory"]["aliases"] == 0 and sampler["steps"] == SAMPLE_STEPS


def test_bfloat16_programs_have_only_bfloat16_convolutions(train, sampler):
  """Guards defect 3 (on a CPU host "auto" compiled float32 convs for the GPU) and any float32 conv left in a
  bfloat16 model: every cuDNN conv of both programs takes bfloat16 operands."""
  for r in (train, sampler):
    assert r["convs_total"] > 50
    assert all(kind.endswith(":bf16") for kind in r["convs"]), r["convs"]
  # The train step has the backward convs too (the U-Net is trained).
  assert {"forward:bf16", "backward_input:bf16", "backward_filter:bf16"} <= set(train["convs"])


def test_train_step_has_no_dilated_window_convolution(train):
  """Guards defect 1: the weight gradients of the four transposed convs (nn.ConvTranspose) were lowered to
  convs whose window is the whole activation with rhs_dilate 2 or 4, a slow path of cuDNN."""
  assert train["dilated_convs"] == 0, train["dilated_conv_windows"]


def test_train_step_weight_gradients_are_backward_filter_convs(train):
  """Guards defect 1 in its second form: with the conv's own padding, the sub-pixel transposed conv's weight
  gradient had a "kernel" (the output gradient) wider than its input, XLA swapped the operands (a window
  reversal) and the GPU rewriter ran it as a forward conv with a whole-activation window (80x80 at 160²) fed by
  NHWC->CHWN transposes. Every weight gradient is a cuDNN backward-filter conv, no window exceeds the
  networks' 3x3 kernels, and no activation transpose moves the minor (channel) dimension."""
  assert train["large_window_convs"] == 0, train["large_window_conv_windows"]
  assert max(_windows(train)) <= 3
  assert train["transposes_activations_minor_1mib"] == 0


def _depth_to_space_by_transpose(y, s):
  """The form `layers.interleave_phases` replaced: reshape + transpose, then the crop."""
  b, hp, wp, c = y.shape
  h, w, f = hp - 1, wp - 1, c // (s * s)
  y = y.reshape(b, hp, wp, s, s, f).transpose(0, 1, 3, 2, 4, 5).reshape(b, hp * s, wp * s, f)
  return y[:, s // 2: s // 2 + h * s, s // 2: s // 2 + w * s]


@pytest.mark.parametrize("stride", [2, 4])
def test_transposed_conv_has_no_transpose(stride, monkeypatch):
  """Guards the sub-pixel transposed conv's depth-to-space (`layers.interleave_phases`): as a reshape +
  `transpose(0, 1, 3, 2, 4, 5)` XLA kept it a transpose (fused into the consumer forward, a transpose fusion
  over the output gradient backward: 281 MiB of the bf16 train step's transposes at b16 x 160^2); with the
  phases placed by interior padding, forward and gradients of the layer (the up convs' stride 2, cond_proj's
  4) compiled for the target have no transpose of >= 1 MiB at all, and write exactly the bytes the
  transpose form writes (the same data movement)."""
  from diffssr_jax.models import layers
  layer = layers.conv_transpose_torch(64, stride, None, jnp.bfloat16)
  x, = _target_args((4, 64 // stride, 64 // stride, 64))
  params = jax.eval_shape(layer.init, jax.random.key(0), x)
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=x.sharding), params)

  def compiled_facts():
    loss = lambda p, x: jnp.sum(jnp.sin(layer.apply(p, x).astype(jnp.float32)))  # noqa: E731
    return hlo.facts(jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text())

  facts = compiled_facts()
  assert facts["convs"] == {"backward_filter:bf16": 1, "backward_input:bf16": 1, "forward:bf16": 1}, facts["convs"]
  assert facts["transposes_1mib"] == 0, facts
  monkeypatch.setattr(layers, "interleave_phases", _depth_to_space_by_transpose)
  old = compiled_facts()
  assert old["transposes_1mib"] >= 1 and old["written_mib"] == facts["written_mib"] > 0, (old, facts)


def _windows(result):
  return [int(side) for w in result["conv_windows"] for side in w.split("x")]


def test_sampler_loop_converts_no_parameters(sampler):
  """Guards defect 2: the sampler re-cast the U-Net's float32 weights to bfloat16 in every reverse step (converts
  of the loop-invariant weights inside the while body); they are cast once per run, before the loop."""
  loop = _loop(sampler, SAMPLE_STEPS)
  assert loop["convs"] > 30  # the U-Net is in this loop
  assert loop["converts_of_invariants"] == 0, loop


def test_rrdb_trunk_is_one_loop_of_its_blocks(train, sampler):
  """Guards the RRDB's nn.scan (its 17 blocks one loop body, not unrolled: compile time and code size) in both
  programs; not one of the three defects (it held before them too)."""
  for r in (train, sampler):
    loop = _loop(r, RRDB_BLOCKS)
    assert loop["convs"] == 15  # one RRDB block: 3 dense blocks of 5 convs
  assert [loop["trip_count"] for loop in train["loops"]] == [RRDB_BLOCKS]
  assert sorted(loop["trip_count"] for loop in sampler["loops"]) == sorted([RRDB_BLOCKS, SAMPLE_STEPS])


# ------------------------------------------------------------------ positive controls: the detectors see defects
def _target_args(*shapes):
  from diffssr_jax import parallel
  mesh = compile_cmd.target_mesh(targets.get(TARGET))
  return [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=parallel.replicated(mesh)) for s in shapes]


def test_detector_sees_the_dilated_weight_gradient_of_a_transposed_conv():
  """nn.ConvTranspose's weight gradient (defect 1) compiled for the target shows up as a dilated-window conv."""
  import flax.linen as nn
  layer = nn.ConvTranspose(8, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)), transpose_kernel=True,
                           dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  x, = _target_args((2, 16, 16, 8))
  params = jax.eval_shape(layer.init, jax.random.key(0), x)
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=x.sharding), params)
  grad = jax.jit(jax.grad(lambda p, x: jnp.sum(layer.apply(p, x).astype(jnp.float32))))
  facts = hlo.facts(grad.lower(params, x).compile().as_text())
  assert facts["dilated_convs"] >= 1, facts


def test_detector_sees_a_weight_gradient_run_as_a_large_window_conv():
  """A stride-1 2x2 conv padded inside the conv (the first sub-pixel form) has its weight gradient compiled as a
  forward conv with a whole-activation window: the detector sees it."""
  x, w = _target_args((2, 32, 32, 16), (2, 2, 16, 16))
  conv = lambda w, x: jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  grad = jax.jit(jax.grad(lambda w, x: jnp.sum(conv(w, x).astype(jnp.float32))))
  facts = hlo.facts(grad.lower(w, x).compile().as_text())
  assert facts["large_window_convs"] >= 1, facts


def test_detector_sees_a_parameter_cast_inside_a_loop():
  """A scan whose body casts a closed-over float32 weight (defect 2's pattern) shows a convert of a
  loop-invariant value in the loop; the same scan with the weight cast before it shows none."""
  x, = _target_args((4, 256, 256))
  w = jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=x.sharding)

  def run(cast_inside):
    def f(w, x):
      wc = w if cast_inside else w.astype(jnp.bfloat16)
      body = lambda c, _: (jnp.tanh(c @ wc.astype(jnp.bfloat16)), None)
      return jax.lax.scan(body, x, None, length=5)[0]
    loops = hlo.facts(jax.jit(f).lower(w, x).compile().as_text())["loops"]
    return [loop for loop in loops if loop["trip_count"] == 5]

  inside, outside = run(True), run(False)
  assert len(inside) == 1 and inside[0]["converts_of_invariants"] >= 1, inside
  assert len(outside) == 1 and outside[0]["converts_of_invariants"] == 0, outside


def test_missing_compiler_is_one_install_line(monkeypatch):
  """Without the plugin (or libtpu) the command says in one line what to pip install."""
  monkeypatch.setattr(targets.importlib.util, "find_spec", lambda name: None)
  for name, package in (("h200", "jax-cuda12-plugin==" + jax.__version__), ("v5e", "jax[tpu]==" + jax.__version__)):
    with pytest.raises(targets.TargetUnavailable) as e:
      targets.check_installed(targets.get(name))
    assert "\n" not in str(e.value) and "pip install" in str(e.value) and package in str(e.value)


def test_train_step_as_the_loop_runs_it_keeps_the_weights_in_their_own_layouts(train):
  """Issue 17's transposes target (<= 50 MiB of transposes >= 1 MiB per bf16 train step) for the step the
  training loop runs (config train.state_layouts "auto"). With the state row-major, as the loop placed it
  before, the paper network's step transposed 253 MiB of weights at any batch: casts to cuDNN's OHWI
  filters, the optimizer update back and the frozen RRDB's stacked kernels. Left: the sub-pixel kernels'
  gathers (8 MiB)."""
  assert train["state_layouts"] == "auto"
  assert train["state_relaid_out"] > 100, train["state_relaid_out"]  # the conv kernels and their Adam moments
  assert train["transposes_mib"] <= 50, (train["transposes_mib"], train["transposes_1mib"])


def test_auto_state_layouts_remove_the_weight_layout_transposes():
  """`train.state_layouts = "auto"` (`train_step.LaidOutStep`, what the training loop runs): a train step of one
  bf16 conv with its f32 weight as donated state. In the default (row-major HWIO) layout the compiled step
  transposes the weight to cuDNN's OHWI filter layout (the forward cast) and the update back (the 253 MiB of
  weight transposes per paper train step); with the state's layout left to XLA it takes the weight in its own
  layout (reported relaid out), with no transpose and the state still aliased."""
  from diffssr_jax import parallel
  mesh = compile_cmd.target_mesh(targets.get(TARGET))
  rep = parallel.replicated(mesh)

  def step(state, x):
    def loss(w):
      y = jax.lax.conv_general_dilated(x, w.astype(jnp.bfloat16), (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
      return jnp.mean(jnp.square(y.astype(jnp.float32)))
    return {"w": state["w"] - 0.1 * jax.grad(loss)(state["w"])}, jnp.zeros(())

  sharded = jax.shard_map(step, mesh=mesh, in_specs=(jax.P(), jax.P(parallel.DATA_AXIS)), out_specs=(jax.P(), jax.P()))
  default = jax.jit(sharded, donate_argnums=(0,))
  state = {"w": jax.ShapeDtypeStruct((3, 3, 128, 128), jnp.float32, sharding=rep)}
  x = jax.ShapeDtypeStruct((2, 16, 16, 128), jnp.bfloat16, sharding=parallel.batch_sharding(mesh))
  results = {}
  for name, fn in (("default", default), ("auto", train_step.LaidOutStep(sharded, mesh))):
    compiled = fn.lower(state, x).compile()
    results[name] = (hlo.facts(compiled.as_text(), min_bytes=1), compile_cmd.relaid_out_state(compiled),
                     compile_cmd.memory(compiled))
  (f_def, r_def, _), (f_auto, r_auto, m_auto) = results["default"], results["auto"]
  assert f_def["transposes_1mib"] >= 2 and r_def["state_relaid_out"] == 0, (f_def, r_def)
  assert f_auto["transposes_1mib"] == 0 and r_auto["state_relaid_out"] == 1, (f_auto, r_auto)
  assert m_auto["aliases"] == 3 * 3 * 128 * 128 * 4
  assert f_auto["written_mib"] < f_def["written_mib"]  # the transposed copies of the weight are gone
