"""The train state: recipe formulas, one update, its sharding invariance, and compiling."""

import ctypes
import functools
import math
import platform
import re

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import train_config
from flmjax import flow, objectives, sharding
from flmjax import state as train_state
from flmjax.errors import UsageError
from flmjax.models import dit

V, L, B = 64, 16, 8


def test_ema_decay_follows_its_warmup_formula():
  n = jnp.array([1, 2, 10, 100, 10**6])
  np.testing.assert_allclose(train_state.ema_decay(n, 0.9999),
                             [2 / 11, 3 / 12, 11 / 20, 101 / 110, 0.9999], rtol=1e-6)


def test_learning_rate_warms_up_linearly_then_stays_constant():
  lr = train_state.learning_rate(train_config(learning_rate=3e-4, warmup_steps=2500).train)
  np.testing.assert_allclose([lr(0), lr(1250), lr(2500), lr(2501), lr(10**6)],
                             [0, 1.5e-4, 3e-4, 3e-4, 3e-4], rtol=1e-6)


@pytest.mark.parametrize("max_norm, norm, scale",
                         [(1e-6, 1e-5, 1 / 11), (1e-6, 1e-6, 1 / 2), (1.0, 0.5, 1.0)])
def test_clipping_is_pytorchs_clip_grad_norm(max_norm, norm, scale):
  """g * min(1, c / (norm + 1e-6)) over the whole tree (the formula of PyTorch's
  clip_grad_norm_): with c = 1e-6 the 1e-6 makes the scale 1/11 at norm 1e-5 (not 1/10)
  and 1/2 at norm 1e-6 (not 1); well below c the gradients pass unchanged."""
  clip = train_state.clip_by_global_norm(max_norm)
  grads = {"a": jnp.array([0.6, 0.0]) * norm, "b": jnp.array([[0.8]]) * norm}
  clipped, _ = clip.update(grads, clip.init(grads))
  for name in grads:
    np.testing.assert_allclose(clipped[name], np.asarray(grads[name]) * scale, rtol=1e-6)


@pytest.mark.parametrize("norm", [10.0, 0.5])
def test_gradients_are_clipped_to_the_global_norm_before_adamw(norm):
  """Two AdamW steps (no weight decay) against numpy Adam on the gradients scaled to global
  norm at most 1: the second update depends on the first gradient's clipped size."""
  cfg = train_config(grad_clip=1.0, warmup_steps=0, learning_rate=0.1).train
  tx = train_state.make_optimizer(cfg)
  params = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
  first = {"a": jnp.array([3.0, 0.0, 4.0]) * norm / 5.0, "b": jnp.zeros((2, 2))}
  second = {"a": jnp.array([0.1, 0.2, -0.1]), "b": jnp.full((2, 2), 0.05)}
  opt_state = tx.init(params)
  for grads in (first, second):
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  m = v = 0.0
  expected = np.zeros(3)
  for n, g in enumerate((np.array([3.0, 0.0, 4.0]) * min(norm, 1.0) / 5.0,
                         np.array([0.1, 0.2, -0.1])), start=1):
    m = cfg.b1 * m + (1 - cfg.b1) * g
    v = cfg.b2 * v + (1 - cfg.b2) * g * g
    expected -= 0.1 * (m / (1 - cfg.b1**n)) / (np.sqrt(v / (1 - cfg.b2**n)) + cfg.eps)
  np.testing.assert_allclose(params["a"], expected, rtol=1e-5)


def _setup(config, devices):
  build = dit.builder(config.model, V, config.seed)
  layout = train_state.plan(config, build, sharding.make_mesh(config.mesh, devices))
  params = train_state.random_params(layout, build)
  return layout, train_state.init_state(layout, params, config.seed)


def _step_fn(layout, config, objective):
  return jax.jit(functools.partial(train_state.train_step, graphdef=layout.graphdef,
                                   tx=layout.tx, objective=objective, cfg=config.train))


@pytest.mark.slow
def test_sharded_step_equals_the_single_device_step():
  """The training loop's step (step_function: shardings, donation, the mesh's tracing)
  with gradient accumulation, on 8 devices as data x fsdp, equals it on one device."""
  config = train_config(grad_accum=2)
  config.model.dropout = 0.1
  tokens = jax.random.randint(jax.random.key(0), (2 * B, L), 0, V)
  objective = objectives.denoising(config, V)
  results = []
  for mesh_shape, devices in (((1, 1, 1), jax.devices()[:1]), ((2, 4, 1), jax.devices())):
    config.mesh.update(data=mesh_shape[0], fsdp=mesh_shape[1], tensor=mesh_shape[2])
    layout, state = _setup(config, devices)
    batch = {"tokens": jax.device_put(tokens, sharding.batch_sharding(layout.mesh))}
    step = train_state.step_function(layout, objective, config.train)
    for _ in range(2):
      state, metrics = step(state, batch, None)
    results.append((state, metrics))
  (single, m1), (sharded, m8) = results
  embed = sharded["params"]["vocab_embed"]
  assert embed.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")  # V, D
  assert len(embed.addressable_shards) == 8
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(sharded["params"]), jax.tree.leaves(single["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_a_dimension_its_mesh_axis_does_not_divide_is_kept_whole_and_said(capsys):
  """Over tensor 2, GPT-2's V = 50258 divides (as the fused attention's 3 x 32 columns and
  the MLP's 128 do); V = 50257 does not: the embedding and output layer then hold the
  whole vocabulary on each device, as the line says."""
  config = train_config()
  config.mesh.update(data=4, fsdp=1, tensor=2)
  mesh = sharding.make_mesh(config.mesh)
  for vocab, said in ((50258, False), (50257, True)):
    _, params = train_state.param_layout(dit.builder(config.model, vocab), mesh)
    assert params["vocab_embed"].sharding.spec[0] == (None if said else "tensor")
    out = capsys.readouterr().out
    assert ("the parameters' dimensions vocab 50257 are kept whole on every device, their "
            "mesh axis does not divide them" in out) == said, out


@pytest.mark.slow
def test_tensor_parallel_attention_moves_the_qkv_weights_not_the_activations():
  """Over tensor 2 the fused q, k, v kernel's stored split (contiguous columns: q and half
  of k on one device) is not the heads' split that attention needs: the step gathers the
  kernel ([D, 3D]), never the q, k, v activations ([B / 4, L, 3D] per device)."""
  config = train_config()
  config.mesh.update(data=4, fsdp=1, tensor=2)
  config.batch_size = 16
  layout = train_state.plan(config, dit.builder(config.model, V), sharding.make_mesh(
      config.mesh))
  hlo = train_state.compile_step(layout, objectives.denoising(config, V), config).as_text()
  gathered = [math.prod(map(int, re.findall(r"\d+", shape)))
              for shape, op in re.findall(r"= \w+\[([\d,]*)\][^\n]* all-gather(?:-start)?\("
                                          r"[^\n]*op_name=\"([^\"]*)\"", hlo)
              if "attention" in op]
  width = config.model.width
  assert gathered and max(gathered) <= width * 3 * width < 16 // 4 * L * 3 * width, gathered


@pytest.mark.slow
def test_gradient_accumulation_equals_the_whole_batch():
  config = train_config()
  tokens = jax.random.randint(jax.random.key(0), (B, L), 0, V)

  def objective(model, batch, rng, frozen, part=(0, 1)):  # deterministic, a mean of parts
    logits = model(model.vocab_embed[...][batch["tokens"]], jnp.full(batch["tokens"].shape[:1],
                                                                     0.5))
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch["tokens"][..., None],
                                         -1))
    return loss, {"loss": loss}

  states = []
  for accum in (1, 4):
    config.train.grad_accum = accum
    layout, state = _setup(config, jax.devices()[:1])
    step = _step_fn(layout, config, objective)
    for _ in range(2):
      state, _ = step(state, {"tokens": tokens}, None)
    states.append(state)
  for a, b in zip(jax.tree.leaves(states[0]["params"]), jax.tree.leaves(states[1]["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_each_part_of_an_accumulated_batch_is_told_its_index():
  """With train.grad_accum = 4 the objective of each part gets (index, 4): its stratified
  times (flow.stratified_uniform) are then its share of one draw over the batch of 8. Each
  part reports the sum of 3^stratum over its times, a sum whose ternary digits count each
  stratum: over the parts, (3^0 + ... + 3^7) / 4 when every stratum is drawn once."""
  config = train_config()
  config.train.grad_accum = 4
  layout, state = _setup(config, jax.devices()[:1])

  def objective(model, batch, rng, frozen, part=(0, 1)):
    del frozen
    u = flow.stratified_uniform(rng, batch["tokens"].shape[0], part)
    loss = jnp.sum(model.output.bias[...]) * 0.0
    return loss, {"loss": loss, "strata": jnp.sum(3.0 ** jnp.floor(u * B))}
  step = _step_fn(layout, config, objective)
  _, metrics = step(state, {"tokens": jnp.zeros((B, L), jnp.int32)}, None)
  assert float(metrics["strata"]) == sum(3**k for k in range(B)) / 4


def test_each_step_draws_from_its_own_key():
  """The objective's key at step n is fold_in(the state's key, n): tau, the noise and the
  dropout are new draws at every step, and the same on a resumed run."""
  config = train_config()
  layout, state = _setup(config, jax.devices()[:1])

  def objective(model, batch, rng, frozen, part=(0, 1)):
    del batch, frozen, part
    loss = jnp.sum(model.output.bias[...]) * 0.0
    return loss, {"loss": loss, "draw": jax.random.uniform(rng)}
  step = _step_fn(layout, config, objective)
  tokens = jnp.zeros((B, L), jnp.int32)
  draws = []
  for n in range(2):
    expected = jax.random.uniform(jax.random.fold_in(state["rng"], n))
    state, metrics = step(state, {"tokens": tokens}, None)
    draws.append(float(metrics["draw"]))
    assert draws[-1] == float(expected)
  assert draws[0] != draws[1]


@pytest.mark.slow
def test_ema_of_the_train_state_follows_the_parameters():
  config = train_config(ema_decay=0.5)
  layout, state = _setup(config, jax.devices()[:1])
  step = _step_fn(layout, config, objectives.denoising(config, V))
  tokens = jax.random.randint(jax.random.key(0), (B, L), 0, V)
  leaf = lambda s: np.asarray(s["output"]["bias"], np.float64)
  ema = leaf(state["params"])
  for n in range(1, 4):
    state, _ = step(state, {"tokens": tokens}, None)
    decay = min(0.5, (1 + n) / (10 + n))
    ema = decay * ema + (1 - decay) * leaf(state["params"])
    np.testing.assert_allclose(leaf(state["ema"]), ema, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("causal", [False, True])
def test_model_flops_per_token_are_what_xla_counts_for_a_step(causal):
  """The model FLOPs of MFU against XLA's own count of the network's forward and backward
  pass (plain attention, float32): within 3%, the rest being norms, softmaxes and the
  time embedding. The causal model (AR) computes the whole score matrix too."""
  config = train_config()
  config.model.update(width=256, depth=2, heads=4, mlp_ratio=4)
  vocab, seq_len, batch = 4096, 256, 2
  model = dit.DiT(vocab, 256, 2, 4, 32, attention_impl="plain", causal=causal,
                  attn_softcap=0.0 if causal else 50.0, dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  h, tau = jnp.ones((batch, seq_len, 256)), None if causal else jnp.full((batch,), 0.5)
  step = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p)(h, tau).sum()))
  cost = step.lower(params).compile().cost_analysis()
  counted = (cost[0] if isinstance(cost, list) else cost)["flops"] / (batch * seq_len)
  assert counted == pytest.approx(
      dit.training_flops_per_token(config.model, vocab, seq_len), rel=0.03)


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
  train_state.release_host_memory()
  released = before - _resident_bytes()
  libc.free(chunks[-1])
  assert released > 0.5 * size * count


def test_compilation_cache_follows_the_config_unless_the_environment_sets_one(
    tmp_path, monkeypatch):
  before = (jax.config.jax_compilation_cache_dir,
            jax.config.jax_persistent_cache_min_compile_time_secs)
  try:
    train_state.use_compilation_cache(str(tmp_path / "a"))  # the test session's variable wins
    assert jax.config.jax_compilation_cache_dir == before[0]
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    train_state.use_compilation_cache("")  # off
    assert jax.config.jax_compilation_cache_dir == before[0]
    train_state.use_compilation_cache(str(tmp_path / "xla"))
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
    (tmp_path / "a_file").write_text("kept")
    with pytest.raises(UsageError, match="compilation_cache_dir=.*a_file is a file; give a "
                       "directory"):
      train_state.use_compilation_cache(str(tmp_path / "a_file"))
    assert (tmp_path / "a_file").read_text() == "kept"
  finally:
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
