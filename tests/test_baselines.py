"""The discrete baselines (MDLM, SEDD, D3PM, AR; Duo's closed forms are in test_uniform.py):
schedule, losses, samplers and the family rules, each checked against a closed form or a
second code path written here."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import randomize, small_dit, train_config
from flmjax import (absorbing, autoregressive, evaluate, flow, generate, registry, sampling,
                    train)
from flmjax.data import pipeline
from flmjax.errors import UsageError
from flmjax.models import dit
from flmjax.validate import validate

V, M = 12, 11  # vocabulary and mask id (the last row, as GPT-2's)


def _config(mask_id=M):
  return ml_collections.ConfigDict({"model": {"mask_id": mask_id}})


def _constant_model(logits: np.ndarray, causal=False):
  """A DiT whose output is `logits` [V] at every position and time: the zero-initialised
  output layer leaves its bias."""
  model = dit.DiT(V, 16, 1, 2, 8, attn_softcap=0.0 if causal else 50.0, output_cap=0.0,
                  causal=causal, dtype=jnp.float32, rngs=nnx.Rngs(0))
  model.output.bias[...] = jnp.asarray(logits, jnp.float32)
  return model


def _data_distribution():
  p = np.arange(1.0, V, dtype=np.float64)  # real tokens 0..V-2, mask excluded
  return p / p.sum()


def _iid_tokens(p, shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).choice(len(p), size=shape, p=p), jnp.int32)


def test_log_linear_schedule_values():
  # alpha_t = 1 - (1 - 1e-3) t: t = 0.5 -> alpha 0.5005, sigma 0.69215; alpha_1 = 1e-3.
  np.testing.assert_allclose(absorbing.alpha(0.5), 0.5005)
  np.testing.assert_allclose(absorbing.sigma(jnp.float32(0.5)), 0.69215, atol=1e-5)
  np.testing.assert_allclose(absorbing.alpha(1.0), 1e-3)


def test_training_times_are_stratified_in_eps_to_one():
  t = np.sort(np.asarray(absorbing.training_times(jax.random.key(0), 64)))
  u = (t - absorbing.EPS) / (1 - absorbing.EPS)
  assert np.all((u >= np.arange(64) / 64) & (u < np.arange(1, 65) / 64))


def test_masking_rate_is_one_minus_alpha():
  x0 = jnp.zeros((4, 20000), jnp.int32)
  t = jnp.array([0.0, 0.25, 0.5, 1.0])
  rate = np.asarray((absorbing.mask_tokens(jax.random.key(1), x0, t, M) == M).mean(1))
  np.testing.assert_allclose(rate, 1 - absorbing.alpha(np.asarray(t)), atol=0.012)


@pytest.mark.parametrize("kind", ["mdlm", "sedd"])
def test_optimal_denoiser_loss_is_the_data_entropy(kind):
  """Tokens drawn independently from p: the optimal MDLM denoiser predicts p, the optimal
  SEDD score is p_t(v) / p_t(m) = q p(v) (its logits log p + log(V - 1)). Either loss,
  averaged over t in [eps, 1] and the masking, is (1 - eps) H(p) per token."""
  p = _data_distribution()
  logits = np.append(np.log(p), 0.0) + (np.log(V - 1) if kind == "sedd" else 0.0)
  model = _constant_model(logits)
  build = {"mdlm": absorbing.mdlm_objective, "sedd": absorbing.sedd_objective}[kind]
  objective = build(_config(), V, train=False)
  graphdef, params = nnx.split(model)
  loss = jax.jit(lambda params, tokens, key: objective(nnx.merge(graphdef, params),
                                                       {"tokens": tokens}, key, None)[0])
  losses = [float(loss(params, _iid_tokens(p, (256, 32), seed), jax.random.key(seed)))
            for seed in range(4)]
  entropy = -(p * np.log(p)).sum()
  np.testing.assert_allclose(np.mean(losses), (1 - absorbing.EPS) * entropy, rtol=0.04)


def test_perfect_denoiser_of_known_tokens_has_zero_loss():
  x0 = jax.random.randint(jax.random.key(0), (4, 16), 0, M)
  xt = absorbing.mask_tokens(jax.random.key(1), x0, jnp.full((4,), 0.7), M)
  t = jnp.full((4,), 0.7)
  sure = 40.0 * jax.nn.one_hot(x0, V)  # p(x0) = 1 - O(e^-40)
  np.testing.assert_allclose(absorbing.mdlm_token_loss(sure, xt, x0, t, M), 0, atol=1e-5)
  # SEDD: the score of a certain token is q at x0 and 0 elsewhere.
  q = 1 / np.expm1(absorbing.sigma(0.7))
  score = jnp.log(q * jax.nn.one_hot(x0, V) + 1e-30) + jnp.log(
      jnp.expm1(absorbing.sigma(t)))[:, None, None] + np.log(V - 1)
  np.testing.assert_allclose(absorbing.sedd_token_loss(score, xt, x0, t, M), 0, atol=1e-4)


def test_sedd_scores_a_clean_mask_id_with_the_reset_entry_at_x_t():
  """Text can encode to the mask id ([MASK] in BERT text): at a masked position the score
  entry at x_t = m is set to 1, so the term -q log s_x0 vanishes; the rest of the
  expression, written out here in float64, is unchanged."""
  logits = jax.random.normal(jax.random.key(0), (1, 2, V))
  x0, xt, t = jnp.array([[M, 2]]), jnp.array([[M, M]]), 0.5
  got = absorbing.sedd_token_loss(logits, xt, x0, jnp.array([t]), M)
  f = np.asarray(logits[0], np.float64)
  a = 1 - (1 - absorbing.EPS) * t
  sigma = -np.log(a)
  log_s = f - np.log(np.expm1(sigma)) - np.log(V - 1)
  q, dsigma = 1 / np.expm1(sigma), (1 - absorbing.EPS) / a
  positive = np.exp(np.delete(log_s, M, axis=-1)).sum(-1)
  want = dsigma * (positive - q * np.array([0.0, log_s[1, 2]]) + q * (np.log(q) - 1))
  np.testing.assert_allclose(got[0], want, rtol=1e-5)


def test_sedd_loss_is_minimised_by_the_true_score_ratio():
  """For a masked position whose clean token is distributed as p, the expected denoising
  score entropy is stationary at s_v = p_t(v) / p_t(m) = alpha p(v) / (1 - alpha), the
  ratio of the forward process's marginals, and there equals the MDLM loss."""
  p = jnp.asarray(_data_distribution(), jnp.float32)
  t = jnp.array([0.3])
  a = absorbing.alpha(0.3)
  ratio = a * p / (1 - a)
  logits = jnp.append(jnp.log(ratio), 0.0) + jnp.log(jnp.expm1(absorbing.sigma(t))) + \
      np.log(V - 1)
  xt = jnp.full((1, 1), M)

  def expected(logits, token_loss):
    losses = jnp.stack([token_loss(logits[None, None], xt, jnp.full((1, 1), v), t, M)[0, 0]
                        for v in range(V - 1)])
    return (p * losses).sum()

  grad = jax.jit(jax.grad(expected), static_argnums=1)(logits, absorbing.sedd_token_loss)
  np.testing.assert_allclose(grad, 0, atol=1e-5)
  mdlm_logits = jnp.append(jnp.log(p), 0.0)
  value = jax.jit(expected, static_argnums=1)
  np.testing.assert_allclose(value(logits, absorbing.sedd_token_loss),
                             value(mdlm_logits, absorbing.mdlm_token_loss), rtol=1e-5)


def test_d3pm_times_snap_to_its_grid_of_1000_steps():
  """(floor(T t) + 1) / T in float32: the smallest training time, 1e-3 = 1 / T, is step 2;
  a time rounded up to 1 stays on the grid's last step."""
  t = jnp.array([1e-3, 1.5e-3, 2e-3, 0.5, 0.9999, 1.0], jnp.float32)
  np.testing.assert_allclose(absorbing.d3pm_time(t), [2e-3, 2e-3, 3e-3, 0.501, 1.0, 1.0],
                             rtol=1e-6)


def _absorbing_kernel(keep):
  """q(x_t | x_s) [V, V] of masking with probability 1 - keep (the mask stays the mask)."""
  kernel = keep * np.eye(V)
  kernel[:, M] += 1 - keep
  kernel[M] = np.eye(V)[M]
  return kernel


@pytest.mark.parametrize("k", [2, 3, 50, 1000])
def test_d3pm_loss_is_t_times_the_kl_to_the_models_posterior(k):
  """At a masked position and grid step k: T KL(q(x_s | x_t, x0) || p_theta(x_s | x_t)),
  both posteriors by Bayes' rule over the forward kernels in float64, the model's with
  x0's one-hot replaced by softmax(f) over all V (docs/baselines.md, "D3PM", with the next
  level 1 - (u - h)); 0 at a clean position and for a certain model."""
  t = k / 1000
  u = 1 - absorbing.alpha(t)
  a_t, a_s = 1 - u, 1 - (u - 1 / 1000)
  np.testing.assert_allclose(_absorbing_kernel(a_s) @ _absorbing_kernel(a_t / a_s),
                             _absorbing_kernel(a_t), atol=1e-15)
  step, marginal = _absorbing_kernel(a_t / a_s)[:, M], _absorbing_kernel(a_s)
  rng = np.random.default_rng(k)
  for scale in (1.0, 6.0):
    logits = rng.normal(size=V) * scale
    p = np.exp(logits - logits.max())
    p /= p.sum()
    for x0 in (2, 5):
      true = step * marginal[x0] / (step * marginal[x0]).sum()
      model = step * (p @ marginal) / (step * (p @ marginal)).sum()
      kl = (true * np.log(np.where(true > 0, true / model, 1.0))).sum()
      got = absorbing.d3pm_token_loss(jnp.asarray(logits, jnp.float32)[None, None],
                                      jnp.array([[M]]), jnp.array([[x0]]),
                                      jnp.array([t], jnp.float32), M)
      np.testing.assert_allclose(got[0, 0], 1000 * kl, rtol=2e-4, atol=1e-5)
  clean = absorbing.d3pm_token_loss(jnp.zeros((1, 1, V)), jnp.array([[3]]), jnp.array([[3]]),
                                    jnp.array([t], jnp.float32), M)
  sure = absorbing.d3pm_token_loss(40.0 * jax.nn.one_hot(jnp.array([[3]]), V),
                                   jnp.array([[M]]), jnp.array([[3]]),
                                   jnp.array([t], jnp.float32), M)
  assert float(clean[0, 0]) == 0 and abs(float(sure[0, 0])) < 1e-4


@pytest.mark.parametrize("kind", ["mdlm", "sedd"])
def test_mdlm_and_sedd_objectives_feed_the_network_their_time(kind):
  """On the objective's own draws of t and x_t, the network at time 0 (MDLM, which ignores
  time) or at sigma_t = -log(1 - (1 - 1e-3) t) (SEDD); the loss the mean token loss."""
  model = randomize(_constant_model(np.zeros(V)))
  tokens = jax.random.randint(jax.random.key(2), (4, 6), 0, M)
  objective = {"mdlm": absorbing.mdlm_objective, "sedd": absorbing.sedd_objective}[kind]
  loss, _ = objective(_config(), V, train=False)(model, {"tokens": tokens},
                                                 jax.random.key(3), None)
  rng_t, rng_noise, _ = jax.random.split(jax.random.key(3), 3)
  t = absorbing.training_times(rng_t, 4)
  xt = absorbing.mask_tokens(rng_noise, tokens, t, M)
  time = np.zeros(4) if kind == "mdlm" else -np.log(1 - 0.999 * np.asarray(t, np.float64))
  logits = model(model.embed_ids(xt), jnp.asarray(time, jnp.float32))
  token_loss = {"mdlm": absorbing.mdlm_token_loss, "sedd": absorbing.sedd_token_loss}[kind]
  np.testing.assert_allclose(loss, token_loss(logits, xt, tokens, t, M).mean(), rtol=1e-5)


def test_d3pm_objective_adds_the_clean_sequences_reconstruction_at_snapped_times():
  """The network on the masked ids at sigma of the snapped time, and on the clean ids at
  sigma = 0 for -log p_theta(x0 | x0) at every position."""
  model = randomize(_constant_model(np.zeros(V)))
  tokens = jax.random.randint(jax.random.key(2), (4, 6), 0, M)
  loss, _ = absorbing.d3pm_objective(_config(), V, train=False)(
      model, {"tokens": tokens}, jax.random.key(3), None)
  rng_t, rng_noise, _ = jax.random.split(jax.random.key(3), 3)
  t = (np.floor(1000 * np.asarray(absorbing.training_times(rng_t, 4))) + 1) / 1000
  xt = absorbing.mask_tokens(rng_noise, tokens, jnp.asarray(t, jnp.float32), M)
  noisy = model(model.embed_ids(xt), jnp.asarray(-np.log(1 - 0.999 * t), jnp.float32))
  clean = jax.nn.log_softmax(model(model.embed_ids(tokens), jnp.zeros(4)), axis=-1)
  expected = absorbing.d3pm_token_loss(noisy, xt, tokens, jnp.asarray(t, jnp.float32), M) - \
      jnp.take_along_axis(clean, tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(loss, expected.mean(), rtol=1e-5)


def test_d3pm_step_is_the_references_draw_over_real_tokens_and_the_mask():
  """The factored step (unmask with u, then a token from pi) against the reference's one
  categorical draw over the weights p_v (alpha_s - alpha_t), v real, and 1 - alpha_s for
  the mask, with p = softmax(f) over all V and its mask entry dropped; samples after the
  noise-removal call hold no mask."""
  logits = np.random.default_rng(3).normal(size=V) * 2
  p = np.exp(logits) / np.exp(logits).sum()
  model = _constant_model(logits)
  row = {key: jnp.asarray(value[1]) for key, value in absorbing.grid(3).items()}
  pi, unmask = absorbing.STEPS["d3pm"](model, jnp.full((1, 1), M), row, M)
  a_t, a_s = 1 - (1 - 1e-3) * np.linspace(1, 1e-5, 4)[1:3]  # step 2 of 3
  weights = np.append(p[:M] * (a_s - a_t), 1 - a_s)
  weights /= weights.sum()
  np.testing.assert_allclose(float(unmask[0, 0]) * np.asarray(pi[0, 0, :M]), weights[:M],
                             rtol=1e-5)
  np.testing.assert_allclose(1 - float(unmask[0, 0]), weights[M], rtol=1e-5)
  samples, calls = _samples(model, "d3pm", 3)
  assert int(calls) == 4 and not np.any(np.asarray(samples) == M)
  frequency = np.bincount(np.asarray(samples).ravel(), minlength=V)[:M] / samples.size
  np.testing.assert_allclose(frequency, p[:M] / p[:M].sum(), atol=0.025)


def test_sampler_grid_ends_with_the_noise_removal_step():
  grid = absorbing.grid(4)
  np.testing.assert_allclose(1 - np.exp(-grid["sigma"]),
                             1 - absorbing.alpha(np.linspace(1, 1e-5, 5)), atol=1e-12)
  assert grid["unmask"][-1] == 1 and list(grid["last"]) == [False] * 4 + [True]
  t = np.append(np.linspace(1, 1e-5, 5), 0.0)
  np.testing.assert_allclose(grid["gap"], (1 - 1e-3) * -np.diff(t), atol=1e-16)
  np.testing.assert_allclose(grid["masked"], (1 - 1e-3) * t[1:], atol=1e-16)


def _replay(model, kind, steps, rng, shape):
  """The absorbing sampler's steps taken one by one with its draws (the formulas of
  test_each_sampler_feeds_the_network_its_time): the final tokens, the last step's drawn
  tokens and, per step, whether it changed any token."""
  x = jnp.full(shape, M, jnp.int32)
  alphas = np.append(1 - (1 - 1e-3) * np.linspace(1.0, 1e-5, steps + 1), 1.0)
  changed = []
  for i, key in enumerate(jax.random.split(rng, steps + 1)):
    a_t, a_s = alphas[i], alphas[i + 1]
    logits = model(model.embed_ids(x), jnp.full(shape[:1], 0.0 if kind == "mdlm" else
                                                -np.log(a_t), jnp.float32))
    p = jax.nn.softmax(logits)
    if i == steps:
      u = 1.0
    elif kind == "mdlm":
      u = (a_s - a_t) / (1 - a_t)
    elif kind == "sedd":
      score = jnp.exp(logits) / (np.expm1(-np.log(a_t)) * (V - 1))
      u = jnp.minimum(np.expm1(np.log(a_s) - np.log(a_t)) * (score.sum(-1) - score[..., M]),
                      1.0)
    else:
      gain = (a_s - a_t) * (1 - p[..., M])
      u = gain / (gain + 1 - a_s)
    key_unmask, key_token = jax.random.split(key)
    real = p.at[..., M].set(0.0)
    drawn = sampling.categorical(key_token, real / real.sum(-1, keepdims=True))
    new = jnp.where((x == M) & (jax.random.uniform(key_unmask, x.shape) < u), drawn, x)
    changed.append(bool(jnp.any(new != x)))
    x = new
  return x, drawn, changed


@pytest.mark.parametrize("kind", ["mdlm", "sedd", "d3pm"])
def test_each_sampler_feeds_the_network_its_time(kind):
  """With a network that depends on its time input, the compiled sampler equals its steps
  taken one by one here with the same draws, on t = linspace(1, 1e-5, k + 1), sigma_t =
  -log alpha_t, alpha_t = 1 - (1 - 1e-3) t, s the next time (alpha_s = 1 at the last call,
  where every mask is revealed), f the network's logits:
  - MDLM: the network at time 0, mask revealed with u = (alpha_s - alpha_t) / (1 - alpha_t);
  - SEDD: at sigma_t, u = (e^(sigma_t - sigma_s) - 1) sum_{v != m} s_v with the score
    s_v = e^f_v / ((e^sigma_t - 1)(V - 1)), clipped to 1;
  - D3PM: at sigma_t, u = g / (g + 1 - alpha_s), g = (alpha_s - alpha_t) (1 - p(m)),
    p = softmax(f) over all V;
  the token drawn from softmax(f) over the real ids."""
  graphdef, params = small_dit(V)
  params = nnx.to_pure_dict(params)
  model = nnx.merge(graphdef, params)
  steps, rng = 3, jax.random.key(4)
  got, calls = absorbing.tokens(graphdef, params, rng, absorbing.grid(steps), kind=kind,
                                batch_size=4, seq_len=6, mask_id=M)
  x, drawn, _ = _replay(model, kind, steps, rng, (4, 6))
  assert int(calls) == steps + 1 and not np.any(np.asarray(x) == M)
  assert 0 < np.mean(np.asarray(got) == np.asarray(drawn)) < 1  # some revealed before the end
  np.testing.assert_array_equal(got, x)


def _samples(model, kind, steps, seed=0, n=512, length=4, cache=False, **options):
  graphdef, params = nnx.split(model)
  return absorbing.tokens(graphdef, nnx.to_pure_dict(params), jax.random.key(seed),
                          absorbing.grid(steps), kind=kind, batch_size=n, seq_len=length,
                          mask_id=M, cache=cache, **options)


def test_mdlm_and_sedd_samplers_draw_the_modelled_tokens(steps=3):
  """With the exact model of independent tokens ~ p, MDLM's ancestral and SEDD's analytic
  steps are the same reverse process (SEDD unmasks with (e^d - 1) sum s = (alpha_s -
  alpha_t) / (1 - alpha_t)): the same draws give the same tokens, distributed as p, after
  k + 1 network calls."""
  p = _data_distribution()
  mdlm, mdlm_calls = _samples(_constant_model(np.append(np.log(p), 0.0)), "mdlm", steps)
  sedd, sedd_calls = _samples(_constant_model(np.append(np.log(p) + np.log(V - 1), 0.0)),
                              "sedd", steps)
  assert int(mdlm_calls) == int(sedd_calls) == steps + 1
  np.testing.assert_array_equal(mdlm, sedd)
  frequency = np.bincount(np.asarray(mdlm).ravel(), minlength=V) / mdlm.size
  np.testing.assert_allclose(frequency[:M], p, atol=0.025)
  assert frequency[M] == 0


@pytest.mark.slow
def test_mdlm_cache_gives_the_same_samples_with_fewer_calls():
  model = randomize(_constant_model(np.zeros(V)))
  plain, plain_calls = _samples(model, "mdlm", 64, n=2, length=6)
  cached, cached_calls = _samples(model, "mdlm", 64, n=2, length=6, cache=True)
  np.testing.assert_array_equal(plain, cached)
  # The network is called again only after a step that changed a token (the last step's
  # change needs no further call): 1 + those steps, counted on the steps replayed here.
  replayed, _, changed = _replay(model, "mdlm", 64, jax.random.key(0), (2, 6))
  np.testing.assert_array_equal(replayed, plain)
  assert int(plain_calls) == 65 and int(cached_calls) == 1 + sum(changed[:-1]) < 13
  assert not np.any(np.asarray(cached) == M)


def test_nucleus_and_temperature_closed_forms():
  p = jnp.array([0.5, 0.3, 0.15, 0.05])
  np.testing.assert_allclose(sampling.nucleus(p, top_p=0.8), [0.625, 0.375, 0, 0], atol=1e-6)
  np.testing.assert_allclose(sampling.nucleus(p, top_p=0.81),
                             np.array([0.5, 0.3, 0.15, 0]) / 0.95, atol=1e-6)
  np.testing.assert_allclose(sampling.nucleus(p, top_p=0.1), [1, 0, 0, 0])
  squared = np.array([0.25, 0.09, 0.0225, 0.0025])
  np.testing.assert_allclose(sampling.nucleus(p, temperature=0.5), squared / squared.sum(),
                             rtol=1e-5)
  np.testing.assert_array_equal(sampling.nucleus(p), p)
  # The nucleus of p first ([0.6, 0.3] / 0.9), then the temperature: [0.8, 0.2, 0]
  np.testing.assert_allclose(sampling.nucleus(jnp.array([0.6, 0.3, 0.1]), 0.5, 0.65),
                             [0.8, 0.2, 0], atol=1e-6)


@pytest.mark.parametrize("family", ["mdlm", "sedd", "d3pm", "ar"])
def test_temperature_and_top_p_reach_every_discrete_sampler(family):
  """From config.sample through registry.sampler: the tokens of a model whose every
  position predicts p = (1, ..., 11) / 66 are distributed as p's nucleus at top_p 0.9
  (ids 3 to 10: the mass ranked above id 2, p = 3/66, is 60/66) at temperature 0.5
  (p^2, renormalised)."""
  p = _data_distribution()
  expected = np.where(np.arange(M) >= 3, p**2, 0.0)
  expected /= expected.sum()
  logits = np.log(p) + (np.log(V - 1) if family == "sedd" else 0.0)  # SEDD: a score
  model = _constant_model(np.append(logits, 5.0 if family == "ar" else 0.0),
                          causal=family == "ar")
  config = train_config()
  config.sample.update(temperature=0.5, top_p=0.9)
  _, sample = registry.sampler(family, config, 2, 2048, seq_len=8, mask_id=M, bos_id=0)
  graphdef, params = nnx.split(model)
  tokens = np.asarray(sample(graphdef, nnx.to_pure_dict(params), jax.random.key(0))[0])
  tokens = tokens[:, 1:] if family == "ar" else tokens  # after BOS
  frequency = np.bincount(tokens.ravel(), minlength=V) / tokens.size
  np.testing.assert_array_equal(frequency[:3], 0)
  np.testing.assert_allclose(frequency[:M], expected, atol=0.012)
  assert frequency[M] == 0


@pytest.mark.slow
def test_causal_model_sees_only_the_past_and_its_cache_decodes_the_same():
  model = randomize(_constant_model(np.zeros(V), causal=True))
  ids = jax.random.randint(jax.random.key(0), (2, 7), 0, V)
  full = model(model.embed_ids(ids), None)
  changed = model(model.embed_ids(ids.at[:, -1].set((ids[:, -1] + 1) % V)), None)
  np.testing.assert_array_equal(full[:, :-1], changed[:, :-1])
  graphdef, params = nnx.split(model)
  decode = jax.jit(lambda params, ids, cache, i: nnx.merge(graphdef, params).decode(
      nnx.merge(graphdef, params).embed_ids(ids), cache, i))
  cache, stepwise = model.empty_cache(2, 7), []
  for i in range(7):
    logits, cache = decode(params, ids[:, i:i + 1], cache, i)
    stepwise.append(logits)
  np.testing.assert_allclose(jnp.concatenate(stepwise, 1), full, atol=2e-5, rtol=1e-5)


def test_ar_loss_is_the_mean_next_token_log_loss():
  model = randomize(_constant_model(np.zeros(V), causal=True))
  x0 = jax.random.randint(jax.random.key(3), (3, 9), 0, M)
  loss = nnx.jit(autoregressive.objective(_config(), V, train=False))(
      model, {"tokens": x0}, jax.random.key(0), None)[0]
  logits = np.asarray(nnx.jit(lambda m, x: m(m.embed_ids(x), None))(model, x0[:, :-1]),
                      np.float64)
  logits[..., M] = -1e6
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                           keepdims=True)) \
      - logits.max(-1, keepdims=True)
  nll = -np.take_along_axis(logp, np.asarray(x0[:, 1:])[..., None], -1).mean()
  np.testing.assert_allclose(loss, nll, rtol=1e-5)


@pytest.mark.slow
def test_ar_sampler_equals_rerunning_the_prefix_with_the_same_draws():
  model = randomize(_constant_model(np.zeros(V), causal=True), scale=0.5)
  graphdef, params = nnx.split(model)
  params = nnx.to_pure_dict(params)
  rng, length, bos = jax.random.key(5), 6, 2
  cached = autoregressive.tokens(graphdef, params, rng, batch_size=3, seq_len=length,
                                 bos_id=bos, suppressed=M)
  # The reference's way: the whole prefix through the network for every token (in a
  # buffer of length L: later positions do not reach earlier ones, see the test above).
  forward = jax.jit(lambda params, ids: nnx.merge(graphdef, params)(
      nnx.merge(graphdef, params).embed_ids(ids), None))
  tokens = jnp.zeros((3, length), jnp.int32).at[:, 0].set(bos)
  for position, key in enumerate(jax.random.split(rng, length - 1)):
    logits = forward(params, tokens)[:, position].at[:, M].set(-1e6)
    drawn = sampling.categorical(key, jax.nn.softmax(logits))
    tokens = tokens.at[:, position + 1].set(drawn)
  np.testing.assert_array_equal(cached, tokens)


def test_ar_sampler_follows_a_known_model():
  """Tokens after BOS drawn from the model's p over the real ids; the mask id, the most
  probable output here, is never drawn."""
  p = _data_distribution()
  model = _constant_model(np.append(np.log(p), 5.0), causal=True)
  graphdef, params = nnx.split(model)
  tokens = autoregressive.tokens(graphdef, nnx.to_pure_dict(params), jax.random.key(0),
                                 batch_size=512, seq_len=5, bos_id=0, suppressed=M)
  assert np.all(np.asarray(tokens[:, 0]) == 0)
  frequency = np.bincount(np.asarray(tokens[:, 1:]).ravel(), minlength=V) / tokens[:, 1:].size
  np.testing.assert_allclose(frequency[:M], p, atol=0.025)


# --- family rules -----------------------------------------------------------------------


@pytest.mark.parametrize("kind, field, value, message", [
    ("ar", "sampler", "flowmap", "sample.sampler=flowmap: W holds a ar model, whose samplers"),
    ("mdlm", "gamma", 0.5, "sample.gamma=0.5 is the churn"),
    ("flm", "temperature", 0.7, "sample.temperature=0.7 and sample.top_p=1.0 apply to the "
                                "discrete"),
    ("fmlm", "sampler", "ancestral", "whose samplers are flowmap"),
])
def test_a_sampler_option_the_family_does_not_take_is_refused(kind, field, value, message):
  sample = train_config().sample
  sample[field] = value
  with pytest.raises(UsageError, match=message):
    registry.check_sample_options(kind, sample, "W")


@pytest.mark.parametrize("field, value, message", [
    ("family", "udlm", "family='udlm' is not one of flm, mdlm, sedd, d3pm, duo, ar"),
    ("sample.sampler", "ddpm", "sample.sampler='ddpm' is not one of auto, euler"),
    ("sample.top_p", 0.0, "sample.top_p=0.0: the nucleus mass must be in"),
    ("sample.temperature", 0.0, "sample.temperature=0.0 must be positive"),
])
def test_baseline_fields_are_checked(field, value, message):
  config = train_config()
  section, _, name = field.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(UsageError, match=message):
    validate(config, "train", lambda: 1)


@pytest.mark.parametrize("family, objective, mode, message", [
    ("mdlm", "semigroup", "distill", "family=mdlm: distill.objective=semigroup distils a "
     "teacher of family flm; set family=flm .there is no mdlm distillation"),
    ("mdlm", "semigroup", "pipeline", "family=mdlm: --mode=pipeline trains and distills an FLM"),
    ("mdlm", "semigroup", "compare", "family=mdlm: --mode=compare trains every family"),
    ("mdlm", "semigroup", "train", None),
    ("duo", "semigroup", "distill", "family=duo: distill.objective=semigroup distils a teacher "
     "of family flm; set family=flm, or distill.objective to one of dcd.$"),
    ("duo", "dcd", "distill", None),
    ("duo", "dcd", "pipeline", "family=duo: --mode=pipeline trains and distills an FLM"),
    ("flm", "dcd", "distill", "family=flm: distill.objective=dcd distils a teacher of family "
     "duo; set family=duo, or distill.objective to one of semigroup, eulerian, lagrangian.$"),
    # pipeline and compare distil an FLM: only the objective is to change
    ("flm", "dcd", "pipeline", "family duo; set distill.objective to one of semigroup, "
     "eulerian, lagrangian.$"),
    ("flm", "dcd", "compare", "family duo; set distill.objective to one of semigroup, "
     "eulerian, lagrangian.$"),
])
def test_distillation_objectives_need_their_teachers_family(family, objective, mode, message):
  config = train_config()
  config.family, config.distill.objective = family, objective
  config.teacher_checkpoint = "somewhere"
  if message is None:
    validate(config, mode, lambda: 1)
    return
  with pytest.raises(UsageError, match=message):
    validate(config, mode, lambda: 1)


def test_ar_takes_auto_attention_where_the_run_asks_for_a_kernel_it_cannot_run():
  """--mode=compare picks the attention for the FLM; its AR baseline (causal, L - 1 tokens,
  no cap) then gets auto for splash and flash, and keeps plain or fused. With no cap,
  fused is refused for the FLM but not for family=ar."""
  for impl, expected in [("splash", "auto"), ("flash", "auto"), ("plain", "plain"),
                         ("fused", "fused"), ("auto", "auto")]:
    config = train_config()
    config.model.attention = impl
    ar = registry.with_family(config, registry.OBJECTIVES["ar"])
    assert (ar.model.attention, ar.model.causal, ar.model.attn_softcap) == (expected, True, 0)
    flm = registry.with_family(config, registry.OBJECTIVES["flm"])
    assert flm.model.attention == impl
  config = train_config()
  config.model.attention = "fused"
  with pytest.raises(UsageError, match="fused has no soft cap"):
    validate(config, "train", lambda: 8)
  config.family = "ar"
  validate(config, "train", lambda: 8)


@pytest.mark.parametrize("name", [name for name in registry.OBJECTIVES if name != "ar"])
def test_every_objective_draws_its_times_as_its_part_of_the_batch(name, monkeypatch):
  """The training step tells the objective which part of an accumulated batch it has
  (part=(index, parts)); every objective that draws times (all but AR's) hands it to the
  stratified draw, so that the parts' times are stratified over the whole batch."""
  objective = registry.OBJECTIVES[name]
  config = train_config()
  config.model.mask_id = V - 1
  student = registry.with_family(config, objective)
  model = dit.builder(student.model, V)()
  frozen = {"step": jnp.int32(0)}
  teacher_graphdef = None
  if objective.teacher == "flm":
    teacher_graphdef, frozen = nnx.split(dit.builder(
        registry.with_family(config, registry.OBJECTIVES["flm"]).model, V)())
    frozen = nnx.to_pure_dict(frozen)
  elif objective.self_teacher:
    teacher_graphdef = nnx.graphdef(model)
    frozen = dict(frozen, params=nnx.to_pure_dict(nnx.state(model)))
  loss_fn = objective.build(student, V, teacher_graphdef)
  parts, draw = [], flow.stratified_uniform

  def recorded(rng, n, part=(0, 1)):
    parts.append(part)
    return draw(rng, n, part)
  monkeypatch.setattr(flow, "stratified_uniform", recorded)
  batch = {"tokens": jnp.zeros((8, 16), jnp.int32)}
  jax.eval_shape(lambda: loss_fn(model, batch, jax.random.key(0), frozen, part=(1, 4)))
  assert parts and all(part == (1, 4) for part in parts), parts


def test_a_tokenizer_without_a_mask_id_is_refused_for_absorbing_families():
  class NoMask:
    kind, source, mask_id = "bert", "vocab.txt", None
  with pytest.raises(UsageError, match="family=mdlm needs a mask id, and this bert"):
    registry.with_family(train_config(), registry.OBJECTIVES["mdlm"], NoMask())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mdlm", "sedd", "d3pm", "duo", "ar"])
def test_each_baseline_trains_and_evaluates(tmp_path, prepared, family):
  config = train_config(steps=4, eval_every=4, sample_every=4)
  config.family = family
  config.data.dir = str(prepared.path.parent)
  train.train(config, str(tmp_path / "run"))
  record, graphdef, params, tokenizer = evaluate.load(config, str(tmp_path / "run"))
  assert record["kind"] == family and record["config"]["model"]["mask_id"] == (
      -1 if family == "duo" else tokenizer.mask_id)  # Duo has no mask
  assert tokenizer.mask_id == tokenizer.pad_id
  config.checkpoint = str(tmp_path / "run")
  config.eval.update(evaluator="none", steps="1,4", num_samples=4, reference_samples=4,
                     valid_batches=2)
  rows = evaluate.eval_mode(config, str(tmp_path / "eval"))
  model_rows = [r for r in rows if r["kind"] == family]
  calls = [r["network_calls"] for r in model_rows]
  if family == "ar":
    assert calls == [config.data.seq_len - 1]  # one row: its sample ignores the step count
  elif family in ("sedd", "d3pm", "duo"):
    assert calls == [2, 5]
  else:  # the cache: 1 + the steps that changed a token
    assert 1 < calls[0] <= 2 and 1 < calls[1] <= 5
  assert all(r["valid_ppl"] == pytest.approx(np.exp(r["valid_nll"])) for r in model_rows)
  # a discrete NLL, and so any bound on it, is positive short of a perfect model
  assert all(r["valid_nll"] > 0 for r in model_rows)
  if family == "ar":  # exact: the mean next-token NLL of the first 2 validation batches
    model = nnx.merge(graphdef, params)
    nll = []
    for batch, _ in zip(pipeline.eval_batches(prepared, "valid", config.batch_size), range(2)):
      x = jnp.asarray(batch["tokens"])
      log_p = jax.nn.log_softmax(model(model.embed_ids(x[:, :-1]), None).at[
          ..., tokenizer.mask_id].set(-1e6))
      nll.append(-np.mean(np.take_along_axis(np.asarray(log_p), np.asarray(x[:, 1:, None]), -1)))
    assert model_rows[0]["valid_nll"] == pytest.approx(np.mean(nll), rel=1e-5)
  assert all(len(r["samples"]) == 4 for r in model_rows)
  # A checkpoint of this family is neither resumed as another family nor distilled.
  config.family = "sedd" if family == "mdlm" else "mdlm"
  with pytest.raises(UsageError, match=f"kind '{family}' != '{config.family}'"):
    train.train(config, str(tmp_path / "run"))
  config.family, config.teacher_checkpoint = "flm", str(tmp_path / "run")
  with pytest.raises(UsageError, match=f"teacher_checkpoint=.*kind '{family}' != 'flm'"):
    train.distill(config, str(tmp_path / "student"))
  with pytest.raises(UsageError, match=f"holds a {family} model; conditional generation takes"):
    generate.Generator(config.checkpoint, config)
  config.eval.prompted = True
  with pytest.raises(UsageError, match=f"eval.prompted: .* holds a {family} model"):
    evaluate.evaluate(config, str(tmp_path / "eval"), {"X": (config.checkpoint, [1])})


@pytest.mark.slow
def test_compare_distils_duos_dcd_student_from_its_duo_run(tmp_path):
  """--mode=compare's stages: after the baselines, Duo's DCD student from WORKDIR/duo,
  evaluated as DUO+DCD, keeping a finished evaluation when run again. (In a subprocess:
  flmjax.main and flmjax.convert, which other tests import, both define the --config flag.)"""
  stages = subprocess.run([sys.executable, "-c", COMPARE_STAGES, str(tmp_path)],
                          cwd=pathlib.Path(__file__).parents[1], capture_output=True,
                          text=True, check=True).stdout.splitlines()[-1]
  w = str(tmp_path)
  assert json.loads(stages) == [["train", f, f"{w}/{f}"] for f in ("mdlm", "sedd", "duo", "ar")] + [
      ["distill", "duo", "dcd", f"{w}/duo", f"{w}/duo_dcd"],
      ["eval", {"FLM": "T", "FMLM": "S", "MDLM": f"{w}/mdlm", "SEDD": f"{w}/sedd",
                "DUO": f"{w}/duo", "AR": f"{w}/ar", "DUO+DCD": f"{w}/duo_dcd"}, True],
      ["config", "flm", "semigroup"]]  # the caller's config untouched


COMPARE_STAGES = """
import json, sys
sys.path.insert(0, "tests")
from conftest import train_config
from flmjax import evaluate, main, train
stages = []
main._teacher_and_student = lambda config, workdir: ("T", "S")
train.train = lambda config, workdir: stages.append(["train", config.family, workdir])
train.distill = lambda config, workdir: stages.append(
    ["distill", config.family, config.distill.objective, config.teacher_checkpoint, workdir])
evaluate.evaluate = lambda config, workdir, models, resume: stages.append(
    ["eval", {label: path for label, (path, _) in models.items()}, resume])
config = train_config()
main.run_compare(config, sys.argv[1])
print(json.dumps(stages + [["config", config.family, config.distill.objective]]))
"""
