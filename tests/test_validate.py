"""The config check: every field it refuses is named, before any device is asked for; the
paper's configs hold its recipe."""

import functools
import importlib

import pytest

from conftest import train_config
from flmjax import sharding
from flmjax.errors import UsageError
from flmjax.models import dit, flash
from flmjax.validate import step_counts, validate


def _refused(config, mode="train", devices=8) -> str:
  with pytest.raises(UsageError) as error:
    validate(config, mode, lambda: devices)
  return str(error.value)


def test_the_test_config_is_valid():
  for mode in ("prepare", "train", "pipeline", "compile"):
    validate(train_config(), mode, lambda: 8)


# The paper's recipe (its appendix and the reference's scripts), restated here rather than
# read from configs/base.py.
TEACHER = {"model.width": 768, "model.depth": 12, "model.heads": 12, "model.cond_width": 128,
           "model.mlp_ratio": 4, "model.dropout": 0.1, "model.attn_softcap": 50.0,
           "model.output_cap": 30.0, "model.dtype": "bfloat16", "model.two_time": False,
           "model.learned_loss_weight": False, "train.learning_rate": 3e-4, "train.b1": 0.9,
           "train.b2": 0.999, "train.eps": 1e-8, "train.weight_decay": 0.0,
           "train.grad_clip": 1.0, "train.warmup_steps": 2500, "train.steps": 1_000_000,
           "train.ema_decay": 0.9999, "batch_size": 512, "seed": 1, "family": "flm"}
STUDENT = {"distill.objective": "semigroup", "distill.learning_rate": 3e-4,
           "distill.b2": 0.95, "distill.steps": 100_000, "distill.diagonal_fraction": 0.5,
           "distill.boundary_fraction": 0.5 / 32}
DATA = {"lm1b": {"data.corpus": "lm1b", "data.seq_len": 128, "tokenizer.kind": "bert"},
        "owt": {"data.corpus": "openwebtext", "data.seq_len": 1024, "tokenizer.kind": "gpt2"}}


@pytest.mark.parametrize("name, expected", [
    ("lm1b", dict(TEACHER, **DATA["lm1b"])),
    ("owt", dict(TEACHER, **DATA["owt"])),
    ("lm1b_distill", dict(TEACHER, **STUDENT, **DATA["lm1b"], **{
        "distill.batch_size": 512, "sample.gamma": 0.8})),
    ("owt_distill", dict(TEACHER, **STUDENT, **DATA["owt"], **{
        "distill.batch_size": 128, "sample.gamma": 1.0})),
])
def test_the_paper_configs_are_the_papers_recipe_and_valid(name, expected):
  config = importlib.import_module(f"configs.{name}").get_config()
  got = {field: functools.reduce(getattr, field.split("."), config) for field in expected}
  assert got == expected
  config.teacher_checkpoint = "somewhere"
  for mode in ("train", "distill", "pipeline", "compile"):
    validate(config, mode, lambda: 8)


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 0, "batch_size=0 must be positive"),
    ("data.seq_len", 2, "data.seq_len=2: an example needs BOS, EOS"),
    ("data.corpus", "wiki", "data.corpus='wiki' is not one of embedded, dir"),
    ("data.valid_fraction", 1.0, r"data.valid_fraction=1.0 must be in \[0, 1\)"),
    ("tokenizer.kind", "bpe", "tokenizer.kind='bpe' is not one of sentencepiece"),
    ("model.attention", "flashy", "model.attention='flashy' is not one of auto, plain, fused, "
     "splash, flash"),
    ("model.output_head", "chunked", "model.output_head='chunked' is not one of auto, plain"),
    ("model.output_chunk", -1, "model.output_chunk=-1 must be 0 or more"),
    ("model.heads", 3, "model.width=32 must split into model.heads=3 heads of even size"),
    ("model.dropout", -0.1, r"model.dropout=-0.1 must be in \[0, 1\)"),
    ("train.grad_accum", 0, "train.grad_accum=0 must be positive"),
    ("train.warmup_steps", -1, "train.warmup_steps=-1 must be 0 or more"),
    ("noise", "gauss", "noise='gauss' is not one of latent, vocab"),
    ("distill.objective", "mse", "distill.objective='mse' is not one of semigroup, eulerian"),
    ("distill.diagonal_fraction", 1.0, r"distill.diagonal_fraction=1.0 must be in \(0, 1\)"),
    ("distill.diagonal_fraction", 0.9, "leave room for off-diagonal rows"),
    ("sample.gamma", 1.5, r"sample.gamma=1.5: the churn must be in \[0, 1\]"),
    ("eval.evaluator", "gpt4", "eval.evaluator='gpt4' is not one of smollm2, gpt2, none"),
    ("eval.steps", "1,x", "eval.steps='1,x' must be distinct positive step counts"),
    ("eval.steps", "1,1,2", "eval.steps='1,1,2' must be distinct positive step counts"),
    ("eval.student_steps", "0", "eval.student_steps='0' must be distinct positive step"),
    ("eval.reference_samples", 1, "eval.reference_samples=1: FD .* at least 2"),
    ("eval.num_samples", 1, "eval.num_samples=1: FD .* at least 2"),
    ("seed", -1, r"seed=-1 must be in \[0, 2\*\*32\)"),
    ("seed", 2**32, r"seed=4294967296 must be in \[0, 2\*\*32\)"),
    ("train.learning_rate", float("inf"), "train.learning_rate=inf must be a finite number"),
    ("model.attn_softcap", float("nan"), "model.attn_softcap=nan must be a finite number"),
    ("distill.dcd.gamma_max", float("-inf"), "distill.dcd.gamma_max=-inf must be a finite"),
    ("data.path", "/my/texts", "data.path=/my/texts is read with data.corpus=dir only, and "
     "data.corpus=embedded: set --config.data.corpus=dir"),
])
def test_a_bad_field_is_named(field, value, message):
  config = train_config()
  section, _, name = field.rpartition(".")
  setattr(config[section] if section else config, name, value)
  with pytest.raises(UsageError, match=message):
    validate(config, "train", lambda: pytest.fail("asked for the devices"))


def test_attention_kernels_need_l_a_multiple_of_their_block_and_no_jvp():
  config = train_config()
  config.model.attention = "splash"
  assert "data.seq_len=32 to be a multiple of 128" in _refused(config)
  config.data.seq_len = 128
  validate(config, "train", lambda: 8)
  config.family = "ar"  # which runs L - 1 = 127 tokens
  assert "model.attention=splash cannot run family=ar" in _refused(config)
  config.family = "flm"
  config.distill.objective = "lagrangian"
  validate(config, "train", lambda: 8)  # training the teacher takes no jvp
  assert "no forward-mode derivative, which distill.objective=lagrangian takes" in _refused(
      config, "distill")
  config = train_config()
  config.model.attention = "flash"
  assert "model.attention=flash needs data.seq_len=32 to be a multiple of 64" in _refused(
      config)
  config.data.seq_len = 64
  validate(config, "train", lambda: 8)
  config.family = "ar"
  assert "model.attention=flash cannot run family=ar, a causal model of L - 1" in _refused(
      config)
  config.family = "flm"
  config.model.update(width=96, heads=2)
  assert "head size (model.width / model.heads = 48) that is a power of two" in _refused(
      config)
  config.model.heads = 12  # 8
  assert "head size (model.width / model.heads = 8) that is a power of two, at least 16" in \
      _refused(config)


def test_flash_tiles_are_three_tiles_whose_blocks_and_steps_divide_l():
  config = train_config()
  config.data.seq_len = 128
  config.model.update(attention="flash", flash_tiles="128x32/8/3,32x128/4/1,64x64/2/2")
  validate(config, "train", lambda: 8)
  assert flash.Tiles.parse(config.model.flash_tiles) == flash.Tiles(
      flash.Tile(128, 32, 8, 3), flash.Tile(32, 128, 4, 1), flash.Tile(64, 64, 2, 2))
  assert str(flash.Tiles.parse(config.model.flash_tiles)) == config.model.flash_tiles
  assert flash.Tiles.parse("") == flash.TILES
  for tiles, said in [
      ("128x64/4/2", "is not three tiles FORWARD,DKV,DQ"),
      ("128x64/4/2,64x64/4,64x64/4/2", "'64x64/4' is not a tile BLOCKxSTEP/WARPS/STAGES"),
      ("96x64/4/2,64x64/4/2,64x64/4/2", "block and step must be powers of two, at least 16"),
      ("64x8/4/2,64x64/4/2,64x64/4/2", "block and step must be powers of two, at least 16"),
      ("64x64/3/2,64x64/4/2,64x64/4/2", "warps must be 1, 2, 4, 8 or 16"),
      ("64x64/4/0,64x64/4/2,64x64/4/2", "stages at least 1")]:
    config.model.flash_tiles = tiles
    assert f"model.flash_tiles='{tiles}': " in _refused(config)
    assert said in _refused(config)
  config.model.flash_tiles = "256x64/4/2,64x64/4/2,64x64/4/2"
  assert ("model.attention=flash needs data.seq_len=128 to be a multiple of 256 (its tiles' "
          "blocks and steps, model.flash_tiles)") in _refused(config)
  config.model.attention = "auto"  # which takes flash on a GPU only where the tiles fit
  validate(config, "train", lambda: 8)
  with sharding.tracing_for("gpu"):
    assert dit.attention_path("auto", 50.0, 128, 64, tiles=flash.Tiles.parse(
        config.model.flash_tiles)) == "plain"
    assert dit.attention_path("auto", 50.0, 256, 64, tiles=flash.Tiles.parse(
        config.model.flash_tiles)) == "flash"


def test_the_mesh_must_fit_the_devices_and_divide_the_batches():
  config = train_config()
  config.mesh.update(data=-1, fsdp=2, tensor=1)
  assert sharding.mesh_shape(config.mesh, 8) == (4, 2, 1)
  config.mesh.update(data=3, fsdp=1, tensor=1)
  assert "needs 3 devices" in _refused(config)
  config = train_config()
  config.batch_size = 12
  assert "batch_size 12 must be a multiple of the data-parallel size 8" in _refused(config)
  validate(config, "train", lambda: 4)
  config = train_config()
  config.train.grad_accum = 2
  assert "times train.grad_accum=2" in _refused(config)
  # 8 devices in 4 processes, tensor over 4 of them: a tensor group spans two processes,
  # which would load different rows for it
  config = train_config()
  config.mesh.update(data=-1, fsdp=1, tensor=4)
  validate(config, "train", lambda: 8, lambda: 2)
  with pytest.raises(UsageError, match="data-parallel size 2 .* must be a multiple of the 4 "
                                       "processes.* divide each process's 2 devices"):
    validate(config, "train", lambda: 8, lambda: 4)
  config = train_config()
  config.distill.batch_size, config.teacher_checkpoint = 4, "teacher"
  validate(config, "train", lambda: 8)  # the teacher's batch is 8
  assert "the student's batch (distill.batch_size, or batch_size when it is 0) 4" in _refused(
      config, "distill")


def test_gradient_accumulation_must_keep_the_students_split():
  config = train_config()
  config.batch_size, config.train.grad_accum = 128, 4
  config.distill.boundary_fraction = 0.5 / 32  # 2 rows of 128; 0 of each part of 32
  validate(config, "train", lambda: 8)
  assert "grad_accum=4 parts would take (16, 0, 16)" in _refused(config, "pipeline")


def test_modes_name_what_they_need(tmp_path):
  config = train_config()
  assert "--mode=distill needs --config.teacher_checkpoint=DIR" in _refused(config, "distill")
  assert "--mode=eval needs --config.checkpoint=DIR" in _refused(config, "eval")
  config.eval.evaluator, config.checkpoint = "gpt2", "somewhere"
  validate(config, "train", lambda: 8)  # no evaluation
  # the evaluator is found before a pipeline trains (its files are read when it scores)
  for mode in ("eval", "score", "pipeline", "compare"):
    assert "evaluator gpt2 needs a path (eval.evaluator_path)" in _refused(config, mode)
  config.eval.evaluator_path = str(tmp_path)
  (tmp_path / "config.json").write_text("{}")
  assert "model.safetensors is missing" in _refused(config, "pipeline")
  (tmp_path / "model.safetensors").write_text("")
  validate(config, "eval", lambda: 8)
  config.eval.evaluator_path = str(tmp_path / "SmolLM2.gguf")
  config.eval.evaluator = "smollm2"
  assert "SmolLM2.gguf: no such GGUF file" in _refused(config, "pipeline")
  config.eval.evaluator = "none"
  validate(config, "pipeline", lambda: 8)
  config.data.valid_fraction = 0.0
  validate(config, "train", lambda: 8)  # trains without validation
  for mode in ("pipeline", "compare"):
    assert "data.valid_fraction=0 holds out no text, which --mode=" in _refused(config, mode)
  config.model.two_time = True
  assert "model.two_time=True is the distilled student" in _refused(config, "train")


def test_learned_loss_weight_is_refused_where_no_loss_takes_it():
  config = train_config()
  config.model.learned_loss_weight = True
  config.family = "sedd"
  assert "not family=sedd's: set it False" in _refused(config, "train")
  config.family = "flm"
  assert "--mode=compare also trains the baselines" in _refused(config, "compare")


def test_conditional_training_names_its_kinds_and_family():
  config = train_config()
  config.train.condition = "prefix,middle"
  assert "train.condition='prefix,middle': middle is not a kind" in _refused(config, "train")
  config.train.condition = "prefix"
  config.train.condition_dropout = 1.5
  assert "train.condition_dropout=1.5 must be a probability" in _refused(config, "train")
  config.train.condition_dropout = 0.1
  config.family = "mdlm"
  assert "family=mdlm takes no condition" in _refused(config, "train")
  config.family = "flm"
  assert "the baselines, which take no condition" in _refused(config, "compare")
  config.train.condition = ""
  config.eval.prompted = True
  assert "eval.prompted: --mode=compare also evaluates the baselines" in _refused(config,
                                                                                 "compare")
  config.train.condition, config.eval.prompted = "prefix", False
  validate(config, "pipeline", lambda: 8)
  config.sample.guidance = 1.0
  assert "sample.guidance=1.0 guides conditional generation" in _refused(config, "sample")
  config.checkpoint = "weights"
  validate(config, "generate", lambda: 8)


def test_a_topology_is_only_compiled_for():
  config = train_config()
  config.topology = "v5e:2x2"
  assert "topology='v5e:2x2' is the hardware --mode=compile compiles for; --mode=train" in (
      _refused(config, "train"))
  validate(config, "compile", lambda: 4)


def test_step_counts():
  assert step_counts("1, 8,64") == [1, 8, 64]
  with pytest.raises(UsageError, match="eval.teacher_steps=''"):
    step_counts("", "eval.teacher_steps")


def test_a_named_sampler_must_belong_to_every_family_the_mode_trains():
  config = train_config()
  config.sample.sampler = "euler"
  validate(config, "train", lambda: 8)  # family=flm
  assert ("sample.sampler=euler: --mode=pipeline trains flm, fmlm, and fmlm has no euler "
          "sampler (it has flowmap)") in _refused(config, "pipeline")
  assert "--mode=compare trains flm, fmlm, mdlm" in _refused(config, "compare")
  config.family = "mdlm"
  assert "mdlm has no euler sampler (it has ancestral_cache, ancestral)" in _refused(config)
  config.sample.sampler = "ancestral"
  validate(config, "train", lambda: 8)
  config.sample.sampler = "auto"
  for mode in ("train", "pipeline", "compare"):
    config.family = "flm"
    validate(config, mode, lambda: 8)
