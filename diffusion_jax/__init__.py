"""Denoising diffusion models in JAX/Flax."""
