"""Length-bucketed batches: each batch padded only to a power of two >= its longest row.

Shape key: N examples, B global batch, b = B / process_count rows per host, T the width the
examples are stored at (max_seq_length), L a batch's bucket length.

Finetuning examples are encoded once as (N, T) arrays padded on the right (glue.encode_examples,
squad.make_features). A batch of them is cut to L = bucket_length(its longest row): the next
power of two, at least `min_length` and at most `max_length` (T by default). Short texts then
cost what their tokens cost, and the shapes stay few -- log2(T / min_length) + 1 of them --
so `jax.jit` compiles one program per bucket, the first time a batch of that length comes.
Cutting only drops padding (attention_mask 0) columns, so a model that masks padding gives
the same outputs as at width T: min_length = max_length = T is the unbucketed pipeline.

  BucketedBatches  training: endless, every example once per epoch in a fresh order (Grain's
                   index shuffle, seeded with seed + epoch); a batch straddles two epochs at
                   their seam. Batch k is a pure function of (seed, k): the iterator's state
                   is the step, and host p of P gets rows [p*b, (p+1)*b) of the global batch,
                   with L chosen from the whole global batch so every host cuts alike.
                   With group_batches=G > 0 the shuffled order is cut into groups of G
                   batches; each group's G*B examples are sorted by length, split into G
                   batches and those batches visited in a seeded random order (as
                   tf.data's bucket_by_sequence_length and Hugging Face's group_by_length do):
                   rows of similar length share a batch, so the buckets hold little padding.
  eval_batches     evaluation and prediction: every example once, in order, B at a time; the
                   last batch is topped up with copies of row 0 whose "weight" is 0.

Every (N, T) array (an array whose axis 1 has the width of `mask_key`'s) is cut; (N,) and
other arrays are gathered whole.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

Batch = dict[str, np.ndarray]


def bucket_length(length: int, *, minimum: int = 1, maximum: int | None = None) -> int:
  """The bucket of a `length`-token row: the smallest power-of-two multiple of `minimum`
  that is >= length, capped at `maximum` (e.g. minimum 16: 5 -> 16, 17 -> 32, 100 -> 128).

  Args:
    length: the longest row's length.
    minimum: the shortest bucket (>= 1; a power of two keeps the buckets powers of two).
    maximum: the longest bucket (max_seq_length), or None for no cap.

  Returns:
    L, the bucket length: minimum * 2**k >= length for the least such k, at most `maximum`.

  Raises:
    ValueError: minimum < 1.
  """
  if minimum < 1:
    raise ValueError(f"minimum={minimum}: the shortest bucket must be at least 1")
  bucket = minimum
  while bucket < length:
    bucket *= 2
  return bucket if maximum is None else min(bucket, maximum)


def row_lengths(mask: np.ndarray) -> np.ndarray:
  """(N, T) attention mask -> (N,) int: 1 + the position of each row's last real token.

  Args:
    mask: (N, T) attention mask, any dtype; non-zero entries are real tokens.

  Returns:
    (N,) int64 lengths; 0 for a row with no real token.
  """
  mask = np.asarray(mask) != 0
  last = mask.shape[1] - np.argmax(mask[:, ::-1], axis=1)
  return np.where(mask.any(axis=1), last, 0)


def host_rows(batch_size: int, process_index: int, process_count: int) -> slice:
  """This host's rows [p*b, (p+1)*b) of a global batch; an error unless P divides B.

  Args:
    batch_size: the global batch size B.
    process_index: this host's index p, 0 <= p < P.
    process_count: the number of hosts P.

  Returns:
    slice(p*b, (p+1)*b) with b = B / P.

  Raises:
    ValueError: p is not in [0, P), or P does not divide B.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
  if batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} is not divisible by process_count="
                     f"{process_count}; use a multiple of {process_count}")
  b = batch_size // process_count
  return slice(process_index * b, (process_index + 1) * b)


class _Cutter:
  """Gathers rows of the arrays and cuts the (N, T) ones to a bucket length."""

  def __init__(self, arrays: dict[str, np.ndarray], mask_key: str, min_length: int,
               max_length: int | None):
    if mask_key not in arrays:
      raise ValueError(f"mask_key={mask_key!r} is not one of the arrays {sorted(arrays)}")
    sizes = {k: len(v) for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
      raise ValueError(f"arrays of different lengths: {sizes}")
    self.arrays, self.n = arrays, sizes[mask_key]
    self.width = arrays[mask_key].shape[1]
    self.max_length = self.width if max_length is None else max_length
    if not 1 <= min_length:
      raise ValueError(f"min_length={min_length}: the shortest bucket must be at least 1")
    self.min_length = min_length
    self.lengths = row_lengths(arrays[mask_key])
    longest = int(self.lengths.max(initial=0))
    if longest > self.max_length:
      raise ValueError(f"a row has {longest} tokens, more than max_length={self.max_length}: "
                       "encode the examples with that max_length")
    self.cut_keys = {k for k, v in arrays.items() if v.ndim >= 2 and v.shape[1] == self.width}

  def bucket(self, index: np.ndarray) -> int:
    """L for the global batch of examples `index`."""
    return bucket_length(int(self.lengths[index].max(initial=0)), minimum=self.min_length,
                         maximum=self.max_length)

  def take(self, index: np.ndarray, length: int) -> Batch:
    return {k: v[index, :length] if k in self.cut_keys else v[index]
            for k, v in self.arrays.items()}


class BucketedBatches:
  """Endless shuffled training batches, each cut to its bucket length (module docstring).

  Args:
    arrays: equal-length arrays of N encoded examples, the sequences (N, T) padded on the right.
    batch_size: global batch size B.
    seed: the data seed, 0 <= seed < 2**32.
    min_length, max_length: the shortest and longest bucket (max_length None: T); equal
      values give every batch that one width (no bucketing).
    mask_key: the (N, T) array whose non-zero entries are the real tokens.
    process_index, process_count: this host's place (jax.process_index/count()).
    group_batches: G > 0 sorts each group of G consecutive batches of the shuffled order by
      length (module docstring); 0 keeps the shuffled order.
  """

  def __init__(self, arrays: dict[str, np.ndarray], *, batch_size: int, seed: int,
               min_length: int = 16, max_length: int | None = None,
               mask_key: str = "input_mask", process_index: int = 0, process_count: int = 1,
               group_batches: int = 0):
    import grain  # the finetuning data machinery, imported only when asked for
    self._cutter = _Cutter(arrays, mask_key, min_length, max_length)
    if self._cutter.n == 0:
      raise ValueError("no examples: nothing to train on")
    if not 0 <= seed < 2**32:
      raise ValueError(f"seed={seed}: the data seed must be in [0, 2**32)")
    self._rows = host_rows(batch_size, process_index, process_count)
    if isinstance(group_batches, bool) or not isinstance(group_batches, int) or group_batches < 0:
      raise ValueError(f"group_batches={group_batches!r}: the number of batches sorted by length "
                       "together must be an int >= 0 (0: no grouping)")
    self.batch_size, self.seed, self.group_batches = batch_size, seed, group_batches
    self._group = (None, None)  # (group number, its (G, B) batches): the group being read
    # Global batch k = example indices [k*B, (k+1)*B) of the endless, per-epoch shuffled order.
    self._indices = (grain.MapDataset.range(self._cutter.n).shuffle(seed=seed).repeat()
                     .batch(batch_size, batch_fn=np.asarray))
    self.step = 0

  def indices_at(self, step: int) -> np.ndarray:
    """(B,) the examples of global batch `step`, all hosts' rows.

    Args:
      step: the global batch number k (0-based; counts on across epochs).

    Returns:
      (B,) int64 example indices into the N examples.
    """
    g = self.group_batches
    if not g:
      return self._indices[step]
    group = step // g
    if self._group[0] != group:
      members = np.concatenate([self._indices[group * g + j] for j in range(g)])  # (G*B,)
      by_length = members[np.argsort(self._cutter.lengths[members], kind="stable")]
      order = np.random.default_rng((self.seed, group)).permutation(g)
      self._group = (group, by_length.reshape(g, self.batch_size)[order])
    return self._group[1][step % g]

  def length_at(self, step: int) -> int:
    """L, the width of global batch `step` (the same on every host).

    Args:
      step: the global batch number.

    Returns:
      The bucket length L of the batch's longest row (see `bucket_length`).
    """
    return self._cutter.bucket(self.indices_at(step))

  def batch_at(self, step: int) -> Batch:
    """This host's rows of global batch `step`, cut to its bucket (does not move the iterator).

    Args:
      step: the global batch number.

    Returns:
      Dict of name -> array: the (N, T) arrays as (b, L), the others as (b, ...).
    """
    index = self.indices_at(step)
    return self._cutter.take(index[self._rows], self._cutter.bucket(index))

  def lengths(self, steps: int) -> np.ndarray:
    """(steps,) the widths L of batches 0 .. steps-1: a run's padded tokens per example.

    Args:
      steps: the number of batches.

    Returns:
      (steps,) int64 bucket lengths.
    """
    return np.array([self.length_at(s) for s in range(steps)], np.int64)

  def get_state(self) -> dict[str, int]:
    """The resumable state: the number of batches already produced.

    Returns:
      {"step": int}, for `set_state` (and checkpoint meta).
    """
    return {"step": self.step}

  def set_state(self, state: dict[str, int]) -> None:
    """Restores `get_state()`'s result; the next batch is the one that would have followed.

    Args:
      state: a dict {"step": int} from `get_state`.
    """
    self.step = int(state["step"])

  def __iter__(self) -> Iterator[Batch]:
    return self

  def __next__(self) -> Batch:
    batch = self.batch_at(self.step)
    self.step += 1
    return batch


def eval_batches(arrays: dict[str, np.ndarray], batch_size: int, *, min_length: int = 16,
                 max_length: int | None = None, mask_key: str = "input_mask",
                 process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
  """Every example once, in order, in global batches of `batch_size` cut to their bucket.

  The last batch is topped up with copies of row 0 whose "weight" is 0 (the arrays need a
  "weight" column), so no example is dropped; its bucket follows its real rows only.

  Args:
    arrays, min_length, max_length, mask_key, process_index, process_count: as in
      `BucketedBatches`.
    batch_size: global batch size B.

  Returns:
    An iterator of this host's rows of each batch: (b, L) and (b,) arrays. Problems are
    raised by this call, not by the first `next`.
  """
  cutter = _Cutter(arrays, mask_key, min_length, max_length)
  rows = host_rows(batch_size, process_index, process_count)
  if "weight" not in arrays:
    raise ValueError(f"eval_batches needs a 'weight' column, the arrays have {sorted(arrays)}")

  def batches():
    for start in range(0, cutter.n, batch_size):
      index = np.arange(start, start + batch_size)
      real = index < cutter.n
      batch = cutter.take(np.where(real, index, 0)[rows], cutter.bucket(index[real]))
      batch["weight"] = np.where(real[rows], batch["weight"], 0).astype(np.float32)
      yield batch
  return batches()
