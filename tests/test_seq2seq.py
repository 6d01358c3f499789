"""The encoder-decoder Transformer (fmjax/models/seq2seq.py), its decoding, BLEU, and the
parallel-text and caption data.

Pinned: cross-attention by a hand-computed softmax (padding keys excluded, cached and
uncached); the model's masks (source padding invisible, target causal); the parameter
count from a formula; cached decoding == teacher-forced logits step by step (shared and
separate vocabularies, the captioner); greedy == argmax rollout; beam width 1 == greedy;
corpus BLEU == sacrebleu on hand cases (one worked by hand); data errors as one line.
"""

import gzip
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import attention, evaluation, generate, heads
from fmjax.data import captions, translation
from fmjax.data.text import DataError
from fmjax.models import seq2seq, vit
from fmjax.runtime import Runtime
from fmjax.transformer import BlockConfig, MultiHeadAttention


def scaled(params, scale=0.3, seed=2):
  """Redraws matrices at `scale` so outputs depend clearly on every input (the default init
  gives near-uniform logits)."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return tree.unflatten([jax.random.normal(k, x.shape) * scale if x.ndim >= 2 else x
                         for k, x in zip(keys, leaves)])


def tiny(**overrides):
  c = seq2seq.get_config("tiny", **overrides)
  model = seq2seq.Seq2Seq(c, Runtime(attention_impl="xla"))
  src, tgt = jnp.zeros((1, 6), jnp.int32), jnp.zeros((1, 5), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.key(0), src, src > 0, tgt))["params"]
  return model, scaled(params)


SOURCE = np.asarray([[5, 17, 3, 99, 42, 7], [8, 200, 13, 0, 0, 0]], np.int32)  # row 1 padded
TARGET_IN = np.asarray([[1, 40, 41, 42, 43, 44, 45], [1, 9, 10, 11, 12, 13, 14]], np.int32)


# ------------------------------------------------------------------------------ cross-attention


def test_cross_attention_by_hand():
  """One head, H = D = 2, identity projections: the query [1, 0] against keys [1, 0], [0, 1]
  and a masked [5, 5] gets softmax([1/sqrt 2, 0]) = [0.66976, 0.33024] of the values (the
  keys); unmasked, the big key takes most. The cached path agrees."""
  c = BlockConfig(num_heads=1, head_dim=2, mlp_dim=4, use_bias=False, attention_impl="xla")
  mha = MultiHeadAttention(c)
  eye = jnp.eye(2)
  params = {"query": {"kernel": eye[:, None, :]}, "key": {"kernel": eye[:, None, :]},
            "value": {"kernel": eye[:, None, :]}, "out": {"kernel": eye[None]}}
  x = jnp.asarray([[[1.0, 0.0]]])  # (B=1, T=1, D=2)
  memory = jnp.asarray([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])  # (1, S=3, 2)
  mask = jnp.asarray([[True, True, False]])
  p = math.exp(2 ** -0.5) / (math.exp(2 ** -0.5) + 1)
  out = mha.apply({"params": params}, x, memory, kv_mask=mask)
  np.testing.assert_allclose(out[0, 0], [p, 1 - p], atol=1e-6)
  assert p == pytest.approx(0.66976, abs=1e-5)
  unmasked = mha.apply({"params": params}, x, memory)
  w = np.exp(np.asarray([1, 0, 5]) * 2 ** -0.5)  # unmasked: the [5, 5] key takes 92%
  np.testing.assert_allclose(unmasked[0, 0], [(w[0] + 5 * w[2]) / w.sum(),
                                              (w[1] + 5 * w[2]) / w.sum()], atol=1e-5)
  empty = {"k": jnp.zeros((1, 1, 3, 2)), "v": jnp.zeros((1, 1, 3, 2))}
  cached, cross = mha.apply({"params": params}, x, memory, kv_mask=mask, cross_cache=empty)
  np.testing.assert_allclose(cached, out, atol=1e-6)
  np.testing.assert_allclose(cross["k"][0, 0], memory[0])  # (B, K, S, H): projected once
  again, _ = mha.apply({"params": params}, x, None, kv_mask=mask, cross_cache=cross)
  np.testing.assert_allclose(again, out, atol=1e-6)


def test_cross_attention_mask_by_hand():
  """Decoder queries (T = 2) over a padded source (S = 3): every query sees exactly the real
  source tokens, with no causality between the two sequences."""
  mask = attention.make_attention_mask(q_len=2, kv_len=3,
                                       kv_mask=np.asarray([[1, 1, 1], [1, 0, 0]], bool))
  assert mask.shape == (2, 1, 2, 3)
  np.testing.assert_array_equal(mask[:, 0], [[[1, 1, 1], [1, 1, 1]], [[1, 0, 0], [1, 0, 0]]])


def test_source_padding_is_invisible_and_target_is_causal():
  model, params = tiny()
  f = jax.jit(lambda s, m, t: model.apply({"params": params}, s, m, t))
  mask = SOURCE > 0
  base = np.asarray(f(SOURCE, mask, TARGET_IN))
  under_the_mask = np.where(mask, SOURCE, 77)  # other ids where the source is padding
  np.testing.assert_allclose(np.asarray(f(under_the_mask, mask, TARGET_IN)), base, atol=1e-5)
  changed_source = SOURCE.copy()
  changed_source[1, 1] = 201  # a real token: the output must move
  assert np.abs(np.asarray(f(changed_source, mask, TARGET_IN))[1] - base[1]).max() > 1e-3
  changed_future = TARGET_IN.copy()
  changed_future[:, 4:] = 3  # later target tokens never reach earlier positions
  out = np.asarray(f(SOURCE, mask, changed_future))
  np.testing.assert_allclose(out[:, :4], base[:, :4], atol=1e-5)
  assert np.abs(out[:, 4:] - base[:, 4:]).max() > 1e-3


@pytest.mark.parametrize("overrides", [{}, {"source_vocab_size": 300}])
def test_parameter_count_formula(overrides):
  model, params = tiny(**overrides)
  assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == seq2seq.num_params(model.config)
  assert ("source_embed" in params) == bool(overrides)
  base = seq2seq.get_config("base", vocab_size=37000, vocab_multiple=1)
  assert (base.encoder_layers, base.decoder_layers, base.embed_dim, base.num_heads,
          base.mlp_dim) == (6, 6, 512, 8, 2048)
  assert seq2seq.num_params(base) == 63_084_544  # the paper's base model: about 65M


# ------------------------------------------------------------------------------ decoding


def cached_logits(model, params, encoded, target_in):
  """Feeds target_in one token at a time through the cache: (B, T, V)."""
  b, t = target_in.shape
  decode = jax.jit(lambda *a, **k: model.apply({"params": params}, *a, method="decode", **k))
  cache = model.init_cache(batch=b, length=t, source=encoded)
  kv_mask = np.ones((b, t), bool)
  out = []
  for i in range(t):
    logits, cache = decode(target_in[:, i:i + 1], cache, index=i, positions=np.full((b, 1), i),
                           kv_mask=kv_mask, source=encoded if i == 0 else None)
    out.append(np.asarray(logits))
  return np.stack(out, 1)


def test_cached_decoding_equals_full_decoding():
  model, params = tiny(source_vocab_size=300)  # separate vocabularies: two tables
  full = model.apply({"params": params}, SOURCE, SOURCE > 0, TARGET_IN)
  encoded = model.apply({"params": params}, SOURCE, SOURCE > 0, method="encode")
  np.testing.assert_allclose(cached_logits(model, params, encoded, TARGET_IN), full,
                             atol=1e-5, rtol=0)


def test_captioner_cached_decoding_equals_full_decoding():
  c = seq2seq.get_config("tiny")
  v = vit.get_config("tiny", image_size=16, patch_size=4, num_channels=3, num_classes=0,
                     pool="gap", embed_dim=64, num_heads=4)
  model = seq2seq.ImageCaptioner(c, v, Runtime(attention_impl="xla"))
  images = np.asarray(jax.random.normal(jax.random.key(3), (2, 16, 16, 3)))
  params = scaled(nn.meta.unbox(model.init(jax.random.key(0), images, TARGET_IN))["params"])
  full = model.apply({"params": params}, images, TARGET_IN)
  encoded = model.apply({"params": params}, images, method="encode")
  assert encoded["memory"].shape == (2, 16, 64)  # the 4 x 4 patches, no [CLS]
  np.testing.assert_allclose(cached_logits(model, params, encoded, TARGET_IN), full,
                             atol=1e-5, rtol=0)
  other = np.asarray(model.apply({"params": params}, images[::-1], TARGET_IN[::-1]))
  assert np.abs(other - np.asarray(full)[::-1]).max() < 1e-5  # row i depends on image i only


def test_greedy_equals_argmax_rollout_and_beam_width_one():
  model, params = tiny()
  encoded = model.apply({"params": params}, SOURCE, SOURCE > 0, method="encode")
  n, start = 8, 1
  greedy = jax.jit(lambda p, e: generate.generate_from_source(
      model, p, e, generate.GenerateConfig(max_new_tokens=n), start_id=start).tokens)
  out = np.asarray(greedy(params, encoded))
  forward = jax.jit(lambda p, t: model.apply({"params": p}, SOURCE, SOURCE > 0, t))
  buf = np.zeros((2, n + 1), np.int32)
  buf[:, 0] = start
  for t in range(n):
    buf[:, t + 1] = np.asarray(forward(params, buf)[:, t].argmax(-1))
  np.testing.assert_array_equal(out, buf[:, 1:])
  assert len(set(out[0].tolist())) > 2  # the weights are not degenerate
  beam = generate.generate_from_source(
      model, params, encoded, generate.GenerateConfig(max_new_tokens=n, num_beams=1),
      start_id=start)
  np.testing.assert_array_equal(beam.tokens, out)
  wide = generate.generate_from_source(
      model, params, encoded, generate.GenerateConfig(max_new_tokens=n, num_beams=3,
                                                      length_penalty=0.0), start_id=start)
  logp = lambda toks: float(sum(jax.nn.log_softmax(forward(params, np.concatenate(
      [np.full((2, 1), start), toks], 1)[:, :-1]), -1)[0, np.arange(n), toks[0]]))
  assert logp(np.asarray(wide.tokens)) >= logp(out) - 1e-4  # beam finds at least greedy's


def test_label_smoothed_loss_by_hand():
  """p = [1/2, 1/4, 1/4], target 0, eps 0.1: 0.9 * ln 2 + 0.1 * (ln 2 + 2 ln 4) / 3; the
  padded position (weight 0) counts for nothing."""
  logits = jnp.log(jnp.asarray([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
  loss, m = heads.sequence_loss(logits, jnp.asarray([[0, 1]]), jnp.asarray([[1.0, 0.0]]), 0.1)
  expected = 0.9 * math.log(2) + 0.1 * (math.log(2) + 2 * math.log(4)) / 3
  assert float(loss) == pytest.approx(expected, abs=1e-6)
  assert float(m["nll"]) == pytest.approx(math.log(2), abs=1e-6) and float(m["accuracy"]) == 1.0


# ------------------------------------------------------------------------------ BLEU


def test_bleu_by_hand():
  """Every n-gram of the hypothesis matches (precisions 100%), but it has 4 words against
  7: the brevity penalty exp(1 - 7/4) is the score."""
  out = evaluation.corpus_bleu(["a b c d"], ["a b c d e f g"])
  assert out["bleu"] == pytest.approx(100 * math.exp(1 - 7 / 4), abs=1e-9)
  assert [out[f"precision_{n}"] for n in range(1, 5)] == [100.0] * 4


@pytest.mark.parametrize("hypotheses,references,expected", [
    # sacrebleu 2.6.0's corpus_bleu(h, [r]).score for each case
    (["The cat sat on the mat."], ["The cat is on the mat."], 48.892302243490086),
    (["Hello, world! It's 3.5 - 4-5 &amp; <skipped> x"], ["Hello world! It is 3.5-4-5 & x"],
     58.59059370151705),
    (["A dog runs in the grass.", "Two people sit on a bench."],
     ["A dog is running through the grass.", "Two people are sitting on a bench."],
     31.387816788053176),
    (["two men"], ["two young men"], 0.0),  # no 3-gram at all: log 0
])
def test_bleu_equals_sacrebleu(hypotheses, references, expected):
  assert evaluation.corpus_bleu(hypotheses, references)["bleu"] == pytest.approx(expected,
                                                                                 abs=1e-9)


def test_13a_tokenization():
  assert evaluation.tokenize_13a("Hello, world! 3.5 x-y 4-5 (a) &quot;q&quot;") == \
      'Hello , world ! 3.5 x-y 4 - 5 ( a ) " q "'


# ------------------------------------------------------------------------------ data


def write(path, text, gz=False):
  if gz:
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write(text)
  else:
    path.write_text(text, encoding="utf-8")
  return str(path)


def test_parallel_files_plain_and_gzip(tmp_path):
  de = write(tmp_path / "a.de.gz", "Ein Hund.\nZwei Katzen.\n", gz=True)
  en = write(tmp_path / "a.en", "A dog.\r\nTwo cats.")
  assert translation.read_parallel(de, en) == [("Ein Hund.", "A dog."),
                                               ("Zwei Katzen.", "Two cats.")]


def test_parallel_file_errors(tmp_path):
  de = write(tmp_path / "a.de", "eins\nzwei\ndrei\n")
  en = write(tmp_path / "a.en", "one\ntwo\n")
  with pytest.raises(DataError, match=r"a.de has 3 lines but .*a.en has 2: parallel files "
                                      "must be line-aligned"):
    translation.read_parallel(de, en)
  empty = write(tmp_path / "e.en", "")
  with pytest.raises(DataError, match=r"e.en is empty"):
    translation.read_parallel(de, empty)
  latin1 = tmp_path / "l.en"
  latin1.write_bytes("one\ntwo\nGr\u00fc\u00dfe\n".encode("latin-1"))
  with pytest.raises(DataError, match=r"l.en:3: not UTF-8"):
    translation.read_parallel(de, str(latin1))
  with pytest.raises(DataError, match=r"missing.en: no such file"):
    translation.read_parallel(de, str(tmp_path / "missing.en"))


def test_tfds_pairs(monkeypatch):
  import tensorflow_datasets as tfds
  calls = []

  def data_source(name, split, data_dir=None):
    calls.append((name, split))
    return [{"de": b"Guten Morgen.", "en": b"Good morning."}]
  monkeypatch.setattr(tfds, "data_source", data_source)
  assert translation.read_tfds("wmt14_translate/de-en", "test", "de", "en") == [
      ("Guten Morgen.", "Good morning.")]
  assert calls == [("wmt14_translate/de-en", "test")]
  with pytest.raises(KeyError, match="has no feature 'fr'"):
    translation.read_tfds("wmt14_translate/de-en", "test", "de", "fr")


def test_tokenizers_batches_and_padding():
  pairs = [(f"eins zwei {'drei ' * (i % 7)}.", f"one two {'three ' * (i % 7)}.")
           for i in range(40)]
  src_tok, tgt_tok = translation.train_tokenizers(pairs, 40, shared=True)
  assert src_tok is tgt_tok
  sep_src, sep_tgt = translation.train_tokenizers(pairs, 30, shared=False)
  assert sep_src is not sep_tgt and "drei" in sep_src.decode(sep_src.encode("drei"))
  sources, targets, cut = translation.encode_pairs(pairs, src_tok, tgt_tok, max_length=9)
  assert all(t[-1] == tgt_tok.eos_id or len(t) == 9 for t in targets) and cut > 0
  it = translation.PairBatches(sources, targets, batch_size=8, seed=0, pad_id=0,
                               start_id=tgt_tok.eos_id, length_multiple=8)
  b = it.batch_at(3)
  assert b["source"].shape[1] % 8 == 0 and b["source"].shape == b["target_in"].shape
  np.testing.assert_array_equal(b["target_in"][:, 0], tgt_tok.eos_id)  # EOS starts the target
  np.testing.assert_array_equal(b["target_in"][:, 1:], np.where(
      b["weight"][:, 1:] > 0, b["target_out"][:, :-1], 0))  # shifted right
  np.testing.assert_array_equal(b["source_mask"], b["source"] > 0)
  again = translation.PairBatches(sources, targets, batch_size=8, seed=0, pad_id=0,
                                  start_id=tgt_tok.eos_id, length_multiple=8)
  assert all((again.batch_at(3)[k] == b[k]).all() for k in b)  # a function of (seed, step)
  seen = np.concatenate([it.batch_at(s)["source"][:, 0] for s in range(it.per_epoch)])
  assert len(seen) == 40  # an epoch visits every pair once
  padded = list(translation.padded_pairs(sources, targets, 16, 16, pad_id=0, start_id=1))
  assert [n for _, n in padded] == [16, 16, 8]
  assert padded[-1][0]["weight"][8:].sum() == 0


def test_generated_captions_describe_the_image():
  images, texts = captions.shapes(6, image_size=32, seed=5)
  assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
  again, _ = captions.shapes(6, image_size=32, seed=5)
  np.testing.assert_array_equal(images, again)
  for image, text in zip(images, texts):
    words = text.split()
    first, second = captions.COLOURS[words[1]], captions.COLOURS[words[-2]]
    ys, xs = [np.nonzero((image == c).all(-1)) for c in (first, second)]
    assert len(ys[0]) > 20 and len(ys[1]) > 20  # both shapes drawn in their colours
    if "above" in words:
      assert ys[0].mean() < ys[1].mean()
    else:
      assert xs[0].mean() < xs[1].mean()
