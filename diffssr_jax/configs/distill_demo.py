"""Demo distillation: a 1-4 step student of the demo model (diffssr_jax/configs/demo.py), on the same demo data.

  python -m diffssr_jax.main --config demo --workdir runs/demo              # the teacher first
  python -m diffssr_jax.main --config distill_demo --workdir runs/demo_student
  diffssr-upscale --workdir runs/demo_student --sampler student --steps 4 --input IN --output OUT

Consistency distillation of the teacher's DDIM ODE into a v-parameterised student (training/distill.py says
why this method); the student starts from the teacher's U-Net and shares its frozen RRDB. The model and
diffusion sections are the demo's and must stay so (the student has its teacher's architecture and schedule;
a teacher of another model is refused in one line).
"""
from diffssr_jax.configs import demo


def get_config():
  c = demo.get_config()
  c.task = "distill"
  c.distill.teacher_workdir = "runs/demo"        # skip 10, loss l2: configs/base.py's distill defaults
  c.rrdb_pretrain.num_steps = 0                  # the RRDB is the teacher's
  c.optim.lr = 2e-4                              # fine-tuning the teacher's weights
  c.optim.ema_decay = 0.99
  c.train.num_steps = 600                        # meets the targets; 3000 steps: +0.06 to +0.56 dB (README)
  c.train.eval_every = 300
  c.train.checkpoint_every = 100
  c.eval.sampler = "student"
  c.eval.steps = 1                               # validation at 1 step (the hardest setting)
  return c
