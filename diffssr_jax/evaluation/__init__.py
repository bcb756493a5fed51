"""Evaluation: SR metrics (`metrics`), LPIPS and FID (`lpips`, `fid`), result files (`results`), the table's
rows (`methods`: bicubic, RRDB, diffusion) and the benchmark evaluation command (`evaluate`)."""
