"""Short distillation measurement (README, "A 1-4 step student"): the teacher (DDPM-100; DDIM eta 1 at 1, 2, 4,
25 steps; DDIM eta 0 at 10 steps, the ODE the student distils at distill.skip = 10) vs the student at 1, 2, 4
steps with its EMA weights (what the CLIs load by default) and its raw weights, on the demo's held-out photos
(centre 192x192 HR crops, crop border 4, seed 0): mean PSNR-Y / SSIM-Y (and LPIPS when both weight files are
given) and seconds per image (compile excluded). One JSON line per setting. Expects ROOT/teacher,
ROOT/student and ROOT/data/demo/val:

  python tools/measure_student.py ROOT
  python tools/measure_student.py ROOT --only student          # the student rows only (the teacher's do not change)
  python tools/measure_student.py ROOT --only teacher --teacher_step 900   # a teacher checkpoint during its training
  python tools/measure_student.py ROOT --only student --student_step 1500 --ema_only   # a student checkpoint
  python tools/measure_student.py ROOT --lpips_backbone alexnet-owt-7be5be79.pth --lpips_lin alex.pth
"""
import argparse, json, time

import numpy as np

from diffssr_jax import cli  # noqa: F401  first: JAX_PLATFORMS=cpu without an accelerator, as the commands do
from diffssr_jax import images, storage
from diffssr_jax.data.imresize import imresize
from diffssr_jax.evaluation import metrics
from diffssr_jax.inference.upscaler import Upscaler

# (model, sampler, steps, eta, use_ema). The teacher is always sampled with its EMA weights.
TEACHER = [("teacher", "ddpm", None, 0.0, True)] + [("teacher", "ddim", k, 1.0, True) for k in (1, 2, 4, 25)] + \
          [("teacher", "ddim", 10, 0.0, True)]
STUDENT = [("student", "student", k, 0.0, ema) for ema in (True, False) for k in (1, 2, 4)]


def crop(img, c=192):
  h, w = img.shape[:2]; y, x = (h - c) // 2 // 4 * 4, (w - c) // 2 // 4 * 4
  return img[y:y + c, x:x + c]


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("root", nargs="?", default="runs")
  ap.add_argument("--only", choices=("teacher", "student"), help="measure one model's rows only")
  ap.add_argument("--teacher_step", type=int, help="the teacher's checkpoint step (default: its newest)")
  ap.add_argument("--student_step", type=int, help="the student's checkpoint step (default: its newest)")
  ap.add_argument("--ema_only", action="store_true", help="the student's EMA rows only (what the CLIs load)")
  ap.add_argument("--lpips_backbone", help="torchvision AlexNet/VGG16 weights (.pth) for LPIPS")
  ap.add_argument("--lpips_lin", help="LPIPS v0.1 linear-layer weights (.pth)")
  ap.add_argument("--lpips_net", choices=("alex", "vgg"), default="alex")
  a = ap.parse_args()
  if bool(a.lpips_backbone) != bool(a.lpips_lin):
    ap.error("LPIPS needs both --lpips_backbone and --lpips_lin")
  root = storage.native(a.root)
  lpips_fn = None
  if a.lpips_backbone:  # before any sampling: a bad weight file fails at once
    from diffssr_jax.evaluation import lpips
    lpips_fn = lpips.make_lpips_fn(a.lpips_net, lpips.load_weights(a.lpips_net, a.lpips_backbone, a.lpips_lin))
  hrs = {n: crop(images.read_rgb8(root / "data/demo/val" / f"{n}.png", warn=False)) for n in ("chelsea", "coffee")}
  lrs = {n: np.clip(np.round(imresize(h.astype(np.float64), 0.25)), 0, 255).astype(np.uint8) for n, h in hrs.items()}
  bic = [metrics.psnr_y(np.clip(np.round(imresize(l.astype(np.float64), 4)), 0, 255).astype(np.uint8), hrs[n], 4)
         for n, l in lrs.items()]
  rows = {None: TEACHER + STUDENT, "teacher": TEACHER, "student": STUDENT}[a.only]
  rows = [r for r in rows if r[4] or not a.ema_only]
  for who, sampler, steps, eta, ema in rows:
    up = Upscaler.load(workdir=root / who, step=a.teacher_step if who == "teacher" else a.student_step,
                       sampler=sampler, steps=steps, eta=eta, use_ema=ema)
    up.upscale(lrs["chelsea"], seed=0)  # compile
    p, s, lp, t0 = [], [], [], time.time()
    srs = {}
    for n in hrs:
      srs[n] = up.upscale(lrs[n], seed=0)
    dt = (time.time() - t0) / len(hrs)
    for n, sr in srs.items():
      p.append(metrics.psnr_y(sr, hrs[n], 4)); s.append(metrics.ssim_y(sr, hrs[n], 4))
      if lpips_fn is not None:
        lp.append(float(lpips.lpips_images(lpips_fn, sr, hrs[n])[0]))
    row = {"model": who, "step": up.step, "weights": "ema" if ema else "raw", "sampler": sampler,
           "steps": up.num_steps, "eta": eta, "psnr_y": round(float(np.mean(p)), 2),
           "ssim_y": round(float(np.mean(s)), 3), "s_per_image": round(dt, 2),
           "bicubic_psnr_y": round(float(np.mean(bic)), 2)}
    if lpips_fn is not None:
      row["lpips"] = round(float(np.mean(lp)), 4)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
