"""LPIPS and FID: our Flax networks loaded from test-made torch state dicts vs. torch forwards written here
with torch.nn.functional, and the Frechet distance vs. closed forms."""
import numpy as np
import pytest
import scipy.linalg

torch = pytest.importorskip("torch")
F = torch.nn.functional

from diffssr_jax.evaluation import lpips  # noqa: E402

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


# ---------------------------------------------------------------- FID: Frechet distance
from diffssr_jax.evaluation import fid  # noqa: E402


def test_frechet_distance_1d_and_diagonal_closed_forms():
  # 1-D Gaussians: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s
  assert fid.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9 + 1, abs=1e-12)
  # commuting (diagonal) covariances: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
  a, b = np.array([1.0, 4.0, 0.25, 9.0]), np.array([4.0, 1.0, 1.0, 9.0])
  mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
  expect = 1 + 4 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expect, abs=1e-12)
  # same Gaussian: 0; scaled covariance S2 = c^2 S1: (1 - c)^2 Tr(S1)
  rng = np.random.default_rng(0)
  q = rng.normal(size=(6, 6))
  s = q @ q.T + 0.1 * np.eye(6)
  assert fid.frechet_distance(np.ones(6), s, np.ones(6), s) == pytest.approx(0, abs=1e-9)
  assert fid.frechet_distance(np.zeros(6), s, np.zeros(6), 9 * s) == pytest.approx(4 * np.trace(s), rel=1e-10)


def test_frechet_distance_general_matches_sqrtm():
  rng = np.random.default_rng(1)
  q1, q2 = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
  s1, s2 = q1 @ q1.T, q2 @ q2.T + np.eye(8)
  mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
  tr = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
  expect = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr
  assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expect, rel=1e-9)


def test_fid_from_features_and_singular_covariance():
  rng = np.random.default_rng(2)
  f1 = rng.normal(size=(5000, 3)) * [1.0, 2.0, 0.5] + [1, 0, 0]
  f2 = rng.normal(size=(5000, 3)) * [1.0, 1.0, 0.5]
  # population values: |dmu|^2 = 1, (2 - 1)^2 = 1; sampling error is small at N = 5000
  assert fid.fid_from_features(f1, f2) == pytest.approx(2.0, abs=0.15)
  mu, sigma = fid.feature_statistics(f1)
  np.testing.assert_allclose(sigma, np.cov(f1.T), rtol=1e-12)
  # fewer samples than dimensions: singular covariances, still finite and ~0 for identical sets
  few = rng.normal(size=(4, 10))
  assert fid.fid_from_features(few, few) == pytest.approx(0, abs=1e-6)
  with pytest.raises(ValueError):
    fid.feature_statistics(few[:1])


# ---------------------------------------------------------------- FID: Inception network
def test_bilinear_resize_matches_torch_interpolate():
  gen = torch.Generator().manual_seed(3)
  for h, w, oh, ow in [(32, 20, 299, 299), (400, 333, 299, 299), (7, 9, 5, 13), (1000, 700, 299, 299)]:
    x = torch.rand(2, 3, h, w, generator=gen)
    ref = F.interpolate(x, size=(oh, ow), mode="bilinear", align_corners=False).numpy()
    ours = np.asarray(fid.resize_bilinear(x.permute(0, 2, 3, 1).numpy(), (oh, ow)))
    # torch's float32 kernel evaluates its weights with its own operation order: a few 1e-6 apart at most
    np.testing.assert_allclose(ours, ref.transpose(0, 2, 3, 1), atol=1e-5)


class _TorchInception:
  """The FID InceptionV3 written with torch.nn.functional; weights are created on first use (random, with
  pytorch-fid's key names), so running it once builds the state dict our loader must accept."""

  def __init__(self, gen):
    self.sd, self.gen = {}, gen

  def conv(self, name, x, out, k, stride=1, pad=(0, 0)):
    if f"{name}.conv.weight" not in self.sd:
      c, kh, kw = x.shape[1], k[0], k[1]
      g = self.gen
      self.sd[f"{name}.conv.weight"] = torch.randn(out, c, kh, kw, generator=g) * (2.0 / (c * kh * kw)) ** 0.5
      self.sd[f"{name}.bn.weight"] = 0.5 + torch.rand(out, generator=g)
      self.sd[f"{name}.bn.bias"] = 0.1 * torch.randn(out, generator=g)
      self.sd[f"{name}.bn.running_mean"] = 0.1 * torch.randn(out, generator=g)
      self.sd[f"{name}.bn.running_var"] = 0.5 + torch.rand(out, generator=g)
      self.sd[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    p = lambda s: self.sd[f"{name}.{s}"]
    y = F.conv2d(x, p("conv.weight"), None, stride, pad)
    y = F.batch_norm(y, p("bn.running_mean"), p("bn.running_var"), p("bn.weight"), p("bn.bias"), False, 0.0, 1e-3)
    return F.relu(y)

  def block_a(self, n, x, pool_features):
    c = self.conv
    b1 = c(f"{n}.branch1x1", x, 64, (1, 1))
    b5 = c(f"{n}.branch5x5_2", c(f"{n}.branch5x5_1", x, 48, (1, 1)), 64, (5, 5), pad=(2, 2))
    b3 = c(f"{n}.branch3x3dbl_1", x, 64, (1, 1))
    b3 = c(f"{n}.branch3x3dbl_3", c(f"{n}.branch3x3dbl_2", b3, 96, (3, 3), pad=(1, 1)), 96, (3, 3), pad=(1, 1))
    bp = c(f"{n}.branch_pool", F.avg_pool2d(x, 3, 1, 1, count_include_pad=False), pool_features, (1, 1))
    return torch.cat([b1, b5, b3, bp], 1)

  def block_b(self, n, x):
    c = self.conv
    b3 = c(f"{n}.branch3x3", x, 384, (3, 3), stride=2)
    bd = c(f"{n}.branch3x3dbl_2", c(f"{n}.branch3x3dbl_1", x, 64, (1, 1)), 96, (3, 3), pad=(1, 1))
    bd = c(f"{n}.branch3x3dbl_3", bd, 96, (3, 3), stride=2)
    return torch.cat([b3, bd, F.max_pool2d(x, 3, 2)], 1)

  def block_c(self, n, x, c7):
    c = self.conv
    b1 = c(f"{n}.branch1x1", x, 192, (1, 1))
    b7 = c(f"{n}.branch7x7_1", x, c7, (1, 1))
    b7 = c(f"{n}.branch7x7_2", b7, c7, (1, 7), pad=(0, 3))
    b7 = c(f"{n}.branch7x7_3", b7, 192, (7, 1), pad=(3, 0))
    bd = c(f"{n}.branch7x7dbl_1", x, c7, (1, 1))
    bd = c(f"{n}.branch7x7dbl_2", bd, c7, (7, 1), pad=(3, 0))
    bd = c(f"{n}.branch7x7dbl_3", bd, c7, (1, 7), pad=(0, 3))
    bd = c(f"{n}.branch7x7dbl_4", bd, c7, (7, 1), pad=(3, 0))
    bd = c(f"{n}.branch7x7dbl_5", bd, 192, (1, 7), pad=(0, 3))
    bp = c(f"{n}.branch_pool", F.avg_pool2d(x, 3, 1, 1, count_include_pad=False), 192, (1, 1))
    return torch.cat([b1, b7, bd, bp], 1)

  def block_d(self, n, x):
    c = self.conv
    b3 = c(f"{n}.branch3x3_2", c(f"{n}.branch3x3_1", x, 192, (1, 1)), 320, (3, 3), stride=2)
    b7 = c(f"{n}.branch7x7x3_1", x, 192, (1, 1))
    b7 = c(f"{n}.branch7x7x3_2", b7, 192, (1, 7), pad=(0, 3))
    b7 = c(f"{n}.branch7x7x3_3", b7, 192, (7, 1), pad=(3, 0))
    b7 = c(f"{n}.branch7x7x3_4", b7, 192, (3, 3), stride=2)
    return torch.cat([b3, b7, F.max_pool2d(x, 3, 2)], 1)

  def block_e(self, n, x, max_pool):
    c = self.conv
    b1 = c(f"{n}.branch1x1", x, 320, (1, 1))
    b3 = c(f"{n}.branch3x3_1", x, 384, (1, 1))
    b3 = torch.cat([c(f"{n}.branch3x3_2a", b3, 384, (1, 3), pad=(0, 1)),
                    c(f"{n}.branch3x3_2b", b3, 384, (3, 1), pad=(1, 0))], 1)
    bd = c(f"{n}.branch3x3dbl_2", c(f"{n}.branch3x3dbl_1", x, 448, (1, 1)), 384, (3, 3), pad=(1, 1))
    bd = torch.cat([c(f"{n}.branch3x3dbl_3a", bd, 384, (1, 3), pad=(0, 1)),
                    c(f"{n}.branch3x3dbl_3b", bd, 384, (3, 1), pad=(1, 0))], 1)
    pooled = F.max_pool2d(x, 3, 1, 1) if max_pool else F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    bp = c(f"{n}.branch_pool", pooled, 192, (1, 1))
    return torch.cat([b1, b3, bd, bp], 1)

  def __call__(self, x):
    """x: NCHW in [-1, 1] -> (N, 2048)."""
    c = self.conv
    x = c("Conv2d_1a_3x3", x, 32, (3, 3), stride=2)
    x = c("Conv2d_2a_3x3", x, 32, (3, 3))
    x = c("Conv2d_2b_3x3", x, 64, (3, 3), pad=(1, 1))
    x = F.max_pool2d(x, 3, 2)
    x = c("Conv2d_3b_1x1", x, 80, (1, 1))
    x = c("Conv2d_4a_3x3", x, 192, (3, 3))
    x = F.max_pool2d(x, 3, 2)
    x = self.block_a("Mixed_5b", x, 32)
    x = self.block_a("Mixed_5c", x, 64)
    x = self.block_a("Mixed_5d", x, 64)
    x = self.block_b("Mixed_6a", x)
    for n, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = self.block_c(n, x, c7)
    x = self.block_d("Mixed_7a", x)
    x = self.block_e("Mixed_7b", x, False)
    x = self.block_e("Mixed_7c", x, True)
    return x.mean(dim=(2, 3))


def test_fid_inception_matches_torch_forward(tmp_path):
  gen = torch.Generator().manual_seed(4)
  net = _TorchInception(gen)
  x = torch.rand(2, 3, 83, 79, generator=gen)  # [0, 1]; not resized (the resize is tested on its own)
  with torch.no_grad():
    ref = net(2 * x - 1).numpy()
  sd = dict(net.sd, **{"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)})
  torch.save(sd, tmp_path / "pt_inception.pth")
  variables = fid.load_weights(tmp_path / "pt_inception.pth")
  fn = fid.make_feature_fn(variables, resize=False)
  ours = np.asarray(fn(x.permute(0, 2, 3, 1).numpy()))
  assert ours.shape == (2, 2048) and np.abs(ref).max() > 0.1
  np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())
  # the loader insists on a complete, matching state dict
  broken = {k: v for k, v in sd.items() if not k.startswith("Mixed_6c.branch7x7_2.")}
  with pytest.raises(fid.FIDWeightError, match="missing"):
    fid.convert_weights(broken)
  bad = dict(sd, **{"Mixed_7c.branch1x1.conv.weight": torch.zeros(320, 2048, 3, 3)})
  with pytest.raises(fid.FIDWeightError, match="wrong shape"):
    fid.convert_weights(bad)


def test_image_features_batches_and_scales():
  seen = []

  def fake(batch):  # stands in for the jitted network: per-image channel means
    seen.append(batch.shape)
    return batch.mean(axis=(1, 2))

  rng = np.random.default_rng(5)
  imgs = [rng.integers(0, 256, (6, 5, 3), dtype=np.uint8) for _ in range(7)]
  feats = fid.image_features(fake, imgs, batch_size=3)
  assert seen == [(3, 6, 5, 3)] * 3  # last batch padded to the same shape
  np.testing.assert_allclose(feats, np.stack([im.mean(axis=(0, 1)) / 255 for im in imgs]), rtol=1e-6)
