"""Shared defaults: the SAM-DiffSR x4 setting (official `configs/sam/sam_diffsr_df2k4x.yaml` and its bases).

Not launched directly; the runnable configs import `get_config()` from here and change what differs.
Sources: [O:key] = official hparams key, [P:sec] = paper section (arXiv 2402.17133).
"""
import ml_collections

from diffssr_jax import conventions


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 1234                                  # [O:seed]
  c.task = "diffusion"                           # "diffusion" | "rrdb" (encoder pre-training)
  c.compilation_cache = "auto"                   # JAX persistent compilation cache: auto | a folder | "" (off)

  c.model = m = ml_collections.ConfigDict()
  m.scale = 4                                    # [O:sr_scale]
  m.unet_dim = 64                                # [O:hidden_size]
  m.unet_dim_mults = (1, 2, 3, 4)                # [O:unet_dim_mults] 1|2|3|4 (the base SRDiff yaml says 1|2|2|4)
  m.rrdb_num_feat = 64                           # [O:rrdb_num_feat]
  m.rrdb_num_blocks = 17                         # [O:rrdb_num_block]
  m.rrdb_growth = 32                             # [O:rrdb_num_feat // 2]
  m.dtype = "auto"                               # compute dtype: auto = bfloat16 on GPU/TPU, float32 on CPU
  m.remat_rrdb = False                           # recompute RRDB blocks in the backward pass (trained RRDB only)
  m.rrdb_unroll = 1                              # RRDB trunk scan unroll (1: compile time flat in the blocks)
  m.remat_unet = False                           # recompute U-Net ResnetBlocks in the backward pass (less memory)
  m.cond_sam = False                             # [O:sam_config.cond_sam] SPE map into the U-Net's condition
                                                 # (Table 7's SAM+SRDiff: configs/sam_srdiff_df2k_x4.py)

  c.diffusion = d = ml_collections.ConfigDict()
  d.timesteps = 100                              # [O:timesteps] [P:4.1] T = 100
  d.beta_schedule = "cosine"                     # [O:beta_schedule]
  d.beta_s = 0.008                               # [O:beta_s]
  d.beta_start = 1e-4
  d.beta_end = 0.02                              # [O:beta_end] (linear schedule only)
  d.modulation = "reference"                     # [O:sam_config.p_losses_sam + mask_coefficient]; "paper" = eq. 9-12
  d.loss = "l1"                                  # [O:loss_type]; the paper writes L2 (eq. 5)
  d.res_rescale = 2.0                            # [O:res_rescale]
  d.clip_input = True                            # [O:clip_input]

  c.optim = o = ml_collections.ConfigDict()
  o.lr = 2e-4                                    # [O:lr] [P:4.1]
  o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8           # Adam, torch defaults (the official trainer sets none)
  o.schedule = "step"                            # official StepLR
  o.decay_steps = 200_000                        # [O:decay_steps]
  o.decay_rate = 0.5                             # StepLR gamma in the official SRDiffTrainer
  o.min_lr_ratio = 0.0                           # cosine only
  o.grad_accum_steps = 1                         # micro-batches per optimizer step, summed in one call (train_step.make_step)
  o.grad_clip = 10.0                             # [O:clip_grad_norm]
  o.ema_decay = 0.0                              # 0 disables EMA (the official code keeps none)
  o.train_rrdb = False                           # [O:fix_rrdb] true
  o.aux_l1_weight = 1.0                          # [O:aux_l1_loss], used only when the RRDB is trained

  c.data = dt = ml_collections.ConfigDict()      # the training input (diffssr_jax/data/pipeline.py)
  dt.train_files = ""                            # TFRecord shards from tools/export_sam_masks.py (glob, folder, file)
  dt.demo_dir = ""                               # if set, the demo shards are built there when missing
  dt.patch_size = 160                            # [O:patch_size] HR patch side, a multiple of the scale
  dt.hflip = False                               # [O:data_augmentation] false
  dt.rot90 = False
  dt.reduce_constant_spe = True                  # [O:sam_data_config.all_same_mask_to_zero] is false; [P:4.3] ablation prefers reduce
  dt.lr_up_divisor = 256.0                       # official quirk: imresize(lr / 256, 4)
  dt.shuffle = True                              # seeded global shuffle, a new order each epoch
  dt.num_epochs = 0                              # 0: repeat forever
  dt.num_workers = 8                             # [O:num_workers] grain worker processes (0: in-process)
  dt.prefetch_buffer = 2                         # batches buffered per worker process
  dt.read_threads = 2                            # threads per process reading/decoding records
  dt.read_buffer = 32                            # records prefetched by those threads
  dt.verify_crc = True                           # check each record's CRC when reading it
  dt.with_metadata = False                       # add record_index and patch_yx to batches (tests, debugging)
  dt.check_manifest = True                       # refuse shards whose export manifest has another scale

  c.eval = e = ml_collections.ConfigDict()       # validation during training
  e.hr_dir = ""                                  # folder of held-out HR images ("" = no validation)
  e.lr_dir = ""                                  # optional paired LR folder
  e.max_images = 8                               # [O:valid_steps] x eval_batch_size = 4 images
  e.crop_size = 256                              # centre crop (HR px) so the sampler compiles once
  e.batch_size = 4
  e.sampler = "ddpm"                             # the official validation samples all T steps
  e.steps = 0                                    # 0: all T steps (ddpm); ddim needs a count
  e.eta = conventions.DEFAULT_ETA             # DDIM only: 1 (ancestral); 0 was 5.3 dB worse (README)

  c.rrdb_pretrain = r = ml_collections.ConfigDict()  # RRDB stage run first when no rrdb_checkpoint is given
  r.num_steps = 0
  r.batch_size = 64
  r.lr = 2e-4
  r.schedule = "constant"

  c.distill = ds = ml_collections.ConfigDict()   # task "distill" only: a few-step student (training/distill.py)
  ds.teacher_workdir = ""                        # a trained diffusion workdir (required for task distill)
  ds.teacher_step = 0                            # its checkpoint step; 0: the newest verified one
  ds.teacher_use_ema = True                      # the teacher's EMA weights when its checkpoint has them
  ds.skip = 10                                   # teacher DDIM step length in timesteps (CD's discretisation)
  ds.loss = "l2"                                 # the consistency loss d(): l2 (CD's) or l1

  c.train = t = ml_collections.ConfigDict()
  t.batch_size = 64                              # [O:batch_size] global, split over processes and devices
  t.num_steps = 400_000                          # [O:max_updates]
  t.log_every = 100                              # [O:tb_log_interval]
  t.eval_every = 4_000                           # [O:val_check_interval]
  t.checkpoint_every = 4_000
  t.keep_checkpoints = 3
  t.state_layouts = "auto"                       # the train state's device layouts: auto (XLA's: no weight transposes
                                                 # per step on GPU) or default (row-major); train_step.LaidOutStep
  t.profile_at = 0                               # > 0: a JAX profiler trace from this step, into WORKDIR/profile
  t.profile_steps = 5                            # steps in that trace
  t.rrdb_checkpoint = ""                         # [O:rrdb_ckpt] our RRDB workdir or an official .ckpt
  return c
