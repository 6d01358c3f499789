"""Tokenizers: characters, UTF-8 bytes and SentencePiece behind one small interface.

Every tokenizer maps `str -> list[int]` and back, reserves an end-of-document id (`eos_id`,
appended after each document when packing a corpus) and a padding id (`pad_id`), and saves
itself into a directory with a `fmjax_tokenizer.json` that names its kind, so that
`load_tokenizer(directory)` restores whichever kind a run used.

Id layouts (fixed, so saved token caches stay valid):
  CharTokenizer:          0..n-1 the sorted distinct characters, n = EOS, n+1 = PAD
                          (the characters keep nanoGPT shakespeare_char's ids).
  ByteTokenizer:          0..255 the bytes of the UTF-8 encoding, 256 = EOS, 257 = PAD.
  SentencePieceTokenizer: 0 = PAD, 1 = EOS, 2 = UNK, then `special_tokens`, then
                          `user_defined_symbols` (and "\\n"), then the learned pieces.
"""

from __future__ import annotations

import abc
import hashlib
import importlib
import io
import json
import os
import pathlib
import re
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import sentencepiece as spm

METADATA_FILE = "fmjax_tokenizer.json"


class Tokenizer(abc.ABC):
  """The interface the data pipeline and the programs use; see the module docstring."""

  kind: ClassVar[str]
  vocab_size: int
  eos_id: int
  pad_id: int

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Returns the ids of `text` (no EOS is added)."""

  @abc.abstractmethod
  def decode(self, ids: Iterable[int]) -> str:
    """Returns the text of `ids`; the EOS and PAD ids decode to nothing."""

  @abc.abstractmethod
  def token_to_id(self, token: str) -> int:
    """Returns the id of a single token (e.g. "<eos>", "[MASK]"); KeyError if absent."""

  @abc.abstractmethod
  def _metadata(self) -> dict[str, Any]:
    """JSON-able description written to `fmjax_tokenizer.json` (besides "kind")."""

  @classmethod
  @abc.abstractmethod
  def _restore(cls, directory: pathlib.Path, metadata: dict[str, Any]) -> Tokenizer:
    """Inverse of `save`."""

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Encodes several texts; kinds with a faster batched path override this."""
    return [self.encode(t) for t in texts]

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Returns `encode(text)` and, per token, the (start, end) character span of `text` it
    came from, without leading whitespace (extractive QA maps answers through these).

    This default serves tokenizers with one token per character; others override it.
    """
    ids = self.encode(text)
    if len(ids) != len(text):
      raise NotImplementedError(f"{type(self).__name__} does not provide character offsets")
    return ids, [(i, i + 1) for i in range(len(text))]

  @property
  def fingerprint(self) -> str:
    """A hex digest that changes whenever any text would get different ids (cache key)."""
    payload = json.dumps({"kind": self.kind, **self._metadata()}, sort_keys=True)
    return hashlib.sha256(payload.encode() + self._fingerprint_extra()).hexdigest()

  def _fingerprint_extra(self) -> bytes:
    return b""

  def save(self, directory: str | os.PathLike) -> None:
    """Writes the tokenizer into `directory` (created if needed); see `load_tokenizer`."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"kind": self.kind, **self._metadata()}
    # Written last (subclasses write their files first) and renamed into place: a process
    # killed while saving leaves no METADATA_FILE, so the rerun makes the tokenizer again.
    tmp = directory / f"{METADATA_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(metadata, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, directory / METADATA_FILE)


class CharTokenizer(Tokenizer):
  """One id per character, the vocabulary being the characters of a training text.

  Encoding a character outside the vocabulary raises a ValueError naming it (there is
  deliberately no UNK id: a silent UNK hides a corpus/tokenizer mismatch).
  """

  kind = "char"

  def __init__(self, chars: Sequence[str]):
    """Args: chars: the distinct characters, in id order."""
    self.chars = "".join(chars)
    if len(set(self.chars)) != len(self.chars):
      raise ValueError(f"CharTokenizer characters must be distinct, got {self.chars!r}")
    self._ids = {c: i for i, c in enumerate(self.chars)}
    self.eos_id = len(self.chars)
    self.pad_id = len(self.chars) + 1
    self.vocab_size = len(self.chars) + 2

  @classmethod
  def from_text(cls, text: str | Iterable[str]) -> CharTokenizer:
    """Builds the vocabulary from the sorted distinct characters of `text` (or texts)."""
    chars = set(text) if isinstance(text, str) else set().union(*map(set, text))
    return cls(sorted(chars))

  def encode(self, text: str) -> list[int]:
    try:
      return [self._ids[c] for c in text]
    except KeyError as e:
      ch = e.args[0]
      raise ValueError(
          f"character {ch!r} (U+{ord(ch):04X}) at position {text.index(ch)} is not in this "
          f"CharTokenizer's {len(self.chars)}-character vocabulary; build the tokenizer with "
          "CharTokenizer.from_text on text that contains it, or use ByteTokenizer") from None

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
    """Args:
      model_proto: the serialized model, i.e. the bytes of a `.model` file.
      lowercase: lower-case text before encoding (an "uncased" vocabulary, as BERT-uncased).
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
    """Loads an existing SentencePiece `.model` file."""
    return cls(pathlib.Path(path).read_bytes(), lowercase=lowercase)

  def _normalize(self, text: str) -> str:
    return lower_same_length(text) if self.lowercase else text

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(self._normalize(text))

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    # batched calls run multithreaded in C++
    return self._sp.encode([self._normalize(t) for t in texts])

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
    pathlib.Path(directory).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(directory) / self.MODEL_FILE).write_bytes(self.model_proto)
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
    limit = re.search(r"value <= (\d+)", str(e))
    if limit is None:
      raise
    raise ValueError(
        f"vocab_size={vocab_size} is too large for this corpus: SentencePiece can make at most "
        f"{limit.group(1)} pieces from it. Use vocab_size <= {limit.group(1)}, a larger corpus, "
        "or CharTokenizer / ByteTokenizer.") from e
  return SentencePieceTokenizer(model.getvalue(), lowercase=lowercase)


def lower_same_length(text: str) -> str:
  """Lower-cases `text` character by character, keeping any character whose lower case has
  another length (e.g. "İ"), so that character offsets stay valid."""
  lowered = text.lower()
  if len(lowered) == len(text):
    return lowered
  return "".join(c if len(c.lower()) != 1 else c.lower() for c in text)


_KINDS = {cls.kind: cls for cls in (CharTokenizer, ByteTokenizer, SentencePieceTokenizer)}
# Kinds whose class builds on this module elsewhere: (module, class), imported by name only
# when such a tokenizer is restored, so that fmjax.data never imports fmjax.hf.
_KINDS_ELSEWHERE = {"hf": ("fmjax.hf.tokenizer", "HFTokenizer")}


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
  """Restores the tokenizer that `Tokenizer.save(directory)` wrote.

  Args:
    directory: a directory containing `fmjax_tokenizer.json`.

  Returns:
    A `CharTokenizer`, `ByteTokenizer`, `SentencePieceTokenizer` or `fmjax.hf.HFTokenizer`.
  """
  directory = pathlib.Path(directory)
  path = directory / METADATA_FILE
  if not path.is_file():
    raise FileNotFoundError(f"no {METADATA_FILE} in {directory}; save a tokenizer there first")
  metadata = json.loads(path.read_text(encoding="utf-8"))
  kind = metadata.pop("kind", None)
  if kind in _KINDS_ELSEWHERE:
    module, name = _KINDS_ELSEWHERE[kind]
    return getattr(importlib.import_module(module), name)._restore(directory, metadata)
  if kind not in _KINDS:
    raise ValueError(f"{path} names tokenizer kind {kind!r}; known kinds: "
                     f"{sorted({*_KINDS, *_KINDS_ELSEWHERE})}")
  return _KINDS[kind]._restore(directory, metadata)
