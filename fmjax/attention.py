"""Dot-product attention, softmax(Q K^T * scale + mask) V, written once with several backends.

Shape key: B batch, T query length, S key length, N query heads, K kv heads, G = N // K query heads
per kv head (grouped-query attention; K == 1 is multi-query), H head dim.

Papers: Vaswani et al. 2017 (attention); Shazeer 2019 and Ainslie et al. 2023 (multi-query and
grouped-query attention); Rabe & Staats 2021 and Dao et al. 2022/2023 (memory-efficient "flash"
attention, which `chunked` follows, including its recomputing backward pass).

One masking rule for every backend: query t may attend key s iff kv_mask[s] and
q_segment_ids[t] == kv_segment_ids[s] and, when causal, q_positions[t] >= kv_positions[s], and,
with a sliding window w, q_positions[t] - kv_positions[s] < w (Beltagy et al. 2020; Mistral,
Gemma 2/3 local layers: a query sees itself and the w - 1 keys before it).
A query with no key it may attend (e.g. a padding query) outputs zeros and gets zero gradient.
Logit soft-capping (Gemma 2) replaces each scaled logit l by cap * tanh(l / cap) before masking.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("xla", "chunked", "cudnn", "splash", "auto")

# A finite "minus infinity": -inf logits would give exp(-inf - -inf) = NaN in fully masked rows.
# 0.7 * max (the splash kernel's choice) leaves headroom: subtracting a row max cannot overflow.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# `auto` off TPU/GPU: xla materialises B*N*T*S float32 logits, so above this many logits per head
# (64 MiB per head and example) it switches to chunked, whose memory grows like T*chunk_size.
_AUTO_CHUNKED_MIN_LOGITS = 4096 * 4096
# Query block of the xla path's causal skipping (T a multiple of it and at least two blocks).
_CAUSAL_BLOCK = 128
# Splash masks keys only through segment ids, so padding keys get an id no query is given.
_NO_SEGMENT = int(np.iinfo(np.int32).min)
_F32 = jnp.float32


def make_attention_mask(*, q_len, kv_len, causal=False, q_segment_ids=None, kv_segment_ids=None,
                        kv_mask=None, q_positions=None, kv_positions=None, window=None):
  """Boolean attention mask, True where query t may attend key s.

  Args:
    q_len, kv_len: T and S.
    causal: if True, a query attends only keys whose position is <= its own.
    q_segment_ids, kv_segment_ids: (B, T) and (B, S) int; attend only within equal ids (packed
      sequences). Give both or neither.
    kv_mask: (B, S) bool; False marks a padding key.
    q_positions, kv_positions: (B, T) and (B, S) int positions used by `causal`; default
      arange. A KV-cache decode step passes q_positions=[[t]] to attend keys 0..t of the cache.
    window: sliding window w (an int >= 1): keys fewer than w positions before the query; None
      for no window.

  Returns:
    (B or 1, 1, T, S) bool; the batch axis is 1 when no per-example input is given.
  """
  _check_window(window)
  inputs = _mask_inputs(q_len, kv_len, q_segment_ids, kv_segment_ids, kv_mask, q_positions,
                        kv_positions)
  return _mask_block(*inputs, causal, window)[:, None]


def dot_product_attention(q, k, v, *, causal=False, q_segment_ids=None, kv_segment_ids=None,
                          kv_mask=None, q_positions=None, kv_positions=None, scale=None,
                          impl="xla", dropout_rate=0.0, dropout_rng=None, chunk_size=512,
                          window=None, softcap=None):
  """Multi-head, grouped-query or multi-query attention.

  Args:
    q: (B, T, N, H) queries.
    k, v: (B, S, K, H) keys and values, N % K == 0.
    causal, q_segment_ids, kv_segment_ids, kv_mask, q_positions, kv_positions: the mask, as in
      `make_attention_mask`; it is never materialised by `chunked` or `splash`.
    scale: logit multiplier (a Python float), default H ** -0.5.
    impl: one of IMPLEMENTATIONS. "xla" einsum reference; "chunked" online-softmax loop over
      chunk_size blocks, O(T * chunk_size) memory in forward and backward; "cudnn" cuDNN flash
      attention (NVIDIA GPU, bf16/fp16); "splash" Pallas TPU kernel (TPU only, no custom
      positions; see `splash_attention` to run it in the interpreter); "auto" picks splash on TPU,
      cudnn on GPU when supported, else xla, or chunked above 4096*4096 logits per head, and
      always xla while dropout is active.
    dropout_rate, dropout_rng: dropout on the attention probabilities, applied only when
      rate > 0 and an rng is given; only "xla" supports it.
    chunk_size: block length of "chunked" (queries and keys); any S, padded internally.
    window: sliding-window length (int >= 1) or None; see the module docstring. Every kernel
      supports it (splash as a local mask, cudnn as a dense mask; auto does not pick cudnn).
    softcap: logit cap (float > 0) or None: logits -> softcap * tanh(logits / softcap) (Gemma 2).
      xla, chunked and splash support it, cudnn refuses it (auto does not pick cudnn).

  Returns:
    (B, T, N, H) in q.dtype. Softmax is always computed in float32.
  """
  _check_shapes(q, k, v)
  _check_window(window)
  if softcap is not None and not softcap > 0:
    raise ValueError(f"softcap={softcap!r} must be a positive float (or None for no capping)")
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"Unknown attention impl {impl!r}; choose one of {IMPLEMENTATIONS}.")
  (_, T, N, H), S = q.shape, k.shape[1]
  dropout = dropout_rate > 0 and dropout_rng is not None
  has_positions = q_positions is not None or kv_positions is not None
  if impl == "auto":
    impl = _auto_impl(q, S, dropout, has_positions, window is not None or softcap is not None)
  if softcap is not None and impl == "cudnn":
    raise ValueError(f"impl='cudnn' does not support logit soft-capping (softcap={softcap}); "
                     "use impl='chunked' (O(T) memory), 'xla' or 'auto'")
  if dropout and impl != "xla":
    raise ValueError(f"Attention dropout (rate {dropout_rate}) is only supported by impl='xla', "
                     f"not impl={impl!r}; use impl='xla' or set dropout_rate=0.")
  scale = H ** -0.5 if scale is None else scale
  inputs = _mask_inputs(T, S, q_segment_ids, kv_segment_ids, kv_mask, q_positions, kv_positions)
  if impl == "xla":
    # Causal self-attention in index order skips the masked upper triangle block-wise.
    block = _CAUSAL_BLOCK if (causal and T == S and not has_positions and T % _CAUSAL_BLOCK == 0
                              and T >= 2 * _CAUSAL_BLOCK) else None
    return _xla(q, k, v, _mask_block(*inputs, causal, window), scale,
                dropout_rate if dropout else 0.0, dropout_rng, causal_block=block, softcap=softcap)
  if impl == "chunked":
    return _chunked(q, k, v, inputs, causal, scale, chunk_size, window, softcap)
  if impl == "cudnn":
    only_causal = (not has_positions and q_segment_ids is None and kv_mask is None
                   and window is None)
    return _cudnn(q, k, v, inputs, causal, scale, only_causal, window)
  if jax.default_backend() != "tpu":
    raise ValueError(f"impl='splash' needs a TPU, but the backend is {jax.default_backend()!r}. "
                     "Use impl='auto', or splash_attention(..., interpret=True) for a slow test "
                     "run on CPU.")
  if has_positions:
    raise ValueError("impl='splash' masks causally by index and cannot take q_positions or "
                     "kv_positions; drop them (e.g. use them only for RoPE) or use impl='chunked'.")
  return splash_attention(q, k, v, causal=causal, q_segment_ids=q_segment_ids,
                          kv_segment_ids=kv_segment_ids, kv_mask=kv_mask, scale=scale,
                          window=window, softcap=softcap)


def _check_window(window):
  if window is not None and (isinstance(window, bool) or not isinstance(window, (int, np.integer))
                             or window < 1):
    raise ValueError(f"window={window!r} must be a positive int (the keys a query sees: itself "
                     "and the window - 1 before it), or None for no sliding window")


def _softcap(logits, cap):
  """cap * tanh(logits / cap), or logits when cap is None."""
  return logits if cap is None else cap * jnp.tanh(logits / cap)


def _check_shapes(q, k, v):
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
    raise ValueError(f"Expected q (B,T,N,H) and k, v (B,S,K,H); got {q.shape}, {k.shape}, "
                     f"{v.shape}.")
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
    raise ValueError(f"q {q.shape} and k {k.shape} need equal B and H, and N a multiple of K.")


def _auto_impl(q, S, dropout, has_positions, window_or_softcap=False):
  """The fastest implementation that supports this call (see dot_product_attention)."""
  T, H = q.shape[1], q.shape[3]
  backend = jax.default_backend()
  if dropout:
    return "xla"
  if backend == "tpu" and not has_positions and min(T, S) >= 128:  # shorter pads to a 128 block
    return "splash"
  # cuDNN takes a window only as a dense (T, S) mask, and no soft-capping; with a mask (a bias
  # to cuDNN) its backward pass needs even lengths (seen on an H200: "Unsupported sequence
  # length Q 37, KV 45"), and auto cannot know whether a mask or a gradient will come.
  if backend == "gpu" and not window_or_softcap and q.dtype in (jnp.bfloat16, jnp.float16) \
      and H <= 128 and H % 8 == 0 and T % 2 == 0 and S % 2 == 0:
    return "cudnn"
  return "chunked" if T * S > _AUTO_CHUNKED_MIN_LOGITS else "xla"


def _mask_inputs(T, S, q_seg, kv_seg, kv_mask, q_pos, kv_pos):
  """Every mask ingredient as a (B or 1, length) array, with defaults that mask nothing."""
  if (q_seg is None) != (kv_seg is None):
    raise ValueError("Give both q_segment_ids and kv_segment_ids, or neither (self-attention "
                     "passes the same ids twice).")
  q_pos = jnp.arange(T)[None] if q_pos is None else jnp.asarray(q_pos)
  kv_pos = jnp.arange(S)[None] if kv_pos is None else jnp.asarray(kv_pos)
  q_seg = jnp.zeros((1, T), jnp.int32) if q_seg is None else jnp.asarray(q_seg)
  kv_seg = jnp.zeros((1, S), jnp.int32) if kv_seg is None else jnp.asarray(kv_seg)
  kv_ok = jnp.ones((1, S), bool) if kv_mask is None else jnp.asarray(kv_mask, bool)
  for name, x, n in (("q_positions", q_pos, T), ("kv_positions", kv_pos, S),
                     ("q_segment_ids", q_seg, T), ("kv_segment_ids", kv_seg, S),
                     ("kv_mask", kv_ok, S)):
    if x.ndim != 2 or x.shape[1] != n:
      raise ValueError(f"{name} must have shape (B, {n}); got {x.shape}.")
  return q_pos, q_seg, kv_pos, kv_seg, kv_ok


def _mask_block(q_pos, q_seg, kv_pos, kv_seg, kv_ok, causal, window=None):
  """(B or 1, t, s) bool mask of a block of t queries and s keys."""
  mask = (q_seg[:, :, None] == kv_seg[:, None, :]) & kv_ok[:, None, :]
  if causal:
    mask &= q_pos[:, :, None] >= kv_pos[:, None, :]
  if window is not None:
    mask &= q_pos[:, :, None] - kv_pos[:, None, :] < window
  return mask


def _einsum(eq, x, y):
  """Einsum in y's dtype (x is cast, e.g. float32 probabilities to bf16), float32 result."""
  return jnp.einsum(eq, x.astype(y.dtype), y, preferred_element_type=_F32)


def _xla(q, k, v, mask, scale, dropout_rate, dropout_rng, causal_block=None, softcap=None):
  """Einsum attention in the (B, K, G, T, H) layout that batched matmuls want.

  causal_block: with a causal mask over T == S in plain index order, queries are taken in
  blocks of this many and each block only sees keys up to its end, skipping the masked upper
  triangle's matmuls and softmax work (about half of it at two blocks).
  """
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, K, S, H)
  return _xla_heads_first(q, k, v, mask, scale, dropout_rate, dropout_rng, causal_block,
                          softcap)


def _xla_heads_first(q, k, v, mask, scale, dropout_rate=0.0, dropout_rng=None,
                     causal_block=None, softcap=None):
  """_xla with k, v already in (B, K, S, H), the layout a KV cache is kept in."""
  B, T, N, H = q.shape
  K = k.shape[1]
  # G query heads share each kv head; k, v are never repeated.
  q = q.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)  # (B, K, G, T, H)
  mask = mask[:, None, None]  # (B|1, 1, 1, T, S)
  blocks = [(0, T, k.shape[2])] if not causal_block else \
      [(i, i + causal_block, i + causal_block) for i in range(0, T, causal_block)]
  outs = []
  for n, (lo, hi, kv_end) in enumerate(blocks):
    m = mask[..., lo:hi, :kv_end]
    logits = _softcap(_einsum("BKGTH,BKSH->BKGTS", q[..., lo:hi, :], k[:, :, :kv_end]) * scale,
                      softcap)
    probs = jax.nn.softmax(jnp.where(m, logits, _MASK_VALUE), axis=-1)
    # Rows with no allowed key would be uniform over masked keys; zero them (finite, zero grads).
    probs = jnp.where(m, probs, 0.0)
    if dropout_rate > 0:
      keep = jax.random.bernoulli(jax.random.fold_in(dropout_rng, n), 1.0 - dropout_rate,
                                  probs.shape)
      probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    outs.append(_einsum("BKGTS,BKSH->BKGTH", probs, v[:, :, :kv_end]))
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)  # (B, K, G, T, H)
  return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q.dtype)


def cached_attention(q, k_cache, v_cache, *, q_slots, kv_slots=None, kv_mask=None, scale=None,
                     window=None, softcap=None):
  """Attention of T new queries over a KV cache (incremental decoding).

  The cache keeps keys and values heads-first, (B, K, S, H), the layout the einsums below
  contract over, so a decoding step never transposes the cache. Every key has a slot: the
  index of the token that wrote it among all tokens fed to the model (prompt padding
  included). In a linear cache slot s sits at s (kv_slots None); a sliding-window layer's
  ring buffer keeps only the latest slots (see `ring_slots`) and passes their kv_slots.

  Args:
    q: (B, T, N, H) queries of the tokens just written at slots q_slots.
    k_cache, v_cache: (B, K, S, H) keys and values, the new ones included.
    q_slots: (B or 1, T) int slot of each query; it attends slots <= q_slots[t] (causal).
    kv_slots: (B or 1, S) int slot of each key, negative for an empty one (never attended);
      None: arange(S).
    kv_mask: (B or 1, S) bool per key, False for keys of padding tokens; default all True.
    scale: logit multiplier, default H ** -0.5.
    window: sliding window: a query attends slots q_slots[t] - window < s <= q_slots[t] (a
      row's real tokens fill consecutive slots, so slots count positions); None: no window.
    softcap: logit soft-capping as in dot_product_attention, or None.

  Returns:
    (B, T, N, H) in q.dtype, equal to dot_product_attention(impl="xla") over the same keys.
  """
  B, T, N, H = q.shape
  if k_cache.ndim != 4 or k_cache.shape != v_cache.shape or k_cache.shape[0] != B \
      or k_cache.shape[3] != H or N % k_cache.shape[1]:
    raise ValueError(f"Expected q (B,T,N,H) and caches (B,K,S,H) with N % K == 0; got "
                     f"{q.shape}, {k_cache.shape}, {v_cache.shape}.")
  S = k_cache.shape[2]
  q_slots = jnp.asarray(q_slots)
  kv_slots = jnp.arange(S)[None] if kv_slots is None else jnp.asarray(kv_slots)
  kv_ok = jnp.ones((1, S), bool) if kv_mask is None else jnp.asarray(kv_mask, bool)
  if kv_slots.ndim != 2 or kv_slots.shape[1] != S or kv_ok.ndim != 2 or kv_ok.shape[1] != S:
    raise ValueError(f"kv_slots and kv_mask must have shape (B or 1, {S}), one per cached key; "
                     f"got {kv_slots.shape} and {kv_ok.shape}")
  _check_window(window)
  mask = _mask_block(q_slots, jnp.zeros((1, T), jnp.int32), kv_slots,
                     jnp.zeros((1, S), jnp.int32), kv_ok & (kv_slots >= 0), True,
                     window)  # (B|1, T, S)
  scale = H ** -0.5 if scale is None else scale
  return _xla_heads_first(q, k_cache, v_cache, mask, scale, softcap=softcap)


def ring_slots(index, size: int):
  """The slot held by each entry of a ring buffer of `size` entries before slot `index` is
  written (a sliding-window layer's KV cache): entry r holds the latest slot g <= index - 1
  with g % size == r, or nothing yet (g < 0).

  Args:
    index: int scalar (may be traced), the first slot about to be written.
    size: W, the ring's entries.

  Returns:
    (W,) int32 slots, negative for entries not written yet. E.g. index 6, size 4: [4, 5, 2, 3].
  """
  r = jnp.arange(size, dtype=jnp.int32)
  return index - 1 - jnp.mod(index - 1 - r, size)


def _chunks(x, size):
  """(B, L, ...) -> (L // size, B, size, ...): a leading axis for lax.scan to loop over."""
  return jnp.moveaxis(x.reshape(x.shape[0], -1, size, *x.shape[2:]), 1, 0)


def _unchunk(x):
  """Inverse of _chunks: (n, B, size, ...) -> (B, n * size, ...)."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])


def _pad_to(x, multiple, value=0):
  """Pads axis 1 of x up to a multiple of `multiple`."""
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, -x.shape[1] % multiple)
  return jnp.pad(x, pad, constant_values=value)


def _chunked(q, k, v, inputs, causal, scale, chunk_size, window=None, softcap=None):
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  bq, bk = min(chunk_size, T), min(chunk_size, S)
  q_pos, q_seg, kv_pos, kv_seg, kv_ok = inputs
  # Padding queries are sliced off below; padding keys are masked through kv_ok = False.
  q_pos, q_seg = _pad_to(q_pos, bq), _pad_to(q_seg, bq)
  kv_pos, kv_seg, kv_ok = _pad_to(kv_pos, bk), _pad_to(kv_seg, bk), _pad_to(kv_ok, bk, False)
  qg = _pad_to(q.reshape(B, T, K, N // K, H), bq)
  static = (causal, float(scale), bq, bk, window, None if softcap is None else float(softcap))
  out = _flash(static, qg, _pad_to(k, bk), _pad_to(v, bk),
               (q_pos, q_seg, kv_pos, kv_seg, kv_ok))
  return out[:, :T].reshape(B, T, N, H)


def _block_logits(static, qb, kb, q_pos, q_seg, kv_in):
  """Masked float32 logits (B, K, G, bq, bk) of one query block against one key block, the
  mask, and d(logits)/d(unscaled q.k) (scale, times 1 - tanh^2 under soft-capping)."""
  causal, scale, _, _, window, softcap = static
  kv_pos, kv_seg, kv_ok = kv_in
  mask = _mask_block(q_pos, q_seg, kv_pos, kv_seg, kv_ok, causal, window)[:, None, None]
  logits = _einsum("BTKGH,BSKH->BKGTS", qb, kb) * scale
  slope = scale
  if softcap is not None:
    t = jnp.tanh(logits / softcap)
    logits, slope = softcap * t, scale * (1 - t * t)
  return jnp.where(mask, logits, _MASK_VALUE), mask, slope


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))  # (causal, scale, bq, bk, window, cap)
def _flash(static, q, k, v, inputs):
  return _flash_fwd(static, q, k, v, inputs)[0]


def _flash_fwd(static, q, k, v, inputs):
  """Online softmax: q (B, T, K, G, H), k, v (B, S, K, H), T and S multiples of the blocks."""
  bq, bk = static[2:4]
  q_pos, q_seg, kv_pos, kv_seg, kv_ok = inputs
  kv_blocks = (_chunks(k, bk), _chunks(v, bk),
               (_chunks(kv_pos, bk), _chunks(kv_seg, bk), _chunks(kv_ok, bk)))

  def q_block(xs):
    qb, qpb, qsb = xs

    def kv_step(carry, kv):
      m, l, acc = carry  # running max and sum (B, K, G, bq); unnormalised output (B, K, G, bq, H)
      kb, vb, kv_in = kv
      logits, mask, _ = _block_logits(static, qb, kb, qpb, qsb, kv_in)
      m_new = jnp.maximum(m, logits.max(-1))
      p = jnp.where(mask, jnp.exp(logits - m_new[..., None]), 0.0)
      alpha = jnp.exp(m - m_new)  # rescales what was summed under the old maximum
      acc = alpha[..., None] * acc + _einsum("BKGTS,BSKH->BKGTH", p, vb)
      return (m_new, alpha * l + p.sum(-1), acc), None

    B, _, K, G, H = qb.shape
    init = (jnp.full((B, K, G, bq), _MASK_VALUE, _F32), jnp.zeros((B, K, G, bq), _F32),
            jnp.zeros((B, K, G, bq, H), _F32))
    (m, l, acc), _ = jax.lax.scan(kv_step, init, kv_blocks)
    l = jnp.where(l == 0, 1.0, l)  # no allowed key: acc == 0, so the output is 0
    out = jnp.einsum("BKGTH->BTKGH", acc / l[..., None]).astype(qb.dtype)
    return out, jnp.einsum("BKGT->BTKG", m + jnp.log(l))  # logsumexp, for the backward pass

  out, lse = jax.lax.map(q_block, (_chunks(q, bq), _chunks(q_pos, bq), _chunks(q_seg, bq)))
  out, lse = _unchunk(out), _unchunk(lse)
  return out, (q, k, v, inputs, out, lse)


def _flash_bwd(static, res, dout):
  """Recomputes each probability block from the saved logsumexp, so memory stays O(T * block)."""
  bq, bk = static[2:4]
  q, k, v, inputs, out, lse = res
  q_pos, q_seg, kv_pos, kv_seg, kv_ok = inputs
  delta = jnp.einsum("BTKGH,BTKGH->BTKG", dout.astype(_F32), out.astype(_F32))  # rowsum(dP * P)
  kv_blocks = (_chunks(k, bk), _chunks(v, bk),
               (_chunks(kv_pos, bk), _chunks(kv_seg, bk), _chunks(kv_ok, bk)))

  def q_block(dkv, xs):
    qb, dob, lseb, deltab, qpb, qsb = xs
    lseb, deltab = jnp.einsum("BTKG->BKGT", lseb), jnp.einsum("BTKG->BKGT", deltab)

    def kv_step(dq, kv):
      kb, vb, kv_in = kv
      logits, mask, slope = _block_logits(static, qb, kb, qpb, qsb, kv_in)
      p = jnp.exp(jnp.where(mask, logits - lseb[..., None], -jnp.inf))  # exactly 0 where masked
      dp = _einsum("BTKGH,BSKH->BKGTS", dob, vb)
      ds = p * (dp - deltab[..., None]) * slope  # gradient w.r.t. the unscaled logits
      dq = dq + _einsum("BKGTS,BSKH->BTKGH", ds, kb)
      return dq, (_einsum("BKGTS,BTKGH->BSKH", ds, qb), _einsum("BKGTS,BTKGH->BSKH", p, dob))

    dq, (dk, dv) = jax.lax.scan(kv_step, jnp.zeros(qb.shape, _F32), kv_blocks)
    return (dkv[0] + dk, dkv[1] + dv), dq

  zeros = jnp.zeros(kv_blocks[0].shape, _F32)
  (dk, dv), dq = jax.lax.scan(
      q_block, (zeros, zeros),
      tuple(_chunks(x, bq) for x in (q, dout.astype(q.dtype), lse, delta, q_pos, q_seg)))
  return (_unchunk(dq).astype(q.dtype), _unchunk(dk).astype(k.dtype),
          _unchunk(dv).astype(v.dtype), None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _rows_with_keys(inputs, causal, block, window=None):
  """(B or 1, T) bool: whether query t may attend any key, scanning key blocks (no T x S mask)."""
  q_pos, q_seg, kv_pos, kv_seg, kv_ok = inputs
  kv_in = tuple(_chunks(_pad_to(x, block), block) for x in (kv_pos, kv_seg, kv_ok))  # pad: False
  step = lambda has, kv: (has | _mask_block(q_pos, q_seg, *kv, causal, window).any(-1), None)
  init = jnp.zeros((max(x.shape[0] for x in inputs), q_pos.shape[1]), bool)
  return jax.lax.scan(step, init, kv_in)[0]


def _cudnn(q, k, v, inputs, causal, scale, only_causal, window=None):
  if jax.default_backend() != "gpu":
    raise ValueError(f"impl='cudnn' needs an NVIDIA GPU, but the backend is "
                     f"{jax.default_backend()!r}; use impl='auto', 'xla' or 'chunked'.")
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"impl='cudnn' takes bfloat16 or float16 inputs, got {q.dtype}; cast q, k, v "
                     "or use impl='chunked'.")
  T, S = q.shape[1], k.shape[1]
  # cuDNN's own causal mask covers square causal attention with no other mask input (and no mask
  # at all needs nothing); anything else becomes a dense mask, which cuDNN turns into a bias.
  plain_causal = causal and T == S and only_causal
  needs_mask = not (plain_causal or (only_causal and not causal))
  if needs_mask and (T % 2 or S % 2):
    raise ValueError(f"impl='cudnn' with a mask (padding, segments, positions, a window or "
                     f"non-square causality) needs even lengths for its backward pass; got "
                     f"T={T}, S={S}. Pad to an even length, or use impl='auto' or 'chunked'.")
  mask = _mask_block(*inputs, causal, window)[:, None] if needs_mask else None  # (B|1, 1, T, S)
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=plain_causal,
                                     implementation="cudnn")
  if mask is not None:
    out = jnp.where(mask[:, 0].any(-1)[:, :, None, None], out, 0)
  return out.astype(q.dtype)


def splash_attention(q, k, v, *, causal=False, q_segment_ids=None, kv_segment_ids=None,
                     kv_mask=None, scale=None, block_size=512, interpret=False, window=None,
                     softcap=None):
  """Pallas TPU splash attention kernel, with dot_product_attention's masking conventions.

  Args:
    q, k, v, causal, q_segment_ids, kv_segment_ids, kv_mask, scale: as in dot_product_attention
      (causal is by index; custom positions are not supported by the kernel).
    block_size: kernel tile length; T and S are padded to multiples of min(block_size, 128-padded
      length), and block_size must be a multiple of 128.
    interpret: run the kernel in the Pallas interpreter, which works on CPU (slow; for tests).
    window, softcap: as in dot_product_attention (a LocalMask; the kernel's logit soft cap).

  Returns:
    (B, T, N, H) in q.dtype.
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # TPU-only; import lazily.
  _check_shapes(q, k, v)
  if block_size % 128:
    raise ValueError(f"splash block_size must be a multiple of 128, got {block_size}.")
  (B, T, N, H), S = q.shape, k.shape[1]
  scale = H ** -0.5 if scale is None else scale
  inputs = _mask_inputs(T, S, q_segment_ids, kv_segment_ids, kv_mask, None, None)
  _, q_seg, _, kv_seg, kv_ok = inputs
  bq, bk = (min(block_size, -(-n // 128) * 128) for n in (T, S))
  q_seg = _pad_to(jnp.broadcast_to(q_seg, (B, T)).astype(jnp.int32), bq)
  kv_seg = jnp.where(kv_ok, kv_seg, _NO_SEGMENT).astype(jnp.int32)
  kv_seg = _pad_to(jnp.broadcast_to(kv_seg, (B, S)), bk, _NO_SEGMENT)
  shape = (q_seg.shape[1], kv_seg.shape[1])
  _check_window(window)
  if window is not None:  # keys window - 1 back (and, unless causal, any key ahead)
    base = sa.LocalMask(shape, window_size=(window - 1, 0 if causal else None), offset=0)
  else:
    base = sa.CausalMask(shape) if causal else sa.FullMask(shape)
  blocks = sa.BlockSizes(block_q=bq, block_kv=bk, block_q_dkv=bq, block_kv_dkv=bk,
                         block_q_dq=bq, block_kv_dq=bk)
  kernel = sa.make_splash_mha(sa.MultiHeadMask([base] * N), block_sizes=blocks, head_shards=1,
                              q_seq_shards=1, interpret=interpret,
                              attn_logits_soft_cap=None if softcap is None else float(softcap))
  # The kernel has no scale argument and wants heads first, (N, T, H), one example at a time.
  heads_first = lambda x, b: jnp.swapaxes(_pad_to(x, b), 1, 2)
  out = jax.vmap(lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=sa.SegmentIds(qs, ks)))(
      heads_first((q * scale).astype(q.dtype), bq), heads_first(k, bk), heads_first(v, bk),
      q_seg, kv_seg)
  out = jnp.swapaxes(out, 1, 2)[:, :T]
  # The kernel averages the values for a query with no allowed key; the contract is zeros.
  has_key = _rows_with_keys(inputs, causal, bk, window)
  return jnp.where(has_key[:, :, None, None], out, 0).astype(q.dtype)
