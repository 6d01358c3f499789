"""GPT: a decoder-only causal language model (Radford et al. 2018, 2019).

Shape key: B batch, T length, D width, F MLP width, N heads, K kv heads, H head dim, V vocab.

tokens -> token embedding (+ learned positions, or rotary inside attention) -> dropout
       -> L pre-LN causal blocks -> final norm -> logits through the tied embedding.

Decoding (fmjax/generate.py) runs the same modules over a KV cache: `init_cache`, then
`GPT.decode` once on the prompt (prefill) and once per new token.
"""

import dataclasses
import flax.linen as nn
import jax.numpy as jnp

from fmjax.layers import (ACTIVATIONS, Dense, Embed, Norm, default_kernel_init,
                          mask_padded_logits, round_up, zero_padding)
from fmjax import transformer
from fmjax.runtime import Runtime
from fmjax.transformer import BlockConfig, TransformerStack

POSITIONS = ("learned", "rope")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """The architecture; how it runs (kernel, remat, scan, dtypes, dropout) is a Runtime."""
  vocab_size: int = 50257
  vocab_multiple: int = 128  # table rows padded to a multiple (tensor parallelism); see Embed
  max_len: int = 1024
  num_layers: int = 12
  num_heads: int = 12
  embed_dim: int = 768
  mlp_dim: int = 3072
  num_kv_heads: int | None = None
  position: str = "learned"  # "learned" (GPT-2) | "rope"
  norm: str = "layer"  # "layer" | "rms"
  mlp_activation: str = "gelu_tanh"
  gated_mlp: bool = False
  use_bias: bool = True
  tie_embeddings: bool = True

  def __post_init__(self):
    transformer.check_config(
        self, positive=("vocab_size", "max_len", "num_layers", "num_heads", "embed_dim",
                        "mlp_dim"),
        choices={"position": POSITIONS, "norm": transformer.NORMS,
                 "mlp_activation": tuple(ACTIVATIONS)})
    if self.position == "rope" and self.head_dim % 2:
      raise ValueError(f"GPTConfig: rotary positions rotate pairs of dimensions, but head_dim "
                       f"= embed_dim / num_heads = {self.head_dim} is odd; change embed_dim or "
                       "num_heads")

  @property
  def padded_vocab_size(self) -> int:
    """Vp, the rows of the embedding and LM head: vocab_size rounded up to vocab_multiple."""
    return round_up(self.vocab_size, self.vocab_multiple)

  @property
  def head_dim(self) -> int:
    """H, the width of one attention head: embed_dim // num_heads."""
    return self.embed_dim // self.num_heads

  def block(self, runtime: Runtime) -> BlockConfig:
    """The BlockConfig of GPT's layers: causal, pre-LN, with this config's norm, MLP and positions.

    Args:
      runtime: how the model runs (its dropout rates, attention kernel and dtypes go in).

    Returns:
      The BlockConfig shared by the num_layers blocks (rope=True for position="rope").
    """
    return BlockConfig(
        num_heads=self.num_heads, head_dim=self.head_dim, mlp_dim=self.mlp_dim,
        num_kv_heads=self.num_kv_heads, causal=True, pre_ln=True, norm=self.norm,
        mlp_activation=self.mlp_activation, gated_mlp=self.gated_mlp, use_bias=self.use_bias,
        rope=self.position == "rope", **runtime.block_fields())


PRESETS = {
    "tiny": GPTConfig(vocab_size=256, max_len=64, num_layers=2, num_heads=4, embed_dim=64,
                      mlp_dim=256),
    # Char-level tiny Shakespeare sized for a 2-core CPU (nanoGPT's shakespeare_char, shrunk).
    "shakespeare_char": GPTConfig(vocab_size=65, max_len=256, num_layers=4, num_heads=4,
                                  embed_dim=192, mlp_dim=768),
    "gpt2_small": GPTConfig(),  # 124M
    "gpt2_medium": GPTConfig(num_layers=24, num_heads=16, embed_dim=1024, mlp_dim=4096),  # 350M
}


def get_config(name: str, **overrides) -> GPTConfig:
  """A preset by name with field overrides, e.g. get_config("tiny", vocab_size=65).

  Args:
    name: a key of PRESETS: "tiny", "shakespeare_char", "gpt2_small" or "gpt2_medium".
    **overrides: GPTConfig fields to replace.

  Returns:
    The GPTConfig (validated by its __post_init__).

  Raises:
    ValueError: an unknown preset name, or an invalid field value.
  """
  if name not in PRESETS:
    raise ValueError(f"unknown GPT preset {name!r}; choose from {sorted(PRESETS)}")
  return dataclasses.replace(PRESETS[name], **overrides)


class GPT(nn.Module):
  """The decoder-only language model (module docstring): tokens (B, T) -> logits (B, T, Vp).

  Attributes:
    config: the architecture.
    runtime: how it runs (kernel, remat, scan, dtypes, dropout).
  """
  config: GPTConfig
  runtime: Runtime = Runtime()

  @nn.compact
  def __call__(self, tokens, *, positions=None, segment_ids=None, train: bool = False,
               cache=None, cache_index=None, kv_mask=None):
    """Next-token logits.

    Args:
      tokens: (B, T) int token ids.
      positions: (B, T) positions, restarting at 0 in each packed document; default arange.
      segment_ids: (B, T) document ids for packed sequences (attention stays inside one).
      train: enables dropout.
      cache, cache_index, kv_mask: incremental decoding, see `decode`.
    Returns:
      (B, T, Vp) float32 logits, Vp = vocab_size padded to vocab_multiple, the padded ids
      masked to -inf (layers.Embed); with a cache, `decode`'s (logits (B, Vp), cache).
    Raises:
      ValueError: T > max_len with learned positions (there is no position to embed).
    """
    c, rt = self.config, self.runtime
    dtype, param_dtype = rt.compute_dtype, rt.params_dtype
    if c.position == "learned" and tokens.shape[1] > c.max_len:
      raise ValueError(f"tokens have length {tokens.shape[1]} but this GPT has max_len="
                       f"{c.max_len} learned positions; pass at most {c.max_len} tokens (e.g. "
                       "the last ones), or use a config with a larger max_len")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    embed = Embed(c.vocab_size, c.embed_dim, dtype=dtype, param_dtype=param_dtype,
                  pad_to_multiple=c.vocab_multiple, name="wte")
    x = embed(tokens)  # (B, T, D)
    if c.position == "learned":
      x = x + Embed(c.max_len, c.embed_dim, axes=(None, "embed"), dtype=dtype,
                    embedding_init=nn.initializers.normal(0.01), param_dtype=param_dtype,
                    name="wpe")(positions)
    x = nn.Dropout(rt.dropout_rate)(x, deterministic=not train)
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    stack = TransformerStack(c.block(rt), c.num_layers, scan=rt.scan_layers,
                             remat_policy=rt.remat_policy, name="blocks")
    if cache is not None:
      x, cache = stack(x, positions=positions, kv_mask=kv_mask, train=train, cache=cache,
                       cache_index=cache_index)
      x = x[:, -1:]  # only the last position's next-token distribution is needed
    else:
      x = stack(x, segment_ids=segment_ids, positions=positions, train=train)
    x = Norm(c.norm, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, name="ln_f")(x)
    if c.tie_embeddings and cache is not None:
      logits = embed.attend_rows(x[:, 0])[:, None]  # (B, 1, Vp)
    elif c.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = Dense(c.padded_vocab_size, ("embed", "vocab"), use_bias=False, dtype=dtype,
                     kernel_init=zero_padding(default_kernel_init, c.vocab_size, axis=1),
                     param_dtype=param_dtype, name="lm_head")(x)
      logits = mask_padded_logits(logits, c.vocab_size)
    if cache is not None:
      return logits[:, 0].astype(jnp.float32), cache
    return logits.astype(jnp.float32)

  def decode(self, tokens, cache, *, index, positions, kv_mask):
    """One step of incremental decoding: a prompt (prefill) or new tokens (T = 1).

    Args:
      tokens: (B, T) int ids, written at cache slots index .. index + T - 1.
      cache: from `init_cache` (B rows, S slots), holding slots 0 .. index - 1.
      index: int scalar (may be traced), the first slot written.
      positions: (B, T) int position of each token (a left-padded row starts at 0 after
        its padding); must stay below max_len with learned positions.
      kv_mask: (B, S) bool, False for slots that hold padding.
    Returns:
      (logits (B, Vp) float32 at the last of the T tokens, updated cache).
    """
    return self(tokens, positions=positions, cache=cache, cache_index=index, kv_mask=kv_mask)

  def init_cache(self, *, batch: int, length: int):
    """Zero KV cache for `decode`: `length` slots for `batch` rows (transformer.init_cache).

    Args:
      batch: B, the rows decoded together.
      length: S, the token slots (prompt, padding included, plus new tokens).

    Returns:
      pytree of (B, K, S, H) zeros in the compute dtype ((L, B, K, S, H) under
      runtime.scan_layers), K the kv heads.
    """
    c, rt = self.config, self.runtime
    return transformer.init_cache(c.block(rt), c.num_layers, batch=batch, length=length,
                                  scan=rt.scan_layers)


def num_params(c: GPTConfig) -> int:
  """Closed-form count of the stored parameters.

  Biases and LayerNorms included when configured; the vocabulary rows padded to
  vocab_multiple (vocab_multiple=1 for the count without padding that Hugging Face reports).

  Args:
    c: the config.

  Returns:
    The number of parameters.
  """
  d, f, v, l = c.embed_dim, c.mlp_dim, c.padded_vocab_size, c.num_layers
  kv = (c.num_kv_heads or c.num_heads) * c.head_dim
  b = 1 if c.use_bias else 0
  norm = 2 * d if c.norm == "layer" else d
  attn = d * d + 2 * d * kv + d * d + b * (d + 2 * kv + d)
  n_in = 2 if c.gated_mlp else 1
  mlp = n_in * (d * f + b * f) + f * d + b * d
  total = l * (attn + mlp + 2 * norm) + norm + v * d
  total += c.max_len * d if c.position == "learned" else 0
  total += 0 if c.tie_embeddings else d * v
  return total


def flops_per_token(c: GPTConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward = 3x forward), PaLM appendix B style.

  6 * (non-embedding matmul params + the tied output projection) + 12 * L * T * D for attention.
  The output projection counts the padded vocabulary (vocab_multiple): it is computed.

  Args:
    c: the config.
    seq_len: T, the sequence length.

  Returns:
    FLOPs per token, a float.
  """
  d, f, v, l = c.embed_dim, c.mlp_dim, c.padded_vocab_size, c.num_layers
  kv = (c.num_kv_heads or c.num_heads) * c.head_dim
  matmul = l * (2 * d * d + 2 * d * kv + (3 if c.gated_mlp else 2) * d * f) + d * v
  return 6.0 * matmul + 12.0 * l * seq_len * d
