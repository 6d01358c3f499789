"""BERT pinned against parameter counts, a NumPy reference encoder and hand-computed losses."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from fmjax.models import bert
from fmjax.runtime import Runtime

XLA = Runtime(attention_impl="xla")


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def abstract_params(config, with_heads, t=8, runtime=Runtime()):
  ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
  model = (bert.BertForPreTraining(config, runtime) if with_heads
           else bert.BertEncoder(config, runtime))
  return nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), ids)["params"])


def test_bert_base_parameter_count():
  c = bert.get_config("base", vocab_multiple=1)  # the unpadded vocabulary, as HF stores it
  d, f, v, l = 768, 3072, 30522, 12
  embeddings = (v + 512 + 2) * d + 2 * d  # word, position, token type, LayerNorm
  layer = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d  # q k v o, MLP, 2 LayerNorms
  pooler = d * d + d
  assert embeddings + l * layer + pooler == 109_482_240  # HF bert-base-uncased BertModel
  assert bert.num_params(c) == 109_482_240
  assert count(abstract_params(c, with_heads=False)) == 109_482_240
  heads = (d * d + d) + 2 * d + v + (2 * d + 2)  # MLM transform + LayerNorm + bias, NSP
  assert bert.num_params(c, with_heads=True) == 109_482_240 + heads == 110_106_428
  assert bert.num_params(bert.get_config("large", vocab_multiple=1)) == 335_141_888  # HF bert-large-uncased


@pytest.mark.parametrize("preset", sorted(bert.PRESETS))
def test_parameter_count_closed_form(preset):
  # Scanned stacks for the heads variant: same count, and much faster to trace when deep.
  c = bert.get_config(preset)
  assert count(abstract_params(c, with_heads=False)) == bert.num_params(c)
  assert count(abstract_params(c, with_heads=True, runtime=Runtime(scan_layers=True))) == \
      bert.num_params(c, with_heads=True)


def test_flops_per_token_base():
  # 6 * (12 * (4 D^2 + 2 D F) + 0.15 * (D^2 + D V)) + 12 * L * T * D at T = 512.
  assert bert.flops_per_token(bert.get_config("base", vocab_multiple=1), 512) == pytest.approx(
      587_858_688)


def test_presets_and_errors():
  assert bert.get_config("tiny", vocab_size=8000).vocab_size == 8000
  assert bert.get_config("large").block(Runtime()).pre_ln is False
  with pytest.raises(ValueError, match="unknown BERT preset 'huge'.*choose from"):
    bert.get_config("huge")
  c = bert.get_config("tiny", max_len=4)
  with pytest.raises(ValueError, match="length 6 but this BERT has max_len=4"):
    bert.BertEncoder(c).init(jax.random.key(0), jnp.ones((1, 6), jnp.int32))


# A config small enough for a NumPy reference: D=8, N=2 heads of H=4, F=16.
SMALL = bert.BertConfig(vocab_size=11, max_len=16, num_layers=2, num_heads=2, embed_dim=8,
                        mlp_dim=16)


def _init(model, *args, seed=0):
  """Initialised params, perturbed so biases, LayerNorm scales/offsets are non-trivial."""
  p = nn.meta.unbox(model.init(jax.random.key(seed), *args))["params"]
  leaves, tree = jax.tree_util.tree_flatten(p)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [np.asarray(x + 0.1 * jax.random.normal(k, x.shape)) for x, k in zip(leaves, keys)]
  return jax.tree_util.tree_unflatten(tree, leaves)


def _ln(y, q, eps=1e-12):
  return (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + eps) * q["scale"] + q["bias"]


def _gelu(h):  # exact erf GELU, as BERT
  return 0.5 * h * (1 + erf(h / np.sqrt(2)))


def _naive_encoder(p, ids, types, mask):
  """NumPy BERT: embeddings -> LayerNorm -> post-LN blocks -> tanh pooler. Returns also the
  embedding-layer output."""
  emb = (p["word_embeddings"]["embedding"][ids] + p["position_embeddings"]["embedding"][:ids.shape[1]]
         + p["token_type_embeddings"]["embedding"][types])
  x = e = _ln(emb, p["ln_embed"])
  for i in range(SMALL.num_layers):
    b = p["blocks"][f"layer_{i}"]
    a = b["attn"]
    q, k, v = (np.einsum("btd,dnh->btnh", x, a[n]["kernel"]) + a[n]["bias"]
               for n in ("query", "key", "value"))
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    s = np.where(mask[:, None, None, :] > 0, s, -1e30)  # padding keys are never attended
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("btnh,nhd->btd", np.einsum("bnts,bsnh->btnh", w, v), a["out"]["kernel"])
    x = _ln(x + o + a["out"]["bias"], b["ln_attn"])  # post-LN: norm after the residual add
    m = b["mlp"]
    h = _gelu(x @ m["wi"]["kernel"] + m["wi"]["bias"]) @ m["wo"]["kernel"] + m["wo"]["bias"]
    x = _ln(x + h, b["ln_mlp"])
  pooled = np.tanh(x[:, 0] @ p["pooler"]["kernel"] + p["pooler"]["bias"])
  return x, pooled, e


def _small_inputs():
  ids = np.array([[2, 5, 7, 1, 9, 3], [2, 4, 4, 8, 0, 0]])
  types = np.array([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]])
  mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
  return ids, types, mask


def test_encoder_matches_numpy_reference():
  ids, types, mask = _small_inputs()
  m = bert.BertEncoder(SMALL, XLA)
  p = _init(m, ids)
  (seq, pooled), state = m.apply({"params": p}, ids, token_type_ids=types, attention_mask=mask,
                                 capture_intermediates=True, mutable=["intermediates"])
  ref_seq, ref_pooled, ref_emb = _naive_encoder(p, ids, types, mask)
  # The embedding layer alone: word + position + token type, then LayerNorm (eps 1e-12).
  np.testing.assert_allclose(state["intermediates"]["ln_embed"]["__call__"][0], ref_emb, atol=1e-5)
  np.testing.assert_allclose(seq, ref_seq, atol=2e-5)
  np.testing.assert_allclose(pooled, ref_pooled, atol=2e-5)


def test_padding_invariance():
  c = bert.get_config("tiny")
  m = bert.BertEncoder(c, XLA)
  rng = np.random.RandomState(0)
  ids, types = rng.randint(1, c.vocab_size, (2, 7)), (np.arange(7) >= 4).astype(int)[None].repeat(2, 0)
  p = _init(m, ids)
  seq, pooled = m.apply({"params": p}, ids, token_type_ids=types)
  # Arbitrary token ids and types in the padding: only the mask matters.
  ids_p = np.concatenate([ids, rng.randint(1, c.vocab_size, (2, 5))], 1)
  types_p = np.concatenate([types, rng.randint(0, 2, (2, 5))], 1)
  mask = np.concatenate([np.ones((2, 7)), np.zeros((2, 5))], 1)
  seq_p, pooled_p = m.apply({"params": p}, ids_p, token_type_ids=types_p, attention_mask=mask)
  np.testing.assert_allclose(seq_p[:, :7], seq, atol=1e-5)
  np.testing.assert_allclose(pooled_p, pooled, atol=1e-5)
  unmasked, _ = m.apply({"params": p}, ids_p, token_type_ids=types_p)
  assert not np.allclose(unmasked[:, :7], seq, atol=1e-3)  # without the mask, padding leaks in


def test_token_types_change_the_output():
  ids, types, _ = _small_inputs()
  m = bert.BertEncoder(SMALL, XLA)
  p = _init(m, ids)
  seq_a, pooled_a = m.apply({"params": p}, ids)  # default: all sentence A
  np.testing.assert_array_equal(seq_a, m.apply({"params": p}, ids, token_type_ids=0 * types)[0])
  seq_b, pooled_b = m.apply({"params": p}, ids, token_type_ids=types)
  assert not np.allclose(seq_b, seq_a, atol=1e-3)
  assert not np.allclose(pooled_b, pooled_a, atol=1e-3)


def test_mlm_logits_at_gathered_positions_and_nsp():
  ids, types, mask = _small_inputs()
  positions = np.array([[3, 0, 3], [5, 1, 2]])  # repeats, any order, a padding position
  m = bert.BertForPreTraining(SMALL, XLA)
  p = _init(m, ids, types, mask, positions)
  out = m.apply({"params": p}, ids, types, mask, positions)
  v = SMALL.vocab_size  # 11, padded to vocab_multiple 128 with the padded ids masked
  assert out["mlm_logits"].shape == (2, 3, 128) and np.all(out["mlm_logits"][..., v:] == -np.inf)
  assert out["mlm_logits"].dtype == out["nsp_logits"].dtype == jnp.float32
  seq, pooled, _ = _naive_encoder(p["bert"], ids, types, mask)
  np.testing.assert_allclose(out["sequence_output"], seq, atol=2e-5)
  # The head over the whole sequence by hand, then read at the positions.
  h = _gelu(seq @ p["mlm_dense"]["kernel"] + p["mlm_dense"]["bias"])
  h = _ln(h, p["mlm_ln"])
  full = h @ p["bert"]["word_embeddings"]["embedding"].T + p["mlm_bias"]  # (B, T, V), tied
  expect = np.take_along_axis(full, positions[..., None], axis=1)
  np.testing.assert_allclose(out["mlm_logits"][..., :v], expect[..., :v], atol=5e-5)
  np.testing.assert_allclose(out["nsp_logits"], pooled @ p["nsp_dense"]["kernel"] + p["nsp_dense"]["bias"],
                             atol=2e-5)


def test_pretraining_loss_hand_computed():
  ln = np.log
  # softmax([0, 0, ln 2]) = [1/4, 1/4, 1/2]; softmax([0, ln 3, 0]) = [1/5, 3/5, 1/5].
  mlm_logits = np.array([[[0, 0, ln(2)], [0, 0, ln(2)]],
                         [[0, ln(3), 0], [100, 0, 0]]], np.float32)
  nsp_logits = np.array([[0, 0], [ln(3), 0]], np.float32)  # softmax: [1/2, 1/2], [3/4, 1/4]
  batch = {"masked_lm_ids": np.array([[2, 0], [1, 1]]),
           "masked_lm_weights": np.array([[1, 1], [1, 0]], np.float32),  # last one is padding
           "next_sentence_labels": np.array([1, 0])}
  loss, metrics = bert.pretraining_loss({"mlm_logits": mlm_logits, "nsp_logits": nsp_logits}, batch)
  mlm = (ln(2) + ln(4) + ln(5 / 3)) / 3  # the padded prediction (loss ~100) is weighted out
  nsp = (ln(2) + ln(4 / 3)) / 2
  np.testing.assert_allclose(metrics["masked_lm_loss"], mlm, rtol=1e-6)
  np.testing.assert_allclose(metrics["masked_lm_accuracy"], 2 / 3, rtol=1e-6)
  np.testing.assert_allclose(metrics["next_sentence_loss"], nsp, rtol=1e-6)
  np.testing.assert_allclose(metrics["next_sentence_accuracy"], 1 / 2, rtol=1e-6)  # tie -> 0
  np.testing.assert_allclose(loss, mlm + nsp, rtol=1e-6)


def _stack_loop_params(params, n):
  """Loop layout {layer_i: tree} -> scan layout {layers: tree stacked on axis 0}."""
  layers = [params["bert"]["blocks"][f"layer_{i}"] for i in range(n)]
  stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
  return {**params, "bert": {**params["bert"], "blocks": {"layers": stacked}}}


def test_scan_equals_loop():
  ids, types, mask = _small_inputs()
  positions = np.array([[1, 2], [0, 3]])
  m = bert.BertForPreTraining(SMALL, XLA)
  p = _init(m, ids, types, mask, positions)
  ref = m.apply({"params": p}, ids, types, mask, positions)
  scanned = bert.BertForPreTraining(SMALL, dataclasses.replace(XLA, scan_layers=True))
  out = scanned.apply({"params": _stack_loop_params(p, SMALL.num_layers)}, ids, types, mask,
                      positions)
  for k in ref:
    np.testing.assert_allclose(out[k], ref[k], atol=1e-5)


def test_dropout_only_in_training():
  ids, types, mask = _small_inputs()
  m = bert.BertEncoder(SMALL, Runtime(dropout_rate=0.3, attention_dropout_rate=0.3,
                                      attention_impl="xla"))
  p = _init(m, ids)
  a, _ = m.apply({"params": p}, ids, attention_mask=mask)
  np.testing.assert_array_equal(a, bert.BertEncoder(SMALL, XLA).apply({"params": p}, ids,
                                                                 attention_mask=mask)[0])
  t, _ = m.apply({"params": p}, ids, attention_mask=mask, train=True,
                 rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(t, a)
