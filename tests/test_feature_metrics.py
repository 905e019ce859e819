"""FID, KID, Inception Score and precision/recall from features, against closed forms and the tools.

The reference figures in tests/fixtures/feature_metrics/reference.npz were computed by
pytorch-fid and torch-fidelity (versions.json) on the features of `_fixture_features`, which
`make_fixture.py` there generates identically; no torch is needed here.
"""

import hashlib
import pathlib

import numpy as np
import pytest

from diffusion_jax.evaluation import feature_metrics as fm
from tests.fixtures.feature_metrics import features

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "feature_metrics" / "reference.npz"


def _rng(seed):
  return np.random.default_rng(seed)


def _random_orthogonal(rng, dim):
  q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
  return q * np.sign(np.diag(r))


# ---------------------------------------------------------------------------- Fréchet distance


@pytest.mark.parametrize("rotate", [False, True])
def test_frechet_distance_of_commuting_covariances_is_the_closed_form(rotate):
  # Σ1 = Q diag(a) Qᵀ and Σ2 = Q diag(b) Qᵀ commute: (Σ1 Σ2)^½ = Q diag(√(ab)) Qᵀ, so
  # d² = ‖μ1 - μ2‖² + Σ_i (√a_i - √b_i)².
  rng = _rng(0)
  dim = 12
  mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
  a, b = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
  q = _random_orthogonal(rng, dim) if rotate else np.eye(dim)
  sigma1, sigma2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  np.testing.assert_allclose(fm.frechet_distance(mu1, sigma1, mu2, sigma2), expected, rtol=1e-10)


def test_fid_of_a_feature_set_with_itself_is_zero():
  features = _rng(1).standard_normal((500, 32)) * 2.0 + 1.0
  stats = fm.FeatureStats().update(features)
  assert abs(fm.frechet_distance(stats.mean, stats.cov, stats.mean, stats.cov)) < 1e-6


def test_frechet_distance_retries_a_singular_product_with_an_offset():
  # Rank-deficient covariances (fewer samples than dimensions), as pytorch-fid meets them.
  rng = _rng(2)
  x, y = rng.standard_normal((5, 8)), rng.standard_normal((5, 8))
  sigma1, sigma2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  d = fm.frechet_distance(x.mean(0), sigma1, y.mean(0), sigma2)
  assert np.isfinite(d) and d > 0


def test_frechet_distance_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="frechet_distance"):
    fm.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# -------------------------------------------------------------------------------- FeatureStats


def test_feature_stats_do_not_depend_on_the_batch_split():
  # A large offset: a raw sum of outer products would lose digits here, the merge does not.
  features = _rng(3).standard_normal((257, 16)) * 0.5 + 100.0
  expected_mean, expected_cov = features.mean(axis=0), np.cov(features, rowvar=False)
  for sizes in ([257], [1, 100, 156], [10] * 25 + [7], [0, 128, 0, 129]):
    stats = fm.FeatureStats(16)
    for batch in np.split(features, np.cumsum(sizes)[:-1]):
      stats.update(batch)
    assert stats.count == 257
    np.testing.assert_allclose(stats.mean, expected_mean, rtol=1e-13)
    np.testing.assert_allclose(stats.cov, expected_cov, rtol=1e-9, atol=1e-13)


def test_feature_stats_merge():
  features = _rng(4).standard_normal((90, 6))
  left = fm.FeatureStats().update(features[:31])
  right = fm.FeatureStats().update(features[31:])
  merged = left.merge(right)
  np.testing.assert_allclose(merged.mean, features.mean(axis=0), rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(merged.cov, np.cov(features, rowvar=False), rtol=1e-12, atol=1e-15)
  assert left.count == 31 and right.count == 59  # the inputs are unchanged
  assert fm.FeatureStats().merge(left).count == 31


def test_feature_stats_errors():
  with pytest.raises(ValueError, match=r"\[B, 6\]"):
    fm.FeatureStats(6).update(np.zeros((3, 5)))
  with pytest.raises(ValueError, match="at least 2"):
    _ = fm.FeatureStats().update(np.zeros((1, 5))).cov


# ------------------------------------------------------------------------------------------ KID


def _kid_direct(a, b, num_subsets, subset_size, seed):
  """The unbiased MMD² with k(x, y) = (⟨x, y⟩/D + 1)³, subsets drawn as torch-fidelity does."""
  rng = np.random.RandomState(seed)
  m, dim = subset_size, a.shape[1]
  off_diagonal = ~np.eye(m, dtype=bool)
  mmds = []
  for _ in range(num_subsets):
    x = a[rng.choice(len(a), m, replace=False)]
    y = b[rng.choice(len(b), m, replace=False)]
    k_xx, k_yy, k_xy = ((u @ v.T / dim + 1.0) ** 3 for u, v in ((x, x), (y, y), (x, y)))
    mmds.append(k_xx[off_diagonal].mean() + k_yy[off_diagonal].mean() - 2.0 * k_xy.mean())
  return np.mean(mmds), np.std(mmds)


def test_kid_matches_the_direct_formula():
  rng = _rng(5)
  a, b = rng.standard_normal((120, 10)), rng.standard_normal((90, 10)) + 0.3
  got = fm.kid(a, b, num_subsets=7, subset_size=40, seed=3)
  np.testing.assert_allclose(got, _kid_direct(a, b, 7, 40, 3), rtol=1e-12)


def test_kid_of_one_distribution_is_near_zero_and_rejects_large_subsets():
  rng = _rng(6)
  a, b = rng.standard_normal((400, 8)), rng.standard_normal((400, 8))
  mean, std = fm.kid(a, b, num_subsets=20, subset_size=200)
  assert abs(mean) < 3 * std + 1e-3
  with pytest.raises(ValueError, match="subset_size 500"):
    fm.kid(a, b, subset_size=500)


# ------------------------------------------------------------------------------ Inception Score


def _inception_score_direct(logits, splits, order):
  p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  p = p[order]
  scores = []
  for part in np.array_split(np.arange(len(p)), splits):
    q = p[part].mean(axis=0)
    scores.append(np.exp(np.mean(np.sum(p[part] * np.log(p[part] / q), axis=1))))
  return np.mean(scores), np.std(scores)


@pytest.mark.parametrize("shuffle", [False, True])
def test_inception_score_matches_the_direct_formula(shuffle):
  logits = 2.0 * _rng(7).standard_normal((100, 1008))
  order = np.random.RandomState(11).permutation(100) if shuffle else np.arange(100)
  got = fm.inception_score(logits, splits=10, shuffle=shuffle, seed=11)
  np.testing.assert_allclose(got, _inception_score_direct(logits, 10, order), rtol=1e-12)


def test_inception_score_of_confident_distinct_classes_is_the_number_of_classes_per_split():
  # Each split of 10 holds 10 confident predictions of distinct classes: p(y) is uniform on
  # them, KL = log 10 for every sample, IS = 10; constant predictions give IS = 1.
  logits = 60.0 * np.eye(20)[np.arange(100) % 10]
  np.testing.assert_allclose(fm.inception_score(logits, 10, shuffle=False), (10.0, 0.0), atol=1e-9)
  np.testing.assert_allclose(fm.inception_score(np.ones((50, 7)), 5), (1.0, 0.0), atol=1e-12)


# ---------------------------------------------------------------------------- precision/recall


def _cluster(rng, center, n=20, dim=4):
  return center + 0.1 * rng.standard_normal((n, dim))


def test_precision_recall_of_identical_and_of_far_apart_sets():
  rng = _rng(8)
  real = rng.standard_normal((60, 5))
  assert fm.precision_recall(real, real.copy()) == (1.0, 1.0)
  assert fm.precision_recall(real, real + 100.0) == (0.0, 0.0)


def test_precision_recall_of_half_overlapping_sets(monkeypatch):
  # real = A ∪ B, fake = A ∪ C with B and C far from everything: the fake half A lies in the
  # real manifold and the real half A in the fake one, so precision = recall = 1/2; with fake
  # = A only, precision is 1 and recall still 1/2.
  rng = _rng(9)
  a = _cluster(rng, 0.0)
  real = np.concatenate([a, _cluster(rng, 50.0)])
  fake = np.concatenate([a, _cluster(rng, -50.0)])
  assert fm.precision_recall(real, fake, k=3) == (0.5, 0.5)
  assert fm.precision_recall(real, a, k=3) == (1.0, 0.5)
  assert fm.precision_recall(a, real, k=3) == (0.5, 1.0)
  # Blocks of a few rows give the same answer as one block.
  monkeypatch.setattr(fm, "_BLOCK_ELEMENTS", 7 * len(real))
  assert fm.precision_recall(real, fake, k=3) == (0.5, 0.5)


def test_precision_recall_radius_is_the_kth_neighbour_excluding_the_point():
  # Real points on a line at 0, 1, 2, 3, 4: the 2nd neighbour of 0 is at distance 2, of 2 at 1.
  real = np.arange(5.0)[:, None]
  fake = np.array([[-2.0], [-2.01], [6.0], [6.01], [2.5]])
  # Radius 2 at the ends: -2.0, 6.0 and 2.5 are inside, -2.01 and 6.01 just outside.
  assert fm.precision_recall(real, fake, k=2)[0] == pytest.approx(3 / 5)
  # Radius 1 everywhere: only 2.5 is inside.
  assert fm.precision_recall(real, fake, k=1)[0] == pytest.approx(1 / 5)


# ------------------------------------------------------------------------------ statistics file


def test_stats_round_trip_and_the_wrong_file_error(tmp_path):
  rng = _rng(10)
  mu, sigma = rng.standard_normal(8), np.cov(rng.standard_normal((20, 8)), rowvar=False)
  path = tmp_path / "stats"  # no extension: written at exactly this name
  fm.save_stats(path, mu, sigma)
  loaded_mu, loaded_sigma = fm.load_stats(path)
  np.testing.assert_array_equal(loaded_mu, mu)
  np.testing.assert_array_equal(loaded_sigma, sigma)
  assert set(np.load(path).files) == {"mu", "sigma"}  # what pytorch-fid and TTUR read

  wrong = tmp_path / "samples.npz"
  np.savez(wrong, mu=mu, samples=np.zeros((2, 3)))
  with pytest.raises(ValueError, match="sigma") as error:
    fm.load_stats(wrong)
  assert str(wrong) in str(error.value) and "\n" not in str(error.value)
  single = tmp_path / "array.npy"
  np.save(single, mu)
  with pytest.raises(ValueError, match="array.npy"):
    fm.load_stats(single)


# ------------------------------------------------------------------ pytorch-fid / torch-fidelity


@pytest.fixture(scope="module")
def reference():
  with np.load(FIXTURE) as data:
    ref = {key: data[key][()] for key in data.files}
  real, fake, logits = features.features()
  for key, x in (("real", real), ("fake", fake), ("logits", logits)):
    assert hashlib.sha256(x.tobytes()).hexdigest() == ref[f"sha256_{key}"], f"{key} differs"
  return ref, real, fake, logits


def test_fid_matches_pytorch_fid(reference):
  ref, real, fake, _ = reference
  stats = [fm.FeatureStats().update(x[:100]).update(x[100:]) for x in (fake, real)]
  got = fm.frechet_distance(stats[0].mean, stats[0].cov, stats[1].mean, stats[1].cov)
  np.testing.assert_allclose(got, ref["fid"], rtol=1e-9)


def test_kid_matches_torch_fidelity(reference):
  ref, real, fake, _ = reference
  mean, std = fm.kid(fake, real, num_subsets=50, subset_size=100, seed=2020)
  for dtype, rtol in (("float64", 1e-11), ("float32", 2e-5)):
    # torch-fidelity computes in the features' dtype: float32 for Inception's features.
    expected = [ref[f"kid_mean_{dtype}"], ref[f"kid_std_{dtype}"]]
    np.testing.assert_allclose([mean, std], expected, rtol=rtol)


@pytest.mark.parametrize("shuffle", [True, False])
def test_inception_score_matches_torch_fidelity(reference, shuffle):
  ref, _, _, logits = reference
  got = fm.inception_score(logits, splits=10, shuffle=shuffle, seed=2020)
  expected = [ref[f"isc_mean_shuffle{int(shuffle)}"], ref[f"isc_std_shuffle{int(shuffle)}"]]
  np.testing.assert_allclose(got, expected, rtol=1e-11)


def test_precision_recall_matches_torch_fidelity(reference):
  ref, real, fake, _ = reference
  precision, recall = fm.precision_recall(real, fake, k=3)
  # torch-fidelity returns float32 means of the 0/1 flags: the same counts out of 300.
  for dtype in ("float64", "float32"):
    assert round(precision * 300) == round(ref[f"prc_precision_{dtype}"] * 300)
    assert round(recall * 300) == round(ref[f"prc_recall_{dtype}"] * 300)
