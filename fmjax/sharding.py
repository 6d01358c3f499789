"""The one place that knows mesh axis names: meshes, rule sets and sharded initialisation.

Models name *logical* axes on parameters and activations; a rule set below maps each
logical name onto mesh axes. Changing a parallelism strategy means picking another rule
set, never touching a model.

Mesh axes:  data (pure data parallel), fsdp (data parallel + parameter/optimizer sharding,
ZeRO-3 style), tensor (Megatron-style model parallel over heads and MLP width).

Logical axes (params):      vocab, embed, mlp, heads, kv_heads, head_dim, layers
Logical axes (activations): batch, length, act_embed, act_heads, act_mlp

Every function taking `rules` accepts a rule-set name of RULES ("dp", "fsdp", "fsdp_tp") or
a rule list of (logical axis, mesh axes) pairs (see `get_rules`). Code elsewhere asks this
module how a mesh splits the batch (`batch_shards`) rather than naming mesh axes itself.
"""

import contextlib
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fmjax.errors import ArgumentError

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


Rules = str | list[tuple[str, Any]]  # a name of RULES, or the rule list itself


def get_rules(rules: Rules) -> list[tuple[str, Any]]:
  """The rule list of a rule-set name, or a rule list checked and returned as a list.

  Args:
    rules: a name of RULES ("dp", "fsdp", "fsdp_tp"), or (logical axis, mesh axes) pairs
      (or a {logical axis: mesh axes} dict) where mesh axes is None, a mesh axis name or a
      tuple of them.
  Returns:
    [(logical axis, mesh axes), ...], as flax's logical partitioning takes them.
  Raises:
    ArgumentError: an unknown name (the message lists the names), or a malformed list.
  """
  if isinstance(rules, str):
    if rules not in RULES:
      raise ArgumentError(f"unknown sharding rule set {rules!r}; choose from {sorted(RULES)}, "
                          "or pass a list of (logical axis, mesh axes) pairs",
                          function="get_rules", argument="rules")
    return RULES[rules]
  if isinstance(rules, Mapping):
    rules = list(rules.items())
  is_axes = lambda a: a is None or isinstance(a, str) or (
      isinstance(a, tuple) and all(isinstance(x, str) for x in a))
  try:
    pairs = [tuple(pair) for pair in rules]
  except TypeError:
    pairs = None
  bad = ([] if pairs is None else
         [p for p in pairs if len(p) != 2 or not isinstance(p[0], str) or not is_axes(p[1])])
  if pairs is None or bad:
    raise ArgumentError(
        f"rules={rules!r} is neither a rule-set name {sorted(RULES)} nor a list of (logical "
        f"axis, mesh axes) pairs{f'; bad pair {bad[0]!r}' if bad else ''}",
        function="get_rules", argument="rules")
  return pairs


def make_mesh(sizes: Mapping[str, int], devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one size may be -1 to take the remaining devices.

  Args:
    sizes: {"data": int, "fsdp": int, "tensor": int} (e.g. config.mesh); a missing axis has
      size 1, so `make_mesh({}, devices=jax.devices()[:1])` is a one-device mesh.
    devices: the devices to arrange, in order; defaults to all of jax.devices(), ordered by
      the physical interconnect (mesh_utils) on TPU slices.

  Returns:
    A Mesh with axes ("data", "fsdp", "tensor") of the given sizes.

  Raises:
    ArgumentError: (argument "sizes") unknown axes, or sizes that do not use the devices.
  """
  given = devices
  devices = jax.devices() if devices is None else list(devices)
  error = lambda message: ArgumentError(message, function="make_mesh", argument="sizes")
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise error(f"unknown mesh axes {sorted(unknown)} in sizes={dict(sizes)}; axes are "
                f"{MESH_AXES}")
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
  if shape.count(-1) > 1:
    raise error(f"the mesh {dict(zip(MESH_AXES, shape))}: at most one size may be -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise error(f"the mesh {dict(zip(MESH_AXES, shape))} cannot fill {len(devices)} "
                  f"devices: {len(devices)} is not a multiple of {known}")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    example = {**dict(zip(MESH_AXES, shape)), MESH_AXES[0]: -1}
    fits = len(devices) % math.prod(shape[1:]) == 0
    raise error(
        f"the mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices but "
        f"{len(devices)} are available ({devices[0].platform}); give sizes whose product is "
        f"{len(devices)}, or -1 for one axis to take the remaining devices"
        + (f", e.g. {example}" if fits else ""))
  # mesh_utils orders devices by the physical interconnect on TPU slices.
  if given is None:  # mesh_utils orders devices by the physical interconnect on TPU slices.
    return Mesh(mesh_utils.create_device_mesh(shape), MESH_AXES)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_mesh(logical_specs, rules: Rules):
  """Pytree of logical PartitionSpecs -> pytree of mesh PartitionSpecs.

  Args:
    logical_specs: a pytree of PartitionSpecs of logical axis names, e.g. from `logical_specs`.
    rules: a rule-set name of RULES or a rule list (see `get_rules`).

  Returns:
    The same pytree with each logical name replaced by its mesh axes (None: replicated).
  """
  return nn.logical_to_mesh(logical_specs, get_rules(rules))


def logical_specs(abstract_tree):
  """Logical PartitionSpecs of a (possibly abstract) pytree of nn.LogicallyPartitioned boxes.

  Args:
    abstract_tree: flax variables or an optimizer state whose leaves are
      nn.LogicallyPartitioned (arrays or jax.ShapeDtypeStructs, e.g. from jax.eval_shape).

  Returns:
    The same pytree with a PartitionSpec of logical axis names per leaf (P() for unboxed leaves).
  """
  return nn.get_partition_spec(abstract_tree)


def check_divisible(abstract_tree, mesh: Mesh, rules: Rules) -> None:
  """Pre-flight check: every sharded dimension divides the product of its mesh axes.

  Args:
    abstract_tree: a pytree of nn.LogicallyPartitioned leaves (shapes only are read).
    mesh: the mesh to shard over.
    rules: a rule-set name of RULES or a rule list (see `get_rules`).

  Raises:
    ArgumentError: (argument "mesh") naming the parameter path, its shape, the mesh and the
      axes involved, before anything is compiled or allocated.
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
        raise ArgumentError(
            f"cannot shard {jax.tree_util.keystr(path)} with shape {tuple(leaf.shape)}: "
            f"dimension {dim} is split over mesh axes {axes} of total size {size} "
            f"(mesh {dict(mesh.shape)}), and {dim} % {size} != 0. Choose a mesh whose "
            f"{'x'.join(axes)} size divides {dim}, other rules, or change the model size",
            function="check_divisible", argument="mesh")


def shardings_of(abstract_tree, mesh: Mesh, rules: Rules):
  """NamedShardings for a pytree of boxed (logically partitioned) values.

  Args:
    abstract_tree: a pytree of nn.LogicallyPartitioned leaves (arrays or ShapeDtypeStructs).
    mesh: the mesh the shardings refer to.
    rules: a rule-set name of RULES or a rule list (see `get_rules`).

  Returns:
    The same pytree with one NamedSharding per leaf.
  """
  return nn.logical_to_mesh_sharding(logical_specs(abstract_tree), mesh, get_rules(rules))


def sharded_init(init_fn: Callable, mesh: Mesh, rules: Rules, *args):
  """Runs `init_fn(*args)` directly into its shardings.

  init_fn returns a pytree with nn.LogicallyPartitioned leaves (flax params, optax states
  built from them, scalars). jax.eval_shape finds the shapes without allocating, the rules
  turn logical names into NamedShardings, the divisibility check runs, and the jitted
  init writes each shard on its own device: full-size parameters never exist on one device.

  Args:
    init_fn: a function of `args` returning the boxed pytree, e.g.
      `lambda rng: model.init(rng, example)`.
    mesh: the mesh to place the values on.
    rules: a rule-set name of RULES or a rule list (see `get_rules`).
    *args: the arguments of init_fn (e.g. a PRNG key); passed through jax.jit.

  Returns:
    (tree of plain arrays, tree of NamedShardings) with the same structure.
  """
  rules = get_rules(rules)
  abstract = jax.eval_shape(init_fn, *args)
  check_divisible(abstract, mesh, rules)
  shardings = shardings_of(abstract, mesh, rules)
  with context(mesh, rules):
    tree = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)(*args)
  return tree, shardings


@contextlib.contextmanager
def context(mesh: Mesh, rules: Rules):
  """Mesh + logical rules in scope, so nn.with_logical_constraint inside models resolves.

  Args:
    mesh: the mesh to set (jax.set_mesh) for the body of the `with` statement.
    rules: a rule-set name of RULES or a rule list (see `get_rules`).

  Yields:
    None; on exit the previous mesh and rules are back in scope.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(get_rules(rules)):
    yield


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over (data, fsdp); any other dims replicated.

  Args:
    mesh: a mesh with the axes of MESH_AXES.

  Returns:
    NamedSharding(mesh, P(("data", "fsdp"))), for arrays (B, ...) with B divisible by
    `batch_shards(mesh)`.
  """
  return NamedSharding(mesh, P(BATCH))


def batch_shards(mesh) -> int:
  """How many pieces the batch is split into: the product of the (data, fsdp) sizes.

  Args:
    mesh: a Mesh (or AbstractMesh), or a {mesh axis: size} mapping (missing axes: size 1).

  Returns:
    data size * fsdp size, e.g. 4 for {"data": 2, "fsdp": 2, "tensor": 2}.
  """
  sizes = getattr(mesh, "shape", mesh)
  return math.prod(int(sizes.get(a, 1)) for a in BATCH)


def tensor_shards(mesh) -> int:
  """How many pieces tensor parallelism splits heads, MLP width and vocabulary into.

  Args:
    mesh: as for `batch_shards`.

  Returns:
    The "tensor" size (1 when the axis is absent).
  """
  return int(getattr(mesh, "shape", mesh).get("tensor", 1))


def process_mesh() -> Mesh:
  """A (processes, local) mesh: one row of devices per process, for reductions across processes.

  Used e.g. to ask "did any process get a stop signal?"; see `over_processes`.

  Returns:
    A Mesh of jax.devices() with shape (jax.process_count(), local device count) and axes
    ("processes", "local").
  """
  devices = np.array([[d for d in jax.devices() if d.process_index == p]
                      for p in range(jax.process_count())])
  return Mesh(devices, ("processes", "local"))


def over_processes(mesh: Mesh) -> NamedSharding:
  """The leading dim of a `process_mesh` array split over processes: one entry each.

  Args:
    mesh: a `process_mesh()`.

  Returns:
    NamedSharding(mesh, P("processes")).
  """
  return NamedSharding(mesh, P("processes"))


def shard_batch(batch, mesh: Mesh):
  """Host-local numpy batch (this process's rows) -> global jax.Arrays sharded over the batch.

  Each process passes only the rows it read; the global batch is their concatenation in
  process order (see fmjax.data's per-host iterators).

  Args:
    batch: a pytree of host arrays (B_local, ...), B_local = global B / process count.
    mesh: the mesh whose (data, fsdp) axes split the batch.

  Returns:
    The same pytree of jax.Arrays (B, ...), sharded by `batch_sharding(mesh)`, dtypes kept.
  """
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh), x)
  return jax.tree_util.tree_map(put, batch)


def replicated(mesh: Mesh) -> NamedSharding:
  """A sharding that keeps a full copy of the array on every device of `mesh`.

  Args:
    mesh: the mesh.

  Returns:
    NamedSharding(mesh, P()).
  """
  return NamedSharding(mesh, P())


def describe(abstract_tree, rules: Rules) -> list[tuple[str, tuple, tuple, str]]:
  """Rows of (param path, shape, logical axes, mesh PartitionSpec): the golden sharding table.

  Args:
    abstract_tree: a pytree of nn.LogicallyPartitioned leaves, e.g. jax.eval_shape(model.init, ...).
    rules: a rule-set name of RULES or a rule list (see `get_rules`).

  Returns:
    [(path, shape, logical axes, str(mesh PartitionSpec)), ...] in leaf order, the path
    "/"-joined, e.g. under "fsdp_tp" ("params/wte/embedding", (V, D), ("vocab", "embed"),
    "P('tensor', 'fsdp')").
  """
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
