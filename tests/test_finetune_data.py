"""Finetuning data and metrics: tables, pair encoding, SQuAD windows and offsets, heads, scores."""

import json
import math
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import evaluation, heads
from fmjax.data import DataError, glue, squad, train_sentencepiece
from fmjax.data.tokenizers import Tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TINY = REPO / "data" / "finetune_tiny"


class WordTokenizer(Tokenizer):
  """One id per whitespace-separated word of a fixed vocabulary: hand-checkable ids."""
  kind = "test-words"

  def __init__(self, words):
    self.vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    self.ids = {w: i for i, w in enumerate(self.vocab)}
    self.vocab_size, self.pad_id, self.eos_id = len(self.vocab), 0, 3

  def encode(self, text):
    return [self.ids.get(w, 1) for w in text.split()]

  def encode_with_offsets(self, text):
    spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    return [self.ids.get(text[s:e], 1) for s, e in spans], spans

  def decode(self, ids):
    return " ".join(self.vocab[i] for i in ids)

  def token_to_id(self, token):
    return self.ids[token]

  def _metadata(self):
    return {}

  @classmethod
  def _restore(cls, directory, metadata):
    raise NotImplementedError


# Metrics against hand-computed values ---------------------------------------------------------

def test_classification_metrics_hand_computed():
  p, y = [1, 0, 1, 1], [1, 0, 0, 1]
  assert evaluation.accuracy(p, y) == 0.75
  assert evaluation.f1(p, y) == pytest.approx(0.8)  # tp 2, predicted 3, true 2: 4 / 5
  # TP 2, TN 1, FP 1, FN 0: (2*1 - 1*0) / sqrt(3 * 2 * 1 * 2)
  assert evaluation.matthews_corrcoef(p, y) == pytest.approx(2 / math.sqrt(12))
  # three classes: n 4, correct 2, predicted counts (2,1,1), true counts (1,2,1):
  # (2*4 - 5) / sqrt((16 - 6) * (16 - 6)) = 0.3
  assert evaluation.matthews_corrcoef([0, 1, 2, 0], [0, 1, 1, 2]) == pytest.approx(0.3)
  assert evaluation.matthews_corrcoef([1, 1, 1], [0, 1, 0]) == 0.0  # undefined: constant
  assert evaluation.f1([0, 0], [0, 0]) == 0.0


def test_correlations_hand_computed():
  # x-mean (-1, 0, 1), y-mean (-7/3, -1/3, 8/3): 5 / (sqrt(2) * sqrt(114) / 3)
  assert evaluation.pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(15 / math.sqrt(228))
  # ties share the average rank: x ranks (1, 2.5, 2.5, 4), y ranks (1, 3, 2, 4)
  assert evaluation.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
  assert evaluation.spearman([3, 1, 2], [30, 10, 20]) == pytest.approx(1.0)
  assert evaluation.pearson([1, 1, 1], [1, 2, 3]) == 0.0


def test_squad_scores_follow_the_official_normalisation():
  assert evaluation.normalize_answer("The  Black-Sea!") == "blacksea"
  assert evaluation.normalize_answer("an Apple, a pear") == "apple pear"
  assert evaluation.squad_exact_match("the Black Sea", "Black Sea.") == 1.0
  # prediction (black, sea, river) vs truth (black, sea): P 2/3, R 1 -> F1 0.8
  assert evaluation.squad_f1("black sea river", "the Black Sea") == pytest.approx(0.8)
  assert evaluation.squad_f1("volga", "the Black Sea") == 0.0
  scores = evaluation.squad_scores({"a": "Black Sea", "b": "river"},
                                   {"a": ["the Black Sea"], "b": ["a river bank", "bank"],
                                    "c": ["x"]})
  # a: EM 1, F1 1; b: EM 0, F1 max(2*(1*.5)/1.5, 0) = 2/3; c: unanswered, 0
  assert scores["exact_match"] == pytest.approx(100 / 3)
  assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)


# Heads and losses -----------------------------------------------------------------------------

def test_head_losses_against_naive_formulas():
  logits = jnp.array([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]])
  labels = jnp.array([0, 0, 1])
  weights = jnp.array([1.0, 1.0, 0.0])  # the third row pads the batch: it must not count
  loss, m = heads.classification_loss(logits, labels, weights)
  naive = (-jax.nn.log_softmax(logits[0])[0] - jax.nn.log_softmax(logits[1])[0]) / 2
  assert loss == pytest.approx(float(naive), rel=1e-6)
  assert m["accuracy"] == pytest.approx(0.5)
  loss, _ = heads.regression_loss(jnp.array([[1.0], [3.0], [9.0]]), jnp.array([2.0, 3.0, 0.0]),
                                  weights)
  assert loss == pytest.approx(0.5)  # ((1-2)^2 + 0) / 2
  start = jnp.log(jnp.array([[0.5, 0.25, 0.25]]))
  end = jnp.log(jnp.array([[0.1, 0.1, 0.8]]))
  loss, m = heads.span_loss(start, end, jnp.array([1]), jnp.array([2]))
  assert loss == pytest.approx((-math.log(0.25) - math.log(0.8)) / 2, rel=1e-6)
  assert m["start_accuracy"] == 0.0 and m["end_accuracy"] == 1.0


def test_classification_head_shapes_and_dropout():
  head = heads.ClassificationHead(3, dropout_rate=0.5)
  x = jnp.ones((4, 8))
  params = head.init(jax.random.key(0), x)
  out = head.apply(params, x)
  assert out.shape == (4, 3) and out.dtype == jnp.float32
  dense = nn.meta.unbox(params)["params"]["dense"]
  np.testing.assert_allclose(out, x @ dense["kernel"] + dense["bias"], rtol=1e-6)
  noisy = head.apply(params, x, train=True, rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(noisy, out)


# Tables ---------------------------------------------------------------------------------------

def write(path, text):
  path.write_text(text, encoding="utf-8")
  return str(path)


def test_tsv_without_quoting_keeps_quotes_as_text(tmp_path):
  path = write(tmp_path / "a.tsv", 'sentence\tlabel\nit \'s " great "\t1\nbad\t0\n\n')
  examples = glue.read_examples(path, glue.TableFormat(("sentence",)))
  assert [e.texts for e in examples] == [('it \'s " great "',), ("bad",)]
  assert [e.label for e in examples] == [1, 0]
  assert examples[1].where == f"{path}:3"


def test_csv_quoting_pairs_and_label_names(tmp_path):
  path = write(tmp_path / "rte.tsv", 'sentence1\tsentence2\tlabel\n"He said ""hi""."\tok\t'
                                     'not_entailment\nA\tB\tentailment\n')
  fmt = glue.TableFormat(("sentence1", "sentence2"), quoting="csv",
                         label_names=("entailment", "not_entailment"))
  examples = glue.read_examples(path, fmt)
  assert examples[0].texts == ('He said "hi".', "ok") and examples[0].label == 1
  assert examples[1].label == 0


def test_headerless_columns_by_index_and_jsonl(tmp_path):
  path = write(tmp_path / "x.tsv", "0\tgood film\n1\tbad film\n")
  examples = glue.read_examples(path, glue.TableFormat(("1",), label_column="0", header=False))
  assert [(e.texts[0], e.label) for e in examples] == [("good film", 0), ("bad film", 1)]
  path = write(tmp_path / "x.jsonl", '{"text": "a b", "score": 4.5}\n{"text": "c", "score": 1}\n')
  examples = glue.read_examples(path, glue.TableFormat(("text",), label_column="score",
                                                       num_labels=1))
  assert [e.label for e in examples] == [4.5, 1.0]


@pytest.mark.parametrize("content,fmt,message", [
    ("sentence\tlabel\ngood\t1\nbad\t7\n", {}, r"a.tsv:3: label '7' is not in the label set 0..1"),
    ("sentence\tlabel\ngood\t1\nbad\t0\textra\n", {}, r"a.tsv:3: 3 fields where the header has 2"),
    ("text\tlabel\ngood\t1\n", {}, r"a.tsv:1: no column 'sentence' in the header \['text', 'label'\]"),
    ("sentence\tlabel\n  \t1\n", {}, r"a.tsv:2: column 'sentence' is empty"),
    ("sentence\tlabel\ngood\tyes\n", {"label_names": ("no", "yes", "maybe")},
     None),  # named labels are fine...
    ("sentence\tlabel\ngood\tperhaps\n", {"label_names": ("no", "yes")},
     r"a.tsv:2: label 'perhaps' is not one of \['no', 'yes'\]"),
    ("sentence\tlabel\ngood\thigh\n", {"num_labels": 1}, r"a.tsv:2: label 'high' is not a number"),
    ("sentence\tlabel\n", {}, r"a.tsv: no examples"),
])
def test_bad_rows_name_file_line_and_value(tmp_path, content, fmt, message):
  path = write(tmp_path / "a.tsv", content)
  table = glue.TableFormat(("sentence",), **fmt)
  if message is None:
    assert glue.read_examples(path, table)[0].label == 1
    return
  with pytest.raises(DataError, match=message):
    glue.read_examples(path, table)


def test_bad_jsonl_and_missing_files(tmp_path):
  path = write(tmp_path / "a.jsonl", '{"sentence": "ok", "label": 1}\n{"sentence": "x", \n')
  with pytest.raises(DataError, match=r"a.jsonl:2: not a JSON object"):
    glue.read_examples(path, glue.TableFormat(("sentence",)))
  path = write(tmp_path / "b.jsonl", '{"sentence": "ok"}\n')
  with pytest.raises(DataError, match=r"b.jsonl:1: no key 'label'"):
    glue.read_examples(path, glue.TableFormat(("sentence",)))
  assert glue.read_examples(path, glue.TableFormat(("sentence",)), labelled=False)[0].label is None
  with pytest.raises(FileNotFoundError, match="nothere.tsv: no such file"):
    glue.read_examples(str(tmp_path / "nothere.tsv"), glue.TableFormat(("sentence",)))
  (tmp_path / "latin1.tsv").write_bytes(b"sentence\tlabel\ncaf\xe9\t1\n")
  with pytest.raises(DataError, match="latin1.tsv: not UTF-8"):
    glue.read_examples(str(tmp_path / "latin1.tsv"), glue.TableFormat(("sentence",)))


def test_pair_encoding_by_hand():
  tok = WordTokenizer("a b c d e f g".split())  # a=5 ... g=11
  examples = [glue.Example(("a b c d e", "f g"), 1, "x:2"), glue.Example(("a", "b"), 0, "x:3")]
  arrays, truncated = glue.encode_examples(examples, tok, max_seq_length=8)
  # 5 + 2 tokens + 3 specials > 8: the longer text loses tokens from its end: (a b c) (f g)
  np.testing.assert_array_equal(arrays["input_ids"][0], [2, 5, 6, 7, 3, 10, 11, 3])
  np.testing.assert_array_equal(arrays["token_type_ids"][0], [0, 0, 0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(arrays["input_ids"][1], [2, 5, 3, 6, 3, 0, 0, 0])
  np.testing.assert_array_equal(arrays["token_type_ids"][1], [0, 0, 0, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(arrays["input_mask"][1], [1, 1, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(arrays["label"], [1, 0])
  assert truncated == 1
  single, _ = glue.encode_examples([glue.Example(("c d",), 0, "y:1")], tok, max_seq_length=5)
  np.testing.assert_array_equal(single["input_ids"][0], [2, 7, 8, 3, 0])


def test_shared_glue_files_read_with_their_quoting():
  rte = glue.read_examples(str(SHARED / "rte" / "dev.tsv"), glue.TableFormat(
      ("sentence1", "sentence2"), quoting="csv", label_names=("entailment", "not_entailment")))
  assert len(rte) == 277 and sum(e.label == 0 for e in rte) == 146
  sst = glue.read_examples(str(SHARED / "sst2" / "test.tsv"), glue.TableFormat(("sentence",)))
  assert len(sst) == 872 and sum(e.label for e in sst) == 444


# SQuAD windows and offsets -------------------------------------------------------------------

def test_windows_and_max_context_by_hand():
  assert squad._windows(10, 4, 3) == [(0, 4), (3, 4), (6, 4)]
  assert squad._windows(3, 4, 3) == [(0, 3)]
  spans = [(0, 4), (3, 4), (6, 4)]
  # token 3: span 0 scores min(3, 0) + .04, span 1 min(0, 3) + .04 -> tie, the first wins
  assert squad._max_context(spans, 0, 3) and not squad._max_context(spans, 1, 3)
  # token 5: span 1 min(2, 1) = 1 beats span 0 (not inside) -> span 1
  assert squad._max_context(spans, 1, 5)


def qa_example(context, question, answer, qid="q"):
  return squad.QAExample(qid, "t", context, question, ((answer, context.index(answer)),), "f")


def test_qa_windows_map_answers_through_offsets():
  context = "a b c d e f g a b c d e f g a b c"  # 17 words
  tok = WordTokenizer("a b c d e f g what".split())
  example = qa_example(context, "what", "d e f")  # words 3..5
  arrays, spans = squad.make_features([example], tok, max_seq_length=10, doc_stride=3,
                                      max_query_length=4)
  # room for 10 - 1 - 3 = 6 context tokens per window, every 3 tokens
  assert [s.token_offsets[3][0] for s in spans] == [0, 6, 12, 18, 24]
  # windows starting at tokens 0 (has d e f at 3..5) and 3 (at 0..2); others: [CLS]
  np.testing.assert_array_equal(arrays["start_position"], [6, 3, 0, 0, 0])
  np.testing.assert_array_equal(arrays["end_position"], [8, 5, 0, 0, 0])
  np.testing.assert_array_equal(arrays["input_ids"][1], [2, 12, 3, 8, 9, 10, 11, 5, 6, 3])
  for f in (0, 1):
    (s, _), (_, e) = (spans[f].token_offsets[arrays["start_position"][f]],
                      spans[f].token_offsets[arrays["end_position"][f]])
    assert context[s:e] == "d e f"
  # Peaked logits at window 0's labels give the answer back as context text. The same span
  # seen from window 1 does not count: its start (token 3) has more context in window 0
  # (min(3, 2) = 2) than in window 1 (min(0, 5) = 0). Window 1's best is then the start
  # token it does own (token 5: min(2, 3) beats window 0's min(5, 0)) with its end: "f".
  start = np.full((5, 10), -10.0)
  end = np.full((5, 10), -10.0)
  start[0, 6], end[0, 8] = 5.0, 5.0
  assert squad.best_answers([example], spans, start, end) == {"q": "d e f"}
  start[0, 6] = end[0, 8] = -10.0
  start[1, 3], end[1, 5] = 5.0, 5.0
  assert squad.best_answers([example], spans, start, end) == {"q": "f"}


def test_qa_round_trip_with_sentencepiece_on_the_bundled_set():
  examples = squad.read_squad(str(TINY / "qa.json"))
  texts = [t for e in examples for t in (e.context, e.question)]
  tok = train_sentencepiece(texts, vocab_size=300, pad_piece="[PAD]", unk_piece="[UNK]",
                            special_tokens=("[CLS]", "[SEP]", "[MASK]"), lowercase=True)
  arrays, spans = squad.make_features(examples, tok, max_seq_length=48, doc_stride=16,
                                      max_query_length=16)
  assert len(spans) > 3 * len(examples)  # several windows per context
  found = {}
  for f, span in enumerate(spans):
    s, e = arrays["start_position"][f], arrays["end_position"][f]
    if s == 0:
      continue
    example = examples[span.example]
    text = example.context[span.token_offsets[s][0]:span.token_offsets[e][1]]
    assert evaluation.normalize_answer(text) == evaluation.normalize_answer(example.answers[0][0])
    found[example.qid] = True
  assert len(found) == len(examples)  # every answer lies wholly inside some window
  # Offsets are character spans of the original (cased, non-ASCII) text.
  ids, offsets = tok.encode_with_offsets("Über the Danube")
  assert len(ids) == len(offsets) and offsets[-1][1] == len("Über the Danube")
  assert all(not "Über the Danube"[s:e].startswith(" ") for s, e in offsets)


def test_squad_reader_rejects_mismatched_answers(tmp_path):
  data = {"data": [{"title": "T", "paragraphs": [{"context": "The sky is blue.", "qas": [
      {"id": "x1", "question": "Colour?", "answers": [{"text": "blue", "answer_start": 3}]}]}]}]}
  path = tmp_path / "bad.json"
  path.write_text(json.dumps(data))
  with pytest.raises(DataError, match=r"bad.json: data\[0\].paragraphs\[0\], question id 'x1': "
                                      r"answer 'blue' does not match its answer_start=3 "
                                      r"\(the context has ' sky' there\)"):
    squad.read_squad(str(path))
  data["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] = 11
  path.write_text(json.dumps(data))
  assert squad.read_squad(str(path))[0].answers == (("blue", 11),)


def test_split_by_article_keeps_articles_whole():
  examples = squad.read_squad(str(TINY / "qa.json"))
  train, held = squad.split_by_article(examples, 0.34)
  assert {e.title for e in held} == {"Bread"} and not {e.title for e in train} & {"Bread"}
  assert len(train) + len(held) == len(examples)


def test_tfds_catalog_records_map_to_examples(monkeypatch):
  """glue/rte and squad through tfds.data_source (stubbed: no network here), feature names as
  the tfds catalog has them; unlabelled GLUE test rows (label -1) get no label."""
  import tensorflow_datasets as tfds
  records = {
      ("glue/rte", "validation"): [
          {"sentence1": b"A man sleeps.", "sentence2": b"Nobody sleeps.", "label": 1, "idx": 0},
          {"sentence1": b"It rains.", "sentence2": b"It is wet.", "label": -1, "idx": 1}],
      ("squad", "train"): [
          {"id": b"s1", "title": b"Sky", "context": b"The sky is blue.", "question": b"Colour?",
           "answers": {"text": [b"blue"], "answer_start": [11]}}],
  }
  calls = []

  def data_source(name, split, data_dir=None):
    calls.append((name, split, data_dir))
    return records[(name, split)]
  monkeypatch.setattr(tfds, "data_source", data_source)
  fmt = glue.TableFormat(("sentence1", "sentence2"), label_names=("entailment", "not_entailment"))
  rte = glue.read_tfds("glue/rte", "validation", fmt)
  assert [(e.texts, e.label) for e in rte] == [
      (("A man sleeps.", "Nobody sleeps."), 1), (("It rains.", "It is wet."), None)]
  assert rte[0].where == "tfds:glue/rte/validation[0]"
  qa = squad.read_tfds("squad", "train")
  assert qa == [squad.QAExample("s1", "Sky", "The sky is blue.", "Colour?", (("blue", 11),),
                                "tfds:squad/train[0]")]
  assert calls == [("glue/rte", "validation", None), ("squad", "train", None)]
