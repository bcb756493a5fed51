"""Inference: the Upscaler API (`upscaler`), weights from a workdir or an official checkpoint (`loading`),
tiled super-resolution of large images (`tiling`) and the upscale command (`upscale`)."""
