"""The autoregressive baseline (docs/baselines.md): the causal DiT (no time input, no
adaLN, no attention soft cap) trained on next-token cross entropy.

The input is x0[:, :-1], the targets x0[:, 1:]; the mask id's logit is suppressed (-1e6)
as in the reference, so the model never emits it. The loss is the exact negative log
likelihood per predicted token, so validation perplexity is exp(validation loss).

Sampling starts from BOS and writes the other L - 1 tokens one at a time with a key/value
cache (DiT.decode), one compiled scan of L - 1 network calls on one position each; the
reference reruns the whole prefix for every token. Temperature and nucleus (top-p) apply
to each next-token distribution (sampling.nucleus). There is no stop at EOS: samples have
the fixed length L, as every family's do.
"""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections

from flmjax import flow, sampling, sharding
from flmjax.absorbing import SUPPRESSED


def objective(config: ml_collections.ConfigDict, vocab_size: int, teacher_graphdef=None, *,
              train: bool = True):
  """Next-token cross entropy, mean over the predicted tokens."""
  del vocab_size, teacher_graphdef
  suppressed = config.model.mask_id

  def loss_fn(model, batch, rng, frozen, part=(0, 1)):
    del frozen, part  # no times
    x0 = batch["tokens"]
    logits = model(model.embed_ids(x0[:, :-1]), None, dropout_rng=rng if train else None)
    loss = flow.token_cross_entropy(logits.at[..., suppressed].set(SUPPRESSED),
                                    x0[:, 1:]).mean()
    return loss, {"loss": loss}
  return loss_fn


@functools.partial(jax.jit, static_argnames=(
    "graphdef", "batch_size", "seq_len", "bos_id", "suppressed", "temperature", "top_p",
    "mesh"))
def tokens(graphdef, params, rng, *, batch_size: int, seq_len: int, bos_id: int,
           suppressed: int, temperature: float = 1.0, top_p: float = 1.0,
           mesh=None) -> jax.Array:
  """Tokens [B, L] int32: BOS, then L - 1 tokens drawn one at a time over the cache."""
  model = nnx.merge(graphdef, params)

  def body(carry, inputs):
    token, cache = carry
    position, key = inputs
    logits, cache = model.decode(model.embed_ids(token[:, None]), cache, position)
    probs = jax.nn.softmax(logits[:, 0].at[:, suppressed].set(SUPPRESSED), axis=-1)
    token = sampling.categorical(key, sampling.nucleus(probs, temperature, top_p))
    return (token, cache), token

  first = jnp.full((batch_size,), bos_id, jnp.int32)
  steps = (jnp.arange(seq_len - 1), jax.random.split(rng, seq_len - 1))
  with sharding.tracing_under(mesh):
    _, drawn = jax.lax.scan(body, (first, model.empty_cache(batch_size, seq_len)), steps)
  result = jnp.concatenate([first[:, None], drawn.T], axis=1)
  if mesh is None:
    return result
  return jax.lax.with_sharding_constraint(result, sharding.replicated(mesh))


def sampler(steps: int, num_samples: int, seq_len: int, options: sampling.Options):
  """The sampler factory (see sampling.Options); `steps` is ignored: L - 1 calls."""
  del steps

  def sample(graphdef, params, rng):
    return tokens(graphdef, params, rng, batch_size=num_samples, seq_len=seq_len,
                  bos_id=options.bos_id, suppressed=options.mask_id,
                  temperature=options.temperature, top_p=options.top_p,
                  mesh=sampling.params_mesh(params)), seq_len - 1
  return sample
