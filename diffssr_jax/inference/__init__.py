"""Inference: the Upscaler API (`upscaler`), tiled super-resolution of large images (`tiling`) and the
upscale command (`upscale`)."""
