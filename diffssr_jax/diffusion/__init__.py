"""The diffusion model: float64 schedules (`schedules`), the forward and reverse process math (`process`),
the RRDB + U-Net + schedule as one object (`model`), and the samplers (`sampling`)."""
