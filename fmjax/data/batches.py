"""Language-model batches cut from one flat token stream, deterministic and resumable.

Shape key: B global batch, b = B / process_count rows per host, T = seq_len.

A row is a window of T+1 consecutive stream tokens: `inputs` are the first T, `targets`
the last T. Documents are packed (each ends with EOS), so a row also carries
`segment_ids` (1, 2, ... per document within the row; the token after an EOS starts a new
one) and `positions` (restarting at 0 with each document) for packed-sequence attention
masks and position embeddings. Note that an EOS input's target is the next document's
first token; mask it out with the segment ids if that prediction should not count.

Every batch is a pure function of (seed, step), so the whole iterator state is the step
number, and host p of P produces exactly rows [p*b, (p+1)*b) of the single-host batch.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator

import numpy as np

from fmjax.data.text import DataError

Batch = dict[str, np.ndarray]
MODES = ("random", "sequential")


def _check_stream(tokens: np.ndarray, seq_len: int) -> None:
  if tokens.ndim != 1:
    raise ValueError(f"tokens must be a flat (L,) stream, got shape {tokens.shape}")
  if len(tokens) < seq_len + 1:
    raise DataError(
        f"the token stream has {len(tokens)} tokens but seq_len={seq_len} needs at least "
        f"{seq_len + 1} (one window plus its shifted target); use a larger corpus (or a larger "
        "validation fraction) or a smaller seq_len")


def _rows(batch_size: int, process_index: int, process_count: int) -> slice:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
  if batch_size % process_count:
    raise ValueError(f"global batch_size={batch_size} is not divisible by "
                     f"process_count={process_count}; use a multiple of {process_count}")
  b = batch_size // process_count
  return slice(process_index * b, (process_index + 1) * b)


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


class _StepIterator(abc.ABC):
  """Shared by the iterators below: a batch is a pure function of the step (`batch_at`), so
  the resumable state is just the number of batches already produced."""
  step: int

  @abc.abstractmethod
  def batch_at(self, step: int) -> Batch:
    """This host's part of global batch number `step` (0-based)."""

  def get_state(self) -> dict[str, int]:
    """Returns the resumable state: the number of batches already produced."""
    return {"step": self.step}

  def set_state(self, state: dict[str, int]) -> None:
    """Restores `get_state()`'s result; the next batch is the one that would have followed."""
    self.step = int(state["step"])

  def __iter__(self) -> Iterator[Batch]:
    return self

  def __next__(self) -> Batch:
    batch = self.batch_at(self.step)
    self.step += 1
    return batch


class LMBatchIterator(_StepIterator):
  """Endless LM batches over a token stream.

  mode="random": each global row starts at a position drawn uniformly from
    [0, L - T - 1] by a numpy Generator seeded with (seed, step), as nanoGPT's get_batch.
  mode="sequential": the stream is cut into W = (L - 1) // T non-overlapping windows;
    epoch e visits all of them in a permutation seeded with (seed, e), and global rows
    run through epoch after epoch (a batch may straddle two epochs).
  """

  def __init__(self, tokens: np.ndarray, *, batch_size: int, seq_len: int, seed: int,
               eos_id: int, mode: str = "random", process_index: int = 0,
               process_count: int = 1):
    """Args:
      tokens: (L,) token stream (e.g. from `load_token_stream`); read, never copied.
      batch_size: global batch size B over all processes.
      seq_len: T.
      seed: the data seed.
      eos_id: the tokenizer's EOS id, where documents end.
      mode: "random" or "sequential".
      process_index, process_count: this host's place (jax.process_index/count()).
    """
    if mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _check_stream(tokens, seq_len)
    self._rows = _rows(batch_size, process_index, process_count)
    self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
    self.seed, self.eos_id, self.mode = seed, eos_id, mode
    self.num_windows = (len(tokens) - 1) // seq_len  # sequential mode's windows per epoch
    self.step = 0
    self._permutation = (-1, None)  # (epoch, permutation): rows move through epochs in order

  def batch_at(self, step: int) -> Batch:
    """This host's part of global batch number `step` (0-based)."""
    return make_batch(self.tokens, self._global_starts(step)[self._rows], self.seq_len,
                      self.eos_id)

  def _global_starts(self, step: int) -> np.ndarray:
    if self.mode == "random":
      rng = np.random.default_rng([self.seed, step])
      return rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
    rows = step * self.batch_size + np.arange(self.batch_size)
    windows = np.array([self._epoch_permutation(r // self.num_windows)[r % self.num_windows]
                        for r in rows])
    return windows * self.seq_len

  def _epoch_permutation(self, epoch: int) -> np.ndarray:
    if self._permutation[0] != epoch:
      rng = np.random.default_rng([self.seed, epoch])
      self._permutation = (epoch, rng.permutation(self.num_windows))
    return self._permutation[1]


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int,
                 max_batches: int | None = None, *, eos_id: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[Batch]:
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
  _check_stream(tokens, seq_len)
  rows = _rows(batch_size, process_index, process_count)
  num_batches = (len(tokens) - 1) // seq_len // batch_size
  if num_batches == 0:
    raise DataError(f"the evaluation stream ({len(tokens)} tokens) holds "
                    f"{(len(tokens) - 1) // seq_len} windows of seq_len={seq_len}, fewer than "
                    f"one batch of {batch_size}; lower the eval batch size or seq_len, or "
                    "enlarge the validation split")
  if max_batches is not None:
    num_batches = min(num_batches, max_batches)
  windows = lambda k: (k * batch_size + np.arange(batch_size))[rows]
  return (make_batch(tokens, windows(k) * seq_len, seq_len, eos_id) for k in range(num_batches))


class ExampleBatchIterator(_StepIterator):
  """Endless batches of fixed-shape examples (BERT instances, finetuning rows), epoch by epoch.

  Epoch e visits every example once in a permutation seeded with (seed, e); global rows run
  through epochs in order. Like LMBatchIterator, a batch is a pure function of (seed, step),
  the state is the step, and host p gets rows [p*b, (p+1)*b) of the global batch.

  Args:
    source: indexable (len + __getitem__) returning dicts of equal-shape numpy arrays, e.g. a
      tfds ArrayRecord data source.
    batch_size: global batch size B.
    seed: the data seed.
    transform: optional (example, global_example_index, epoch) -> example, applied on the fly
      (e.g. dynamic masking seeded from the index and epoch, so resume stays exact).
  """

  def __init__(self, source, *, batch_size: int, seed: int, transform=None,
               process_index: int = 0, process_count: int = 1):
    if len(source) == 0:
      raise DataError("the example source is empty: nothing to train on")
    self._rows = _rows(batch_size, process_index, process_count)
    self.source, self.batch_size, self.seed, self.transform = source, batch_size, seed, transform
    self.step = 0
    self._permutation = (-1, None)

  def batch_at(self, step: int) -> Batch:
    """The host-local batch of global step `step` (does not move the iterator)."""
    n = len(self.source)
    rows = []
    for g in range(step * self.batch_size, (step + 1) * self.batch_size)[self._rows]:
      epoch, i = divmod(g, n)
      if self._permutation[0] != epoch:
        self._permutation = (epoch, np.random.default_rng([self.seed, epoch]).permutation(n))
      index = int(self._permutation[1][i])
      example = {k: np.asarray(v) for k, v in self.source[index].items()}
      rows.append(example if self.transform is None else self.transform(example, index, epoch))
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def example_batches(source, batch_size: int, *, process_index: int = 0,
                    process_count: int = 1) -> Iterator[Batch]:
  """Evaluation batches: every full global batch of `source` in order, the same each call."""
  rows = _rows(batch_size, process_index, process_count)
  for start in range(0, len(source) - batch_size + 1, batch_size):
    examples = [{k: np.asarray(v) for k, v in source[i].items()}
                for i in range(start, start + batch_size)[rows]]
    yield {k: np.stack([e[k] for e in examples]) for k in examples[0]}


class ArraySource:
  """Equal-length numpy arrays as an indexable source of examples (row i of each array)."""

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
                   process_count: int = 1) -> Iterator[Batch]:
  """Every example once, in order, in global batches of `batch_size`: the last batch is
  padded with copies of row 0 whose "weight" is 0 (the arrays must have a "weight" column),
  so no example is dropped and every batch has one shape."""
  rows = _rows(batch_size, process_index, process_count)
  n = len(arrays["weight"])
  for start in range(0, n, batch_size):
    index = np.arange(start, start + batch_size)
    real = index < n
    index = np.where(real, index, 0)[rows]
    batch = {k: v[index] for k, v in arrays.items()}
    batch["weight"] = np.where(real[rows], batch["weight"], 0).astype(np.float32)
    yield batch
