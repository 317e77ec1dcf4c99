"""Device mesh and partition rules: one code path from one CPU to a pod.

The mesh has axes (data, fsdp, tensor); sizes come from `config.mesh`, and one size of -1
takes the devices left over. Batches are split over (data, fsdp). Parameters carry logical
axis names (flmjax/models/dit.py) that RULES maps to mesh axes: with fsdp > 1 the
parameters, optimizer state and EMA are sharded over `fsdp` (ZeRO-3 style, gathered by
XLA where used); `tensor` splits heads, MLP and vocabulary. A dimension that a mesh axis
does not divide is kept whole rather than padded, and said (state.param_layout).
"""

import contextlib
import math

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec
import ml_collections

from flmjax.errors import UsageError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
RULES = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    "cond": None,
    "freq": None,
}


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """jax.distributed.initialize() when the config asks for a multi-process run (before
  anything touches the devices); the cluster (TPU pod, SLURM, coordinator variables) is
  discovered by JAX itself."""
  if config.distributed and not jax.distributed.is_initialized():
    try:
      jax.distributed.initialize()
    except ValueError as e:  # JAX found no cluster to say where the coordinator is
      raise UsageError(f"distributed=True, but JAX found no multi-process cluster ({e}): run "
                       "in a TPU pod, under SLURM or Open MPI (launch/), where JAX finds it; "
                       "in one process set distributed=False.") from None


def mesh_shape(cfg: ml_collections.ConfigDict, device_count: int) -> tuple[int, ...]:
  """Sizes of (data, fsdp, tensor) from `config.mesh`, with one -1 filled in."""
  sizes = [cfg[axis] for axis in AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise UsageError(f"mesh {dict(zip(AXES, sizes))}: sizes must be positive, with at most "
                     "one -1 (which takes the remaining devices).")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if device_count % known:
      raise UsageError(f"mesh {dict(zip(AXES, sizes))}: {device_count} devices are not a "
                       f"multiple of {known}.")
    sizes[sizes.index(-1)] = device_count // known
  if math.prod(sizes) != device_count:
    raise UsageError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"but {device_count} are present; set one of config.mesh.* to -1.")
  return tuple(sizes)


def make_mesh(cfg: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh(mesh_shape(cfg, len(devices)), AXES, devices=devices,
                       axis_types=(AxisType.Auto,) * len(AXES))


def tracing_under(mesh: jax.sharding.Mesh | None):
  """A context in which traced code sees `mesh` (for models/dit.split_batch and bare
  PartitionSpec constraints); nothing when mesh is None."""
  if mesh is None:
    return contextlib.nullcontext()
  return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


_platforms = [None]  # None: the default backend's (see tracing_for)


@contextlib.contextmanager
def tracing_for(platform: str):
  """Traces for `platform` rather than the default backend: the attention kernels
  (models/dit.attention_path) and the output head's layout (flow.head_cross_entropy) are
  those of its devices (compile mode, compiling for a TPU slice or a GPU on a CPU)."""
  _platforms.append(platform)
  try:
    yield
  finally:
    _platforms.pop()


def target_platform() -> str:
  """The platform traced for: tracing_for's, else the default backend's."""
  return _platforms[-1] or jax.default_backend()


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Rows over (data, fsdp), everything else whole."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def row_shards(batch: int) -> int:
  """The parts that the rows of a batch of `batch` are split into on the mesh the caller
  traces under (tracing_under): its data-parallel size where that divides the batch, else
  1, as without a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return 1
  parallel = data_parallel_size(mesh)
  return parallel if batch % parallel == 0 else 1


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def kept_whole(names, shape, mesh: jax.sharding.Mesh) -> set[str]:
  """The dimensions, as "NAME SIZE", that logical_sharding keeps whole because their mesh
  axis of more than one device does not divide them."""
  return {f"{name} {size}" for name, size in zip(names or (), shape)
          if RULES.get(name) and size % mesh.shape[RULES[name]]}


def logical_sharding(names, shape, mesh: jax.sharding.Mesh) -> NamedSharding:
  """A NamedSharding for an array of `shape` whose axes have logical `names`."""
  used, spec = set(), []
  for name, size in zip(names or (None,) * len(shape), shape):
    axis = RULES.get(name) if name else None
    if axis is None or axis in used or size % mesh.shape[axis]:
      spec.append(None)
    else:
      spec.append(axis)
      used.add(axis)
  return NamedSharding(mesh, PartitionSpec(*spec))
