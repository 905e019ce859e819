"""Sample-quality and likelihood figures: sliced Wasserstein distance, the shapes judge."""

from diffusion_jax.evaluation.swd import images_to_unit_range, sliced_wasserstein

__all__ = ["images_to_unit_range", "sliced_wasserstein"]
