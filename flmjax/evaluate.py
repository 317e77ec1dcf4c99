"""Sampling and evaluation of trained weights: `--mode=sample`, `--mode=eval` and
`--mode=score`.

Weights come from `config.checkpoint`: a training or distillation workdir (the latest
checkpoint's EMA weights) or an export. The run record saved with them says which model
it is, so the sampler follows: the Euler sampler for an FLM teacher, the flow-map sampler
(with churn `sample.gamma`) for an FMLM student.

Evaluation (the paper's evaluation protocol): samples are decoded to text, re-encoded with the
evaluator's tokenizer, cut to L tokens and padded with its EOS; the generative perplexity
is exp(total NLL / total tokens) over all samples, counting every non-EOS token and the
first EOS of each row, found over the whole row (position 0 has no context and is not
scored, so an EOS there, as when a GPT-2 sample starts with <|endoftext|>, counts
none). Entropy is each
sample's unigram entropy (nats) over its own token ids, averaged. The "dataset" row scores
held-out real examples the same way.

Gen PPL rewards low-entropy text (section 7's known criticism): a teacher's one Euler step,
argmax D_0(z), is frequent subwords that score well. So every row also gets FD, the
Frechet distance between Gaussians fitted to the evaluator's features of the samples and
of `eval.reference_samples` other held-out examples (the feature of a text is the mean of
the evaluator's final hidden states over its tokens, cut to L as for gen PPL). FD is low
only when the samples are both like real text and as varied as it, as FID is for images.
Its estimate is biased by the sample count, so compare FD only between rows of one run
(same `eval.num_samples` and reference); the dataset row gives its level for real text.

With `eval.evaluator=none` the samples are written unscored; `--mode=score` scores them
later, on a machine that has the evaluator's weights (an accelerator host without them
samples, another host scores).
"""

import functools
import json
import time

from etils import epath
from flax import nnx
import jax
import ml_collections
import numpy as np

from flmjax import checkpoint, sampling, sharding, train
from flmjax.data import pipeline
from flmjax.data.tokenizers import load_tokenizer
from flmjax.errors import UsageError
from flmjax.evaluators import load_evaluator
from flmjax.models import dit


def load(config: ml_collections.ConfigDict, directory: str):
  """(record, graphdef, EMA params, tokenizer) of the weights in `directory`, placed on
  the mesh of `config.mesh`."""
  record = checkpoint.read_record(directory)
  model = ml_collections.ConfigDict(record["config"]["model"])
  mesh = sharding.make_mesh(config.mesh)
  graphdef, abstract = train.param_layout(
      lambda: dit.from_config(model, record["vocab_size"], nnx.Rngs(0)), mesh)
  params = checkpoint.load_ema(directory, abstract)
  return record, graphdef, params, load_tokenizer(record["tokenizer"])


def sampler_for(record: dict, steps: int, num_samples: int, gamma: float, latent: bool):
  """(name, function (graphdef, params, rng) -> tokens) for the kind of model saved."""
  seq_len = record["config"]["data"]["seq_len"]
  if record["kind"] != "fmlm" and gamma:
    raise UsageError(f"sample.gamma={gamma} is the churn of the flow-map sampler, but these "
                     "weights are an FLM teacher (Euler sampler); set sample.gamma=0 or "
                     "point config.checkpoint at a distilled student.")
  if record["kind"] == "fmlm":
    return f"flowmap_{steps}", functools.partial(
        sampling.sample_flow_map, batch_size=num_samples, seq_len=seq_len, steps=steps,
        gamma=gamma, latent=latent)
  return f"euler_{steps}", functools.partial(
      sampling.sample_flm, batch_size=num_samples, seq_len=seq_len, steps=steps,
      latent=latent)


def sample(config: ml_collections.ConfigDict, workdir: str) -> dict[str, list[str]]:
  """`--mode=sample`: writes WORKDIR/samples/NAME.json with decoded samples and the time
  per sample (measured on a second, compiled run)."""
  if not config.checkpoint:
    raise UsageError("--mode=sample needs --config.checkpoint=DIR, a training or "
                     "distillation workdir or an export.")
  path = train.check_workdir(workdir)
  record, graphdef, params, tokenizer = load(config, config.checkpoint)
  name, sampler = sampler_for(record, config.sample.steps, config.sample.num_samples,
                              config.sample.gamma, config.noise == "latent")
  jax.block_until_ready(sampler(graphdef, params, jax.random.PRNGKey(config.seed + 1)))
  out = path / "samples" / f"{name}.json"
  written = train.write_samples(out, {name: sampler}, graphdef, params, tokenizer,
                                jax.random.PRNGKey(config.seed))
  train.say(f"wrote {len(written[name])} samples of the {record['kind']} model in "
            f"{config.checkpoint} to {out}")
  for text in written[name][:3]:
    train.say(f"  {text[:200]!r}")
  return written


def unigram_entropy(tokens: np.ndarray) -> float:
  """Mean over rows of the entropy (nats) of each row's own token frequencies."""
  entropies = []
  for row in np.asarray(tokens):
    counts = np.unique(row, return_counts=True)[1]
    p = counts / counts.sum()
    entropies.append(float(-(p * np.log(p)).sum()))
  return float(np.mean(entropies))


def _evaluator_ids(evaluator, texts: list[str], seq_len: int) -> tuple[np.ndarray,
                                                                      np.ndarray]:
  """(ids [N, L], lengths [N]): each text in evaluator tokens, cut to L, padded with EOS."""
  ids = np.full((len(texts), seq_len), evaluator.eos_id, np.int32)
  lengths = np.zeros(len(texts), np.int32)
  for i, encoded in enumerate(evaluator.encode(texts)):
    lengths[i] = min(len(encoded), seq_len)
    ids[i, :lengths[i]] = encoded[:seq_len]
  return ids, lengths


def score_texts(evaluator, texts: list[str], seq_len: int,
                batch_size: int) -> tuple[dict, np.ndarray]:
  """({gen PPL, tokens scored, empty samples}, features [N, D] float64) of `texts` under
  `evaluator`, from one evaluator pass per batch. Gen PPL is section 7's; the count of
  texts that encode to nothing is reported (a row of EOS scores nothing: its first EOS is
  at position 0), and gen PPL is NaN when no token is scored at all. A text's feature is
  the mean of the evaluator's final hidden states over its evaluator tokens, cut to L."""
  ids, lengths = _evaluator_ids(evaluator, texts, seq_len)
  is_eos = ids == evaluator.eos_id
  first_eos = is_eos & (np.cumsum(is_eos, axis=1) == 1)
  mask = (~is_eos | first_eos)[:, 1:]  # targets: positions 1..L-1
  nll, count, features = 0.0, 0, []
  for start in range(0, len(texts), batch_size):
    rows = slice(start, start + batch_size)
    logprobs, batch_features = evaluator.score(ids[rows], lengths[rows])
    nll -= float((np.asarray(logprobs, np.float64) * mask[rows]).sum())
    count += int(mask[rows].sum())
    features.append(np.asarray(batch_features, np.float64))
  gen_ppl = float(np.exp(nll / count)) if count else float("nan")
  scores = {"gen_ppl": gen_ppl, "tokens": count, "empty_samples": int((lengths == 0).sum())}
  return scores, np.concatenate(features)


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


def _scores(evaluator, texts: list[str], reference: np.ndarray, seq_len: int,
            batch_size: int) -> dict:
  """gen PPL (with its token counts) and FD against the reference features."""
  scores, features = score_texts(evaluator, texts, seq_len, batch_size)
  return {**scores, "fd": frechet_distance(features, reference)}


def _timed_samples(sampler, graphdef, params, rng) -> tuple[np.ndarray, float]:
  """Tokens and seconds per sample of a compiled (warmed-up) sampler."""
  jax.block_until_ready(sampler(graphdef, params, jax.random.fold_in(rng, 1)))
  start = time.perf_counter()
  tokens = np.asarray(jax.block_until_ready(sampler(graphdef, params, rng)))
  return tokens, (time.perf_counter() - start) / len(tokens)


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             models: dict[str, tuple[str, list[int]]]) -> list[dict]:
  """Samples each model {label: (weights directory, step counts)} with a fixed seed,
  scores every step count and the dataset row, and writes WORKDIR/eval/results.json,
  results.md and gen_ppl.png. Returns the rows."""
  cfg = config.eval
  path = train.check_workdir(workdir) / "eval"
  # The dataset row's data first, so that a config that cannot give them fails before any
  # sampling.
  dataset, dataset_texts, reference = _dataset_texts(config, workdir, {
      directory: checkpoint.read_record(directory) for directory, _ in models.values()})
  evaluator = None
  if cfg.evaluator != "none":
    evaluator = load_evaluator(cfg.evaluator, cfg.evaluator_path)
    reference_features = score_texts(evaluator, reference, config.data.seq_len,
                                     cfg.batch_size)[1]

  def score(texts: list[str]) -> dict:
    if evaluator is None:
      return {}
    return _scores(evaluator, texts, reference_features, config.data.seq_len,
                   cfg.batch_size)

  rows = []
  for label, (directory, steps) in models.items():
    record, graphdef, params, tokenizer = load(config, directory)
    for n in steps:
      gamma = config.sample.gamma if record["kind"] == "fmlm" else 0.0  # Euler: no churn
      name, sampler = sampler_for(record, n, cfg.num_samples, gamma,
                                  config.noise == "latent")
      tokens, seconds = _timed_samples(sampler, graphdef, params,
                                       jax.random.PRNGKey(config.seed))
      texts = tokenizer.decode_batch(tokens)
      row = {"model": label, "kind": record["kind"], "sampler": name, "steps": n,
             "seconds_per_sample": seconds, "entropy": unigram_entropy(tokens),
             "samples": texts, **score(texts)}
      rows.append(row)
      train.say(f"eval {label} {name}: " + ", ".join(
          f"{k} {row[k]:.4g}" for k in ("gen_ppl", "fd", "entropy", "seconds_per_sample")
          if k in row))
  rows.append({"model": "dataset", "kind": "data", "sampler": "validation split", "steps": 0,
               "entropy": unigram_entropy(dataset), "samples": dataset_texts,
               **score(dataset_texts)})
  _write(path, rows, evaluator.name if evaluator else "none", config.data.seq_len, reference)
  return rows


def _dataset_texts(config, workdir, records: dict[str, dict]):
  """(tokens [N, L] and texts of the dataset row, texts of the FD reference): the first
  eval.num_samples held-out examples of the validation split, then eval.reference_samples
  more; prepared with this config, which must have the evaluated models' L and tokenizer."""
  for directory, record in records.items():
    if record["config"]["data"]["seq_len"] != config.data.seq_len:
      raise UsageError(f"the weights in {directory} have L = "
                       f"{record['config']['data']['seq_len']}, this config data.seq_len="
                       f"{config.data.seq_len}; the dataset row and the scores need the "
                       "model's L: set data.seq_len to it.")
  if config.eval.reference_samples < 2:
    raise UsageError(f"eval.reference_samples={config.eval.reference_samples}: FD fits a "
                     "Gaussian to the reference examples and needs at least 2.")
  prepared = pipeline.prepare(config, workdir)
  batches = pipeline.eval_batches(prepared, "valid", 1, process_index=0, process_count=1)
  wanted = config.eval.num_samples + config.eval.reference_samples
  tokens = [b["tokens"] for _, b in zip(range(wanted), batches)]
  if len(tokens) < wanted:
    raise UsageError(
        f"the validation split of {prepared.path} has {len(tokens)} examples of L = "
        f"{config.data.seq_len}; the dataset row and the FD reference need eval.num_samples"
        f" + eval.reference_samples = {wanted}: lower eval.reference_samples, or hold out "
        "more text (data.valid_fraction where the corpus is split by it).")
  for directory, record in records.items():
    if record["tokenizer"]["fingerprint"] != prepared.tokenizer.fingerprint:
      raise UsageError(f"the data of this config were tokenized with another tokenizer than "
                       f"the weights in {directory}; use the model's data and tokenizer "
                       "settings.")
  texts = prepared.tokenizer.decode_batch(np.concatenate(tokens))
  dataset = np.concatenate(tokens[:config.eval.num_samples])
  return dataset, texts[:len(dataset)], texts[len(dataset):]


def _write(path: epath.Path, rows: list[dict], evaluator: str, seq_len: int,
           reference: list[str]) -> None:
  if jax.process_index():
    return
  path.mkdir(parents=True, exist_ok=True)
  (path / "results.json").write_text(json.dumps(
      {"evaluator": evaluator, "seq_len": seq_len, "rows": rows, "reference": reference},
      indent=1))
  lines = [f"| model | sampler | steps | gen PPL ({evaluator}) | FD | entropy | s/sample |",
           "|---|---|---|---|---|---|---|"]
  for row in rows:
    ppl = f"{row['gen_ppl']:.2f}" if "gen_ppl" in row else "-"
    fd = f"{row['fd']:.1f}" if "fd" in row else "-"
    seconds = f"{row['seconds_per_sample']:.4f}" if "seconds_per_sample" in row else "-"
    lines.append(f"| {row['model']} | {row['sampler']} | {row['steps'] or '-'} | {ppl} | "
                 f"{fd} | {row['entropy']:.2f} | {seconds} |")
  table = "\n".join(lines) + "\n"
  (path / "results.md").write_text(table)
  train.say(table)
  _plot(path / "gen_ppl.png", rows, evaluator)


def _plot(path: epath.Path, rows: list[dict], evaluator: str) -> None:
  """Gen PPL and FD against steps, and against seconds per sample (log axis), per model."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  scored = [r for r in rows if "gen_ppl" in r and r["kind"] != "data"]
  if not scored:
    return
  metrics = {"gen_ppl": f"gen PPL ({evaluator})", "fd": f"FD ({evaluator})"}
  figure, axes = plt.subplots(len(metrics), 2, figsize=(10, 4 * len(metrics)), squeeze=False)
  for (metric, name), (by_steps, by_time) in zip(metrics.items(), axes):
    for label in dict.fromkeys(r["model"] for r in scored):
      mine = [r for r in scored if r["model"] == label]
      by_steps.plot([r["steps"] for r in mine], [r[metric] for r in mine], "o-", label=label)
      by_time.plot([r["seconds_per_sample"] for r in mine], [r[metric] for r in mine], "o-",
                   label=label)
    for r in rows:
      if r["kind"] == "data" and metric in r:
        for axis in (by_steps, by_time):
          axis.axhline(r[metric], color="gray", linestyle="--", label="dataset")
    by_steps.set(xscale="log", xlabel="steps", ylabel=name)
    by_time.set(xscale="log", xlabel="seconds per sample", ylabel=name)
    by_steps.legend()
  figure.tight_layout()
  with path.open("wb") as f:
    figure.savefig(f, format="png", dpi=100)
  plt.close(figure)


def parse_steps(text: str) -> list[int]:
  try:
    steps = [int(s) for s in str(text).split(",") if s.strip()]
  except ValueError:
    steps = []
  if not steps or min(steps) < 1:
    raise UsageError(f"eval.steps={text!r} must be positive step counts separated by commas, "
                     "e.g. 1,8,64.")
  return steps


def eval_mode(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """`--mode=eval`: evaluates config.checkpoint at every eval.steps count."""
  if not config.checkpoint:
    raise UsageError("--mode=eval needs --config.checkpoint=DIR, a training or distillation "
                     "workdir or an export.")
  record = checkpoint.read_record(config.checkpoint)
  # The dataset row reads the model's own prepared data unless told otherwise.
  config.data.dir = config.data.dir or record["config"]["data"]["dir"] or str(
      epath.Path(config.checkpoint) / "data")
  return evaluate(config, workdir, {record["kind"].upper(): (config.checkpoint,
                                                             parse_steps(config.eval.steps))})


def score(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """`--mode=score`: scores every row of WORKDIR/eval/results.json (written by `eval` or
  `pipeline`, typically with eval.evaluator=none) with eval.evaluator (gen PPL and FD
  against the saved reference texts), and rewrites results.json, results.md and
  gen_ppl.png with the scores; the samples stay as they were."""
  path = train.check_workdir(workdir) / "eval"
  results = path / "results.json"
  if not results.is_file():
    raise UsageError(f"{results} does not exist; run --mode=eval or --mode=pipeline with "
                     "this --workdir first.")
  if config.eval.evaluator == "none":
    raise UsageError("--mode=score needs an evaluator: set eval.evaluator=smollm2 or gpt2.")
  saved = json.loads(results.read_text())
  if "reference" not in saved:
    raise UsageError(f"{results} lacks the FD reference texts (written by an older "
                     "flmjax); run --mode=eval again.")
  evaluator = load_evaluator(config.eval.evaluator, config.eval.evaluator_path)
  seq_len, batch_size = saved["seq_len"], config.eval.batch_size
  reference = score_texts(evaluator, saved["reference"], seq_len, batch_size)[1]
  for row in saved["rows"]:
    row.update(_scores(evaluator, row["samples"], reference, seq_len, batch_size))
    train.say(f"score {row['model']} {row['sampler']}: gen_ppl {row['gen_ppl']:.4g}, "
              f"fd {row['fd']:.4g}")
  _write(path, saved["rows"], evaluator.name, seq_len, saved["reference"])
  return saved["rows"]
