"""Evaluation: SR metrics (`metrics`), LPIPS and FID (`lpips`, `fid`), result files (`results`) and the
benchmark evaluation command (`evaluate`)."""
