"""Attention: masks against hand-written matrices, xla against a naive NumPy formula, every other
implementation against xla (values and gradients), causality, padding and segment invariances."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import attention

T_, F_ = True, False


def _normal(*shape, seed=0):
  # NumPy, not jax.random: compiling threefry on CPU costs seconds per new shape.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _qkv(B=2, T=37, S=45, N=4, K=2, H=8):
  return _normal(B, T, N, H, seed=0), _normal(B, S, K, H, seed=1), _normal(B, S, K, H, seed=2)


def _attend(q, k, v, impl, **kwargs):
  """dot_product_attention, with splash routed through the Pallas interpreter off TPU."""
  if impl == "splash" and jax.default_backend() != "tpu":
    return attention.splash_attention(q, k, v, interpret=True, **kwargs)
  if impl == "cudnn":
    if jax.default_backend() != "gpu":
      pytest.skip("cuDNN attention needs an NVIDIA GPU; this machine has none.")
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))  # cuDNN takes bf16/fp16 only
    return attention.dot_product_attention(q, k, v, impl=impl, **kwargs).astype(jnp.float32)
  return attention.dot_product_attention(q, k, v, impl=impl, **kwargs)


def _run(q, k, v, impl, w=None, **kwargs):
  """Output of _attend and, when w is given, gradients of sum(w * output) w.r.t. q, k, v.

  Jitted as one program: eager mode compiles every small op separately, which is slower on CPU.
  """
  def fn(q, k, v):
    out, vjp = jax.vjp(lambda q, k, v: _attend(q, k, v, impl, **kwargs), q, k, v)
    return out, (None if w is None else vjp(w.astype(out.dtype)))
  return jax.jit(fn)(q, k, v)


def _naive(q, k, v, mask, scale):
  """softmax(q k^T * scale + mask) v with NumPy loops over batch and heads; empty rows give 0."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, N, H = q.shape
  out = np.zeros_like(q)
  for b in range(B):
    for n in range(N):
      kv_head = n // (N // k.shape[2])  # consecutive query heads share a kv head
      logits = q[b, :, n] @ k[b, :, kv_head].T * scale
      logits = np.where(mask[b], logits, -np.inf)
      for t in range(T):
        if mask[b, t].any():
          p = np.exp(logits[t] - logits[t].max())
          out[b, t, n] = (p / p.sum()) @ v[b, :, kv_head]
  return out


def _packed_masks():
  """Causal + two documents + right padding for q (B=2, T=37) against k (S=45)."""
  q_seg = jnp.array([[1] * 20 + [2] * 17, [1] * 37])
  kv_seg = jnp.array([[1] * 25 + [2] * 20, [1] * 40 + [3] * 5])
  kv_mask = jnp.arange(45)[None] < jnp.array([[40], [45]])
  return dict(q_segment_ids=q_seg, kv_segment_ids=kv_seg, kv_mask=kv_mask)


# ---- make_attention_mask against hand-written matrices ----

def test_mask_causal():
  mask = attention.make_attention_mask(q_len=3, kv_len=3, causal=True)
  assert mask.shape == (1, 1, 3, 3)
  np.testing.assert_array_equal(mask[0, 0], [[T_, F_, F_], [T_, T_, F_], [T_, T_, T_]])


def test_mask_segments():
  ids = jnp.array([[1, 1, 2, 2]])
  mask = attention.make_attention_mask(q_len=4, kv_len=4, q_segment_ids=ids, kv_segment_ids=ids)
  np.testing.assert_array_equal(mask[0, 0], [[T_, T_, F_, F_], [T_, T_, F_, F_],
                                             [F_, F_, T_, T_], [F_, F_, T_, T_]])
  causal = attention.make_attention_mask(q_len=4, kv_len=4, causal=True, q_segment_ids=ids,
                                         kv_segment_ids=ids)
  np.testing.assert_array_equal(causal[0, 0], [[T_, F_, F_, F_], [T_, T_, F_, F_],
                                               [F_, F_, T_, F_], [F_, F_, T_, T_]])


def test_mask_padding_is_per_example():
  kv_mask = jnp.array([[T_, T_, F_], [T_, T_, T_]])
  mask = attention.make_attention_mask(q_len=2, kv_len=3, kv_mask=kv_mask)
  assert mask.shape == (2, 1, 2, 3)
  np.testing.assert_array_equal(mask[0, 0], [[T_, T_, F_], [T_, T_, F_]])
  np.testing.assert_array_equal(mask[1, 0], [[T_, T_, T_], [T_, T_, T_]])


def test_mask_decode_step_with_position_offset():
  # One new token at position 2 of a 4-slot KV cache: it sees slots 0..2, not the empty slot 3.
  mask = attention.make_attention_mask(q_len=1, kv_len=4, causal=True, q_positions=jnp.array([[2]]))
  np.testing.assert_array_equal(mask[0, 0], [[T_, T_, T_, F_]])


def test_mask_rejects_one_sided_segment_ids():
  with pytest.raises(ValueError, match="kv_segment_ids"):
    attention.make_attention_mask(q_len=2, kv_len=2, q_segment_ids=jnp.ones((1, 2), jnp.int32))


# ---- xla against the naive formula ----

@pytest.mark.parametrize("N,K", [(4, 4), (4, 2), (4, 1)])  # multi-head, grouped-query, multi-query
@pytest.mark.parametrize("masked", [False, True])
def test_xla_matches_naive_formula(N, K, masked):
  q, k, v = _qkv(N=N, K=K)
  kwargs = dict(causal=True, **_packed_masks()) if masked else {}
  mask = attention.make_attention_mask(q_len=37, kv_len=45, **kwargs)[:, 0]
  mask = np.broadcast_to(mask, (2, 37, 45))
  out = attention.dot_product_attention(q, k, v, scale=0.3, **kwargs)
  np.testing.assert_allclose(out, _naive(q, k, v, mask, 0.3), atol=1e-5)
  default_scale = attention.dot_product_attention(q, k, v, **kwargs)
  np.testing.assert_allclose(default_scale, _naive(q, k, v, mask, 8 ** -0.5), atol=1e-5)


# ---- every implementation against xla, values and gradients ----

CASES = {  # name: (T, S, N, K, chunk_size, mask kwargs builder)
    "packed_causal": (37, 45, 4, 2, 16, lambda: dict(causal=True, **_packed_masks())),
    "cross_padding_mqa": (13, 45, 2, 1, 7,
                          lambda: dict(kv_mask=jnp.arange(45)[None] < jnp.array([[30], [45]]))),
    # Three new tokens at positions 10..12 against a 20-slot KV cache holding 13 tokens.
    "cache_positions": (3, 20, 4, 2, 8, lambda: dict(
        causal=True, q_positions=jnp.array([[10, 11, 12]] * 2), kv_mask=jnp.arange(20)[None] < 13)),
}


@pytest.mark.parametrize("impl", ["chunked", "splash", "cudnn"])
@pytest.mark.parametrize("case", list(CASES))
def test_impl_matches_xla(impl, case):
  T, S, N, K, chunk, masks = CASES[case]
  q, k, v = _qkv(T=T, S=S, N=N, K=K)
  kwargs = masks()
  if impl == "splash" and "q_positions" in kwargs:
    pytest.skip("The splash kernel masks causally by index; it takes no positions.")
  extra = dict(chunk_size=chunk) if impl == "chunked" else {}
  w = _normal(*q.shape, seed=3)  # the loss sum(w * out) weighs every output differently
  tol = 2e-2 if impl == "cudnn" else 1e-5
  if impl == "cudnn" and (T % 2 or S % 2):  # cuDNN's masked backward: even lengths only
    with pytest.raises(ValueError, match="impl='cudnn' with a mask .* needs even lengths"):
      _run(q, k, v, impl, w, **kwargs)
    return
  ref, ref_grads = _run(q, k, v, "xla", w, **kwargs)
  out, grads = _run(q, k, v, impl, w, **kwargs, **extra)
  np.testing.assert_allclose(out, ref, atol=tol)
  for name, g, r in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=tol if impl != "cudnn" else 0.1, err_msg=f"d{name}")


def test_chunked_under_jit_with_bfloat16_inputs():
  q, k, v = _qkv()
  ref = attention.dot_product_attention(q, k, v, causal=True)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  for impl in ("xla", "chunked"):
    fn = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, causal=True, impl=impl,
                                                                 chunk_size=16))
    out = fn(q, k, v)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=5e-2)


# ---- invariances that any correct mask must give ----

@pytest.mark.parametrize("impl", ["xla", "chunked", "splash"])
def test_causality(impl):
  q, k, v = _qkv(T=24, S=24)
  t = 10
  k2, v2 = k.at[:, t + 1:].set(7.0), v.at[:, t + 1:].set(-7.0)  # change every later token
  out, _ = _run(q, k, v, impl, causal=True)
  out2, _ = _run(q, k2, v2, impl, causal=True)
  np.testing.assert_array_equal(out[:, :t + 1], out2[:, :t + 1])
  assert not np.allclose(out[:, t + 1:], out2[:, t + 1:])


@pytest.mark.parametrize("impl", ["xla", "chunked", "splash"])
def test_padding_keys_change_nothing(impl):
  q, k, v = _qkv(T=20, S=20)
  pad = lambda x: jnp.concatenate([x, 100.0 * jnp.ones_like(x[:, :9])], axis=1)
  kv_mask = jnp.arange(29)[None] < 20
  out, _ = _run(q, k, v, impl, causal=True)
  padded, _ = _run(q, pad(k), pad(v), impl, causal=True, kv_mask=kv_mask)
  np.testing.assert_allclose(padded, out, atol=1e-6)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_segments_block_attention_across_documents(impl):
  q, k, v = _qkv(T=20, S=20)
  ids = jnp.array([[1] * 12 + [2] * 8] * 2)
  kwargs = dict(q_segment_ids=ids, kv_segment_ids=ids, chunk_size=8)
  out, _ = _run(q, k, v, impl, **kwargs)
  out2, _ = _run(q, k.at[:, 12:].set(5.0), v.at[:, 12:].set(5.0), impl, **kwargs)
  np.testing.assert_array_equal(out[:, :12], out2[:, :12])  # document 1 never sees document 2
  alone, _ = _run(q[:, :12], k[:, :12], v[:, :12], impl)
  np.testing.assert_allclose(out[:, :12], alone, atol=1e-6)


@pytest.mark.parametrize("impl", ["xla", "chunked", "splash"])
def test_fully_masked_rows_are_zero_with_finite_gradients(impl):
  q, k, v = _qkv(T=20, S=20)
  q_seg = jnp.array([[1] * 16 + [9] * 4, [1] * 20])  # id 9 has no keys: 4 padding queries
  kv_seg = jnp.ones((2, 20), jnp.int32)
  kv_mask = jnp.array([[T_] * 20, [F_] * 20])  # example 1 has no keys at all
  kwargs = dict(causal=True, q_segment_ids=q_seg, kv_segment_ids=kv_seg, kv_mask=kv_mask)
  out, grads = _run(q, k, v, impl, _normal(*q.shape, seed=3), **kwargs)
  np.testing.assert_array_equal(out[0, 16:], 0.0)
  np.testing.assert_array_equal(out[1], 0.0)
  assert np.abs(out[0, :16]).min() > 0
  for g in grads:
    assert np.isfinite(g).all()
  np.testing.assert_array_equal(grads[0][0, 16:], 0.0)


# ---- dropout, dispatch and errors ----

def test_dropout():
  q, k, v = _qkv(B=1, T=8, S=8, N=2, K=2)
  rng = jax.random.key(3)
  run = lambda **kw: attention.dot_product_attention(q, k, v, causal=True, **kw)
  plain = run()
  np.testing.assert_array_equal(run(dropout_rate=0.0, dropout_rng=rng), plain)
  np.testing.assert_array_equal(run(dropout_rate=0.5), plain)  # no rng: deterministic (eval)
  np.testing.assert_array_equal(run(dropout_rate=0.5, dropout_rng=rng),
                                run(dropout_rate=0.5, dropout_rng=rng))
  assert not np.allclose(run(dropout_rate=0.5, dropout_rng=rng), plain)
  # Inverted dropout keeps the expectation: the mean over many rngs approaches the plain output.
  rngs = jax.random.split(jax.random.key(4), 2000)
  mean = jax.jit(jax.vmap(lambda r: run(dropout_rate=0.5, dropout_rng=r)))(rngs).mean(0)
  np.testing.assert_allclose(mean, plain, atol=0.1)
  for impl in ("chunked", "splash", "cudnn"):
    with pytest.raises(ValueError, match=impl):
      run(impl=impl, dropout_rate=0.1, dropout_rng=rng)
  np.testing.assert_array_equal(run(impl="auto", dropout_rate=0.5, dropout_rng=rng),
                                run(dropout_rate=0.5, dropout_rng=rng))  # auto -> xla


def test_auto_and_errors():
  q, k, v = _qkv(T=16, S=16)
  if jax.default_backend() == "cpu":
    assert attention._auto_impl(q, 16, False, False) == "xla"
    assert attention._auto_impl(q, 8192, False, False) == "xla"  # 16 * 8192 logits is small
    big_q = jax.ShapeDtypeStruct((1, 8192, 4, 8), jnp.float32)
    assert attention._auto_impl(big_q, 8192, False, False) == "chunked"
    for impl in ("splash", "cudnn"):
      with pytest.raises(ValueError, match=impl):
        attention.dot_product_attention(q, k, v, impl=impl)
  np.testing.assert_array_equal(attention.dot_product_attention(q, k, v, impl="auto"),
                                attention.dot_product_attention(q, k, v, impl="xla"))
  with pytest.raises(ValueError, match="chunked"):  # the message lists IMPLEMENTATIONS
    attention.dot_product_attention(q, k, v, impl="flash")
  with pytest.raises(ValueError, match="multiple of K"):
    attention.dot_product_attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, 2))


def test_xla_causal_block_skipping_matches_naive_and_full():
  """T=256 causal self-attention takes the block-skipping path (two 128-query blocks);
  it must equal the naive formula and the unblocked computation, gradients included."""
  B, T, N, K, H = 2, 256, 4, 2, 8
  q, k, v = _normal(B, T, N, H, seed=3), _normal(B, T, K, H, seed=4), _normal(B, T, K, H, seed=5)
  seg = jnp.asarray(np.repeat([[1, 2]], B, 0).repeat([100, 156], axis=1))  # a boundary inside block 0
  w = _normal(B, T, N, H, seed=6)
  kw = dict(causal=True, q_segment_ids=seg, kv_segment_ids=seg)
  out, grads = _run(q, k, v, "xla", w, **kw)
  mask = np.asarray(attention.make_attention_mask(q_len=T, kv_len=T, **kw))[:, 0]
  np.testing.assert_allclose(out, _naive(q, k, v, mask, H ** -0.5), atol=1e-5)
  # The same call with positions given skips the block path: a full-matrix reference.
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  ref, ref_grads = _run(q, k, v, "xla", w, q_positions=pos, kv_positions=pos, **kw)
  np.testing.assert_allclose(out, ref, atol=1e-6)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=1e-5)


def test_auto_on_a_gpu_avoids_cudnn_for_odd_lengths(monkeypatch):
  """On an H200, cuDNN's masked backward refused odd lengths (Q 37, KV 45): auto picks it
  for even lengths only (bench/gpu_attention_check.py and this file ran there)."""
  monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
  q = jnp.zeros((1, 36, 4, 64), jnp.bfloat16)
  assert attention._auto_impl(q, 44, False, False) == "cudnn"
  assert attention._auto_impl(q, 45, False, False) == "xla"
  assert attention._auto_impl(jnp.zeros((1, 37, 4, 64), jnp.bfloat16), 44, False, False) == "xla"
