"""Table 7's SAM+SRDiff baseline (`model.cond_sam`): the SPE map joins the U-Net's condition (official
`sam_config.cond_sam`) in training and sampling; the converter's sam_conv keys; the test-time masks (the
export's own map, evaluate and upscale with --spe_masks, tiles, one-line refusals); the three Table 7 rows."""
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffssr_jax.diffusion.model import build_model
from diffssr_jax.models import convert, official
from diffssr_jax.parallel import make_mesh, shard_batch
from diffssr_jax.training.train_step import create_train_state, make_optimizer, make_train_step

CONFIGS = pathlib.Path(__file__).parent / "configs"


def tiny_sam_config():
  spec = importlib.util.spec_from_file_location("tiny_sam_srdiff", CONFIGS / "tiny_sam_srdiff.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _batch(n=4, p=16, seed=0):
  rng = np.random.default_rng(seed)
  hr = rng.uniform(-1, 1, (n, p, p, 3)).astype(np.float32)
  lr = hr.reshape(n, p // 4, 4, p // 4, 4, 3).mean((2, 4))
  lr_up = np.repeat(np.repeat(lr, 4, 1), 4, 2)
  spe = np.repeat(np.repeat(rng.uniform(-0.3, 0.7, (n, 4, 4, 1)), p // 4, 1), p // 4, 2).astype(np.float32)
  return {"hr": hr, "lr": lr, "lr_up": lr_up, "spe": spe}


def test_param_count_is_the_base_plus_the_three_sam_convs():
  cfg = tiny_sam_config()
  base_cfg = tiny_sam_config()
  base_cfg.model.cond_sam = False
  with_sam, without = build_model(cfg).param_shapes(), build_model(base_cfg).param_shapes()
  d = cfg.model.unet_dim
  # official sam_conv: Conv2d(dim + 1, dim, 1), Conv2d(dim, dim, 1) twice, all with biases
  assert _count(with_sam) - _count(without) == (d + 1) * d + d + 2 * (d * d + d)
  assert with_sam["unet"]["params"]["sam_conv_0"]["kernel"].shape == (1, 1, d + 1, d)
  assert jax.tree.map(lambda x: x.shape, with_sam["rrdb"]) == jax.tree.map(lambda x: x.shape, without["rrdb"])


def test_spe_reaches_the_unet_and_two_steps_train():
  cfg = tiny_sam_config()
  model = build_model(cfg)
  params_host = jax.device_get(model.init(jax.random.key(0)))  # the step donates its state: a fresh copy per run
  tx = make_optimizer(cfg.optim, total_steps=2)
  mesh = make_mesh(jax.devices()[:1])
  step = make_train_step(model, tx, mesh, loss_type=cfg.diffusion.loss)

  def run(batch, steps):
    state = create_train_state(model, jax.tree.map(jnp.asarray, params_host), tx, seed=3)
    losses = []
    for _ in range(steps):
      state, metrics = step(state, shard_batch(batch, mesh))
      losses.append(float(metrics["loss"]))
    return state, losses

  batch = _batch()
  state, losses = run(batch, 2)
  assert all(np.isfinite(losses)) and losses[0] != losses[1] and int(state.step) == 2
  sam0 = np.asarray(state.params["unet"]["params"]["sam_conv_0"]["kernel"])
  assert not np.array_equal(sam0, params_host["unet"]["params"]["sam_conv_0"]["kernel"])  # E's conv learns
  # The same first step (same t and noise) with another E: mode "none" keeps E out of x_t and the target, so
  # only the U-Net's condition can move the loss.
  _, other = run({**batch, "spe": batch["spe"] * 0.0}, 1)
  assert other[0] != losses[0]
  _, again = run(batch, 1)
  assert again[0] == losses[0]


def test_without_cond_sam_an_spe_map_is_refused_and_with_it_required():
  cfg = tiny_sam_config()
  model = build_model(cfg)
  params = model.init(jax.random.key(0))
  lr = jnp.zeros((1, 4, 4, 3))
  _, feats = model.encode(params["rrdb"], lr)
  with pytest.raises(ValueError, match="needs the SPE map"):
    model.condition(params["unet"], feats)
  with pytest.raises(ValueError, match="expected"):
    model.condition(params["unet"], feats, jnp.zeros((1, 8, 8, 1)))
  cfg.model.cond_sam = False
  plain = build_model(cfg)
  with pytest.raises(ValueError, match="takes no SPE map"):
    plain.condition(plain.init(jax.random.key(0))["unet"], feats, jnp.zeros((1, 16, 16, 1)))


def test_official_sam_conv_keys_convert_both_ways():
  cfg = tiny_sam_config()
  params = jax.device_get(build_model(cfg).init(jax.random.key(0)))
  sd = official.to_official(params, cfg)
  d = cfg.model.unet_dim
  assert sd["denoise_fn.sam_conv.0.weight"].shape == (d, d + 1, 1, 1)       # torch Conv2d (O, I, kH, kW)
  assert sd["denoise_fn.sam_conv.2.bias"].shape == (d,)
  overrides, back = official.from_official(sd)
  assert overrides["model.cond_sam"] is True
  jax.tree.map(np.testing.assert_array_equal, back, params)
  cfg.model.cond_sam = False
  with pytest.raises(convert.ConversionError, match="unexpected.*sam_conv"):
    convert.check_against(back, build_model(cfg).param_shapes())
  sd_plain = {k: v for k, v in sd.items() if "sam_conv" not in k}
  assert official.config_from_state_dict(sd_plain)["model.cond_sam"] is False


def test_config_refuses_validation_and_distillation():
  from diffssr_jax.training import config_check
  cfg = tiny_sam_config()
  assert not [p for p in config_check.problems(cfg) if "cond_sam" in p or "hr_dir" in p]
  cfg.eval.hr_dir = "/some/val"
  assert any(p.startswith("eval.hr_dir=") and "--spe_masks" in p for p in config_check.problems(cfg))


# ---------------------------------------------------------------- sampling, evaluation, tiling
def _hr(seed, h=32, w=32):
  from diffssr_jax.data.imresize import imresize
  rng = np.random.default_rng(seed)
  return imresize(rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3)).astype(np.uint8), output_shape=(h, w))


def _write_masks(folder, names, hw=(32, 32), split_at=12):
  """Two masks per image, the rows above / below `split_at` (saved as the export's --keep_masks does)."""
  from diffssr_jax.data import rle
  for name in names:
    m = np.zeros((2,) + hw, bool)
    m[0, :split_at], m[1, split_at:] = True, True
    rle.write_mask_file(folder / "masks" / f"{name}.json", m)
  return str(folder)


@pytest.fixture(scope="module")
def sam_up():
  from diffssr_jax.inference.upscaler import Upscaler
  from test_inference import fast_params
  cfg = tiny_sam_config()
  model = build_model(cfg)
  return Upscaler(model, fast_params(model), config=cfg, sampler="ddim", steps=2, multiple=16)


def test_sampler_takes_the_spe_as_condition(sam_up):
  lr = _hr(0, 8, 8)[None]
  spe = np.zeros((1, 32, 32), np.float32)
  a = sam_up.super_resolve_batch(lr, seed=0, spe=spe)[0]
  assert np.array_equal(a, sam_up.super_resolve_batch(lr, seed=0, spe=spe)[0])
  assert not np.allclose(a, sam_up.super_resolve_batch(lr, seed=0, spe=spe + 0.5)[0])
  with pytest.raises(ValueError, match="needs the images' SPE maps"):
    sam_up.super_resolve_batch(lr, seed=0)
  with pytest.raises(ValueError, match="spe has shape"):
    sam_up.super_resolve_batch(lr, seed=0, spe=np.zeros((1, 16, 16), np.float32))


def test_evaluation_with_masks_and_its_one_line_refusals(sam_up, tmp_path):
  from diffssr_jax import images
  from diffssr_jax.data.spe_masks import SpeMaskError
  from diffssr_jax.evaluation import evaluate, results
  hr_dir = tmp_path / "A" / "HR"
  for i in range(2):
    images.save_png(hr_dir / f"img{i}.png", _hr(i))
  masks = _write_masks(tmp_path / "masks_a", ["img0", "img1"])
  other = _write_masks(tmp_path / "masks_b", ["img0", "img1"], split_at=20)
  kw = dict(step_tag="5", methods=("diffusion",), batch_size=2, seed=1, show_progress=False)
  table = evaluate.evaluate_all(sam_up, {"A": str(hr_dir)}, tmp_path / "o1", spe_masks={"A": masks}, **kw)
  assert [ln.split("|")[1].strip() for ln in table.read_text().splitlines()[2:]] == [
      "SAM+SRDiff (ddim, 2 steps, eta 1)"]
  s = results.read_summary_json(tmp_path / "o1" / "A" / "5_sam_srdiff" / "summary.json")
  assert (s["spe_kind"], s["spe_masks"], s["num_images"]) == ("rope", masks, 2)
  evaluate.evaluate_all(sam_up, {"A": str(hr_dir)}, tmp_path / "o2", spe_masks={"A": other}, **kw)
  sr1 = images.read_rgb8(tmp_path / "o1" / "A" / "5_sam_srdiff" / "img0.png")
  sr2 = images.read_rgb8(tmp_path / "o2" / "A" / "5_sam_srdiff" / "img0.png")
  assert not np.array_equal(sr1, sr2)  # other masks, another SR: E reaches the sampler
  # Refusals, each before any image is made: the flag missing, an image without masks, masks for a plain model.
  with pytest.raises(SpeMaskError, match="--spe_masks: no masks for dataset A"):
    evaluate.evaluate_all(sam_up, {"A": str(hr_dir)}, tmp_path / "o3", **kw)
  images.save_png(hr_dir / "img2.png", _hr(2))
  with pytest.raises(SpeMaskError, match=r"img2\.json: no masks for image 'img2'"):
    evaluate.evaluate_all(sam_up, {"A": str(hr_dir)}, tmp_path / "o3", spe_masks={"A": masks}, **kw)
  assert not (tmp_path / "o3").exists()
  from diffssr_jax.inference.upscaler import Upscaler
  from test_inference import tiny_model
  cfg, model, params = tiny_model()
  plain = Upscaler(model, params, config=cfg, sampler="ddim", steps=2, multiple=16)
  with pytest.raises(SpeMaskError, match="only for the diffusion row of a SAM\\+SRDiff model"):
    evaluate.evaluate_all(plain, {"A": str(hr_dir)}, tmp_path / "o3", spe_masks={"A": masks}, **kw)


def test_cli_refuses_a_sam_srdiff_checkpoint_without_masks_in_one_line(tmp_path, capsys):
  import torch
  from diffssr_jax import images
  from diffssr_jax.evaluation import evaluate
  cfg = tiny_sam_config()
  sd = official.to_official(jax.device_get(build_model(cfg).init(jax.random.key(0))), cfg)
  ckpt = tmp_path / "sam_srdiff.ckpt"
  torch.save({"state_dict": {"model": {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}}}, ckpt)
  images.save_png(tmp_path / "A" / "img0.png", _hr(0))
  args = ["diffssr-evaluate", "--checkpoint", str(ckpt), "--output", str(tmp_path / "o"),
          "--datasets", f"A={tmp_path / 'A'}", "--sampler", "ddim", "--steps", "2", "--noprogress"]
  assert evaluate.cli(args) == 1
  err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("model:")]
  assert len(err) == 1 and "--spe_masks: no masks for dataset A" in err[0], err
  assert evaluate.cli(args + ["--spe_masks", f"A={tmp_path / 'nowhere'}"]) == 1
  err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("model:")]
  assert len(err) == 1 and "nowhere: no such folder" in err[0], err
  assert not (tmp_path / "o").exists()


def test_spe_is_cut_with_the_image_tiles():
  from diffssr_jax.inference.tiling import upscale_tiled
  rng = np.random.default_rng(0)
  lr = rng.uniform(0, 255, (24, 40, 3)).astype(np.float32)
  spe = rng.uniform(-1, 1, (96, 160, 1)).astype(np.float32)
  # A per-pixel sr_fn: any error in cutting E into the tiles' windows shows in the blend.
  def sr_fn(batch, side):
    return np.repeat(np.repeat(batch, 4, 1), 4, 2) + side
  whole = np.repeat(np.repeat(lr, 4, 0), 4, 1) + spe
  for tile, overlap in ((8, 0), (16, 4)):  # (8, 0): tile-aligned, no blending; (16, 4): overlapping, last flush
    out = upscale_tiled(lr, sr_fn, 4, tile=tile, overlap=overlap, batch_size=3, hr_side=spe)
    np.testing.assert_allclose(out, whole, rtol=0, atol=1e-4)
  with pytest.raises(ValueError, match="hr_side has shape"):
    upscale_tiled(lr, sr_fn, 4, tile=8, overlap=0, hr_side=spe[:90])


def test_upscale_cli_with_masks_and_its_one_line_refusals(tmp_path, capsys):
  from diffssr_jax import images
  from diffssr_jax.data import rle
  from diffssr_jax.inference import upscale
  from test_inference import fast_params, tiny_model
  from test_upscale import _make_workdir

  def sam_model():
    cfg = tiny_sam_config()
    model = build_model(cfg)
    return cfg, model, fast_params(model)

  work = _make_workdir(tmp_path / "work", sam_model, 3)
  src = tmp_path / "in"
  images.save_png(src / "a.png", _hr(0, 8, 8))  # whole, and b's tiles: one (4, 8, 8) batch shape, one compile
  images.save_png(src / "sub" / "b.png", _hr(1, 12, 8))
  masks = tmp_path / "masks"
  m = np.zeros((2, 8, 8), bool)
  m[0, :3], m[1, 3:] = True, True
  rle.write_mask_file(masks / "masks" / "a.json", m)                       # LR-size masks (the export at --scale 1)
  m = np.zeros((2, 48, 32), bool)
  m[0, :, :10], m[1, :, 10:] = True, True
  rle.write_mask_file(masks / "masks" / "sub" / "b.json", m)               # HR-size masks

  def run(*args, work=work, out="out"):
    code = upscale.cli(["upscale", str(src), "--output", str(tmp_path / out), "--workdir", str(work),
                        "--sampler", "ddim", "--steps", "2", "--noprogress", *args])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    return code, err

  code, err = run()
  assert code == 1 and len(err) == 1 and "needs the inputs' masks: --spe_masks" in err[0], err
  (masks / "masks" / "sub" / "b.json").rename(masks / "b.json")
  code, err = run("--spe_masks", str(masks))
  assert code == 1 and len(err) == 1 and "no masks for image 'sub/b'" in err[0], err
  assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))
  (masks / "b.json").rename(masks / "masks" / "sub" / "b.json")
  code, err = run("--spe_masks", str(masks), "--tile", "8", "--overlap", "2")  # b (12x8) goes through tiles
  assert code == 0 and not err, err
  assert images.read_rgb8(tmp_path / "out" / "a.png").shape == (32, 32, 3)
  assert images.read_rgb8(tmp_path / "out" / "sub" / "b.png").shape == (48, 32, 3)
  plain = _make_workdir(tmp_path / "plain", tiny_model, 1)
  code, err = run("--spe_masks", str(masks), work=plain, out="out2")
  assert code == 1 and len(err) == 1 and "takes no masks" in err[0], err


def test_test_time_spe_equals_the_exports_own_map(tmp_path):
  """The masks the export keeps give, at test time, the SPE map the export wrote into the training records."""
  from skimage import data as skdata
  from diffssr_jax import images
  from diffssr_jax.data import export, hr_sources, records, segmenters, tfrecord
  from diffssr_jax.data.spe_masks import SpeMasks
  images.save_png(tmp_path / "hr" / "sub" / "coffee.png", skdata.coffee()[:66, :64])  # trimmed to 64x64
  cfg = export.ExportConfig(scale=4, tile_size=64, tile_step=64, min_tile=32, num_shards=1, keep_masks=True,
                            spe_kind="sincos")
  export.run_export(hr_sources.FolderSource(tmp_path / "hr"), tmp_path / "out", cfg,
                    segmenter=segmenters.FelzenszwalbSegmenter(scale=20, min_size=20), progress=False)
  (tile,) = [records.decode_tile(r) for r in tfrecord.iter_records(next((tmp_path / "out").glob("*.tfrecord")))]
  masks = SpeMasks(tmp_path / "out")
  assert masks.kind == "sincos"                               # from the export's manifest
  masks.check(["sub/coffee"], [(64, 64)])
  e = masks.spe("sub/coffee", (64, 64))
  assert len(np.unique(e)) >= 3                                # a structured map, not a constant
  # The export sums regions from a label map (bincount), we from the kept masks: equal up to summation order.
  np.testing.assert_allclose(e, np.asarray(tile.spe, np.float32).reshape(64, 64), rtol=0, atol=1e-6)


def test_the_three_table7_models_get_their_own_folders_and_rows_in_one_table(tmp_path):
  from types import SimpleNamespace as NS
  from diffssr_jax.evaluation import evaluate, methods, paper_table, results
  models = {"SRDiff": NS(needs_spe=False, modulation="none"), "SAM+SRDiff": NS(needs_spe=True, modulation="none"),
            "SAM-DiffSR": NS(needs_spe=False, modulation="reference")}
  tags = {label: methods.method_tag("diffusion", "9", methods.model_variant(NS(model=m))) for label, m in models.items()}
  assert tags == {"SRDiff": "9_srdiff", "SAM+SRDiff": "9_sam_srdiff", "SAM-DiffSR": "9"}
  for label, tag in reversed(tags.items()):  # written in another order than the table's
    results.write_summary_json(tmp_path / "A" / tag / "summary.json", {"label": label, "psnr_y": 20.0, "ssim_y": 0.5})
  md = paper_table.write_table(tmp_path, "9", methods.table_tags("9"), ["A"])
  assert [ln.split("|")[1].strip() for ln in md.read_text().splitlines()[2:]] == ["SRDiff", "SAM+SRDiff", "SAM-DiffSR"]
