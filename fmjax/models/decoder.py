"""Modern decoder-only LLMs: Llama, Mistral, Qwen2/3 and Gemma 1/2/3 as one family.

Shape key: B batch, T length, D width, F MLP width, N heads, K kv heads, H head dim, V vocab.

Papers: Touvron et al. 2023 (Llama: pre-RMSNorm, SwiGLU, rotary positions, no biases),
Ainslie et al. 2023 (grouped-query attention), Jiang et al. 2023 (Mistral: sliding window),
Qwen2 (2024: query/key/value biases), Qwen3 (2025: RMSNorm of each head's queries and keys),
Gemma Team 2024/2025 (Gemma 1/2/3: embeddings times sqrt(D), RMSNorm scales as (1 + w), GeGLU,
norms after attention and MLP too, logit soft-capping, local sliding-window layers between
global ones, each kind with its own rotary base).

tokens -> token embedding (x sqrt(D) for Gemma) -> L pre-norm causal blocks (rotary positions,
GQA, gated MLP) -> final RMSNorm -> logits through the tied embedding or an untied lm_head
(Gemma 2: soft-capped).

The quirks are data, not flags per model: `AttentionOptions` (fmjax/transformer.py) holds what
changes inside attention, `LocalLayers` which layers slide, `Gemma` Gemma's conventions.
`family` only says which Hugging Face model_type the config is exported as (fmjax/hf/decoders.py).
Decoding (fmjax/generate.py) uses `init_cache` and `decode`, the KV cache holding the K kv heads:
a global layer keeps all S slots, a local layer only min(window, S), reused as a ring buffer
(fmjax/transformer.py), so the local layers' memory stops growing with the context. The layer
loop decodes every family; scan_layers needs equal layers (Mistral, not Gemma 2/3).
"""

import dataclasses
import math

import flax.linen as nn
import jax.numpy as jnp

from fmjax import transformer
from fmjax.layers import (ACTIVATIONS, Dense, Embed, Norm, Rope, default_kernel_init,
                          mask_padded_logits, round_up, zero_padding)
from fmjax.runtime import Runtime
from fmjax.transformer import AttentionOptions, BlockConfig, TransformerStack

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")


@dataclasses.dataclass(frozen=True)
class LocalLayers:
  """Sliding-window ("local") layers: Mistral's are all of them, Gemma 2 every other one, Gemma 3
  five in six.

  Attributes:
    window: a query sees itself and the window - 1 tokens before it.
    layers: the indices of the local layers; the others attend globally.
    rope: the local layers' rotary frequencies (Gemma 3: base 10_000 where global layers use
      1_000_000); None: the same as the global layers'.
  """
  window: int
  layers: tuple[int, ...]
  rope: Rope | None = None

  def __post_init__(self):
    if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
      raise ValueError(f"LocalLayers.window={self.window!r}: must be a positive int")
    object.__setattr__(self, "layers", tuple(sorted(set(self.layers))))


@dataclasses.dataclass(frozen=True)
class Gemma:
  """Gemma's conventions: embeddings scaled by sqrt(D), RMSNorm scales stored as w and applied as
  (1 + w); Gemma 2/3 also normalise the attention and MLP outputs (sandwich_norms) and Gemma 2
  soft-caps the final logits, cap * tanh(logits / cap)."""
  sandwich_norms: bool = False
  final_softcap: float | None = None


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """The architecture; how it runs (kernel, remat, scan, dtypes, dropout) is a Runtime."""
  family: str = "llama"  # the Hugging Face model_type it exports as; one of FAMILIES
  vocab_size: int = 32000
  vocab_multiple: int = 128  # table rows padded to a multiple (tensor parallelism); see Embed
  max_len: int = 2048  # the positions it was trained for (rotary positions have no hard limit)
  num_layers: int = 2
  embed_dim: int = 64
  mlp_dim: int = 128
  num_heads: int = 4
  num_kv_heads: int | None = None  # None: num_heads; 1: MQA; else GQA
  head_dim: int | None = None  # None: embed_dim // num_heads (Gemma's differs)
  norm_eps: float = 1e-5
  mlp_activation: str = "silu"  # SwiGLU; "gelu_tanh" is Gemma's GeGLU
  tie_embeddings: bool = False
  attention_bias: bool = False  # biases on q, k, v and output projections (Llama's flag)
  mlp_bias: bool = False
  attention: AttentionOptions = AttentionOptions()  # every layer's (rope: the global layers')
  local: LocalLayers | None = None
  gemma: Gemma | None = None

  def __post_init__(self):
    transformer.check_config(
        self, positive=("vocab_size", "max_len", "num_layers", "num_heads", "embed_dim",
                        "mlp_dim"),
        choices={"family": FAMILIES, "mlp_activation": tuple(ACTIVATIONS)})
    if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim <= 0
                                      or self.head_dim % 2):
      raise ValueError(f"DecoderConfig.head_dim={self.head_dim!r}: must be a positive even int "
                       "(rotary positions rotate pairs of dimensions), or None")
    if self.attention.window is not None:
      raise ValueError("DecoderConfig.attention.window must stay None: sliding windows are "
                       "DecoderConfig.local (LocalLayers), which says which layers slide")
    if self.local is not None and not set(self.local.layers) <= set(range(self.num_layers)):
      raise ValueError(f"DecoderConfig.local.layers={self.local.layers} names layers outside "
                       f"0..{self.num_layers - 1}")

  @property
  def head_width(self) -> int:
    """H, the width of one attention head."""
    return self.head_dim or self.embed_dim // self.num_heads

  @property
  def padded_vocab_size(self) -> int:
    """Vp, the rows of the embedding and LM head: vocab_size rounded up to vocab_multiple."""
    return round_up(self.vocab_size, self.vocab_multiple)

  @property
  def norm(self) -> str:
    """The fmjax.layers.Norm kind of every norm: Gemma's (1 + w) RMSNorm or plain RMSNorm."""
    return "rms_offset" if self.gemma else "rms"

  def blocks(self, runtime: Runtime) -> tuple[BlockConfig, ...]:
    """One BlockConfig per layer: causal, pre-norm, gated MLP, rotary; local layers slide.

    Args:
      runtime: how the model runs (its dropout rates, attention kernel and dtypes go in).

    Returns:
      num_layers BlockConfigs, equal except for the local layers' window and rotary base.
    """
    base = BlockConfig(
        num_heads=self.num_heads, head_dim=self.head_width, mlp_dim=self.mlp_dim,
        num_kv_heads=self.num_kv_heads, causal=True, pre_ln=True, norm=self.norm,
        norm_eps=self.norm_eps, mlp_activation=self.mlp_activation, gated_mlp=True,
        use_bias=self.attention_bias, mlp_bias=self.mlp_bias, rope=True,
        attention=self.attention,
        sandwich_norms=bool(self.gemma and self.gemma.sandwich_norms), **runtime.block_fields())
    if self.local is None:
      return (base,) * self.num_layers
    local = dataclasses.replace(base, attention=dataclasses.replace(
        self.attention, window=self.local.window, rope=self.local.rope or self.attention.rope))
    return tuple(local if i in self.local.layers else base for i in range(self.num_layers))


def _every(n: int, num_layers: int) -> tuple[int, ...]:
  """Local layer indices when every n-th layer (n, 2n, ...; 1-based) is global."""
  return tuple(i for i in range(num_layers) if (i + 1) % n)


PRESETS = {
    # Tiny shapes of each family, for tests and quick runs on a laptop CPU.
    "tiny": DecoderConfig(vocab_size=256, max_len=128, num_layers=2, embed_dim=64, mlp_dim=128,
                          num_heads=4, num_kv_heads=2),
    "gemma3_tiny": DecoderConfig(
        family="gemma3_text", vocab_size=256, max_len=128, num_layers=3, embed_dim=64,
        mlp_dim=128, num_heads=4, num_kv_heads=2, head_dim=32, norm_eps=1e-6,
        mlp_activation="gelu_tanh", tie_embeddings=True,
        attention=AttentionOptions(scale=32 ** -0.5, qk_norm=True, rope=Rope(1e6)),
        local=LocalLayers(window=8, layers=(0, 1), rope=Rope(1e4)),
        gemma=Gemma(sandwich_norms=True)),
    # Published shapes (config.json of each); parameter counts unpadded (vocab_multiple=1).
    # meta-llama/Llama-3.2-1B: 1,235,814,400 parameters (tied).
    "llama3_2_1b": DecoderConfig(
        vocab_size=128256, max_len=131072, num_layers=16, embed_dim=2048, mlp_dim=8192,
        num_heads=32, num_kv_heads=8, tie_embeddings=True,
        attention=AttentionOptions(rope=Rope(500_000.0, "llama3", 32.0, 1.0, 4.0, 8192))),
    # Qwen/Qwen2.5-0.5B: 494,032,768 parameters (tied).
    "qwen2_5_0_5b": DecoderConfig(
        family="qwen2", vocab_size=151936, max_len=32768, num_layers=24, embed_dim=896,
        mlp_dim=4864, num_heads=14, num_kv_heads=2, norm_eps=1e-6, tie_embeddings=True,
        attention=AttentionOptions(qkv_bias=True, rope=Rope(1_000_000.0))),
    # google/gemma-3-1b-pt: 999,885,952 parameters (tied).
    "gemma3_1b": DecoderConfig(
        family="gemma3_text", vocab_size=262144, max_len=32768, num_layers=26, embed_dim=1152,
        mlp_dim=6912, num_heads=4, num_kv_heads=1, head_dim=256, norm_eps=1e-6,
        mlp_activation="gelu_tanh", tie_embeddings=True,
        attention=AttentionOptions(scale=256 ** -0.5, qk_norm=True, rope=Rope(1_000_000.0)),
        local=LocalLayers(window=512, layers=_every(6, 26), rope=Rope(10_000.0)),
        gemma=Gemma(sandwich_norms=True)),
    # HuggingFaceTB/SmolLM2-135M(-Instruct): 134,515,008 parameters (tied).
    "smollm2_135m": DecoderConfig(
        vocab_size=49152, max_len=8192, num_layers=30, embed_dim=576, mlp_dim=1536,
        num_heads=9, num_kv_heads=3, tie_embeddings=True,
        attention=AttentionOptions(rope=Rope(100_000.0))),
}


def get_config(name: str, **overrides) -> DecoderConfig:
  """A preset by name with field overrides, e.g. get_config("tiny", vocab_size=1000).

  Args:
    name: a key of PRESETS.
    **overrides: DecoderConfig fields to replace.

  Returns:
    The DecoderConfig (validated by its __post_init__).

  Raises:
    ValueError: an unknown preset name, or an invalid field value.
  """
  if name not in PRESETS:
    raise ValueError(f"unknown decoder preset {name!r}; choose from {sorted(PRESETS)}")
  return dataclasses.replace(PRESETS[name], **overrides)


class Decoder(nn.Module):
  """The decoder-only language model (module docstring): tokens (B, T) -> logits (B, T, Vp).

  Attributes:
    config: the architecture.
    runtime: how it runs (kernel, remat, scan, dtypes, dropout).
  """
  config: DecoderConfig
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
      (B, T, Vp) float32 logits, the padded ids masked to -inf (layers.Embed); with a cache,
      `decode`'s (logits (B, Vp), cache).
    """
    c, rt = self.config, self.runtime
    dtype, param_dtype = rt.compute_dtype, rt.params_dtype
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    embed = Embed(c.vocab_size, c.embed_dim, dtype=dtype, param_dtype=param_dtype,
                  pad_to_multiple=c.vocab_multiple, name="wte")
    x = embed(tokens)  # (B, T, D)
    if c.gemma:  # sqrt(D) rounded to the compute dtype first, as Gemma does
      x = x * jnp.asarray(math.sqrt(c.embed_dim), dtype)
    x = nn.Dropout(rt.dropout_rate)(x, deterministic=not train)
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    stack = TransformerStack(c.blocks(rt), c.num_layers, scan=rt.scan_layers,
                             remat_policy=rt.remat_policy, name="blocks")
    if cache is not None:
      x, cache = stack(x, positions=positions, kv_mask=kv_mask, train=train, cache=cache,
                       cache_index=cache_index)
      x = x[:, -1:]  # only the last position's next-token distribution is needed
    else:
      x = stack(x, segment_ids=segment_ids, positions=positions, train=train)
    x = Norm(c.norm, epsilon=c.norm_eps, dtype=dtype, param_dtype=param_dtype, name="ln_f")(x)
    if c.tie_embeddings and cache is not None:
      logits = embed.attend_rows(x[:, 0])[:, None]  # (B, 1, Vp)
    elif c.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = Dense(c.padded_vocab_size, ("embed", "vocab"), use_bias=False, dtype=dtype,
                     kernel_init=zero_padding(default_kernel_init, c.vocab_size, axis=1),
                     param_dtype=param_dtype, name="lm_head")(x)
    logits = logits.astype(jnp.float32)
    if c.gemma and c.gemma.final_softcap:
      logits = c.gemma.final_softcap * jnp.tanh(logits / c.gemma.final_softcap)
    logits = mask_padded_logits(logits, c.vocab_size)  # after capping: tanh(-inf) is -1
    if cache is not None:
      return logits[:, 0], cache
    return logits

  def decode(self, tokens, cache, *, index, positions, kv_mask):
    """One step of incremental decoding: a prompt (prefill) or new tokens (T = 1).

    Args:
      tokens: (B, T) int ids, written at cache slots index .. index + T - 1.
      cache: from `init_cache` (B rows, S slots; a local layer keeps the last min(window, S)),
        holding slots 0 .. index - 1.
      index: int scalar (may be traced), the first slot written.
      positions: (B, T) int position of each token (a left-padded row starts at 0 after
        its padding).
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
      runtime.scan_layers), K the kv heads; a local layer's are (B, K, min(window, S), H).

    Raises:
      ValueError: scan_layers with local and global layers (their caches differ in length).
    """
    c, rt = self.config, self.runtime
    return transformer.init_cache(c.blocks(rt), c.num_layers, batch=batch, length=length,
                                  scan=rt.scan_layers)


def num_params(c: DecoderConfig) -> int:
  """Closed-form count of the stored parameters (vocabulary padded to vocab_multiple).

  Args:
    c: the config.

  Returns:
    The number of parameters.
  """
  d, f, v, h = c.embed_dim, c.mlp_dim, c.padded_vocab_size, c.head_width
  q, kv = c.num_heads * h, (c.num_kv_heads or c.num_heads) * h
  qkv_bias = c.attention_bias if c.attention.qkv_bias is None else c.attention.qkv_bias
  attn = d * q + 2 * d * kv + q * d + qkv_bias * (q + 2 * kv) + c.attention_bias * d
  attn += 2 * h if c.attention.qk_norm else 0
  mlp = 3 * d * f + c.mlp_bias * (2 * f + d)
  norms = (4 if c.gemma and c.gemma.sandwich_norms else 2) * d
  return c.num_layers * (attn + mlp + norms) + d + v * d + (0 if c.tie_embeddings else d * v)


def flops_per_token(c: DecoderConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward = 3x forward), PaLM appendix B style.

  6 * (matmul parameters: attention, gated MLP, the output projection over the padded
  vocabulary) + 12 * L * T * N * H for the attention scores and their use (local layers
  counted as global: the kernels compute whole blocks).

  Args:
    c: the config.
    seq_len: T, the sequence length.

  Returns:
    FLOPs per token, a float.
  """
  d, f, v, h, l = c.embed_dim, c.mlp_dim, c.padded_vocab_size, c.head_width, c.num_layers
  q, kv = c.num_heads * h, (c.num_kv_heads or c.num_heads) * h
  matmul = l * (2 * d * q + 2 * d * kv + 3 * d * f) + d * v
  return 6.0 * matmul + 12.0 * l * seq_len * q
