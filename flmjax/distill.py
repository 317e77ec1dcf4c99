"""FMLM self-distillation (the paper's v2 flow map method): a two-time student from an FLM teacher.

The student delta_{s,t}(x) = softmax(net(x, tau_s, tau_t)) starts as the teacher's EMA
weights with a second, zeroed time embedder, so delta_{s,s} = D_s at step 0. Each global
batch is split by fixed counts: a diagonal share (s = t; target the frozen teacher's
D_s(x_s), or the data without a teacher), a boundary share (tau_s = 0, tau_t = 1) and the
off-diagonal rest (d ~ U[0, 1], tau_s = U[0, 1] (1 - d), tau_t = tau_s + d, each
stratified; midpoint tau_u). Rows are assigned to the shares in batch order; batches are
uniformly shuffled, so this is a random assignment. The off-diagonal objective is one of

- semigroup (PSD, default): target lambda delta_{s,u}(x_s) + (1 - lambda)
  delta_{u,t}(X_{s,u}(x_s)) from the student itself without gradient; soft cross entropy;
- eulerian (ESD): target D_s + ((1 - s)(t - s) / (1 - t)) d/ds delta_{s,t} along the
  teacher's flow, by a JVP in (tau_s, x_s); squared error on probabilities (summed over
  the vocabulary). Its target divides by 1 - t, so it uses no boundary rows;
- lagrangian (LSD): target delta_{t,t}(X_{s,t}(x_s)) - ((t - s)(1 - t) / (1 - s))
  d/dt delta_{s,t}, by a JVP in tau_t, projected on the simplex with sparsemax; soft
  cross entropy. It uses no boundary rows either: at t = 1 its target is
  sparsemax(delta_{1,1}(delta_{0,1}(x_0))), the student's own one-step output read back
  by the denoiser, which ties nothing to the data (with them, the one step of the tiny
  pipeline collapsed onto one repeated token).

Everything the network reads is in latent form: x_s @ E, and X_{s,u} @ E =
a (x_s @ E) + b (D_su @ E).
"""

import copy
import functools

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections

from flmjax import checkpoint, flow, sampling, sharding, train
from flmjax.data import pipeline
from flmjax.errors import UsageError
from flmjax.models import dit
from flmjax.schedule import get_schedule

OBJECTIVES = ("semigroup", "eulerian", "lagrangian")


def split_counts(batch_size: int, diagonal_fraction: float,
                 boundary_fraction: float) -> tuple[int, int, int]:
  """(diagonal, boundary, off-diagonal) rows of a batch: floors of the fractions, the
  off-diagonal share taking the rest."""
  diagonal = int(batch_size * diagonal_fraction)
  boundary = int(batch_size * boundary_fraction)
  return diagonal, boundary, batch_size - diagonal - boundary


def _boundary_fraction(cfg: ml_collections.ConfigDict) -> float:
  return cfg.boundary_fraction if cfg.objective == "semigroup" else 0.0


def part_counts(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """split_counts of each of the train.grad_accum parts of a global batch, which together
  must give the global batch's counts (with floors per part, boundary rows could vanish)."""
  cfg, batch, parts = config.distill, config.batch_size, config.train.grad_accum
  fractions = (cfg.diagonal_fraction, _boundary_fraction(cfg))

  def counts(k):  # the global counts that parts of batch / k rows add up to
    return tuple(k * n for n in split_counts(batch // k, *fractions))

  part = split_counts(batch // parts, *fractions)
  if not part[0] or not part[2]:
    raise UsageError(f"batch_size={batch} with train.grad_accum={parts} gives {part} "
                     "(diagonal, boundary, off-diagonal) rows per part; both diagonal and "
                     "off-diagonal need one.")
  if counts(parts) != split_counts(batch, *fractions):
    valid = [k for k in range(1, batch + 1)
             if batch % k == 0 and counts(k) == split_counts(batch, *fractions)]
    raise UsageError(
        f"batch_size={batch} takes {split_counts(batch, *fractions)} (diagonal, boundary, "
        f"off-diagonal) rows, but its train.grad_accum={parts} parts would take {part} "
        f"each; use a grad_accum whose parts split the batch the same way: {valid}.")
  return part


def draw_times(rng: jax.Array, counts: tuple[int, int, int]):
  """(tau_s, tau_u, tau_t), each [sum(counts)], rows ordered diagonal, boundary, off."""
  diagonal, boundary, off = counts
  rng_diag, rng_gap, rng_start = jax.random.split(rng, 3)

  def uniform(key, n):
    return flow.stratified_uniform(key, n) if n else jnp.zeros((0,))

  tau_diag = uniform(rng_diag, diagonal)
  gap = uniform(rng_gap, off)
  start = uniform(rng_start, off) * (1 - gap)
  tau_s = jnp.concatenate([tau_diag, jnp.zeros(boundary), start])
  tau_t = jnp.concatenate([tau_diag, jnp.ones(boundary), start + gap])
  return tau_s, (tau_s + tau_t) / 2, tau_t


def _probs(model, h, tau_s, tau_t):
  return jax.nn.softmax(model(h, tau_s, tau_t), axis=-1)


def _column(x):
  return x[:, None, None]


def semigroup_target(student, h_s, embed, tau, times):
  """lambda delta_{s,u}(x_s) + (1 - lambda) delta_{u,t}(X_{s,u}(x_s)), [n, L, V]."""
  (tau_s, tau_u, tau_t), (s, u, t) = tau, times
  d_su = _probs(student, h_s, tau_s, tau_u)
  h_su = flow.flow_map(h_s, jnp.matmul(d_su, embed), s, u)
  d_ut = _probs(student, h_su, tau_u, tau_t)
  weight = _column(flow.semigroup_weight(s, u, t))
  return weight * d_su + (1 - weight) * d_ut


def eulerian_target(student, h_s, embed, tau, times, teacher_probs, schedule):
  """D_s + ((1 - s)(t - s) / (1 - t)) d/ds delta_{s,t}(x_s) along b_s = (D_s - x) / (1 - s)."""
  (tau_s, _, tau_t), (s, _, t) = tau, times
  velocity = flow.velocity(h_s, jnp.matmul(teacher_probs, embed), s)
  _, d_delta = jax.jvp(lambda a, h: _probs(student, h, a, tau_t), (tau_s, h_s),
                       (schedule.dtau_dt(s), velocity))
  scale = (1 - s) * (t - s) / (1 - t + flow.DENOMINATOR_EPS)
  return teacher_probs + _column(scale) * d_delta


def lagrangian_target(student, h_s, embed, tau, times, schedule):
  """sparsemax(delta_{t,t}(X_{s,t}(x_s)) - ((t - s)(1 - t) / (1 - s)) d/dt delta_{s,t})."""
  (tau_s, _, tau_t), (s, _, t) = tau, times
  delta, d_delta = jax.jvp(lambda b: _probs(student, h_s, tau_s, b), (tau_t,),
                           (schedule.dtau_dt(t),))
  h_st = flow.flow_map(h_s, jnp.matmul(delta, embed), s, t)
  d_tt = _probs(student, h_st, tau_t, tau_t)
  scale = (t - s) * (1 - t) / (1 - s + flow.DENOMINATOR_EPS)
  return flow.sparsemax(d_tt - _column(scale) * d_delta)


def distillation_objective(config: ml_collections.ConfigDict, vocab_size: int,
                           teacher_graphdef) -> train.Objective:
  """objective(student, batch, rng, teacher_params) for `config.distill.objective`.

  Without a teacher (teacher_params None) the diagonal target is the data.
  """
  cfg = config.distill
  if cfg.objective not in OBJECTIVES:
    raise UsageError(f"distill.objective={cfg.objective!r}; use one of {OBJECTIVES}.")
  schedule = get_schedule(vocab_size)
  latent = config.noise == "latent"
  boundary_fraction = _boundary_fraction(cfg)

  def objective(student, batch, rng, teacher_params):
    tokens = batch["tokens"]
    counts = split_counts(tokens.shape[0], cfg.diagonal_fraction, boundary_fraction)
    n_diag = counts[0]
    rng_times, rng_noise, rng_dropout = jax.random.split(rng, 3)
    tau = draw_times(rng_times, counts)
    times = tuple(schedule.t(x) for x in tau)
    embed = student.vocab_embed[...]
    teacher = None if teacher_params is None else nnx.merge(teacher_graphdef, teacher_params)
    # One noisy x_s read by the student (x_s @ E) and, if any, the teacher (x_s @ E_T).
    embeds = (embed,) if teacher is None else (embed, teacher.vocab_embed[...])
    if teacher is None:
      noise = [flow.embedded_noise(rng_noise, embed, tokens.shape, latent)]
    else:
      noise = flow.joint_embedded_noise(rng_noise, embeds, tokens.shape, latent)
    h_s, *h_teacher = [flow.interpolate(n, e[tokens], times[0]) for n, e in zip(noise, embeds)]

    off = slice(n_diag, None)
    off_tau = tuple(x[off] for x in tau)
    off_times = tuple(x[off] for x in times)
    teacher_probs = None
    if teacher is not None:  # D_s on the diagonal rows (on all rows for the Eulerian)
      rows = slice(None) if cfg.objective == "eulerian" else slice(0, n_diag)
      teacher_probs = jax.lax.stop_gradient(
          jax.nn.softmax(teacher(h_teacher[0][rows], tau[0][rows]), axis=-1))
    elif cfg.objective == "eulerian":
      raise ValueError("the eulerian objective follows the teacher's flow; pass its params")
    if cfg.objective == "semigroup":
      target = semigroup_target(student, h_s[off], embed, off_tau, off_times)
    elif cfg.objective == "eulerian":
      target = eulerian_target(student, h_s[off], embed, off_tau, off_times,
                               teacher_probs[off], schedule)
    else:
      target = lagrangian_target(student, h_s[off], embed, off_tau, off_times, schedule)
    target = jax.lax.stop_gradient(target)

    logits = student(h_s, tau[0], tau[2], dropout_rng=rng_dropout, capped=False)
    cap = student.output_cap
    if teacher is None:
      diagonal = flow.token_cross_entropy(logits[:n_diag], tokens[:n_diag], cap)
    else:
      diagonal = flow.soft_cross_entropy(logits[:n_diag], teacher_probs[:n_diag], cap)
    if cfg.objective == "eulerian":
      probs = jax.nn.softmax(flow.soft_cap(logits[off], cap), axis=-1)
      off_diagonal = jnp.sum((probs - target) ** 2, axis=-1)
    else:
      off_diagonal = flow.soft_cross_entropy(logits[off], target, cap)
    diagonal_loss, off_loss = diagonal.mean(), off_diagonal.mean()
    loss = (n_diag * diagonal_loss + (tokens.shape[0] - n_diag) * off_loss) / tokens.shape[0]
    return loss, {"loss": loss, "diagonal_loss": diagonal_loss,
                  "offdiagonal_loss": off_loss}
  return objective


def check_teacher(record: dict, config: ml_collections.ConfigDict, where: str) -> None:
  """The teacher must be an FLM whose architecture is the student's (but one time)."""
  if record.get("kind") != "flm":
    raise UsageError(f"teacher_checkpoint={where} holds a {record.get('kind')!r} run; "
                     "distillation needs an FLM teacher trained with --mode=train.")
  saved = record["config"]["model"]
  diffs = [f"model.{k} {saved.get(k)!r} != {v!r}" for k, v in config.model.to_dict().items()
           if k not in ("two_time", *checkpoint.NOT_ARCHITECTURE) and saved.get(k) != v]
  if diffs:
    raise UsageError(f"teacher_checkpoint={where} has another architecture ({'; '.join(diffs)}"
                     "; teacher != this config). Use the teacher's model settings.")


def student_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` for the student: two-time model, and distill.* in place of
  train.steps, train.learning_rate, train.b2 and batch_size (0 keeps it)."""
  config = copy.deepcopy(config)  # the student's settings stay out of the caller's config
  config.lock()
  cfg = config.distill
  config.batch_size = cfg.batch_size or config.batch_size
  config.train.update(steps=cfg.steps, learning_rate=cfg.learning_rate, b2=cfg.b2)
  config.model.two_time = True
  return config


def distill(config: ml_collections.ConfigDict, workdir: str):
  """`--mode=distill`: trains the FMLM student from config.teacher_checkpoint with the
  training loop (train.* as overridden by distill.*), then exports the student's EMA
  weights to WORKDIR/export."""
  config = student_config(config)
  if not config.teacher_checkpoint:
    raise UsageError("--mode=distill needs --config.teacher_checkpoint=DIR, the workdir (or "
                     "export) of a teacher trained with --mode=train.")
  path = train.check_workdir(workdir)
  # A resumed student keeps the teacher step it started from, even if the teacher trained on.
  own = checkpoint.Checkpoints(path / "checkpoints")
  resumed = own.latest_step()
  teacher_step = (own.record(resumed)["teacher_step"] if resumed is not None
                  else checkpoint.latest_step(config.teacher_checkpoint))
  record = checkpoint.read_record(config.teacher_checkpoint, teacher_step)
  check_teacher(record, config, config.teacher_checkpoint)
  prepared = pipeline.prepare(config, workdir)
  vocab_size = prepared.tokenizer.vocab_size
  if record["vocab_size"] != vocab_size:
    raise UsageError(f"teacher_checkpoint={config.teacher_checkpoint} has V = "
                     f"{record['vocab_size']}, this config's tokenizer V = {vocab_size}; use "
                     "the teacher's data and tokenizer settings.")
  part_counts(config)

  mesh = sharding.make_mesh(config.mesh)
  teacher_model = ml_collections.ConfigDict(dict(config.model.to_dict(), two_time=False))
  teacher_graphdef, teacher_abstract = train.param_layout(
      lambda: dit.from_config(teacher_model, vocab_size, nnx.Rngs(config.seed)), mesh)
  teacher_params = checkpoint.load_ema(config.teacher_checkpoint, teacher_abstract,
                                       teacher_step)

  def student_fn():
    return dit.from_config(config.model, vocab_size, nnx.Rngs(config.seed))

  def initial_params(run):
    """The teacher's EMA weights plus the student's zero-initialised second embedder."""
    return dict(train.random_params(run, student_fn), **teacher_params)

  teacher = {"teacher": str(config.teacher_checkpoint), "teacher_step": teacher_step}
  samplers = {f"flowmap_{n}": functools.partial(
      sampling.sample_flow_map, batch_size=config.train.num_samples,
      seq_len=config.data.seq_len, steps=n, gamma=config.sample.gamma,
      latent=config.noise == "latent") for n in (1, 2, 4)}
  run, state = train.fit(
      config, workdir, prepared, params_fn=student_fn,
      objective=distillation_objective(config, vocab_size, teacher_graphdef),
      samplers=samplers, kind="fmlm", initial_params=initial_params, frozen=teacher_params,
      frozen_shardings=jax.tree.map(lambda x: x.sharding, teacher_abstract),
      record_extra=teacher)
  export_dir = path / "export"
  checkpoint.export(export_dir, state["ema"],
                    dict(checkpoint.run_record(config, prepared.tokenizer, "fmlm"), **teacher))
  train.say(f"exported the student's EMA weights to {export_dir}")
  return run, state
