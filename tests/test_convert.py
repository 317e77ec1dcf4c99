"""Reference-layout weights: import/export round trips, and logits against a numpy forward
pass of the reference's DiT (its models/dit.py; names in docs/interop.md), written here
without flmjax code."""

import json
import math
import pathlib
import subprocess
import sys

from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from conftest import small_config
from flmjax import convert, evaluate, registry
from flmjax.errors import UsageError
from flmjax.models import dit

ROOT = pathlib.Path(__file__).resolve().parents[1]


def reference_tensors(vocab, width, depth, heads, cond, two_time, seed=0, scale=0.3,
                      causal=False, loss_weight=False):
  """Random weights with the reference's names and PyTorch shapes ((out, in) Linears);
  `causal`: the AR backbone, without time embedder and adaLN (docs/interop.md, "Baselines");
  `loss_weight`: with the learnable loss weighting of the reference's distillation runs."""
  rng = np.random.default_rng(seed)
  shapes = {"vocab_embed.embedding": (vocab, width)}
  embedders = ("sigma_map", "sigma_map_prime")[:0 if causal else 1 + two_time]
  for embedder in embedders + ("learnable_loss_weighting.s_embed",) * loss_weight:
    shapes.update({f"{embedder}.mlp.0.weight": (cond, 256), f"{embedder}.mlp.0.bias": (cond,),
                   f"{embedder}.mlp.2.weight": (cond, cond), f"{embedder}.mlp.2.bias": (cond,)})
  if loss_weight:  # Linear(cond, 128), GELU, Linear(128, 1)
    shapes.update({"learnable_loss_weighting.mlp.0.weight": (128, cond),
                   "learnable_loss_weighting.mlp.0.bias": (128,),
                   "learnable_loss_weighting.mlp.2.weight": (1, 128),
                   "learnable_loss_weighting.mlp.2.bias": (1,)})
  for i in range(depth):
    b = f"blocks.{i}."
    shapes.update({b + "norm1.weight": (width,), b + "attn_qkv.weight": (3 * width, width),
                   b + "attn_out.weight": (width, width), b + "norm2.weight": (width,),
                   b + "mlp.0.weight": (4 * width, width), b + "mlp.0.bias": (4 * width,),
                   b + "mlp.2.weight": (width, 4 * width), b + "mlp.2.bias": (width,),
                   b + "adaLN_modulation.weight": (6 * width, cond),
                   b + "adaLN_modulation.bias": (6 * width,)})
  shapes.update({"output_layer.norm_final.weight": (width,),
                 "output_layer.adaLN_modulation.weight": (2 * width, cond),
                 "output_layer.adaLN_modulation.bias": (2 * width,),
                 "output_layer.linear.weight": (vocab, width),
                 "output_layer.linear.bias": (vocab,)})
  if causal:
    shapes = {k: s for k, s in shapes.items() if "adaLN" not in k}
  tensors = {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
  head_dim = width // heads
  tensors["rotary_emb.inv_freq"] = (
      1.0 / 10000 ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)
  return tensors


def _linear(w, h, name):
  return h @ w[name + ".weight"].T + w.get(name + ".bias", 0.0)


def _silu(h):
  return h / (1 + np.exp(-h))


def time_embedding(w, prefix, tau):
  """The reference's TimestepEmbedder: [cos, sin] of 128 frequencies, Linear, SiLU, Linear."""
  half = 128
  freqs = np.exp(-math.log(10000) * np.arange(half) / half)
  args = tau[:, None] * freqs[None]
  features = np.concatenate([np.cos(args), np.sin(args)], axis=-1)
  return _linear(w, _silu(_linear(w, features, prefix + ".mlp.0")), prefix + ".mlp.2")


def numpy_forward(w, x, tau_s, tau_t, heads, output_cap=30.0, softcap=50.0):
  """The reference DiT in float64 numpy: x [B, L, V] noisy one-hot -> logits [B, L, V].
  Weights without `sigma_map` are the causal AR backbone (docs/baselines.md):
  causal attention, no soft cap, no adaLN, no time input; output_cap=0: raw logits."""
  causal = "sigma_map.mlp.0.weight" not in w
  w = {k: v.astype(np.float64) for k, v in w.items()}

  def linear(h, name):
    return _linear(w, h, name)

  silu = _silu

  def layer_norm(h, weight):
    mean = h.mean(-1, keepdims=True)
    var = ((h - mean) ** 2).mean(-1, keepdims=True)
    return (h - mean) / np.sqrt(var + 1e-5) * weight

  def modulate(h, shift, scale):
    return h * (1 + scale[:, None]) + shift[:, None]

  def rotate(q):  # [B, L, H, Dh], rotate-half
    head_dim = q.shape[-1]
    inv_freq = 1.0 / 10000 ** (np.arange(0, head_dim, 2) / head_dim)
    angles = np.arange(q.shape[1])[:, None] * inv_freq[None]
    angles = np.concatenate([angles, angles], -1)[None, :, None, :]
    q1, q2 = q[..., :head_dim // 2], q[..., head_dim // 2:]
    return q * np.cos(angles) + np.concatenate([-q2, q1], -1) * np.sin(angles)

  h = x @ w["vocab_embed.embedding"]
  batch, length, width = h.shape
  if not causal:
    c = time_embedding(w, "sigma_map", tau_s)
    if "sigma_map_prime.mlp.0.weight" in w:
      c = c + time_embedding(w, "sigma_map_prime", tau_t)
    c = silu(c)
  plain = [np.zeros((batch, width)), np.zeros((batch, width)), np.ones((batch, width))] * 2
  depth = len({k.split(".")[1] for k in w if k.startswith("blocks.")})
  for i in range(depth):
    b = f"blocks.{i}."
    chunks = plain if causal else np.split(linear(c, b + "adaLN_modulation"), 6, axis=-1)
    a = modulate(layer_norm(h, w[b + "norm1.weight"]), chunks[0], chunks[1])
    qkv = linear(a, b + "attn_qkv").reshape(batch, length, 3, heads, width // heads)
    q, k, v = rotate(qkv[:, :, 0]), rotate(qkv[:, :, 1]), qkv[:, :, 2]
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(width // heads)
    if causal:
      scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
    elif softcap:
      scores = softcap * np.tanh(scores / softcap)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attn = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, width)
    h = h + chunks[2][:, None] * linear(attn, b + "attn_out")
    m = linear(modulate(layer_norm(h, w[b + "norm2.weight"]), chunks[3], chunks[4]),
               b + "mlp.0")
    m = 0.5 * m * (1 + np.tanh(math.sqrt(2 / math.pi) * (m + 0.044715 * m ** 3)))
    h = h + chunks[5][:, None] * linear(m, b + "mlp.2")
  shift, scale = plain[:2] if causal else np.split(
      linear(c, "output_layer.adaLN_modulation"), 2, axis=-1)
  logits = linear(modulate(layer_norm(h, w["output_layer.norm_final.weight"]), shift, scale),
                  "output_layer.linear")
  return output_cap * np.tanh(logits / output_cap) if output_cap else logits


def _model_config(**fields):
  model = small_config().model
  model.update(dtype="float32", **fields)
  return model


@pytest.mark.slow
@pytest.mark.parametrize("two_time", [False, True])
def test_imported_weights_give_the_reference_logits(two_time):
  vocab, width, depth, heads, length = 97, 64, 2, 2, 16
  tensors = reference_tensors(vocab, width, depth, heads, 32, two_time)
  model_cfg = _model_config()
  found, fields = convert.infer_architecture(tensors, {}, model_cfg)
  assert found == vocab
  assert fields == {"width": width, "depth": depth, "heads": heads, "cond_width": 32,
                    "mlp_ratio": 4, "two_time": two_time, "learned_loss_weight": False,
                    "condition_embedding": False, "causal": False}
  model_cfg.update(fields)
  convert.check_tensors(tensors, vocab, model_cfg)
  model = dit.builder(model_cfg, vocab)()
  nnx.update(model, nnx.State(convert.from_reference(tensors, model_cfg)))

  rng = np.random.default_rng(1)
  tokens = rng.integers(0, vocab, (2, length))
  t = np.array([0.3, 0.8])
  x = ((1 - t[:, None, None]) * rng.standard_normal((2, length, vocab))
       + t[:, None, None] * np.eye(vocab)[tokens]).astype(np.float32)
  tau_s, tau_t = np.array([0.2, 0.7], np.float32), np.array([0.5, 1.0], np.float32)
  expected = numpy_forward(tensors, x.astype(np.float64), tau_s.astype(np.float64),
                           tau_t.astype(np.float64), heads)
  got = model(model.embed(jnp.asarray(x)), jnp.asarray(tau_s),
              jnp.asarray(tau_t) if two_time else None)
  assert np.abs(expected).max() > 5  # the weights drive the logits well away from 0
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mdlm", "sedd", "ar"])
def test_imported_baseline_weights_give_the_reference_logits(family):
  """The baselines' DiT (docs/baselines.md, docs/interop.md): token ids in, no output cap, the
  noise level sigma as time input (0 for MDLM), and for AR the causal backbone."""
  vocab, width, depth, heads, length = 41, 32, 2, 2, 8
  causal = family == "ar"
  tensors = reference_tensors(vocab, width, depth, heads, 16, False, causal=causal)
  model_cfg = _model_config(cond_width=16)
  found, fields = convert.infer_architecture(tensors, {}, model_cfg)
  assert convert.family_of(fields, "auto" if causal else family) == family
  model_cfg.update(fields, **registry.FAMILIES[family].model)
  convert.check_tensors(tensors, vocab, model_cfg)
  model = dit.builder(model_cfg, vocab)()
  nnx.update(model, nnx.State(convert.from_reference(tensors, model_cfg)))
  ids = np.random.default_rng(2).integers(0, vocab, (2, length))
  sigma = np.array([0.0, 0.0]) if family == "mdlm" else np.array([0.4, 3.1])
  expected = numpy_forward(tensors, np.eye(vocab)[ids], sigma, None, heads, output_cap=0.0,
                           softcap=0.0 if causal else 50.0)
  got = model(model.embed_ids(jnp.asarray(ids)), None if causal else jnp.asarray(sigma,
                                                                              jnp.float32))
  assert np.abs(expected).max() > 1  # the weights drive the logits away from 0
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)


def test_export_refuses_parameters_the_reference_has_no_place_for():
  with pytest.raises(UsageError, match="model.condition_embedding=True has no counterpart"):
    convert.to_reference({}, _model_config(condition_embedding=True))


def test_a_student_with_the_references_loss_weighting_imports_and_exports_it():
  """The reference's distillation scripts train with algo.learnable_loss_weighting=True:
  its students carry the module's tensors, which become flmjax's learned loss weighting,
  w(s) = Linear(GELU(Linear(TimestepEmbedder(s)))) (exact GELU), and go back unchanged."""
  vocab, cond = 97, 32
  tensors = reference_tensors(vocab, 64, 1, 2, cond, two_time=True, loss_weight=True)
  model_cfg = _model_config()
  _, fields = convert.infer_architecture(tensors, {}, model_cfg)
  assert fields["learned_loss_weight"] and fields["two_time"]
  model_cfg.update(fields)
  convert.check_tensors(tensors, vocab, model_cfg)
  params = convert.from_reference(tensors, model_cfg)
  model = dit.builder(model_cfg, vocab)()
  nnx.update(model, nnx.State(params))
  w = {k: v.astype(np.float64) for k, v in tensors.items()}
  tau = np.array([0.0, 0.3, 0.9])
  hidden = _linear(w, time_embedding(w, "learnable_loss_weighting.s_embed", tau),
                   "learnable_loss_weighting.mlp.0")
  gelu = 0.5 * hidden * (1 + np.vectorize(math.erf)(hidden / math.sqrt(2)))
  expected = _linear(w, gelu, "learnable_loss_weighting.mlp.2")[:, 0]
  np.testing.assert_allclose(np.asarray(model.loss_weighting(jnp.asarray(tau, jnp.float32))),
                             expected, atol=1e-4, rtol=1e-4)
  back = convert.to_reference(params, model_cfg)
  assert set(back) == set(tensors)
  assert all(np.array_equal(back[k], tensors[k]) for k in tensors if "loss_weighting" in k)


def test_random_weights_of_a_sentencepiece_config_take_its_vocab_size(tmp_path):
  """No tokenizer is trained for them: V is tokenizer.vocab_size, as a run would have it."""
  config = small_config()
  config.model.update(width=32, depth=1, heads=2, cond_width=16)
  convert.random_weights(str(tmp_path / "random"), config)
  meta = json.loads((tmp_path / "random" / "config.json").read_text())
  assert meta["vocab_size"] == 512


def test_import_family_must_fit_the_tensors():
  one_time = {"causal": False, "two_time": False}
  assert convert.family_of(one_time, "auto") == "flm"
  assert convert.family_of(one_time, "sedd") == "sedd"
  assert convert.family_of(one_time, "duo") == "duo"
  assert convert.family_of({"causal": True, "two_time": False}, "auto") == "ar"
  with pytest.raises(UsageError, match="--family=ar, but the weights are a one-time"):
    convert.family_of(one_time, "ar")
  with pytest.raises(UsageError, match="--family=mdlm, but the weights are a causal AR"):
    convert.family_of({"causal": True, "two_time": False}, "mdlm")


def _write_hf(directory, tensors, meta=None):
  directory.mkdir(parents=True, exist_ok=True)
  safetensors.numpy.save_file(tensors, str(directory / "model.safetensors"))
  if meta is not None:
    (directory / "config.json").write_text(json.dumps(meta))


def test_import_export_round_trip_is_bit_exact(tmp_path, prepared):
  config = small_config()
  config.tokenizer.path = prepared.tokenizer.source
  tensors = reference_tensors(prepared.tokenizer.vocab_size, 64, 2, 2, 32, two_time=True)
  _write_hf(tmp_path / "hf", tensors)
  record = convert.import_weights(str(tmp_path / "hf"), str(tmp_path / "imported"), config)
  assert record["kind"] == "fmlm" and record["config"]["model"]["width"] == 64
  convert.export_weights(str(tmp_path / "imported"), str(tmp_path / "exported"))
  back = safetensors.numpy.load_file(str(tmp_path / "exported" / "model.safetensors"))
  assert set(back) == set(tensors)
  for name, value in tensors.items():
    if name == "rotary_emb.inv_freq":  # a buffer, recomputed on export
      np.testing.assert_allclose(back[name], value, rtol=1e-6)
    else:
      assert back[name].dtype == np.float32 and np.array_equal(back[name], value), name
  meta = json.loads((tmp_path / "exported" / "config.json").read_text())
  assert meta["n_heads"] == 2 and meta["n_blocks"] == 2 and meta["two_time"]
  # readable as any file the user writes (safetensors alone writes 0600)
  assert ((tmp_path / "exported" / "model.safetensors").stat().st_mode ==
          (tmp_path / "exported" / "config.json").stat().st_mode)
  with pytest.raises(UsageError, match="already holds model.safetensors"):
    convert.export_weights(str(tmp_path / "imported"), str(tmp_path / "exported"))


def test_import_refuses_a_training_workdir(tmp_path):
  """Its checkpoints would be read before the imported weights: a new directory is asked
  for, before the input is read, and nothing is written there."""
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  with pytest.raises(UsageError, match="already holds checkpoints; choose a new directory"):
    convert.import_weights(str(tmp_path / "nothing"), str(tmp_path / "run"), small_config())
  assert [p.name for p in (tmp_path / "run").iterdir()] == ["checkpoints"]


def test_import_refuses_wrong_tensors_by_name(tmp_path):
  model_cfg = _model_config()
  tensors = reference_tensors(97, 64, 2, 2, 32, two_time=False)
  vocab, fields = convert.infer_architecture(tensors, {}, model_cfg)
  model_cfg.update(fields)
  for change, message in [
      (lambda t: t.pop("blocks.1.mlp.2.bias"), "missing tensor.*blocks.1.mlp.2.bias"),
      (lambda t: t.update({"blocks.0.attn.extra": np.zeros(3, np.float32)}),
       "unexpected tensor.*blocks.0.attn.extra"),
      (lambda t: t.update({"blocks.0.attn_out.weight": np.zeros((64, 32), np.float32)}),
       r"mis-shaped tensor.*blocks.0.attn_out.weight \(64, 32\) \(expected \(64, 64\)\)")]:
    broken = dict(tensors)
    change(broken)
    with pytest.raises(UsageError, match=message):
      convert.check_tensors(broken, vocab, model_cfg)
  with pytest.raises(UsageError, match="no 2-D 'vocab_embed.embedding'"):
    convert.infer_architecture({"x": np.zeros(1)}, {}, model_cfg)


def test_unreadable_or_impossible_inputs_are_refused_by_name(tmp_path):
  """A damaged file, a config.json that is not an object, a 1-D embedding, heads that do
  not split the width: one line each, naming what is wrong."""
  tensors = reference_tensors(97, 64, 1, 2, 32, two_time=False)
  (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 64)
  with pytest.raises(UsageError, match="bad.safetensors cannot be read as safetensors"):
    convert.read_reference(str(tmp_path / "bad.safetensors"))
  for text in ("{not json", "[1, 2]"):
    _write_hf(tmp_path / "hf", tensors)
    (tmp_path / "hf" / "config.json").write_text(text)
    with pytest.raises(UsageError, match="config.json is not a JSON object"):
      convert.read_reference(str(tmp_path / "hf"))
  with pytest.raises(UsageError, match="no 2-D 'vocab_embed.embedding'"):
    convert.infer_architecture(dict(tensors, **{"vocab_embed.embedding": np.zeros(97)}), {},
                               _model_config())
  del tensors["rotary_emb.inv_freq"]
  for heads in ("twelve", 0, 3):  # not a count; none; 64 is no multiple of 3
    with pytest.raises(UsageError, match=f"config.json's n_heads gives {heads!r} heads, "
                       "which do not split the width 64"):
      convert.infer_architecture(tensors, {"n_heads": heads}, _model_config())
  with pytest.raises(UsageError, match=r"rotary_emb.inv_freq \(0 entries\) gives 0 heads"):
    convert.infer_architecture(dict(tensors, **{"rotary_emb.inv_freq": np.zeros(0)}), {},
                               _model_config())
  config = small_config()
  config.tokenizer.kind = "gpt2"
  config.model.update(width=64, heads=3)
  with pytest.raises(UsageError, match="the model cannot be built: .*64"):
    convert.random_weights(str(tmp_path / "random"), config)
  assert not (tmp_path / "random").exists()


def test_half_precision_weights_import_with_their_rotary_buffer(tmp_path, prepared):
  """A checkpoint saved in float16 keeps the buffer to float16's precision."""
  config = small_config()
  config.tokenizer.path = prepared.tokenizer.source
  tensors = reference_tensors(prepared.tokenizer.vocab_size, 64, 1, 2, 32, two_time=False)
  _write_hf(tmp_path / "hf", {k: v.astype(np.float16) for k, v in tensors.items()})
  record = convert.import_weights(str(tmp_path / "hf"), str(tmp_path / "imported"), config)
  assert record["config"]["model"]["heads"] == 2


def test_an_export_imports_back_as_its_family_with_its_caps(tmp_path, prepared):
  """config.json of flmjax's export names the family and the soft caps; importing it with
  --family=auto takes them, not flm's defaults."""
  config = small_config()
  config.tokenizer.path = prepared.tokenizer.source
  config.model.update(attn_softcap=0.0, output_cap=0.0)
  tensors = reference_tensors(prepared.tokenizer.vocab_size, 64, 1, 2, 32, two_time=False)
  _write_hf(tmp_path / "hf", tensors)
  first = convert.import_weights(str(tmp_path / "hf"), str(tmp_path / "a"), config, True,
                                 "mdlm")
  convert.export_weights(str(tmp_path / "a"), str(tmp_path / "exported"))
  plain = small_config()  # flm's caps
  plain.tokenizer.path = prepared.tokenizer.source
  again = convert.import_weights(str(tmp_path / "exported"), str(tmp_path / "b"), plain)
  assert again["kind"] == "mdlm"
  for field in ("attn_softcap", "output_cap", "mask_id"):
    assert again["config"]["model"][field] == first["config"]["model"][field], field


def test_heads_come_from_config_json_without_the_rotary_buffer():
  tensors = reference_tensors(97, 64, 1, 4, 32, two_time=False)
  del tensors["rotary_emb.inv_freq"]
  assert convert.infer_architecture(tensors, {"n_heads": 4}, _model_config())[1]["heads"] == 4
  assert convert.infer_architecture(tensors, {}, _model_config(heads=8))[1]["heads"] == 8


def test_lightning_checkpoint_takes_the_backbone_and_its_ema():
  """In PyTorch's order (named_parameters, with the rotary buffer between the time embedder
  and the blocks in the state_dict), a compiled backbone's prefixes and a teacher's keys:
  every EMA tensor lands on its own name."""
  tensors = reference_tensors(97, 64, 1, 2, 32, two_time=True)
  inv = "rotary_emb.inv_freq"
  sigma = [k for k in tensors if k.startswith("sigma_map")]
  rest = [k for k in tensors if k not in sigma and k not in (inv, "vocab_embed.embedding")]
  order = ["vocab_embed.embedding", *sigma, inv, *rest]
  state = {"backbone._orig_mod." + k: tensors[k] for k in order}
  state.update({"noise.unused": np.zeros(2), "teacher.vocab_embed.embedding": np.zeros(3)})
  shadow = [tensors[k] + 1 for k in order if k != inv]
  ckpt = {"state_dict": state, "ema": {"shadow_params": shadow}}
  raw = convert.from_lightning(ckpt, ema=False)
  assert set(raw) == set(tensors) and all(np.array_equal(raw[k], tensors[k]) for k in tensors)
  ema = convert.from_lightning(ckpt, ema=True)
  assert set(ema) == set(tensors)
  assert all(np.array_equal(ema[k], tensors[k] + 1) for k in tensors if k != inv)
  assert np.array_equal(ema[inv], tensors[inv])
  with pytest.raises(UsageError, match="holds 5 tensors"):
    convert.from_lightning({"state_dict": state, "ema": {"shadow_params": shadow[:5]}})
  with pytest.raises(UsageError, match="--weights=raw"):
    convert.from_lightning({"state_dict": state})


@pytest.mark.slow
def test_gpt2_sized_import_samples_one_step(tmp_path, capsys, prepared):
  """An OWT-vocabulary FMLM (GPT-2 tokenizer, V 50258), small width, imported and sampled
  with --mode=sample's code path."""
  tensors = reference_tensors(50258, 64, 1, 2, 32, two_time=True, scale=0.02)
  _write_hf(tmp_path / "hf", tensors, {"n_heads": 2})
  config = small_config()
  config.tokenizer.kind = "gpt2"
  config.data.seq_len = 64
  record = convert.import_weights(str(tmp_path / "hf"), str(tmp_path / "imported"), config)
  assert record["vocab_size"] == 50258 and record["tokenizer"]["kind"] == "gpt2"
  config.checkpoint = str(tmp_path / "imported")
  config.sample.update(steps=1, num_samples=2, gamma=1.0)
  written = evaluate.sample(config, str(tmp_path / "out"))
  assert len(written["flowmap_1"]) == 2
  saved = json.loads((tmp_path / "out" / "samples" / "flowmap_1.json").read_text())
  assert saved["flowmap_1"]["samples"] == written["flowmap_1"]
  assert {k: saved["flowmap_1"][k] for k in ("checkpoint", "step", "seed")} == {
      "checkpoint": config.checkpoint, "step": None, "seed": config.seed}  # (an export)
  assert saved["flowmap_1"]["sample"]["gamma"] == 1.0
  capsys.readouterr()
  evaluate.sample(config, str(tmp_path / "out"))
  assert "flowmap_1.json, replacing the samples there" in capsys.readouterr().out
  config.sample.sampler = "euler"  # an FLM's: refused before its workdir is made
  with pytest.raises(UsageError, match="sample.sampler=euler: .* holds a fmlm model"):
    evaluate.sample(config, str(tmp_path / "refused"))
  assert not (tmp_path / "refused").exists()
  other = small_config()
  other.tokenizer.path = prepared.tokenizer.source
  with pytest.raises(UsageError, match="V = 50258 but the config's tokenizer"):
    convert.import_weights(str(tmp_path / "hf"), str(tmp_path / "again"), other)
  with pytest.raises(UsageError, match="needs the tokenizer it was trained with"):
    convert.import_weights(str(tmp_path / "hf"), str(tmp_path / "again"), small_config())
  assert not (tmp_path / "again").exists()  # refused imports create nothing


@pytest.mark.slow
def test_command_line_random_import_export(tmp_path):
  small = ["--config=configs/owt.py", "--config.model.width=64", "--config.model.depth=1",
           "--config.model.heads=2", "--config.model.cond_width=16"]

  def convert_cli(*args):
    return subprocess.run([sys.executable, "-m", "flmjax.convert", *args], cwd=ROOT,
                          capture_output=True, text=True, check=False)

  run = convert_cli("random", f"--to={tmp_path}/random", *small)
  assert run.returncode == 0, run.stderr
  run = convert_cli("import", f"--from={tmp_path}/random", f"--to={tmp_path}/imported",
                    "--config=configs/owt.py")
  assert run.returncode == 0, run.stderr
  record = json.loads((tmp_path / "imported" / "record.json").read_text())
  assert (record["kind"], record["vocab_size"]) == ("flm", 50258)
  assert {k: record["config"]["model"][k] for k in ("width", "depth", "heads")} == {
      "width": 64, "depth": 1, "heads": 2}
  run = convert_cli("export", f"--from={tmp_path}/imported", f"--to={tmp_path}/exported")
  assert run.returncode == 0, run.stderr
  first, back = (safetensors.numpy.load_file(f"{tmp_path}/{d}/model.safetensors")
                 for d in ("random", "exported"))
  assert all(np.array_equal(first[k], back[k]) for k in first)
  run = convert_cli("import", f"--from={tmp_path}/random", f"--to={tmp_path}/imported",
                    "--config=configs/owt.py")
  assert run.returncode == 2 and "already holds params, record.json" in run.stderr
  run = convert_cli("import", f"--to={tmp_path}/x", "--config=configs/owt.py")
  assert run.returncode == 2 and "import needs --from" in run.stderr
  # mistakes on the command line: one line, exit status 2 (flmjax.main's parser, whose
  # cases tests/test_main.py checks)
  for args, message in (
      (["random", f"--to={tmp_path}/y", *small, "--config.model.atn_softcap=0"],
       "'model.atn_softcap' (did you mean 'model.attn_softcap'?)"),
      ([*small], "give one command, import, export, random")):
    run = convert_cli(*args)
    assert run.returncode == 2 and run.stderr.startswith("flmjax.convert: error: "), run.stderr
    assert message in run.stderr and run.stderr.count("\n") == 1, run.stderr
