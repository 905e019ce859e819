"""Sample-quality and likelihood figures: FID, KID, Inception Score and precision/recall from
features, sliced Wasserstein distance, the shapes judge."""

from diffusion_jax.evaluation.feature_metrics import (
  FeatureStats,
  frechet_distance,
  inception_score,
  kid,
  load_stats,
  precision_recall,
  save_stats,
)
from diffusion_jax.evaluation.swd import images_to_unit_range, sliced_wasserstein

__all__ = [
  "FeatureStats",
  "frechet_distance",
  "images_to_unit_range",
  "inception_score",
  "kid",
  "load_stats",
  "precision_recall",
  "save_stats",
  "sliced_wasserstein",
]
