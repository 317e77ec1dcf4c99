"""The command line: python -m flmjax.main --config=configs/NAME.py --workdir=DIR --mode=MODE.

Fields of the config can be overridden with --config.FIELD=VALUE. The modes are listed in
flmjax/modes.py. The config is checked once (flmjax/validate.py) before anything is
prepared or compiled; a usage error is printed as one line with exit status 2.
"""

import copy
import functools
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from flmjax import aot, cli, evaluate, generate, sharding, state, train
from flmjax.data import pipeline
from flmjax.errors import STOPPED_STATUS, Stopped, UsageError
from flmjax.modes import MODES
from flmjax.validate import step_counts, validate

SAMPLE_EXAMPLES = 2  # examples of the first batch that prepare prints


def prepare(config, workdir: str) -> None:
  """Builds (or finds) the tokenizer and shards, prints statistics and a sample batch."""
  prepared = pipeline.prepare(config, workdir)
  batch = next(iter(pipeline.train_batches(prepared, config.batch_size, config.seed)))
  if jax.process_index():
    return
  meta = prepared.meta
  print(f"prepared {meta['corpus']} with {meta['tokenizer']} (V = {meta['vocab_size']:,}, "
        f"L = {meta['seq_len']}) in {prepared.path}")
  for split, stats in meta["splits"].items():
    print(f"  {split}: {stats['documents']:,} documents, {stats['tokens']:,} tokens, "
          f"{stats['examples']:,} examples, {stats['dropped_tail_tokens']:,} tail tokens "
          "dropped")
  print(f"  undecodable bytes and escapes (read as U+FFFD): {meta['undecodable_bytes']:,}; "
        f"empty documents left out: {meta['empty_documents']:,}")
  tokens = batch["tokens"]
  print(f"first training batch: int32 {list(tokens.shape)}; example 0 starts "
        f"{tokens[0, :6].tolist()} and ends {tokens[0, -3:].tolist()} (BOS = "
        f"{meta['bos_id']}, EOS = {meta['eos_id']}); decoded:")
  for i, text in enumerate(prepared.tokenizer.decode_batch(tokens[:SAMPLE_EXAMPLES])):
    print(f"  [{i}] {text!r}")


def _teacher_and_student(config, workdir: str) -> tuple[str, str]:
  """prepare, train (WORKDIR/teacher) and distill (WORKDIR/student), each resumed where it
  stopped; the two workdirs."""
  config.data.dir = config.data.dir or os.path.join(workdir, "data")
  prepare(config, workdir)
  teacher, student = os.path.join(workdir, "teacher"), os.path.join(workdir, "student")
  train.train(config, teacher)
  config.teacher_checkpoint = teacher
  train.distill(config, student)
  return teacher, student


def run_pipeline(config, workdir: str) -> None:
  """prepare -> train (WORKDIR/teacher) -> distill (WORKDIR/student) -> eval (WORKDIR/eval);
  rerunning resumes each stage where it stopped (a finished evaluation is kept)."""
  teacher, student = _teacher_and_student(config, workdir)
  evaluate.evaluate(config, workdir, {
      "FLM": (teacher, step_counts(config.eval.teacher_steps, "eval.teacher_steps")),
      "FMLM": (student, step_counts(config.eval.student_steps, "eval.student_steps"))},
      resume=True)


BASELINES = ("mdlm", "sedd", "duo", "ar")


def run_compare(config, workdir: str) -> None:
  """The pipeline's teacher and student, then each baseline of BASELINES trained with the
  same data, tokenizer, backbone, batch and train.steps (WORKDIR/FAMILY), and Duo's DCD
  student distilled from that Duo with distill.steps and batch (WORKDIR/duo_dcd), then all
  of them evaluated in one table and plot (WORKDIR/eval): FLM, FMLM, MDLM, SEDD, Duo and
  Duo + DCD at each of eval.compare_steps, AR once (its L - 1 calls). Rerunning resumes
  each stage."""
  teacher, student = _teacher_and_student(config, workdir)
  steps = step_counts(config.eval.compare_steps, "eval.compare_steps")
  models = {"FLM": (teacher, steps), "FMLM": (student, steps)}
  for family in BASELINES:
    baseline = copy.deepcopy(config)
    baseline.family = family
    train.train(baseline, os.path.join(workdir, family))
    models[family.upper()] = (os.path.join(workdir, family), steps)
  dcd = copy.deepcopy(config)
  dcd.family, dcd.distill.objective = "duo", "dcd"
  dcd.teacher_checkpoint = os.path.join(workdir, "duo")
  train.distill(dcd, os.path.join(workdir, "duo_dcd"))
  models["DUO+DCD"] = (os.path.join(workdir, "duo_dcd"), steps)
  evaluate.evaluate(config, workdir, models, resume=True)


RUNS = {"prepare": prepare, "train": train.train, "distill": train.distill,
        "sample": evaluate.sample, "generate": generate.generate_mode,
        "eval": evaluate.eval_mode, "score": evaluate.rescore,
        "pipeline": run_pipeline, "compare": run_compare, "compile": aot.compile_mode}
assert set(RUNS) == set(MODES), "flmjax/modes.py lists the modes main runs"

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (data, checkpoints, outputs).")
_MODE = flags.DEFINE_enum("mode", "pipeline", list(MODES), "What to run: " + "; ".join(
    f"{name}: {what}" for name, what in MODES.items()) + ".")
flags.mark_flags_as_required(["config", "workdir"])
flags.register_validator("workdir", lambda value: value != "",
                         "--workdir is empty (an unset shell variable?): give the run's folder")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # library INFO logs only on request
    logging.set_verbosity(logging.WARNING)
  config, mode = _CONFIG.value, _MODE.value
  try:
    sharding.initialize_distributed(config)
    devices = functools.cache(lambda: (aot.target_devices(config.topology)
                                       if mode == "compile" else jax.devices()))
    validate(config, mode, lambda: len(devices()),
             lambda: len({device.process_index for device in devices()}))
    if mode == "compile" and config.topology:
      # An executable compiled without its devices cannot be loaded back from the
      # persistent cache (JAX warns and compiles again): none is written.
      jax.config.update("jax_enable_compilation_cache", False)
    else:
      state.use_compilation_cache(config.compilation_cache_dir)
    RUNS[mode](config, _WORKDIR.value)
  except UsageError as e:
    cli.fail("flmjax", str(e))
  except Stopped:  # saved on SIGTERM; the same command resumes
    sys.exit(STOPPED_STATUS)
  except FloatingPointError as e:
    print(f"flmjax: {e}", file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:
    sys.exit(130)


if __name__ == "__main__":
  app.run(main, flags_parser=functools.partial(cli.parse_flags, program="flmjax"))
