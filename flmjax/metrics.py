"""Pure metrics of samples (numpy, no model): unigram entropy, generative perplexity and
the Frechet distance (the paper's evaluation protocol, and FD, flmjax's
addition to it; flmjax/evaluate.py applies them)."""

import numpy as np


def unigram_entropy(tokens: np.ndarray) -> float:
  """Mean over rows of the entropy (nats) of each row's own token frequencies."""
  entropies = []
  for row in np.asarray(tokens):
    counts = np.unique(row, return_counts=True)[1]
    p = counts / counts.sum()
    entropies.append(float(-(p * np.log(p)).sum()))
  return float(np.mean(entropies))


def scored_targets(ids: np.ndarray, eos_id: int, width: int | np.ndarray | None = None,
                   start: int | np.ndarray = 0) -> np.ndarray:
  """Which next-token targets (positions 1..L-1 of ids [N, L]) gen PPL counts: every
  non-EOS token and each row's first EOS at or after position `start` (an int, or one per
  row [N]: a continuation's own, after a prompt that may hold EOS tokens; by default over
  the whole row, where position 0 has no context and is not a target, so a row whose
  first EOS is there counts none), within the first `width` positions (an int, or one per
  row [N]; all by default): rows padded with EOS only to the longest of their batch, as
  the reference's tokenizer pads a batch, so that the longest row's EOS, a padding
  position the reference never builds, is not counted. [N, L-1]."""
  is_eos = ids == eos_id
  eos_after = is_eos & (np.arange(ids.shape[1]) >= np.reshape(start, (-1, 1)))
  first_eos = eos_after & (np.cumsum(eos_after, axis=1) == 1)
  width = ids.shape[1] if width is None else np.reshape(width, (-1, 1))
  return ((~is_eos | first_eos) & (np.arange(ids.shape[1]) < width))[:, 1:]


def generative_perplexity(logprobs: np.ndarray, mask: np.ndarray) -> float:
  """exp(total NLL / total tokens) over the targets in `mask` (token-weighted over all
  samples); NaN when no token is scored."""
  count = int(mask.sum())
  if not count:
    return float("nan")
  return float(np.exp(-(np.asarray(logprobs, np.float64) * mask).sum() / count))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
  """Frechet distance between Gaussians fitted to the rows of a [N, D] and b [M, D]:
  |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)), with tr (C_a C_b)^(1/2) computed as
  the sum of the square roots of the eigenvalues of the symmetric C_a^(1/2) C_b C_a^(1/2).
  NaN when either set has fewer than 2 rows (no covariance)."""
  if min(len(a), len(b)) < 2:
    return float("nan")
  cov_a, cov_b = np.cov(a, rowvar=False, ddof=1), np.cov(b, rowvar=False, ddof=1)
  values, vectors = np.linalg.eigh(cov_a)
  root_a = (vectors * np.sqrt(values.clip(0))) @ vectors.T
  cross = np.sqrt(np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(0)).sum()
  gap = a.mean(0) - b.mean(0)
  return float(gap @ gap + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)
