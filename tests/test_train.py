"""The training loop: recipe formulas, sharding invariance, resume, robustness."""

import ctypes
import functools
import json
import platform

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import train_config
from flmjax import checkpoint, sharding, train
from flmjax.errors import UsageError
from flmjax.models import dit

V, L, B = 64, 16, 8


def test_ema_decay_follows_its_warmup_formula():
  n = jnp.array([1, 2, 10, 100, 10**6])
  np.testing.assert_allclose(train.ema_decay(n, 0.9999),
                             [2 / 11, 3 / 12, 11 / 20, 101 / 110, 0.9999], rtol=1e-6)


def test_learning_rate_warms_up_linearly_then_stays_constant():
  lr = train.learning_rate(train_config(learning_rate=3e-4, warmup_steps=2500).train)
  np.testing.assert_allclose([lr(0), lr(1250), lr(2500), lr(2501), lr(10**6)],
                             [0, 1.5e-4, 3e-4, 3e-4, 3e-4], rtol=1e-6)


@pytest.mark.parametrize("norm, clipped", [(10.0, 1.0), (0.5, 0.5)])
def test_gradients_are_clipped_to_the_global_norm(norm, clipped):
  tx = train.make_optimizer(train_config(grad_clip=1.0).train)
  params = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
  grads = {"a": jnp.array([3.0, 0.0, 4.0]), "b": jnp.zeros((2, 2))}
  grads = jax.tree.map(lambda g: g * norm / 5.0, grads)
  _, state = tx.update(grads, tx.init(params), params)
  adam = state[1][0]  # Adam's first moment after one step is (1 - b1) * gradient
  np.testing.assert_allclose(optax.tree.norm(adam.mu), 0.1 * clipped, rtol=1e-6)


def _setup(config, devices):
  mesh = sharding.make_mesh(config.mesh, devices)

  def params_fn():
    return dit.from_config(config.model, V, nnx.Rngs(config.seed))

  run = train.plan(config, params_fn, mesh)
  return run, train.init_state(run, train.random_params(run, params_fn), config.seed)


def _step_fn(run, config, objective):
  return jax.jit(functools.partial(train.train_step, graphdef=run.graphdef, tx=run.tx,
                                   objective=objective, cfg=config.train))


def test_sharded_step_equals_the_single_device_step():
  config = train_config()
  config.model.dropout = 0.1
  tokens = jax.random.randint(jax.random.key(0), (B, L), 0, V)
  objective = train.denoising_objective(config, V)
  results = []
  for mesh_shape, devices in (((1, 1, 1), jax.devices()[:1]), ((2, 4, 1), jax.devices())):
    config.mesh.update(data=mesh_shape[0], fsdp=mesh_shape[1], tensor=mesh_shape[2])
    run, state = _setup(config, devices)
    batch = {"tokens": jax.device_put(tokens, sharding.batch_sharding(run.mesh))}
    step = _step_fn(run, config, objective)
    for _ in range(2):
      state, metrics = step(state, batch, None)
    results.append((state, metrics))
  (single, m1), (sharded, m8) = results
  embed = sharded["params"]["vocab_embed"]
  assert embed.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert len(embed.addressable_shards) == 8
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(sharded["params"]), jax.tree.leaves(single["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_equals_the_whole_batch():
  config = train_config()
  tokens = jax.random.randint(jax.random.key(0), (B, L), 0, V)

  def objective(model, batch, rng, frozen):  # deterministic, a mean over equal parts
    logits = model(model.vocab_embed[...][batch["tokens"]], jnp.full(batch["tokens"].shape[:1],
                                                                     0.5))
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch["tokens"][..., None],
                                         -1))
    return loss, {"loss": loss}

  states = []
  for accum in (1, 4):
    config.train.grad_accum = accum
    run, state = _setup(config, jax.devices()[:1])
    state, _ = _step_fn(run, config, objective)(state, {"tokens": tokens}, None)
    state, _ = _step_fn(run, config, objective)(state, {"tokens": tokens}, None)
    states.append(state)
  for a, b in zip(jax.tree.leaves(states[0]["params"]), jax.tree.leaves(states[1]["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_ema_of_the_train_state_follows_the_parameters():
  config = train_config(ema_decay=0.5)
  run, state = _setup(config, jax.devices()[:1])
  step = _step_fn(run, config, train.denoising_objective(config, V))
  tokens = jax.random.randint(jax.random.key(0), (B, L), 0, V)
  leaf = lambda s: np.asarray(s["output"]["bias"], np.float64)
  ema = leaf(state["params"])
  for n in range(1, 4):
    state, _ = step(state, {"tokens": tokens}, None)
    decay = min(0.5, (1 + n) / (10 + n))
    ema = decay * ema + (1 - decay) * leaf(state["params"])
    np.testing.assert_allclose(leaf(state["ema"]), ema, rtol=1e-5, atol=1e-9)


def _final_params(state):
  return [np.asarray(x) for x in jax.tree.leaves(state["params"])]


def test_resume_equals_an_uninterrupted_run(tmp_path):
  straight = train.train(train_config(steps=5), str(tmp_path / "a"))
  train.train(train_config(steps=3, checkpoint_every=3), str(tmp_path / "b"))
  resumed = train.train(train_config(steps=5), str(tmp_path / "b"))
  for a, b in zip(_final_params(straight), _final_params(resumed)):
    np.testing.assert_array_equal(a, b)
  data = json.loads((tmp_path / "b/checkpoints/5/data/process_0-of-1.json").read_text())
  assert data == {"next_index": 5}  # the Grain iterator position: one batch per step
  lines = [json.loads(l) for l in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines if "loss" in l] == [1, 2, 3, 4, 5]


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  config = train_config(steps=8, checkpoint_every=2)
  prepared = train.pipeline.prepare(config, str(tmp_path))
  good = train.denoising_objective(config, prepared.tokenizer.vocab_size)

  def objective(model, batch, rng, frozen):
    loss, metrics = good(model, batch, rng, frozen)
    # The first update has learning rate 0 (warmup), the second moves the bias: NaN at 3.
    poison = jnp.where(model.output.bias[...][0] != 0, jnp.nan, 1.0)
    return loss * poison, dict(metrics, loss=loss * poison)

  def params_fn():
    return dit.from_config(config.model, prepared.tokenizer.vocab_size, nnx.Rngs(0))

  with pytest.raises(FloatingPointError, match="NaN or inf at step 3.*last good checkpoint is "
                                                "step 2"):
    train.fit(config, str(tmp_path), prepared, params_fn=params_fn, objective=objective,
              samplers={})
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
  train.train(train_config(steps=2), str(tmp_path))
  config = train_config(steps=4)
  config.model.width = 48
  with pytest.raises(UsageError, match="model.width 32 != 48"):
    train.train(config, str(tmp_path))


def test_batch_not_divisible_by_the_data_parallel_size(tmp_path):
  config = train_config()
  config.batch_size = 12
  with pytest.raises(UsageError, match="batch_size=12 must be a multiple of the data-parallel "
                                       "size 8"):
    train.train(config, str(tmp_path))


def test_unwritable_workdir(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(UsageError, match="is not writable"):
    train.train(train_config(), str(tmp_path / "file" / "run"))


def test_mesh_sizes():
  config = train_config()
  config.mesh.update(data=-1, fsdp=2, tensor=1)
  assert sharding.mesh_shape(config.mesh, 8) == (4, 2, 1)
  config.mesh.update(data=3, fsdp=1, tensor=1)
  with pytest.raises(UsageError, match="needs 3 devices"):
    sharding.mesh_shape(config.mesh, 8)


def test_model_flops_per_token_counts_the_matmuls():
  config = train_config()
  config.model.update(width=768, depth=12, mlp_ratio=4)
  config.data.seq_len = 1024
  blocks = 12 * 12 * 768 * 768  # 92.1M block matmul weights, biases aside
  expected = 3 * (2 * (blocks + 768 * 50258) + 12 * 4 * 1024 * 768)
  assert train.model_flops_per_token(config, 50258) == expected
  assert checkpoint.git_hash() is None or len(checkpoint.git_hash()) == 40


def _resident_bytes() -> int:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="malloc_trim is glibc's")
def test_release_host_memory_returns_freed_heap_pages():
  """200 MB freed in small heap chunks, the top of the heap still in use (as after a
  compilation): glibc keeps the pages until release_host_memory."""
  libc = ctypes.CDLL("libc.so.6")
  libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
  libc.free.argtypes = [ctypes.c_void_p]
  size, count = 4096, 50_000
  chunks = [libc.malloc(size) for _ in range(count)]
  for chunk in chunks:
    ctypes.memset(chunk, 1, size)
  for chunk in chunks[:-1]:
    libc.free(chunk)
  before = _resident_bytes()
  train.release_host_memory()
  released = before - _resident_bytes()
  libc.free(chunks[-1])
  assert released > 0.5 * size * count
