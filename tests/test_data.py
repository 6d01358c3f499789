"""Tests for fmjax.data: tokenizers, local tfds corpora, packing and LM batches."""

import os
import pathlib

import numpy as np
import pytest

from fmjax import data

SHAKESPEARE = pathlib.Path(__file__).resolve().parents[1] / "data" / "tiny_shakespeare.txt"


@pytest.fixture(scope="module")
def shakespeare_text():
  return SHAKESPEARE.read_text(encoding="utf-8")


def write(path, content):
  path = pathlib.Path(path)
  path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
  return str(path)


# ------------------------------------------------------------------------------ tokenizers


def test_char_tokenizer_exact_ids_and_round_trip(tmp_path):
  tok = data.CharTokenizer.from_text("hello world")
  assert tok.chars == " dehlorw"
  assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (8, 9, 10)
  assert tok.encode("hello world") == [3, 2, 4, 4, 5, 0, 7, 5, 6, 4, 1]
  assert tok.decode([3, 2, 4, 4, 5, 8, 9]) == "hello"  # EOS and PAD decode to nothing
  assert tok.token_to_id("<eos>") == 8
  with pytest.raises(ValueError, match=r"'z' \(U\+007A\) at position 2"):
    tok.encode("hez")
  tok.save(tmp_path)
  loaded = data.load_tokenizer(tmp_path)
  assert isinstance(loaded, data.CharTokenizer)
  assert loaded.encode("world hello") == tok.encode("world hello")
  assert loaded.fingerprint == tok.fingerprint


def test_char_tokenizer_matches_nanogpt_shakespeare_char(shakespeare_text):
  tok = data.CharTokenizer.from_text(shakespeare_text)
  assert tok.vocab_size == 65 + 2
  assert tok.encode("hii there") == [46, 47, 47, 1, 58, 46, 43, 56, 43]  # nanoGPT's ids


def test_byte_tokenizer_round_trip_non_ascii(tmp_path):
  tok = data.ByteTokenizer()
  text = "aé€😀\n"
  ids = tok.encode(text)
  assert ids == [97, 0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xF0, 0x9F, 0x98, 0x80, 10]
  assert tok.decode(ids + [256, 257]) == text
  assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (256, 257, 258)
  tok.save(tmp_path)
  assert isinstance(data.load_tokenizer(tmp_path), data.ByteTokenizer)


@pytest.fixture(scope="module")
def sp_corpus(shakespeare_text):
  return shakespeare_text[:200_000]


def test_sentencepiece_round_trip_deterministic_save_load(sp_corpus, tmp_path):
  specials = ("[CLS]", "[SEP]", "[MASK]")
  tok = data.train_sentencepiece([sp_corpus], 512, special_tokens=specials)
  again = data.train_sentencepiece([sp_corpus], 512, special_tokens=specials)
  assert tok.model_proto == again.model_proto
  assert tok.vocab_size == 512
  assert (tok.pad_id, tok.eos_id, tok.token_to_id("<unk>")) == (0, 1, 2)
  assert [tok.token_to_id(s) for s in (*specials, "\n")] == [3, 4, 5, 6]
  with pytest.raises(KeyError):
    tok.token_to_id("[NOT_A_PIECE]")
  sample = sp_corpus[-3000:]
  ids = tok.encode(sample)
  assert tok.decode(ids) == sample
  assert len(ids) < len(sample) / 2  # it learned multi-character pieces
  assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == sample
  tok.save(tmp_path)
  loaded = data.load_tokenizer(tmp_path)
  assert isinstance(loaded, data.SentencePieceTokenizer)
  assert loaded.encode(sample) == ids
  assert loaded.fingerprint == tok.fingerprint
  assert data.SentencePieceTokenizer.from_file(tmp_path / "tokenizer.model").encode(sample) == ids


def test_sentencepiece_unigram_from_file_and_vocab_too_large(sp_corpus, tmp_path):
  path = pathlib.Path(write(tmp_path / "corpus.txt", sp_corpus[:50_000]))
  tok = data.train_sentencepiece([path], 300, model_type="unigram")
  sample = sp_corpus[:1000]
  assert tok.decode(tok.encode(sample)) == sample
  with pytest.raises(ValueError, match=r"vocab_size=20000 is too large .* at most \d+"):
    data.train_sentencepiece(["a tiny corpus\nof two lines"], 20000)


def test_tokenizer_fingerprints_differ():
  prints = {data.CharTokenizer.from_text("ab").fingerprint,
            data.CharTokenizer.from_text("abc").fingerprint, data.ByteTokenizer().fingerprint}
  assert len(prints) == 3


# ------------------------------------------------------------------------- local corpora


def test_blank_line_and_whole_file_documents(tmp_path):
  a = write(tmp_path / "a.txt", "first doc\nline two\n\n\n  \nsecond\n\nthird\n")
  b = write(tmp_path / "b.txt", "whole\n\nfile\n")
  docs = data.load_documents(data_dir=tmp_path / "tfds", train_path=str(tmp_path / "*.txt"),
                             document_split="blank_line")
  assert list(docs) == ["first doc\nline two", "second", "third", "whole", "file"]
  assert docs[1] == "second" and docs[-2:] == ["whole", "file"]
  docs = data.load_documents(data_dir=tmp_path / "tfds", train_path=[b, a])
  assert list(docs) == [open(b).read(), open(a).read()]  # verbatim, in the given order


def test_val_fraction_split_matches_nanogpt(shakespeare_text, tmp_path):
  kwargs = dict(data_dir=tmp_path, train_path=str(SHAKESPEARE), val_fraction=0.1)
  train = data.load_documents(split="train", **kwargs)
  val = data.load_documents(split="validation", **kwargs)
  assert list(train) == [shakespeare_text[:1_003_854]]  # nanoGPT: int(n * 0.9)
  assert list(val) == [shakespeare_text[1_003_854:]]
  assert len(val[0]) == 111_540
  tok = data.CharTokenizer.from_text(shakespeare_text)
  stream = data.load_token_stream(tok, split="validation", **kwargs)
  assert len(stream) == 111_540 + 1 and stream.dtype == np.uint16
  np.testing.assert_array_equal(stream[:-1], tok.encode(val[0]))
  assert stream[-1] == tok.eos_id


def test_split_fraction_cuts_inside_a_document():
  train, val = data.split_fraction(["aaaa", "bbbb", "cc"], 0.25)  # cut at int(10 * .75) = 7
  assert (train, val) == (["aaaa", "bbb"], ["b", "cc"])


def test_eval_path_gives_validation_split(tmp_path):
  train = write(tmp_path / "train.txt", "train text\n")
  val = write(tmp_path / "val.txt", "val text\n")
  docs = data.load_documents(data_dir=tmp_path / "tfds", train_path=train, eval_path=val,
                             split="validation")
  assert list(docs) == ["val text\n"]
  with pytest.raises(data.DataError, match="set eval_path or val_fraction"):
    data.load_documents(data_dir=tmp_path / "tfds", train_path=train, split="validation")


def test_changed_file_reprepares_unchanged_reuses(tmp_path):
  path = write(tmp_path / "a.txt", "version one\n")
  first = data.load_documents(data_dir=tmp_path / "tfds", train_path=path)
  record_file = next(pathlib.Path(first.cache_dir).glob("*.array_record*"))
  mtime = record_file.stat().st_mtime_ns
  same = data.load_documents(data_dir=tmp_path / "tfds", train_path=path)
  assert same.cache_dir == first.cache_dir and record_file.stat().st_mtime_ns == mtime
  write(path, "version two, longer\n")
  changed = data.load_documents(data_dir=tmp_path / "tfds", train_path=path)
  assert changed.cache_dir != first.cache_dir
  assert list(changed) == ["version two, longer\n"]


def test_catalog_path_reads_text_key(tmp_path, monkeypatch):
  # No internet here: stand a prepared-on-demand local builder in for the tfds catalog.
  path = write(tmp_path / "a.txt", "catalog doc\n")
  config = data.LocalTextConfig.for_files(path)

  def builder(name, *, data_dir, file_format):
    assert (name, file_format) == ("lm1b", "array_record")
    return data.LocalText(config=config, data_dir=data_dir, file_format=file_format)

  monkeypatch.setattr(data.text.tfds, "builder", builder)
  docs = data.load_documents(data_dir=tmp_path / "tfds", tfds_name="lm1b", text_key="text")
  assert list(docs) == ["catalog doc\n"]
  assert docs.name.startswith("local_text/file_") and docs.name.endswith(":train")
  wrong_key = data.load_documents(data_dir=tmp_path / "tfds", tfds_name="lm1b",
                                 text_key="sentence")
  with pytest.raises(data.DataError, match="no feature 'sentence'; its features are \\['text'\\]"):
    wrong_key[0]


@pytest.mark.parametrize("case", ["no_match", "directory", "zero_bytes", "whitespace",
                                  "not_utf8", "bad_eval_file"])
def test_bad_input_raises_data_error_naming_file(tmp_path, case):
  good = write(tmp_path / "good.txt", "fine text\n")
  target = {
      "no_match": lambda: str(tmp_path / "missing*.txt"),
      "directory": lambda: str(tmp_path),
      "zero_bytes": lambda: write(tmp_path / "empty.txt", b""),
      "whitespace": lambda: write(tmp_path / "blank.txt", " \n\t\n"),
      "not_utf8": lambda: write(tmp_path / "latin1.txt", "line one\ncaf".encode() + b"\xe9\n"),
      "bad_eval_file": lambda: write(tmp_path / "eval.txt", b"\xff"),
  }[case]()
  paths = dict(train_path=good, eval_path=target) if case == "bad_eval_file" else dict(
      train_path=target)
  with pytest.raises(data.DataError) as info:
    data.load_documents(data_dir=tmp_path / "tfds", **paths)
  assert os.path.basename(target) in str(info.value)
  if case == "not_utf8":
    assert "byte offset 12 (line 2)" in str(info.value)


# ------------------------------------------------------------------------------ packing


def test_pack_documents_inserts_eos_and_caches(tmp_path):
  tok = data.CharTokenizer("abc")  # a=0 b=1 c=2 EOS=3
  cache = str(tmp_path / "tokens.bin")
  stream = data.pack_documents(["ab", "c", "cab"], tok, cache_path=cache)
  np.testing.assert_array_equal(stream, [0, 1, 3, 2, 3, 2, 0, 1, 3])
  assert stream.dtype == np.uint16 and os.path.getsize(cache) == 9 * 2

  def fail(texts):
    raise AssertionError("the cache should have been reused")

  tok.encode_batch = fail
  np.testing.assert_array_equal(data.pack_documents(["ignored"], tok, cache_path=cache), stream)
  assert data.token_dtype(65536) == np.uint16 and data.token_dtype(65537) == np.int32


def test_load_token_stream_is_cached_per_tokenizer(tmp_path):
  path = write(tmp_path / "a.txt", "one doc\n\ntwo doc\n")
  kwargs = dict(data_dir=tmp_path / "tfds", train_path=path, document_split="blank_line")
  byte_stream = data.load_token_stream(data.ByteTokenizer(), **kwargs)
  expected = list(b"one doc") + [256] + list(b"two doc") + [256]
  np.testing.assert_array_equal(byte_stream, expected)
  char = data.CharTokenizer.from_text("one doc two")
  char_stream = data.load_token_stream(char, **kwargs)
  assert len(char_stream) == len(expected)
  docs = data.load_documents(**kwargs)
  caches = sorted(p.name for p in pathlib.Path(docs.cache_dir).glob("fmjax_tokens.*"))
  assert len(caches) == 2
  assert data.token_cache_path(docs, char).endswith(".uint16.bin")


# ------------------------------------------------------------------------------ batches


def test_make_batch_segments_and_positions_exact():
  eos = 0
  tokens = np.array([5, 6, eos, 7, 8, 9, eos, 10, 11, eos], np.uint16)
  batch = data.make_batch(tokens, np.array([0, 2]), seq_len=6, eos_id=eos)
  np.testing.assert_array_equal(batch["inputs"], [[5, 6, 0, 7, 8, 9], [0, 7, 8, 9, 0, 10]])
  np.testing.assert_array_equal(batch["targets"], [[6, 0, 7, 8, 9, 0], [7, 8, 9, 0, 10, 11]])
  np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 2, 2, 2], [1, 2, 2, 2, 2, 3]])
  np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 0, 1, 2], [0, 0, 1, 2, 3, 0]])
  assert all(v.dtype == np.int32 for v in batch.values())


def test_random_mode_is_nanogpt_sampling_and_shifted():
  tokens = np.arange(1000, dtype=np.int32)  # token value == stream position
  it = data.LMBatchIterator(tokens, batch_size=4, seq_len=16, seed=7, eos_id=-1)
  for step in range(3):
    batch = next(it)
    starts = np.random.default_rng([7, step]).integers(0, 1000 - 16, size=4)
    np.testing.assert_array_equal(batch["inputs"], starts[:, None] + np.arange(16))
    np.testing.assert_array_equal(batch["targets"], batch["inputs"] + 1)
    np.testing.assert_array_equal(batch["segment_ids"], np.ones((4, 16)))
    np.testing.assert_array_equal(batch["positions"], np.tile(np.arange(16), (4, 1)))


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_resume_equals_uninterrupted(mode):
  tokens = np.random.default_rng(0).integers(0, 50, size=2000).astype(np.uint16)
  make = lambda: data.LMBatchIterator(tokens, batch_size=8, seq_len=32, seed=3, eos_id=0,
                                      mode=mode)
  uninterrupted = [next(it) for it in [make()] for _ in range(8)]
  first = make()
  for _ in range(5):
    next(first)
  state = first.get_state()
  assert state == {"step": 5} and all(type(v) is int for v in state.values())
  resumed = make()
  resumed.set_state(state)
  for expected in uninterrupted[5:8]:
    got = next(resumed)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_host_shards_union_equals_single_host(mode):
  tokens = np.random.default_rng(1).integers(0, 50, size=3000).astype(np.uint16)
  kwargs = dict(batch_size=8, seq_len=16, seed=5, eos_id=0, mode=mode)
  single = data.LMBatchIterator(tokens, **kwargs)
  hosts = [data.LMBatchIterator(tokens, process_index=p, process_count=4, **kwargs)
           for p in range(4)]
  for _ in range(3):
    whole = next(single)
    parts = [next(h) for h in hosts]
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
  with pytest.raises(ValueError, match="not divisible"):
    data.LMBatchIterator(tokens, process_count=3, **kwargs)


def test_sequential_mode_covers_each_window_once_per_epoch():
  seq_len, windows = 4, 12
  tokens = np.arange(1 + windows * seq_len, dtype=np.int32)
  it = data.LMBatchIterator(tokens, batch_size=3, seq_len=seq_len, seed=0, eos_id=-1,
                            mode="sequential")
  epochs = [np.concatenate([next(it)["inputs"][:, 0] for _ in range(4)]) for _ in range(2)]
  for starts in epochs:
    np.testing.assert_array_equal(np.sort(starts), np.arange(windows) * seq_len)
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled per epoch


def test_short_stream_error_says_length():
  with pytest.raises(data.DataError, match="has 10 tokens but seq_len=16 needs at least 17"):
    data.LMBatchIterator(np.zeros(10, np.uint16), batch_size=1, seq_len=16, seed=0, eos_id=0)


def test_eval_batches_sequential_deterministic_and_sharded():
  tokens = np.arange(1 + 10 * 4, dtype=np.int32)  # 10 windows of 4
  batches = list(data.eval_batches(tokens, 3, 4, eos_id=-1))
  assert len(batches) == 3  # full batches only: 9 of the 10 windows
  np.testing.assert_array_equal(np.concatenate([b["inputs"][:, 0] for b in batches]),
                                np.arange(9) * 4)
  assert len(list(data.eval_batches(tokens, 3, 4, max_batches=2, eos_id=-1))) == 2
  halves = [list(data.eval_batches(tokens, 4, 4, eos_id=-1, process_index=p, process_count=2))
            for p in range(2)]
  for k, whole in enumerate(data.eval_batches(tokens, 4, 4, eos_id=-1)):
    np.testing.assert_array_equal(
        np.concatenate([halves[0][k]["targets"], halves[1][k]["targets"]]), whole["targets"])
  with pytest.raises(data.DataError, match="fewer than one batch of 11"):
    data.eval_batches(tokens, 11, 4, eos_id=-1)
