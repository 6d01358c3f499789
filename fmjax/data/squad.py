"""Extractive question answering in the SQuAD v1.1 format: windows in, answer texts out.

Shape key: F features (windows), T max_seq_length.

  SQuAD JSON --read_squad--> [QAExample] --make_features--> {"input_ids", ...} (F, T)
                                                              + [FeatureSpan] per window
  start/end logits (F, T) --best_answers--> {question id: answer text}

As google-research/bert's run_squad.py: a context longer than the window is cut into
overlapping spans every `doc_stride` tokens; each feature is [CLS] question [SEP] span [SEP]
with the question cut to max_query_length tokens; a training answer that is not wholly inside
a span is labelled at [CLS] (position 0). At prediction time a token's score counts only in
the span where it has the most context on both sides; the best of the n_best_size start and
end positions with start <= end and at most max_answer_length tokens wins. Answers come back
as the original context's characters, through the tokenizer's character offsets.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import numpy as np

from fmjax.data.glue import expand_paths, special_ids
from fmjax.data.text import DataError
from fmjax.data.tokenizers import Tokenizer


@dataclasses.dataclass(frozen=True)
class QAExample:
  """One question about one context, as SQuAD v1.1 writes it.

  Attributes:
    qid: the question id (the key of the predictions).
    title: the article's title (`split_by_article` groups by it).
    context: the paragraph the answer is taken from.
    question: the question's text.
    answers: (text, character start in context) pairs; empty for an unanswered question.
    where: the file and JSON position (or "tfds:name/split[i]"), for messages.
  """
  qid: str
  title: str
  context: str
  question: str
  answers: tuple[tuple[str, int], ...]  # (text, character start in context)
  where: str


@dataclasses.dataclass(frozen=True)
class FeatureSpan:
  """What prediction needs to know about one feature (window)."""
  example: int  # index into the examples
  token_offsets: tuple[tuple[int, int] | None, ...]  # per position: context char span, or None
  max_context: tuple[bool, ...]  # per position: this window gives the token its most context


def read_squad(path: str) -> list[QAExample]:
  """Reads SQuAD v1.1 JSON files (a path or glob), checking every answer against its context.

  Args:
    path: a SQuAD JSON file, or a glob of them (see `expand_paths`).

  Returns:
    The examples, file by file in sorted order, in each file's order.

  Raises:
    DataError: invalid JSON, not SQuAD format, an empty context or question, an answer whose
      answer_start does not point at its text, or no questions at all.
  """
  examples = []
  for file in expand_paths(path):
    try:
      with open(file, encoding="utf-8") as f:
        data = json.load(f)
    except json.JSONDecodeError as e:
      raise DataError(f"{file}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
      raise DataError(f"{file}: not SQuAD format: expected {{\"data\": [articles]}}")
    for a, article in enumerate(data["data"]):
      for p, paragraph in enumerate(article.get("paragraphs", [])):
        context = paragraph.get("context", "")
        where = f"{file}: data[{a}].paragraphs[{p}]"
        if not context.strip():
          raise DataError(f"{where}: empty context")
        for qa in paragraph.get("qas", []):
          qid = str(qa.get("id", ""))
          here = f"{where}, question id {qid!r}"
          if not qid or not str(qa.get("question", "")).strip():
            raise DataError(f"{here}: a question needs an id and non-empty text")
          answers = []
          for answer in qa.get("answers", []):
            text, start = answer.get("text", ""), answer.get("answer_start", -1)
            if not isinstance(start, int) or context[start:start + len(text)] != text or not text:
              found = context[start:start + len(text)] if isinstance(start, int) else None
              raise DataError(f"{here}: answer {text!r} does not match its answer_start={start} "
                              f"(the context has {found!r} there); fix the offset or the text")
            answers.append((text, start))
          examples.append(QAExample(qid, str(article.get("title", "")), context,
                                    qa["question"], tuple(answers), here))
  if not examples:
    raise DataError(f"{path}: no questions")
  return examples


def read_tfds(name: str, split: str, data_dir: str | None = None) -> list[QAExample]:
  """A tfds catalog QA dataset in SQuAD's features ("squad", split "train" / "validation").

  Args:
    name: the tfds name, e.g. "squad".
    split: the split, e.g. "train", "validation".
    data_dir: the tfds data directory; None (or "") for tfds's default.

  Returns:
    The examples in the split's order, `where` being "tfds:name/split[i]".
  """
  import tensorflow_datasets as tfds  # the data machinery, imported only when asked for
  source = tfds.data_source(name, split=split, data_dir=data_dir or None)
  text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)
  examples = []
  for i in range(len(source)):
    r = source[i]
    answers = tuple((text(a), int(s)) for a, s in zip(r["answers"]["text"],
                                                       r["answers"]["answer_start"]))
    examples.append(QAExample(text(r["id"]), text(r.get("title", b"")), text(r["context"]),
                              text(r["question"]), answers, f"tfds:{name}/{split}[{i}]"))
  return examples


def split_by_article(examples: Sequence[QAExample], eval_fraction: float):
  """(train, eval): the last `eval_fraction` of the articles go to eval.

  Articles are told by title, in file order, so no paragraph is in both.

  Args:
    examples: the examples, e.g. from `read_squad`.
    eval_fraction: the fraction of the articles to hold out (at least one article).

  Returns:
    (train, eval): two lists of examples, each in the input order.

  Raises:
    DataError: too few articles to hold out `eval_fraction` and keep some for training.
  """
  titles = list(dict.fromkeys(e.title for e in examples))
  n_eval = max(1, round(len(titles) * eval_fraction))
  if n_eval >= len(titles):
    raise DataError(f"{len(titles)} article(s): too few to hold out {eval_fraction:.0%} of them")
  held = set(titles[-n_eval:])
  return [e for e in examples if e.title not in held], [e for e in examples if e.title in held]


def _windows(n: int, size: int, stride: int) -> list[tuple[int, int]]:
  """(start, length) spans of at most `size` tokens every `stride` tokens covering [0, n)."""
  spans, start = [], 0
  while True:
    length = min(n - start, size)
    spans.append((start, length))
    if start + length >= n:
      return spans
    start += min(length, stride)


def _max_context(spans, span_index: int, position: int) -> bool:
  """Whether span `span_index` gives the token at document `position` its most context
  (run_squad.py's _check_is_max_context: min(left, right) + 0.01 * span length)."""
  best, best_score = None, None
  for i, (start, length) in enumerate(spans):
    if not start <= position < start + length:
      continue
    score = min(position - start, start + length - 1 - position) + 0.01 * length
    if best_score is None or score > best_score:
      best, best_score = i, score
  return best == span_index


def make_features(examples: Sequence[QAExample], tokenizer: Tokenizer, *, max_seq_length: int,
                  doc_stride: int, max_query_length: int):
  """Tokenizes and windows the examples.

  Args:
    examples: the examples, e.g. from `read_squad`.
    tokenizer: a BERT tokenizer (with [CLS], [SEP] and character offsets).
    max_seq_length: T, the length of a feature, special tokens included.
    doc_stride: how many context tokens one window starts after the previous one.
    max_query_length: the question's tokens kept (the rest are cut from its end).

  Returns:
    (arrays, spans): arrays = {"input_ids", "token_type_ids", "input_mask": (F, T) int32,
    "start_position", "end_position": (F,) int32 (the first answer's tokens; 0 when it is
    not inside the window or the example has no answer), "weight": (F,) float32}, and one
    FeatureSpan per feature.

  Raises:
    ValueError: the tokenizer has no [CLS]/[SEP], or max_seq_length leaves no room for the
      context after the question.
  """
  cls_id, sep_id = special_ids(tokenizer)
  rows, spans_out = [], []
  questions = tokenizer.encode_batch([e.question for e in examples])
  for index, example in enumerate(examples):
    query = list(questions[index])[:max_query_length]
    context_ids, offsets = tokenizer.encode_with_offsets(example.context)
    room = max_seq_length - len(query) - 3
    if room < 1:
      raise ValueError(f"max_seq_length={max_seq_length} leaves no room for the context after "
                       f"a {len(query)}-token question; raise it or lower max_query_length")
    answer_tokens = None
    if example.answers:
      text, start = example.answers[0]
      end = start + len(text)
      inside = [k for k, (s, e) in enumerate(offsets) if s < end and e > start]
      if inside:
        answer_tokens = (inside[0], inside[-1])
    spans = _windows(len(context_ids), room, doc_stride)
    for span_index, (start, length) in enumerate(spans):
      ids = [cls_id, *query, sep_id, *context_ids[start:start + length], sep_id]
      first = len(query) + 2  # position of the span's first token
      pad = max_seq_length - len(ids) + 1  # the final [SEP] and the padding
      token_offsets = [None] * first + [offsets[k] for k in range(start, start + length)] + [None] * pad
      max_context = [False] * first + [_max_context(spans, span_index, k)
                                       for k in range(start, start + length)] + [False] * pad
      start_position = end_position = 0
      if answer_tokens and start <= answer_tokens[0] and answer_tokens[1] < start + length:
        start_position = answer_tokens[0] - start + first
        end_position = answer_tokens[1] - start + first
      rows.append((ids, first, start_position, end_position))
      spans_out.append(FeatureSpan(index, tuple(token_offsets), tuple(max_context)))
  n = len(rows)
  arrays = {"input_ids": np.full((n, max_seq_length), tokenizer.pad_id, np.int32),
            "token_type_ids": np.zeros((n, max_seq_length), np.int32),
            "input_mask": np.zeros((n, max_seq_length), np.int32),
            "start_position": np.zeros(n, np.int32), "end_position": np.zeros(n, np.int32),
            "weight": np.ones(n, np.float32)}
  for i, (ids, first, s, e) in enumerate(rows):
    arrays["input_ids"][i, :len(ids)] = ids
    arrays["token_type_ids"][i, first:len(ids)] = 1
    arrays["input_mask"][i, :len(ids)] = 1
    arrays["start_position"][i], arrays["end_position"][i] = s, e
  return arrays, spans_out


def best_answers(examples: Sequence[QAExample], spans: Sequence[FeatureSpan], start_logits,
                 end_logits, *, n_best_size: int = 20, max_answer_length: int = 30) -> dict[str, str]:
  """The highest-scoring valid span per question, as text of the original context.

  Args:
    examples, spans: as read_squad and make_features returned them.
    start_logits, end_logits: (F, T) float arrays (numpy or jax) per feature.
    n_best_size: how many of the best start and of the best end positions are paired.
    max_answer_length: the longest answer, in tokens.

  Returns:
    question id -> answer text ("" when no valid span was found).
  """
  best: dict[int, tuple[float, str]] = {}
  for f, span in enumerate(spans):
    example = examples[span.example]
    starts = np.argsort(start_logits[f])[::-1][:n_best_size]
    ends = np.argsort(end_logits[f])[::-1][:n_best_size]
    for s in starts:
      if span.token_offsets[s] is None or not span.max_context[s]:
        continue
      for e in ends:
        if span.token_offsets[e] is None or e < s or e - s + 1 > max_answer_length:
          continue
        score = float(start_logits[f][s] + end_logits[f][e])
        if span.example not in best or score > best[span.example][0]:
          text = example.context[span.token_offsets[s][0]:span.token_offsets[e][1]]
          best[span.example] = (score, text.strip())
  return {e.qid: best.get(i, (0.0, ""))[1] for i, e in enumerate(examples)}
