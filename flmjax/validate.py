"""The config, checked once, before anything is prepared or compiled.

`validate(config, mode, device_count, process_count)` checks every field that does not
need a file or the data to judge: choices, positive sizes and ranges, the mesh and the
batches it must divide (the teacher's, the student's and each gradient-accumulation part),
step lists, and what each mode needs. A bad value raises a UsageError naming the field and
what to do, which the command line prints as one line with exit status 2. Files (corpus
paths, tokenizer files, checkpoints) are checked where they are read.
"""

import functools
import math
from typing import Callable

import ml_collections

from flmjax import conditioning, distill, evaluators, registry, sharding
from flmjax.data import corpora, tokenizers
from flmjax.errors import UsageError
from flmjax.models import dit, flash

CHOICES = {
    "data.corpus": corpora.CORPORA,
    "tokenizer.kind": tokenizers.KINDS,
    "model.attention": dit.ATTENTION,
    "model.output_head": ("auto", "plain", "fused"),
    "model.dtype": ("float32", "bfloat16"),
    "noise": ("latent", "vocab"),
    "family": registry.TRAINABLE,
    "distill.objective": registry.DISTILLATION,
    "distill.dcd.divergence": ("kl-bwd", "kl-fwd"),
    "sample.sampler": ("auto", *registry.SAMPLERS),
    "eval.evaluator": (*evaluators.EVALUATORS, "none"),
}
POSITIVE = (
    "batch_size", "data.seq_len", "tokenizer.vocab_size", "model.width", "model.depth",
    "model.heads", "model.cond_width", "model.mlp_ratio", "train.steps",
    "train.learning_rate", "train.eps", "train.grad_accum", "train.log_every",
    "train.sample_steps", "train.num_samples", "train.keep_checkpoints", "distill.steps",
    "distill.learning_rate", "sample.steps", "sample.num_samples", "generate.batch_size",
    "eval.num_samples",
    "eval.batch_size", "sample.temperature", "distill.dcd.grid", "distill.dcd.round_steps",
    "distill.dcd.learning_rate")
NON_NEGATIVE = (
    "data.max_documents", "model.output_chunk", "model.attn_softcap", "model.output_cap",
    "train.weight_decay", "train.grad_clip", "train.warmup_steps", "train.eval_every",
    "train.eval_batches", "train.sample_every", "train.checkpoint_every", "train.keep_period",
    "distill.batch_size", "eval.valid_batches", "sample.guidance", "duo.curriculum_end",
    "duo.curriculum_start")
BELOW_ONE = (  # in [0, 1)
    "data.valid_fraction", "model.dropout", "train.b1", "train.b2", "train.ema_decay",
    "distill.b2", "distill.boundary_fraction", "distill.dcd.b2")
STEP_LISTS = ("eval.steps", "eval.teacher_steps", "eval.student_steps", "eval.compare_steps")
NEEDS = {  # mode: (field, what it must name)
    "distill": ("teacher_checkpoint", "the workdir (or export) of a teacher trained with "
                                      "--mode=train"),
    "sample": ("checkpoint", "a training or distillation workdir or an export"),
    "eval": ("checkpoint", "a training or distillation workdir or an export"),
    "generate": ("checkpoint", "an FLM or FMLM training or distillation workdir or export"),
}


def _get(config, field: str):
  return functools.reduce(getattr, field.split("."), config)


def step_counts(text: str, field: str = "eval.steps") -> list[int]:
  """[1, 8, 64] from "1,8,64"; the field is named when the text is not such a list."""
  try:
    steps = [int(s) for s in str(text).split(",") if s.strip()]
  except ValueError:
    steps = []
  if not steps or min(steps) < 1 or len(set(steps)) < len(steps):
    raise UsageError(f"{field}={text!r} must be distinct positive step counts separated by "
                     "commas, e.g. 1,8,64.")
  return steps


def _numbers(config: ml_collections.ConfigDict, prefix: str = "") -> None:
  """Every number finite (a range check lets inf through; NaN fails every comparison)."""
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      _numbers(value, f"{prefix}{name}.")
    elif isinstance(value, float) and not math.isfinite(value):
      raise UsageError(f"{prefix}{name}={value} must be a finite number.")


def _fields(config: ml_collections.ConfigDict) -> None:
  _numbers(config)
  for field, choices in CHOICES.items():
    if _get(config, field) not in choices:
      raise UsageError(f"{field}={_get(config, field)!r} is not one of {', '.join(choices)}.")
  for fields, ok, meaning in ((POSITIVE, lambda x: x > 0, "positive"),
                              (NON_NEGATIVE, lambda x: x >= 0, "0 or more"),
                              (BELOW_ONE, lambda x: 0 <= x < 1, "in [0, 1)")):
    for field in fields:
      if not ok(_get(config, field)):
        raise UsageError(f"{field}={_get(config, field)} must be {meaning}.")
  fractions = config.distill.diagonal_fraction, config.distill.boundary_fraction
  if not 0 < fractions[0] < 1 or sum(fractions) >= 1:
    raise UsageError(f"distill.diagonal_fraction={fractions[0]} must be in (0, 1) and leave "
                     f"room for off-diagonal rows beside distill.boundary_fraction="
                     f"{fractions[1]}.")
  if not 0 < config.sample.top_p <= 1:
    raise UsageError(f"sample.top_p={config.sample.top_p}: the nucleus mass must be in "
                     "(0, 1]; 1 turns it off.")
  if not 0 <= config.sample.gamma <= 1:
    raise UsageError(f"sample.gamma={config.sample.gamma}: the churn must be in [0, 1].")
  if not 0 <= config.seed < 2**32:
    raise UsageError(f"seed={config.seed} must be in [0, 2**32): the data order and the "
                     "random draws take 32-bit seeds.")
  if config.data.path and config.data.corpus != "dir":
    raise UsageError(f"data.path={config.data.path} is read with data.corpus=dir only, and "
                     f"data.corpus={config.data.corpus}: set --config.data.corpus=dir to "
                     "read your files, or leave data.path empty.")
  if config.data.seq_len < 3:
    raise UsageError(f"data.seq_len={config.data.seq_len}: an example needs BOS, EOS and at "
                     "least one token; use 3 or more.")
  for field in ("eval.num_samples", "eval.reference_samples"):
    if _get(config, field) < 2:
      raise UsageError(f"{field}={_get(config, field)}: FD fits a Gaussian to the samples "
                       "and to the reference examples, and needs at least 2 of each.")
  for field in STEP_LISTS:
    step_counts(_get(config, field), field)


def _dcd(config: ml_collections.ConfigDict, mode: str) -> None:
  """distill.dcd, where Duo's DCD runs: distill.objective=dcd, or --mode=compare."""
  dcd = config.distill.dcd
  if config.distill.objective != "dcd" and mode != "compare":
    return
  if dcd.gamma_min >= dcd.gamma_max:
    raise UsageError(f"distill.dcd.gamma_min={dcd.gamma_min} must be below "
                     f"distill.dcd.gamma_max={dcd.gamma_max}.")
  if 2 ** ((config.distill.steps - 1) // dcd.round_steps) > dcd.grid:
    raise UsageError(f"distill.dcd: the last of distill.steps={config.distill.steps} would "
                     f"take steps dt = 2^round / grid above 1 (round_steps="
                     f"{dcd.round_steps}, grid={dcd.grid}); raise grid or round_steps.")


def _duo(config: ml_collections.ConfigDict, mode: str) -> None:
  """duo, where Duo's curriculum trains: family=duo with duo.curriculum_end, or compare."""
  duo = config.duo
  if not duo.curriculum_end or (config.family != "duo" and mode != "compare"):
    return
  if duo.curriculum_start > duo.curriculum_end:
    raise UsageError(f"duo.curriculum_start={duo.curriculum_start} (where tau starts to "
                     f"move) must not be after duo.curriculum_end={duo.curriculum_end}.")
  if duo.gamma_min >= duo.gamma_max:
    raise UsageError(f"duo.gamma_min={duo.gamma_min} must be below duo.gamma_max="
                     f"{duo.gamma_max}.")


def _model(config: ml_collections.ConfigDict) -> None:
  model = config.model
  if model.width % model.heads or (model.width // model.heads) % 2:
    raise UsageError(f"model.width={model.width} must split into model.heads={model.heads} "
                     "heads of even size.")
  softcap = registry.FAMILIES[config.family].model.get("attn_softcap", model.attn_softcap)
  if model.attention == "fused" and softcap:
    raise UsageError("model.attention=fused has no soft cap: set model.attn_softcap=0, or "
                     "model.attention=plain or auto.")
  try:
    flash.Tiles.parse(model.flash_tiles)
  except ValueError as e:
    raise UsageError(f"model.flash_tiles={model.flash_tiles!r}: {e}; or \"\" for the "
                     "default tiles.") from None


def _sampler(config: ml_collections.ConfigDict, mode: str) -> None:
  """sample.sampler, when named, is a sampler of every family that `mode` trains (the
  sampling of a checkpoint is checked against its family when it is read)."""
  name = config.sample.sampler
  student = registry.OBJECTIVES[config.distill.objective].kind
  families = {"train": [config.family], "distill": [student], "pipeline": ["flm", student],
              "compare": list(registry.FAMILIES)}.get(mode, [])
  for family in families:
    samplers = registry.FAMILIES[family].samplers
    if name != "auto" and name not in samplers:
      raise UsageError(f"sample.sampler={name}: --mode={mode} trains {', '.join(families)}, "
                       f"and {family} has no {name} sampler (it has {', '.join(samplers)}); "
                       "use auto, each family's own default.")


def _loss_weight(config: ml_collections.ConfigDict, mode: str) -> None:
  """model.learned_loss_weight weights the FLM and FMLM losses only."""
  if not config.model.learned_loss_weight:
    return
  if config.family != "flm":
    raise UsageError("model.learned_loss_weight=True weights the FLM and FMLM losses only, "
                     f"not family={config.family}'s: set it False.")
  if mode == "compare":
    raise UsageError("model.learned_loss_weight=True weights the FLM and FMLM losses only; "
                     "--mode=compare also trains the baselines: set it False.")


def _condition(config: ml_collections.ConfigDict, mode: str) -> None:
  """train.condition: known kinds, for the FLM teacher; eval.prompted: not with the
  baselines of --mode=compare."""
  kinds = conditioning.parse_kinds(config.train.condition)
  unknown = [k for k in kinds if k not in conditioning.KINDS]
  if unknown:
    raise UsageError(f"train.condition={config.train.condition!r}: {', '.join(unknown)} is "
                     f"not a kind of condition; use a comma list of "
                     f"{', '.join(conditioning.KINDS)}, or \"\" for none.")
  if not 0 <= config.train.condition_dropout <= 1:
    raise UsageError(f"train.condition_dropout={config.train.condition_dropout} must be a "
                     "probability in [0, 1].")
  if kinds and config.family != "flm":
    raise UsageError(f"train.condition={config.train.condition!r} trains a conditional FLM; "
                     f"family={config.family} takes no condition: set train.condition=\"\".")
  if mode == "compare" and config.eval.prompted:
    raise UsageError("eval.prompted: --mode=compare also evaluates the baselines, which take "
                     "no prompt; set eval.prompted=False.")
  if mode == "compare" and kinds:
    raise UsageError(f"train.condition={config.train.condition!r}: --mode=compare also "
                     "trains the baselines, which take no condition; set "
                     "train.condition=\"\".")


def _attention(config: ml_collections.ConfigDict, mode: str) -> None:
  """The kernels' limits: L a multiple of their block, no forward-mode derivative, and
  flash attention is not causal and takes power-of-two head sizes."""
  impl = config.model.attention
  tiles = flash.Tiles.parse(config.model.flash_tiles)
  block = {"splash": dit.SPLASH_BLOCK, "flash": tiles.multiple()}.get(impl)
  if block is None:
    return
  if config.data.seq_len % block:
    tiled = " (its tiles' blocks and steps, model.flash_tiles)" if impl == "flash" else ""
    raise UsageError(f"model.attention={impl} needs data.seq_len={config.data.seq_len} to be "
                     f"a multiple of {block}{tiled}; use model.attention=auto or plain.")
  if config.family == "ar":
    raise UsageError(f"model.attention={impl} cannot run family=ar, a causal model of "
                     "L - 1 tokens (flash is not causal; splash takes multiples of "
                     f"{dit.SPLASH_BLOCK}): use model.attention=auto (fused, as AR has no "
                     "soft cap) or plain.")
  head = config.model.width // config.model.heads
  if impl == "flash" and not flash.supports(config.data.seq_len, head, tiles):  # L checked
    raise UsageError(f"model.attention=flash needs a head size (model.width / model.heads = "
                     f"{head}) that is a power of two, at least 16, as Triton's blocks do on "
                     "a GPU; use model.attention=auto, or other heads.")
  if (mode in ("distill", "pipeline", "compile", "compare")
      and registry.OBJECTIVES[config.distill.objective].jvp):
    raise UsageError(f"model.attention={impl} has no forward-mode derivative, which "
                     f"distill.objective={config.distill.objective} takes; use "
                     "model.attention=auto (plain for it) or distill.objective=semigroup.")


def _batches(config: ml_collections.ConfigDict, mode: str, device_count: int,
             process_count: int) -> None:
  """The mesh fits the devices, each process holds its own rows of a batch (the data
  pipeline loads a different 1 / process_count of it in each), and the mesh divides every
  batch that `mode` runs."""
  sizes = sharding.mesh_shape(config.mesh, device_count)
  parallel = math.prod(size for axis, size in zip(sharding.AXES, sizes)
                       if axis in sharding.BATCH_AXES)
  if parallel % process_count:
    raise UsageError(f"the data-parallel size {parallel} (mesh data x fsdp) must be a "
                     f"multiple of the {process_count} processes, each of which loads its own "
                     "rows of the batch: make mesh.tensor divide each process's "
                     f"{device_count // process_count} devices.")
  student = distill.student_config(config)
  batches = {"train": [config], "distill": [student], "pipeline": [config, student],
             "compile": [config, student], "compare": [config, student]}.get(mode, [])
  for run in batches:
    field = ("batch_size" if run is config else
             "the student's batch (distill.batch_size, or batch_size when it is 0)")
    if run.batch_size % (parallel * config.train.grad_accum):
      raise UsageError(f"{field} {run.batch_size} must be a multiple of the data-parallel "
                       f"size {parallel} (mesh data x fsdp) times train.grad_accum="
                       f"{config.train.grad_accum}.")
  objective = registry.OBJECTIVES[config.distill.objective]
  if mode in ("distill", "pipeline", "compile", "compare") and objective.teacher == "flm":
    distill.part_counts(student, objective)


def validate(config: ml_collections.ConfigDict, mode: str,
             device_count: Callable[[], int],
             process_count: Callable[[], int] = lambda: 1) -> None:
  """Raises a UsageError naming the first field of `config` that `mode` cannot run with,
  on a mesh of `device_count()` devices in `process_count()` processes (asked only once
  the fields are valid, so that a bad field is reported before any device is started)."""
  _fields(config)
  _dcd(config, mode)
  _duo(config, mode)
  _model(config)
  _attention(config, mode)
  _condition(config, mode)
  _loss_weight(config, mode)
  _sampler(config, mode)
  if mode == "compare" and config.family != "flm":
    raise UsageError(f"family={config.family}: --mode=compare trains every family itself; "
                     "leave family at flm.")
  if mode == "pipeline" and config.family != "flm":
    raise UsageError(f"family={config.family}: --mode=pipeline trains and distills an FLM; "
                     "run a baseline's stages with --mode=train, distill and eval "
                     "(--mode=compare trains every family).")
  teacher = registry.OBJECTIVES[config.distill.objective].teacher
  if mode in ("distill", "pipeline", "compare") and config.family != teacher:
    known = [n for n in registry.DISTILLATION
             if registry.OBJECTIVES[n].teacher == config.family]
    # --mode=distill may change the family; pipeline and compare distil an FLM
    advice = ([f"family={teacher}"] if mode == "distill" else []) + (
        [f"distill.objective to one of {', '.join(known)}"] if known else [])
    raise UsageError(f"family={config.family}: distill.objective={config.distill.objective} "
                     f"distils a teacher of family {teacher}; set {', or '.join(advice)}" + (
                         "." if known else f" (there is no {config.family} distillation; "
                                           "--mode=train trains the baseline)."))
  if config.sample.guidance and mode != "generate":
    raise UsageError(f"sample.guidance={config.sample.guidance} guides conditional "
                     "generation (--mode=generate); unconditional sampling has nothing to "
                     "guide: set sample.guidance=0.")
  if config.topology and mode != "compile":
    raise UsageError(f"topology={config.topology!r} is the hardware --mode=compile compiles "
                     f"for; --mode={mode} runs on this machine's devices: leave topology "
                     "empty.")
  if mode == "train" and config.model.two_time:
    raise UsageError("model.two_time=True is the distilled student; --mode=train trains the "
                     "one-time FLM teacher.")
  if mode in ("eval", "score", "pipeline", "compare") and config.eval.evaluator != "none":
    evaluators.locate(config.eval.evaluator, config.eval.evaluator_path)  # before training
  if (mode in ("pipeline", "compare") and config.data.corpus in ("embedded", "dir")
      and not config.data.valid_fraction):
    raise UsageError(f"data.valid_fraction=0 holds out no text, which --mode={mode}'s "
                     "evaluation needs (the dataset row and the FD reference: "
                     "eval.num_samples + eval.reference_samples examples); hold out some, "
                     "e.g. 0.02.")
  if mode in NEEDS and not _get(config, NEEDS[mode][0]):
    field, what = NEEDS[mode]
    raise UsageError(f"--mode={mode} needs --config.{field}=DIR, {what}.")
  _batches(config, mode, device_count(), process_count())
