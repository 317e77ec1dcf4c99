"""Evaluation: gen PPL's targets and the features of texts under a toy evaluator, FD under
SmolLM2, the sweep's outputs and --mode=score."""

from collections import Counter
import json
import math

from etils import epath
import jax
import numpy as np
import pytest

from conftest import small_config, train_config
from flmjax import evaluate, metrics
from flmjax.data import corpora
from flmjax.errors import UsageError


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

  def logprobs_and_features(self, ids, lengths):  # features: each text's letter frequencies
    inside = np.arange(ids.shape[1]) < np.maximum(lengths, 1)[:, None]
    return self.logp[ids[:, 1:]], np.stack([(np.eye(27)[row] * m[:, None]).sum(0) / m.sum()
                                            for row, m in zip(ids, inside)])


def test_generative_perplexity_counts_non_eos_tokens_and_the_first_eos():
  toy = CharEvaluator()
  texts = ["abc", "zz", ""]
  result = evaluate.read_texts(toy, texts, seq_len=5, batch_size=2)[0]
  # The rows are padded with EOS to the longest, "abc" (the reference's padding=True), so
  # targets are positions 1..2: "abc" -> b, c; "zz" -> z, EOS (the row's first); "" -> its
  # first EOS is position 0, which is not a target, so nothing of that row counts.
  scored = [2, 3, 26, 0]
  expected = np.exp(-np.mean([toy.logp[i] for i in scored]))
  np.testing.assert_allclose(result["gen_ppl"], expected, rtol=1e-12)
  assert result["tokens"] == 4 and result["empty_samples"] == 1
  # With a row as long as L = 3 ("zzzz" cut), "ab" is padded too: its first EOS counts.
  result = evaluate.read_texts(toy, ["ab", "zzzz"], seq_len=3, batch_size=2)[0]
  scored = [2, 0, 26, 26]
  np.testing.assert_allclose(result["gen_ppl"], np.exp(-np.mean([toy.logp[i] for i in scored])),
                             rtol=1e-12)
  # Each batch is padded to its own longest: "ab" shares a batch with "q" only, so its
  # first EOS (position 2) is not scored, where padding to "abc" of the other would add it.
  result = evaluate.read_texts(toy, ["abc", "zz", "ab", "q"], seq_len=5, batch_size=2)[0]
  scored = [2, 3, 26, 0, 2, 0]  # abc: b c; zz: z EOS; ab: b; q: EOS
  np.testing.assert_allclose(result["gen_ppl"], np.exp(-np.mean([toy.logp[i] for i in scored])),
                             rtol=1e-12)
  assert result["tokens"] == 6
  nothing = evaluate.read_texts(toy, ["", "1"], seq_len=5, batch_size=2)[0]
  assert np.isnan(nothing["gen_ppl"]) and nothing["tokens"] == 0


def test_read_texts_batches_the_features_with_their_own_lengths():
  toy = CharEvaluator()
  texts = ["abc", "z", "", "hello", "ab", "zzzzzzzz", "q"]
  # Each text's letters, cut to L = 6; an empty text reads its first position (EOS, id 0).
  letters = [toy.encode([t])[0][:6] or [0] for t in texts]
  want = [np.eye(27)[ids].mean(0) for ids in letters]
  np.testing.assert_allclose(evaluate.read_texts(toy, texts, 6, batch_size=3)[1], want)


@pytest.mark.slow
def test_fd_tells_function_word_text_from_held_out_text(smollm2):
  """FD tells collapsed text (frequent function words, what a teacher's one Euler step
  writes) from real text: far above the FD of other real text to the reference."""
  corpus = corpora.load_corpus(small_config().data)
  documents = [d for _, d in zip(range(48), corpus.documents("train"))]
  held_out, reference = documents[:16], documents[16:]
  words = ["the", "of", "and", "in", "a", "to", "is", "was", ",", "."]
  rng = np.random.default_rng(0)
  collapsed = [" ".join(rng.choice(words, 40)) for _ in range(16)]
  features = {name: evaluate.read_texts(smollm2, texts, 64, 16)[1]
              for name, texts in [("held_out", held_out), ("reference", reference),
                                  ("collapsed", collapsed)]}
  held_out_fd = metrics.frechet_distance(features["held_out"], features["reference"])
  collapsed_fd = metrics.frechet_distance(features["collapsed"], features["reference"])
  assert collapsed_fd > 2 * held_out_fd


def _trained_teacher(prepared, teacher, monkeypatch):
  """(config, models) of the suite's 2-step FLM, judged by the toy evaluator."""
  monkeypatch.setattr(evaluate, "load_evaluator", lambda *a: CharEvaluator())
  config = train_config(steps=2)
  config.data.dir = str(prepared.path.parent)
  config.eval.update(num_samples=4, reference_samples=6)
  return config, {"FLM": (teacher, [1, 2])}


def _scores(rows):  # all but the sampling time
  return [{k: v for k, v in r.items() if k != "seconds_per_sample"} for r in rows]


@pytest.mark.slow
def test_samples_are_drawn_in_calls_of_the_evaluator_batch(prepared, teacher, monkeypatch):
  """eval.num_samples 5 with eval.batch_size 2: calls of 2, 2 and 1 samples, the i-th
  call's as the sampler draws them alone from fold_in(key, i); on a mesh, calls of at
  least one sample per data-parallel device (8 here: the 5 in one call)."""
  config, _ = _trained_teacher(prepared, teacher, monkeypatch)
  config.eval.update(num_samples=5, batch_size=2)
  record, graphdef, params, tokenizer = evaluate.load(config, teacher)
  rng = jax.random.PRNGKey(3)
  alone = lambda size, i, params: evaluate.sampler_for(config, record, tokenizer, 2, size)[1](
      graphdef, params, jax.random.fold_in(rng, i))[0]
  on_mesh = evaluate._timed_samples(config, record, tokenizer, 2, graphdef, params, rng)[1]
  np.testing.assert_array_equal(on_mesh, alone(5, 0, params))
  params = jax.device_get(params)  # on no mesh
  name, tokens, calls, _ = evaluate._timed_samples(config, record, tokenizer, 2, graphdef,
                                                   params, rng)
  assert (name, calls, tokens.shape) == ("euler_2", 2, (5, config.data.seq_len))
  for i, (start, size) in enumerate([(0, 2), (2, 2), (4, 1)]):
    np.testing.assert_array_equal(tokens[start:start + size], alone(size, i, params))


@pytest.mark.slow
def test_sweep_writes_table_json_and_plot_and_scoring_later_gives_the_same(
    tmp_path, monkeypatch, capsys, prepared, teacher):
  config, models = _trained_teacher(prepared, teacher, monkeypatch)
  drawn, timed = [], evaluate._timed_samples
  monkeypatch.setattr(evaluate, "_timed_samples", lambda *a: drawn.append(timed(*a)) or drawn[-1])
  rows = evaluate.evaluate(config, str(tmp_path), models)
  assert [(r["model"], r["steps"]) for r in rows] == [("FLM", 1), ("FLM", 2), ("dataset", 0)]
  for row, (_, tokens, _, _) in zip(rows, drawn):  # each sample's unigram entropy, averaged
    entropies = [-sum(c / len(t) * math.log(c / len(t)) for c in Counter(t.tolist()).values())
                 for t in tokens]
    assert row["entropy"] == pytest.approx(np.mean(entropies), rel=1e-9)
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
  later = str(tmp_path / "later")
  with pytest.raises(UsageError, match="results.json does not exist"):
    evaluate.rescore(config, later)
  assert not (tmp_path / "later").exists()  # nothing created by a refused command
  config.eval.evaluator = "none"
  assert not any("gen_ppl" in r for r in evaluate.evaluate(config, later, models))
  with pytest.raises(UsageError, match="needs an evaluator"):
    evaluate.rescore(config, later)
  config.eval.evaluator = "smollm2"  # the toy evaluator, patched in above
  assert _scores(evaluate.rescore(config, later)) == _scores(saved["rows"])
  rescored = json.loads((tmp_path / "later" / "eval" / "results.json").read_text())
  assert rescored["evaluator"] == "toy" and _scores(rescored["rows"]) == _scores(saved["rows"])
  assert (tmp_path / "later" / "eval" / "results.md").read_text().count("| FLM |") == 2
  # Unscored again, in the first folder: the plot of the scores replaced goes with them.
  config.eval.evaluator = "none"
  evaluate.evaluate(config, str(tmp_path), models)
  assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["results.json",
                                                                    "results.md"]

  # As the last stage of a pipeline run again (resume), the evaluation of the same config
  # and weights is kept, scores included, without sampling; of another config it is not.
  monkeypatch.setattr(evaluate, "_timed_samples", lambda *a: pytest.fail("sampled"))
  config.eval.evaluator = "none"
  kept = (tmp_path / "later" / "eval" / "results.json").read_text()
  assert _scores(evaluate.evaluate(config, later, models, resume=True)) == _scores(saved["rows"])
  assert (tmp_path / "later" / "eval" / "results.json").read_text() == kept
  config.seed += 1
  capsys.readouterr()
  with pytest.raises(pytest.fail.Exception, match="sampled"):
    evaluate.evaluate(config, later, models, resume=True)
  assert ("holds an evaluation of other config fields (seed): evaluating again, it and its "
          "scores will be replaced") in capsys.readouterr().out
  config.seed -= 1
  config.eval.evaluator = "smollm2"

  # A dataset row that cannot match the model fails before any sampling.
  config.data.seq_len = 8
  with pytest.raises(UsageError, match="have L = 32, this config data.seq_len=8"):
    evaluate.evaluate(config, later, models)
  config.data.seq_len = 32
  config.tokenizer.kind = "gpt2"  # refused before any data are prepared with it
  with monkeypatch.context() as patch:
    patch.setattr(evaluate.pipeline, "prepare", lambda *a: pytest.fail("prepared"))
    with pytest.raises(UsageError, match="trained with a sentencepiece tokenizer .*"
                                         "tokenizer.kind=gpt2"):
      evaluate.evaluate(config, later, models)
  config.tokenizer.kind = "sentencepiece"
  config.eval.reference_samples = 10**6
  with pytest.raises(UsageError, match=r"need eval.num_samples \+ eval.reference_samples"):
    evaluate.evaluate(config, later, models)


def test_eval_mode_refuses_to_replace_a_table_of_several_models(tmp_path):
  """A pipeline's or comparison's evaluation is refused before any work; one model's
  evaluation is replaced (the run goes on to read the weights, which are missing here)."""
  results = tmp_path / "eval" / "results.json"
  results.parent.mkdir()
  config = train_config()
  config.checkpoint = str(tmp_path / "missing")
  def row(model, kind="flm"):
    return {"model": model, "kind": kind, "samples": []}
  # (files written before their inputs were recorded have their rows only)
  for rows, refusal in (([row("FLM"), row("FMLM", "fmlm"), row("dataset", "data")],
                         r"holds the evaluation of FLM, FMLM \(a --mode=pipeline or "
                         r"--mode=compare table\)"),
                        ([row("FLM"), row("FLM"), row("dataset", "data")],
                         "missing does not exist")):
    results.write_text(json.dumps({"seq_len": 8, "rows": rows}))
    with pytest.raises(UsageError, match=refusal):
      evaluate.eval_mode(config, str(tmp_path))
    assert json.loads(results.read_text())["rows"] == rows
  for damaged in ("[1, 2]", '{"rows": [', '{"seq_len": 8, "rows": [{"model": "FLM"}]}'):
    results.write_text(damaged)
    for mode in (evaluate.eval_mode, evaluate.rescore):
      config.eval.evaluator = "smollm2"
      with pytest.raises(UsageError, match="results.json is not an evaluation's results.json"
                         r" \(JSON with seq_len and rows, each with its samples\); move it"):
        mode(config, str(tmp_path))
    assert results.read_text() == damaged


def test_the_plot_leaves_out_a_metric_with_no_finite_value(tmp_path):
  """FD is NaN for fewer than 2 samples (or a degenerate reference): the plot draws gen
  PPL alone, and nothing when no metric has a finite value (removing an older plot)."""
  def row(steps, fd):
    return {"model": "FLM", "kind": "flm", "steps": steps, "network_calls": steps,
            "seconds_per_sample": 0.01 * steps, "gen_ppl": 50.0 / steps, "fd": fd}
  plot = tmp_path / "gen_ppl.png"
  evaluate._plot(plot, [row(1, math.nan), row(8, math.nan)], "toy")
  assert plot.read_bytes()[:4] == b"\x89PNG"
  evaluate._plot(plot, [dict(row(1, math.nan), gen_ppl=math.nan)], "toy")
  assert not plot.exists()


def test_an_unscored_metric_is_null_in_results_json_and_nan_when_read_back(tmp_path):
  """JSON has no NaN: an FD of one sample and a gen PPL with no token are written as null
  (a strict reader accepts the file), and read back as NaN."""
  row = {"model": "FLM", "kind": "flm", "sampler": "euler_1", "steps": 1, "entropy": 0.5,
         "samples": ["a"], "gen_ppl": math.nan, "fd": math.nan}
  evaluate._write(tmp_path, [row], "toy", 8, 1, ["b"], None, None)
  text = (tmp_path / "results.json").read_text()
  def refuse(name):
    raise ValueError(f"not JSON: {name}")
  saved = json.loads(text, parse_constant=refuse)
  assert saved["rows"][0]["gen_ppl"] is None and saved["rows"][0]["fd"] is None
  read = evaluate.read_results(epath.Path(tmp_path / "results.json"))["rows"][0]
  assert math.isnan(read["gen_ppl"]) and math.isnan(read["fd"]) and read["steps"] == 1


def test_scoring_later_pads_the_batches_the_samples_were_written_with(tmp_path, monkeypatch,
                                                                       capsys):
  """results.json keeps eval.batch_size: scored later with another, gen PPL is the same
  (in batches of 2, "ab" is padded to itself; in one batch of 4 its first EOS would count)."""
  monkeypatch.setattr(evaluate, "load_evaluator", lambda *a: CharEvaluator())
  texts = ["abc", "zz", "ab", "q"]
  (tmp_path / "eval").mkdir()
  (tmp_path / "eval" / "results.json").write_text(json.dumps({
      "evaluator": "none", "seq_len": 5, "batch_size": 2, "reference": ["abc", "de", "f"],
      "rows": [{"model": "FLM", "kind": "flm", "sampler": "euler_1", "steps": 1,
                "entropy": 1.0, "seconds_per_sample": 0.1, "samples": texts}]}))
  config = train_config()
  config.eval.batch_size = 4
  row = evaluate.rescore(config, str(tmp_path))[0]
  in_pairs, whole = (evaluate.read_texts(CharEvaluator(), texts, 5, n)[0] for n in (2, 4))
  assert in_pairs["gen_ppl"] != whole["gen_ppl"]
  assert row["gen_ppl"] == in_pairs["gen_ppl"] and row["tokens"] == in_pairs["tokens"]
  # a file written before the batch size was recorded: scored in eval.batch_size, said
  saved = json.loads((tmp_path / "eval" / "results.json").read_text())
  del saved["batch_size"]
  (tmp_path / "eval" / "results.json").write_text(json.dumps(saved))
  capsys.readouterr()
  assert evaluate.rescore(config, str(tmp_path))[0]["gen_ppl"] == whole["gen_ppl"]
  assert "does not say the batch size its samples were drawn in" in capsys.readouterr().out


def test_continuation_perplexity_scores_only_the_continuation():
  """Each prefix then its continuation in evaluator tokens, the prefix cut from the left
  when both do not fit; only the continuation's tokens (and its first EOS) are scored."""
  toy = CharEvaluator()
  ids, lengths, starts = evaluate._prompted_ids(toy, ["ab", "vwxyz", ""], ["cd", "q", "k"], 5)
  np.testing.assert_array_equal(ids, [[1, 2, 3, 4, 0], [23, 24, 25, 26, 17], [11, 0, 0, 0, 0]])
  reference = evaluate.read_texts(toy, ["abc", "de", "f"], 5, 2)[1]
  judged = evaluate.judge_continuations(toy, ["ab", "vwxyz", "c"], ["cd", "", "k"], reference,
                                        5, 2)
  assert judged["empty_samples"] == 1  # a continuation that is no text
  assert list(lengths) == [4, 5, 1] and list(starts) == [2, 4, 0]
  reference = np.eye(27)[[1, 2, 3, 5]]
  result = evaluate.judge_continuations(toy, ["ab", "vwxyz", ""], ["cd", "q", "k"], reference,
                                        seq_len=5, batch_size=3)
  # "ab|cd": c, d and the first EOS; "wxyz|q" (v cut): q; "|k": k is position 0, no
  # context, so only its EOS.
  scored = [3, 4, 0, 17, 0]
  np.testing.assert_allclose(result["gen_ppl"], np.exp(-np.mean([toy.logp[i] for i in scored])),
                             rtol=1e-12)
  assert result["tokens"] == 5 and result["fd"] > 0
  # In batches of 2, "|k" is padded to its own length, 1: its EOS is not scored.
  result = evaluate.judge_continuations(toy, ["ab", "vwxyz", ""], ["cd", "q", "k"], reference,
                                        seq_len=5, batch_size=2)
  np.testing.assert_allclose(result["gen_ppl"],
                             np.exp(-np.mean([toy.logp[i] for i in scored[:4]])), rtol=1e-12)


def test_a_continuation_is_read_in_its_whole_text():
  """A word-level evaluator: prefix and continuation are encoded as one text, so a word
  the halves split ("reac" + "tion") is one word again and scored as the continuation's,
  with every token after the ones the prefix encodes alone."""
  class Words:
    eos_id = 0
    vocabulary = {"the": 1, "reaction": 2, "is": 3, "reac": 4, "fast": 5}

    def encode(self, texts):
      return [[self.vocabulary.get(word, 9) for word in text.split()] for text in texts]
  ids, lengths, starts = evaluate._prompted_ids(
      Words(), ["the reac", "the", "is"], ["tion is", " fast", " the reaction is"], 3)
  np.testing.assert_array_equal(ids, [[1, 2, 3], [1, 5, 0], [1, 2, 3]])
  assert list(lengths) == [3, 2, 3] and list(starts) == [1, 1, 0]


def test_halves_are_the_prefix_after_bos_and_the_continuation_up_to_eos():
  class Ids:
    eos_id = 2

    def decode_batch(self, rows):
      return [" ".join(str(i) for i in row) for row in rows]
  tokens = np.array([[1, 5, 6, 7, 8, 9, 2, 0], [1, 5, 6, 7, 2, 0, 0, 0]])
  # The continuation keeps the space that joins it to its prefix in the whole text.
  assert evaluate.halves(Ids(), tokens) == (["5 6 7", "5 6 7"], [" 8 9", ""])


@pytest.mark.slow
def test_prompted_evaluation_writes_continuations_and_rescores_the_same(
    tmp_path, monkeypatch, prepared, teacher):
  config, models = _trained_teacher(prepared, teacher, monkeypatch)
  config.eval.prompted = True
  rows = evaluate.evaluate(config, str(tmp_path), models)
  saved = json.loads((tmp_path / "eval" / "results.json").read_text())
  assert len(saved["prefixes"]) == 4 and len(saved["reference"]) == 6
  assert [r["model"] for r in rows] == ["FLM", "FLM", "dataset"]
  assert all(len(r["samples"]) == 4 and r["gen_ppl"] > 1 for r in rows)
  assert "continuation PPL (toy)" in (tmp_path / "eval" / "results.md").read_text()

  assert _scores(evaluate.rescore(config, str(tmp_path))) == _scores(saved["rows"])
  # (baseline weights are refused: tests/test_baselines.py)


def test_network_calls_per_sample_are_the_mean_over_the_calls(monkeypatch):
  """A sampler whose calls vary (MDLM's cache) reports the mean per sample: 5 samples in
  calls of 2, 2 and 1 that made 3, 7 and 10 network calls give (2 * 3 + 2 * 7 + 10) / 5."""
  made = iter([1, 1, 3, 7, 10])  # first one call of each shape (2 and 1) compiles it

  def sampler_for(config, record, tokenizer, steps, size):
    return "fake", lambda graphdef, params, key: (np.zeros((size, 4), np.int32), next(made))

  monkeypatch.setattr(evaluate, "sampler_for", sampler_for)
  config = train_config()
  config.eval.update(num_samples=5, batch_size=2)
  _, tokens, calls, _ = evaluate._timed_samples(
      config, {}, None, 1, None, {"vocab_embed": np.zeros(1)}, jax.random.key(0))
  assert tokens.shape == (5, 4)
  assert calls == (2 * 3 + 2 * 7 + 10) / 5
