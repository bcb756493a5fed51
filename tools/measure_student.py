"""Short distillation measurement (README, "A 1-4 step student"): teacher DDPM-100 and DDIM eta 1 at 1, 2, 4,
25 steps vs the student at 1, 2, 4 steps on the demo's held-out photos (centre 192x192 HR crops, crop border
4), mean PSNR-Y / SSIM-Y and seconds per image. Expects ROOT/teacher, ROOT/student and ROOT/data/demo/val:

  python tools/measure_student.py ROOT      (teacher: EMA weights; student: raw weights)
"""
import json, sys, time
ROOT = sys.argv[1] if len(sys.argv) > 1 else "runs"
import numpy as np
from diffssr_jax import images
from diffssr_jax.data.imresize import imresize
from diffssr_jax.evaluation import metrics
from diffssr_jax.inference.upscaler import Upscaler

def crop(img, c=192):
  h, w = img.shape[:2]; y, x = (h - c) // 2 // 4 * 4, (w - c) // 2 // 4 * 4
  return img[y:y + c, x:x + c]

hrs = {n: crop(images.read_rgb8(f"{ROOT}/data/demo/val/{n}.png", warn=False)) for n in ("chelsea", "coffee")}
lrs = {n: np.clip(np.round(imresize(h.astype(np.float64), 0.25)), 0, 255).astype(np.uint8) for n, h in hrs.items()}
settings = [("teacher", "ddpm", None, 0.0)] + [("teacher", "ddim", k, 1.0) for k in (1, 2, 4)] + \
           [("student", "student", k, 0.0) for k in (1, 2, 4)] + [("teacher", "ddim", 25, 1.0)]
for who, sampler, steps, eta in settings:
  up = Upscaler.load(workdir=f"{ROOT}/{who}", sampler=sampler, steps=steps, eta=eta, use_ema=(who == "teacher"))
  up.upscale(lrs["chelsea"], seed=0)  # compile
  p, s, t0 = [], [], time.time()
  for n in hrs:
    sr = up.upscale(lrs[n], seed=0)
    p.append(metrics.psnr_y(sr, hrs[n], 4)); s.append(metrics.ssim_y(sr, hrs[n], 4))
  dt = (time.time() - t0) / len(hrs)
  bic = [metrics.psnr_y(np.clip(np.round(imresize(l.astype(np.float64), 4)), 0, 255).astype(np.uint8), hrs[n], 4) for n, l in lrs.items()]
  print(json.dumps({"model": who, "sampler": sampler, "steps": up.num_steps, "eta": eta, "psnr_y": round(float(np.mean(p)), 2),
                    "ssim_y": round(float(np.mean(s)), 3), "s_per_image": round(dt, 2), "bicubic_psnr_y": round(float(np.mean(bic)), 2)}), flush=True)
