"""BERT pre-training data: masked-LM + next-sentence-prediction (MLM+NSP) examples.

A re-implementation of google-research/bert `create_pretraining_data.py` on fmjax
tokenizers. One `random.Random(seed)` is drawn from in the original's order (document
shuffle; per document pass the target length; per instance the A/B split, the random-next
coin, the random document and start sentence, the truncation sides, then the masking;
finally the shuffle of all instances), so a seed gives one fixed output.

Pipeline: `read_pretraining_documents` (one sentence per line, blank lines between
documents) -> `create_pretraining_examples` (dicts of numpy arrays: the original's
tf.Example features) -> `prepare_pretraining_dataset` (the same, stored once as a tfds
ArrayRecord dataset, whose random-access data source `batches.ExampleBatchIterator` reads
through `grain.MapDataset.source`). `mask_tokens` masks an unmasked example again on the fly (dynamic
masking, as in RoBERTa): create the examples with `masked_lm_prob=0.0` and call it per epoch.

Shape key: T max_seq_length, P max_predictions_per_seq.

Where this differs from the original, on purpose:
  - Ids are int32: the original writes int64 and its run_pretraining.py casts them to int32.
  - The sentence A/B ids are "token_type_ids", as transformers names them; the original
    calls them "segment_ids", which in fmjax are the document ids of packed LM batches.
  - The 10% random replacement draws from the vocabulary minus the special ids (PAD, EOS,
    UNK, [CLS], [SEP], [MASK], other control pieces); the original draws from all of it.
  - A random B never comes from the current document: when the original's 10 draws all hit
    it (chance (1/n)^10 with n documents), one more draw is made among the other documents.
  - `masked_lm_prob=0.0` masks nothing (the original still masks one token per instance).
  - Each input file starts a new document (the original lets a file's last document run
    into the next file when the file does not end with a blank line).
  - Whole-word masking works on SentencePiece pieces instead of WordPiece "##" marks: see
    `word_starts`.
Sentences longer than the sequence are kept and truncated like any long pair: the longer of
A and B loses tokens from its front or back, at random, until [CLS] A [SEP] B [SEP] fits.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import os
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import sentencepiece as spm
import tensorflow_datasets as tfds

from fmjax.data.text import DataError, log, prepare_once, read_text_file, resolve_files
from fmjax.data.tokenizers import SentencePieceTokenizer, Tokenizer

BERT_TOKENS = ("[CLS]", "[SEP]", "[MASK]", "[PAD]")
WORD_START = "\u2581"  # "▁", SentencePiece's mark for a piece that follows a space
_RANDOM_NEXT_TRIES = 10  # as the original


# ------------------------------------------------------------------------------ reading


def read_pretraining_documents(path_or_glob: str | os.PathLike | Sequence[str]) -> list[list[str]]:
  """Reads the original's input format: one sentence per line, blank lines between documents.

  Lines are stripped; a run of blank (or whitespace-only) lines is one document break, and
  each file starts a new document.

  Args:
    path_or_glob: a path or glob, or a sequence of them.

  Returns:
    The documents, each a list of sentence strings, in file order.

  Raises:
    DataError: no file matches, a file is empty or not UTF-8 (naming the file and line).
  """
  documents = []
  for path in resolve_files(path_or_glob):
    document = []
    for line in read_text_file(path).split("\n"):
      line = line.strip()
      if line:
        document.append(line)
      elif document:
        documents.append(document)
        document = []
    if document:
      documents.append(document)
  return documents


# ------------------------------------------------------------------------------ vocabulary


def token_pieces(tokenizer: Tokenizer) -> list[str]:
  """Returns the piece string of every id of a SentencePiece tokenizer, in id order.

  Args:
    tokenizer: a `SentencePieceTokenizer`.

  Returns:
    V piece strings (e.g. "▁the"); piece i is id i's.

  Raises:
    DataError: the tokenizer is not a `SentencePieceTokenizer` (other kinds have no pieces).
  """
  return [p for p, _ in _sentencepiece_table(tokenizer)]


def word_starts(input_ids: Sequence[int], tokenizer: Tokenizer) -> np.ndarray:
  """Which tokens begin a word, for whole-word masking.

  The rule: a token begins a word when its piece begins with "▁" (SentencePiece's mark for
  a preceding space) or it follows [CLS] or [SEP]. This stands in for the original's
  "a WordPiece not starting with ## begins a word". fmjax's `train_sentencepiece` adds no
  dummy prefix, so the first word of a text has no "▁": `create_pretraining_examples`
  therefore also starts a word at the first token of every sentence (it knows where
  sentences begin); from ids alone, as here, a sentence that starts inside segment A or B
  is joined to the last word of the previous sentence.

  Args:
    input_ids: (T,) token ids.
    tokenizer: a SentencePiece tokenizer with the BERT tokens.

  Returns:
    (T,) bool.
  """
  vocab = _whole_word_vocab(tokenizer)
  ids = np.asarray(input_ids, np.int64)
  starts = vocab.word_start[ids]
  starts[1:] |= np.isin(ids[:-1], (vocab.cls_id, vocab.sep_id))
  return starts


@dataclasses.dataclass(frozen=True)
class _Vocab:
  cls_id: int
  sep_id: int
  mask_id: int
  pad_id: int
  replacement_ids: tuple[int, ...]  # what the 10% random replacement draws from
  word_start: np.ndarray | None  # (V,) bool: the piece begins with "▁"; None without pieces


def _sentencepiece_table(tokenizer: Tokenizer) -> list[tuple[str, bool]]:
  """(piece, is special) per id; special = control (PAD, EOS, [CLS], ...) or unknown."""
  if not isinstance(tokenizer, SentencePieceTokenizer):
    raise DataError(f"a {type(tokenizer).__name__} has no SentencePiece pieces; use a "
                    "SentencePieceTokenizer (see train_sentencepiece)")
  sp = spm.SentencePieceProcessor(model_proto=tokenizer.model_proto)
  return [(sp.id_to_piece(i), sp.is_control(i) or sp.is_unknown(i))
          for i in range(sp.get_piece_size())]


def _whole_word_vocab(tokenizer: Tokenizer) -> _Vocab:
  vocab = _bert_vocab(tokenizer)
  if vocab.word_start is None:
    raise DataError(f"whole-word masking needs the tokenizer's pieces, and a {tokenizer.kind} "
                    "tokenizer has none: use a SentencePieceTokenizer (train_sentencepiece)")
  return vocab


@functools.lru_cache(maxsize=8)
def _bert_vocab(tokenizer: Tokenizer) -> _Vocab:
  ids = {}
  for token in BERT_TOKENS:
    try:
      ids[token] = tokenizer.token_to_id(token)
    except KeyError:
      raise DataError(
          f"the {tokenizer.kind} tokenizer has no {token!r} token, which BERT pre-training "
          f"needs (with {', '.join(t for t in BERT_TOKENS if t != token)}). Train one with "
          "train_sentencepiece(corpus, vocab_size, pad_piece='[PAD]', unk_piece='[UNK]', "
          "special_tokens=('[CLS]', '[SEP]', '[MASK]'))") from None
  special = set(ids.values()) | {tokenizer.eos_id, tokenizer.pad_id}
  if isinstance(tokenizer, SentencePieceTokenizer):
    table = _sentencepiece_table(tokenizer)
    special |= {i for i, (_, is_special) in enumerate(table) if is_special}
    word_start = np.array([p.startswith(WORD_START) for p, _ in table])
  else:
    word_start = None
  return _Vocab(cls_id=ids["[CLS]"], sep_id=ids["[SEP]"], mask_id=ids["[MASK]"],
                pad_id=ids["[PAD]"], word_start=word_start,
                replacement_ids=tuple(i for i in range(tokenizer.vocab_size) if i not in special))


# ------------------------------------------------------------------------------ instances


@dataclasses.dataclass
class _Instance:
  """One [CLS] A [SEP] B [SEP] pair before padding; the fields after `labels` are for tests
  (`doc`, `b_doc` index the caller's `documents`)."""
  tokens: list[int]  # masked
  original: list[int]  # unmasked
  num_a: int
  is_random_next: bool
  positions: list[int]
  labels: list[int]
  doc: int
  b_doc: int
  target_length: int
  chunk_sentences: int  # sentences in the chunk A was cut from (1 forces a random B)
  dupe: int


def _check_documents(documents) -> None:
  if isinstance(documents, (str, bytes)) or not isinstance(documents, Sequence):
    raise DataError(f"documents must be a list of documents (lists of sentence strings), got "
                    f"{type(documents).__name__}; read a file with read_pretraining_documents")
  for d, document in enumerate(documents):
    if isinstance(document, (str, bytes)) or not isinstance(document, Sequence):
      raise DataError(f"documents[{d}] is a {type(document).__name__}, not a list of sentence "
                      "strings; pass each document as a list of its sentences")
    for s, sentence in enumerate(document):
      if not isinstance(sentence, str):
        raise DataError(f"documents[{d}][{s}] is a {type(sentence).__name__}, not a str")


def _check_params(max_seq_length, short_seq_prob, masked_lm_prob, max_predictions_per_seq,
                  dupe_factor) -> None:
  if max_seq_length < 5:
    raise ValueError(f"max_seq_length={max_seq_length} leaves no room for [CLS] A [SEP] B [SEP] "
                     "with 2 tokens of text; use at least 5 (BERT uses 128 and 512)")
  for name, p in (("short_seq_prob", short_seq_prob), ("masked_lm_prob", masked_lm_prob)):
    if not 0.0 <= p <= 1.0:
      raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
  for name, n in (("max_predictions_per_seq", max_predictions_per_seq),
                  ("dupe_factor", dupe_factor)):
    if n < 1:
      raise ValueError(f"{name} must be at least 1, got {n}")


def _encode_documents(documents, tokenizer, vocab):
  """-> (kept document indices, per kept document a list of (ids, word starts) sentences)."""
  sentences = [(d, s.strip()) for d, doc in enumerate(documents) for s in doc if s.strip()]
  encoded = tokenizer.encode_batch([s for _, s in sentences]) if sentences else []
  by_doc = {}
  for (d, _), ids in zip(sentences, encoded):
    if ids:
      if vocab.word_start is None:
        starts = [True] * len(ids)
      else:
        starts = [j == 0 or bool(vocab.word_start[t]) for j, t in enumerate(ids)]
      by_doc.setdefault(d, []).append((list(ids), starts))
  kept = sorted(by_doc)
  return kept, [by_doc[d] for d in kept]


def _truncate_seq_pair(len_a, len_b, max_num_tokens, rng) -> tuple[slice, slice]:
  """The original's truncate_seq_pair on lengths: which slices of A and B survive."""
  a, b = [0, len_a], [0, len_b]
  while (a[1] - a[0]) + (b[1] - b[0]) > max_num_tokens:
    longer = a if a[1] - a[0] > b[1] - b[0] else b
    if rng.random() < 0.5:  # front or back, so that neither end is favoured
      longer[0] += 1
    else:
      longer[1] -= 1
  return slice(*a), slice(*b)


def _other_document(num_documents, document_index, rng) -> int:
  for _ in range(_RANDOM_NEXT_TRIES):
    index = rng.randint(0, num_documents - 1)
    if index != document_index:
      return index
  index = rng.randint(0, num_documents - 2)  # the original would use the same document here
  return index + (index >= document_index)


def _mask(tokens, starts, vocab, rng, *, masked_lm_prob, max_predictions_per_seq,
          whole_word_mask):
  """The original's create_masked_lm_predictions on ids -> (tokens, positions, labels)."""
  specials = (vocab.cls_id, vocab.sep_id)
  candidates = []  # groups of positions masked together (one per word under whole-word)
  for i, t in enumerate(tokens):
    if t in specials:
      continue
    if whole_word_mask and candidates and not starts[i] and tokens[i - 1] not in specials:
      candidates[-1].append(i)
    else:
      candidates.append([i])
  if masked_lm_prob == 0.0:
    return list(tokens), [], []
  rng.shuffle(candidates)
  num_to_predict = min(max_predictions_per_seq, max(1, round(len(tokens) * masked_lm_prob)))
  output, masked = list(tokens), []
  for group in candidates:
    if len(masked) >= num_to_predict:
      break
    if len(masked) + len(group) > num_to_predict:
      continue  # a whole word that does not fit is skipped, as the original does
    for i in group:
      if rng.random() < 0.8:
        output[i] = vocab.mask_id
      elif rng.random() < 0.5:
        output[i] = tokens[i]
      else:
        output[i] = vocab.replacement_ids[rng.randint(0, len(vocab.replacement_ids) - 1)]
      masked.append(i)
  masked.sort()
  return output, masked, [tokens[i] for i in masked]


def _instances_from_document(docs, d, target_length, max_num_tokens, rng, vocab, mask_kw):
  """The original's create_instances_from_document, masking included; yields (tokens,
  masked tokens, positions, labels, len(A), random next, B's document, chunk sentences)."""
  document = docs[d]
  chunk, length, i = [], 0, 0
  while i < len(document):
    chunk.append(document[i])
    length += len(document[i][0])
    if i == len(document) - 1 or length >= target_length:
      a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
      a_ids = [t for ids, _ in chunk[:a_end] for t in ids]
      a_starts = [s for _, starts in chunk[:a_end] for s in starts]
      if len(chunk) == 1 or rng.random() < 0.5:
        is_random_next = True
        target_b_length = target_length - len(a_ids)
        b_doc = _other_document(len(docs), d, rng)
        other = docs[b_doc]
        b_ids, b_starts = [], []
        for ids, starts in other[rng.randint(0, len(other) - 1):]:
          b_ids += ids
          b_starts += starts
          if len(b_ids) >= target_b_length:
            break
        i -= len(chunk) - a_end  # the unused sentences go back to be used by the next chunk
      else:
        is_random_next, b_doc = False, d
        b_ids = [t for ids, _ in chunk[a_end:] for t in ids]
        b_starts = [s for _, starts in chunk[a_end:] for s in starts]
      keep_a, keep_b = _truncate_seq_pair(len(a_ids), len(b_ids), max_num_tokens, rng)
      a_ids, a_starts = a_ids[keep_a], a_starts[keep_a]
      b_ids, b_starts = b_ids[keep_b], b_starts[keep_b]
      tokens = [vocab.cls_id, *a_ids, vocab.sep_id, *b_ids, vocab.sep_id]
      starts = [True, *a_starts, True, *b_starts, True]
      starts[1] = starts[len(a_ids) + 2] = True  # a front-truncated segment starts a word
      masked, positions, labels = _mask(tokens, starts, vocab, rng, **mask_kw)
      yield tokens, masked, positions, labels, len(a_ids), is_random_next, b_doc, len(chunk)
      chunk, length = [], 0
    i += 1


def _create_instances(documents, tokenizer, *, max_seq_length, short_seq_prob=0.1,
                      masked_lm_prob=0.15, max_predictions_per_seq=20, dupe_factor=10,
                      whole_word_mask=False, seed=12345) -> list[_Instance]:
  """`create_pretraining_examples` before padding, with document indices (a test hook)."""
  _check_documents(documents)
  _check_params(max_seq_length, short_seq_prob, masked_lm_prob, max_predictions_per_seq,
                dupe_factor)
  vocab = _whole_word_vocab(tokenizer) if whole_word_mask else _bert_vocab(tokenizer)
  kept, docs = _encode_documents(documents, tokenizer, vocab)
  if len(docs) < 2:
    raise DataError(
        f"next-sentence prediction needs at least 2 non-empty documents (a random B comes from "
        f"another document), got {len(docs)} of {len(documents)} after dropping empty ones; "
        "separate documents with a blank line in the input file, or pass more documents")
  rng = random.Random(seed)
  order = list(range(len(docs)))
  rng.shuffle(order)  # the original shuffles its documents before the passes
  docs, kept = [docs[k] for k in order], [kept[k] for k in order]
  max_num_tokens = max_seq_length - 3  # room for [CLS], [SEP], [SEP]
  mask_kw = dict(masked_lm_prob=masked_lm_prob, max_predictions_per_seq=max_predictions_per_seq,
                 whole_word_mask=whole_word_mask)
  instances = []
  for dupe in range(dupe_factor):
    for d in range(len(docs)):
      # Mostly fill the sequence; sometimes (short_seq_prob) aim shorter, as fine-tuning
      # inputs often are. A soft target: a pair may overshoot it up to max_num_tokens.
      target_length = max_num_tokens
      if rng.random() < short_seq_prob:
        target_length = rng.randint(2, max_num_tokens)
      for tokens, masked, positions, labels, num_a, is_random_next, b_doc, chunk_sentences in (
          _instances_from_document(docs, d, target_length, max_num_tokens, rng, vocab, mask_kw)):
        instances.append(_Instance(
            tokens=masked, original=tokens, num_a=num_a, is_random_next=is_random_next,
            positions=positions, labels=labels, doc=kept[d], b_doc=kept[b_doc],
            target_length=target_length, chunk_sentences=chunk_sentences, dupe=dupe))
  rng.shuffle(instances)
  return instances


def _pad(values, length, fill, dtype) -> np.ndarray:
  out = np.full(length, fill, dtype)
  out[:len(values)] = values
  return out


def create_pretraining_examples(documents: Sequence[Sequence[str]], tokenizer: Tokenizer, *,
                                max_seq_length: int, short_seq_prob: float = 0.1,
                                masked_lm_prob: float = 0.15, max_predictions_per_seq: int = 20,
                                dupe_factor: int = 10, whole_word_mask: bool = False,
                                seed: int = 12345) -> list[dict[str, np.ndarray]]:
  """Makes BERT's MLM+NSP examples from documents, as the original create_pretraining_data.py.

  Each document (dupe_factor times, with different draws) is cut into chunks of whole
  sentences of about max_seq_length - 3 tokens (with probability short_seq_prob, of a
  random length in [2, max_seq_length - 3]). A chunk's first sentences form A; B is the
  rest of the chunk (IsNext) or, half the time and always for a one-sentence chunk,
  sentences from a random other document (the unused sentences go back into the current
  document). The longer of A and B is truncated from a random end until the pair fits.
  Then about masked_lm_prob of the tokens (at most max_predictions_per_seq, never [CLS] or
  [SEP]) are chosen: 80% become [MASK], 10% stay, 10% become a random non-special id.

  Args:
    documents: each document a list of sentence strings; sentences are stripped, and empty
      sentences and documents are dropped.
    tokenizer: a tokenizer with "[CLS]", "[SEP]", "[MASK]" and "[PAD]" tokens, e.g.
      `train_sentencepiece(..., pad_piece="[PAD]", unk_piece="[UNK]",
      special_tokens=("[CLS]", "[SEP]", "[MASK]"))`.
    max_seq_length: T, the padded length.
    short_seq_prob: chance per document pass of a shorter target length.
    masked_lm_prob: fraction of tokens to predict; 0.0 makes unmasked examples for
      `mask_tokens`.
    max_predictions_per_seq: P, the most predictions per example.
    dupe_factor: passes over the documents.
    whole_word_mask: mask all pieces of a word together (see `word_starts`).
    seed: seeds the one `random.Random` behind every draw.

  Returns:
    Examples in shuffled order, each a dict of numpy arrays:
      input_ids (T,) int32, padded with the [PAD] id; input_mask (T,) int32, 1 on tokens;
      token_type_ids (T,) int32, 0 for [CLS] A [SEP], 1 for B [SEP], 0 on padding;
      masked_lm_positions, masked_lm_ids (P,) int32, sorted by position, 0-padded;
      masked_lm_weights (P,) float32, 1.0 per prediction; next_sentence_labels (1,) int32,
      0 if B follows A in the document (IsNext), 1 if B is random (the original's labels).

  Raises:
    DataError: fewer than 2 non-empty documents, a tokenizer without a BERT token, or
      documents not given as lists of strings.
  """
  instances = _create_instances(
      documents, tokenizer, max_seq_length=max_seq_length, short_seq_prob=short_seq_prob,
      masked_lm_prob=masked_lm_prob, max_predictions_per_seq=max_predictions_per_seq,
      dupe_factor=dupe_factor, whole_word_mask=whole_word_mask, seed=seed)
  pad_id = _bert_vocab(tokenizer).pad_id
  examples = []
  for x in instances:
    n, t, p = len(x.tokens), max_seq_length, max_predictions_per_seq
    examples.append({
        "input_ids": _pad(x.tokens, t, pad_id, np.int32),
        "input_mask": _pad([1] * n, t, 0, np.int32),
        "token_type_ids": _pad([0] * (x.num_a + 2) + [1] * (n - x.num_a - 2), t, 0, np.int32),
        "masked_lm_positions": _pad(x.positions, p, 0, np.int32),
        "masked_lm_ids": _pad(x.labels, p, 0, np.int32),
        "masked_lm_weights": _pad([1.0] * len(x.positions), p, 0.0, np.float32),
        "next_sentence_labels": np.array([int(x.is_random_next)], np.int32),
    })
  return examples


def mask_tokens(input_ids: Sequence[int] | np.ndarray, tokenizer: Tokenizer, rng: random.Random,
                *, masked_lm_prob: float = 0.15, max_predictions_per_seq: int = 20,
                whole_word_mask: bool = False) -> dict[str, np.ndarray]:
  """Masks an unmasked example (dynamic masking): the original's masking step, on the fly.

  Make the unmasked examples once with `create_pretraining_examples(...,
  masked_lm_prob=0.0)`, then call this per example and epoch with an rng seeded by
  (seed, epoch), and replace the example's four fields with the result.

  Args:
    input_ids: (T,) ids of [CLS] A [SEP] B [SEP] followed by [PAD]s, with no [MASK].
    tokenizer: the tokenizer that made them.
    rng: the `random.Random` to draw from (it advances).
    masked_lm_prob, max_predictions_per_seq: as in `create_pretraining_examples`.
    whole_word_mask: mask whole words, by `word_starts` (from ids alone, so a sentence
      start inside A or B joins the previous word; see there).

  Returns:
    input_ids (T,) int32 with the masks applied; masked_lm_positions, masked_lm_ids (P,)
    int32; masked_lm_weights (P,) float32.

  Raises:
    DataError: input_ids already hold [MASK] (masking twice would predict [MASK]).
  """
  if not 0.0 <= masked_lm_prob <= 1.0 or max_predictions_per_seq < 1:
    raise ValueError(f"need 0 <= masked_lm_prob <= 1 and max_predictions_per_seq >= 1, got "
                     f"{masked_lm_prob} and {max_predictions_per_seq}")
  vocab = _bert_vocab(tokenizer)
  ids = np.asarray(input_ids)
  n = int(np.count_nonzero(ids != vocab.pad_id))
  if ids.ndim != 1 or (ids[n:] != vocab.pad_id).any():
    raise ValueError(f"input_ids must be one example's (T,) ids with the [PAD]s at the end, "
                     f"got shape {ids.shape}: {ids.tolist()}")
  tokens = ids[:n].tolist()
  if vocab.mask_id in tokens:
    raise DataError(f"input_ids already hold [MASK] at position {tokens.index(vocab.mask_id)}; "
                    "mask_tokens masks unmasked examples: make them with masked_lm_prob=0.0")
  starts = word_starts(tokens, tokenizer).tolist() if whole_word_mask else [True] * n
  masked, positions, labels = _mask(tokens, starts, vocab, rng, masked_lm_prob=masked_lm_prob,
                                    max_predictions_per_seq=max_predictions_per_seq,
                                    whole_word_mask=whole_word_mask)
  p = max_predictions_per_seq
  return {
      "input_ids": _pad(masked, len(ids), vocab.pad_id, np.int32),
      "masked_lm_positions": _pad(positions, p, 0, np.int32),
      "masked_lm_ids": _pad(labels, p, 0, np.int32),
      "masked_lm_weights": _pad([1.0] * len(positions), p, 0.0, np.float32),
  }


# ------------------------------------------------------------------------------ tfds storage


@dataclasses.dataclass(eq=False)
class BertPretrainingConfig(tfds.core.BuilderConfig):
  """Feature shapes; the name is the fingerprint of documents, tokenizer and parameters.

  Attributes:
    max_seq_length: T, the length of "input_ids", "input_mask" and "token_type_ids".
    max_predictions_per_seq: P, the length of the "masked_lm_*" features.
  """
  max_seq_length: int = 128
  max_predictions_per_seq: int = 20


class BertPretrainingExamples(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """`create_pretraining_examples` output as a tfds dataset with one "train" split, in order.

  Built by `prepare_pretraining_dataset`, which passes the documents, tokenizer and
  parameters; once prepared, opening it needs only `data_dir` and the config.

  Args:
    documents: the documents, as for `create_pretraining_examples`; needed only to prepare.
    tokenizer: the tokenizer, as for `create_pretraining_examples`; needed only to prepare.
    create_kwargs: the other keyword arguments of `create_pretraining_examples`.
    **kwargs: tfds builder arguments: config (a BertPretrainingConfig), data_dir,
      file_format, ...

  Raises:
    DataError: (on preparing) a builder made without documents whose data is not prepared.
  """

  # 1.1.0: the feature "segment_ids" renamed "token_type_ids"; data prepared at 1.0.0 is not
  # read, but prepared again.
  VERSION = tfds.core.Version("1.1.0")

  def __init__(self, *, documents=None, tokenizer=None, create_kwargs=None, **kwargs):
    self._documents, self._tokenizer = documents, tokenizer
    self._create_kwargs = dict(create_kwargs or {})
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None  # as text.LocalText: no checksums next to this module (tensorflow/datasets#11212)

  def _info(self) -> tfds.core.DatasetInfo:
    t, p = self.builder_config.max_seq_length, self.builder_config.max_predictions_per_seq
    ints = lambda n: tfds.features.Tensor(shape=(n,), dtype=np.int32)
    return tfds.core.DatasetInfo(
        builder=self, description="BERT MLM+NSP examples (create_pretraining_examples)",
        features=tfds.features.FeaturesDict({
            "input_ids": ints(t), "input_mask": ints(t), "token_type_ids": ints(t),
            "masked_lm_positions": ints(p), "masked_lm_ids": ints(p),
            "masked_lm_weights": tfds.features.Tensor(shape=(p,), dtype=np.float32),
            "next_sentence_labels": ints(1)}),
        disable_shuffling=True)  # the examples are already shuffled by the seed

  def _split_generators(self, dl_manager):
    if self._documents is None:
      raise DataError(f"{self.builder_config.name} is not prepared under {self.data_dir}; "
                      "make it with prepare_pretraining_dataset(documents, tokenizer, ...)")
    examples = create_pretraining_examples(self._documents, self._tokenizer, **self._create_kwargs)
    # (self.data_dir is tfds's temporary "incomplete.*" folder while preparing.)
    log.info("preparing %d BERT pretraining examples into %s", len(examples), os.path.join(
        self.data_dir_root, self.name, self.builder_config.name, str(self.version)))
    return {"train": self._generate_examples(examples)}

  # Not tfds's "Downloading and preparing dataset ...": nothing is downloaded.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _generate_examples(self, examples):
    yield from enumerate(examples)


def pretraining_fingerprint(documents, tokenizer: Tokenizer, **create_kwargs) -> str:
  """A hex digest of the documents' text, the tokenizer and all creation parameters.

  Args:
    documents: the documents, each a sequence of sentences, as for `create_pretraining_examples`.
    tokenizer: its `fingerprint` is hashed.
    **create_kwargs: keyword arguments of `create_pretraining_examples`; defaults are filled
      in, so leaving out a default and passing it give the same digest.

  Returns:
    A 64-character SHA-256 hex digest.
  """
  params = inspect.signature(create_pretraining_examples).bind(
      documents, tokenizer, **create_kwargs)
  params.apply_defaults()
  settings = {k: v for k, v in params.arguments.items() if k not in ("documents", "tokenizer")}
  digest = hashlib.sha256(json.dumps([tokenizer.fingerprint, settings], sort_keys=True).encode())
  for document in documents:
    digest.update(json.dumps(list(document), ensure_ascii=False).encode() + b"\n")
  return digest.hexdigest()


def prepare_pretraining_dataset(documents: Sequence[Sequence[str]], tokenizer: Tokenizer, *,
                                data_dir: str | os.PathLike, **create_kwargs: Any):
  """Creates the examples once and stores them as an ArrayRecord tfds dataset.

  The dataset's config name is a fingerprint of the documents, the tokenizer and the
  parameters, so the same call reuses what an earlier one prepared and any change
  prepares anew.

  Args:
    documents, tokenizer: as in `create_pretraining_examples`.
    data_dir: tfds data directory.
    **create_kwargs: the keyword arguments of `create_pretraining_examples`
      (max_seq_length is required).

  Returns:
    A random-access data source of the "train" split: `len()`, `[i]` give the example dicts
    of `create_pretraining_examples`, in the same order.
  """
  _check_documents(documents)
  try:
    digest = pretraining_fingerprint(documents, tokenizer, **create_kwargs)
  except TypeError as e:
    raise TypeError(f"prepare_pretraining_dataset: {e}; it takes the keyword arguments of "
                    "create_pretraining_examples") from None
  config = BertPretrainingConfig(
      name=f"bert_{digest[:16]}", max_seq_length=create_kwargs["max_seq_length"],
      max_predictions_per_seq=create_kwargs.get("max_predictions_per_seq", 20))
  builder = prepare_once(lambda: BertPretrainingExamples(
      config=config, data_dir=os.fspath(data_dir), file_format="array_record",
      documents=documents, tokenizer=tokenizer, create_kwargs=create_kwargs))
  return builder.as_data_source(split="train")
