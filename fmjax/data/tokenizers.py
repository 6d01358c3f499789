"""Tokenizers: characters, UTF-8 bytes and SentencePiece behind one small interface.

Every tokenizer maps `str -> list[int]` and back, reserves an end-of-document id (`eos_id`,
appended after each document when packing a corpus) and a padding id (`pad_id`), and saves
itself into a directory with a `fmjax_tokenizer.json` that names its kind, so that
`load_tokenizer(directory)` restores whichever kind a run used (and reads a Hugging Face
tokenizer directory, through `fmjax.hf`).

Calling a tokenizer on a batch of texts (or text pairs) gives padded model inputs, as
transformers' `tokenizer(texts, text_pairs, padding=..., truncation=True, max_length=...)`:

  tok(["a good film", "dull"], max_length=128, padding="bucket")
  -> {"input_ids", "attention_mask", "token_type_ids"}, each (B, T) int32 numpy:
     [CLS] a good film [SEP] PAD PAD PAD / [CLS] dull [SEP] PAD ... (T = 8, the next power
     of two >= the longest row's 5 tokens)

with the special tokens of the model family (`Tokenizer.special_tokens`): BERT's
`[CLS] A [SEP]` and `[CLS] A [SEP] B [SEP]` (token types 0 up to the first [SEP], 1 after)
when the vocabulary has [CLS] and [SEP] (WordPiece, fmjax's BERT SentencePiece
vocabularies); none for GPT-2's byte-level BPE, characters and bytes.

Id layouts (fixed, so saved token caches stay valid):
  CharTokenizer:          0..n-1 the sorted distinct characters, n = EOS, n+1 = PAD
                          (the characters keep nanoGPT shakespeare_char's ids).
  ByteTokenizer:          0..255 the bytes of the UTF-8 encoding, 256 = EOS, 257 = PAD.
  SentencePieceTokenizer: 0 = PAD, 1 = EOS, 2 = UNK, then `special_tokens`, then
                          `user_defined_symbols` (and "\\n"), then the learned pieces.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import importlib
import io
import json
import os
import pathlib
import re
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import numpy as np
import sentencepiece as spm

from fmjax.data.bucketing import bucket_length
from fmjax.errors import ArgumentError, writing

METADATA_FILE = "fmjax_tokenizer.json"
PADDING = ("longest", "max_length", "bucket")
TRUNCATION = ("longest_first", "only_first", "only_second")


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  """The ids a model family puts around its texts.

  One text: `prefix A suffix`; a pair: `prefix A middle B suffix`. Token type ids are 0 up to
  and including `middle`, `pair_type` for B and the pair's suffix. BERT: prefix ([CLS],),
  middle ([SEP],), suffix ([SEP],), pair_type 1. GPT-2, characters, bytes: none.
  """
  prefix: tuple[int, ...] = ()
  middle: tuple[int, ...] = ()
  suffix: tuple[int, ...] = ()
  pair_type: int = 1

  def count(self, pair: bool) -> int:
    """How many ids are added to one text (pair=False) or to a pair.

    Args:
      pair: count for a text pair (prefix + middle + suffix) rather than one text.

    Returns:
      The number of special ids added.
    """
    return len(self.prefix) + len(self.suffix) + (len(self.middle) if pair else 0)

  def wrap(self, a: Sequence[int], b: Sequence[int] | None) -> tuple[list[int], list[int]]:
    """(ids, token type ids) of text ids `a` (and `b`) with the special ids added.

    Args:
      a: the first text's ids.
      b: the second text's ids, or None for a single text.

    Returns:
      (ids, types), two lists of equal length: `prefix a suffix` (or `prefix a middle b
      suffix`), and token types 0 for the first part (up to `middle`), `pair_type` after.
    """
    if b is None:
      ids = [*self.prefix, *a, *self.suffix]
      return ids, [0] * len(ids)
    first = [*self.prefix, *a, *self.middle]
    second = [*b, *self.suffix]
    return first + second, [0] * len(first) + [self.pair_type] * len(second)


class UnknownCharacter(ValueError):
  """A character a tokenizer without an unknown-token id (CharTokenizer) cannot encode.

  Attributes:
    char: the character.
    where: where it was met, e.g. "corpus.txt line 3" or "position 5" (of the encoded text).
    vocabulary: how many characters the tokenizer has.

  Args:
    message: the whole message.
    char, where, vocabulary: set the attributes.
  """

  def __init__(self, message: str, *, char: str, where: str, vocabulary: int):
    super().__init__(message)
    self.char, self.where, self.vocabulary = char, where, vocabulary

  @classmethod
  def at(cls, char: str, where: str, vocabulary: int) -> UnknownCharacter:
    """The error for `char` met at `where`, with the message saying what to do.

    Args:
      char: the character.
      where: where it was met (a file and line, or a position).
      vocabulary: how many characters the tokenizer has.

    Returns:
      The UnknownCharacter.
    """
    return cls(f"character {char!r} (U+{ord(char):04X}) at {where} is not in this "
               f"CharTokenizer's {vocabulary}-character vocabulary; build the tokenizer on all "
               "the text (CharTokenizer.from_text), or use ByteTokenizer, which encodes any text",
               char=char, where=where, vocabulary=vocabulary)


class Tokenizer(abc.ABC):
  """The interface the data pipeline and the programs use; see the module docstring."""

  kind: ClassVar[str]
  vocab_size: int
  eos_id: int
  pad_id: int

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Returns the ids of `text` (no EOS is added).

    Args:
      text: the text.

    Returns:
      The token ids, each in [0, vocab_size).
    """

  @abc.abstractmethod
  def decode(self, ids: Iterable[int]) -> str:
    """Returns the text of `ids`; the EOS and PAD ids decode to nothing.

    Args:
      ids: token ids (ints, or a 1-D integer array).

    Returns:
      The decoded text.
    """

  @abc.abstractmethod
  def token_to_id(self, token: str) -> int:
    """Returns the id of a single token (e.g. "<eos>", "[MASK]"); KeyError if absent.

    Args:
      token: the token's text.

    Returns:
      Its id.

    Raises:
      KeyError: the vocabulary has no such token.
    """

  @abc.abstractmethod
  def _metadata(self) -> dict[str, Any]:
    """JSON-able description written to `fmjax_tokenizer.json` (besides "kind")."""

  @classmethod
  @abc.abstractmethod
  def _restore(cls, directory: pathlib.Path, metadata: dict[str, Any]) -> Tokenizer:
    """Inverse of `save`."""

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Encodes several texts; kinds with a faster batched path override this.

    Args:
      texts: the texts.

    Returns:
      One list of ids per text, as `encode` gives.
    """
    return [self.encode(t) for t in texts]

  def missing_characters(self, text: str) -> list[str]:
    """The distinct characters of `text` this tokenizer cannot encode faithfully.

    Those whose encoding fails (a CharTokenizer's unknown characters); kinds with an
    unknown-token id override this to add those that encode to it (SentencePiece).

    Args:
      text: the text, e.g. a prompt.

    Returns:
      The characters, in order of first appearance; empty when all of `text` encodes.
    """
    missing = []
    for ch in dict.fromkeys(text):
      try:
        self.encode(ch)
      except ValueError:
        missing.append(ch)
    return missing

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Returns `encode(text)` and, per token, the character span of `text` it came from.

    The spans are without leading whitespace (extractive QA maps answers through these).
    This default serves tokenizers with one token per character; others override it.

    Args:
      text: the text.

    Returns:
      (ids, offsets): the token ids and, for each, a (start, end) pair of character indices
      into `text` (end exclusive).

    Raises:
      NotImplementedError: a tokenizer without one token per character that does not
        override this.
    """
    ids = self.encode(text)
    if len(ids) != len(text):
      raise NotImplementedError(f"{type(self).__name__} does not provide character offsets")
    return ids, [(i, i + 1) for i in range(len(text))]

  @property
  def special_tokens(self) -> SpecialTokens:
    """The ids `__call__` adds: BERT's `[CLS] A [SEP]` / `[CLS] A [SEP] B [SEP]` when the
    vocabulary has [CLS] and [SEP], else none (GPT-2's byte-level BPE, characters, bytes)."""
    try:
      cls_id, sep_id = self.token_to_id("[CLS]"), self.token_to_id("[SEP]")
    except KeyError:
      return SpecialTokens()
    return SpecialTokens(prefix=(cls_id,), middle=(sep_id,), suffix=(sep_id,))

  def __call__(self, texts: str | Sequence[str], text_pairs: str | Sequence[str] | None = None,
               *, max_length: int | None = None, padding: str | bool = "longest",
               truncation: str | bool = True, add_special_tokens: bool = True) -> dict:
    """Tokenizes a batch of texts (or text pairs) into model inputs, as transformers'
    `tokenizer(texts, text_pairs, padding=..., truncation=True, max_length=...)` does.

    Args:
      texts: B texts; a single string is a batch of one.
      text_pairs: None, or B second texts (a single string with a single `texts`).
      max_length: T's limit, special tokens included; None: no limit (and no truncation).
      padding: "longest" (pad to the longest row), "max_length" (to max_length), "bucket"
        (to the next power of two >= the longest row, at most max_length) or False (no
        padding: lists of ids instead of arrays). True means "longest". Rows are padded on
        the right with `pad_id`.
      truncation: what to cut, from the end, when a row would exceed max_length: True or
        "longest_first" (a pair: the longer text first; when both must be cut, each keeps
        half the room, the longer one the odd token, as Hugging Face tokenizers), "only_first",
        "only_second", or False (a row longer than max_length is an error).
      add_special_tokens: add the family's special tokens (see `special_tokens`).

    Returns:
      {"input_ids", "attention_mask", "token_type_ids"}: (B, T) int32 numpy arrays
      (attention_mask 1 on real tokens, 0 on padding; token types 0 for the first text of a
      pair, 1 for the second), or lists of B lists with padding=False.

    Raises:
      ValueError: texts and text_pairs differ in number, an unknown padding or truncation
        value, padding="max_length" without max_length, max_length smaller than the special
        tokens, or a row too long without truncation.
    """
    texts = _as_batch(texts, "texts")
    pairs = None if text_pairs is None else _as_batch(text_pairs, "text_pairs")
    if pairs is not None and len(pairs) != len(texts):
      raise ValueError(f"text_pairs has {len(pairs)} texts but texts has {len(texts)}: give "
                       "one second text per text")
    padding = _padding_mode(padding)
    truncation = _truncation_mode(truncation)
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                   or max_length < 1):
      raise ValueError(f"max_length={max_length!r}: give a positive int, or None for no limit")
    if padding == "max_length" and max_length is None:
      raise ValueError("padding='max_length' needs max_length; give max_length=T, or use "
                       "padding='longest'")
    if truncation == "only_second" and pairs is None:
      raise ValueError("truncation='only_second' cuts the second text of pairs, but no "
                       "text_pairs were given; use truncation=True")
    specials = self.special_tokens if add_special_tokens else SpecialTokens()
    added = specials.count(pairs is not None)
    if max_length is not None and max_length < added:
      raise ValueError(f"max_length={max_length} is smaller than the {added} special tokens "
                       f"each {'pair' if pairs is not None else 'text'} gets; raise max_length")
    first = self.encode_batch(texts)
    second = self.encode_batch(pairs) if pairs is not None else [None] * len(texts)
    ids, types = [], []
    for i, (a, b) in enumerate(zip(first, second)):
      if max_length is not None and len(a) + len(b or ()) + added > max_length:
        if truncation is None:
          raise ValueError(f"texts[{i}] has {len(a) + len(b or ()) + added} tokens with its "
                           f"special tokens, more than max_length={max_length}; pass "
                           "truncation=True or raise max_length")
        a, b = truncate(a, b, max_length - added, truncation)
      row, row_types = specials.wrap(a, b)
      ids.append(row)
      types.append(row_types)
    if padding is None:
      return {"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids],
              "token_type_ids": types}
    longest = max(map(len, ids), default=0)
    width = (max_length if padding == "max_length" else
             bucket_length(longest, maximum=max_length) if padding == "bucket" else longest)
    out = {"input_ids": np.full((len(ids), width), self.pad_id, np.int32),
           "attention_mask": np.zeros((len(ids), width), np.int32),
           "token_type_ids": np.zeros((len(ids), width), np.int32)}
    for i, (row, row_types) in enumerate(zip(ids, types)):
      out["input_ids"][i, :len(row)] = row
      out["attention_mask"][i, :len(row)] = 1
      out["token_type_ids"][i, :len(row)] = row_types
    return out

  @property
  def fingerprint(self) -> str:
    """A hex digest that changes whenever any text would get different ids (cache key)."""
    payload = json.dumps({"kind": self.kind, **self._metadata()}, sort_keys=True)
    return hashlib.sha256(payload.encode() + self._fingerprint_extra()).hexdigest()

  def _fingerprint_extra(self) -> bytes:
    return b""

  def save(self, directory: str | os.PathLike) -> None:
    """Writes the tokenizer into `directory` (created if needed); see `load_tokenizer`.

    Args:
      directory: the directory; `fmjax_tokenizer.json` is written into it last.
    """
    directory = pathlib.Path(directory)
    metadata = {"kind": self.kind, **self._metadata()}
    # Written last (subclasses write their files first) and renamed into place: a process
    # killed while saving leaves no METADATA_FILE, so the rerun makes the tokenizer again.
    tmp = directory / f"{METADATA_FILE}.tmp-{os.getpid()}"
    with writing(directory / METADATA_FILE, "tokenizer"):
      try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(metadata, indent=1, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, directory / METADATA_FILE)
      finally:
        tmp.unlink(missing_ok=True)


class CharTokenizer(Tokenizer):
  """One id per character, the vocabulary being the characters of a training text.

  Encoding a character outside the vocabulary raises a ValueError naming it (there is
  deliberately no UNK id: a silent UNK hides a corpus/tokenizer mismatch).
  """

  kind = "char"

  def __init__(self, chars: Sequence[str]):
    """Makes the tokenizer of a character set.

    Args:
      chars: the distinct characters, in id order (a string or a sequence of characters).

    Raises:
      ValueError: the characters are not distinct.
    """
    self.chars = "".join(chars)
    if len(set(self.chars)) != len(self.chars):
      raise ValueError(f"CharTokenizer characters must be distinct, got {self.chars!r}")
    self._ids = {c: i for i, c in enumerate(self.chars)}
    self.eos_id = len(self.chars)
    self.pad_id = len(self.chars) + 1
    self.vocab_size = len(self.chars) + 2

  @classmethod
  def from_text(cls, text: str | Iterable[str]) -> CharTokenizer:
    """Builds the vocabulary from the sorted distinct characters of `text` (or texts).

    Args:
      text: a string, or an iterable of strings.

    Returns:
      The CharTokenizer of their sorted distinct characters.
    """
    chars = set(text) if isinstance(text, str) else set().union(*map(set, text))
    return cls(sorted(chars))

  def encode(self, text: str) -> list[int]:
    try:
      return [self._ids[c] for c in text]
    except KeyError as e:
      ch = e.args[0]
      raise UnknownCharacter.at(ch, f"position {text.index(ch)}", len(self.chars)) from None

  def missing_characters(self, text: str) -> list[str]:
    return [ch for ch in dict.fromkeys(text) if ch not in self._ids]

  def decode(self, ids: Iterable[int]) -> str:
    return "".join(self.chars[i] for i in ids if i < self.eos_id)

  def token_to_id(self, token: str) -> int:
    special = {"<eos>": self.eos_id, "<pad>": self.pad_id}
    return special[token] if token in special else self._ids[token]

  def _metadata(self) -> dict[str, Any]:
    return {"chars": self.chars}

  @classmethod
  def _restore(cls, directory, metadata):
    return cls(metadata["chars"])


class ByteTokenizer(Tokenizer):
  """The 256 byte values of the UTF-8 encoding, plus EOS and PAD; encodes any text."""

  kind = "byte"
  eos_id = 256
  pad_id = 257
  vocab_size = 258

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    ids, offsets = [], []
    for i, ch in enumerate(text):
      raw = ch.encode("utf-8")
      ids.extend(raw)
      offsets.extend([(i, i + 1)] * len(raw))  # every byte of a character spans the character
    return ids, offsets

  def decode(self, ids: Iterable[int]) -> str:
    # "replace" because a sampled id sequence need not be valid UTF-8.
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

  def token_to_id(self, token: str) -> int:
    special = {"<eos>": self.eos_id, "<pad>": self.pad_id}
    if token in special:
      return special[token]
    raw = token.encode("utf-8")
    if len(raw) != 1:
      raise KeyError(f"{token!r} is not a single byte")
    return raw[0]

  def _metadata(self) -> dict[str, Any]:
    return {}

  @classmethod
  def _restore(cls, directory, metadata):
    return cls()


class SentencePieceTokenizer(Tokenizer):
  """A trained SentencePiece model (see `train_sentencepiece`), or any existing `.model`."""

  kind = "sentencepiece"
  MODEL_FILE = "tokenizer.model"

  def __init__(self, model_proto: bytes, *, lowercase: bool = False):
    """Wraps a serialized SentencePiece model.

    Args:
      model_proto: the serialized model, i.e. the bytes of a `.model` file.
      lowercase: lower-case text before encoding (an "uncased" vocabulary, as BERT-uncased).

    Raises:
      ValueError: the model reserves no EOS or no PAD id.
    """
    self.model_proto = bytes(model_proto)
    self.lowercase = lowercase
    self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
    self.vocab_size = self._sp.get_piece_size()
    self.eos_id = self._sp.eos_id()
    self.pad_id = self._sp.pad_id()
    if self.eos_id < 0 or self.pad_id < 0:
      raise ValueError(
          f"this SentencePiece model has eos_id={self.eos_id}, pad_id={self.pad_id}; fmjax "
          "needs both reserved (negative means absent): retrain with train_sentencepiece")

  @classmethod
  def from_file(cls, path: str | os.PathLike, *, lowercase: bool = False) -> SentencePieceTokenizer:
    """Loads an existing SentencePiece `.model` file.

    Args:
      path: the `.model` file.
      lowercase: lower-case text before encoding (an uncased vocabulary).

    Returns:
      The SentencePieceTokenizer.
    """
    return cls(pathlib.Path(path).read_bytes(), lowercase=lowercase)

  def _normalize(self, text: str) -> str:
    return lower_same_length(text) if self.lowercase else text

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(self._normalize(text))

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    # batched calls run multithreaded in C++
    return self._sp.encode([self._normalize(t) for t in texts])

  def missing_characters(self, text: str) -> list[str]:
    # SentencePiece encodes an unknown character as its UNK id, silently.
    unk = self._sp.unk_id()
    return [ch for ch in dict.fromkeys(text) if unk in self.encode(ch)]

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    normalized = self._normalize(text)  # same length as text: offsets carry over
    proto = self._sp.encode(normalized, return_type="proto")
    # SentencePiece reports UTF-8 byte offsets; map them to character offsets.
    char_at_byte = [0] * (len(normalized.encode("utf-8")) + 1)
    b = 0
    for i, ch in enumerate(normalized):
      n = len(ch.encode("utf-8"))
      char_at_byte[b:b + n] = [i] * n
      b += n
    char_at_byte[b] = len(normalized)
    ids, offsets = [], []
    for piece in proto.pieces:
      start, end = char_at_byte[piece.begin], char_at_byte[piece.end]
      while start < end and normalized[start].isspace():
        start += 1
      ids.append(piece.id)
      offsets.append((start, end))
    return ids, offsets

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def token_to_id(self, token: str) -> int:
    i = self._sp.piece_to_id(token)
    # piece_to_id answers the UNK id for unknown pieces instead of failing.
    if i == self._sp.unk_id() and token != self._sp.id_to_piece(i):
      raise KeyError(f"{token!r} is not a piece of this SentencePiece model")
    return i

  def _metadata(self) -> dict[str, Any]:
    return {"model_file": self.MODEL_FILE, **({"lowercase": True} if self.lowercase else {})}

  def _fingerprint_extra(self) -> bytes:
    return self.model_proto

  def save(self, directory: str | os.PathLike) -> None:
    path = pathlib.Path(directory) / self.MODEL_FILE
    with writing(path, "tokenizer"):
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(self.model_proto)
    super().save(directory)  # the metadata last: see Tokenizer.save

  @classmethod
  def _restore(cls, directory, metadata):
    return cls.from_file(directory / metadata["model_file"],
                         lowercase=metadata.get("lowercase", False))


def train_sentencepiece(
    corpus: Iterable[str | os.PathLike],
    vocab_size: int,
    *,
    model_type: str = "bpe",
    special_tokens: Sequence[str] = (),
    user_defined_symbols: Sequence[str] = (),
    pad_piece: str = "<pad>",
    eos_piece: str = "</s>",
    unk_piece: str = "<unk>",
    lowercase: bool = False,
    seed: int = 0,
    **trainer_options: Any,
) -> SentencePieceTokenizer:
  """Trains a SentencePiece model in memory, deterministically and offline.

  Text is kept verbatim (identity normalization, whitespace kept, no dummy prefix) so that
  `decode(encode(text)) == text` for text made of characters seen in training; "\\n" is
  always a piece of its own because the trainer sees the corpus one line at a time.

  Args:
    corpus: texts (`str`) and/or files (`pathlib.Path` / `os.PathLike`, read as UTF-8);
      a plain `str` is always text, never a path.
    vocab_size: number of pieces including the reserved ones.
    model_type: "bpe" or "unigram".
    special_tokens: control symbols (e.g. BERT's "[CLS]", "[SEP]", "[MASK]") that get ids
      right after PAD/EOS/UNK but are never produced from text; look ids up with
      `token_to_id`.
    user_defined_symbols: pieces always split out of text as one token.
    pad_piece, eos_piece, unk_piece: names of ids 0, 1, 2 (BERT wants "[PAD]", "[UNK]").
    lowercase: learn an uncased vocabulary; the tokenizer lower-cases what it encodes.
    seed: seeds SentencePiece's sampling (only used by options that sample sentences).
    **trainer_options: passed to `SentencePieceTrainer.train` (e.g. `byte_fallback=True`).

  Returns:
    The trained tokenizer.

  Raises:
    ValueError: `vocab_size` is more than the corpus can provide, or `model_type` unknown.
  """
  if model_type not in ("bpe", "unigram"):
    raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")

  def lines():
    for item in corpus:
      text = item if isinstance(item, str) else pathlib.Path(item).read_text(encoding="utf-8")
      if lowercase:
        text = lower_same_length(text)
      yield from (line for line in text.split("\n") if line)

  spm.set_random_generator_seed(seed)
  model = io.BytesIO()
  options = dict(
      model_type=model_type, vocab_size=vocab_size, character_coverage=1.0,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      pad_piece=pad_piece, eos_piece=eos_piece, unk_piece=unk_piece,
      control_symbols=list(special_tokens),
      user_defined_symbols=[*user_defined_symbols, "\n"],
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      add_dummy_prefix=False, minloglevel=2)
  options.update(trainer_options)
  try:
    spm.SentencePieceTrainer.train(sentence_iterator=lines(), model_writer=model, **options)
  except RuntimeError as e:
    raise _vocab_size_error(e, vocab_size) from None
  return SentencePieceTokenizer(model.getvalue(), lowercase=lowercase)


def _vocab_size_error(error: RuntimeError, vocab_size: int) -> Exception:
  """SentencePiece's failure (a C++ check, its source line included) as one sentence that
  names vocab_size and the bound to respect; `error` itself when it is about something else."""
  message = str(error)
  too_large = re.search(r"value <= (\d+)", message)
  if too_large:
    return ArgumentError(
        f"vocab_size={vocab_size} is too large for this corpus: SentencePiece can make at most "
        f"{too_large.group(1)} pieces from it. Use vocab_size <= {too_large.group(1)}, a larger "
        "corpus, or CharTokenizer / ByteTokenizer.",
        function="train_sentencepiece", argument="vocab_size")
  # "... smaller than required_chars. 30 vs 70." (every character, plus the reserved pieces)
  # and "... larger than the number of meta pieces (5)" (the reserved pieces alone).
  too_small = (re.search(r"required_chars\. \d+ vs (\d+)", message)
               or re.search(r"number of meta pieces \((\d+)\)", message))
  if too_small or "vocab_size" in message:
    need = (f"at least {int(too_small.group(1)) + (0 if 'required' in message else 1)}"
            if too_small else "more")
    return ArgumentError(
        f"vocab_size={vocab_size} is too small for this corpus: SentencePiece needs {need} "
        "pieces (one per distinct character, plus the reserved and special ones). Raise "
        f"vocab_size to {need.replace('at least ', '')} or more, or use CharTokenizer / "
        "ByteTokenizer.", function="train_sentencepiece", argument="vocab_size")
  return error


def truncate(first: Sequence[int], second: Sequence[int] | None, room: int,
             strategy: str = "longest_first") -> tuple[list[int], list[int] | None]:
  """Cuts ids from the ends of `first` (and `second`) so that together they fit `room`.

  As Hugging Face tokenizers (and so transformers) do. "longest_first": only the longer
  text is cut while the shorter fits in half the room; otherwise each keeps half the room
  and the longer text the odd token (on a tie, the second). "only_first" / "only_second":
  only that text is cut; an error when it is too short to make the room. A single text
  (second None) is cut to `room`.

  Args:
    first: the first text's ids.
    second: the second text's ids, or None.
    room: how many ids the two may keep together.
    strategy: "longest_first", "only_first" or "only_second".

  Returns:
    (first, second) cut to fit, as lists (second None when it was None).

  Raises:
    ValueError: with "only_first" / "only_second", that text is too short to make the room.
  """
  first = list(first)
  if second is None:
    return first[:room], None
  second = list(second)
  excess = len(first) + len(second) - room
  if excess <= 0:
    return first, second
  if strategy in ("only_first", "only_second"):
    cut = first if strategy == "only_first" else second
    if len(cut) <= excess:
      raise ValueError(f"truncation={strategy!r}: the {strategy[5:]} text has {len(cut)} "
                       f"tokens, too few to drop the {excess} that exceed max_length; use "
                       "truncation='longest_first' or raise max_length")
    return (first[:-excess], second) if strategy == "only_first" else (first, second[:-excess])
  short, long = sorted((len(first), len(second)))
  keep_long = short if short > room else max(short, room - short)
  if short + keep_long > room:
    short, keep_long = room // 2, room // 2 + room % 2
  if len(first) > len(second):
    return first[:keep_long], second[:short]
  return first[:short], second[:keep_long]


def _as_batch(texts, name: str) -> list[str]:
  if isinstance(texts, str):
    return [texts]
  if not isinstance(texts, Sequence):
    raise ValueError(f"{name} must be a string or a list of strings, got "
                     f"{type(texts).__name__}")
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise ValueError(f"{name}[{i}] is {type(text).__name__} {text!r}, not a string")
  return list(texts)


def _padding_mode(padding) -> str | None:
  if padding is True:
    return "longest"
  if padding is False or padding == "do_not_pad":
    return None
  if padding not in PADDING:
    raise ValueError(f"padding={padding!r}: choose one of {list(PADDING)}, True (longest) or "
                     "False (no padding)")
  return padding


def _truncation_mode(truncation) -> str | None:
  if truncation is True:
    return "longest_first"
  if truncation is False or truncation == "do_not_truncate":
    return None
  if truncation not in TRUNCATION:
    raise ValueError(f"truncation={truncation!r}: choose one of {list(TRUNCATION)}, True "
                     "(longest_first) or False")
  return truncation


def lower_same_length(text: str) -> str:
  """Lower-cases `text` keeping every character's length, so that character offsets stay valid.

  Character by character, keeping any character whose lower case has another length
  (e.g. "İ").

  Args:
    text: the text.

  Returns:
    The lower-cased text, of the same length as `text`.
  """
  lowered = text.lower()
  if len(lowered) == len(text):
    return lowered
  return "".join(c if len(c.lower()) != 1 else c.lower() for c in text)


_KINDS = {cls.kind: cls for cls in (CharTokenizer, ByteTokenizer, SentencePieceTokenizer)}
# Kinds whose class builds on this module elsewhere: (module, class), imported by name only
# when such a tokenizer is restored, so that fmjax.data never imports fmjax.hf.
_KINDS_ELSEWHERE = {"hf": ("fmjax.hf.tokenizer", "HFTokenizer")}
# A directory without METADATA_FILE that holds one of these file sets is a Hugging Face
# tokenizer directory, read by (module, function), imported by name as above.
_HF_FILES = (("tokenizer.json",), ("vocab.txt",), ("vocab.json", "merges.txt"))
_HF_READER = ("fmjax.hf.tokenizer", "tokenizer_from_pretrained")


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
  """Reads the tokenizer in `directory`: one that `Tokenizer.save` wrote, or a Hugging Face one.

  Args:
    directory: a directory containing `fmjax_tokenizer.json` (any kind), else a Hugging Face
      tokenizer or model directory (tokenizer.json, vocab.txt, or vocab.json + merges.txt),
      read by `fmjax.hf.tokenizer_from_pretrained`.

  Returns:
    A `CharTokenizer`, `ByteTokenizer`, `SentencePieceTokenizer` or `fmjax.hf.HFTokenizer`.

  Raises:
    FileNotFoundError: neither `fmjax_tokenizer.json` nor Hugging Face tokenizer files.
    ValueError: an unknown kind in `fmjax_tokenizer.json`.
  """
  directory = pathlib.Path(directory)
  path = directory / METADATA_FILE
  if not path.is_file():
    if any(all((directory / f).is_file() for f in files) for files in _HF_FILES):
      module, name = _HF_READER
      return getattr(importlib.import_module(module), name)(directory)
    raise FileNotFoundError(
        f"no {METADATA_FILE} in {directory}, nor a Hugging Face tokenizer (tokenizer.json, "
        "vocab.txt, or vocab.json + merges.txt); save a tokenizer there first")
  metadata = json.loads(path.read_text(encoding="utf-8"))
  kind = metadata.pop("kind", None)
  if kind in _KINDS_ELSEWHERE:
    module, name = _KINDS_ELSEWHERE[kind]
    return getattr(importlib.import_module(module), name)._restore(directory, metadata)
  if kind not in _KINDS:
    raise ValueError(f"{path} names tokenizer kind {kind!r}; known kinds: "
                     f"{sorted({*_KINDS, *_KINDS_ELSEWHERE})}")
  return _KINDS[kind]._restore(directory, metadata)
