"""Tests for fmjax.data.bert_pretraining: BERT MLM+NSP examples, as create_pretraining_data.py.

Statistics run on a multi-document corpus cut from WikiText-2 (one article per document,
one sentence per " . "), structure on BERT's own sample_text.txt.
"""

import pathlib
import random
import re

import numpy as np
import pytest

from fmjax import data
from fmjax.data import bert_pretraining as bp

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLE_TEXT = REPO / "data" / "bert_sample_text.txt"  # bundled: ../shared's sample_text.txt
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt"  # conftest checks ../shared
BERT_SPECIALS = dict(pad_piece="[PAD]", unk_piece="[UNK]",
                     special_tokens=("[CLS]", "[SEP]", "[MASK]"))
FIELDS = {"input_ids": (128, np.int32), "input_mask": (128, np.int32),
          "token_type_ids": (128, np.int32), "masked_lm_positions": (20, np.int32),
          "masked_lm_ids": (20, np.int32), "masked_lm_weights": (20, np.float32),
          "next_sentence_labels": (1, np.int32)}


@pytest.fixture(scope="module")
def wiki_docs():
  """60 WikiText-2 articles, at most 40 sentences each; every sentence ends with " ."."""
  docs = []
  for line in WIKITEXT.read_text(encoding="utf-8").split("\n"):
    line = line.strip()
    if re.fullmatch(r"= [^=].* =", line):  # a top-level heading starts an article
      docs.append([])
    elif line and not line.startswith("=") and docs and len(docs[-1]) < 40:
      sentences = [s.strip() + " ." for s in line.split(" . ") if s.strip(" .")]
      docs[-1] += sentences[:40 - len(docs[-1])]
  return docs


@pytest.fixture(scope="module")
def sample_docs():
  return data.read_pretraining_documents(SAMPLE_TEXT)


def _corpus_lines(docs):
  text = "\n".join(s for d in docs for s in d)
  return [text, SAMPLE_TEXT.read_text(encoding="utf-8")] if SAMPLE_TEXT.is_file() else [text]


@pytest.fixture(scope="module")
def tok(wiki_docs):
  """fmjax's house SentencePiece: no dummy prefix, so a text's first word has no "▁"."""
  return data.train_sentencepiece(_corpus_lines(wiki_docs), 800, **BERT_SPECIALS)


@pytest.fixture(scope="module")
def ids(tok):
  return {t: tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]")}


@pytest.fixture(scope="module")
def instances(wiki_docs, tok):
  """~6000 instances through the test hook, which also reports document indices."""
  return bp._create_instances(wiki_docs, tok, max_seq_length=128, dupe_factor=5, seed=7)


# ------------------------------------------------------------------------------ reading


def test_read_sample_text_documents(sample_docs):
  assert [len(d) for d in sample_docs] == [3, 13, 15]
  assert sample_docs[0][0].startswith("This text is included to make sure Unicode")
  assert sample_docs[1][0].startswith("The rain had only ceased")
  assert all(s == s.strip() and s for d in sample_docs for s in d)


def test_read_blank_line_runs_and_files(tmp_path):
  (tmp_path / "a.txt").write_text("s1\n  s2  \n\n\n \t\ns3\n\ns4", encoding="utf-8")
  (tmp_path / "b.txt").write_text("\n\ns5\ns6\n", encoding="utf-8")
  docs = data.read_pretraining_documents(str(tmp_path / "*.txt"))
  assert docs == [["s1", "s2"], ["s3"], ["s4"], ["s5", "s6"]]  # a file ends its last document


def test_read_bad_utf8_names_file_and_line(tmp_path):
  path = tmp_path / "latin1.txt"
  path.write_bytes("ok\nfine\ncaf\xe9\n".encode("latin-1"))
  with pytest.raises(data.DataError, match=r"latin1\.txt is not valid UTF-8.*line 3"):
    data.read_pretraining_documents(path)
  with pytest.raises(data.DataError, match="no file matches"):
    data.read_pretraining_documents(tmp_path / "missing*.txt")


# ------------------------------------------------------------------------------ structure


def test_fields_dtypes_shapes_and_consistency(wiki_docs, tok, instances, ids):
  examples = data.create_pretraining_examples(wiki_docs, tok, max_seq_length=128,
                                              dupe_factor=5, seed=7)
  assert len(examples) == len(instances)
  for ex, x in zip(examples, instances):
    assert {k: (v.shape[0], v.dtype) for k, v in ex.items()} == FIELDS
    n, k = len(x.tokens), len(x.positions)
    assert ex["input_mask"].sum() == n <= 128
    np.testing.assert_array_equal(ex["input_ids"][:n], x.tokens)
    assert (ex["input_ids"][n:] == ids["[PAD]"]).all()
    # [CLS] A [SEP] -> 0, B [SEP] -> 1, padding -> 0.
    np.testing.assert_array_equal(
        ex["token_type_ids"], [0] * (x.num_a + 2) + [1] * (n - x.num_a - 2) + [0] * (128 - n))
    assert x.original[0] == ids["[CLS]"] and x.original[-1] == ids["[SEP]"]
    assert x.original[x.num_a + 1] == ids["[SEP]"] and x.original.count(ids["[SEP]"]) == 2
    assert x.num_a >= 1 and n - x.num_a - 3 >= 1
    np.testing.assert_array_equal(ex["masked_lm_positions"][:k], x.positions)
    np.testing.assert_array_equal(ex["masked_lm_ids"][:k], x.labels)
    assert (ex["masked_lm_positions"][k:] == 0).all() and (ex["masked_lm_ids"][k:] == 0).all()
    np.testing.assert_array_equal(ex["masked_lm_weights"], [1.0] * k + [0.0] * (20 - k))
    assert ex["next_sentence_labels"].tolist() == [int(x.is_random_next)]


def test_same_seed_same_output_other_seed_differs(sample_docs, tok):
  make = lambda seed: data.create_pretraining_examples(sample_docs, tok, max_seq_length=64,
                                                       dupe_factor=2, seed=seed)
  a, b, c = make(1), make(1), make(2)
  assert len(a) == len(b) and all(
      all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))
  assert len(a) != len(c) or any(
      not np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))


def test_sample_text_end_to_end(sample_docs, tok, ids):
  instances = bp._create_instances(sample_docs, tok, max_seq_length=128, seed=12345)
  assert len(instances) > 50  # dupe_factor=10 passes over 3 documents
  assert {x.doc for x in instances} == {0, 1, 2}
  for x in instances:
    assert len(x.tokens) <= 128 and (x.b_doc != x.doc) == x.is_random_next
    text = tok.decode(t for t in x.original if t not in (ids["[CLS]"], ids["[SEP]"]))
    assert text  # real text, including the Unicode line when it is drawn


def test_truncate_seq_pair_pinned():
  # random.Random(0) draws 0.844 0.758 0.421 0.259 0.511: back, back, front, front, back.
  assert bp._truncate_seq_pair(10, 3, 8, random.Random(0)) == (slice(2, 7), slice(0, 3))
  # Ties truncate B, as the original's `tokens_a if len(a) > len(b) else tokens_b`.
  assert bp._truncate_seq_pair(2, 2, 3, random.Random(0)) == (slice(0, 2), slice(0, 1))


def test_long_sentences_are_truncated(wiki_docs, tok, ids):
  long_docs = [[" ".join(d)] for d in wiki_docs[:4]]  # one ~1000-token sentence each
  instances = bp._create_instances(long_docs, tok, max_seq_length=32, dupe_factor=3)
  assert instances
  for x in instances:
    assert len(x.tokens) == 32  # both halves truncated to fit exactly
    assert x.is_random_next and x.chunk_sentences == 1  # one-sentence chunks need a random B
    assert x.num_a >= 1 and len(x.tokens) - x.num_a - 3 >= 1


# ------------------------------------------------------------------------------ NSP


def test_next_sentence_fraction_and_documents(instances):
  rand = np.array([x.is_random_next for x in instances])
  single = np.array([x.chunk_sentences == 1 for x in instances])
  assert len(instances) > 4000
  assert rand[single].all()  # a one-sentence chunk has no B of its own
  assert abs(rand[~single].mean() - 0.5) < 0.03  # the coin
  # Overall the original gives more than half random pairs: 0.5 + 0.5 * P(single chunk).
  assert abs(rand.mean() - (0.5 + 0.5 * single.mean())) < 0.03
  for x in instances:
    assert (x.b_doc != x.doc) if x.is_random_next else (x.b_doc == x.doc)


def test_random_b_never_from_same_document_with_two_documents(tok):
  # With 2 documents the original's 10 tries all fail with chance 1/1024 per pair.
  docs = [[f"alpha {i} ." for i in range(30)], [f"beta {i} ." for i in range(30)]]
  instances = bp._create_instances(docs, tok, max_seq_length=16, dupe_factor=100, seed=3)
  random_pairs = [x for x in instances if x.is_random_next]
  assert len(random_pairs) > 1000
  assert all(x.b_doc != x.doc for x in random_pairs)
  # By construction: B of a random pair holds only the other document's words.
  for x in random_pairs:
    b = tok.decode(x.original[x.num_a + 2:-1])
    assert ("alpha" not in b) if x.doc == 0 else ("beta" not in b), b


def test_short_target_fraction(wiki_docs, tok):
  instances = bp._create_instances(wiki_docs, tok, max_seq_length=128, dupe_factor=25,
                                   masked_lm_prob=0.0, seed=5)
  targets = {(x.dupe, x.doc): x.target_length for x in instances}  # one per document pass
  assert len(targets) == 25 * 60
  short = [t for t in targets.values() if t < 125]
  assert abs(len(short) / len(targets) - 0.1) < 0.025
  assert min(short) >= 2 and all(len(x.tokens) <= 128 for x in instances)
  # The target is soft (whole sentences; these are ~50 tokens), yet short targets make
  # shorter pairs, while full ones nearly fill the 128.
  full = np.mean([len(x.tokens) for x in instances if x.target_length == 125])
  assert full > 125 and np.mean([len(x.tokens) for x in instances if x.target_length < 20]) < 110


# ------------------------------------------------------------------------------ masking


def test_masking_counts_and_specials(instances, ids):
  special = {ids["[CLS]"], ids["[SEP]"], ids["[PAD]"]}
  predicted = maskable = 0
  for x in instances:
    n = len(x.tokens)
    assert len(x.positions) == min(20, max(1, round(n * 0.15)))  # the original's count
    assert x.positions == sorted(set(x.positions)) and max(x.positions) < n
    assert not special & {x.original[p] for p in x.positions}
    assert x.labels == [x.original[p] for p in x.positions]
    changed = [i for i in range(n) if x.tokens[i] != x.original[i]]
    assert set(changed) <= set(x.positions)
    predicted += len(x.positions)
    maskable += n - 3
  assert abs(predicted / maskable - 0.15) < 0.01


def test_masking_80_10_10(instances, ids, tok):
  mask = keep = other = 0
  for x in instances:
    for p in x.positions:
      t = x.tokens[p]
      if t == ids["[MASK]"]:
        mask += 1
      elif t == x.original[p]:
        keep += 1
      else:
        other += 1
        assert t not in (*ids.values(), tok.eos_id)  # random ids are never special
  total = mask + keep + other
  assert total > 50000
  assert abs(mask / total - 0.8) < 0.01
  assert abs(keep / total - 0.1) < 0.01
  assert abs(other / total - 0.1) < 0.01


def test_max_predictions_cap(sample_docs, tok):
  examples = data.create_pretraining_examples(sample_docs, tok, max_seq_length=128,
                                              max_predictions_per_seq=5, dupe_factor=2)
  counts = [int(ex["masked_lm_weights"].sum()) for ex in examples]
  assert max(counts) == 5 and all(c >= 1 for c in counts)
  assert all(ex["masked_lm_positions"].shape == (5,) for ex in examples)


def test_whole_word_mask_masks_whole_words_only(wiki_docs):
  # With a dummy prefix every word, sentence-initial ones too, starts with "▁", so "a whole
  # word" is checkable from the pieces alone, independently of the implementation's rule.
  tok = data.train_sentencepiece(_corpus_lines(wiki_docs), 800, add_dummy_prefix=True,
                                 **BERT_SPECIALS)
  pieces = data.token_pieces(tok)
  cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
  instances = bp._create_instances(wiki_docs, tok, max_seq_length=128, dupe_factor=2,
                                   whole_word_mask=True, seed=11)
  multi_piece_words = 0
  for x in instances:
    masked = np.zeros(len(x.tokens), bool)
    masked[x.positions] = True
    assert len(x.positions) <= min(20, max(1, round(len(x.tokens) * 0.15)))
    for p in range(1, len(x.tokens)):
      continues_word = (not pieces[x.original[p]].startswith("▁")
                        and x.original[p - 1] not in (cls, sep) and x.original[p] != sep)
      if continues_word:
        assert masked[p] == masked[p - 1], (x.original, x.positions)
        multi_piece_words += masked[p]
  assert multi_piece_words > 1000  # the property is not vacuous


def test_whole_word_mask_sentence_start_begins_a_word(tok):
  # The house tokenizer adds no dummy prefix: a sentence's first piece has no "▁" and still
  # begins a word. Each sentence is one multi-piece word, so a whole word is a sentence.
  words = ["Homarus", "gammarus", "lobsters", "Crustacea", "decapods", "Mediterranean",
           "centimetres", "kilograms", "Scandinavia", "Morocco", "Norway", "Britain"]
  encodings = {tuple(tok.encode(w)) for w in words}
  assert min(map(len, encodings)) >= 2 and len(encodings) == len(words)
  docs = [words[:6], words[6:]]
  instances = bp._create_instances(docs, tok, max_seq_length=64, dupe_factor=200, seed=1,
                                   whole_word_mask=True, masked_lm_prob=0.3)
  # Without sentence starts a segment would be one word, too long to mask: nothing masked.
  assert np.mean([len(x.positions) > 0 for x in instances]) > 0.9
  for x in instances:
    a, b = x.original[1:x.num_a + 1], x.original[x.num_a + 2:-1]
    assert len(x.tokens) < 61  # nothing truncated: segments are whole sentences
    masked = set(x.positions)
    start = 1
    for segment in (a, b):
      i = 0
      while i < len(segment):  # cut the segment back into its sentences
        word = next(e for e in encodings if tuple(segment[i:i + len(e)]) == e)
        group = set(range(start + i, start + i + len(word)))
        assert group <= masked or not group & masked
        i += len(word)
      start += len(a) + 1


def test_dynamic_masking(sample_docs, tok, ids):
  unmasked = data.create_pretraining_examples(sample_docs, tok, max_seq_length=128,
                                              dupe_factor=1, masked_lm_prob=0.0)
  assert all(ex["masked_lm_weights"].sum() == 0 for ex in unmasked)
  ex = unmasked[0]
  n = int(ex["input_mask"].sum())
  epoch1 = data.mask_tokens(ex["input_ids"], tok, random.Random(0))
  epoch2 = data.mask_tokens(ex["input_ids"], tok, random.Random(1))
  again = data.mask_tokens(ex["input_ids"], tok, random.Random(0))
  assert all(np.array_equal(epoch1[k], again[k]) for k in epoch1)
  assert not np.array_equal(epoch1["masked_lm_positions"], epoch2["masked_lm_positions"])
  k = min(20, round(n * 0.15))
  assert epoch1["masked_lm_weights"].tolist() == [1.0] * k + [0.0] * (20 - k)
  positions = epoch1["masked_lm_positions"][:k]
  np.testing.assert_array_equal(epoch1["masked_lm_ids"][:k], ex["input_ids"][positions])
  assert (ex["input_ids"][positions] != ids["[SEP]"]).all() and positions.max() < n
  unchanged = np.setdiff1d(np.arange(128), positions)
  np.testing.assert_array_equal(epoch1["input_ids"][unchanged], ex["input_ids"][unchanged])
  assert epoch1["input_ids"].dtype == np.int32 and epoch1["input_ids"].shape == (128,)
  with pytest.raises(data.DataError, match=r"already hold \[MASK\].*masked_lm_prob=0.0"):
    data.mask_tokens(epoch1["input_ids"] if ids["[MASK]"] in epoch1["input_ids"]
                     else epoch2["input_ids"], tok, random.Random(0))


def test_word_starts_rule(tok, ids):
  text_ids = tok.encode("Homarus gammarus")
  seq = [ids["[CLS]"], *text_ids, ids["[SEP]"], *text_ids, ids["[SEP]"]]
  pieces = data.token_pieces(tok)
  expected = [pieces[t].startswith("▁") for t in seq]
  expected[1] = expected[len(text_ids) + 2] = True  # first token after [CLS] / [SEP]
  assert not pieces[text_ids[0]].startswith("▁")  # no dummy prefix
  assert data.word_starts(seq, tok).tolist() == expected


# ------------------------------------------------------------------------------ bad input


def test_one_document_is_refused(tok, sample_docs):
  with pytest.raises(data.DataError, match="at least 2 non-empty documents.*got 1 of 3"):
    data.create_pretraining_examples([sample_docs[1], [], ["", "   "]], tok, max_seq_length=64)


def test_empty_documents_and_sentences_are_dropped(tok, sample_docs):
  docs = [[], ["", "  "], sample_docs[1], [], ["", *sample_docs[2]]]
  instances = bp._create_instances(docs, tok, max_seq_length=64, dupe_factor=2)
  assert {x.doc for x in instances} == {2, 4} and {x.b_doc for x in instances} == {2, 4}


def test_tokenizer_without_mask_is_refused(wiki_docs, sample_docs):
  no_mask = data.train_sentencepiece(_corpus_lines(wiki_docs[:5]), 300, pad_piece="[PAD]",
                                     unk_piece="[UNK]", special_tokens=("[CLS]", "[SEP]"))
  with pytest.raises(data.DataError, match=r"no '\[MASK\]' token.*special_tokens="):
    data.create_pretraining_examples(sample_docs, no_mask, max_seq_length=64)
  with pytest.raises(data.DataError, match=r"no '\[CLS\]' token"):
    data.create_pretraining_examples(sample_docs, data.ByteTokenizer(), max_seq_length=64)


def test_bad_arguments(tok, sample_docs):
  with pytest.raises(data.DataError, match=r"documents\[0\] is a str"):
    data.create_pretraining_examples(["one sentence", "another"], tok, max_seq_length=64)
  with pytest.raises(ValueError, match="max_seq_length=4"):
    data.create_pretraining_examples(sample_docs, tok, max_seq_length=4)
  with pytest.raises(ValueError, match="masked_lm_prob"):
    data.create_pretraining_examples(sample_docs, tok, max_seq_length=64, masked_lm_prob=1.5)


# ------------------------------------------------------------------------------ tfds storage


def test_prepare_pretraining_dataset_round_trip(tmp_path, sample_docs, tok):
  kwargs = dict(max_seq_length=64, max_predictions_per_seq=10, dupe_factor=2, seed=3)
  expected = data.create_pretraining_examples(sample_docs, tok, **kwargs)
  source = data.prepare_pretraining_dataset(sample_docs, tok, data_dir=tmp_path, **kwargs)
  assert len(source) == len(expected)
  for i in (0, len(expected) // 2, len(expected) - 1):
    record = source[i]
    assert set(record) == set(expected[i])
    for k, v in expected[i].items():
      assert record[k].dtype == v.dtype
      np.testing.assert_array_equal(record[k], v)
  # Same inputs reuse the prepared dataset; any change gets its own.
  configs = lambda: sorted(p.name for p in (tmp_path / "bert_pretraining_examples").iterdir())
  assert len(configs()) == 1
  data.prepare_pretraining_dataset(sample_docs, tok, data_dir=tmp_path, **kwargs)
  assert len(configs()) == 1
  other = data.prepare_pretraining_dataset(sample_docs, tok, data_dir=tmp_path,
                                           **{**kwargs, "seed": 4})
  assert len(configs()) == 2 and len(other) > 0
  with pytest.raises(TypeError, match="mask_prob"):
    data.prepare_pretraining_dataset(sample_docs, tok, data_dir=tmp_path, max_seq_length=64,
                                     mask_prob=0.2)


def test_data_prepared_before_the_token_type_rename_is_prepared_again(tmp_path, sample_docs, tok):
  # Version 1.0.0 stored the sentence A/B ids as "segment_ids"; 1.1.0 as "token_type_ids".
  kwargs = dict(max_seq_length=32, max_predictions_per_seq=5, dupe_factor=1, seed=0)
  data.prepare_pretraining_dataset(sample_docs, tok, data_dir=tmp_path, **kwargs)
  (config_dir,) = (tmp_path / "bert_pretraining_examples").iterdir()
  assert [p.name for p in config_dir.iterdir()] == ["1.1.0"]
  (config_dir / "1.1.0").rename(config_dir / "1.0.0")  # as an older fmjax left it
  source = data.prepare_pretraining_dataset(sample_docs, tok, data_dir=tmp_path, **kwargs)
  assert sorted(p.name for p in config_dir.iterdir()) == ["1.0.0", "1.1.0"]
  assert "token_type_ids" in source[0] and "segment_ids" not in source[0]
