"""`--mode=compile`: ahead-of-time compilation for a target slice, without its hardware.

With `--config.topology=v5e:8x8` (any TPU slice name libtpu knows: v5e:AxB, v5p:AxBxC,
v6e:AxB; install it with pip install "jax[tpu]==<the installed jax version>") the train
step of config.family and its validation, and for FLM the distillation step and the
one-step sampler (for Duo with distill.objective=dcd, the DCD step), are lowered and
compiled for that slice on this machine, with the config's mesh laid over its chips. With
`h100`, `h200`, `h100:8` (8 GPUs in one host) or `h100:4x8` (4 hosts of 8) they are
compiled for NVIDIA GPUs, described by GPUS (install JAX's CUDA plugin: pip install
"jax[cuda12-local]==<the installed jax version>"; no GPU or driver is needed). With an
empty topology they are compiled for the local devices. For each it prints XLA's per-chip
memory plan (arguments + outputs + temporaries - aliased + code) against the chip's HBM,
the FLOPs and the bytes of memory accessed per chip from XLA's cost analysis, and the
roofline step time max(FLOPs / peak, bytes / HBM bandwidth) with the chip's published bf16
peak and bandwidth (a lower bound: no chip reaches either; and XLA's cost analysis counts
a loop's body once and nothing inside a Pallas kernel, so the fused output head and the
splash attention are undercounted, which `cost_undercounted` and a * mark; compiled for a
GPU without one, XLA gives no cost analysis, and only the memory is reported). For the
train step it also gives the model's FLOPs per chip (dit.training_flops_per_token, one
forward and backward pass per network pass of the objective, counted in full) and their
time at the chip's peak, and for each computation the attention kernel it compiled with
(the family's settings may differ from the config's: see the header). The same goes to
WORKDIR/compile.json. Nothing is allocated and no data is read: V comes from the
tokenizer's files where the config names them (GPT-2, or tokenizer.path), else from
tokenizer.vocab_size (a SentencePiece model the run would train) or bert-base-uncased's
30522 (BERT without tokenizer.path).
"""

import os
import re

import jax
from jax.sharding import NamedSharding, PartitionSpec
import jax.numpy as jnp
import ml_collections

from flmjax import distill, hooks, outputs, registry, sampling, sharding, state
from flmjax.data import tokenizers
from flmjax.errors import UsageError
from flmjax.models import dit, flash

GIB = 2**30
# device_kind -> (HBM bytes, dense bf16 peak FLOP/s, HBM bandwidth bytes/s) per chip, from
# the vendors' spec sheets.
CHIPS = {
    "TPU v4": (32 * GIB, 275e12, 1200e9),
    "TPU v5 lite": (16 * GIB, 197e12, 819e9),  # v5e
    "TPU v5": (95 * GIB, 459e12, 2765e9),  # v5p
    "TPU v6 lite": (32 * GIB, 918e12, 1640e9),  # v6e (Trillium)
    "NVIDIA H100 80GB HBM3": (80 * GIB, 989e12, 3.35e12),  # SXM
    "NVIDIA H200": (141 * GIB, 989e12, 4.8e12),
}
# topology name -> (device_kind, CUDA compute capability, SMs, boost clock GHz, L2 bytes),
# from NVIDIA's spec sheets; HBM and bandwidth from CHIPS.
GPUS = {
    "h100": ("NVIDIA H100 80GB HBM3", (9, 0), 132, 1.98, 50 * 2**20),
    "h200": ("NVIDIA H200", (9, 0), 132, 1.98, 50 * 2**20),
}
# XLA's GpuTargetConfigProto (text format) for compiling without a GPU; the per-block and
# per-SM limits are those of compute capability 9.0.
_GPU_TARGET = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: {cores}
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {bandwidth} l2_cache_size: {l2}
  clock_rate_ghz: {clock} device_memory_size: {hbm} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{kind}"
"""
BERT_BASE_UNCASED = 30522


def _gpu_devices(topology: str) -> list:
  """The devices of `GPU`, `GPU:N` (N in one host) or `GPU:HxN` (H hosts of N), GPU a key
  of GPUS, compiled for without a GPU through JAX's CUDA plugin."""
  name, colon, count = topology.partition(":")
  found = re.fullmatch(r"(?:([1-9][0-9]*)x)?([1-9][0-9]*)", count)
  if colon and not found:
    raise UsageError(f"topology={topology!r}: write {name}, {name}:GPUS or "
                     f"{name}:HOSTSxGPUS with positive counts, e.g. {name}:8 or {name}:4x8.")
  hosts, per_host = found.groups() if found else (None, None)
  kind, (major, minor), cores, clock, l2 = GPUS[name]
  hbm, _, bandwidth = CHIPS[kind]
  target = _GPU_TARGET.format(cores=cores, bandwidth=int(bandwidth), l2=l2, clock=clock,
                              hbm=hbm, major=major, minor=minor, kind=kind)
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    return topologies.get_topology_desc(
        platform="cuda", target_config=target,
        topology=f"1x{hosts or 1}x{per_host or 1}").devices
  except Exception as e:  # pylint: disable=broad-except
    raise UsageError(f"topology={topology!r} could not be described ({str(e)[:200]}); it "
                     "needs JAX's CUDA plugin (pip install \"jax[cuda12-local]=="
                     f"{jax.__version__}\"; no GPU is needed).") from None


def target_devices(topology: str) -> list:
  """The devices of a TPU slice or a GPU description (GPUS), or the local devices for ""."""
  if not topology:
    return jax.devices()
  if topology.partition(":")[0] in GPUS:
    return _gpu_devices(topology)
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  # Describing a slice loads libtpu, which by default allows one user per machine; this
  # process only compiles, so it may share it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    return topologies.get_topology_desc(topology, "tpu").devices
  except Exception as e:  # pylint: disable=broad-except
    raise UsageError(f"topology={topology!r} could not be described ({str(e)[:200]}); it "
                     "needs libtpu (pip install \"jax[tpu]==" + jax.__version__ + "\") and a "
                     "slice name such as v5e:4x4, v5e:8x8 or v5p:2x2x4 (or a GPU: "
                     f"{', '.join(GPUS)}).") from None


def vocab_size(config: ml_collections.ConfigDict) -> int:
  cfg = config.tokenizer
  if cfg.kind == "gpt2" or cfg.path:  # V as a run reads it from the files
    return tokenizers.build_tokenizer(cfg, None, None).vocab_size
  return BERT_BASE_UNCASED if cfg.kind == "bert" else cfg.vocab_size


def _compiled(name: str, batch: int, attention: str, compile_fn) -> tuple[dict, object]:
  """({computation, batch, attention}, the compiled computation), or (the same with the
  compiler's out-of-memory message, None) when it cannot fit the chip."""
  entry = {"computation": name, "batch": batch, "attention": attention}
  outputs.say(f"compiling the {name} (batch {batch}, attention {attention})")  # minutes at scale
  try:
    return entry, compile_fn()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return dict(entry, error=str(e).split("\n")[0]), None


def planned_bytes(compiled) -> int:
  """XLA's memory plan of a compiled computation per device: arguments + outputs +
  temporaries - aliased (donated) + generated code."""
  memory = compiled.memory_analysis()
  return int(memory.argument_size_in_bytes + memory.output_size_in_bytes
             + memory.temp_size_in_bytes - memory.alias_size_in_bytes
             + memory.generated_code_size_in_bytes)


# What XLA's cost analysis undercounts: a loop (its body is counted once) and a Pallas
# kernel, TPU or GPU (not counted).
UNDERCOUNTED = re.compile(r"\swhile\(|custom_call_target=\"("
                          r"tpu_custom_call|__gpu\$xla\.gpu\.triton|mosaic_gpu)")


def _report(entry: dict, compiled, devices, model_flops: float | None = None) -> dict:
  """The entry with the computation's memory plan and XLA's cost per chip, the roofline
  of the chip (when CHIPS knows it) and, for a step whose `model_flops` per chip are known,
  those and their time at the chip's peak."""
  if compiled is None:
    return entry
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()  # None when compiled for a GPU without one
  cost = cost[0] if isinstance(cost, list) else cost
  entry = dict(entry, bytes_per_chip=planned_bytes(compiled),
               argument_bytes=int(memory.argument_size_in_bytes),
               temp_bytes=int(memory.temp_size_in_bytes))
  if model_flops:
    entry.update(model_flops_per_chip=model_flops)
  if cost:
    entry.update(flops_per_chip=float(cost.get("flops", 0.0)),
                 bytes_accessed_per_chip=float(cost.get("bytes accessed", 0.0)),
                 cost_undercounted=bool(UNDERCOUNTED.search(compiled.as_text())))
  if devices[0].device_kind in CHIPS:
    hbm, peak, bandwidth = CHIPS[devices[0].device_kind]
    entry.update(hbm_fraction=entry["bytes_per_chip"] / hbm)
    if model_flops:
      entry.update(model_compute_seconds=model_flops / peak)
    if cost:
      compute, memory_time = entry["flops_per_chip"] / peak, \
          entry["bytes_accessed_per_chip"] / bandwidth
      entry.update(roofline_seconds=max(compute, memory_time),
                   bound="compute" if compute >= memory_time else "memory")
  return entry


def compile_all(config: ml_collections.ConfigDict) -> dict:
  """Compiles the computations for config.topology; returns the report."""
  devices = target_devices(config.topology)
  with sharding.tracing_for(devices[0].platform):  # attention=auto takes the slice's kernels
    return _compile_all(config, devices)


def _compile_all(config: ml_collections.ConfigDict, devices: list) -> dict:
  mesh = sharding.make_mesh(config.mesh, devices)
  vocab = vocab_size(config)
  report = {"topology": config.topology or "local", "device_kind": devices[0].device_kind,
            "chips": len(devices), "mesh": dict(mesh.shape), "vocab_size": vocab,
            "seq_len": config.data.seq_len, "computations": []}

  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(mesh, PartitionSpec()))

  def step(name, cfg, objective, frozen=None, teacher_graphdef=None, teacher_every=0,
           model_flops=None, validated=False):
    cfg = registry.with_family(cfg, objective)
    if registry.FAMILIES[objective.kind].masked:
      cfg.model.mask_id = vocab - 1  # any id: compiling needs the shapes only
    build = dit.builder(cfg.model, vocab)
    layout = state.plan(cfg, build, mesh, teacher_every=teacher_every)
    loss = objective.build(cfg, vocab, teacher_graphdef)
    # the attention kernel of the family's settings (AR: no soft cap; the JVP objectives:
    # plain), which may not be the config's
    attention = dit.attention_path(cfg.model.attention, cfg.model.attn_softcap,
                                   cfg.data.seq_len, cfg.model.width // cfg.model.heads,
                                   cfg.model.get("causal", False),
                                   flash.Tiles.parse(cfg.model.flash_tiles))
    report.setdefault("attention", attention)  # the train step's
    report["computations"].append(_report(*_compiled(
        name, cfg.batch_size, attention,
        lambda: state.compile_step(layout, loss, cfg, frozen)), devices, model_flops))
    if validated:  # the objective without dropout on the EMA weights, as hooks.Validation
      metrics = hooks.validation_metrics(
          objective.build(cfg, vocab, teacher_graphdef, train=False), layout.graphdef, mesh)
      report["computations"].append(_report(*_compiled(
          "validation", cfg.batch_size, attention, lambda: metrics.lower(
              layout.abstract_state["ema"],
              state.abstract_batch(layout, cfg.batch_size, cfg.data.seq_len), rng,
              frozen).compile()), devices))
    return layout

  # the model FLOPs of the train step (forward and backward passes of each token), per chip
  train = registry.OBJECTIVES[config.family]
  tokens = config.batch_size * config.data.seq_len / len(devices)
  step("train step", config, train, validated=True, model_flops=train.passes * tokens *
       dit.training_flops_per_token(config.model, vocab, config.data.seq_len))
  objective = registry.OBJECTIVES[config.distill.objective]
  student = distill.student_config(config)
  if objective.teacher != config.family:  # no distillation of this family's teacher
    return report
  if objective.self_teacher:  # Duo's DCD: the student holds its own teacher
    step("distill step", student, objective,
         teacher_every=student.distill.dcd.round_steps)
    return report
  teacher_graphdef, teacher_abstract = state.param_layout(dit.builder(
      distill.teacher_model(registry.with_family(student, objective)), vocab), mesh)
  layout = step("distill step", student, objective, teacher_abstract, teacher_graphdef)
  # at least one sample per data-parallel device, so that the sampler is split like a batch
  parallel = sharding.data_parallel_size(mesh)
  num = -(-config.sample.num_samples // parallel) * parallel
  grid = sampling.flow_map_grid(vocab, 1, 0.0)
  report["computations"].append(_report(*_compiled(
      "one-step sampler", num, report["computations"][-1]["attention"],
      lambda: sampling.tokens.lower(
          layout.graphdef, layout.abstract_state["ema"], rng, grid, rule=sampling.FLOW_MAP,
          batch_size=num, seq_len=config.data.seq_len, latent=config.noise == "latent",
          mesh=mesh).compile()), devices))
  return report


def compile_mode(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """`--mode=compile`: prints the per-chip memory and FLOPs table, writes compile.json."""
  path = outputs.create_workdir(workdir)
  report = compile_all(config)
  mesh = ", ".join(f"{k} {v}" for k, v in report["mesh"].items())
  lines = [f"compiled for {report['topology']}: {report['chips']} x {report['device_kind']}, "
           f"mesh {mesh}, V {report['vocab_size']}, L {report['seq_len']}, attention "
           f"{report['attention']}",
           "| computation | batch | memory per chip | of HBM | GFLOPs per chip | "
           "GB accessed per chip | roofline step | model GFLOPs per chip | at peak |",
           "|---|---|---|---|---|---|---|---|---|"]
  for c in report["computations"]:
    name = (c["computation"] if c["attention"] == report["attention"]
            else f"{c['computation']} (attention {c['attention']})")
    if "error" in c:
      lines.append(f"| {name} | {c['batch']} | does not fit: {c['error']} | | | | | | |")
      continue
    fraction = f"{c['hbm_fraction']:.0%}" if "hbm_fraction" in c else "-"
    mark = "*" if c.get("cost_undercounted") else ""
    seconds = (f"{c['roofline_seconds'] * 1e3:,.1f} ms ({c['bound']}){mark}"
               if "roofline_seconds" in c else "-")
    flops, accessed = ((f"{c['flops_per_chip'] / 1e9:,.0f}{mark}",
                        f"{c['bytes_accessed_per_chip'] / 1e9:,.1f}{mark}")
                       if "flops_per_chip" in c else ("-", "-"))
    model = (f"{c['model_flops_per_chip'] / 1e9:,.0f}" if "model_flops_per_chip" in c
             else "-")
    at_peak = (f"{c['model_compute_seconds'] * 1e3:,.1f} ms" if "model_compute_seconds" in c
               else "-")
    lines.append(f"| {name} | {c['batch']} | {c['bytes_per_chip'] / GIB:.2f} GiB "
                 f"| {fraction} | {flops} | {accessed} | {seconds} | {model} | "
                 f"{at_peak} |")
  if any(c.get("cost_undercounted") for c in report["computations"]):
    lines.append("* XLA counts a loop's body once and nothing inside a Pallas kernel: "
                 "a lower bound. The model's FLOPs (train step) are counted in full.")
  outputs.say("\n".join(lines))
  if jax.process_index() == 0:
    outputs.write_json(path / "compile.json", report)
  return report
