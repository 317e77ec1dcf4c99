"""FMLM self-distillation (the paper's v2 flow map method): a two-time student from an FLM teacher.

The student delta_{s,t}(x) = softmax(net(x, tau_s, tau_t)) starts as the teacher's EMA
weights with a second, zeroed time embedder, so delta_{s,s} = D_s at step 0. Each global
batch is split by fixed counts: a diagonal share (s = t; target the frozen teacher's
D_s(x_s)), a boundary share (tau_s = 0, tau_t = 1) and the off-diagonal rest (d ~ U[0, 1],
tau_s = U[0, 1] (1 - d), tau_t = tau_s + d, each stratified; midpoint tau_u). Rows are
assigned to the shares in batch order; batches are uniformly shuffled, so this is a random
assignment. The off-diagonal objective is one of

- SEMIGROUP (PSD, default): target lambda delta_{s,u}(x_s) + (1 - lambda)
  delta_{u,t}(X_{s,u}(x_s)) from the student itself without gradient; soft cross entropy;
- EULERIAN (ESD): target D_s + ((1 - s)(t - s) / (1 - t)) d/ds delta_{s,t} along the
  teacher's flow, by a JVP in (tau_s, x_s); squared error on probabilities (summed over
  the vocabulary). Its target divides by 1 - t, so it takes no boundary rows;
- LAGRANGIAN (LSD): target delta_{t,t}(X_{s,t}(x_s)) - ((t - s)(1 - t) / (1 - s))
  d/dt delta_{s,t}, by a JVP in tau_t, projected on the simplex with sparsemax; soft
  cross entropy. It takes no boundary rows either: at t = 1 its target is
  sparsemax(delta_{1,1}(delta_{0,1}(x_0))), the student's own one-step output read back
  by the denoiser, which a one-hot output already meets, so those rows tie nothing to
  the data.

With model.output_head "auto" or "fused" the student's soft cross entropies go through the
fused output head (flow.head_cross_entropy: no [B, L, V] logits or gradients), and their
targets (the teacher's D_s, the semigroup and Lagrangian targets) are kept in model.dtype
(bfloat16 by default; the plain head keeps them in float32, as the reference). The
Eulerian squared error reads the student's logits for its rows.

With train.condition, each example's given positions (flmjax/conditioning.py) are clean
in x_s for teacher and student alike, stay clean in the self-targets' intermediate states
(X_{s,u}, X_{s,t}; the Eulerian tangent is zero there) and are left out of both losses.

With model.learned_loss_weight (off in the paper's recipe), each row's loss becomes
exp(-w) * loss + w for w = w(tau_s) of the student's weighting network, which starts afresh
(w = 0) rather than from the teacher's, as in the reference; the shares' metrics are then
the weighted ones.

The student's self-targets are computed in training mode, with dropout (each call its own
mask), as the reference computes them; `distill.target_dropout=False` computes them
without. Everything the network reads is in latent form: x_s @ E, and
X_{s,u} @ E = a (x_s @ E) + b (D_su @ E).
"""

import copy
import dataclasses
import functools
from typing import Callable, NamedTuple

from etils import epath
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flmjax import checkpoint, conditioning, flow, state
from flmjax.errors import UsageError
from flmjax.models import dit
from flmjax.objectives import Objective, head_chunk
from flmjax.schedule import Schedule, get_schedule


def split_counts(batch_size: int, diagonal_fraction: float,
                 boundary_fraction: float) -> tuple[int, int, int]:
  """(diagonal, boundary, off-diagonal) rows of a batch, by floors of the cumulative
  fractions as the reference's `Distillation._get_split_indices` counts them (33 rows at
  0.5 and 1/64 take 16, 1 and 16), the off-diagonal share taking the rest."""
  diagonal = int(batch_size * diagonal_fraction)
  boundary = int(batch_size * (diagonal_fraction + boundary_fraction)) - diagonal
  return diagonal, boundary, batch_size - diagonal - boundary


# The largest float32 below 1: an off-diagonal tau_t = tau_s + d rounds to 1 about once in
# two million rows (the reference's float32 draw too), where the Eulerian target's
# (t - s) / (1 - t) would be about 1e8; tau_t stays at most this (t(tau) < 0.91 there).
_BELOW_ONE = float(np.nextafter(np.float32(1), np.float32(0)))


def draw_times(rng: jax.Array, counts: tuple[int, int, int], part: tuple = (0, 1)):
  """(tau_s, tau_u, tau_t), each [sum(counts)], rows ordered diagonal, boundary, off; the
  off-diagonal tau_t below 1 (`_BELOW_ONE`). Each uniform is stratified over its rows of
  the global batch, of which these are part `part` (flow.stratified_uniform)."""
  diagonal, boundary, off = counts
  rng_diag, rng_gap, rng_start = jax.random.split(rng, 3)

  def uniform(key, n):
    return flow.stratified_uniform(key, n, part) if n else jnp.zeros((0,))

  tau_diag = uniform(rng_diag, diagonal)
  gap = uniform(rng_gap, off)
  start = uniform(rng_start, off) * (1 - gap)
  tau_s = jnp.concatenate([tau_diag, jnp.zeros(boundary), start])
  tau_t = jnp.concatenate([tau_diag, jnp.ones(boundary), jnp.minimum(start + gap, _BELOW_ONE)])
  return tau_s, (tau_s + tau_t) / 2, tau_t


class Rows(NamedTuple):
  """The off-diagonal rows that a target reads."""
  h_s: jax.Array  # x_s @ E_S [n, L, D]
  embed: jax.Array  # E_S [V, D]
  tau: tuple  # (tau_s, tau_u, tau_t), each [n]
  times: tuple  # (s, u, t) = t(tau), each [n]
  schedule: Schedule
  teacher_probs: jax.Array | None = None  # D_s(x_s) [n, L, V], for the Eulerian target
  given: jax.Array | None = None  # given positions [n, L] (flmjax/conditioning.py)
  clean: jax.Array | None = None  # their clean rows E_S[token] [n, L, D]

  def probs(self, model, h, tau_s, tau_t, dropout=None):
    """The student's delta_{s,t}(h) [n, L, V] on these rows."""
    return jax.nn.softmax(model(h, tau_s, tau_t, given=self.given, dropout_rng=dropout),
                          axis=-1)

  def flow_map(self, denoised, s, t):
    """X_{s,t}(x_s) @ E towards `denoised` [n, L, V], the given positions kept clean."""
    return conditioning.clamp(flow.flow_map(self.h_s, flow.project(denoised, self.embed),
                                            s, t), self.given, self.clean)


def _keys(dropout, count: int):
  """`count` dropout keys from one, or Nones (no dropout)."""
  return (None,) * count if dropout is None else tuple(jax.random.split(dropout, count))


def semigroup_target(student, rows: Rows, dropout=None):
  """lambda delta_{s,u}(x_s) + (1 - lambda) delta_{u,t}(X_{s,u}(x_s)), [n, L, V]."""
  (tau_s, tau_u, tau_t), (s, u, t) = rows.tau, rows.times
  key_su, key_ut = _keys(dropout, 2)
  d_su = rows.probs(student, rows.h_s, tau_s, tau_u, key_su)
  d_ut = rows.probs(student, rows.flow_map(d_su, s, u), tau_u, tau_t, key_ut)
  weight = flow.per_row(flow.semigroup_weight(s, u, t), d_su.ndim)
  return weight * d_su + (1 - weight) * d_ut


def eulerian_target(student, rows: Rows, dropout=None):
  """D_s + ((1 - s)(t - s) / (1 - t)) d/ds delta_{s,t}(x_s) along b_s = (D_s - x) / (1 - s)."""
  (tau_s, _, tau_t), (s, _, t) = rows.tau, rows.times
  velocity = flow.velocity(rows.h_s, flow.project(rows.teacher_probs, rows.embed), s,
                           flow.DENOMINATOR_EPS)  # the reference's guard in its tangent
  velocity = conditioning.clamp(velocity, rows.given, jnp.zeros_like(velocity))  # held
  _, d_delta = jax.jvp(lambda a, h: rows.probs(student, h, a, tau_t, dropout),
                       (tau_s, rows.h_s), (rows.schedule.dtau_dt(s), velocity))
  scale = (1 - s) * (t - s) / (1 - t + flow.DENOMINATOR_EPS)
  return rows.teacher_probs + flow.per_row(scale, d_delta.ndim) * d_delta


def lagrangian_target(student, rows: Rows, dropout=None):
  """sparsemax(delta_{t,t}(X_{s,t}(x_s)) - ((t - s)(1 - t) / (1 - s)) d/dt delta_{s,t})."""
  (tau_s, _, tau_t), (s, _, t) = rows.tau, rows.times
  key_st, key_tt = _keys(dropout, 2)
  delta, d_delta = jax.jvp(lambda b: rows.probs(student, rows.h_s, tau_s, b, key_st),
                           (tau_t,), (rows.schedule.dtau_dt(t),))
  d_tt = rows.probs(student, rows.flow_map(delta, s, t), tau_t, tau_t, key_tt)
  scale = (t - s) * (1 - t) / (1 - s + flow.DENOMINATOR_EPS)
  return flow.sparsemax(d_tt - flow.per_row(scale, d_delta.ndim) * d_delta)


def squared_error(logits, target, cap: float):
  """|softmax(soft_cap(logits)) - target|^2 summed over the vocabulary, [n, L]."""
  probs = jax.nn.softmax(flow.soft_cap(logits, cap), axis=-1)
  return jnp.sum((probs - target) ** 2, axis=-1)


def flow_map_objective(config: ml_collections.ConfigDict, vocab_size: int, teacher_graphdef,
                       *, train: bool = True, target: Callable, off_diagonal: Callable,
                       boundary_rows: bool, teacher_off_diagonal: bool) -> state.ObjectiveFn:
  """objective(student, batch, rng, teacher_params): the diagonal rows against the frozen
  teacher's D_s, the off-diagonal rows against `target` with the `off_diagonal` loss."""
  cfg = config.distill
  schedule = get_schedule(vocab_size)
  fractions = (cfg.diagonal_fraction, cfg.boundary_fraction if boundary_rows else 0.0)
  target_dropout = train and cfg.target_dropout
  fused = config.model.output_head in ("auto", "fused")
  chunk = head_chunk(config.model, vocab_size)
  target_dtype = jnp.dtype(config.model.dtype)
  kinds = conditioning.parse_kinds(config.train.condition)

  def objective(student, batch, rng, teacher_params, part=(0, 1)):
    tokens = batch["tokens"]
    counts = split_counts(tokens.shape[0], *fractions)
    n_diag = counts[0]
    given = None
    if kinds:  # the teacher's conditions: the same draw for teacher, student and targets
      rng, rng_given = jax.random.split(rng)
      given = conditioning.draw(rng_given, tokens.shape, kinds,
                                config.train.condition_dropout)
    rng_times, rng_noise, rng_dropout, rng_target = jax.random.split(rng, 4)
    tau = draw_times(rng_times, counts, part)
    times = tuple(schedule.t(x) for x in tau)
    teacher = nnx.merge(teacher_graphdef, teacher_params)
    # One noisy x_s, read by the student (x_s @ E_S) and the teacher (x_s @ E_T), the
    # given positions clean in both.
    embeds = (student.vocab_embed[...], teacher.vocab_embed[...])
    h_s, h_teacher = [conditioning.clamp(flow.interpolate(noise, e[tokens], times[0]), given,
                                         e[tokens]) for noise, e in zip(
        flow.joint_embedded_noise(rng_noise, embeds, tokens.shape, config.noise == "latent"),
        embeds)]

    def part(x, rows):
      return None if x is None else x[rows]
    teacher_rows = slice(None) if teacher_off_diagonal else slice(0, n_diag)
    teacher_probs = jax.lax.stop_gradient(jax.nn.softmax(teacher(
        h_teacher[teacher_rows], tau[0][teacher_rows], given=part(given, teacher_rows)),
        axis=-1))
    diag, off = slice(0, n_diag), slice(n_diag, None)
    rows = Rows(h_s[off], embeds[0], tuple(x[off] for x in tau), tuple(x[off] for x in times),
                schedule, teacher_probs[off] if teacher_off_diagonal else None,
                part(given, off), embeds[0][tokens[off]] if kinds else None)
    target_probs = jax.lax.stop_gradient(
        target(student, rows, rng_target if target_dropout else None))
    dropout = rng_dropout if train else None
    cap = student.output_cap
    # Each share's loss: the mean over its positions that are not given; with the learned
    # loss weighting, of exp(-w) * loss + w for w = w(tau_s) of the row.
    free = jnp.ones(tokens.shape) if given is None else (~given).astype(jnp.float32)
    w = (jnp.zeros(tokens.shape[:1]) if student.loss_weighting is None
         else student.loss_weighting(tau[0]))[:, None]

    def share(rows):
      return free[rows] / jnp.maximum(free[rows].sum(), 1.0)

    def weights(rows):
      return share(rows) * jnp.exp(-w[rows])

    def offset(rows):
      return jnp.sum(share(rows) * w[rows])
    if fused:
      features = student.features(h_s, tau[0], tau[2], given=given, dropout_rng=dropout)

      def mean_cross_entropy(rows, targets):  # the soft CE's mean, by the fused head
        return flow.head_cross_entropy(
            features[rows], student.output.kernel[...], student.output.bias[...],
            targets.astype(target_dtype), weights(rows), cap, student.output.dtype, chunk)[0]
      diagonal = mean_cross_entropy(diag, teacher_probs[:n_diag])
      if off_diagonal is flow.soft_cross_entropy:
        off_loss = mean_cross_entropy(off, target_probs)
      else:
        off_loss = jnp.sum(weights(off) * off_diagonal(
            student.output(features[off]), target_probs, cap))
    else:
      logits = student(h_s, tau[0], tau[2], given=given, dropout_rng=dropout, capped=False)
      diagonal = jnp.sum(weights(diag) * flow.soft_cross_entropy(
          logits[diag], teacher_probs[:n_diag], cap))
      off_loss = jnp.sum(weights(off) * off_diagonal(logits[off], target_probs, cap))
    diagonal, off_loss = diagonal + offset(diag), off_loss + offset(off)
    loss = (n_diag * diagonal + (tokens.shape[0] - n_diag) * off_loss) / tokens.shape[0]
    return loss, {"loss": loss, "diagonal_loss": diagonal, "offdiagonal_loss": off_loss}
  return objective


def _flow_map(name, target, off_diagonal, *, boundary_rows=False, jvp=False,
              teacher_off_diagonal=False) -> Objective:
  return Objective(name, "fmlm", functools.partial(
      flow_map_objective, target=target, off_diagonal=off_diagonal,
      boundary_rows=boundary_rows, teacher_off_diagonal=teacher_off_diagonal),
                   teacher="flm", boundary_rows=boundary_rows, jvp=jvp)


SEMIGROUP = _flow_map("semigroup", semigroup_target, flow.soft_cross_entropy,
                      boundary_rows=True)
EULERIAN = _flow_map("eulerian", eulerian_target, squared_error, jvp=True,
                     teacher_off_diagonal=True)
LAGRANGIAN = _flow_map("lagrangian", lagrangian_target, flow.soft_cross_entropy, jvp=True)


def part_counts(config: ml_collections.ConfigDict,
                objective: Objective) -> tuple[int, int, int]:
  """split_counts of each of the train.grad_accum parts of a global batch, which together
  must give the global batch's counts (with floors per part, boundary rows could vanish)."""
  cfg, batch, parts = config.distill, config.batch_size, config.train.grad_accum
  fractions = (cfg.diagonal_fraction,
               cfg.boundary_fraction if objective.boundary_rows else 0.0)

  def counts(k):  # the global counts that parts of batch / k rows add up to
    return tuple(k * n for n in split_counts(batch // k, *fractions))

  part = split_counts(batch // parts, *fractions)
  if part[0] < 1 or part[2] < 1:
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


def student_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` for the student: distill.* in place of train.steps,
  train.learning_rate, train.b2 and batch_size (0 keeps it); DCD's learning rate and b2
  from distill.dcd."""
  config = copy.deepcopy(config)  # the student's settings stay out of the caller's config
  config.lock()
  cfg = config.distill
  optimizer = cfg.dcd if cfg.objective == "dcd" else cfg
  config.batch_size = cfg.batch_size or config.batch_size
  config.train.update(steps=cfg.steps, learning_rate=optimizer.learning_rate,
                      b2=optimizer.b2)
  return config


@dataclasses.dataclass
class Teacher:
  """The teacher of a student: its graph, EMA params and where they came from."""
  graphdef: nnx.GraphDef
  params: dict
  record: dict  # {"teacher": directory, "teacher_step": step}


def teacher_model(config: ml_collections.ConfigDict, record: dict | None = None) -> dict:
  """The teacher's model settings: the student's, one-time, with the learned loss weighting
  the teacher's run record `record` says it has (none without one): a module its
  denoiser never reads, which the student trains afresh (the reference's students have it,
  their teachers not)."""
  loss_weight = bool(record and record["config"]["model"].get("learned_loss_weight"))
  return dict(config.model.to_dict(), two_time=False, learned_loss_weight=loss_weight)


def check_teacher(config: ml_collections.ConfigDict, workdir: epath.Path, kind: str,
                  self_teacher: bool = False) -> tuple[int | None, dict]:
  """(step, run record) of the `kind` teacher a student distils from, the record checked
  against the student's architecture (config.model, with the student's family settings;
  its vocabulary is checked when it is loaded). A resumed student keeps the step it
  started from, even if the teacher trained on; a resumed student of its own teacher
  (`self_teacher`: its state holds it) needs nothing of the teacher's, and its own record
  stands in for the teacher's."""
  own = (checkpoint.Checkpoints(workdir / "checkpoints").newest_record()
         if (workdir / "checkpoints").exists() else None)
  if own is not None and "teacher_step" not in own:
    raise UsageError(f"{workdir} holds a {own.get('kind')!r} run trained with --mode=train, "
                     "not a distillation; use a new --workdir for the student.")
  step = (own["teacher_step"] if own is not None
          else checkpoint.latest_step(config.teacher_checkpoint))
  record = (own if own is not None and self_teacher
            else checkpoint.read_record(config.teacher_checkpoint, step))
  checkpoint.check_compatible(
      record, kind=kind, vocab_size=None, model=teacher_model(config, record),
      where=f"teacher_checkpoint={config.teacher_checkpoint}",
      advice=f"distill.objective={config.distill.objective} needs a {kind} teacher trained "
             "with --mode=train, with this config's model settings")
  return step, record


def load_teacher(config: ml_collections.ConfigDict, step: int | None, record: dict,
                 tokenizer, mesh) -> Teacher:
  """The EMA weights of config.teacher_checkpoint at `step` (whose run record is
  `record`), placed on `mesh`; refused unless the teacher was trained with `tokenizer`,
  the student's."""
  if record["vocab_size"] != tokenizer.vocab_size:
    raise UsageError(f"teacher_checkpoint={config.teacher_checkpoint} has V = "
                     f"{record['vocab_size']}, this config's tokenizer V = "
                     f"{tokenizer.vocab_size}; use the teacher's data and tokenizer settings.")
  if record["tokenizer"]["fingerprint"] != tokenizer.fingerprint:
    raise UsageError(f"teacher_checkpoint={config.teacher_checkpoint} was trained with "
                     "another tokenizer than this config's (same V, other ids: e.g. a "
                     "SentencePiece model trained on other data.max_documents); use the "
                     "teacher's data and tokenizer settings.")
  graphdef, abstract = state.param_layout(
      dit.builder(teacher_model(config, record), tokenizer.vocab_size), mesh)
  params = checkpoint.load_ema(config.teacher_checkpoint, abstract, step)
  return Teacher(graphdef, params, teacher_source(config, step))


def teacher_source(config: ml_collections.ConfigDict, step: int | None) -> dict:
  """Where a student's teacher came from, for its run record."""
  return {"teacher": str(config.teacher_checkpoint), "teacher_step": step}
