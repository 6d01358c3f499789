"""Layers, the Transformer block/stack and GPT, pinned against formulas and naive references."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.layers import MLP, Norm, apply_rope
from fmjax.models import gpt
from fmjax.runtime import Runtime
from fmjax.transformer import Block, BlockConfig, TransformerStack

XLA = Runtime(attention_impl="xla")


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def abstract_params(config, t=8, runtime=Runtime()):
  tokens = jax.ShapeDtypeStruct((1, t), jnp.int32)
  return nn.meta.unbox(jax.eval_shape(gpt.GPT(config, runtime).init, jax.random.key(0),
                                      tokens)["params"])


def test_gpt2_small_parameter_count():
  c = gpt.get_config("gpt2_small", vocab_multiple=1)  # the unpadded vocabulary, as HF stores it
  assert gpt.num_params(c) == 124_439_808  # GPT-2 124M, tied embeddings (as HF counts it)
  assert count(abstract_params(c)) == 124_439_808


@pytest.mark.parametrize("preset,overrides,runtime", [
    ("gpt2_medium", {}, Runtime()),
    ("tiny", {"position": "rope", "norm": "rms", "gated_mlp": True, "mlp_activation": "silu"},
     Runtime()),
    ("tiny", {"num_kv_heads": 1, "tie_embeddings": False, "use_bias": False}, Runtime()),
    ("tiny", {"num_kv_heads": 2}, Runtime(scan_layers=True)),
])
def test_parameter_count_closed_form(preset, overrides, runtime):
  c = gpt.get_config(preset, **overrides)
  assert count(abstract_params(c, runtime=runtime)) == gpt.num_params(c)


def test_gpt2_medium_is_350m():
  assert gpt.num_params(gpt.get_config("gpt2_medium", vocab_multiple=1)) == 354_823_168


def _init(c, t=12, seed=0, runtime=XLA):
  m = gpt.GPT(c, runtime)
  tokens = jax.random.randint(jax.random.key(seed), (2, t), 0, c.vocab_size)
  return m, nn.meta.unbox(m.init(jax.random.key(1), tokens)["params"]), tokens


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_gpt_is_causal(position):
  c = gpt.get_config("tiny", position=position)
  m, params, tokens = _init(c)
  base = m.apply({"params": params}, tokens)
  for t in (3, 7):
    changed = tokens.at[:, t + 1].set((tokens[:, t + 1] + 1) % c.vocab_size)
    out = m.apply({"params": params}, changed)
    np.testing.assert_array_equal(out[:, :t + 1], base[:, :t + 1])
    assert not np.allclose(out[:, t + 1], base[:, t + 1])


def test_packed_segments_equal_separate_sequences():
  """Two documents packed in one row (segment ids, restarted positions) = run separately."""
  c = gpt.get_config("tiny")
  m, params, _ = _init(c)
  a = jnp.array([[5, 6, 7, 8, 9]])
  b = jnp.array([[10, 11, 12]])
  packed = jnp.concatenate([a, b], 1)
  seg = jnp.array([[1] * 5 + [2] * 3])
  pos = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2]])
  out = m.apply({"params": params}, packed, positions=pos, segment_ids=seg)
  np.testing.assert_allclose(out[:, :5], m.apply({"params": params}, a), atol=1e-5)
  np.testing.assert_allclose(out[:, 5:], m.apply({"params": params}, b), atol=1e-5)


def _stack_loop_params(params, n):
  """Loop layout {layer_i: tree} -> scan layout {layers: tree stacked on axis 0}."""
  layers = [params["blocks"][f"layer_{i}"] for i in range(n)]
  stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
  return {**params, "blocks": {"layers": stacked}}


def test_scan_equals_loop_and_remat_keeps_gradients():
  c = gpt.get_config("tiny")
  m, params, tokens = _init(c)
  loss = lambda model, p: model.apply({"params": p}, tokens).mean()
  ref, ref_grad = jax.value_and_grad(loss, argnums=1)(m, params)
  scanned = gpt.GPT(c, dataclasses.replace(XLA, scan_layers=True))
  sp = _stack_loop_params(params, c.num_layers)
  np.testing.assert_allclose(loss(scanned, sp), ref, rtol=1e-6)
  for policy in ("full", "dots", "dots_no_batch"):
    for scan in (False, True):
      mm = gpt.GPT(c, dataclasses.replace(XLA, scan_layers=scan, remat_policy=policy))
      p = sp if scan else params
      val, grad = jax.value_and_grad(loss, argnums=1)(mm, p)
      np.testing.assert_allclose(val, ref, rtol=1e-6)
      expect = _stack_loop_params(ref_grad, c.num_layers) if scan else ref_grad
      jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grad, expect)


def test_tied_logits_use_the_embedding_matrix():
  c = gpt.get_config("tiny")
  m, params, tokens = _init(c)
  logits, state = m.apply({"params": params}, tokens, capture_intermediates=True,
                          mutable=["intermediates"])
  h = state["intermediates"]["ln_f"]["__call__"][0]  # final hidden state (B, T, D)
  np.testing.assert_allclose(logits, h @ params["wte"]["embedding"].T, atol=1e-5)


def test_layernorm_and_rmsnorm_match_formulas():
  x = np.random.RandomState(0).randn(3, 5, 8).astype(np.float32)
  for kind in ("layer", "rms"):
    mod = Norm(kind, epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32)
    v = nn.meta.unbox(mod.init(jax.random.key(0), x))
    v = jax.tree_util.tree_map(lambda a: a + 0.5, v)  # non-trivial scale and bias
    out = mod.apply(v, x)
    if kind == "layer":
      ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * 1.5 + 0.5
    else:
      ref = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * 1.5
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("gated", [False, True])
def test_mlp_matches_formula(gated):
  x = np.random.RandomState(1).randn(2, 3, 8).astype(np.float32)
  act = "silu" if gated else "gelu_tanh"
  mod = MLP(16, act, gated=gated)
  p = nn.meta.unbox(mod.init(jax.random.key(0), x, train=False))["params"]
  p = jax.tree_util.tree_map(lambda a: a + 0.01, p)  # non-zero biases
  out = mod.apply({"params": p}, x, train=False)
  h = x @ p["wi"]["kernel"] + p["wi"]["bias"]
  if gated:
    h = h / (1 + np.exp(-h)) * (x @ p["wi_up"]["kernel"] + p["wi_up"]["bias"])
  else:
    h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
  np.testing.assert_allclose(out, h @ p["wo"]["kernel"] + p["wo"]["bias"], atol=1e-5)


def test_rope_is_relative_and_norm_preserving():
  rng = np.random.RandomState(2)
  q, k = rng.randn(1, 1, 1, 8).astype(np.float32), rng.randn(1, 1, 1, 8).astype(np.float32)
  rot = lambda x, p: apply_rope(jnp.asarray(x), jnp.array([[p]]))
  np.testing.assert_allclose(np.linalg.norm(rot(q, 5)), np.linalg.norm(q), rtol=1e-6)
  dots = [float((rot(q, m) * rot(k, m - 3)).sum()) for m in (3, 7, 20)]
  np.testing.assert_allclose(dots, dots[0], rtol=1e-5)  # depends only on the offset 3
  np.testing.assert_allclose(rot(q, 0), q, atol=1e-7)  # position 0 is the identity
  # Hand case: H=2, position 1 rotates (x1, x2) by 1 radian.
  np.testing.assert_allclose(rot(np.array([[[[1.0, 0.0]]]]), 1)[0, 0, 0],
                             [np.cos(1.0), np.sin(1.0)], atol=1e-6)


def _naive_block(p, x, pre_ln, causal):
  """NumPy reference of one block (N=2 heads, H=4)."""
  def ln(y, q):
    return (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-5) * q["scale"] + q["bias"]

  def attn(y):
    a = p["attn"]
    q = np.einsum("btd,dnh->btnh", y, a["query"]["kernel"]) + a["query"]["bias"]
    k = np.einsum("btd,dnh->btnh", y, a["key"]["kernel"]) + a["key"]["bias"]
    v = np.einsum("btd,dnh->btnh", y, a["value"]["kernel"]) + a["value"]["bias"]
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    if causal:
      s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -1e30)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("bnts,bsnh->btnh", w, v)
    return np.einsum("btnh,nhd->btd", o, a["out"]["kernel"]) + a["out"]["bias"]

  def mlp(y):
    h = y @ p["mlp"]["wi"]["kernel"] + p["mlp"]["wi"]["bias"]
    h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
    return h @ p["mlp"]["wo"]["kernel"] + p["mlp"]["wo"]["bias"]

  if pre_ln:
    x = x + attn(ln(x, p["ln_attn"]))
    return x + mlp(ln(x, p["ln_mlp"]))
  x = ln(x + attn(x), p["ln_attn"])
  return ln(x + mlp(x), p["ln_mlp"])


@pytest.mark.parametrize("pre_ln,causal", [(True, True), (False, False)])
def test_block_matches_naive_reference(pre_ln, causal):
  cfg = BlockConfig(num_heads=2, head_dim=4, mlp_dim=16, causal=causal, pre_ln=pre_ln,
                    attention_impl="xla")
  x = np.random.RandomState(3).randn(2, 5, 8).astype(np.float32)
  blk = Block(cfg)
  p = nn.meta.unbox(blk.init(jax.random.key(0), x, None, None, None, False))["params"]
  p = jax.tree_util.tree_map(lambda a: np.asarray(a) + 0.05, p)
  out, _ = blk.apply({"params": p}, x, None, None, None, False)
  np.testing.assert_allclose(out, _naive_block(p, x, pre_ln, causal), atol=2e-5)


def test_dropout_only_in_training():
  c = gpt.get_config("tiny")
  m, params, tokens = _init(c, runtime=Runtime(dropout_rate=0.5, attention_impl="xla"))
  a = m.apply({"params": params}, tokens, train=False)
  b = m.apply({"params": params}, tokens, train=False)
  np.testing.assert_array_equal(a, b)
  t1 = m.apply({"params": params}, tokens, train=True, rngs={"dropout": jax.random.key(1)})
  t2 = m.apply({"params": params}, tokens, train=True, rngs={"dropout": jax.random.key(1)})
  np.testing.assert_array_equal(t1, t2)
  assert not np.allclose(t1, a)


def test_bfloat16_compute_keeps_float32_params():
  c = gpt.get_config("tiny")
  m, params, tokens = _init(c, runtime=Runtime(dtype="bfloat16", attention_impl="xla"))
  assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype("float32")}
  # Meaningful logits: the tied embedding scaled x10 spreads them (std ~1.8, |max| ~15, not
  # the ~0.16 of a fresh init), so the tolerance below is small against their spread.
  params = jax.tree_util.tree_map_with_path(
      lambda k, x: x * 10 if "wte" in jax.tree_util.keystr(k) else x, params)
  out16 = np.asarray(m.apply({"params": params}, tokens))
  out32 = np.asarray(gpt.GPT(c, XLA).apply({"params": params}, tokens))
  assert out16.dtype == np.float32
  # bf16 keeps 8 significant bits: each rounding is off by at most 2^-9 relative. The error
  # through two layers of matmuls, norms and softmax stays within a few such roundings of the
  # largest logit; measured: 0.0027 x max. A float32 slip (or fp32 compute) would not show.
  scale = np.abs(out32).max()
  tolerance = 4 * 2.0 ** -9 * scale
  assert np.std(out32) > 10 * tolerance  # the tolerance is small against the logits' spread
  np.testing.assert_allclose(out16, out32, atol=tolerance, rtol=0)
  assert np.abs(out16 - out32).max() > 2.0 ** -12 * scale  # bf16 did run
  assert (out16.argmax(-1) == out32.argmax(-1)).mean() >= 0.98


def test_stack_rejects_unknown_remat_policy():
  cfg = BlockConfig(num_heads=2, head_dim=4, mlp_dim=8)
  with pytest.raises(ValueError, match="remat_policy 'fast'.*choose from"):
    TransformerStack(cfg, 1, remat_policy="fast").init(jax.random.key(0), jnp.ones((1, 2, 8)))
