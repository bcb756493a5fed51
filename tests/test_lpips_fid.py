"""LPIPS and FID: our Flax networks loaded from test-made torch state dicts vs. torch forwards written here
with torch.nn.functional, and the Frechet distance vs. closed forms."""
import numpy as np
import pytest
import scipy.linalg

torch = pytest.importorskip("torch")
F = torch.nn.functional

from diffssr_jax import lpips  # noqa: E402

# ---------------------------------------------------------------- LPIPS
# torchvision `features` conv layers: index -> (out, in, k, stride, pad); pools after the listed indices.
ALEX = {0: (64, 3, 11, 4, 2), 3: (192, 64, 5, 1, 2), 6: (384, 192, 3, 1, 1), 8: (256, 384, 3, 1, 1),
        10: (256, 256, 3, 1, 1)}
ALEX_TAPS, ALEX_POOL_BEFORE = (0, 3, 6, 8, 10), {3, 6}
VGG = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256), 14: (256, 256),
       17: (512, 256), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512), 28: (512, 512)}
VGG_TAPS, VGG_POOL_BEFORE = (2, 7, 14, 21, 28), {5, 10, 17, 24}


def _backbone_sd(net, gen):
  sd = {}
  for idx, spec in (ALEX if net == "alex" else VGG).items():
    out_c, in_c = spec[:2]
    k = spec[2] if net == "alex" else 3
    sd[f"features.{idx}.weight"] = torch.randn(out_c, in_c, k, k, generator=gen) * (2.0 / (in_c * k * k)) ** 0.5
    sd[f"features.{idx}.bias"] = torch.randn(out_c, generator=gen) * 0.1
  sd["classifier.1.weight"] = torch.zeros(4, 4)  # torchvision files carry the classifier: must be ignored
  return sd


def _lin_sd(net, gen):
  chans = (64, 192, 384, 256, 256) if net == "alex" else (64, 128, 256, 512, 512)
  return {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=gen) for k, c in enumerate(chans)}


def _torch_lpips(net, bsd, lsd, x0, x1):
  """LPIPS v0.1 from the paper's description with F.conv2d / F.max_pool2d, NCHW, inputs in [-1, 1]."""
  shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
  scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

  def feats(x):
    x = (x - shift) / scale
    out = []
    convs = ALEX if net == "alex" else VGG
    pools = ALEX_POOL_BEFORE if net == "alex" else VGG_POOL_BEFORE
    taps = ALEX_TAPS if net == "alex" else VGG_TAPS
    for idx, spec in convs.items():
      if idx in pools:
        x = F.max_pool2d(x, 3, 2) if net == "alex" else F.max_pool2d(x, 2, 2)
      stride, pad = (spec[3], spec[4]) if net == "alex" else (1, 1)
      x = F.relu(F.conv2d(x, bsd[f"features.{idx}.weight"], bsd[f"features.{idx}.bias"], stride, pad))
      if idx in taps:
        out.append(x)
    return out

  total = 0
  for k, (a, b) in enumerate(zip(feats(x0), feats(x1))):
    na = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    nb = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    total = total + F.conv2d((na - nb) ** 2, lsd[f"lin{k}.model.1.weight"]).mean(dim=(2, 3))
  return total[:, 0]


@pytest.mark.parametrize("net, size", [("alex", 64), ("vgg", 32)])
def test_lpips_matches_torch_forward(net, size, tmp_path):
  gen = torch.Generator().manual_seed(0)
  bsd, lsd = _backbone_sd(net, gen), _lin_sd(net, gen)
  torch.save(bsd, tmp_path / "backbone.pth")
  torch.save(lsd, tmp_path / "lin.pth")
  params = lpips.load_weights(net, tmp_path / "backbone.pth", tmp_path / "lin.pth")
  x0 = torch.rand(2, 3, size, size + 8, generator=gen) * 2 - 1
  x1 = (x0 + 0.3 * torch.randn(2, 3, size, size + 8, generator=gen)).clamp(-1, 1)
  with torch.no_grad():
    ref = _torch_lpips(net, bsd, lsd, x0, x1).numpy()
  fn = lpips.make_lpips_fn(net, params)
  ours = np.asarray(fn(x0.permute(0, 2, 3, 1).numpy(), x1.permute(0, 2, 3, 1).numpy()))
  assert ours.shape == (2,) and np.all(ref > 0)
  np.testing.assert_allclose(ours, ref, rtol=2e-4)
  same = np.asarray(fn(x0.permute(0, 2, 3, 1).numpy(), x0.permute(0, 2, 3, 1).numpy()))
  np.testing.assert_allclose(same, 0, atol=1e-7)


def test_lpips_uint8_helper_and_slice_keys():
  """The LPIPS-module key layout (`net.slice<k>.<i>.*`) converts like torchvision's; uint8 pairs go in as
  x / 127.5 - 1."""
  gen = torch.Generator().manual_seed(1)
  bsd, lsd = _backbone_sd("alex", gen), _lin_sd("alex", gen)
  slices = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}
  sliced = {f"net.slice{slices[int(k.split('.')[1])]}.{k.split('.', 1)[1]}": v
            for k, v in bsd.items() if k.startswith("features")}
  p1 = lpips.convert_weights("alex", bsd, lsd)
  p2 = lpips.convert_weights("alex", sliced, lsd)
  for a, b in zip(*(map(np.asarray, __import__("jax").tree_util.tree_leaves(p)) for p in (p1, p2))):
    np.testing.assert_array_equal(a, b)
  rng = np.random.default_rng(0)
  sr = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
  hr = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
  fn = lpips.make_lpips_fn("alex", p1)
  got = lpips.lpips_images(fn, sr, hr)
  with torch.no_grad():
    t = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].float() / 127.5 - 1
    ref = _torch_lpips("alex", bsd, lsd, t(sr), t(hr)).numpy()
  np.testing.assert_allclose(got, ref, rtol=2e-4)


def test_lpips_weight_errors():
  gen = torch.Generator().manual_seed(2)
  bsd, lsd = _backbone_sd("alex", gen), _lin_sd("alex", gen)
  with pytest.raises(lpips.LPIPSWeightError, match="features.8"):
    lpips.convert_weights("alex", {k: v for k, v in bsd.items() if not k.startswith("features.8.")}, lsd)
  with pytest.raises(lpips.LPIPSWeightError, match="lin2"):
    lpips.convert_weights("alex", bsd, {k: v for k, v in lsd.items() if not k.startswith("lin2")})
  with pytest.raises(lpips.LPIPSWeightError, match="wrong network"):
    lpips.convert_weights("vgg", bsd, lsd)
  assert lpips.tap_channels("vgg") == (64, 128, 256, 512, 512)
