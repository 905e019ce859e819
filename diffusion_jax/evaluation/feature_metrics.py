"""Sample-quality metrics from network features: FID, KID, Inception Score, precision/recall.

Each metric takes features already extracted (Inception pool features [N, 2048], logits
[N, 1008]) and computes in NumPy float64, so that the figures are the reference tools' figures:

  FID        pytorch-fid's `calculate_frechet_distance` (the TTUR formula, scipy's sqrtm);
  KID        torch-fidelity's unbiased polynomial-kernel MMD² over random subsets;
  IS         torch-fidelity's `isc` (the OpenAI formula over shuffled splits);
  precision/recall  Kynkäänniemi et al. 2019, as torch-fidelity's `prc` computes it.

KID and IS draw their subsets and shuffles with NumPy's `RandomState(seed)` exactly as
torch-fidelity does (same seed, same draws), which is why this module uses `np.random` at all.
FID statistics are streamed through `FeatureStats` and stored in the TTUR / pytorch-fid `.npz`
format (`mu`, `sigma`), so published reference statistics load unchanged.
"""

import os
import zipfile

import numpy as np
from absl import logging
from scipy import linalg

# Rows x columns of one block of a distance matrix in `precision_recall`: 2^24 float64 = 128 MiB.
_BLOCK_ELEMENTS = 1 << 24


class FeatureStats:
  """Streaming mean and covariance of features, in float64.

  The state is the count n, the mean μ and M2 = Σ (x - μ)(x - μ)ᵀ. Batches are merged with the
  parallel update of Chan et al. (1979): for parts a and b with δ = μ_b - μ_a,

    n = n_a + n_b,  μ = μ_a + δ n_b / n,  M2 = M2_a + M2_b + δ δᵀ n_a n_b / n,

  so the result does not depend on how the features are split into batches (up to rounding),
  and, unlike a raw sum of outer products, loses no precision when the mean is large. The
  covariance is unbiased (ddof=1), np.cov's and hence pytorch-fid's.
  """

  def __init__(self, dim: int | None = None):
    """An empty accumulator; `dim` (the feature size D) is fixed by the first batch if None."""
    self.dim = dim
    self.count = 0
    self._mean = None if dim is None else np.zeros(dim, np.float64)
    self._m2 = None if dim is None else np.zeros((dim, dim), np.float64)

  def update(self, features: np.ndarray) -> "FeatureStats":
    """Adds a batch of features.

    Args:
      features: [B, D] float features (B may be 0).

    Returns:
      self, updated in place.
    """
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or (self.dim is not None and features.shape[1] != self.dim):
      want = "[B, D]" if self.dim is None else f"[B, {self.dim}]"
      raise ValueError(f"FeatureStats.update needs features {want}, got shape {features.shape}")
    if len(features) == 0:
      return self
    mean = features.mean(axis=0)
    centered = features - mean
    self._merge(len(features), mean, centered.T @ centered)
    return self

  def merge(self, other: "FeatureStats") -> "FeatureStats":
    """Returns the statistics of both sets of features together (neither input changes)."""
    if self.dim is not None and other.dim is not None and self.dim != other.dim:
      raise ValueError(f"FeatureStats.merge of dimensions {self.dim} and {other.dim}")
    out = FeatureStats(self.dim if self.dim is not None else other.dim)
    for part in (self, other):
      if part.count:
        out._merge(part.count, part._mean, part._m2)
    return out

  def _merge(self, count: int, mean: np.ndarray, m2: np.ndarray):
    if self.count == 0:
      self.dim = len(mean)
      self.count, self._mean, self._m2 = count, mean.copy(), m2.copy()
      return
    total = self.count + count
    delta = mean - self._mean
    self._mean = self._mean + delta * (count / total)
    self._m2 = self._m2 + m2 + np.outer(delta, delta) * (self.count * count / total)
    self.count = total

  @property
  def mean(self) -> np.ndarray:
    """μ: [D] float64, the mean of the features seen."""
    if self.count == 0:
      raise ValueError("FeatureStats.mean of no features")
    return self._mean.copy()

  @property
  def cov(self) -> np.ndarray:
    """Σ = M2 / (n - 1): [D, D] float64, the unbiased covariance (np.cov(x, rowvar=False))."""
    if self.count < 2:
      raise ValueError(f"FeatureStats.cov needs at least 2 features, got {self.count}")
    return self._m2 / (self.count - 1)


def frechet_distance(
  mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
  """d² = ‖μ1 - μ2‖² + Tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^½), the Fréchet distance of two Gaussians.

  pytorch-fid's `calculate_frechet_distance` step for step, in float64: (Σ1 Σ2)^½ by
  scipy.linalg.sqrtm; if that is not finite (a singular product), once more with eps·I added
  to both covariances; a complex result keeps its real part when the imaginary parts of its
  diagonal are within 1e-3 of zero, and is an error otherwise.

  Args:
    mu1, mu2: [D] means (e.g. `FeatureStats.mean` of generated and of reference features).
    sigma1, sigma2: [D, D] covariances.
    eps: the diagonal offset of the retry.

  Returns:
    The distance (FID when the features are Inception pool features) as a Python float.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(
      f"frechet_distance needs means [D] and covariances [D, D], got {mu1.shape}, "
      f"{sigma1.shape}, {mu2.shape}, {sigma2.shape}"
    )
  diff = mu1 - mu2
  covmean = linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    logging.warning("FID: singular product of covariances; adding %s to their diagonals", eps)
    offset = np.eye(len(sigma1)) * eps
    covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def kid(
  features_a: np.ndarray,
  features_b: np.ndarray,
  *,
  num_subsets: int = 100,
  subset_size: int = 1000,
  degree: int = 3,
  gamma: float | None = None,
  coef0: float = 1.0,
  seed: int = 2020,
) -> tuple[float, float]:
  """KID: the unbiased MMD² of k(x, y) = (γ ⟨x, y⟩ + c)^d, averaged over random subsets.

  For subsets X of a and Y of b, both of m = `subset_size` rows (drawn without replacement),

    MMD² = Σ_{i≠j} (k(x_i, x_j) + k(y_i, y_j)) / (m (m - 1)) - 2 Σ_{i,j} k(x_i, y_j) / m².

  torch-fidelity's `kid_features_to_metric` exactly: subset i draws X, then Y, with
  `RandomState(seed).choice(n, m, replace=False)` from one generator, and the same defaults
  (100 subsets of 1000, d = 3, γ = 1/D, c = 1, seed 2020). Like torch-fidelity (and unlike
  clean-fid, which shrinks m), a set smaller than `subset_size` is an error. The arithmetic is
  float64; torch-fidelity computes in the features' dtype (float32 from Inception), which
  moves its mean by parts in 1e7 and its std by parts in 1e6.

  Args:
    features_a: [N_a, D] features (e.g. generated), N_a >= subset_size.
    features_b: [N_b, D] features (e.g. reference), N_b >= subset_size.
    num_subsets, subset_size: the number and size m of subset pairs.
    degree, gamma, coef0: the polynomial kernel's d, γ (None: 1/D) and c.
    seed: seed of the NumPy RandomState drawing the subsets.

  Returns:
    (mean, std) over the subsets, Python floats; std is the population std (ddof=0).
  """
  a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f"kid needs features [N, D] of one D, got {a.shape} and {b.shape}")
  if min(len(a), len(b)) < subset_size:
    raise ValueError(
      f"kid: subset_size {subset_size} is larger than a set ({len(a)} and {len(b)} features); "
      "pass a smaller subset_size"
    )
  gamma = 1.0 / a.shape[1] if gamma is None else gamma
  kernel = lambda x, y: (x @ y.T * gamma + coef0) ** degree
  m = subset_size
  # The generator torch-fidelity draws its subsets with, so that the same seed gives its figure.
  rng = np.random.RandomState(seed)  # noqa: NPY002
  mmds = np.zeros(num_subsets)
  for i in range(num_subsets):
    x = a[rng.choice(len(a), m, replace=False)]
    y = b[rng.choice(len(b), m, replace=False)]
    k_xx, k_yy = kernel(x, x), kernel(y, y)
    off_diagonal = k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)
    mmds[i] = off_diagonal / (m * (m - 1)) - 2 * kernel(x, y).sum() / (m * m)
  return float(np.mean(mmds)), float(np.std(mmds))


def inception_score(
  logits: np.ndarray, splits: int = 10, *, shuffle: bool = True, seed: int = 2020
) -> tuple[float, float]:
  """IS = exp(E_x KL(p(y|x) ‖ p(y))), p(y|x) = softmax(logits), per split of the samples.

  torch-fidelity's `isc_features_to_metric` exactly: the rows are permuted by
  `RandomState(seed).permutation(N)` (unless `shuffle` is False), split i holds rows
  [i N // splits, (i + 1) N // splits), p(y) is the split's mean of p(y|x), and the score is
  the mean and population std over the splits. The softmax runs over every column given:
  torch-fidelity and the original OpenAI code use the FID Inception's 1008 logits without the
  fc bias ("logits_unbiased"), the 8 unused classes included.

  Args:
    logits: [N, C] classifier logits (C = 1008 for the FID Inception), N >= splits.
    splits: the number of splits.
    shuffle: permute the rows before splitting, as torch-fidelity does by default.
    seed: seed of the NumPy RandomState drawing the permutation.

  Returns:
    (mean, std) of the per-split scores, Python floats.
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or len(logits) < splits:
    raise ValueError(f"inception_score needs logits [N, C] with N >= {splits}, got {logits.shape}")
  n = len(logits)
  if shuffle:
    logits = logits[np.random.RandomState(seed).permutation(n)]  # noqa: NPY002
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  p = np.exp(log_p)
  scores = []
  for i in range(splits):
    rows = slice(i * n // splits, (i + 1) * n // splits)
    log_q = np.log(p[rows].mean(axis=0, keepdims=True))
    kl = (p[rows] * (log_p[rows] - log_q)).sum(axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


def _distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """‖x_i - y_j‖: [N, M] float64, as torch.cdist computes it (√max(‖x‖² + ‖y‖² - 2⟨x, y⟩, 0))."""
  d2 = (x * x).sum(axis=1)[:, None] + (y * y).sum(axis=1)[None, :] - 2.0 * (x @ y.T)
  return np.sqrt(np.maximum(d2, 0.0))


def _blocks(num_rows: int, num_cols: int):
  """Row slices of a [num_rows, num_cols] matrix, each block of at most ~_BLOCK_ELEMENTS."""
  step = max(1, _BLOCK_ELEMENTS // max(num_cols, 1))
  return [slice(i, i + step) for i in range(0, num_rows, step)]


def _knn_radii(x: np.ndarray, k: int) -> np.ndarray:
  """[N] distance of each x_i to its k-th nearest neighbour in x (x_i itself not counted)."""
  # The (k+1)-th smallest distance, the zero distance of x_i to itself being the first.
  return np.concatenate(
    [np.partition(_distances(x[rows], x), k, axis=1)[:, k] for rows in _blocks(len(x), len(x))]
  )


def _coverage(queries: np.ndarray, support: np.ndarray, radii: np.ndarray) -> float:
  """Fraction of queries within radii[j] of some support point j (the estimated manifold)."""
  inside = [
    (_distances(queries[rows], support) <= radii[None, :]).any(axis=1)
    for rows in _blocks(len(queries), len(support))
  ]
  return float(np.concatenate(inside).mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
  """Improved precision and recall (Kynkäänniemi et al. 2019) of fake against real features.

  Each set's manifold is the union of balls around its points, each of radius the distance to
  the point's k-th nearest neighbour in its own set. Precision is the fraction of fake points
  inside the real manifold (‖f - r_j‖ <= radius_j for some j), recall the fraction of real
  points inside the fake manifold. This is torch-fidelity's `prc` (its `prc_neighborhood` is
  k; its input 1 is fake, input 2 real), in float64. Distance matrices are computed in row
  blocks of at most 2^24 entries, so memory stays bounded for any N.

  Args:
    real: [N_r, D] reference features, N_r > k.
    fake: [N_f, D] generated features, N_f > k.
    k: the neighbourhood size.

  Returns:
    (precision, recall), Python floats in [0, 1].
  """
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f"precision_recall needs [N, D] features, got {real.shape} and {fake.shape}")
  if min(len(real), len(fake)) <= k:
    raise ValueError(
      f"precision_recall needs over k={k} rows a set, got {real.shape}, {fake.shape}"
    )
  precision = _coverage(fake, real, _knn_radii(real, k))
  recall = _coverage(real, fake, _knn_radii(fake, k))
  return precision, recall


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray):
  """Writes FID statistics as the TTUR / pytorch-fid `.npz` (`mu` [D], `sigma` [D, D], float64).

  The file is written at exactly `path` (np.savez would append ".npz" to a name without it).
  """
  with open(path, "wb") as f:
    np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Reads FID statistics from a TTUR / pytorch-fid `.npz` (e.g. fid_stats_cifar10_train.npz).

  Args:
    path: the `.npz` file, with arrays `mu` [D] and `sigma` [D, D].

  Returns:
    (mu, sigma) as float64 arrays.

  Raises:
    ValueError: one line naming the file and what is missing, for a file of another kind.
  """
  try:
    data = np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    if isinstance(e, FileNotFoundError):
      raise
    raise ValueError(f"{path}: not an .npz of FID statistics ({type(e).__name__})") from None
  if not isinstance(data, np.lib.npyio.NpzFile):
    raise ValueError(f"{path}: a single array, not an .npz of FID statistics with 'mu' and 'sigma'")
  with data:
    for key in ("mu", "sigma"):
      if key not in data.files:
        raise ValueError(f"{path}: no '{key}' array (has {sorted(data.files)}); not FID statistics")
    mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
  if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
    raise ValueError(f"{path}: 'mu' {mu.shape} and 'sigma' {sigma.shape} are not [D] and [D, D]")
  return mu, sigma
