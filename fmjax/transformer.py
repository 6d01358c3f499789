"""Multi-head attention, the Transformer block and the layer stack, shared by every model.

Shape key: B batch, T length, S key length, D width, F MLP width, N heads, K kv heads,
H head dim.

Vaswani et al. 2017 ("Attention Is All You Need") with the usual variants: pre-LN (GPT-2,
ViT) or post-LN (BERT) blocks, grouped/multi-query kv heads, rotary or learned positions.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax import attention
from fmjax.layers import MLP, Dense, Norm, Rope, apply_rope

Dtype = Any
NORMS = ("layer", "rms")  # the kinds of fmjax.layers.Norm


def check_config(config, *, positive: tuple[str, ...] = (), choices: dict | None = None) -> None:
  """The checks every model config's __post_init__ shares.

  The `positive` integer fields, the enum fields of `choices` ({field: allowed values}), and
  heads that split the width (embed_dim by num_heads, num_heads by num_kv_heads when set).

  Args:
    config: the model config dataclass being checked (its class name goes in the messages).
    positive: names of fields that must be positive ints (not bools).
    choices: {field name: allowed values}, or None.

  Raises:
    ValueError: one line naming the config class, the field, its value and what to do.
  """
  name = type(config).__name__
  for field in positive:
    value = getattr(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f"{name}.{field}={value!r}: must be a positive integer")
  for field, allowed in (choices or {}).items():
    value = getattr(config, field)
    if value not in allowed:
      raise ValueError(f"{name}.{field}={value!r} is not one of {list(allowed)}; choose one "
                       "of them")
  d, n = getattr(config, "embed_dim", None), getattr(config, "num_heads", None)
  if d is not None and n is not None and d % n:
    raise ValueError(f"{name}.embed_dim={d} is not divisible by num_heads={n}: each head "
                     f"would get {d / n:g} dimensions; choose num_heads dividing embed_dim "
                     f"(e.g. {_divisor_near(d, n)})")
  k = getattr(config, "num_kv_heads", None)
  if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k <= 0 or n % k):
    raise ValueError(f"{name}.num_kv_heads={k!r} does not divide num_heads={n}: each kv head "
                     "serves a whole group of query heads; use a divisor of num_heads, or None "
                     "for one kv head per query head")


def _divisor_near(d: int, n: int) -> int:
  return min((m for m in range(1, d + 1) if d % m == 0), key=lambda m: (abs(m - n), m))


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
  """What modern decoders change inside attention; the defaults are Vaswani et al.'s.

  Attributes:
    scale: logit multiplier; None: head_dim ** -0.5 (Gemma 2/3: query_pre_attn_scalar ** -0.5).
    softcap: logits -> softcap * tanh(logits / softcap) (Gemma 2), or None.
    window: sliding window: a query sees itself and the window - 1 keys before it (Mistral,
      Gemma's local layers), or None.
    qk_norm: each head's queries and keys normalised (the block's norm kind, over H) before
      the rotary embedding (Qwen3, Gemma 3).
    qkv_bias: biases on the query, key and value projections; None: the block's use_bias
      (Qwen2: True, with no bias on the output projection).
    rope: the rotary frequencies (base, long-context scaling), used when BlockConfig.rope.
  """
  scale: float | None = None
  softcap: float | None = None
  window: int | None = None
  qk_norm: bool = False
  qkv_bias: bool | None = None
  rope: Rope = Rope()


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Everything that defines one Transformer block; models derive it from their own config."""
  num_heads: int
  head_dim: int
  mlp_dim: int
  num_kv_heads: int | None = None  # None: = num_heads (MHA); 1: MQA; else GQA.
  causal: bool = False
  pre_ln: bool = True  # False: post-LN as in the original Transformer and BERT.
  norm: str = "layer"  # "layer" | "rms"
  norm_eps: float = 1e-5
  mlp_activation: str = "gelu_tanh"
  gated_mlp: bool = False  # SwiGLU when True (with mlp_activation="silu").
  use_bias: bool = True
  rope: bool = False
  dropout_rate: float = 0.0  # residual and MLP dropout
  attention_dropout_rate: float = 0.0
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: AttentionOptions = AttentionOptions()
  mlp_bias: bool | None = None  # None: use_bias
  # Gemma 2/3: the attention and MLP outputs are normalised too before the residual adds.
  sandwich_norms: bool = False


class MultiHeadAttention(nn.Module):
  """Self-attention (kv=None) or cross-attention (kv given) with optional grouped kv heads.

  With `cache` (causal self-attention only) the T new tokens take slots cache_index ..
  cache_index + T - 1, the queries attend every earlier slot that kv_mask (and the window)
  allows, and the call returns (output, updated cache); see `init_cache`. A global layer's
  cache keeps every slot at its index; a sliding-window layer's keeps min(window, S) entries
  as a ring buffer (slot g at entry g % W). With `cross_cache` (cross-attention while
  decoding) the keys and values of the encoder output kv are projected once into it (kv
  given) or read from it (kv=None); kv_mask (B, S) masks source padding and the call returns
  (output, cross_cache).
  """
  config: BlockConfig

  @nn.compact
  def __call__(self, x, kv=None, *, q_segment_ids=None, kv_segment_ids=None, kv_mask=None,
               q_positions=None, kv_positions=None, causal=False, train: bool = False,
               cache=None, cache_index=None, cross_cache=None):
    """Attention of the queries of `x` over the keys and values of `kv` (or of `x` itself).

    Args:
      x: (B, T, D) float, the queries' inputs.
      kv: (B, S, D) float, the keys' and values' inputs (the encoder output for
        cross-attention); None for self-attention (kv = x). With `cross_cache`, None on the
        decoding steps after the first.
      q_segment_ids, kv_segment_ids: (B, T) and (B, S) int; attend only within equal ids
        (packed sequences). Give both or neither.
      kv_mask: (B, S) bool, False marks a padding key (with `cache`: a cache slot holding
        padding; with `cross_cache`: source padding).
      q_positions, kv_positions: (B, T) and (B, S) int positions for the rotary embedding
        (config.rope); default arange. They do not change the mask: causality is by index.
      causal: query t attends only keys s <= t.
      train: enables attention dropout (needs a "dropout" rng when its rate is > 0).
      cache: this layer's KV cache {"k", "v"}, each (B, K, S, H), or (B, K, min(window, S),
        H) for a sliding-window layer (see `init_cache`), for causal self-attention decoding;
        None otherwise.
      cache_index: int scalar, the cache slot of the first of the T new tokens (with `cache`).
      cross_cache: {"k", "v"}, each (B, K, S, H), the projected encoder keys and values while
        decoding (filled from `kv` when kv is given); None otherwise.

    Returns:
      (B, T, D) output in config.dtype; with `cache`: (output, updated cache); with
      `cross_cache`: (output, cross_cache).

    Raises:
      ValueError: a cache with cross-attention or segment ids.
    """
    c, o = self.config, self.config.attention
    num_kv = c.num_kv_heads or c.num_heads
    qkv_bias = c.use_bias if o.qkv_bias is None else o.qkv_bias
    proj = lambda feats, axes, name: Dense(feats, axes, use_bias=qkv_bias, dtype=c.dtype,
                                           param_dtype=c.param_dtype, name=name)
    key = proj((num_kv, c.head_dim), ("embed", "kv_heads", "head_dim"), "key")
    value = proj((num_kv, c.head_dim), ("embed", "kv_heads", "head_dim"), "value")
    q = proj((c.num_heads, c.head_dim), ("embed", "heads", "head_dim"), "query")(x)  # (B,T,N,H)
    out_proj = Dense(x.shape[-1], ("heads", "head_dim", "embed"), axis=(-2, -1),
                     use_bias=c.use_bias, dtype=c.dtype, param_dtype=c.param_dtype, name="out")
    if cross_cache is not None:
      return self._cached_cross(q, kv, key, value, out_proj, kv_mask, cross_cache)
    kv = x if kv is None else kv
    k, v = key(kv), value(kv)  # (B, S, K, H) each
    if o.qk_norm:  # over each head's H features, before rotating
      head_norm = lambda name: Norm(c.norm, epsilon=c.norm_eps, dtype=c.dtype,
                                    param_dtype=c.param_dtype, axes=("head_dim",), name=name)
      q, k = head_norm("query_norm")(q), head_norm("key_norm")(k)
    if c.rope:
      freq = o.rope.frequencies(c.head_dim)
      q = apply_rope(q, _positions(q_positions, x), freq=freq)
      k = apply_rope(k, _positions(kv_positions, kv), freq=freq)
    q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", None))
    if cache is not None:
      if kv is not x or q_segment_ids is not None:
        raise ValueError("a KV cache serves causal self-attention without segment ids; got "
                         "cross-attention or packed segments")
      new = {"k": k.transpose(0, 2, 1, 3), "v": v.transpose(0, 2, 1, 3)}  # (B, K, T, H)
      if o.window is None:
        out, cache = self._linear_cache(q, new, cache, cache_index, kv_mask)
      else:
        out, cache = self._ring_cache(q, new, cache, cache_index, kv_mask)
      out = nn.with_logical_constraint(out, ("batch", "length", "act_heads", None))
      return out_proj(out), cache
    # Positions only rotate q/k here: within packed documents (segment ids) index-causal
    # masking equals position-causal, and leaves splash/cuDNN free to use their own masks.
    dropout = c.attention_dropout_rate if train else 0.0
    out = attention.dot_product_attention(
        q, k, v, causal=causal, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        kv_mask=kv_mask, impl=c.attention_impl, dropout_rate=dropout,
        dropout_rng=self.make_rng("dropout") if dropout > 0 else None, scale=o.scale,
        window=o.window, softcap=o.softcap)  # (B,T,N,H)
    out = nn.with_logical_constraint(out, ("batch", "length", "act_heads", None))
    return out_proj(out)

  def _linear_cache(self, q, new, cache, index, kv_mask):
    """A global layer's cache, slot s at s: the T new keys and values (B, K, T, H) are written
    at index .. index + T - 1, then the queries attend every slot up to their own.
    Returns (output (B, T, N, H), cache (B, K, S, H) each)."""
    o = self.config.attention
    cache = {n: nn.with_logical_constraint(jax.lax.dynamic_update_slice(
        cache[n], new[n].astype(cache[n].dtype), (0, 0, index, 0)), CACHE_AXES)
             for n in ("k", "v")}  # (B, K, S, H)
    q_slots = index + jnp.arange(q.shape[1])[None]  # (1, T)
    out = attention.cached_attention(q, cache["k"], cache["v"], q_slots=q_slots,
                                     kv_mask=kv_mask, scale=o.scale, softcap=o.softcap)
    return out, cache

  def _ring_cache(self, q, new, cache, index, kv_mask):
    """A sliding-window layer's cache: a ring of W = min(window, S) entries, entry r holding
    the latest slot g <= index - 1 with g % W == r (attention.ring_slots).

    One rule for a prefill (T may exceed W) and a decoding step (T = 1): the queries attend
    [the ring as it was, the T new keys], each key masked by its slot (causality, the
    window, kv_mask gathered at the slot, empty entries), then the last min(T, W) new keys
    and values are written at their slot % W. A cache of S entries (W = S: no entry is ever
    reused) is a ring too, so a full-length cache gives the same answers.
    Returns (output (B, T, N, H), cache (B, K, W, H) each).
    """
    o = self.config.attention
    W, T = cache["k"].shape[2], q.shape[1]
    if kv_mask is not None and W < min(o.window, kv_mask.shape[1]):
      raise ValueError(f"a sliding-window layer's KV cache has {W} entries, but its window of "
                       f"{o.window} over {kv_mask.shape[1]} slots needs min(window, S) = "
                       f"{min(o.window, kv_mask.shape[1])}; make the cache with init_cache")
    slots = jnp.concatenate([attention.ring_slots(index, W),
                             index + jnp.arange(T, dtype=jnp.int32)])[None]  # (1, W + T)
    if kv_mask is not None:  # the mask of each key's slot; empty entries are masked by slot
      kv_mask = jnp.asarray(kv_mask, bool)[:, jnp.clip(slots[0], 0, kv_mask.shape[1] - 1)]
    keys = {n: jnp.concatenate([cache[n], new[n].astype(cache[n].dtype)], axis=2)
            for n in ("k", "v")}  # (B, K, W + T, H)
    out = attention.cached_attention(q, keys["k"], keys["v"], q_slots=slots[:, W:],
                                     kv_slots=slots, kv_mask=kv_mask, scale=o.scale,
                                     window=o.window, softcap=o.softcap)
    m = min(T, W)  # the new keys that stay: the last m, at distinct entries
    if m == 1:  # a decoding step: one entry, written in place
      write = lambda c, x: jax.lax.dynamic_update_slice(c, x, (0, 0, (index + T - 1) % W, 0))
    else:
      entries = (index + T - m + jnp.arange(m, dtype=jnp.int32)) % W
      write = lambda c, x: c.at[:, :, entries].set(x, unique_indices=True)
    cache = {n: nn.with_logical_constraint(
        write(cache[n], new[n][:, :, T - m:].astype(cache[n].dtype)), CACHE_AXES)
             for n in ("k", "v")}
    return out, cache

  def _cached_cross(self, q, kv, key, value, out_proj, kv_mask, cross_cache):
    """Cross-attention whose keys and values are projected once per source: from `kv` (the
    encoder output, first decoding step) into a fresh cross_cache, else read from it.
    Returns (output, cross_cache (B, K, S, H) each)."""
    if kv is not None:
      cross_cache = {"k": key(kv), "v": value(kv)}
      cross_cache = {n: nn.with_logical_constraint(
          t.transpose(0, 2, 1, 3).astype(self.config.dtype), CACHE_AXES) for n, t in cross_cache.items()}
    every_key = jnp.full((1, q.shape[1]), cross_cache["k"].shape[2] - 1)  # (1, T): no causality
    out = attention.cached_attention(q, cross_cache["k"], cross_cache["v"], q_slots=every_key,
                                     kv_mask=kv_mask)
    out = nn.with_logical_constraint(out, ("batch", "length", "act_heads", None))
    return out_proj(out), cross_cache


# Logical axes of a cache buffer (B, K, S, H): batch split like activations, kv heads like heads.
CACHE_AXES = ("batch", "act_heads", "length", None)


def cache_length(config: BlockConfig, length: int) -> int:
  """The KV cache entries one layer of `config` keeps when decoding `length` token slots.

  Args:
    config: the layer's BlockConfig.
    length: S, the token slots (prompt, padding included, plus new tokens).

  Returns:
    S for a global layer; min(window, S) for a sliding-window one (a ring buffer: a query
    never sees more than the window - 1 keys before it).
  """
  window = config.attention.window
  return length if window is None else min(window, length)


def init_cache(config: BlockConfig, num_layers: int, *, batch: int, length: int,
               scan: bool = False, dtype=None):
  """Zero KV cache for a TransformerStack of `num_layers` blocks of `config`.

  A global layer keeps all S slots; a sliding-window layer keeps min(window, S) entries,
  used as a ring buffer (`cache_length`; see MultiHeadAttention).

  Args:
    config: the blocks' BlockConfig (K = num_kv_heads or num_heads, H = head_dim), or one per
      layer (which must agree on K and H, and may differ in window).
    num_layers: L, the number of blocks.
    batch, length: B and S, the number of token slots (prompt, padding included, plus new tokens).
    scan: the stack's `scan`; the cache mirrors its parameter tree: {"layer_i": {"k", "v"}}, or
      {"layers": {"k", "v"}} stacked on a leading layer axis when scanned (which needs every
      layer's cache the same length).
    dtype: cache dtype, default the compute dtype.

  Returns:
    pytree of (B, K, S_i, H) zeros (or (L, B, K, S_0, H) when scanned), K the kv heads and
    S_i = cache_length(layer i's config, S).

  Raises:
    ValueError: a tuple of configs not one per layer, or a scanned stack whose layers' caches
      differ in length (e.g. Gemma's sliding-window and global layers).
  """
  configs = config if isinstance(config, tuple) else (config,) * num_layers
  if len(configs) != num_layers:
    raise ValueError(f"init_cache got {len(configs)} layer configs for num_layers={num_layers}; "
                     "give one per layer")
  first = configs[0]  # per-layer configs share K and H
  dtype = first.dtype if dtype is None else dtype
  shape = lambda c: (batch, first.num_kv_heads or first.num_heads, cache_length(c, length),
                     first.head_dim)
  if scan:
    lengths = sorted({cache_length(c, length) for c in configs})
    if len(lengths) > 1:
      raise ValueError(f"a scanned stack keeps one cache length for every layer, but these "
                       f"layers' caches differ ({lengths} of {length} slots: sliding-window and "
                       "global layers); use scan_layers=False")
    return {"layers": {n: jnp.zeros((num_layers, *shape(first)), dtype) for n in ("k", "v")}}
  return {f"layer_{i}": {n: jnp.zeros(shape(c), dtype) for n in ("k", "v")}
          for i, c in enumerate(configs)}


def _positions(positions, x):
  if positions is not None:
    return positions
  return jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])


class Block(nn.Module):
  """One Transformer layer: attention then MLP, each with a residual and a norm.

  pre-LN:  x + Attn(LN(x)), then x + MLP(LN(x))      (GPT-2, ViT)
  post-LN: LN(x + Attn(x)), then LN(x + MLP(x))      (original Transformer, BERT)

  The signature (x, segment_ids, positions, kv_mask, train, cache, cache_index) ->
  (x, cache) is the one nn.scan needs (x the carry, the layer's cache scanned), so the same
  block serves the Python loop and the scanned stack. Without a cache it returns (x, None);
  with one, kv_mask masks cache slots (see MultiHeadAttention).
  """
  config: BlockConfig

  @nn.compact
  def __call__(self, x, segment_ids, positions, kv_mask, train: bool, cache=None,
               cache_index=None):
    """One layer, in the signature nn.scan needs.

    Args:
      x: (B, T, D) float, the layer's input (nn.scan's carry).
      segment_ids: (B, T) int packed-document ids, or None (ignored with a cache).
      positions: (B, T) int positions for the rotary embedding, or None for arange.
      kv_mask: (B, S) bool, False for padding keys (with a cache: padding cache slots), or None.
      train: enables dropout (needs a "dropout" rng when a rate is > 0).
      cache: this layer's KV cache {"k", "v"} from `init_cache` (each (B, K, S, H), or
        (B, K, min(window, S), H) for a sliding-window layer), or None (no decoding).
      cache_index: int scalar, the cache slot of the first of the T tokens (with `cache`).

    Returns:
      (x, cache): the (B, T, D) output in config.dtype, and the updated cache (None without
      one).
    """
    c = self.config
    norm = lambda name: Norm(c.norm, epsilon=c.norm_eps, dtype=c.dtype,
                             param_dtype=c.param_dtype, name=name)
    drop = lambda y: nn.Dropout(c.dropout_rate)(y, deterministic=not train)
    new_cache = None

    def attn(y):
      nonlocal new_cache
      mha = MultiHeadAttention(c, name="attn")
      if cache is None:
        return mha(y, q_segment_ids=segment_ids, kv_segment_ids=segment_ids, kv_mask=kv_mask,
                   q_positions=positions, kv_positions=positions, causal=c.causal, train=train)
      y, new_cache = mha(y, kv_mask=kv_mask, q_positions=positions, kv_positions=positions,
                         causal=True, train=train, cache=cache, cache_index=cache_index)
      return y

    mlp_bias = c.use_bias if c.mlp_bias is None else c.mlp_bias
    mlp = lambda y: MLP(c.mlp_dim, c.mlp_activation, gated=c.gated_mlp, use_bias=mlp_bias,
                        dropout_rate=c.dropout_rate, dtype=c.dtype, param_dtype=c.param_dtype,
                        name="mlp")(y, train=train)
    if c.sandwich_norms:  # Gemma 2/3: x + LN(Attn(LN(x))), then x + LN(MLP(LN(x)))
      x = x + drop(norm("ln_attn_out")(attn(norm("ln_attn")(x))))
      x = x + drop(norm("ln_mlp_out")(mlp(norm("ln_mlp")(x))))
    elif c.pre_ln:
      x = x + drop(attn(norm("ln_attn")(x)))
      x = x + drop(mlp(norm("ln_mlp")(x)))
    else:
      x = norm("ln_attn")(x + drop(attn(x)))
      x = norm("ln_mlp")(x + drop(mlp(x)))
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    return x, new_cache


class DecoderBlock(nn.Module):
  """A decoder layer of an encoder-decoder Transformer (Vaswani et al. 2017, figure 1 right):
  causal self-attention, cross-attention over the encoder output, MLP; residuals and norms
  as in `Block` (pre-LN: x + CrossAttn(LN(x), memory), ...).

  Training: __call__(x, memory, memory_mask) -> (x, None). Decoding: `cache` is
  {"self": {"k", "v"} (B, K, S_tgt, H), "cross": {"k", "v"} (B, K, S_src, H)}; memory is given
  on the first step only (its keys and values go into cache["cross"]); returns (x, cache).
  causal=False (training only) lets every target see every other: DETR's object queries.
  """
  config: BlockConfig
  causal: bool = True

  @nn.compact
  def __call__(self, x, memory, memory_mask, *, positions=None, kv_mask=None,
               train: bool = False, cache=None, cache_index=None):
    """One decoder layer: causal self-attention, cross-attention over `memory`, MLP.

    Args:
      x: (B, T, D) float, the target tokens' representations.
      memory: (B, S, D) float, the encoder output; while decoding, given on the first step
        only (None after: the cross keys and values are read from cache["cross"]).
      memory_mask: (B, S) bool, False on source padding, or None.
      positions: (B, T) int positions for the rotary embedding, or None for arange.
      kv_mask: (B, S_tgt) bool, False for self-attention cache slots holding padding (decoding),
        or None.
      train: enables dropout (needs a "dropout" rng when a rate is > 0).
      cache: {"self": {"k", "v"} (B, K, S_tgt, H), "cross": {"k", "v"} (B, K, S, H)} while
        decoding (see `init_decoder_cache`), or None for training.
      cache_index: int scalar, the self-attention cache slot of the first of the T tokens.

    Returns:
      (x, cache): the (B, T, D) output in config.dtype, and the updated cache (None without
      one).
    """
    c = self.config
    norm = lambda name: Norm(c.norm, epsilon=c.norm_eps, dtype=c.dtype,
                             param_dtype=c.param_dtype, name=name)
    drop = lambda y: nn.Dropout(c.dropout_rate)(y, deterministic=not train)
    new_cache = None if cache is None else {}

    def self_attn(y):
      mha = MultiHeadAttention(c, name="attn")
      if cache is None:
        return mha(y, q_positions=positions, kv_positions=positions, causal=self.causal,
                   train=train)
      y, new_cache["self"] = mha(y, kv_mask=kv_mask, q_positions=positions,
                                 kv_positions=positions, causal=True, cache=cache["self"],
                                 cache_index=cache_index)
      return y

    def cross_attn(y):
      mha = MultiHeadAttention(c, name="cross")
      if cache is None:
        return mha(y, memory, kv_mask=memory_mask, train=train)
      y, new_cache["cross"] = mha(y, memory, kv_mask=memory_mask, cross_cache=cache["cross"])
      return y

    mlp = lambda y: MLP(c.mlp_dim, c.mlp_activation, gated=c.gated_mlp, use_bias=c.use_bias,
                        dropout_rate=c.dropout_rate, dtype=c.dtype, param_dtype=c.param_dtype,
                        name="mlp")(y, train=train)
    for name, sublayer in (("ln_attn", self_attn), ("ln_cross", cross_attn), ("ln_mlp", mlp)):
      if c.pre_ln:
        x = x + drop(sublayer(norm(name)(x)))
      else:
        x = norm(name)(x + drop(sublayer(x)))
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    return x, new_cache


def init_decoder_cache(config: BlockConfig, num_layers: int, *, batch: int, length: int,
                       source_length: int, dtype=None):
  """Zero caches for `num_layers` DecoderBlocks.

  {"layer_i": {"self": {"k", "v"}, "cross": {"k", "v"}}}, (B, K, length, H) for
  self-attention and (B, K, source_length, H) for the cross-attention keys (filled by the
  first decoding step).

  Args:
    config: the blocks' BlockConfig (K = num_kv_heads or num_heads, H = head_dim).
    num_layers: the number of DecoderBlocks.
    batch: B.
    length: the target token slots (prompt plus new tokens).
    source_length: S, the encoder output's length.
    dtype: cache dtype, default the compute dtype.

  Returns:
    The nested dict of zeros described above.
  """
  self_cache = init_cache(config, 1, batch=batch, length=length, dtype=dtype)["layer_0"]
  cross = init_cache(config, 1, batch=batch, length=source_length, dtype=dtype)["layer_0"]
  return {f"layer_{i}": {"self": self_cache, "cross": cross} for i in range(num_layers)}


# Named rematerialisation policies: what the backward pass may keep instead of recomputing.
REMAT_POLICIES = {
    "none": None,  # no remat: keep every activation (fastest, most memory)
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class TransformerStack(nn.Module):
  """`num_layers` blocks, as a Python loop or as one nn.scan over stacked parameters.

  scan=True compiles one block and stacks its parameters on a leading "layers" axis:
  compile time stops growing with depth. remat_policy names an entry of REMAT_POLICIES.

  With `cache` (from `init_cache`, causal stacks only) the call is one step of incremental
  decoding: the T tokens of x are written at cache slots cache_index .. cache_index + T - 1,
  kv_mask (B, S) marks the cache slots that hold real tokens, positions (B, T) are the
  tokens' positions, and it returns (x, updated cache). Sliding-window layers keep only
  min(window, S) entries (a ring buffer), so a scanned stack needs every layer alike.

  `config` may be a tuple of one BlockConfig per layer (Gemma's sliding-window layers between
  global ones, each with its own window and rotary base); a scanned stack needs them equal.
  """
  config: BlockConfig | tuple[BlockConfig, ...]
  num_layers: int
  scan: bool = False
  remat_policy: str = "none"

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, kv_mask=None, train: bool = False,
               cache=None, cache_index=None):
    """The `num_layers` blocks applied in turn.

    Args:
      x: (B, T, D) float, the embedded tokens.
      segment_ids: (B, T) int packed-document ids (attention stays within a document), or None.
      positions: (B, T) int positions for the rotary embedding, or None for arange.
      kv_mask: (B, S) bool, False for padding keys (with a cache: padding cache slots), or None.
      train: enables dropout (needs a "dropout" rng when a rate is > 0).
      cache: a KV cache from `init_cache` (causal stacks only), or None.
      cache_index: int scalar, the cache slot of the first of the T tokens (with `cache`).

    Returns:
      (B, T, D) in config.dtype; with `cache`: (x, updated cache).

    Raises:
      ValueError: an unknown remat_policy, or a cache on a non-causal stack.
    """
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"unknown remat_policy {self.remat_policy!r}; "
                       f"choose from {sorted(REMAT_POLICIES)}")
    block = Block
    if self.remat_policy != "none":
      block = nn.remat(Block, policy=REMAT_POLICIES[self.remat_policy],
                       prevent_cse=not self.scan, static_argnums=(5,))  # 5: `train` (self is 0)
    configs = self._configs()
    if cache is not None:
      return self._decode(block, x, positions, kv_mask, train, cache, cache_index)
    if self.scan:
      scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                        length=self.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = scanned(configs[0], name="layers")(x, segment_ids, positions, kv_mask, train)
    else:
      for i in range(self.num_layers):
        x, _ = block(configs[i], name=f"layer_{i}")(x, segment_ids, positions, kv_mask, train)
    return x

  def _configs(self) -> tuple[BlockConfig, ...]:
    """One BlockConfig per layer; a scanned stack's must all be equal."""
    if not isinstance(self.config, tuple):
      return (self.config,) * self.num_layers
    if len(self.config) != self.num_layers:
      raise ValueError(f"TransformerStack got {len(self.config)} layer configs for num_layers="
                       f"{self.num_layers}; give one per layer")
    if self.scan and len(set(self.config)) > 1:
      raise ValueError("scan_layers=True stacks identical layers, but these layers differ (e.g. "
                       "sliding-window and global attention); use scan_layers=False")
    return self.config

  def _decode(self, block, x, positions, kv_mask, train, cache, cache_index):
    """The stack over a KV cache laid out as `init_cache` makes it; returns (x, cache)."""
    configs = self._configs()
    if not all(c.causal for c in configs):
      raise ValueError("a KV cache needs a causal stack (BlockConfig.causal=True)")
    if self.scan:
      scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                        in_axes=(nn.broadcast,) * 4 + (0, nn.broadcast),
                        length=self.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      x, layers = scanned(configs[0], name="layers")(x, None, positions, kv_mask, train,
                                                      cache["layers"], cache_index)
      return x, {"layers": layers}
    new = {}
    for i in range(self.num_layers):
      name = f"layer_{i}"
      x, new[name] = block(configs[i], name=name)(x, None, positions, kv_mask, train,
                                                   cache[name], cache_index)
    return x, new
