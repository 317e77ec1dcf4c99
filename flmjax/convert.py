"""Weights in the reference PyTorch layout: import the released FLM/FMLM checkpoints, export
flmjax models for PyTorch users.

  python -m flmjax.convert import --from=SRC --to=DIR --config=configs/owt.py
  python -m flmjax.convert export --from=WORKDIR --to=DIR
  python -m flmjax.convert random --to=DIR --config=configs/owt.py --config.model.two_time=True

`import` reads SRC, a Hugging Face directory (config.json + model.safetensors, names
without a prefix), a .safetensors file, or a Lightning .ckpt (names under `backbone.`,
possibly with `._orig_mod`; the EMA weights `ema.shadow_params` by default, `--weights=raw`
for the trained ones; needs torch). It infers V, D, blocks, heads (from the rotary buffer,
else config.json's `n_heads`, else the config's), conditioning width, MLP ratio, one- or
two-time conditioning (an FMLM student has `sigma_map_prime`), the learned loss weighting
(`learnable_loss_weighting`, which the reference's students carry) and the causal AR
backbone (no `sigma_map`, no adaLN) from the tensors, and writes DIR/params (Orbax) +
DIR/record.json, an export that `--mode=sample`, `--mode=eval` and
`--config.teacher_checkpoint` accept. `--family` says what the tensors cannot: MDLM,
SEDD, D3PM and Duo checkpoints have FLM's tensors, so import them with --family=mdlm,
sedd, d3pm or duo (auto: the `kind` that config.json names when flmjax's export wrote it,
else flm, fmlm or ar from the tensors). The config supplies what the weights do not say:
the tokenizer (its V must match), L, the caps (unless config.json gives `attn_softcap` and
`output_cap`, as flmjax's export does) and the data settings. Weights saved in half
precision are read as float32.

`export` writes DIR/model.safetensors with the reference names and layouts (PyTorch
Linear weights are (out, in)) plus DIR/config.json describing the architecture. `random`
writes weights of the config's shape in that layout, N(0, 0.02^2) (norm scales 1), a
stand-in for a download when checking or timing the import and the samplers.
"""

import functools
import json
import os
import pathlib
import re

from absl import app
from absl import flags
from absl import logging
from etils import epath
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import safetensors.numpy

from flmjax import aot, checkpoint, cli, outputs, registry, sharding, state
from flmjax.data import tokenizers
from flmjax.errors import UsageError
from flmjax.models import dit

INV_FREQ = "rotary_emb.inv_freq"  # a buffer of the reference: checked, never stored
HEADS_KEYS = ("n_heads", "num_heads", "num_attention_heads", "heads")


def _linear(ref: str, ours: tuple, bias: bool = True) -> list[tuple[str, tuple, bool]]:
  """(reference name, flmjax path, transposed) of a Linear layer."""
  return [(f"{ref}.weight", (*ours, "kernel"), True)] + (
      [(f"{ref}.bias", (*ours, "bias"), False)] if bias else [])


def name_map(depth: int, two_time: bool, causal: bool = False,
             loss_weight: bool = False) -> list[tuple[str, tuple, bool]]:
  """Every parameter as (reference name, path in flmjax's params, transposed); the causal
  AR backbone has no time embedder and no adaLN. `loss_weight`: the learned loss weighting
  (its own time embedder, then an MLP), which the reference's distillation scripts turn on
  (algo.learnable_loss_weighting=True), so that its students carry it."""
  names = [("vocab_embed.embedding", ("vocab_embed",), False)]
  for embedder in ("sigma_map", "sigma_map_prime")[:0 if causal else 1 + two_time]:
    names += _linear(f"{embedder}.mlp.0", (embedder, "fc1"))
    names += _linear(f"{embedder}.mlp.2", (embedder, "fc2"))
  if loss_weight:
    ref, ours = "learnable_loss_weighting", ("loss_weighting",)
    names += _linear(f"{ref}.s_embed.mlp.0", (*ours, "embedder", "fc1"))
    names += _linear(f"{ref}.s_embed.mlp.2", (*ours, "embedder", "fc2"))
    names += _linear(f"{ref}.mlp.0", (*ours, "fc1"))
    names += _linear(f"{ref}.mlp.2", (*ours, "fc2"))
  for i in range(depth):
    ref, ours = f"blocks.{i}", ("blocks", i)
    names += [(f"{ref}.norm1.weight", (*ours, "norm1", "norm", "scale"), False)]
    names += _linear(f"{ref}.attn_qkv", (*ours, "attn_qkv"), bias=False)
    names += _linear(f"{ref}.attn_out", (*ours, "attn_out"), bias=False)
    names += [(f"{ref}.norm2.weight", (*ours, "norm2", "norm", "scale"), False)]
    names += _linear(f"{ref}.mlp.0", (*ours, "mlp_in"))
    names += _linear(f"{ref}.mlp.2", (*ours, "mlp_out"))
    names += [] if causal else _linear(f"{ref}.adaLN_modulation", (*ours, "adaln"))
  names += [("output_layer.norm_final.weight", ("norm_final", "norm", "scale"), False)]
  names += [] if causal else _linear("output_layer.adaLN_modulation", ("final_adaln",))
  names += _linear("output_layer.linear", ("output",))
  return names


def inv_freq(head_dim: int) -> np.ndarray:
  """The reference's rotary frequencies 1 / 10000^(2i / head_dim), float32."""
  return (1.0 / 10000 ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)).astype(
      np.float32)


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def to_reference(params: dict, model: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """flmjax params (a pure dict) -> {reference name: float32 array in PyTorch layout}."""
  if model.get("condition_embedding", False):
    raise UsageError("model.condition_embedding=True has no counterpart in the reference's "
                     "v2 layout; export a model trained without it.")
  tensors = {}
  for ref, path, transposed in name_map(model.depth, model.two_time,
                                       model.get("causal", False),
                                       model.get("learned_loss_weight", False)):
    value = np.asarray(_get(params, path), np.float32)
    tensors[ref] = np.ascontiguousarray(value.T if transposed else value)
  tensors[INV_FREQ] = inv_freq(model.width // model.heads)
  return tensors


def from_reference(tensors: dict[str, np.ndarray], model: ml_collections.ConfigDict) -> dict:
  """{reference name: array} -> flmjax params (a pure dict of float32 arrays)."""
  params = {}
  for ref, path, transposed in name_map(model.depth, model.two_time, model.causal,
                                       model.learned_loss_weight):
    value = np.asarray(tensors[ref], np.float32)
    _set(params, path, value.T if transposed else value)
  return params


def infer_architecture(tensors: dict[str, np.ndarray], meta: dict,
                       model: ml_collections.ConfigDict) -> tuple[int, dict]:
  """(V, model fields) from the tensors' names and shapes; heads from the rotary buffer,
  else from `meta` (config.json), else `model.heads`."""
  for key in ("vocab_embed.embedding", "blocks.0.mlp.0.weight"):
    if key not in tensors or np.ndim(tensors[key]) != 2:
      raise UsageError(f"the weights have no 2-D {key!r}; they are not a DiT in the "
                       "reference's layout (names as in its models/dit.py, without a "
                       "prefix).")
  causal = "sigma_map.mlp.2.weight" not in tensors
  vocab, width = tensors["vocab_embed.embedding"].shape
  blocks = {int(m.group(1)) for k in tensors if (m := re.match(r"blocks\.(\d+)\.", k))}
  if blocks != set(range(len(blocks))):
    raise UsageError(f"the weights' blocks are numbered {sorted(blocks)}; expected 0..N-1.")
  hidden = tensors["blocks.0.mlp.0.weight"].shape[0]
  if hidden % width:
    raise UsageError(f"blocks.0.mlp.0.weight has {hidden} rows, not a multiple of the width "
                     f"{width}.")
  if INV_FREQ in tensors:
    half = np.shape(tensors[INV_FREQ])[-1] if np.ndim(tensors[INV_FREQ]) else 0
    heads, source = width // (2 * half) if half else 0, f"{INV_FREQ} ({half} entries)"
  else:
    key = next((k for k in HEADS_KEYS if k in meta), None)
    heads, source = (meta[key], f"config.json's {key}") if key else (model.heads,
                                                                      "model.heads")
  if not (isinstance(heads, int) and heads > 0 and width % (2 * heads) == 0):
    raise UsageError(f"{source} gives {heads!r} heads, which do not split the width {width} "
                     "into heads of even size.")
  caps = {k: float(meta[k]) for k in ("attn_softcap", "output_cap")  # flmjax's own export
          if isinstance(meta.get(k), (int, float))}
  return vocab, {"width": width, "depth": len(blocks), "heads": heads, **caps,
                 "cond_width": model.cond_width if causal else
                 tensors["sigma_map.mlp.2.weight"].shape[0],
                 "mlp_ratio": hidden // width,
                 "two_time": any(k.startswith("sigma_map_prime.") for k in tensors),
                 "learned_loss_weight": "learnable_loss_weighting.mlp.2.weight" in tensors,
                 "condition_embedding": False,
                 "causal": causal}


def family_of(fields: dict, family: str) -> str:
  """The run kind of imported weights with the model `fields` (infer_architecture's):
  `family` (auto: fmlm with a second time embedder, ar when causal, else flm), checked
  against what the tensors are."""
  found = "ar" if fields["causal"] else "fmlm" if fields["two_time"] else None
  if family == "auto":
    return found or "flm"
  if found and family != found or not found and family in ("fmlm", "ar"):
    what = {"ar": "a causal AR DiT", "fmlm": "a two-time FMLM student"}.get(
        found, "a one-time, non-causal DiT (flm, mdlm, sedd, d3pm or duo)")
    raise UsageError(f"--family={family}, but the weights are {what}; use --family="
                     f"{found or 'flm, mdlm, sedd, d3pm or duo'} (or auto).")
  return family


def check_tensors(tensors: dict[str, np.ndarray], vocab: int,
                  model: ml_collections.ConfigDict) -> None:
  """Refuses missing, unexpected or mis-shaped tensors, naming the first ones."""
  abstract = _abstract_params(model, vocab)
  expected = {ref: _get(abstract, path).shape[::-1] if transposed else
              _get(abstract, path).shape
              for ref, path, transposed in name_map(model.depth, model.two_time, model.causal,
                                                    model.learned_loss_weight)}
  expected[INV_FREQ] = (model.width // model.heads // 2,)
  missing = [k for k in expected if k not in tensors and k != INV_FREQ]
  unexpected = [k for k in tensors if k not in expected]
  wrong = [f"{k} {tuple(tensors[k].shape)} (expected {expected[k]})" for k in expected
           if k in tensors and tuple(tensors[k].shape) != tuple(expected[k])]
  for problem, keys in (("missing", missing), ("unexpected", unexpected),
                        ("mis-shaped", wrong)):
    if keys:
      raise UsageError(f"{len(keys)} {problem} tensor(s) for a DiT with V {vocab}, width "
                       f"{model.width}, {model.depth} blocks, {model.heads} heads, "
                       f"conditioning {model.cond_width}: {', '.join(keys[:5])}.")
  # to the precision the buffer was saved in (float32, or half in a half checkpoint)
  rtol = 1e-5 if tensors.get(INV_FREQ, np.float32(0)).dtype == np.float32 else 1e-2
  if INV_FREQ in tensors and not np.allclose(tensors[INV_FREQ], inv_freq(
      model.width // model.heads), rtol=rtol):
    raise UsageError(f"{INV_FREQ} is not 1 / 10000^(2i / head_dim); flmjax's rotary "
                     "embedding would not match these weights.")


def _abstract_params(model: ml_collections.ConfigDict, vocab: int) -> dict:
  """The shapes of the DiT's parameters; a model the config cannot build is a UsageError."""
  try:
    return nnx.to_pure_dict(nnx.state(nnx.eval_shape(dit.builder(model, vocab)), nnx.Param))
  except ValueError as e:  # the model's own checks of its fields
    raise UsageError(f"the model cannot be built: {e}.") from None


def _numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().cpu().float().numpy()
  return np.asarray(value, np.float32)


def from_lightning(ckpt: dict, ema: bool = True) -> dict[str, np.ndarray]:
  """The backbone's tensors of a loaded Lightning checkpoint: `state_dict` keys under
  `backbone.` (with any `._orig_mod` of torch.compile removed), and with `ema` the EMA
  weights `ema.shadow_params`, listed in the backbone's named_parameters() order (the
  state_dict's order without its buffers)."""
  if "state_dict" not in ckpt:
    raise UsageError("the checkpoint has no 'state_dict'; it is not a Lightning checkpoint.")
  tensors = {}
  for key, value in ckpt["state_dict"].items():
    key = key.replace("._orig_mod", "").replace("_orig_mod.", "")
    if key.startswith("backbone."):
      tensors[key[len("backbone."):]] = _numpy(value)
  if not tensors:
    raise UsageError("the checkpoint's state_dict has no 'backbone.' weights.")
  if not ema:
    return tensors
  shadow = (ckpt.get("ema") or {}).get("shadow_params")
  if shadow is None:
    raise UsageError("the checkpoint has no EMA weights (ema.shadow_params); import the "
                     "trained weights with --weights=raw.")
  names = [k for k in tensors if k != INV_FREQ]
  if len(shadow) != len(names):
    raise UsageError(f"ema.shadow_params holds {len(shadow)} tensors but the backbone has "
                     f"{len(names)} parameters; import with --weights=raw.")
  for name, value in zip(names, shadow):
    value = _numpy(value)
    if value.shape != tensors[name].shape:
      raise UsageError(f"ema.shadow_params does not follow the backbone's parameter order "
                       f"({name}: {value.shape} vs {tensors[name].shape}); import with "
                       "--weights=raw.")
    tensors[name] = value
  return tensors


def read_reference(source: str, ema: bool = True) -> tuple[dict[str, np.ndarray], dict]:
  """(tensors, config.json contents or {}) of a Hugging Face directory, a .safetensors
  file or a Lightning .ckpt."""
  path = pathlib.Path(source).expanduser()
  meta = {}
  if path.is_dir():
    if (path / "config.json").is_file():
      try:
        meta = json.loads((path / "config.json").read_text())
      except ValueError:  # not JSON, or not UTF-8
        meta = None
      if not isinstance(meta, dict):
        raise UsageError(f"{path / 'config.json'} is not a JSON object; fix it, or move it "
                         "away (the heads then come from the rotary buffer or model.heads).")
    path = path / "model.safetensors"
  if not path.is_file():
    raise UsageError(f"--from={source}: no such file; give a directory holding "
                     "model.safetensors, a .safetensors file or a Lightning .ckpt.")
  if path.suffix == ".safetensors":
    try:
      return safetensors.numpy.load_file(str(path)), meta
    except Exception as e:  # pylint: disable=broad-except  # SafetensorError, OSError
      raise UsageError(f"{path} cannot be read as safetensors ({str(e)[:200]}).") from None
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UsageError(f"reading {path} (a PyTorch checkpoint) needs torch: pip install torch "
                     "(the CPU build is enough).") from None
  try:  # Lightning's saved hyperparameters are pickled objects: the file runs code
    saved = torch.load(path, map_location="cpu", weights_only=False)
  except Exception as e:  # pylint: disable=broad-except  # UnpicklingError, RuntimeError
    raise UsageError(f"{path} cannot be read as a PyTorch checkpoint ({str(e)[:200]}).") \
        from None
  return from_lightning(saved, ema), meta


def _tokenizer(config: ml_collections.ConfigDict):
  if config.tokenizer.kind == "sentencepiece" and not config.tokenizer.path:
    raise UsageError("an imported model needs the tokenizer it was trained with: set "
                     "--config.tokenizer.path (or use tokenizer.kind=gpt2 / bert).")
  return tokenizers.build_tokenizer(config.tokenizer, pathlib.Path("."), None)


def _check_new(directory: str, *names: str) -> None:
  """Refuses a --to that holds any of `names`; it is created only once the input has been
  checked, so a refused command leaves nothing behind."""
  taken = [n for n in names if (epath.Path(directory).expanduser() / n).exists()]
  if taken:
    raise UsageError(f"--to={directory} already holds {', '.join(taken)}; choose a new "
                     "directory (nothing was overwritten).")


def import_weights(source: str, directory: str, config: ml_collections.ConfigDict,
                   ema: bool = True, family: str = "auto") -> dict:
  """Writes the export DIRECTORY/{params, record.json} of the reference weights in
  `source` (a model of `family`, see family_of); returns its run record."""
  _check_new(directory, "params", "record.json", "checkpoints")  # (read before params)
  tensors, meta = read_reference(source, ema)
  vocab, fields = infer_architecture(tensors, meta, config.model)
  if family == "auto" and meta.get("kind") in registry.FAMILIES:
    family = meta["kind"]  # written by flmjax's export
  kind = family_of(fields, family)
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.update(fields)
  config.model.update(registry.FAMILIES[kind].model)
  check_tensors(tensors, vocab, config.model)
  tokenizer = _tokenizer(config)
  if registry.FAMILIES[kind].masked:
    config = registry.with_family(config, registry.OBJECTIVES[kind], tokenizer)
  if tokenizer.vocab_size != vocab:
    raise UsageError(f"the weights have V = {vocab} but the config's tokenizer "
                     f"({config.tokenizer.kind}) has {tokenizer.vocab_size}; use the config "
                     "of the data they were trained on (configs/owt.py: GPT-2, 50258; "
                     "configs/lm1b.py: BERT, 30522).")
  record = checkpoint.run_record(config, tokenizer, kind)
  record["imported_from"] = str(source)
  params = jax.tree.map(jnp.asarray, from_reference(tensors, config.model))
  checkpoint.export(outputs.create_workdir(directory), params, record)
  return record


def write_reference(directory: pathlib.Path, tensors: dict[str, np.ndarray],
                    model: ml_collections.ConfigDict, vocab: int, kind: str) -> None:
  weights, partial = directory / "model.safetensors", directory / f".model.tmp{os.getpid()}"
  safetensors.numpy.save_file(tensors, str(partial))
  umask = os.umask(0)  # safetensors writes 0600; give the file the mode open() would
  os.umask(umask)
  os.chmod(partial, 0o666 & ~umask)
  os.replace(partial, weights)  # atomic: a half-written file never takes the name
  outputs.write_json(directory / "config.json", {
      "kind": kind, "vocab_size": vocab, "hidden_size": model.width,
      "n_blocks": model.depth, "n_heads": model.heads, "cond_dim": model.cond_width,
      "mlp_ratio": model.mlp_ratio, "two_time": model.two_time,
      "attn_softcap": model.attn_softcap, "output_cap": model.output_cap})


def export_weights(source: str, directory: str) -> dict:
  """Writes DIRECTORY/{model.safetensors, config.json} from the EMA weights of `source`
  (a workdir or an export); returns its run record."""
  _check_new(directory, "model.safetensors", "config.json")
  record = checkpoint.read_record(source)
  model = ml_collections.ConfigDict(record["config"]["model"])
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}),
                            jax.devices()[:1])
  _, abstract = state.param_layout(dit.builder(model, record["vocab_size"]), mesh)
  params = checkpoint.load_ema(source, abstract)
  tensors = to_reference(params, model)  # (refused before --to is created)
  write_reference(outputs.create_workdir(directory), tensors, model, record["vocab_size"],
                  record["kind"])
  return record


def random_weights(directory: str, config: ml_collections.ConfigDict) -> None:
  """Writes weights of the config's shape (V from its tokenizer, or tokenizer.vocab_size for
  a SentencePiece model still to be trained) in the reference layout."""
  _check_new(directory, "model.safetensors", "config.json")
  vocab = aot.vocab_size(config)
  abstract = _abstract_params(config.model, vocab)
  rng = np.random.default_rng(config.seed)
  params = jax.tree.map_with_path(
      lambda p, x: np.ones(x.shape, np.float32) if "scale" in jax.tree_util.keystr(p)
      else rng.normal(0, 0.02, x.shape).astype(np.float32), abstract)
  tensors = to_reference(params, config.model)  # (refused before --to is created)
  write_reference(outputs.create_workdir(directory), tensors, config.model, vocab,
                  "fmlm" if config.model.two_time else "flm")


_CONFIG = config_flags.DEFINE_config_file("config", None, "A flmjax config (tokenizer, L).")
_FROM = flags.DEFINE_string("from", None, "import: reference weights; export: a workdir.")
_TO = flags.DEFINE_string("to", None, "The directory to write.")
_WEIGHTS = flags.DEFINE_enum("weights", "ema", ["ema", "raw"],
                             "Which weights of a Lightning .ckpt to import.")
_FAMILY = flags.DEFINE_enum("family", "auto", ["auto", *registry.FAMILIES],
                            "import: the family of the weights (auto: flm, fmlm or ar from "
                            "the tensors; MDLM, SEDD, D3PM and Duo need naming).")
COMMANDS = ("import", "export", "random")
PROGRAM = "flmjax.convert"


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    cli.fail(PROGRAM, f"give one command, {', '.join(COMMANDS)} (got {argv[1:]}); see "
             "--help.")
  command = argv[1]
  if not flags.FLAGS["verbosity"].present:  # library INFO logs only on request
    logging.set_verbosity(logging.WARNING)
  needed = {"import": ("from", "to", "config"), "export": ("from", "to"),
            "random": ("to", "config")}[command]
  missing = [f"--{n}" for n in needed if flags.FLAGS[n].value is None]
  try:
    if missing:
      raise UsageError(f"{command} needs {' and '.join(missing)}.")
    if command == "import":
      record = import_weights(_FROM.value, _TO.value, _CONFIG.value, _WEIGHTS.value == "ema",
                              _FAMILY.value)
      model = record["config"]["model"]
      outputs.say(f"imported a {record['kind']} DiT (V {record['vocab_size']}, width "
                f"{model['width']}, {model['depth']} blocks, {model['heads']} heads) to "
                f"{_TO.value}; sample with --config.checkpoint={_TO.value}")
    elif command == "export":
      record = export_weights(_FROM.value, _TO.value)
      outputs.say(f"exported the {record['kind']} EMA weights of {_FROM.value} to {_TO.value}")
    else:
      random_weights(_TO.value, _CONFIG.value)
      outputs.say(f"wrote random weights of the config's shape to {_TO.value}")
  except UsageError as e:
    cli.fail(PROGRAM, str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=functools.partial(cli.parse_flags, program=PROGRAM))
