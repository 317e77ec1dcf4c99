"""The pure metrics against hand computations and closed forms: unigram entropy, gen PPL's
aggregation and the Frechet distance."""

import numpy as np

from flmjax import metrics


def test_unigram_entropy_by_hand():
  tokens = np.array([[1, 1, 2, 3], [5, 5, 5, 5]])
  first = -(0.5 * np.log(0.5) + 2 * 0.25 * np.log(0.25))
  np.testing.assert_allclose(metrics.unigram_entropy(tokens), (first + 0.0) / 2)




def _with_moments(rng, mean: np.ndarray, std: np.ndarray, n: int) -> np.ndarray:
  """n rows whose sample mean is `mean` and sample covariance (ddof 1) is diag(std^2)."""
  x = rng.standard_normal((n, len(mean)))
  q, _ = np.linalg.qr(x - x.mean(0))  # orthonormal columns that sum to zero
  return mean + q * np.sqrt(n - 1) * std


def test_frechet_distance_matches_the_closed_form_of_commuting_gaussians():
  rng = np.random.default_rng(0)
  mean_a, mean_b = rng.normal(size=5), rng.normal(size=5)
  std_a, std_b = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
  a, b = _with_moments(rng, mean_a, std_a, 40), _with_moments(rng, mean_b, std_b, 60)
  np.testing.assert_allclose(np.cov(a, rowvar=False), np.diag(std_a ** 2), atol=1e-12)
  # For diagonal covariances, (C_a C_b)^(1/2) = diag(std_a std_b).
  want = ((mean_a - mean_b) ** 2).sum() + ((std_a - std_b) ** 2).sum()
  np.testing.assert_allclose(metrics.frechet_distance(a, b), want, rtol=1e-9)
  # Rotating both sets by the same orthogonal matrix changes nothing (non-diagonal C).
  rotation, _ = np.linalg.qr(rng.normal(size=(5, 5)))
  np.testing.assert_allclose(metrics.frechet_distance(a @ rotation, b @ rotation), want,
                             rtol=1e-9)
  # Fewer samples than dimensions (singular covariances, as with 32 samples of D 576).
  wide = rng.normal(size=(8, 20))
  scale = np.trace(np.cov(wide, rowvar=False))  # the FD of wide and a far-off constant
  assert abs(metrics.frechet_distance(wide, wide)) < 1e-6 * scale
  assert np.isnan(metrics.frechet_distance(wide[:1], wide))  # one row has no covariance


def test_generative_perplexity_is_the_token_weighted_mean_and_nan_on_nothing():
  logprobs = np.log(np.array([[0.5, 0.25, 0.1], [0.2, 0.9, 0.3]]))
  mask = np.array([[True, True, False], [True, False, False]])
  want = np.exp(-(np.log(0.5) + np.log(0.25) + np.log(0.2)) / 3)
  np.testing.assert_allclose(metrics.generative_perplexity(logprobs, mask), want, rtol=1e-12)
  assert np.isnan(metrics.generative_perplexity(logprobs, np.zeros_like(mask)))


def test_scored_targets_are_non_eos_tokens_and_each_rows_first_eos():
  ids = np.array([[5, 6, 0, 0, 0], [0, 7, 0, 0, 0], [0, 0, 0, 0, 0]])  # EOS is 0
  np.testing.assert_array_equal(metrics.scored_targets(ids, 0), [
      [True, True, False, False],  # 6, the first EOS; later EOS skipped
      [True, False, False, False],  # 7; its first EOS is position 0, not a target
      [False, False, False, False]])
  # Padded only to the longest row (2 positions; the reference's padding=True): the first
  # EOS of a row that long lies outside and does not count.
  np.testing.assert_array_equal(metrics.scored_targets(ids[:1], 0, width=2),
                                [[True, False, False, False]])
  # A continuation from position 3 after a prompt holding a document's end: its own first
  # EOS counts, the prompt's does not (the continuation's targets are the caller's to pick).
  prompted = np.array([[5, 0, 6, 7, 0, 0], [5, 6, 7, 8, 9, 0]])
  np.testing.assert_array_equal(metrics.scored_targets(prompted, 0, start=[3, 3]), [
      [False, True, True, True, False], [True, True, True, True, True]])
