"""diffssr-jax: structure-modulated diffusion super-resolution (SAM-DiffSR) in JAX/Flax.

Subpackages follow the data path: `data` (export, records, input pipeline; no jax) -> `models` (Flax
networks) -> `diffusion` (schedules, process, samplers) -> `training` -> `evaluation` / `inference`;
`benchmarks` measures them. The numpy-only modules (`conventions`, `images`, `fileio`, `data.*`) stay
importable without JAX for the torch-only mask export tool, so nothing is imported here eagerly.
"""

__version__ = "0.1.0"
