"""Small shared layers: projections, embeddings, norms, MLPs and rotary positions.

Shape key: B batch, T length, D width, F MLP width, N heads, K kv heads, H head dim, V vocab.

Every parameter is created with *logical* axis names (see fmjax/sharding.py for the one table
that maps them onto mesh axes), so no model ever names a mesh axis. The wrapping with
`nn.with_logical_partitioning` happens here, once, instead of at every call site.

Vocabularies are padded here too, once: `Embed(..., pad_to_multiple=m)` stores round_up(V, m)
rows and masks the padded logits to -inf, so any tokenizer shards over a tensor axis of any
size dividing m (see Embed for why the logits stay padded rather than sliced).
"""

import dataclasses
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Axes = tuple[str | None, ...]

default_kernel_init = nn.initializers.normal(stddev=0.02)


def partitioned(init: Callable, axes: Axes) -> Callable:
  """Wraps an initializer so the parameter carries logical axis names.

  Args:
    init: a flax initializer, init(key, shape, dtype).
    axes: one logical axis name (or None) per dimension of the parameter.

  Returns:
    The initializer wrapped by nn.with_logical_partitioning.
  """
  return nn.with_logical_partitioning(init, axes)


class Dense(nn.Module):
  """A linear map with logical axis names on its kernel (and bias).

  `features` may be a tuple, e.g. (N, H) for a query projection, and `axis` may
  contract several trailing input axes, e.g. (-2, -1) for an output projection
  from (N, H) back to D.
  """
  features: int | Sequence[int]
  kernel_axes: Axes
  axis: int | Sequence[int] = -1
  use_bias: bool = True
  kernel_init: Callable = default_kernel_init
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """Applies the linear map, contracting the `axis` dimensions of `x` with the kernel.

    Args:
      x: array whose `axis` dimensions are the inputs, e.g. (B, T, D), or (B, T, N, H) with
        axis=(-2, -1); cast to `dtype`.

    Returns:
      x's other dimensions followed by `features`, in `dtype`: e.g. (B, T, N, H) for a query
      projection with features=(N, H), (B, T, D) for the output projection.
    """
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
    axis = tuple(a % x.ndim for a in axis)
    in_shape = tuple(x.shape[a] for a in axis)
    kernel = self.param("kernel", partitioned(self.kernel_init, self.kernel_axes),
                        in_shape + features, self.param_dtype)
    x, kernel = jnp.asarray(x, self.dtype), jnp.asarray(kernel, self.dtype)
    y = jax.lax.dot_general(x, kernel, ((axis, tuple(range(len(axis)))), ((), ())))
    if self.use_bias:
      bias = self.param("bias", partitioned(nn.initializers.zeros, self.kernel_axes[len(axis):]),
                        features, self.param_dtype)
      y = y + jnp.asarray(bias, self.dtype)
    return y


def round_up(n: int, multiple: int) -> int:
  """n rounded up to a multiple of `multiple` (a positive int), e.g. round_up(67, 128) = 128.

  Args:
    n: the number to round, e.g. the vocabulary size V.
    multiple: a positive int (1: no rounding).

  Returns:
    The least multiple of `multiple` that is >= n.

  Raises:
    ValueError: `multiple` is not a positive int.
  """
  if not isinstance(multiple, int) or multiple < 1:
    raise ValueError(f"vocab_multiple (Embed's pad_to_multiple) must be a positive int; got "
                     f"{multiple!r}. Use 1 for no padding, or e.g. 128, which keeps the "
                     "vocabulary axis divisible by any tensor-parallel size dividing 128")
  return -(-n // multiple) * multiple


def mask_padded_logits(logits, vocab_size: int):
  """(..., Vp) logits with the padded ids vocab_size .. Vp - 1 set to -inf.

  Their probability is then exactly 0 (softmax, log-softmax, sampling, top-k and argmax never
  pick them) and their gradient exactly 0; the losses over the true vocabulary are unchanged.

  Args:
    logits: (..., Vp) float.
    vocab_size: V, the number of real ids.

  Returns:
    (..., Vp) logits of the same dtype, -inf at ids >= V (`logits` itself when Vp == V).
  """
  if logits.shape[-1] == vocab_size:
    return logits
  return jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)


def zero_padding(init: Callable, size: int, axis: int = 0) -> Callable:
  """`init` with the entries at `size` and beyond along `axis` set to zero.

  Padded vocabulary rows start at zero, and since their logits are masked they get zero
  gradient and stay zero (AdamW's decay of 0 is 0), so a checkpoint exported without them
  re-imports exactly.

  Args:
    init: a flax initializer, init(key, shape, dtype).
    size: the entries kept along `axis` (V, the real vocabulary).
    axis: the padded axis (0: the rows of a (Vp, D) table).

  Returns:
    An initializer padded(key, shape, dtype=float32) giving init's values, zero at indices
    >= size along `axis`.
  """
  def padded(key, shape, dtype=jnp.float32):
    keep = (jnp.arange(shape[axis]) < size).reshape([-1 if a == axis % len(shape) else 1
                                                     for a in range(len(shape))])
    return jnp.where(keep, init(key, shape, dtype), jnp.zeros((), dtype))
  return padded


class Embed(nn.Module):
  """Token (or position / token-type) embedding table of shape (V, D).

  Padded vocabulary: with pad_to_multiple = m > 1 (a model's `vocab_multiple`, 128 by
  default) the table has Vp = round_up(V, m) rows, so the "vocab" axis splits over any
  tensor-parallel size that divides m whatever the tokenizer (67 characters, GPT-2's 50257).
  Ids are still 0 .. V - 1; the rows V .. Vp - 1 are never looked up and start (and stay) at
  zero (zero_padding).

  `attend` returns padded-width (..., Vp) logits with the padded entries masked to -inf
  (mask_padded_logits), not sliced to V: slicing the tensor-sharded vocabulary axis would
  reshard the largest activation of the model (an all-gather of the logits) at every step,
  while the mask is elementwise and keeps the axis divisible. Consumers treat Vp as the
  vocabulary width: losses and decoding work unchanged (probability 0 on the padding);
  compare with an unpadded reference through logits[..., :V].
  """
  num_embeddings: int
  features: int
  axes: Axes = ("vocab", "embed")
  embedding_init: Callable = default_kernel_init
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  pad_to_multiple: int = 1

  def setup(self):
    rows = round_up(self.num_embeddings, self.pad_to_multiple)
    init = zero_padding(self.embedding_init, self.num_embeddings) if rows > self.num_embeddings \
        else self.embedding_init
    self.embedding = self.param("embedding", partitioned(init, self.axes),
                                (rows, self.features), self.param_dtype)

  def __call__(self, ids):
    """Looks the ids up in the table.

    Args:
      ids: (B, T) int ids in [0, V).

    Returns:
      (B, T, D) embeddings in `dtype`.
    """
    return jnp.take(jnp.asarray(self.embedding, self.dtype), ids, axis=0)

  def attend(self, x):
    """Tied output projection: (B, T, D) -> (B, T, Vp) logits, padded ids masked to -inf.

    Args:
      x: (B, T, D) float.

    Returns:
      (B, T, Vp) logits in `dtype`, -inf at the padded ids V .. Vp - 1.
    """
    logits = jnp.einsum("BTD,VD->BTV", x, jnp.asarray(self.embedding, self.dtype))
    return mask_padded_logits(logits, self.num_embeddings)

  def attend_rows(self, x):
    """`attend` for a few rows, as in decoding: (B, D) -> (B, Vp), padded ids masked.

    Vocabulary-major product: XLA's CPU matmul streams the (Vp, D) table about twice as fast
    this way round as BD,VD->BV when only B rows are projected; the barrier keeps XLA from
    folding the transpose back into the slow orientation.

    Args:
      x: (B, D) float.

    Returns:
      (B, Vp) logits in `dtype`, -inf at the padded ids.
    """
    table = jnp.asarray(self.embedding, self.dtype)
    logits = jax.lax.optimization_barrier(jnp.einsum("VD,BD->VB", table, x))
    return mask_padded_logits(logits.T, self.num_embeddings)


NORMS = ("layer", "rms", "rms_offset")


def Norm(kind: str, *, epsilon: float, dtype: Dtype, param_dtype: Dtype, name: str | None = None,
         axes: Axes = ("embed",)):
  """LayerNorm ("layer"), RMSNorm ("rms") or Gemma's RMSNorm ("rms_offset"); float32 statistics.

  "rms_offset" stores the scale as an offset w from 1 and multiplies by (1 + w), w starting at
  0 (Gemma): the stored numbers are the checkpoint's own, so they round-trip bit for bit.

  Args:
    kind: one of NORMS.
    epsilon: added to the variance.
    dtype: the output (compute) dtype.
    param_dtype: the dtype of the scale (and bias) parameters.
    name: the submodule's name, or None for flax's automatic one.
    axes: the scale's logical axis, ("embed",) for the width, ("head_dim",) for a norm of each
      head's queries or keys (Qwen3, Gemma 3).

  Returns:
    A module (..., D) -> (..., D).

  Raises:
    ValueError: an unknown `kind`.
  """
  scale_init = partitioned(nn.initializers.ones, axes)
  if kind == "layer":
    return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
                        scale_init=scale_init,
                        bias_init=partitioned(nn.initializers.zeros, axes))
  if kind == "rms":
    return nn.RMSNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
                      scale_init=scale_init)
  if kind == "rms_offset":
    return OffsetRMSNorm(epsilon=epsilon, axes=axes, dtype=dtype, param_dtype=param_dtype,
                         name=name)
  raise ValueError(f"unknown norm {kind!r}; expected one of {list(NORMS)}")


class OffsetRMSNorm(nn.Module):
  """x / rms(x) * (1 + w) with w stored (and initialised at 0): Gemma's RMSNorm."""
  epsilon: float
  axes: Axes = ("embed",)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """Normalises the last axis of x (statistics in float32).

    Args:
      x: (..., D) float.

    Returns:
      (..., D) in `dtype`: x / sqrt(mean(x^2) + epsilon) * (1 + scale).
    """
    w = self.param("scale", partitioned(nn.initializers.zeros, self.axes), (x.shape[-1],),
                   self.param_dtype)
    y = x.astype(jnp.float32)
    y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + self.epsilon)
    return (y * (1.0 + w.astype(jnp.float32))).astype(self.dtype)


ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),  # BERT: exact erf GELU.
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),  # GPT-2 "gelu_new".
    "relu": nn.relu,
    "silu": nn.silu,
}
# Hugging Face's `hidden_act` names -> ACTIVATIONS ("gelu_pytorch_tanh" is the tanh approximation).
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                  "relu": "relu", "silu": "silu", "swish": "silu"}


class MLP(nn.Module):
  """Position-wise feed-forward: D -> F -> D, or gated (SwiGLU) when `gated`."""
  mlp_dim: int
  activation: str = "gelu_tanh"
  gated: bool = False
  use_bias: bool = True
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    """The feed-forward block: Dense(F), activation (times the gate's Dense(F)), dropout, Dense(D).

    Args:
      x: (B, T, D) float.
      train: apply dropout (needs a "dropout" rng).

    Returns:
      (B, T, D) in `dtype`.

    Raises:
      ValueError: an unknown `activation`.
    """
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"unknown activation {self.activation!r}; choose from {sorted(ACTIVATIONS)}")
    act = ACTIVATIONS[self.activation]
    dense = lambda f, axes, name: Dense(f, axes, use_bias=self.use_bias, dtype=self.dtype,
                                        param_dtype=self.param_dtype, name=name)
    h = act(dense(self.mlp_dim, ("embed", "mlp"), "wi")(x))  # (B, T, F)
    if self.gated:  # SwiGLU: act(x W_gate) * (x W_up).
      h = h * dense(self.mlp_dim, ("embed", "mlp"), "wi_up")(x)
    h = nn.Dropout(self.dropout_rate)(h, deterministic=not train)
    return dense(x.shape[-1], ("mlp", "embed"), "wo")(h)


ROPE_SCALINGS = ("none", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class Rope:
  """Rotary frequencies: a base (theta) and how long-context checkpoints rescale them.

  "linear" divides every frequency by `factor` (position interpolation, Chen et al. 2023);
  "llama3" divides only the low frequencies (wavelengths above original_max_len /
  low_freq_factor) and blends smoothly up to original_max_len / high_freq_factor (Llama 3.1).
  """
  theta: float = 10_000.0
  scaling: str = "none"  # one of ROPE_SCALINGS
  factor: float = 1.0
  low_freq_factor: float = 1.0  # llama3 only
  high_freq_factor: float = 4.0  # llama3 only
  original_max_len: int = 8192  # llama3 only

  def __post_init__(self):
    if self.scaling not in ROPE_SCALINGS:
      raise ValueError(f"Rope.scaling={self.scaling!r} is not one of {list(ROPE_SCALINGS)}")
    if not self.theta > 0 or not self.factor > 0:
      raise ValueError(f"Rope(theta={self.theta}, factor={self.factor}): both must be > 0")

  def frequencies(self, head_dim: int):
    """The H/2 angle frequencies (radians per position), float32.

    Args:
      head_dim: H, even.

    Returns:
      (H/2,) float32 array.
    """
    freq = rope_frequencies(head_dim, self.theta)
    if self.scaling == "linear":
      return freq / self.factor
    if self.scaling == "llama3":
      wavelen = 2 * math.pi / freq
      low, high = (self.original_max_len / self.low_freq_factor,
                   self.original_max_len / self.high_freq_factor)
      scaled = jnp.where(wavelen > low, freq / self.factor, freq)
      smooth = (self.original_max_len / wavelen - self.low_freq_factor) / (
          self.high_freq_factor - self.low_freq_factor)
      blended = (1 - smooth) * scaled / self.factor + smooth * scaled
      return jnp.where((wavelen >= high) & (wavelen <= low), blended, scaled)
    return freq


def rope_frequencies(head_dim: int, max_wavelength: float = 10_000.0):
  """The plain rotary frequencies max_wavelength ** (-2i / H), i = 0 .. H/2 - 1.

  Args:
    head_dim: H, even.
    max_wavelength: the base (theta).

  Returns:
    (H/2,) float32 array.
  """
  return max_wavelength ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def apply_rope(x, positions, *, max_wavelength: float = 10_000.0, freq=None):
  """Rotary position embedding (Su et al. 2021), rotate-half convention.

  Args:
    x: (B, T, N, H) queries or keys; H must be even.
    positions: (B, T) integer positions.
    max_wavelength: the base of the angle frequencies, max_wavelength ** (-2i / H).
    freq: (H/2,) frequencies overriding max_wavelength (e.g. `Rope.frequencies`), or None.

  Returns:
    x rotated by position-dependent angles, same shape and dtype (computed in float32).
  """
  h = x.shape[-1]
  freq = rope_frequencies(h, max_wavelength) if freq is None else freq  # (H/2,)
  angle = positions[..., None].astype(jnp.float32) * freq  # (B, T, H/2)
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
