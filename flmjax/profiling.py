"""Where a compiled computation spends its time, by part of the model.

The model and the train step name their parts with `jax.named_scope` (PARTS); XLA keeps
the scope in each instruction's metadata (op_name), and the profiler's trace records each
executed instruction (its `hlo_op` and `hlo_module`) with its duration. `shares` joins the
two: the fraction of the computation's executed time in each part, "other" for the rest
(the loss's reductions, the gradient's sums, copies). A fusion counts in the part of its
root instruction, so work that XLA fuses across a boundary lands on one side of it. A loop,
call or conditional counts nothing itself: its event spans its body's, which count.
"""

import collections
import glob
import os
import re

from jax.profiler import ProfileData

PARTS = ("attention", "mlp", "output_head", "norms_modulation", "noise", "optimizer")
OTHER = "other"

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", re.M)
_MODULE = re.compile(r"^HloModule ([\w.\-]+)", re.M)
_CONTROL = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*? (?:while|call|conditional)\(", re.M)


def part_of(op_name: str) -> str:
  """The part named last in a scope path such as "jit(step)/transpose(jvp(mlp))/dot"."""
  found = [(op_name.rfind(part), part) for part in PARTS if part in op_name]
  return max(found)[1] if found else OTHER


def instruction_parts(hlo_text: str) -> tuple[str, dict[str, str | None]]:
  """(module name, {instruction name: part}) of a compiled computation's HLO text; None
  for a loop, call or conditional (whose time is its body's)."""
  module = _MODULE.search(hlo_text)
  if module is None:
    raise ValueError("not an HLO module's text: no 'HloModule' line")
  parts = {name: part_of(op) for name, op in _INSTRUCTION.findall(hlo_text)}
  return module.group(1), parts | dict.fromkeys(_CONTROL.findall(hlo_text))


def newest_run(paths: list[str]) -> list[str]:
  """The files of the newest profiler run among trace files `paths`: each run writes one
  folder (plugins/profile/TIMESTAMP, a file per host), and a reused folder keeps the
  older runs."""
  runs = collections.defaultdict(list)
  for path in paths:
    runs[os.path.dirname(path)].append(path)
  return max(runs.values(), key=lambda files: max(os.path.getmtime(f) for f in files))


def _durations(trace_dir: str, module: str) -> list[tuple[str, float]]:
  """(instruction, seconds) of every execution of `module`'s instructions in the newest
  trace, from the device planes when there are any (GPU, TPU), else from the host's."""
  paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no profiler trace (*.xplane.pb) under {trace_dir}")
  by_plane = collections.defaultdict(list)
  for path in newest_run(paths):
    for plane in ProfileData.from_file(path).planes:
      for line in plane.lines:
        for event in line.events:
          stats = dict(event.stats)
          if "hlo_op" in stats and stats.get("hlo_module", module) == module:
            by_plane[plane.name].append((stats["hlo_op"], event.duration_ns * 1e-9))
  device = [events for name, events in by_plane.items() if name.startswith("/device:")]
  return [e for events in (device or list(by_plane.values())) for e in events]


def shares(trace_dir: str, hlo_text: str) -> dict[str, float]:
  """The share of the executed time of the computation with this HLO text in each part
  (and "other"), from the newest trace in `trace_dir`; they sum to 1."""
  module, parts = instruction_parts(hlo_text)
  totals = collections.Counter()
  for op, seconds in _durations(trace_dir, module):
    part = parts.get(op, OTHER)
    if part is not None:
      totals[part] += seconds
  total = sum(totals.values())
  if not total:
    raise ValueError(f"the trace in {trace_dir} has no executed instruction of {module}")
  return {part: totals[part] / total for part in (*PARTS, OTHER)}
