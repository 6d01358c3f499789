"""How a model runs, as opposed to what it is: attention kernel, remat, scan, dtypes, dropout.

A model config (GPTConfig, BertConfig, ViTConfig, Seq2SeqConfig) is the architecture: what a
checkpoint holds and what two runs must agree on to share weights. A `Runtime` is everything
a run may change without changing the function the weights compute (up to float rounding and
dropout noise), so a checkpoint written under one runtime resumes under another:

  GPT(config)                                           # float32, no dropout, no remat
  GPT(config, runtime=Runtime(dtype="bfloat16", attention_impl="chunked",
                              scan_layers=True, remat_policy="dots_no_batch"))

scan_layers is the one field that changes the parameter *layout* (the layers stacked on a
leading axis for nn.scan); fmjax.checkpoint converts between the two layouts.
"""

import dataclasses

import jax.numpy as jnp

from fmjax import attention
from fmjax.transformer import REMAT_POLICIES


@dataclasses.dataclass(frozen=True)
class Runtime:
  """How a model runs; every model module takes one as its last field (default: this).

  Attributes:
    attention_impl: a kernel of fmjax.attention.IMPLEMENTATIONS ("auto" picks per backend).
    scan_layers: one nn.scan over layers stacked on a leading axis (compile time independent
      of depth) instead of a Python loop.
    remat_policy: a name of fmjax.transformer.REMAT_POLICIES: what the backward pass keeps.
    dtype: compute dtype, e.g. "bfloat16" for mixed precision.
    param_dtype: parameters (and so gradients and optimizer state).
    dropout_rate: residual, embedding and MLP dropout while training.
    attention_dropout_rate: dropout on the attention probabilities while training.
  """
  attention_impl: str = "auto"
  scan_layers: bool = False
  remat_policy: str = "none"
  dtype: str = "float32"
  param_dtype: str = "float32"
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0

  def __post_init__(self):
    _choice("attention_impl", self.attention_impl, attention.IMPLEMENTATIONS)
    _choice("remat_policy", self.remat_policy, tuple(REMAT_POLICIES))
    if not isinstance(self.scan_layers, bool):
      raise ValueError(f"Runtime.scan_layers={self.scan_layers!r}: must be True or False")
    for name in ("dtype", "param_dtype"):
      value = getattr(self, name)
      try:
        ok = isinstance(value, str) and jnp.issubdtype(jnp.dtype(value), jnp.floating)
      except TypeError:
        ok = False
      if not ok:
        raise ValueError(f"Runtime.{name}={value!r} is not a floating-point dtype name; use "
                         "e.g. 'float32', 'bfloat16' or 'float16'")
    for name in ("dropout_rate", "attention_dropout_rate"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"Runtime.{name}={value!r}: a dropout rate must be in [0, 1)")

  @property
  def compute_dtype(self) -> jnp.dtype:
    """The compute dtype, `dtype` as a jnp.dtype (e.g. dtype('bfloat16'))."""
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self) -> jnp.dtype:
    """The parameters' dtype, `param_dtype` as a jnp.dtype."""
    return jnp.dtype(self.param_dtype)

  def block_fields(self) -> dict:
    """The fields of fmjax.transformer.BlockConfig that come from the runtime.

    Returns:
      {"dropout_rate", "attention_dropout_rate", "attention_impl", "dtype", "param_dtype"},
      the dtypes as jnp.dtype, to splat into BlockConfig(...).
    """
    return dict(dropout_rate=self.dropout_rate,
                attention_dropout_rate=self.attention_dropout_rate,
                attention_impl=self.attention_impl, dtype=self.compute_dtype,
                param_dtype=self.params_dtype)


FIELDS = tuple(f.name for f in dataclasses.fields(Runtime))


def _choice(name: str, value, choices: tuple) -> None:
  if value not in choices:
    raise ValueError(f"Runtime.{name}={value!r} is not one of {list(choices)}; choose one of them")
