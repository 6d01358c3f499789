"""The one place that knows mesh axis names: meshes, rule sets and sharded initialisation.

Models name *logical* axes on parameters and activations; a rule set below maps each
logical name onto mesh axes. Changing a parallelism strategy means picking another rule
set, never touching a model.

Mesh axes:  data (pure data parallel), fsdp (data parallel + parameter/optimizer sharding,
ZeRO-3 style), tensor (Megatron-style model parallel over heads and MLP width).

Logical axes (params):      vocab, embed, mlp, heads, kv_heads, head_dim, layers
Logical axes (activations): batch, length, act_embed, act_heads, act_mlp
"""

import contextlib
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # the batch is split over every data-parallel axis

_activations = [("batch", BATCH), ("length", None), ("act_embed", None)]

RULES: dict[str, list[tuple[str, Any]]] = {
    # Replicated parameters, batch split across all devices.
    "dp": _activations + [("act_heads", None), ("act_mlp", None)],
    # Parameters and optimizer state sharded along their width over `fsdp`, gathered per layer.
    "fsdp": _activations + [("act_heads", None), ("act_mlp", None), ("embed", "fsdp")],
    # FSDP on width plus tensor parallelism over heads, MLP width and vocabulary.
    "fsdp_tp": _activations + [
        ("act_heads", "tensor"), ("act_mlp", "tensor"), ("embed", "fsdp"),
        ("mlp", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"), ("vocab", "tensor")],
}


def get_rules(name: str):
  if name not in RULES:
    raise ValueError(f"unknown sharding rule set {name!r}; choose from {sorted(RULES)} "
                     "(config.sharding)")
  return RULES[name]


def make_mesh(sizes: Mapping[str, int], devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one size may be -1 to take the remaining devices.

  Args:
    sizes: {"data": int, "fsdp": int, "tensor": int} (e.g. config.mesh).
    devices: defaults to all of jax.devices().
  """
  given = devices
  devices = jax.devices() if devices is None else list(devices)
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)} in config.mesh; axes are {MESH_AXES}")
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
  if shape.count(-1) > 1:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, shape))}: at most one size may be -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"config.mesh {dict(zip(MESH_AXES, shape))} cannot fill {len(devices)} "
                       f"devices: {len(devices)} is not a multiple of {known}")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(
        f"config.mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices but "
        f"{len(devices)} are available ({devices[0].platform}); set the sizes so their product "
        f"is {len(devices)}, or use -1 for one axis, e.g. --config.mesh.data=-1")
  # mesh_utils orders devices by the physical interconnect on TPU slices.
  if given is None:  # mesh_utils orders devices by the physical interconnect on TPU slices.
    return Mesh(mesh_utils.create_device_mesh(shape), MESH_AXES)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_mesh(logical_specs, rules):
  """Pytree of logical PartitionSpecs -> pytree of mesh PartitionSpecs."""
  return nn.logical_to_mesh(logical_specs, rules)


def logical_specs(abstract_tree):
  """Logical PartitionSpecs of a (possibly abstract) pytree of nn.LogicallyPartitioned boxes."""
  return nn.get_partition_spec(abstract_tree)


def check_divisible(abstract_tree, mesh: Mesh, rules) -> None:
  """Pre-flight check: every sharded dimension divides the product of its mesh axes.

  Raises ValueError naming the parameter path, its shape, the mesh and the rule involved,
  before anything is compiled or allocated.
  """
  specs = logical_to_mesh(logical_specs(abstract_tree), rules)
  shapes = nn.meta.unbox(abstract_tree)
  flat_specs = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))
  flat_shapes = jax.tree_util.tree_leaves(shapes)
  for (path, spec), leaf in zip(flat_specs, flat_shapes):
    for dim, axes in zip(leaf.shape, spec):
      axes = (axes,) if isinstance(axes, str) else (axes or ())
      size = math.prod(mesh.shape[a] for a in axes)
      if dim % size:
        raise ValueError(
            f"cannot shard {jax.tree_util.keystr(path)} with shape {tuple(leaf.shape)}: "
            f"dimension {dim} is split over mesh axes {axes} of total size {size} "
            f"(mesh {dict(mesh.shape)}), and {dim} % {size} != 0. Choose a mesh whose "
            f"{'x'.join(axes)} size divides {dim}, another config.sharding, or change the model size")


def shardings_of(abstract_tree, mesh: Mesh, rules):
  """NamedShardings for a pytree of boxed (logically partitioned) values."""
  return nn.logical_to_mesh_sharding(logical_specs(abstract_tree), mesh, rules)


def sharded_init(init_fn: Callable, mesh: Mesh, rules, *args):
  """Runs `init_fn(*args)` directly into its shardings.

  init_fn returns a pytree with nn.LogicallyPartitioned leaves (flax params, optax states
  built from them, scalars). jax.eval_shape finds the shapes without allocating, the rules
  turn logical names into NamedShardings, the divisibility check runs, and the jitted
  init writes each shard on its own device: full-size parameters never exist on one device.

  Returns:
    (tree of plain arrays, tree of NamedShardings) with the same structure.
  """
  abstract = jax.eval_shape(init_fn, *args)
  check_divisible(abstract, mesh, rules)
  shardings = shardings_of(abstract, mesh, rules)
  with context(mesh, rules):
    tree = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)(*args)
  return tree, shardings


@contextlib.contextmanager
def context(mesh: Mesh, rules):
  """Mesh + logical rules in scope, so nn.with_logical_constraint inside models resolves."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over (data, fsdp); any other dims replicated."""
  return NamedSharding(mesh, P(BATCH))


def shard_batch(batch, mesh: Mesh):
  """Host-local numpy batch (this process's rows) -> global jax.Arrays sharded over the batch.

  Each process passes only the rows it read; the global batch is their concatenation in
  process order (see fmjax.data's per-host iterators).
  """
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh), x)
  return jax.tree_util.tree_map(put, batch)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def describe(abstract_tree, rules) -> list[tuple[str, tuple, tuple, str]]:
  """Rows of (param path, shape, logical axes, mesh PartitionSpec): the golden sharding table."""
  logical = logical_specs(abstract_tree)
  mesh_specs = logical_to_mesh(logical, rules)
  is_spec = lambda x: isinstance(x, P)
  rows = []
  for (path, lspec), mspec, leaf in zip(
      jax.tree_util.tree_leaves_with_path(logical, is_leaf=is_spec),
      jax.tree_util.tree_leaves(mesh_specs, is_leaf=is_spec),
      jax.tree_util.tree_leaves(nn.meta.unbox(abstract_tree))):
    name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    rows.append((name, tuple(leaf.shape), tuple(lspec), str(mspec)))
  return rows
