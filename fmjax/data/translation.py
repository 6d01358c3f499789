"""Parallel text for translation: line-aligned files or a tfds catalog dataset -> batches.

Reading order: `read_parallel` (two line-aligned files, plain or .gz) or `read_tfds`
(e.g. wmt14_translate/de-en) -> `train_tokenizers` (one shared SentencePiece vocabulary or
one per side) -> `encode_pairs` (ids, target + EOS) -> `PairBatches` (training: length
buckets, resumable) and `padded_pairs` (evaluation: every pair once, fixed shapes), both Grain
pipelines read as `batches.Batches`.

Decoder inputs are the target shifted right behind EOS, the start token (as fairseq does):
target_in = [EOS, y1, ..., yn], target_out = [y1, ..., yn, EOS].
"""

import functools
import gzip
import os
import sys
from collections.abc import Sequence

import numpy as np

from fmjax.data import batches
from fmjax.data.text import DataError
from fmjax.data.tokenizers import Tokenizer, train_sentencepiece

Pair = tuple[str, str]


def read_lines(path: str) -> list[str]:
  """The lines of a UTF-8 text file (gzip when it ends in .gz), without line ends.

  Args:
    path: the file.

  Returns:
    Its lines, "\\n" and a trailing "\\r" removed (a final newline adds no empty line).

  Raises:
    DataError: a missing, empty or non-UTF-8 file (names the line).
  """
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such file (relative paths are taken from {os.getcwd()})")
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    raw = f.read()
  lines = raw.split(b"\n")
  if lines and lines[-1] == b"":
    lines.pop()
  out = []
  for i, line in enumerate(lines):
    try:
      out.append(line.decode("utf-8").rstrip("\r"))
    except UnicodeDecodeError as e:
      raise DataError(f"{path}:{i + 1}: not UTF-8 ({e.reason} at byte {e.start}); convert "
                      "the file to UTF-8 (e.g. iconv -t utf-8)") from None
  if not out:
    raise DataError(f"{path} is empty; give a file with one sentence per line")
  return out


def read_parallel(source_path: str, target_path: str) -> list[Pair]:
  """Line i of source_path translates to line i of target_path; both must have as many.

  Args:
    source_path: the source-language file (see `read_lines`).
    target_path: the target-language file, line-aligned with it.

  Returns:
    [(source sentence, target sentence), ...] in line order.

  Raises:
    DataError: a bad file, or files with different line counts.
  """
  sources, targets = read_lines(source_path), read_lines(target_path)
  if len(sources) != len(targets):
    raise DataError(f"{source_path} has {len(sources)} lines but {target_path} has "
                    f"{len(targets)}: parallel files must be line-aligned (one sentence and "
                    "its translation per line)")
  return list(zip(sources, targets))


def read_tfds(name: str, split: str, source_lang: str, target_lang: str,
              data_dir: str | None = None) -> list[Pair]:
  """A tfds translation dataset (e.g. "wmt14_translate/de-en", features "de" and "en").

  Needs the prepared dataset (it downloads and prepares on first use online).

  Args:
    name: the tfds name, with config, e.g. "wmt14_translate/de-en".
    split: a tfds split string, e.g. "train", "validation[:500]".
    source_lang: the feature holding the source text, e.g. "de".
    target_lang: the feature holding the target text, e.g. "en".
    data_dir: the tfds data directory; None or "": tfds' default.

  Returns:
    [(source sentence, target sentence), ...] in the split's order.

  Raises:
    KeyError: a record without one of the two features (the message lists its features).
  """
  import tensorflow_datasets as tfds  # imported only when asked for
  source = tfds.data_source(name, split=split, data_dir=data_dir or None)
  pairs = []
  for i in range(len(source)):
    record = source[i]
    missing = [k for k in (source_lang, target_lang) if k not in record]
    if missing:
      raise KeyError(f"tfds:{name}/{split}[{i}] has no feature {missing[0]!r} (features: "
                     f"{sorted(record)}); pass source_lang and target_lang naming two of them")
    pairs.append((_to_str(record[source_lang]), _to_str(record[target_lang])))
  return pairs


def _to_str(value) -> str:
  return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def train_tokenizers(pairs: Sequence[Pair], vocab_size: int, *, shared: bool = True,
                     **options) -> tuple[Tokenizer, Tokenizer]:
  """(source tokenizer, target tokenizer), SentencePiece learned on the training pairs.

  Args:
    pairs: the training (source, target) sentence pairs.
    vocab_size: V of each vocabulary.
    shared: one vocabulary learned on both languages (the same object returned twice), or
      one per side.
    **options: passed to `fmjax.data.tokenizers.train_sentencepiece`.

  Returns:
    (source tokenizer, target tokenizer).
  """
  if shared:
    tok = train_sentencepiece([t for pair in pairs for t in pair], vocab_size, **options)
    return tok, tok
  return (train_sentencepiece([s for s, _ in pairs], vocab_size, **options),
          train_sentencepiece([t for _, t in pairs], vocab_size, **options))


def encode_pairs(pairs: Sequence[Pair], source_tok: Tokenizer, target_tok: Tokenizer,
                 max_length: int) -> tuple[list[np.ndarray], list[np.ndarray], int]:
  """Encodes each pair: source ids, and target ids followed by the target tokenizer's EOS.

  Args:
    pairs: (source, target) sentence pairs.
    source_tok: encodes the sources.
    target_tok: encodes the targets; its `eos_id` ends each target.
    max_length: ids kept per side at most (a cut target may lose its EOS).

  Returns:
    (sources, targets, cut): lists of (<= max_length,) int32 arrays, one per pair, and the
    number of pairs that had a side cut.
  """
  eos = target_tok.eos_id
  sources = source_tok.encode_batch([s for s, _ in pairs])
  targets = target_tok.encode_batch([t for _, t in pairs])
  cut = sum(len(s) > max_length or len(t) + 1 > max_length for s, t in zip(sources, targets))
  sources = [np.asarray(s[:max_length], np.int32) for s in sources]
  targets = [np.asarray((t + [eos])[:max_length], np.int32) for t in targets]
  return sources, targets, cut


def make_batch(sources, targets, length: int, *, pad_id: int, start_id: int) -> batches.Batch:
  """Pads pairs to `length`, with the decoder input shifted right behind `start_id`.

  Args:
    sources: B int arrays of source ids, each at most `length` long.
    targets: B int arrays of target ids (EOS last), each at most `length` long.
    length: T, the padded length of both sides.
    pad_id: the id of padding.
    start_id: the first decoder input of every row (EOS, as fairseq does).

  Returns:
    {"source", "target_in", "target_out"}: (B, T) int32; "source_mask": (B, T) bool, True on
    real source tokens; "weight": (B, T) float32, 1.0 on real target tokens.
  """
  b = len(sources)
  out = {"source": np.full((b, length), pad_id, np.int32),
         "target_in": np.full((b, length), pad_id, np.int32),
         "target_out": np.full((b, length), pad_id, np.int32),
         "source_mask": np.zeros((b, length), bool), "weight": np.zeros((b, length), np.float32)}
  for i, (s, t) in enumerate(zip(sources, targets)):
    out["source"][i, :len(s)] = s
    out["source_mask"][i, :len(s)] = True
    out["target_out"][i, :len(t)] = t
    out["target_in"][i, 0] = start_id
    out["target_in"][i, 1:len(t)] = t[:-1]
    out["weight"][i, :len(t)] = 1.0
  return out


class PairBatches(batches.Batches):
  """Endless training batches of `batch_size` pairs of similar length, epoch by epoch.

  Epoch e shuffles the pairs (seed, e), sorts each run of `pool` batches' worth by length,
  cuts it into batches and shuffles the batches: little padding, and every batch is padded
  to a multiple of `length_multiple`, so only a few shapes are ever compiled. A batch is a
  pure function of (seed, step): the state is the step, as for the other iterators.

  The steps are a Grain pipeline (range -> global batch plan -> this host's rows, padded), read
  and checkpointed as `batches.Batches`; the plan itself is numpy, because grain 0.2.18 has no
  length bucketing (its packers join examples into one row instead), and every host pads to
  the longest pair of the whole global batch, which a per-host `batch` could not see.

  Each batch is `make_batch`'s dict, this host's b rows, padded to a multiple of
  `length_multiple`.

  Args:
    sources: the encoded source sentences (int arrays), e.g. from `encode_pairs`.
    targets: the encoded targets, EOS last, aligned with `sources`.
    batch_size: global batch size B; an epoch is len(sources) // B batches.
    seed: the data seed.
    pad_id: the id of padding.
    start_id: the first decoder input of every row.
    length_multiple: each batch's length is rounded up to a multiple of this.
    pool: how many batches' worth of pairs are sorted by length together.
    process_index, process_count: this host's place (jax.process_index/count()).
    prefetch: as in `batches.Batches`.

  Raises:
    DataError: fewer pairs than one batch.
  """

  def __init__(self, sources, targets, *, batch_size: int, seed: int, pad_id: int,
               start_id: int, length_multiple: int = 16, pool: int = 50,
               process_index: int = 0, process_count: int = 1,
               prefetch: int = batches.PREFETCH):
    import grain
    if len(sources) < batch_size:
      raise DataError(f"{len(sources)} training pairs are fewer than one batch of "
                      f"{batch_size}; pass a smaller batch_size", function="PairBatches",
                      argument="batch_size")
    self.sources, self.targets = sources, targets
    self.batch_size, self.seed, self.pool = batch_size, seed, pool
    self.pad_id, self.start_id, self.multiple = pad_id, start_id, length_multiple
    self._rows = batches._rows(batch_size, process_index, process_count)  # pylint: disable=protected-access
    self.per_epoch = len(sources) // batch_size
    self.longest = max(max(len(s), len(t)) for s, t in zip(sources, targets))
    # Two epochs cached: prefetching threads may work on both sides of an epoch boundary.
    self._epoch = functools.lru_cache(maxsize=2)(self._plan)
    super().__init__(grain.MapDataset.range(sys.maxsize).map(self._batch), prefetch=prefetch)

  def _plan(self, epoch: int) -> np.ndarray:
    """(per_epoch, batch_size) pair indices of every batch of `epoch`."""
    rng = np.random.default_rng([self.seed, epoch])
    order = rng.permutation(len(self.sources))[:self.per_epoch * self.batch_size]
    lengths = np.asarray([max(len(self.sources[i]), len(self.targets[i])) for i in order])
    chunk = self.pool * self.batch_size
    for start in range(0, len(order), chunk):
      part = slice(start, start + chunk)
      order[part] = order[part][np.argsort(lengths[part], kind="stable")]
    plan = order.reshape(self.per_epoch, self.batch_size)
    return plan[rng.permutation(self.per_epoch)]

  def _batch(self, step: int) -> batches.Batch:
    epoch, k = divmod(step, self.per_epoch)
    rows = self._epoch(epoch)[k]
    longest = max(max(len(self.sources[i]), len(self.targets[i])) for i in rows)
    length = -(-longest // self.multiple) * self.multiple
    rows = rows[self._rows]
    return make_batch([self.sources[i] for i in rows], [self.targets[i] for i in rows], length,
                      pad_id=self.pad_id, start_id=self.start_id)


def padded_pairs(sources, targets, batch_size: int, length: int, *, pad_id: int, start_id: int,
                 process_index: int = 0, process_count: int = 1) -> batches.Batches:
  """Every pair once, in order, in batches of (batch_size, length), the last filled up.

  The last batch is filled with empty rows (no source, weight 0), so every batch has one shape.

  Args:
    sources: the encoded source sentences, each at most `length` long.
    targets: the encoded targets, aligned with `sources`.
    batch_size: global batch size B.
    length: T, the padded length of every batch.
    pad_id: the id of padding.
    start_id: the first decoder input of every row.
    process_index, process_count: this host's place (jax.process_index/count()).

  Returns:
    Batches whose element k is (`make_batch` dict of this host's (b, T) arrays, the number
    of real rows in global batch k, an int).
  """
  import grain
  n, empty = len(sources), np.zeros((0,), np.int32)

  def batch(k, index):  # k: the batch number; index: (b,) this host's row numbers
    s = [sources[i] if i < n else empty for i in index]
    t = [targets[i] if i < n else empty for i in index]
    return (make_batch(s, t, length, pad_id=pad_id, start_id=start_id),
            min(batch_size, n - k * batch_size))

  index = grain.MapDataset.range(-(-n // batch_size) * batch_size)
  return batches.Batches(batches.host_batches(
      index, batch_size, process_index=process_index,
      process_count=process_count).map_with_index(batch))
