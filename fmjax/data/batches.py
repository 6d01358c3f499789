"""Batches as Grain pipelines: deterministic, resumable, and sharded per host.

Shape key: B global batch, b = B / process_count rows per host, T = seq_len.

Every iterator here wraps a `grain.MapDataset` whose element k is this host's part of global
batch k, read in order by a Grain `DatasetIterator` that prefetches a couple of batches in
background threads. A batch is a pure function of (seed, k), so the resumable state is the number
of batches already produced: `get_state()` is {"step": k} (Grain's own iterator state
{"next_index": k}, under the name fmjax checkpoints store) and `set_state` continues at batch k.
`batch_at(k)` reads element k directly without moving the iterator.

The pipelines, as Grain transformations:
  epochs       `epoch_order(n, seed)`: the row -> index order, a new permutation of range(n)
               each epoch (Grain's shuffle from GRAIN_SHUFFLE_MIN indices up), endless
  examples     epoch_order(n) -> (index, source[index]) -> transform(example, index, epoch)
               -> batch(b) -> [p::P], the examples read through grain.MapDataset.source
  LM windows   sequential: epoch_order(W) -> start w*T -> batch(b) -> [p::P] -> make_batch
               random: range(steps) -> step k's B starts, drawn by numpy's
               default_rng([seed, k]) as nanoGPT's get_batch -> this host's b -> make_batch
  evaluation   source or range, whole global batches (or padded to them) -> batch(b) -> [p::P]

Per-host sharding is `rows.batch(b)[p::P]` (`host_batches`): micro-batch j holds rows
[j*b, (j+1)*b) of the row stream and host p takes j = k*P + p at step k, so host p of P gets
rows [p*b, (p+1)*b) of global batch k, exactly the rows one host alone would have there, and
reads only those.

A row of an LM batch is a window of T+1 consecutive tokens of the packed stream (packing.py):
`inputs` are the first T, `targets` the last T. Documents end with EOS, so a row also carries
`segment_ids` (1, 2, ... per document within the row; the token after an EOS starts a new one)
and `positions` (restarting at 0 with each document) for packed-sequence attention masks and
position embeddings. An EOS input's target is the next document's first token; mask it out
with the segment ids if that prediction should not count.

What stays hand-written, and why (grain 0.2.18):
  - Shuffling small datasets. Grain's shuffle (`ShuffleMapDataset`, one `index_shuffle` call
    per row, grain/_src/python/experimental/index_shuffle) costs a few us per row at 2**16
    rows and more but grows as 1/n below (measured here: 4 us at 2**16 rows, 0.07 ms at 1000,
    1 ms at 60, 9.5 ms at 10), so a 60-example dataset would spend 30 ms shuffling each batch
    of 32. Below GRAIN_SHUFFLE_MIN rows an epoch's order is numpy's default_rng([seed, epoch])
    .permutation(n), computed once per epoch (n ints); from there up, Grain's O(1)-memory
    shuffle.
  - Host sharding. Grain's `ShardByJaxProcess` (through `IndexSampler(shard_options=...)` or
    a source's `set_slice`) gives each host a contiguous block of the records
    (`grain/_src/core/sharding.py: even_split`), shuffled on its own, so a host's rows are not a
    slice of the single-host batch and a different host count trains on different batches.
    The `[p::P]` slice of host micro-batches above keeps them.
  - Packing and windows. The corpus is tokenized once into a cached flat stream and a row is
    any T+1 window of it, read at random (`make_batch` derives segment ids and positions).
    Grain's packers (`ConcatThenSplitIterDataset`, `FirstFitPackIterDataset`) are IterDatasets
    that pack documents as they stream past: rows can only be shuffled within a window, resuming
    replays from the packer's last empty buffer, and hosts must split the documents before
    packing; they also cut non-overlapping rows where a T+1 window gives all T inputs a target.
  - Random LM windows are sampled with replacement, which no Grain sampler does: step k's
    starts come from numpy's default_rng([seed, k]) in a Grain map over steps.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from fmjax.data.text import DataError

if TYPE_CHECKING:
  import grain

Batch = dict[str, np.ndarray]
MODES = ("random", "sequential")
PREFETCH = 2  # batches read ahead, each in its own thread
GRAIN_SHUFFLE_MIN = 2**16  # smaller datasets are shuffled by a numpy permutation per epoch


def _rows(batch_size: int, process_index: int, process_count: int) -> slice:
  """This host's rows [p*b, (p+1)*b) of a global batch of `batch_size`."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
  if batch_size % process_count:
    raise ValueError(f"global batch_size={batch_size} is not divisible by "
                     f"process_count={process_count}; use a multiple of {process_count}")
  b = batch_size // process_count
  return slice(process_index * b, (process_index + 1) * b)


def _check_stream(tokens: np.ndarray, seq_len: int) -> None:
  if tokens.ndim != 1:
    raise ValueError(f"tokens must be a flat (L,) stream, got shape {tokens.shape}")
  if len(tokens) < seq_len + 1:
    raise DataError(
        f"the token stream has {len(tokens)} tokens but seq_len={seq_len} needs at least "
        f"{seq_len + 1} (one window plus its shifted target); use a larger corpus (or a larger "
        "validation fraction) or a smaller seq_len")


def host_batches(rows: grain.MapDataset, batch_size: int, *, process_index: int = 0,
                 process_count: int = 1, batch_fn: Callable | None = None) -> grain.MapDataset:
  """Groups a dataset of rows into this host's parts of consecutive global batches.

  Args:
    rows: a grain.MapDataset; global batch k is rows [k*B, (k+1)*B). A finite one should
      hold whole global batches.
    batch_size: global batch size B.
    process_index, process_count: this host's place (jax.process_index/count()).
    batch_fn: combines b rows (default: Grain's stacking of each leaf on a new axis 0).

  Returns:
    A grain.MapDataset whose element k is rows [k*B + p*b, k*B + (p+1)*b), batched.
  """
  rows_of_host = _rows(batch_size, process_index, process_count)
  b = rows_of_host.stop - rows_of_host.start
  return rows.batch(b, batch_fn=batch_fn)[process_index::process_count]


def epoch_order(n: int, seed: int) -> grain.MapDataset:
  """The order in which training visits n indices: row e*n + i is the i-th index of epoch e's
  permutation of range(n), a new one each epoch, for 2**62 rows (endless in practice).

  From GRAIN_SHUFFLE_MIN indices up the permutation is Grain's shuffle (seeded through
  `seed(seed)`, reseeded per epoch by `repeat`); below, where Grain's shuffle is slow, numpy's
  default_rng([seed, epoch]).permutation(n), computed once per epoch.

  Args:
    n: the number of indices (examples, windows), > 0.
    seed: the data seed, >= 0.

  Returns:
    A grain.MapDataset of int indices in [0, n).
  """
  import grain
  # A count, not the endless repeat(): that one's length, sys.maxsize, overflows a later
  # batch(1), which divides it as a float; 2**62 rows do not.
  epochs = max(1, 2**62 // n)
  if n >= GRAIN_SHUFFLE_MIN:
    return grain.MapDataset.range(n).seed(seed).shuffle().repeat(epochs)
  permutation = functools.lru_cache(maxsize=2)(  # two: prefetch threads may straddle epochs
      lambda epoch: np.random.default_rng([seed, epoch]).permutation(n))
  return grain.MapDataset.range(n).repeat(epochs).map_with_index(
      lambda row, _: int(permutation(row // n)[row % n]))


def make_batch(tokens: np.ndarray, starts: np.ndarray, seq_len: int, eos_id: int) -> Batch:
  """Builds the batch whose rows are the windows `tokens[s : s + seq_len + 1]`.

  Args:
    tokens: (L,) token stream.
    starts: (b,) window starts, each <= L - seq_len - 1.
    seq_len: T.
    eos_id: the id that ends a document.

  Returns:
    {"inputs", "targets", "segment_ids", "positions"}, each int32 (b, T).
  """
  windows = np.asarray(tokens[np.asarray(starts)[:, None] + np.arange(seq_len + 1)], np.int32)
  inputs = windows[:, :-1]
  # A new segment starts after each EOS; the first token of a row always starts one.
  starts_segment = np.zeros_like(inputs, dtype=bool)
  starts_segment[:, 0] = True
  starts_segment[:, 1:] = inputs[:, :-1] == eos_id
  segment_ids = np.cumsum(starts_segment, axis=1, dtype=np.int32)
  t = np.arange(seq_len, dtype=np.int32)
  segment_start = np.maximum.accumulate(np.where(starts_segment, t, 0), axis=1)
  return {"inputs": inputs, "targets": windows[:, 1:], "segment_ids": segment_ids,
          "positions": (t - segment_start).astype(np.int32)}


class Batches:
  """A grain.MapDataset of host batches read as a resumable iterator.

  Args:
    dataset: element k is this host's part of global batch k (endless for training,
      finite for evaluation).
    prefetch: batches read ahead in background threads (0: read on demand, in this thread).

  Attributes:
    dataset: the grain.MapDataset, for composing further or reading any batch directly.
  """

  def __init__(self, dataset: grain.MapDataset, *, prefetch: int = PREFETCH):
    import grain  # on first use: importing grain imports orbax
    self.dataset = dataset
    options = grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)
    self._iterator = iter(dataset.to_iter_dataset(options))

  def batch_at(self, step: int) -> Any:
    """Batch number `step` (0-based), read directly: the iterator does not move.

    Args:
      step: the batch's index k.

    Returns:
      Element k of `dataset`: this host's part of global batch k.
    """
    return self.dataset[step]

  @property
  def step(self) -> int:
    """The number of batches produced so far (prefetched ones not counted)."""
    return int(self._iterator.get_state()["next_index"])

  def get_state(self) -> dict[str, int]:
    """The resumable state, JSON-able.

    Returns:
      {"step": batches produced so far}.
    """
    return {"step": self.step}

  def set_state(self, state: dict[str, Any]) -> None:
    """Restores `get_state()`'s result: the next batch is the one that would have followed.

    Args:
      state: {"step": k, ...}; other keys are ignored.
    """
    self._iterator.set_state({"next_index": int(state["step"])})

  def __iter__(self) -> Iterator:
    return self

  def __next__(self) -> Any:
    return next(self._iterator)


class LMBatchIterator(Batches):
  """Endless LM batches over a token stream.

  mode="random": each global row starts at a position drawn uniformly from
    [0, L - T - 1] by a numpy Generator seeded with (seed, step), as nanoGPT's get_batch.
  mode="sequential": the stream is cut into W = (L - 1) // T non-overlapping windows;
    epoch e visits all of them in the order `epoch_order(W, seed)` gives (a new permutation
    each epoch), and global rows run through epoch after epoch (a batch may straddle two).

  Each batch is `make_batch`'s dict of int32 (b, T) "inputs", "targets", "segment_ids",
  "positions".

  Args:
    tokens: (L,) token stream (e.g. from `load_token_stream`); read, never copied.
    batch_size: global batch size B over all processes.
    seq_len: T.
    seed: the data seed, >= 0.
    eos_id: the tokenizer's EOS id, where documents end.
    mode: "random" or "sequential".
    process_index, process_count: this host's place (jax.process_index/count()).
    prefetch: as in `Batches`.
  """

  def __init__(self, tokens: np.ndarray, *, batch_size: int, seq_len: int, seed: int,
               eos_id: int, mode: str = "random", process_index: int = 0,
               process_count: int = 1, prefetch: int = PREFETCH):
    import grain
    if mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _check_stream(tokens, seq_len)
    rows = _rows(batch_size, process_index, process_count)
    self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
    self.seed, self.eos_id, self.mode = seed, eos_id, mode
    self.num_windows = (len(tokens) - 1) // seq_len  # sequential mode's windows per epoch
    if mode == "random":
      def draw(step):  # all B starts of the step, then this host's b
        rng = np.random.default_rng([seed, step])
        return rng.integers(0, len(tokens) - seq_len, size=batch_size)[rows]
      starts = grain.MapDataset.range(sys.maxsize).map(draw)
    else:
      windows = epoch_order(self.num_windows, seed)
      starts = host_batches(windows.map(lambda w: w * seq_len), batch_size,
                            process_index=process_index, process_count=process_count)
    super().__init__(starts.map(lambda s: make_batch(tokens, s, seq_len, eos_id)),
                     prefetch=prefetch)


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int,
                 max_batches: int | None = None, *, eos_id: int, process_index: int = 0,
                 process_count: int = 1) -> Batches:
  """The evaluation batches: windows in stream order, the same on every call.

  Global batch k holds windows k*B .. k*B+B-1 (window w = tokens[w*T : w*T+T+1]); only
  full batches are made, so the last (L-1)//T mod B windows are left out.

  Args:
    tokens: (L,) token stream of the evaluation split.
    batch_size: global batch size B.
    seq_len: T.
    eos_id: the tokenizer's EOS id.
    max_batches: at most this many batches (None: all full batches).
    process_index, process_count: as in `LMBatchIterator`.

  Returns:
    An iterator of batches as `make_batch` returns them, this host's rows only. Problems
    are raised by this call, not by the first `next`.
  """
  import grain
  _check_stream(tokens, seq_len)
  _rows(batch_size, process_index, process_count)
  num_batches = (len(tokens) - 1) // seq_len // batch_size
  if num_batches == 0:
    raise DataError(f"the evaluation stream ({len(tokens)} tokens) holds "
                    f"{(len(tokens) - 1) // seq_len} windows of seq_len={seq_len}, fewer than "
                    f"one batch of {batch_size}; lower the eval batch size or seq_len, or "
                    "enlarge the validation split")
  if max_batches is not None:
    num_batches = min(num_batches, max_batches)
  starts = grain.MapDataset.range(0, num_batches * batch_size * seq_len, seq_len)
  starts = host_batches(starts, batch_size, process_index=process_index,
                        process_count=process_count)
  return Batches(starts.map(lambda s: make_batch(tokens, s, seq_len, eos_id)))


def _arrays(example: dict) -> Batch:
  return {k: np.asarray(v) for k, v in example.items()}


class ExampleBatchIterator(Batches):
  """Endless batches of fixed-shape examples (BERT instances, finetuning rows), epoch by epoch.

  Epoch e visits every example once, in the order `epoch_order(len(source), seed)` gives (a
  new permutation each epoch); global rows run through epochs in order (a batch may straddle
  two). As for LMBatchIterator, a batch is a pure function of (seed, step), the state is the
  step, and host p gets rows [p*b, (p+1)*b) of the global batch.

  Args:
    source: indexable (len + __getitem__) returning dicts of equal-shape numpy arrays, e.g. a
      tfds ArrayRecord data source or an `ArraySource`; read through `grain.MapDataset.source`.
    batch_size: global batch size B.
    seed: the data seed, >= 0.
    transform: optional (example, source index, epoch) -> example, applied on the fly
      (e.g. dynamic masking seeded from the index and epoch, so resume stays exact).
    process_index, process_count: as in `LMBatchIterator`.
    prefetch: as in `Batches`.
  """

  def __init__(self, source, *, batch_size: int, seed: int, transform=None,
               process_index: int = 0, process_count: int = 1, prefetch: int = PREFETCH):
    import grain
    n = len(source)
    if n == 0:
      raise DataError("the example source is empty: nothing to train on")
    self.source, self.batch_size, self.seed, self.transform = source, batch_size, seed, transform

    examples = grain.MapDataset.source(source)

    def example(row, index):  # row: the global row number, from which the epoch follows
      example = _arrays(examples[index])
      return example if transform is None else transform(example, index, row // n)

    rows = epoch_order(n, seed).map_with_index(example)
    super().__init__(host_batches(rows, batch_size, process_index=process_index,
                                  process_count=process_count), prefetch=prefetch)


def example_batches(source, batch_size: int, *, process_index: int = 0,
                    process_count: int = 1) -> Batches:
  """Evaluation batches: every full global batch of `source` in order, the same each call.

  The last len(source) % B examples are left out.

  Args:
    source: indexable (len + __getitem__) returning dicts of equal-shape numpy arrays, as for
      `ExampleBatchIterator`.
    batch_size: global batch size B.
    process_index, process_count: as in `LMBatchIterator`.

  Returns:
    Batches of {key: (b, ...) array}, this host's rows of each global batch.
  """
  import grain
  full = len(source) // batch_size * batch_size
  rows = grain.MapDataset.source(source)[:full].map(_arrays)
  return Batches(host_batches(rows, batch_size, process_index=process_index,
                              process_count=process_count))


class ArraySource:
  """Equal-length numpy arrays as an indexable source of examples (row i of each array).

  Args:
    arrays: {key: (n, ...) array}, the same n for every key.
  """

  def __init__(self, arrays: dict[str, np.ndarray]):
    lengths = {len(v) for v in arrays.values()}
    if len(lengths) != 1:
      raise ValueError(f"arrays of different lengths: { {k: len(v) for k, v in arrays.items()} }")
    self.arrays, self.n = arrays, lengths.pop()

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i: int) -> Batch:
    return {k: v[i] for k, v in self.arrays.items()}


def padded_batches(arrays: dict[str, np.ndarray], batch_size: int, *, process_index: int = 0,
                   process_count: int = 1) -> Batches:
  """Every example once, in order, in global batches of `batch_size`, the last one padded.

  The last batch is padded with copies of row 0 whose "weight" is 0, so no example is
  dropped and every batch has one shape.

  Args:
    arrays: {key: (n, ...) array}, with a "weight" column (n,).
    batch_size: global batch size B.
    process_index, process_count: as in `LMBatchIterator`.

  Returns:
    Batches of {key: (b, ...) array}, this host's rows; "weight" is float32, 0 on padding.
  """
  import grain
  n = len(arrays["weight"])

  def gather(index):  # (b,) row numbers, those >= n padding
    real = index < n
    batch = {k: v[np.where(real, index, 0)] for k, v in arrays.items()}
    batch["weight"] = np.where(real, batch["weight"], 0).astype(np.float32)
    return batch

  index = grain.MapDataset.range(-(-n // batch_size) * batch_size)
  return Batches(host_batches(index, batch_size, process_index=process_index,
                              process_count=process_count).map(gather))
