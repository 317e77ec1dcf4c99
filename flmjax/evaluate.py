"""Sampling and evaluation of trained weights: `--mode=sample`, `--mode=eval` and
`--mode=score`.

Weights come from `config.checkpoint`: a training or distillation workdir (the latest
checkpoint's EMA weights) or an export. The run record saved with them says which family
the model is, and the family its samplers (flmjax/registry.py): Euler for an FLM teacher,
the flow map (with churn `sample.gamma`) for an FMLM student, and the baselines' own;
`sample.sampler` picks one by name. Every row reports the network calls per sample; the
baselines' rows also report their validation NLL (a bound for the diffusion families,
exact for AR) and its exponential, the validation perplexity, on eval.valid_batches
batches.

Evaluation (the paper's protocol): samples (seed `seed`), drawn eval.batch_size a call as
the reference draws its loader.eval_batch_size, are decoded to text, re-encoded with the
evaluator's tokenizer, cut to L tokens and padded with its EOS to the longest sample of
each such batch (as the reference pads each batch of samples it draws), and judged by the
metrics of flmjax/metrics.py: gen PPL, unigram entropy and FD, the Frechet distance
between Gaussians fitted to the evaluator's features of the samples and of
`eval.reference_samples` other held-out examples (a text's feature is the mean of the
evaluator's final hidden states over its tokens). Gen PPL rewards low-entropy text, which
a teacher's one Euler step is; FD is low only for samples both like real text and as
varied as it, as FID is for images. Its estimate depends on the sample count, so compare
FD only between rows of one run (same `eval.num_samples` and reference); the "dataset"
row, held-out real examples judged the same way, gives its level for real text.

With `eval.prompted` (FLM and FMLM), each of the dataset row's held-out examples gives its
first half (L/2 positions, BOS included) and the model writes the second, by clamping
(flmjax/conditioning.py): gen PPL becomes the evaluator's perplexity of each continuation
given its prefix (only the continuation's tokens scored), FD compares the continuations,
read alone, with the second halves of the reference examples, and the dataset row holds
the examples' own second halves.

With `eval.evaluator=none` the samples are written unjudged; `--mode=score` judges them
later, on a machine that has the evaluator's weights.
"""

import copy
import json
import math
import time

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flmjax import checkpoint, hooks, metrics, outputs, registry, sharding, state
from flmjax.data import pipeline
from flmjax.data.tokenizers import load_tokenizer
from flmjax.errors import UsageError
from flmjax.evaluators import load_evaluator
from flmjax.models import dit
from flmjax.sampling import Condition, params_mesh
from flmjax.validate import step_counts


def load(config: ml_collections.ConfigDict, directory: str):
  """(record, graphdef, EMA params, tokenizer) of the weights in `directory`, placed on
  the mesh of `config.mesh`."""
  record = checkpoint.read_record(directory)
  registry.family(record["kind"], directory)
  graphdef, abstract = state.param_layout(
      dit.builder(record["config"]["model"], record["vocab_size"]),
      sharding.make_mesh(config.mesh))
  params = checkpoint.load_ema(directory, abstract)
  return record, graphdef, params, load_tokenizer(record["tokenizer"])


def sampler_for(config, record: dict, tokenizer, steps: int, num_samples: int):
  """(name, function (graphdef, params, rng) -> (tokens, calls)) for the weights of
  `record` with config.sample's options."""
  return registry.sampler(record["kind"], config, steps, num_samples,
                          seq_len=record["config"]["data"]["seq_len"],
                          mask_id=record["config"]["model"].get("mask_id", -1),
                          bos_id=tokenizer.bos_id)


def sample(config: ml_collections.ConfigDict, workdir: str) -> dict[str, list[str]]:
  """`--mode=sample`: writes WORKDIR/samples/NAME.json (NAME: the sampler and its steps;
  an earlier run's file of that name is replaced, saying so) with decoded samples, the
  time per sample (measured on a second, compiled run) and what wrote them: the
  checkpoint (and its step), the seed and the sample options."""
  record, graphdef, params, tokenizer = load(config, config.checkpoint)
  registry.check_sample_options(record["kind"], config.sample, config.checkpoint)
  path = outputs.create_workdir(workdir)  # once the checkpoint is found good
  name, sampler = sampler_for(config, record, tokenizer, config.sample.steps,
                              config.sample.num_samples)
  jax.block_until_ready(sampler(graphdef, params, jax.random.PRNGKey(config.seed + 1)))
  out = path / "samples" / f"{name}.json"
  replaced = out.exists()
  written = outputs.write_samples(
      out, {name: sampler}, graphdef, params, tokenizer, jax.random.PRNGKey(config.seed),
      about={"checkpoint": config.checkpoint, "step": checkpoint.latest_step(config.checkpoint),
             "seed": config.seed, "sample": config.sample.to_dict()})
  outputs.say(f"wrote {len(written[name])} samples of the {record['kind']} model in "
              f"{config.checkpoint} to {out}" + (", replacing the samples there" if replaced
                                                 else ""))
  for text in written[name][:3]:
    outputs.say(f"  {text[:200]!r}")
  return written


def _evaluator_ids(evaluator, texts: list[str], seq_len: int) -> tuple[np.ndarray,
                                                                      np.ndarray]:
  """(ids [N, L], lengths [N]): each text in evaluator tokens, cut to L, padded with EOS."""
  ids = np.full((len(texts), seq_len), evaluator.eos_id, np.int32)
  lengths = np.zeros(len(texts), np.int32)
  for i, encoded in enumerate(evaluator.encode(texts)):
    lengths[i] = min(len(encoded), seq_len)
    ids[i, :lengths[i]] = encoded[:seq_len]
  return ids, lengths


def _padded_widths(lengths: np.ndarray, batch_size: int) -> np.ndarray:
  """Each row's width once padded [N]: the longest of its batch of `batch_size` rows. The
  reference re-encodes each batch of samples it draws with padding=True (its
  loader.eval_batch_size, eval.batch_size here), so a row's first EOS is scored only where
  a longer row shares its batch."""
  return np.concatenate([np.full(len(rows), rows.max(initial=0)) for rows in
                         np.split(lengths, np.arange(batch_size, len(lengths), batch_size))])


def read_texts(evaluator, texts: list[str], seq_len: int,
               batch_size: int) -> tuple[dict, np.ndarray]:
  """({gen_ppl, tokens, empty_samples}, features [N, D] float64) of `texts` under
  `evaluator`, from one evaluator pass per batch: gen PPL with the number of tokens it
  scored and of texts that encode to nothing, and each text's mean final hidden state
  over its evaluator tokens, cut to L."""
  ids, lengths = _evaluator_ids(evaluator, texts, seq_len)
  logprobs, features = [], []
  for start in range(0, len(texts), batch_size):
    rows = slice(start, start + batch_size)
    batch_logprobs, batch_features = evaluator.logprobs_and_features(ids[rows], lengths[rows])
    logprobs.append(batch_logprobs)
    features.append(np.asarray(batch_features, np.float64))
  mask = metrics.scored_targets(ids, evaluator.eos_id, _padded_widths(lengths, batch_size))
  result = {"gen_ppl": metrics.generative_perplexity(np.concatenate(logprobs), mask),
            "tokens": int(mask.sum()), "empty_samples": int((lengths == 0).sum())}
  return result, np.concatenate(features)


def judge(evaluator, texts: list[str], reference: np.ndarray, seq_len: int,
          batch_size: int) -> dict:
  """gen PPL (with its token counts) and FD against the reference features."""
  result, features = read_texts(evaluator, texts, seq_len, batch_size)
  return {**result, "fd": metrics.frechet_distance(features, reference)}


def _prompted_ids(evaluator, prefixes: list[str], continuations: list[str],
                  seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(ids [N, L], lengths [N], starts [N]): each text prefix + continuation encoded whole
  in evaluator tokens (a word the halves split is one word again), the prefix cut from the
  left when it does not fit L, padded with EOS; `starts` is where each continuation
  begins: after the tokens the whole text shares with its prefix encoded alone."""
  ids = np.full((len(prefixes), seq_len), evaluator.eos_id, np.int32)
  lengths, starts = np.zeros(len(prefixes), np.int32), np.zeros(len(prefixes), np.int32)
  texts = [prefix + continuation for prefix, continuation in zip(prefixes, continuations)]
  for i, (prefix, whole) in enumerate(zip(evaluator.encode(prefixes),
                                          evaluator.encode(texts))):
    shared = next((j for j, (a, b) in enumerate(zip(prefix, whole)) if a != b),
                  min(len(prefix), len(whole)))
    cut = min(shared, max(0, len(whole) - seq_len))
    row = whole[cut:cut + seq_len]
    ids[i, :len(row)], lengths[i], starts[i] = row, len(row), shared - cut
  return ids, lengths, starts


def judge_continuations(evaluator, prefixes: list[str], texts: list[str],
                        reference: np.ndarray, seq_len: int, batch_size: int) -> dict:
  """gen PPL of each continuation given its prefix (only the continuation's tokens, and
  its first EOS, scored), with its token count, and the FD of the continuations read
  alone against the reference features."""
  ids, lengths, starts = _prompted_ids(evaluator, prefixes, texts, seq_len)
  logprobs = np.concatenate([
      evaluator.logprobs_and_features(ids[i:i + batch_size], lengths[i:i + batch_size])[0]
      for i in range(0, len(texts), batch_size)])
  targets = np.arange(1, seq_len)[None] >= starts[:, None]  # target j is ids[:, j]
  mask = metrics.scored_targets(ids, evaluator.eos_id, _padded_widths(lengths, batch_size),
                                start=starts) & targets
  alone, features = read_texts(evaluator, texts, seq_len, batch_size)
  return {"gen_ppl": metrics.generative_perplexity(logprobs, mask), "tokens": int(mask.sum()),
          "empty_samples": alone["empty_samples"],
          "fd": metrics.frechet_distance(features, reference)}


def halves(tokenizer, tokens: np.ndarray) -> tuple[list[str], list[str]]:
  """(prefix texts, continuation texts) of examples [N, L]: positions 1 to L/2 - 1 after
  BOS, and L/2 on, cut at the first EOS there. A continuation's text is its part of the
  whole example's text (with the space that starts it, which decoding it alone would
  drop), so that prefix + continuation is the example's text; where the whole text does
  not start with the prefix's (a decoder's clean-up joining across the cut, as BERT's
  joins "it ' s"), the continuation decoded alone."""
  half = tokens.shape[1] // 2
  continuations = []
  for row in tokens[:, half:]:
    ends = np.flatnonzero(row == tokenizer.eos_id)
    continuations.append(row[:ends[0]] if len(ends) else row)
  prefixes = tokenizer.decode_batch(tokens[:, 1:half])
  wholes = tokenizer.decode_batch([np.concatenate([prefix, continuation]) for prefix,
                                   continuation in zip(tokens[:, 1:half], continuations)])
  alone = tokenizer.decode_batch(continuations)
  return prefixes, [whole[len(prefix):] if whole.startswith(prefix) else text
                    for prefix, whole, text in zip(prefixes, wholes, alone)]


def _timed_samples(config, record: dict, tokenizer, steps: int, graphdef, params, rng,
                   prompts: np.ndarray | None = None) -> tuple[str, np.ndarray, float, float]:
  """(sampler name, tokens [eval.num_samples, L], network calls per sample (their mean over
  the samples: MDLM's cache makes as many as its batch needs), seconds per sample) of the
  `steps`-step sampler of the weights, drawn in calls of eval.batch_size
  samples (as the reference draws its loader.eval_batch_size a call: [B, L, V]
  probabilities of the baselines' samplers stay that small), or of one per data-parallel
  device if there are more, the i-th from fold_in(rng, i); timed once each call's shape is
  compiled. With `prompts` (examples [N, L]) each sample continues the first half of its
  example."""
  count = config.eval.num_samples
  mesh = params_mesh(params)
  per_call = min(count, max(config.eval.batch_size,
                            sharding.data_parallel_size(mesh) if mesh else 1))
  starts = range(0, count, per_call)
  sizes = [min(per_call, count - start) for start in starts]
  samplers = {size: sampler_for(config, record, tokenizer, steps, size) for size in sizes}

  def draw(start, size, key):
    if prompts is None:
      return samplers[size][1](graphdef, params, key)
    rows = prompts[start:start + size]
    given = np.broadcast_to(np.arange(rows.shape[1]) < rows.shape[1] // 2, rows.shape)
    return samplers[size][1](graphdef, params, key,
                             condition=Condition(jnp.asarray(given), jnp.asarray(rows)))

  for size in samplers:  # compiles each call's shape
    jax.block_until_ready(draw(starts[sizes.index(size)], size, rng))
  begin = time.perf_counter()
  drawn = jax.block_until_ready([draw(start, size, jax.random.fold_in(rng, i))
                                 for i, (start, size) in enumerate(zip(starts, sizes))])
  seconds = (time.perf_counter() - begin) / count
  tokens = np.concatenate([np.asarray(t) for t, _ in drawn])
  calls = sum(int(c) * size for (_, c), size in zip(drawn, sizes)) / count
  return samplers[per_call][0], tokens, calls, seconds


def validation_nll(config, record: dict, graphdef, params, prepared) -> dict:
  """{valid_nll, valid_ppl} of a baseline on eval.valid_batches validation batches (its
  own loss without dropout: an NLL bound per token, exact for AR); {} for FLM and FMLM,
  which define no likelihood."""
  if not registry.FAMILIES[record["kind"]].likelihood or not config.eval.valid_batches:
    return {}
  run = ml_collections.ConfigDict(record["config"])
  objective = registry.OBJECTIVES[record["kind"]].build(run, record["vocab_size"],
                                                        train=False)
  settings = copy.deepcopy(config)
  settings.train.eval_batches = config.eval.valid_batches
  found = hooks.validation_loss(objective, graphdef, prepared, settings,
                                params_mesh(params) or sharding.make_mesh(config.mesh))(params)
  if found is None:
    return {}
  return {"valid_nll": found["loss"], "valid_ppl": float(np.exp(found["loss"]))}


def _sample_rows(config, label: str, directory: str, steps: list[int], judged,
                 prepared, prompts: np.ndarray | None = None) -> list[dict]:
  """A row per step count of the weights in `directory`: samples, entropy, network calls
  and seconds per sample, the validation NLL where the family defines one and what
  `judged(texts)` gives. With `prompts` (examples [N, L]) the samples are continuations:
  the model writes the second half of each, given the first (entropy over the written
  half)."""
  record, graphdef, params, tokenizer = load(config, directory)
  likelihood = validation_nll(config, record, graphdef, params, prepared)
  rows = []
  for n in steps:
    name, tokens, calls, seconds = _timed_samples(
        config, record, tokenizer, n, graphdef, params, jax.random.PRNGKey(config.seed),
        prompts)
    if prompts is not None:
      texts = halves(tokenizer, tokens)[1]
      tokens = tokens[:, prompts.shape[1] // 2:]
    else:
      texts = tokenizer.decode_batch(tokens)
    if record["kind"] == "ar":  # its sample does not depend on a step count: L - 1 tokens
      n = record["config"]["data"]["seq_len"] - 1
    row = {"model": label, "kind": record["kind"], "sampler": name, "steps": n,
           "network_calls": calls, "seconds_per_sample": seconds,
           "entropy": metrics.unigram_entropy(tokens), **likelihood, "samples": texts,
           **judged(texts)}
    rows.append(row)
    outputs.say(f"eval {label} {name}: " + ", ".join(
        f"{k} {row[k]:.4g}" for k in ("gen_ppl", "fd", "entropy", "network_calls",
                                      "seconds_per_sample", "valid_ppl") if k in row))
    if record["kind"] == "ar":
      break
  return rows


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             models: dict[str, tuple[str, list[int]]], resume: bool = False) -> list[dict]:
  """Samples each model {label: (weights directory, step counts)} with a fixed seed,
  judges every step count and the dataset row, and writes WORKDIR/eval/results.json,
  results.md and gen_ppl.png. Returns the rows.

  `resume` (the last stage of a pipeline or a comparison): when results.json already holds
  the evaluation of this config and of these weights (each directory at its latest
  checkpoint step), it is kept as it is, scores added by --mode=score included, and its rows
  returned; delete it to evaluate again."""
  cfg = config.eval
  path = outputs.create_workdir(workdir) / "eval"
  inputs = {"config": json.loads(config.to_json_best_effort()),
            "models": {label: [directory, checkpoint.latest_step(directory), list(steps)]
                       for label, (directory, steps) in models.items()}}
  if resume and (path / "results.json").is_file():
    saved = read_results(path / "results.json")
    if saved.get("inputs") == json.loads(json.dumps(inputs)):
      outputs.say(f"{path / 'results.json'} already holds this evaluation: kept (delete it "
                  "to evaluate again)")
      return saved["rows"]
    outputs.say(f"{path / 'results.json'} holds an evaluation of other "
                f"{_differences(saved.get('inputs'), inputs)}: evaluating again, it and its "
                "scores will be replaced")
  # The dataset row's data first, so that a config that cannot give them fails before any
  # sampling.
  records = {directory: checkpoint.read_record(directory) for directory, _ in models.values()}
  if cfg.prompted:
    for directory, record in records.items():
      if record["kind"] not in ("flm", "fmlm"):
        raise UsageError(f"eval.prompted: {directory} holds a {record['kind']} model, which "
                         "takes no prompt; evaluate FLM and FMLM weights, or set "
                         "eval.prompted=False.")
  prepared, dataset, dataset_texts, reference, reference_tokens = _dataset_texts(
      config, workdir, records)
  prompts, prefixes = None, None
  if cfg.prompted:  # continuations of the dataset row's examples; the reference's halves
    prompts = dataset
    prefixes, dataset_texts = halves(prepared.tokenizer, dataset)
    dataset = dataset[:, dataset.shape[1] // 2:]
    reference = halves(prepared.tokenizer, reference_tokens)[1]
  evaluator = None
  if cfg.evaluator != "none":
    evaluator = load_evaluator(cfg.evaluator, cfg.evaluator_path)
    reference_features = read_texts(evaluator, reference, config.data.seq_len,
                                    cfg.batch_size)[1]

  def judged(texts: list[str]) -> dict:
    if evaluator is None:
      return {}
    if prefixes is not None:
      return judge_continuations(evaluator, prefixes, texts, reference_features,
                                 config.data.seq_len, cfg.batch_size)
    return judge(evaluator, texts, reference_features, config.data.seq_len, cfg.batch_size)

  rows = []
  for label, (directory, steps) in models.items():
    rows += _sample_rows(config, label, directory, steps, judged, prepared, prompts)
  rows.append({"model": "dataset", "kind": "data", "sampler": "validation split", "steps": 0,
               "entropy": metrics.unigram_entropy(dataset), "samples": dataset_texts,
               **judged(dataset_texts)})
  _write(path, rows, evaluator.name if evaluator else "none", config.data.seq_len,
         cfg.batch_size, reference, prefixes, inputs)
  return rows


def read_results(path: epath.Path) -> dict:
  """The saved evaluation in `path` (a results.json), refused in one line when it is not
  one: damaged, or edited without its rows' samples."""
  try:
    saved = json.loads(path.read_text())
  except ValueError:  # not JSON, or not UTF-8
    saved = None
  rows = saved.get("rows") if isinstance(saved, dict) else None
  if not (isinstance(rows, list) and isinstance(saved.get("seq_len"), int) and all(
      isinstance(row, dict) and isinstance(row.get("samples"), list) for row in rows)):
    raise UsageError(f"{path} is not an evaluation's results.json (JSON with seq_len and "
                     "rows, each with its samples); move it away, and evaluate again.")
  for row in rows:  # an unscored metric is written as null (outputs.finite_or_null)
    row.update({key: math.nan for key in ("gen_ppl", "fd") if key in row and row[key] is None})
  return saved


def _differences(saved: dict | None, inputs: dict) -> str:
  """What differs between two evaluations' inputs, in a few words."""
  if not isinstance(saved, dict):
    return "inputs (not recorded)"
  if saved.get("models") != json.loads(json.dumps(inputs["models"])):
    return "weights or step counts"
  before, now = saved.get("config", {}), json.loads(json.dumps(inputs["config"]))

  def leaves(tree, prefix=""):
    return ({k: v for key, value in tree.items() for k, v in leaves(
        value, f"{prefix}{key}.").items()} if isinstance(tree, dict) else {prefix[:-1]: tree})
  before, now = leaves(before), leaves(now)
  fields = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
  return "config fields (" + ", ".join(fields[:5]) + (", ..." if len(fields) > 5 else "") + ")"


def _dataset_texts(config, workdir, records: dict[str, dict]):
  """(the prepared data, tokens [N, L] and texts of the dataset row, texts and tokens of the
  FD reference): the first eval.num_samples held-out examples of the validation split,
  then eval.reference_samples more; prepared with this config, which must have the
  evaluated models' L and tokenizer."""
  for directory, record in records.items():
    if record["config"]["data"]["seq_len"] != config.data.seq_len:
      raise UsageError(f"the weights in {directory} have L = "
                       f"{record['config']['data']['seq_len']}, this config data.seq_len="
                       f"{config.data.seq_len}; the dataset row and the scores need the "
                       "model's L: set data.seq_len to it.")
    if record["tokenizer"]["kind"] != config.tokenizer.kind:
      trained = record["tokenizer"]
      raise UsageError(f"the weights in {directory} were trained with a {trained['kind']} "
                       f"tokenizer ({trained['source']}), this config has tokenizer.kind="
                       f"{config.tokenizer.kind}; use the model's data and tokenizer settings.")
  prepared = pipeline.prepare(config, workdir)
  for directory, record in records.items():
    if record["tokenizer"]["fingerprint"] != prepared.tokenizer.fingerprint:
      raise UsageError(f"the data of this config were tokenized with another tokenizer than "
                       f"the weights in {directory} ({record['tokenizer']['source']}); use "
                       "the model's data and tokenizer settings.")
  batches = pipeline.eval_batches(prepared, "valid", 1, process_index=0, process_count=1)
  wanted = config.eval.num_samples + config.eval.reference_samples
  tokens = [b["tokens"] for _, b in zip(range(wanted), batches)]
  if len(tokens) < wanted:
    raise UsageError(
        f"the validation split of {prepared.path} has {len(tokens)} examples of L = "
        f"{config.data.seq_len}; the dataset row and the FD reference need eval.num_samples"
        f" + eval.reference_samples = {wanted}: lower eval.reference_samples, or hold out "
        "more text (data.valid_fraction where the corpus is split by it).")
  tokens = np.concatenate(tokens)
  texts = prepared.tokenizer.decode_batch(tokens)
  dataset = tokens[:config.eval.num_samples]
  return (prepared, dataset, texts[:len(dataset)], texts[len(dataset):],
          tokens[len(dataset):])


def _write(path: epath.Path, rows: list[dict], evaluator: str, seq_len: int, batch_size: int,
           reference: list[str], prefixes: list[str] | None, inputs: dict | None) -> None:
  """results.json (with `inputs`, what evaluate's `resume` compares), results.md and the
  plot."""
  if jax.process_index():
    return
  path.mkdir(parents=True, exist_ok=True)
  saved = {"evaluator": evaluator, "seq_len": seq_len, "batch_size": batch_size, "rows": rows,
           "reference": reference}
  if prefixes is not None:  # prompted: the samples continue these
    saved["prefixes"] = prefixes
  if inputs is not None:
    saved["inputs"] = inputs
  outputs.write_json(path / "results.json", saved)
  ppl = "continuation PPL" if prefixes is not None else "gen PPL"
  lines = [f"| model | sampler | steps | calls | {ppl} ({evaluator}) | FD | entropy | "
           "s/sample | valid PPL |", "|---|---|---|---|---|---|---|---|---|"]

  def cell(row, key, form):
    return format(row[key], form) if key in row else "-"
  for row in rows:
    lines.append(f"| {row['model']} | {row['sampler']} | {row['steps'] or '-'} | "
                 f"{cell(row, 'network_calls', '.4g')} | {cell(row, 'gen_ppl', '.2f')} | "
                 f"{cell(row, 'fd', '.1f')} | {row['entropy']:.2f} | "
                 f"{cell(row, 'seconds_per_sample', '.4f')} | {cell(row, 'valid_ppl', '.2f')} |")
  table = "\n".join(lines) + "\n"
  outputs.write_text(path / "results.md", table)
  outputs.say(table)
  _plot(path / "gen_ppl.png", rows, evaluator)


def _plot(path: epath.Path, rows: list[dict], evaluator: str) -> None:
  """Gen PPL and FD against network calls per sample, and against seconds per sample (log
  axes), a line per model."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  scored = [r for r in rows if "gen_ppl" in r and r["kind"] != "data"]
  # a metric that is NaN in every row (FD of one sample, say) has nothing to draw
  panels = {metric: f"{name} ({evaluator})" for metric, name in (("gen_ppl", "gen PPL"),
                                                                   ("fd", "FD"))
            if any(np.isfinite(r[metric]) for r in scored)}
  if not panels:
    path.unlink(missing_ok=True)  # the plot of the results these replace
    return
  figure, axes = plt.subplots(len(panels), 2, figsize=(10, 4 * len(panels)), squeeze=False)
  for (metric, name), (by_calls, by_time) in zip(panels.items(), axes):
    for label in dict.fromkeys(r["model"] for r in scored):
      mine = [r for r in scored if r["model"] == label]
      by_calls.plot([r.get("network_calls", r["steps"]) for r in mine],
                    [r[metric] for r in mine], "o-", label=label)
      by_time.plot([r["seconds_per_sample"] for r in mine], [r[metric] for r in mine], "o-",
                   label=label)
    for r in rows:
      if r["kind"] == "data" and metric in r:
        for axis in (by_calls, by_time):
          axis.axhline(r[metric], color="gray", linestyle="--", label="dataset")
    by_calls.set(xscale="log", xlabel="network calls per sample", ylabel=name)
    by_time.set(xscale="log", xlabel="seconds per sample", ylabel=name)
    by_calls.legend()
  figure.tight_layout()
  partial = path.parent / (path.name + ".partial")  # as outputs.write_text
  with partial.open("wb") as f:
    figure.savefig(f, format="png", dpi=100)
  partial.replace(path)
  plt.close(figure)


def eval_mode(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """`--mode=eval`: evaluates config.checkpoint at every eval.steps count. It replaces
  the evaluation of one model already in WORKDIR/eval, but not a table of several (a
  pipeline's or a comparison's, whose evaluation can take hours)."""
  results = epath.Path(workdir).expanduser() / "eval" / "results.json"
  if results.is_file():
    models = dict.fromkeys(row.get("model") for row in read_results(results)["rows"]
                           if row.get("kind") != "data")
    if len(models) > 1:
      raise UsageError(f"{results} holds the evaluation of {', '.join(map(str, models))} (a "
                       "--mode=pipeline or --mode=compare table), which --mode=eval would "
                       f"replace: give another --workdir, or delete {results.parent} first.")
  record = checkpoint.read_record(config.checkpoint)
  registry.check_sample_options(record["kind"], config.sample, config.checkpoint, churn=False)
  # The dataset row reads the model's own prepared data unless told otherwise (else they
  # are prepared in CHECKPOINT/data, for the next evaluation of these weights).
  config.data.dir = pipeline.run_data_dir(config, record, config.checkpoint) or str(
      epath.Path(config.checkpoint) / "data")
  return evaluate(config, workdir, {record["kind"].upper(): (config.checkpoint,
                                                             step_counts(config.eval.steps))})


def rescore(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """`--mode=score`: judges every row of WORKDIR/eval/results.json (written by `eval` or
  `pipeline`, typically with eval.evaluator=none) with eval.evaluator (gen PPL and FD
  against the saved reference texts) in the eval.batch_size it was written with (gen PPL
  pads each batch to its longest sample), and rewrites results.json, results.md and
  gen_ppl.png with them; the samples stay as they were."""
  results = epath.Path(workdir).expanduser() / "eval" / "results.json"
  if not results.is_file():
    raise UsageError(f"{results} does not exist; run --mode=eval or --mode=pipeline with "
                     "this --workdir first.")
  path = outputs.create_workdir(workdir) / "eval"  # proves it writable
  if config.eval.evaluator == "none":
    raise UsageError("--mode=score needs an evaluator: set eval.evaluator=smollm2 or gpt2.")
  saved = read_results(results)
  if "reference" not in saved:
    raise UsageError(f"{results} has no FD reference texts; write it with --mode=eval or "
                     "--mode=pipeline.")
  evaluator = load_evaluator(config.eval.evaluator, config.eval.evaluator_path)
  # gen PPL pads each batch to its longest: the batches the samples were written with
  seq_len, batch_size = saved["seq_len"], saved.get("batch_size", config.eval.batch_size)
  if "batch_size" not in saved:
    outputs.say(f"{results} does not say the batch size its samples were drawn in (it was "
                f"written before flmjax recorded it): scoring with eval.batch_size="
                f"{batch_size}, which gen PPL's padding depends on")
  reference = read_texts(evaluator, saved["reference"], seq_len, batch_size)[1]
  prefixes = saved.get("prefixes")
  for row in saved["rows"]:
    row.update(judge(evaluator, row["samples"], reference, seq_len, batch_size)
               if prefixes is None else judge_continuations(
                   evaluator, prefixes, row["samples"], reference, seq_len, batch_size))
    outputs.say(f"score {row['model']} {row['sampler']}: gen_ppl {row['gen_ppl']:.4g}, "
                f"fd {row['fd']:.4g}")
  _write(path, saved["rows"], evaluator.name, seq_len, batch_size, saved["reference"],
         prefixes, saved.get("inputs"))
  return saved["rows"]
