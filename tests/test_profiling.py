"""The profile's share of time by part: scope names read from XLA's metadata, durations
from the profiler's trace."""

import os

import jax
import jax.numpy as jnp
import pytest

from flmjax import profiling


def test_part_is_the_innermost_named_part():
  assert profiling.part_of("jit(step)/transpose(jvp(mlp))/dot_general") == "mlp"
  assert profiling.part_of("jit(step)/jvp(noise)/output_head/tanh") == "output_head"
  assert profiling.part_of("jit(step)/reduce_sum") == profiling.OTHER
  module, parts = profiling.instruction_parts(
      'HloModule jit_f, entry_computation_layout={}\n'
      '  %dot.1 = f32[2,2]{1,0} dot(%a, %b), metadata={op_name="jit(f)/attention/dot"}\n'
      '  %w = (s32[], f32[2,2]{1,0}) while(%t), condition=%cond, body=%body, '
      'metadata={op_name="jit(f)/mlp/while"}\n'
      '  ROOT %add = f32[2,2]{1,0} add(%dot.1, %c), metadata={op_name="jit(f)/add"}\n')
  # a loop counts nothing itself: its event spans those of its body
  assert module == "jit_f" and parts == {"dot.1": "attention", "w": None,
                                         "add": profiling.OTHER}
  with pytest.raises(ValueError, match="HloModule"):
    profiling.instruction_parts("not hlo")


@pytest.mark.slow
def test_shares_put_the_time_where_the_work_is(tmp_path):
  def f(x, w):  # (a fusion is counted in the part of its root: two outputs keep them apart)
    with jax.named_scope("mlp"):  # 2 x 512^3 multiply-adds
      y = jnp.tanh(x @ w) @ w
    with jax.named_scope("attention"):  # 512 additions
      return y, x[0].sum()

  compiled = jax.jit(f).lower(jnp.ones((512, 512)), jnp.ones((512, 512))).compile()
  x = jnp.ones((512, 512))
  jax.block_until_ready(compiled(x, x))
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(3):
      jax.block_until_ready(compiled(x, x))
  shares = profiling.shares(str(tmp_path), compiled.as_text())
  assert set(shares) == {*profiling.PARTS, profiling.OTHER}
  assert sum(shares.values()) == pytest.approx(1.0)
  assert shares["mlp"] > 0.8 and shares["attention"] < 0.1

  def loop(x, w):  # a loop outside any part, its body all MLP: counted once, as MLP
    def body(h, _):
      with jax.named_scope("mlp"):
        return jnp.tanh(h @ w), None
    return jax.lax.scan(body, x, None, length=8)[0]
  compiled = jax.jit(loop).lower(x, x).compile()
  jax.block_until_ready(compiled(x, x))
  with jax.profiler.trace(str(tmp_path / "loop")):
    for _ in range(3):
      jax.block_until_ready(compiled(x, x))
  assert profiling.shares(str(tmp_path / "loop"), compiled.as_text())["mlp"] > 0.8
  with pytest.raises(FileNotFoundError, match="xplane"):
    profiling.shares(str(tmp_path / "missing"), compiled.as_text())


def test_the_newest_run_of_a_reused_trace_folder_is_read(tmp_path):
  """A run's files share a folder; the newest by file time wins, whatever the names."""
  runs = {"2026_01_02_00_00_00": ("a", 100), "2026_01_01_00_00_00": ("b", 200),
          "2026_01_01_00_00_00/x": ("c", 150)}
  paths = {}
  for folder, (name, mtime) in runs.items():
    for host in ("host1", "host2"):
      path = tmp_path / folder / f"{host}{name}.xplane.pb"
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(b"")
      os.utime(path, (mtime, mtime - (host == "host2")))
      paths.setdefault(name, []).append(str(path))
  found = profiling.newest_run([p for files in paths.values() for p in files])
  assert sorted(found) == sorted(paths["b"])
