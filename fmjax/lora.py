"""Low-rank adapters (LoRA, Hu et al. 2021) on the Dense kernels of any fmjax model.

Shape key: B batch, T length, D width, r the adapter rank.

Every fmjax model projects through the one `fmjax.layers.Dense`. LoRA puts two parameters
beside a targeted Dense's `kernel` (in..., out...):

  lora_a (in..., r)   kaiming-uniform, as PEFT initialises lora_A (bound 1 / sqrt(fan_in))
  lora_b (r, out...)  zeros, so a fresh adapter leaves the model's function unchanged

  y = x W (+ b) + (alpha / r) * dropout(x) A B

Their logical axes are the kernel's (the rank axis replicated), so the rule sets of
fmjax.sharding split them like their kernels; under nn.scan they are stacked on the "layers"
axis like every other parameter. No model is edited: inside `adapters(spec)` a flax method
interceptor adds the low-rank term to each Dense whose module path (e.g.
"blocks/layer_0/attn/query", "blocks/layers/mlp/wi" when scanned) a pattern of
`spec.targets` matches. `LoraModel(model, spec)` wraps a model so that its `init` and `apply`
run inside that context; a bare `model.apply` ignores adapters (merge them first).

  spec = LoraSpec(rank=8, alpha=16)
  lm = LoraModel(model, spec)
  params = add_adapters(model, base_params, spec, rng, tokens)   # or lm.init(...)
  logits = lm.apply({"params": params}, tokens)
  plain = merge(params, spec)                                     # == lm's function

Training: `trainable_mask(params, spec)` is True on the adapters (and on spec.modules_to_save,
e.g. a new classifier); `fmjax.training` differentiates and keeps optimizer state for those
leaves only (`Task.trainable` in fmjax.trainer).
"""

import contextlib
import dataclasses
import re
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from fmjax.layers import Dense, partitioned

ADAPTERS = ("lora_a", "lora_b")
# Attention projections (self- and cross-attention) and the MLP of every fmjax model: GPT,
# the decoder families, BERT, ViT and seq2seq all build them from fmjax.transformer.
DEFAULT_TARGETS = (r"(.*/)?(attn|cross)/(query|key|value|out)", r"(.*/)?mlp/(wi|wi_up|wo)")
# For Task.new_params / fmjax.sources: the adapters are never in a base checkpoint.
NEW_PARAMS = tuple(f"*/{name}" for name in ADAPTERS)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Which Dense layers get adapters, and their size.

  Attributes:
    rank: r, the adapters' inner width (> 0).
    alpha: the scale numerator: the low-rank term is multiplied by alpha / rank.
    dropout: dropout on the adapter's input while training (PEFT's lora_dropout).
    targets: regular expressions matched (re.fullmatch) against each Dense's module path
      ("blocks/layer_0/attn/query") or its last name ("query"); every pattern must match a
      Dense of the model.
    modules_to_save: path prefixes trained in full beside the adapters (PEFT's
      modules_to_save), e.g. ("classifier",) for a new task head.
    dtype: the adapters' parameter dtype (float32 beside a bfloat16 base works).
  """
  rank: int
  alpha: float
  dropout: float = 0.0
  targets: tuple[str, ...] = DEFAULT_TARGETS
  modules_to_save: tuple[str, ...] = ()
  dtype: str = "float32"

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
      raise ValueError(f"LoraSpec.rank={self.rank!r}: must be a positive integer")
    if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
      raise ValueError(f"LoraSpec.alpha={self.alpha!r}: must be a positive number")
    if (isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float))
        or not 0 <= self.dropout < 1):
      raise ValueError(f"LoraSpec.dropout={self.dropout!r}: must be in [0, 1)")
    for field in ("targets", "modules_to_save"):
      value = getattr(self, field)
      if isinstance(value, str) or not all(isinstance(p, str) and p for p in value):
        raise ValueError(f"LoraSpec.{field}={value!r}: must be a tuple of non-empty strings")
      object.__setattr__(self, field, tuple(value))
    if not self.targets:
      raise ValueError("LoraSpec.targets=(): give at least one pattern (default: "
                       f"{DEFAULT_TARGETS})")
    for pattern in self.targets:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"LoraSpec.targets: {pattern!r} is not a regular expression ({e})") from e

  @property
  def scale(self) -> float:
    """alpha / rank, the factor of the low-rank term."""
    return self.alpha / self.rank

  def matching(self, path: str) -> list[str]:
    """The patterns of `targets` that match a Dense's module path.

    Args:
      path: "/"-joined module path, e.g. "blocks/layer_0/attn/query".

    Returns:
      The matching patterns (empty: the Dense gets no adapter).
    """
    last = path.rsplit("/", 1)[-1]
    return [p for p in self.targets if re.fullmatch(p, path) or re.fullmatch(p, last)]


def _adapter_term(module: Dense, x, spec: LoraSpec, train: bool):
  """(alpha / r) * dropout(x) A B for the Dense `module` (creating A and B at init)."""
  features = (module.features,) if isinstance(module.features, int) else tuple(module.features)
  axis = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
  axis = tuple(a % x.ndim for a in axis)
  n_in = len(axis)
  in_shape = tuple(x.shape[a] for a in axis)
  # kaiming_uniform(a=sqrt(5)) on PEFT's (r, in) lora_A: U(-1/sqrt(in), 1/sqrt(in)).
  a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform",
                                            in_axis=tuple(range(n_in)), out_axis=-1)
  a = module.param("lora_a", partitioned(a_init, tuple(module.kernel_axes[:n_in]) + (None,)),
                   in_shape + (spec.rank,), jnp.dtype(spec.dtype))
  b = module.param("lora_b", partitioned(nn.initializers.zeros,
                                         (None,) + tuple(module.kernel_axes[n_in:])),
                   (spec.rank,) + features, jnp.dtype(spec.dtype))
  x = jnp.asarray(x, module.dtype)
  if train and spec.dropout > 0:
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - spec.dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - spec.dropout), jnp.zeros((), x.dtype))
  h = jax.lax.dot_general(x, jnp.asarray(a, module.dtype),
                          ((axis, tuple(range(n_in))), ((), ())))  # (..., r)
  y = jax.lax.dot_general(h, jnp.asarray(b, module.dtype),
                          (((h.ndim - 1,), (0,)), ((), ())))  # (..., out...)
  return y * jnp.asarray(spec.scale, module.dtype)


@contextlib.contextmanager
def adapters(spec: LoraSpec, *, train: bool = False, seen: list | None = None):
  """Within this block every targeted Dense of any fmjax model carries adapters.

  At init (or an apply with a mutable "params" collection) the adapters are created; at
  apply they are read from the params, and a targeted Dense without them is an error (flax's
  ScopeParamNotFoundError), as is a Dense holding adapters that no target matches.

  Args:
    spec: the LoraSpec.
    train: apply spec.dropout (needs a "dropout" rng when it is > 0).
    seen: a list that receives (path, matching patterns) of each Dense called, for checks.

  Yields:
    None.

  Raises:
    ValueError: a Dense holds adapters but no pattern of spec.targets matches it.
  """
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if not isinstance(module, Dense) or context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    path = "/".join(module.path)
    matched = spec.matching(path)
    if seen is not None:
      seen.append((path, matched))
    y = next_fun(*args, **kwargs)
    if not matched:
      if module.has_variable("params", "lora_a"):
        raise ValueError(f"Dense {path} holds LoRA adapters but no pattern of "
                         f"LoraSpec.targets={spec.targets} matches it; use the spec the "
                         "adapters were made with")
      return y
    return y + _adapter_term(module, args[0], spec, train).astype(y.dtype)

  with nn.intercept_methods(interceptor):
    yield


def check_targets(spec: LoraSpec, seen: Sequence[tuple[str, list]]) -> None:
  """Refuses target patterns that matched no Dense.

  Args:
    spec: the LoraSpec.
    seen: the (path, patterns) pairs `adapters(seen=...)` collected over a model's call.

  Raises:
    ValueError: naming the patterns that matched nothing and listing the model's Dense paths.
  """
  hit = {p for _, patterns in seen for p in patterns}
  unmatched = [p for p in spec.targets if p not in hit]
  if unmatched:
    paths = sorted({path for path, _ in seen})
    raise ValueError(f"LoraSpec.targets: {unmatched} match(es) no Dense layer of this model; its "
                     f"Dense paths are {paths}")


class LoraModel:
  """A model whose `init` and `apply` run inside `adapters(spec)`.

  Everything else (config, runtime, init_cache) is the wrapped model's, so fmjax.generate and
  fmjax.trainer.fit take it where they take the model. `apply` applies the adapter dropout
  when called with train=True.

  Args:
    model: any fmjax (flax) model.
    spec: the LoraSpec.
  """

  def __init__(self, model: nn.Module, spec: LoraSpec):
    self.model, self.spec = model, spec

  def init(self, rngs, *args, **kwargs):
    """model.init with adapters created on the targeted Dense layers.

    Args:
      rngs: a key or {"params": key, ...}, as for flax's init.
      *args: the model's example inputs.
      **kwargs: its keyword inputs.

    Returns:
      The variables, "params" holding the adapters beside the kernels they adapt.

    Raises:
      ValueError: a target pattern matched no Dense (`check_targets`).
    """
    seen = []
    with adapters(self.spec, seen=seen):
      variables = self.model.init(rngs, *args, **kwargs)
    check_targets(self.spec, seen)
    return variables

  def apply(self, variables, *args, **kwargs):
    """model.apply with the adapters of `variables` applied.

    Args:
      variables: {"params": params with adapters, ...}.
      *args: the model's inputs.
      **kwargs: its keyword inputs (train=True also turns on the adapter dropout).

    Returns:
      What model.apply returns.
    """
    with adapters(self.spec, train=bool(kwargs.get("train", False))):
      return self.model.apply(variables, *args, **kwargs)

  def clone(self, **kwargs) -> "LoraModel":
    """The wrapped model cloned with `kwargs` (e.g. runtime=...), wrapped with the same spec.

    Args:
      **kwargs: fields to replace.

    Returns:
      A new LoraModel.
    """
    return LoraModel(self.model.clone(**kwargs), self.spec)

  def __eq__(self, other) -> bool:
    return isinstance(other, LoraModel) and (self.model, self.spec) == (other.model, other.spec)

  def __hash__(self) -> int:  # a static argument of jitted functions (fmjax.generate)
    return hash((LoraModel, self.model, self.spec))

  def __getattr__(self, name: str):
    if name in ("model", "spec"):
      raise AttributeError(name)
    return getattr(self.model, name)

  def __repr__(self) -> str:
    return f"LoraModel({type(self.model).__name__}, {self.spec})"


def _names(path) -> list[str]:
  """The dict keys of a tree path (flax boxes' attribute keys left out)."""
  return [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def trainable_mask(params, spec: LoraSpec | None = None):
  """True on the adapters (and on spec.modules_to_save), False on the frozen base.

  Args:
    params: a params pytree (boxed with logical axes or not).
    spec: its LoraSpec, for modules_to_save; None: adapters only.

  Returns:
    The same tree with a Python bool at each leaf (at each box, for boxed params).
  """
  keep = () if spec is None else spec.modules_to_save

  def leaf(path, _):
    names = _names(path)
    joined = "/".join(names)
    return bool(names and names[-1] in ADAPTERS) or any(
        joined == p or joined.startswith(p + "/") for p in keep)
  return jax.tree_util.tree_map_with_path(leaf, params, is_leaf=_is_box)


def count(params, mask=None) -> int:
  """The number of parameters (where mask is True).

  Args:
    params: a params pytree (boxed or not).
    mask: a tree of bools like `trainable_mask`'s, or None for all.

  Returns:
    The total size of the (selected) leaves.
  """
  params = nn.meta.unbox(params)
  sizes = jax.tree_util.tree_map(lambda x: int(x.size), params)
  if mask is not None:
    sizes = jax.tree_util.tree_map(lambda m, s: s if m else 0, nn.meta.unbox(mask), sizes)
  return sum(jax.tree_util.tree_leaves(sizes))


def split(params):
  """(base, adapters): the params without the adapters, and the adapters alone.

  Args:
    params: a params pytree (nested dicts) holding adapters.

  Returns:
    Two nested dicts: every leaf not named lora_a/lora_b, and those that are.
  """
  flat = traverse_util.flatten_dict(nn.meta.unbox(params))
  base = {k: v for k, v in flat.items() if k[-1] not in ADAPTERS}
  extra = {k: v for k, v in flat.items() if k[-1] in ADAPTERS}
  return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(extra)


def combine(base, adapter_params):
  """Params with the adapters put back beside their kernels (`split`'s inverse).

  Args:
    base: params without adapters.
    adapter_params: {.. path ..: {"lora_a", "lora_b"}} nested dicts.

  Returns:
    The merged nested dict.

  Raises:
    ValueError: an adapter whose Dense has no kernel in `base`.
  """
  flat = dict(traverse_util.flatten_dict(nn.meta.unbox(base)))
  for key, value in traverse_util.flatten_dict(nn.meta.unbox(adapter_params)).items():
    if key[:-1] + ("kernel",) not in flat:
      raise ValueError(f"adapter {'/'.join(key)} has no kernel {'/'.join(key[:-1])}/kernel in "
                       "the params: another model's adapters")
    flat[key] = value
  return traverse_util.unflatten_dict(flat)


def add_adapters(model: nn.Module, params, spec: LoraSpec, rng, *example_args, **example_kwargs):
  """`params` (e.g. a pretrained base) with fresh adapters on the Dense layers spec targets.

  Args:
    model: the fmjax model the params are for.
    params: its params (nested dicts of arrays), kept as they are (dtype, sharding).
    spec: the LoraSpec.
    rng: a PRNG key for the A matrices (B starts at zero).
    *example_args: example inputs for model.init (only shapes and dtypes matter).
    **example_kwargs: keyword inputs for model.init.

  Returns:
    The params with lora_a / lora_b beside each targeted kernel.

  Raises:
    ValueError: a target pattern matched no Dense (naming it and listing the Dense paths).
  """
  seen = []

  def fresh(key):
    with adapters(spec, seen=seen):
      variables = model.init({"params": key, "dropout": key}, *example_args, **example_kwargs)
    return split(nn.meta.unbox(variables["params"]))[1]

  made = jax.jit(fresh)(rng)
  check_targets(spec, seen)
  return combine(params, made)


def _delta(a, b, kernel):
  """scale-free A B reshaped as `kernel` (leading stacked-layer axes kept), in float32."""
  lead = a.ndim + b.ndim - 2 - kernel.ndim  # the stacked "layers" axes (0 or 1)
  stacked = a.shape[:lead]
  r = a.shape[-1]
  a2 = a.astype(jnp.float32).reshape(stacked + (-1, r))
  b2 = b.astype(jnp.float32).reshape(stacked + (r, -1))
  return jnp.matmul(a2, b2).reshape(kernel.shape)


def merge(params, spec: LoraSpec):
  """Plain params computing the adapted function: kernel + (alpha / r) A B, adapters removed.

  Args:
    params: params holding adapters (nested dicts, stacked layers allowed).
    spec: the LoraSpec they were made with (its scale).

  Returns:
    Params of the base model's tree (each kernel in its own dtype), for model.apply,
    fmjax.hf.save_pretrained or generation.
  """
  flat = traverse_util.flatten_dict(nn.meta.unbox(params))
  out = {k: v for k, v in flat.items() if k[-1] not in ADAPTERS}
  for key in flat:
    if key[-1] == "lora_a":
      where = key[:-1]
      kernel = flat[where + ("kernel",)]
      d = _delta(flat[key], flat[where + ("lora_b",)], kernel)
      out[where + ("kernel",)] = (kernel.astype(jnp.float32) + spec.scale * d).astype(kernel.dtype)
  return traverse_util.unflatten_dict(out)


def unmerge(merged, adapter_params, spec: LoraSpec):
  """The inverse of `merge`: kernel - (alpha / r) A B, with the adapters put back.

  Args:
    merged: plain params from `merge`.
    adapter_params: the adapters (`split(params)[1]`).
    spec: the LoraSpec.

  Returns:
    Params holding the adapters, whose kernels are the base's again (up to rounding).
  """
  flat = dict(traverse_util.flatten_dict(combine(merged, adapter_params)))
  for key in list(flat):
    if key[-1] == "lora_a":
      where = key[:-1]
      kernel = flat[where + ("kernel",)]
      d = _delta(flat[key], flat[where + ("lora_b",)], kernel)
      flat[where + ("kernel",)] = (kernel.astype(jnp.float32) - spec.scale * d).astype(kernel.dtype)
  return traverse_util.unflatten_dict(flat)


def apply(model: nn.Module, params, spec: LoraSpec, *args, **kwargs):
  """model.apply({"params": params}, *args, **kwargs) with the adapters of `params` applied.

  Args:
    model: the fmjax model.
    params: its params holding adapters.
    spec: the LoraSpec.
    *args: the model's inputs.
    **kwargs: its keyword inputs (train=True applies the adapter dropout).

  Returns:
    What model.apply returns.
  """
  return LoraModel(model, spec).apply({"params": params}, *args, **kwargs)

