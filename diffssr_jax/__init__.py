"""diffssr-jax: structure-modulated diffusion super-resolution (SAM-DiffSR) in JAX/Flax.

This package must stay importable without JAX for its numpy-only modules (`spe`, `imresize`,
`images`, `data.records`, `data.tfrecord`), which the torch-only SAM export tool uses: so nothing is
imported here eagerly.
"""

__version__ = "0.1.0"
