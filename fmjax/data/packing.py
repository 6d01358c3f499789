"""Tokenize a corpus once into one flat token stream on disk (nanoGPT's `train.bin`).

Each document is encoded and followed by the tokenizer's EOS id; the concatenation is
written as raw little-endian integers (uint16 when every id fits, else int32) and opened
as a read-only `np.memmap`, so a run reads only the windows it samples. The file sits in
the prepared tfds dataset's directory and its name carries the split and the tokenizer's
fingerprint, so any later run with the same data and tokenizer reuses it.

The packing is done once, here, rather than by Grain's packers on the fly: batches.py cuts
windows out of this stream at random access (global shuffling, exact resume, per-host rows;
its docstring says why Grain's `ConcatThenSplitIterDataset` does not give those).
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterable

import numpy as np

from fmjax.data.text import Documents, load_documents
from fmjax.data.tokenizers import Tokenizer, UnknownCharacter
from fmjax.errors import writing

_CHUNK_DOCUMENTS = 256  # documents encoded per call: lets batched tokenizers use threads


def token_dtype(vocab_size: int) -> np.dtype:
  """uint16 when all ids fit (half the disk and page cache of int32), else int32.

  Args:
    vocab_size: V, the number of token ids.

  Returns:
    np.dtype("<u2") when V <= 2**16, else np.dtype("<i4") (little-endian, as on disk).
  """
  return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<i4")


def pack_documents(documents: Iterable[str], tokenizer: Tokenizer, *,
                   cache_path: str | None = None) -> np.ndarray:
  """Encodes documents into one stream, each followed by EOS.

  Args:
    documents: the texts, in order.
    tokenizer: supplies `encode_batch`, `eos_id` and `vocab_size`.
    cache_path: if given, the stream is read from this file when it exists, and otherwise
      written there (atomically, so concurrent or interrupted runs never see half a file).

  Returns:
    (L,) token ids, `token_dtype(tokenizer.vocab_size)`; a read-only memmap when cached.

  Raises:
    UnknownCharacter: a character the tokenizer lacks, located in the documents' files
      (`Documents.locate`), e.g. "at corpus.txt line 3".
    fmjax.errors.WriteError: the cache could not be written (names it; "disk full").
  """
  dtype = token_dtype(tokenizer.vocab_size)
  if cache_path is not None and os.path.exists(cache_path):
    return _open(cache_path, dtype)

  def chunks():
    batch, start = [], 0
    for doc in documents:
      batch.append(doc)
      if len(batch) == _CHUNK_DOCUMENTS:
        yield start, batch
        start, batch = start + len(batch), []
    if batch:
      yield start, batch

  def encoded():
    for start, batch in chunks():
      try:
        encoded_batch = tokenizer.encode_batch(batch)
      except UnknownCharacter as e:
        raise _located(e, documents, start, batch) from None
      ids = [i for doc_ids in encoded_batch for i in (*doc_ids, tokenizer.eos_id)]
      yield np.asarray(ids, dtype=dtype)

  if cache_path is None:
    return np.concatenate([np.zeros(0, dtype), *encoded()])
  tmp_path = f"{cache_path}.tmp-{uuid.uuid4().hex}"
  try:
    with writing(cache_path, "token cache"), open(tmp_path, "wb") as f:
      for array in encoded():
        f.write(memoryview(array))  # not ndarray.tofile: its short write has no errno
    with writing(cache_path, "token cache"):
      os.replace(tmp_path, cache_path)
  finally:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
  return _open(cache_path, dtype)


def _located(error: UnknownCharacter, documents, start: int, batch) -> UnknownCharacter:
  """`error` (met encoding documents[start:start + len(batch)]) saying where in the corpus."""
  index = start + next((i for i, doc in enumerate(batch) if error.char in doc), 0)
  where = (documents.locate(error.char, index) if isinstance(documents, Documents)
           else f"document {index}")
  return UnknownCharacter.at(error.char, where, error.vocabulary)


def _open(path: str, dtype: np.dtype) -> np.ndarray:
  if os.path.getsize(path) == 0:  # np.memmap refuses empty files
    return np.zeros(0, dtype)
  return np.memmap(path, dtype=dtype, mode="r")


def token_cache_path(documents: Documents, tokenizer: Tokenizer) -> str:
  """Where `load_token_stream` caches the stream of `documents` under `tokenizer`.

  Args:
    documents: an opened split (its `cache_dir` and `name` are read).
    tokenizer: its `fingerprint` and `vocab_size` go into the file name.

  Returns:
    "<cache_dir>/fmjax_tokens.<split>.<fingerprint[:16]>.<dtype>.bin".
  """
  split = re.sub(r"[^A-Za-z0-9_.-]+", "_", documents.name.rsplit(":", 1)[-1])
  dtype = token_dtype(tokenizer.vocab_size).name
  return os.path.join(documents.cache_dir,
                      f"fmjax_tokens.{split}.{tokenizer.fingerprint[:16]}.{dtype}.bin")


def load_token_stream(tokenizer: Tokenizer, *, data_dir: str, split: str = "train",
                      train_path=None, eval_path=None, tfds_name: str | None = None,
                      text_key: str = "text", document_split: str = "file",
                      val_fraction: float = 0.0) -> np.ndarray:
  """`load_documents` (same arguments) then `pack_documents`, cached next to the tfds data.

  Args:
    tokenizer: encodes the documents; its EOS id follows each one.
    data_dir, split, train_path, eval_path, tfds_name, text_key, document_split, val_fraction:
      which corpus split, as for `fmjax.data.text.load_documents`.

  Returns:
    (L,) token ids of the split, each document followed by EOS, as a read-only memmap.
  """
  documents = load_documents(data_dir=data_dir, split=split, train_path=train_path,
                             eval_path=eval_path, tfds_name=tfds_name, text_key=text_key,
                             document_split=document_split, val_fraction=val_fraction)
  return pack_documents(documents, tokenizer, cache_path=token_cache_path(documents, tokenizer))
