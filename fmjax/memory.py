"""A memory planner: per-device bytes of a training step before anything is compiled.

Shape key: B global batch, b per-device micro-batch, T length, D width, F MLP width,
N heads, L layers, V vocab.

  params + optimizer state (AdamW: 2 x params) + gradients   from the abstract params and
                                                              their shardings (exact); with a
                                                              frozen base (LoRA) optimizer and
                                                              gradients count trained params only
  + activations kept for the backward pass                   per layer and token, by remat
                                                              policy (counted below)
  + the logits and their gradient                            1.5 x b x T x V float32

Activation elements kept per token, fitted to XLA's buffer assignment for the block
fmjax.transformer writes (pre-/post-LN, GELU MLP) over 35 GPT shapes (widths 128-256, lengths
64-1024, vocabularies 512-4096, 2-4 layers; the plan is 0.89-1.27 of XLA's total there) and
checked on others (tests/test_memory.py: MLP ratios 3 and 4, 2-8 heads, widths to 384,
lengths to 2048, fsdp and data x tensor meshes: within 0.8-1.3). A = N T is the attention
scores and probabilities of the `xla` kernel (0 for the flash kernels `chunked`, `splash` and
`cudnn`, which keep O(T) statistics); a full layer is 12 D + 3 F (norms, q k v, attention and
MLP outputs, residuals):
  none, layers in a Python loop   12 D + 3 F + A per layer
  none, nn.scan over layers       22 D + 3 F + 2 A per layer: scan also stacks each layer's
                                  residuals and carries
  dots                            D + F + A per layer, plus one layer rebuilt in full
  dots_no_batch                   D + F per layer (matmul outputs without a batch dimension),
                                  plus one layer rebuilt in full (12 D + 3 F + 1.5 A)
  full                            D per layer (its input), plus one layer rebuilt in full
  and, whatever the policy, 12 D outside the layers (embeddings, the final norm, their
  gradients), and 4 N T for `chunked` when T fits one chunk (its one block is a T x T one).
With grouped-query attention or a head width other than D / N (Llama, Qwen, Gemma: queries
N H wide, keys and values K H), a full layer's queries and attention output count N H and
its keys and values K H each instead of D.
(Remat only changes memory under nn.scan: with a Python loop XLA keeps every activation
whatever the policy, so the plan assumes Runtime.scan_layers for remat policies.)
Activations are split over the batch axes (data x fsdp) and their head/MLP parts over
`tensor`. `plan` returns the fitting (policy, accumulation steps) of least relative step
time, modelled as the recomputation factor (none 1, dots_no_batch 1.15, full 1.33: one more
forward) times 1 + 0.1 log2(accum_steps) for the smaller micro-batches.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import numpy as np

from fmjax.sharding import batch_shards, tensor_shards

POLICIES = {"none": 1.0, "dots_no_batch": 1.15, "full": 1.33}  # relative step time
FLASH_KERNELS = ("chunked", "splash", "cudnn")  # attention kernels that keep no T x S scores
CHUNK = 512  # fmjax.attention's default chunk_size for "chunked"
GiB = 1024 ** 3
HOST_FRACTION = 0.8  # of a host's free RAM that CPU devices plan with (device_memory_bytes)


@dataclasses.dataclass(frozen=True)
class Shape:
  """What the activation count needs to know about a Transformer training step."""
  num_layers: int
  embed_dim: int
  mlp_dim: int
  num_heads: int
  vocab_size: int
  seq_len: int
  batch_size: int  # global
  num_kv_heads: int | None = None  # K; None: num_heads
  head_dim: int | None = None  # H; None: embed_dim // num_heads
  compute_bytes: int = 4  # bytes per activation element (2 for bfloat16)
  attention_impl: str = "xla"  # the kernel that runs ("auto" resolved as fmjax.attention does)
  scan_layers: bool = True
  logit_positions: int | None = None  # rows that reach the vocabulary (BERT: the masked ones)


@dataclasses.dataclass(frozen=True)
class Plan:
  """A training step's per-device memory, by part, under one remat policy and accumulation.

  Attributes:
    remat_policy: "none", "dots", "dots_no_batch" or "full".
    accum_steps: gradient accumulation steps (micro-batches per step).
    params: bytes per device of the parameters.
    optimizer: bytes per device of the optimizer state.
    gradients: bytes per device of the gradients.
    activations: bytes per device of the saved activations and the logits.
    budget: the bytes per device available.
  """
  remat_policy: str
  accum_steps: int
  params: int  # bytes per device
  optimizer: int
  gradients: int
  activations: int
  budget: int

  @property
  def total(self) -> int:
    """The bytes per device of the whole step: params + optimizer + gradients + activations."""
    return self.params + self.optimizer + self.gradients + self.activations

  @property
  def fits(self) -> bool:
    """Whether `total` is within `budget`."""
    return self.total <= self.budget

  def describe(self) -> str:
    """The plan as one line for a log.

    Returns:
      "memory plan per device: params ... + optimizer ... + gradients ... + activations ...
      (remat ..., accum_steps ...) = ... of a ... budget".
    """
    g = human
    return (f"memory plan per device: params {g(self.params)} + optimizer {g(self.optimizer)} + "
            f"gradients {g(self.gradients)} + activations {g(self.activations)} "
            f"(remat {self.remat_policy!r}, accum_steps {self.accum_steps}) = {g(self.total)} "
            f"of a {g(self.budget)} budget")


def human(n: float) -> str:
  """A byte count as a short string: "1.5 GiB", or MiB below 1 GiB.

  Args:
    n: a number of bytes.

  Returns:
    The count in GiB (3 significant digits) when >= 1 GiB, else in MiB.
  """
  return f"{n / GiB:.3g} GiB" if n >= GiB else f"{n / 1024 ** 2:.3g} MiB"


def sharded_bytes(abstract_tree, shardings) -> int:
  """Bytes per device of a tree of ShapeDtypeStructs laid out by NamedShardings.

  Args:
    abstract_tree: pytree of objects with `.shape` and `.dtype` (e.g. jax.ShapeDtypeStruct).
    shardings: pytree of NamedSharding with the same leaves, in the same order.

  Returns:
    The sum over leaves of ceil(elements / shards) * itemsize, shards being the product of
    the mesh axis sizes in the leaf's PartitionSpec.
  """
  total = 0
  for leaf, sharding in zip(jax.tree_util.tree_leaves(abstract_tree),
                            jax.tree_util.tree_leaves(shardings)):
    split = 1
    for axes in sharding.spec:
      for axis in (axes if isinstance(axes, tuple) else (axes,)):
        if axis is not None:
          split *= sharding.mesh.shape[axis]
    total += math.ceil(int(np.prod(leaf.shape)) / split) * np.dtype(leaf.dtype).itemsize
  return total


def activation_elements_per_token(s: Shape, policy: str) -> float:
  """Elements of saved activations per token over all layers (see the module docstring).

  Args:
    s: the step's Shape.
    policy: the remat policy: "none", "dots", "dots_no_batch" or "full".

  Returns:
    Elements per token, summed over the L layers (plus the one layer rebuilt in full for a
    remat policy), before the tensor split.
  """
  d, f, l = s.embed_dim, s.mlp_dim, s.num_layers
  a = 0 if s.attention_impl in FLASH_KERNELS else s.num_heads * s.seq_len
  h = s.head_dim or d // s.num_heads
  q, kv = s.num_heads * h, (s.num_kv_heads or s.num_heads) * h
  qkv = 2 * (q - d) + 2 * (kv - d)  # queries, attention output, keys, values not D wide
  layer = 12 * d + 3 * f + qkv  # one layer's activations, attention scores apart
  outside = 12 * d  # embeddings, the final norm, and their gradients
  if s.attention_impl == "chunked" and s.seq_len <= CHUNK:  # one block: one layer's (N, T, T)
    outside += 4 * s.num_heads * s.seq_len  # scores, forward and backward
  if policy == "none":
    return l * ((layer + 10 * d + 2 * a) if s.scan_layers else (layer + a)) + outside
  rebuilt = layer + 1.5 * a  # the one layer whose backward pass is running
  kept = {"dots": d + f + a, "dots_no_batch": d + f, "full": d}[policy]
  return l * kept + rebuilt + outside


def activation_bytes(s: Shape, policy: str, accum_steps: int, mesh_shape: dict) -> int:
  """Per-device bytes of saved activations and logits for one micro-batch.

  Args:
    s: the step's Shape.
    policy: the remat policy: "none", "dots", "dots_no_batch" or "full".
    accum_steps: gradient accumulation steps; the micro-batch is b = B / batch shards /
      accum_steps (rounded up).
    mesh_shape: {mesh axis: size}, for the batch (data x fsdp) and tensor splits.

  Returns:
    b * T * elements per token * compute_bytes / tensor, plus 3 float32 (b, T or
    logit_positions, V) logit-sized buffers / tensor.

  Raises:
    ValueError: a remat policy without an activation model.
  """
  if policy not in ("none", "dots", "dots_no_batch", "full"):
    raise ValueError(f"remat policy {policy!r} has no activation model; choose one of "
                     f"{[*POLICIES, 'dots']}")
  batch_split = batch_shards(mesh_shape)
  tensor = tensor_shards(mesh_shape)
  micro = math.ceil(s.batch_size / batch_split / accum_steps)  # b
  tokens = micro * s.seq_len
  layers = activation_elements_per_token(s, policy) / tensor
  rows = micro * (s.logit_positions if s.logit_positions is not None else s.seq_len)
  logits = 1.5 * rows * s.vocab_size * 4 / tensor  # float32 logits and their gradient, fused
  return int(tokens * layers * s.compute_bytes + logits)


def mesh_shape_of(shardings) -> dict:
  """{axis: size} of the mesh the NamedShardings of a tree are laid out on.

  Args:
    shardings: pytree of NamedSharding, all on one mesh.

  Returns:
    Dict of mesh axis name -> size.

  Raises:
    ValueError: the shardings are not NamedShardings on exactly one mesh.
  """
  meshes = {tuple(s.mesh.shape.items()) for s in jax.tree_util.tree_leaves(shardings)
            if hasattr(s, "mesh")}
  if len(meshes) != 1:
    raise ValueError(f"param_shardings must be NamedShardings on one mesh (found "
                     f"{len(meshes)} meshes); pass sharding.shardings_of(...)'s params")
  return dict(meshes.pop())


def device_memory_bytes() -> int:
  """What the first local device reports (TPU/GPU), else HOST_FRACTION of this host's free
  RAM per local device.

  CPU devices share the host's RAM with everything else running there, so their budget is
  what the host can still give (MemAvailable of /proc/meminfo, where there is one), not its
  size. And only HOST_FRACTION of it: the plan can be 20% under XLA's own count, the process
  needs memory besides the step (data, compiling), and a host that runs out swaps or kills
  the process where an accelerator's allocator fails cleanly.

  Returns:
    The device's memory_stats()["bytes_limit"], or HOST_FRACTION * available (else
    physical) RAM / local device count.
  """
  stats = getattr(jax.local_devices()[0], "memory_stats", lambda: None)()
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  return int(HOST_FRACTION * host_available_bytes()) // jax.local_device_count()


def host_available_bytes() -> int:
  """This host's RAM available to a new allocation: MemAvailable (Linux), else physical RAM.

  Returns:
    Bytes.
  """
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024  # kB
  except (OSError, ValueError, IndexError):
    pass
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def trained_bytes(abstract_params, param_shardings, trainable=None) -> int:
  """Bytes per device of the trained parameters (those with gradients and optimizer state).

  Args:
    abstract_params: pytree of ShapeDtypeStruct, the parameters.
    param_shardings: pytree of NamedSharding, their layout.
    trainable: a tree of bools like the params (fmjax.lora.trainable_mask), or None: all.

  Returns:
    sharded_bytes of the leaves where trainable is True.
  """
  if trainable is None:
    return sharded_bytes(abstract_params, param_shardings)
  keep = [bool(m) for m in jax.tree_util.tree_leaves(trainable)]
  pick = lambda tree: [x for m, x in zip(keep, jax.tree_util.tree_leaves(tree)) if m]
  return sharded_bytes(pick(abstract_params), pick(param_shardings))


def estimate(abstract_params, param_shardings, s: Shape, *, remat_policy: str,
             accum_steps: int, budget: int | None = None, optimizer_copies: int = 2,
             trainable=None) -> Plan:
  """The per-device bytes of one training step with this remat policy and accumulation.

  The mesh (the batch and tensor splits of the activations) is the one of `param_shardings`.

  Args:
    abstract_params: pytree of ShapeDtypeStruct, the parameters.
    param_shardings: pytree of NamedSharding, the parameters' layout (one mesh).
    s: the step's Shape.
    remat_policy: "none", "dots", "dots_no_batch" or "full".
    accum_steps: gradient accumulation steps.
    budget: bytes per device available; None: `device_memory_bytes()`.
    optimizer_copies: optimizer state size in parameter copies (AdamW: 2).
    trainable: a tree of bools like the params: only those leaves have gradients and
      optimizer state (a frozen base, fmjax.lora); None: all.

  Returns:
    The Plan (gradients counted as one copy of the trained parameters).
  """
  mesh_shape = mesh_shape_of(param_shardings)
  params = sharded_bytes(abstract_params, param_shardings)
  trained = trained_bytes(abstract_params, param_shardings, trainable)
  return Plan(remat_policy, accum_steps, params=params, optimizer=optimizer_copies * trained,
              gradients=trained,
              activations=activation_bytes(s, remat_policy, accum_steps, mesh_shape),
              budget=device_memory_bytes() if budget is None else budget)


def plan(abstract_params, param_shardings, s: Shape, *, budget: int | None = None,
         max_accum_steps: int = 64, trainable=None) -> Plan:
  """The cheapest (remat policy, accumulation steps) that fits `budget` bytes per device.

  Candidates are the policies of POLICIES with every accumulation count dividing the
  per-device batch, ordered by modelled step time (module docstring).

  Args:
    abstract_params: pytree of ShapeDtypeStruct, the parameters.
    param_shardings: pytree of NamedSharding, the parameters' layout (one mesh).
    s: the step's Shape.
    budget: bytes per device available; None: `device_memory_bytes()`.
    max_accum_steps: the most accumulation steps tried.
    trainable: a tree of bools like the params (see `estimate`), or None: all trained.

  Returns:
    The first Plan that fits.

  Raises:
    MemoryError: naming the smallest plan, when nothing fits.
  """
  fitting, smallest = search(abstract_params, param_shardings, s, budget=budget,
                             max_accum_steps=max_accum_steps, trainable=trainable)
  if fitting is not None:
    return fitting
  raise MemoryError(
      f"nothing fits: the smallest plan needs {human(smallest.total)} per device "
      f"({smallest.describe()}). Shard the parameters over more devices (a larger fsdp "
      "mesh axis), a smaller batch or sequence, Runtime(attention_impl='chunked') or a "
      "bfloat16 compute dtype")


def search(abstract_params, param_shardings, s: Shape, *, budget: int | None = None,
           max_accum_steps: int = 64, trainable=None) -> tuple[Plan | None, Plan]:
  """`plan`'s search: the cheapest fitting plan, and the smallest plan of all.

  Args:
    abstract_params: pytree of ShapeDtypeStruct, the parameters.
    param_shardings: pytree of NamedSharding, the parameters' layout (one mesh).
    s: the step's Shape.
    budget: bytes per device available; None: `device_memory_bytes()`.
    max_accum_steps: the most accumulation steps tried.
    trainable: a tree of bools like the params (see `estimate`), or None: all trained.

  Returns:
    (the first Plan that fits in modelled step time order, or None when none does; the Plan
    of fewest bytes).
  """
  mesh_shape = mesh_shape_of(param_shardings)
  budget = device_memory_bytes() if budget is None else budget
  params = sharded_bytes(abstract_params, param_shardings)  # once: the same for every candidate
  trained = trained_bytes(abstract_params, param_shardings, trainable)
  per_device = max(1, s.batch_size // batch_shards(mesh_shape))
  accums = [a for a in range(1, min(per_device, max_accum_steps) + 1) if per_device % a == 0]
  candidates = sorted(((factor * (1 + 0.1 * math.log2(a)), policy, a)
                       for policy, factor in POLICIES.items() for a in accums))
  plans = [Plan(policy, accum, params=params, optimizer=2 * trained, gradients=trained,
                activations=activation_bytes(s, policy, accum, mesh_shape), budget=budget)
           for _, policy, accum in candidates]
  return next((p for p in plans if p.fits), None), min(plans, key=lambda p: p.total)
