"""Networks: parameter counts, PyTorch-semantics layers, conversion and parity with the official model."""
import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest
import torch

import reference_data as rd
from diffssr_jax.models import convert
from diffssr_jax.models import RRDBNet, UNet
from diffssr_jax.models.layers import ReflectPadConv, conv_transpose_torch, mish, reflect_conv3x3
from diffssr_jax.models.unet import sinusoidal_embedding
from helpers import nchw_to_nhwc, reference_state_dict


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def paper_params():
  """Shapes of the paper network's params (abstract: nothing is computed)."""
  lr = jnp.zeros((1, 8, 8, 3))
  rrdb = jax.eval_shape(RRDBNet().init, jax.random.key(0), lr)
  feats = jax.ShapeDtypeStruct((18, 1, 8, 8, 64), jnp.float32)
  unet = jax.eval_shape(UNet().init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32), feats)
  return {"unet": unet, "rrdb": rrdb}


def test_parameter_counts_equal_official(paper_params):
  assert _count(paper_params["unet"]) == 12_934_915
  assert _count(paper_params["rrdb"]) == 12_381_443


@pytest.mark.parametrize("stride,cin,cout,size", [(2, 5, 4, 6), (4, 12, 3, 5), (8, 3, 2, 3)])
def test_transpose_conv_matches_torch(stride, cin, cout, size):
  rng = np.random.default_rng(stride)
  k = 2 * stride
  w = rng.normal(size=(cin, cout, k, k)).astype(np.float32)
  b = rng.normal(size=(cout,)).astype(np.float32)
  x = rng.normal(size=(2, cin, size, size + 1)).astype(np.float32)
  ref = torch.nn.functional.conv_transpose2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b),
                                             stride=stride, padding=stride // 2).numpy()
  params = {"params": {"kernel": jnp.asarray(np.transpose(w, (2, 3, 1, 0))), "bias": jnp.asarray(b)}}
  out = conv_transpose_torch(cout, stride, None, jnp.float32).apply(params, jnp.asarray(nchw_to_nhwc(x)))
  assert out.shape == (2, size * stride, (size + 1) * stride, cout)
  np.testing.assert_allclose(np.asarray(out), nchw_to_nhwc(ref), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("stride", [2, 4])
def test_transpose_conv_gradients_match_torch(stride):
  """The sub-pixel form's input and weight gradients (its own plain convs) equal torch's ConvTranspose2d's."""
  rng = np.random.default_rng(10 + stride)
  cin, cout, k = 6, 5, 2 * stride
  w = rng.normal(size=(cin, cout, k, k)).astype(np.float32)
  b = rng.normal(size=(cout,)).astype(np.float32)
  x = rng.normal(size=(2, cin, 5, 7)).astype(np.float32)
  g = rng.normal(size=(2, cout, 5 * stride, 7 * stride)).astype(np.float32)
  xt, wt, bt = (torch.from_numpy(a).requires_grad_() for a in (x, w, b))
  torch.nn.functional.conv_transpose2d(xt, wt, bt, stride=stride, padding=stride // 2).backward(torch.from_numpy(g))
  layer = conv_transpose_torch(cout, stride, None, jnp.float32)

  def loss(params, xn):
    return jnp.sum(layer.apply(params, xn) * jnp.asarray(nchw_to_nhwc(g)))

  params = {"params": {"kernel": jnp.asarray(np.transpose(w, (2, 3, 1, 0))), "bias": jnp.asarray(b)}}
  with jax.default_matmul_precision("highest"):
    gp, gx = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(nchw_to_nhwc(x)))
  np.testing.assert_allclose(np.asarray(gx), nchw_to_nhwc(xt.grad.numpy()), rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(np.asarray(gp["params"]["kernel"]), np.transpose(wt.grad.numpy(), (2, 3, 1, 0)),
                             rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(np.asarray(gp["params"]["bias"]), bt.grad.numpy(), rtol=1e-4, atol=1e-3)


def test_mish_matches_torch_and_keeps_one_residual():
  """`layers.mish`: forward bit-identical to jax.nn.mish, gradient equal to torch's Mish (float32, also where
  softplus saturates), and its backward keeps only the input (`jax.checkpoint`) (jax.nn.mish's autodiff keeps 5 arrays: 3.9 GiB of
  the bf16 train step's 9.2 GiB temp at b64 x 160^2 on an H200 target)."""
  x = np.concatenate([np.linspace(-30, 30, 241), [-1e-3, 0.0, 1e-3]]).astype(np.float32)
  xt = torch.from_numpy(x).requires_grad_()
  torch.nn.functional.mish(xt).sum().backward()
  y, vjp = jax.vjp(mish, jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(jax.nn.mish(jnp.asarray(x))))
  np.testing.assert_allclose(np.asarray(vjp(jnp.ones_like(y))[0]), xt.grad.numpy(), rtol=1e-5, atol=1e-6)
  xb = jnp.asarray(x, jnp.bfloat16)
  assert [r.shape for r in jax.tree.leaves(jax.vjp(mish, xb)[1])] == [xb.shape]
  gb = jax.grad(lambda v: mish(v).astype(jnp.float32).sum())(xb)
  assert gb.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(gb, np.float32), xt.grad.numpy(), rtol=1e-2, atol=1e-2)


def test_reflect_conv_strided_matches_torch():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
  x = rng.normal(size=(1, 3, 8, 10)).astype(np.float32)
  xt = torch.nn.functional.pad(torch.from_numpy(x), (1, 1, 1, 1), mode="reflect")
  ref = torch.nn.functional.conv2d(xt, torch.from_numpy(w), stride=2).numpy()
  params = {"params": {"kernel": jnp.asarray(np.transpose(w, (2, 3, 1, 0))), "bias": jnp.zeros(4)}}
  out = reflect_conv3x3(4, None, jnp.float32, strides=2).apply(params, jnp.asarray(nchw_to_nhwc(x)))
  np.testing.assert_allclose(np.asarray(out), nchw_to_nhwc(ref), atol=1e-5)


def _eqns(jaxpr):
  """Every equation of a jaxpr, those of the jaxprs it calls included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for v in eqn.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          yield from _eqns(sub.jaxpr)
        elif hasattr(sub, "eqns"):
          yield from _eqns(sub)


@pytest.mark.parametrize("stride", [1, 2])
def test_reflect_conv_keeps_its_padded_input_as_one_array_for_both_convs(stride):
  """Guards a TPU compile-time defect: with `nn.Conv(padding="REFLECT")` the reflection pad (slices,
  reversals, concatenations) had nothing between it and its two consumers, so libtpu fused it into the
  forward conv and into the weight gradient's conv, whose compile then took up to 36 s each (the v5e train
  step: 205 s on 2 cores, 90 s with the barrier). `ReflectPadConv` puts an optimisation barrier between the pad and the convs: both
  the forward conv and the weight-gradient conv must read the barrier's output. On the old layer there is no
  barrier and this fails. Values, gradients and params stay those of flax's REFLECT conv, bit for bit."""
  rng = np.random.default_rng(stride)
  x = jnp.asarray(rng.normal(size=(2, 9, 10, 3)), jnp.float32)
  ours = reflect_conv3x3(4, None, jnp.float32, strides=stride)
  flax_reflect = nn.Conv(4, (3, 3), strides=stride, padding="REFLECT")
  params = flax_reflect.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, params)

  def loss(conv):
    return lambda p, x: jnp.sum(jnp.sin(conv.apply(p, x)))
  for a, b in zip(jax.tree.leaves(jax.value_and_grad(loss(ours), argnums=(0, 1))(params, x)),
                  jax.tree.leaves(jax.value_and_grad(loss(flax_reflect), argnums=(0, 1))(params, x))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  jaxpr = jax.make_jaxpr(jax.grad(loss(ours)))(params, x).jaxpr
  barriers = [e for e in _eqns(jaxpr) if e.primitive.name == "optimization_barrier"]
  assert len(barriers) == 1, "the padded input is not behind one optimisation barrier"
  padded = barriers[0].outvars[0]
  assert padded.aval.shape == (2, 11, 12, 3)
  convs = [e for e in _eqns(jaxpr) if e.primitive.name == "conv_general_dilated"]
  readers = [e for e in convs if any(v is padded for v in e.invars)]
  kernel_shape = params["params"]["kernel"].shape
  assert [e.outvars[0].aval.shape == kernel_shape for e in readers].count(True) == 1, "weight gradient"
  assert [e.outvars[0].aval.shape[-1] == 4 and e.outvars[0].aval.shape != kernel_shape
          for e in readers].count(True) == 1, "forward conv"
  with pytest.raises(ValueError, match="3x3 kernel"):
    ReflectPadConv(4, (5, 5)).init(jax.random.key(0), x)


def test_every_reflect_conv_of_the_unet_is_behind_a_barrier():
  """The U-Net's 3x3 convs all use `ReflectPadConv` (see the test above): 2 per ResnetBlock, the three
  downsampling convs and the final block, plus the four sub-pixel transposed convs' zero pads."""
  unet = UNet(dim=8, dim_mults=(1, 2), scale=2)
  feats = jnp.zeros((18, 1, 4, 4, 64))
  x, t = jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32)
  params = jax.eval_shape(unet.init, jax.random.key(0), x, t, feats)
  jaxpr = jax.make_jaxpr(unet.apply)(params, x, t, feats).jaxpr
  barriers = [e for e in _eqns(jaxpr) if e.primitive.name == "optimization_barrier"]
  n_resnet_blocks = 2 * 2 + 2 + 2 * 1          # downs (2 levels x 2), mid (2), ups (1 level x 2)
  n_reflect = 2 * n_resnet_blocks + 1 + 1      # + one downsampling conv + the final block
  n_subpixel = 1 + 1                           # the up path's transposed conv + cond_proj
  assert len(barriers) == n_reflect + n_subpixel


def test_time_embedding_layout():
  emb = np.asarray(sinusoidal_embedding(jnp.array([0, 3]), 8))
  np.testing.assert_allclose(emb[0], [0, 0, 0, 0, 1, 1, 1, 1])
  w = np.exp(-np.log(1e4) * np.arange(4) / 3)
  np.testing.assert_allclose(emb[1], np.concatenate([np.sin(3 * w), np.cos(3 * w)]), rtol=1e-6)


def test_converter_round_trip_and_errors(tmp_path):
  model_small = RRDBNet(num_feat=4, num_blocks=2, growth=2)
  p = model_small.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))
  sd = convert.flax_to_torch({"rrdb": p})
  assert "rrdb.RRDB_trunk.1.RDB3.conv5.weight" in sd and sd["rrdb.conv_first.weight"].shape == (4, 3, 3, 3)
  back = convert.torch_to_flax(sd)
  jax.tree.map(np.testing.assert_array_equal, back["rrdb"], jax.tree.map(np.asarray, p))
  # A real checkpoint file in the official layout, read with torch only (no official code).
  ckpt = {"state_dict": {"model": {k: torch.from_numpy(v.copy()) for k, v in sd.items()}}, "global_step": 7}
  torch.save(ckpt, tmp_path / "model_ckpt_steps_7.ckpt")
  loaded = convert.load_torch_checkpoint(tmp_path / "model_ckpt_steps_7.ckpt")
  assert set(loaded) == set(sd)
  # The official RRDB pre-training saves a bare state dict (no "rrdb." prefix).
  bare = convert.torch_to_flax({k[len("rrdb."):]: v for k, v in sd.items()})
  assert set(bare) == {"rrdb"}
  # Layers our U-Net has not got (the official mid-block attention) are named; sam_conv (cond_sam) converts.
  with pytest.raises(convert.ConversionError, match="mid_attn"):
    convert.torch_to_flax({**sd, "denoise_fn.mid_attn.fn.fn.to_qkv.weight": np.zeros((1, 1, 1, 1))})
  with pytest.raises(convert.ConversionError, match="missing"):
    convert.check_against(back, {"rrdb": jax.tree.map(np.asarray, RRDBNet(num_feat=4, num_blocks=3, growth=2).init(
        jax.random.key(0), jnp.zeros((1, 4, 4, 3))))})
  (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
  with pytest.raises(convert.ConversionError, match="broken.ckpt"):
    convert.load_torch_checkpoint(tmp_path / "broken.ckpt")


# ----------------------------------------------------------------------------- official parity
@pytest.fixture(scope="module")
def official():
  ref = rd.load()
  if ref is None or "sdq/denoise_fn.cond_proj.weight" not in ref:
    pytest.skip("no reference weights")
  params = convert.torch_to_flax(reference_state_dict(ref))
  return ref, jax.tree.map(jnp.asarray, params)


@rd.reference
def test_official_weights_convert_exactly(official, paper_params):
  ref, params = official
  convert.check_against(params, paper_params)
  back = convert.flax_to_torch(jax.tree.map(np.asarray, params))
  sd = reference_state_dict(ref)
  assert set(back) == {k for k in sd if k.startswith(("denoise_fn.", "rrdb."))}
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k])


@rd.reference
def test_rrdb_matches_official(official):
  ref, params = official
  out, feats = jax.jit(RRDBNet().apply)(params["rrdb"], jnp.asarray(nchw_to_nhwc(ref["in/img_lr"])))
  np.testing.assert_allclose(np.asarray(out), nchw_to_nhwc(ref["rrdb/out"]), atol=1e-4)
  cond_cat = np.asarray(jnp.concatenate(feats[2::3], -1))
  np.testing.assert_allclose(cond_cat, nchw_to_nhwc(ref["rrdb/cond_cat"]), atol=1e-4)


@rd.reference
def test_unet_matches_official(official):
  ref, params = official
  unet = UNet()
  feats_ref = nchw_to_nhwc(ref["rrdb/cond_cat"])
  # Feed the official features (split back into the 6 maps the U-Net picks, padded into an 18-list).
  picked = np.split(feats_ref, 6, axis=-1)
  feats = [None] * 18
  for i, f in zip(range(2, 18, 3), picked):
    feats[i] = jnp.asarray(f)
  cond = unet.apply(params["unet"], feats, method=UNet.project_cond)
  np.testing.assert_allclose(np.asarray(cond)[..., :8], nchw_to_nhwc(ref["unet/cond_proj_c8"]), atol=1e-4)
  t = jnp.asarray(ref["in/t"], jnp.int32)
  temb = unet.apply(params["unet"], t, method=UNet.time_embedding)
  np.testing.assert_allclose(np.asarray(temb), ref["unet/temb"], atol=1e-5)
  pos = np.asarray(sinusoidal_embedding(jnp.arange(100), 64))
  np.testing.assert_allclose(pos, ref["unet/pos_emb_t0_99"], atol=2e-5)
  pred = jax.jit(lambda p, x, t, c: unet.apply(p, x, t, c, method=UNet.denoise))(
      params["unet"], jnp.asarray(nchw_to_nhwc(ref["in/x_t"])), t, cond)
  np.testing.assert_allclose(np.asarray(pred), nchw_to_nhwc(ref["unet/noise_pred"]), atol=1e-4, rtol=0)
  # The prediction is small (std ~0.017): also require a tight relative error.
  rel = np.abs(np.asarray(pred) - nchw_to_nhwc(ref["unet/noise_pred"])).max() / np.abs(ref["unet/noise_pred"]).max()
  assert rel < 1e-4
