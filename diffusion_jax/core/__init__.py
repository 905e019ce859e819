"""Pure math of diffusion models: schedules, the Gaussian process, likelihood, losses, keys.

Modules here import only jax, numpy, chex and flax.struct.
"""
