"""The Grain batch pipelines of fmjax.data (batches.py, translation.py): the same seed gives the
same batches, resuming mid-epoch from get_state() continues exactly, host rows concatenate to the
single-host batch, every example comes once per epoch, and packed windows match a hand count."""

import json

import grain
import numpy as np
import pytest

from fmjax import data
from fmjax.data import batches, text, translation

EOS = data.ByteTokenizer.eos_id  # 256


def stream(n=400, seed=0):
  """A token stream with documents of 1-15 tokens, each ended by EOS."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 50, size=n).astype(np.uint16)
  tokens[rng.random(n) < 0.15] = EOS
  return tokens


def source(n=10):
  """n examples whose "id" is their index."""
  return data.ArraySource({"id": np.arange(n, dtype=np.int32),
                           "x": np.arange(n * 3, dtype=np.float32).reshape(n, 3)})


def noise(example, index, epoch):
  """A transform seeded by (index, epoch), as the programs' dynamic masking and augmentation."""
  return {**example, "noise": np.random.default_rng([index, epoch]).integers(0, 10**6, 2)}


def pairs(n=24, seed=0):
  rng = np.random.default_rng(seed)
  sources = [rng.integers(3, 30, rng.integers(1, 20)).astype(np.int32) for _ in range(n)]
  targets = [rng.integers(3, 30, rng.integers(1, 20)).astype(np.int32) for _ in range(n)]
  return sources, targets


TOKENS, SOURCE, PAIRS = stream(), source(), pairs()

# Each endless training pipeline as (seed, process_index, process_count) -> iterator; global B=8.
TRAINING = {
    "lm_random": lambda seed, p=0, n=1: data.LMBatchIterator(
        TOKENS, batch_size=8, seq_len=8, seed=seed, eos_id=EOS, mode="random",
        process_index=p, process_count=n),
    "lm_sequential": lambda seed, p=0, n=1: data.LMBatchIterator(
        TOKENS, batch_size=8, seq_len=8, seed=seed, eos_id=EOS, mode="sequential",
        process_index=p, process_count=n),
    "examples": lambda seed, p=0, n=1: data.ExampleBatchIterator(
        SOURCE, batch_size=8, seed=seed, transform=noise, process_index=p, process_count=n),
    "pairs": lambda seed, p=0, n=1: translation.PairBatches(
        *PAIRS, batch_size=8, seed=seed, pad_id=0, start_id=1, length_multiple=4, pool=2,
        process_index=p, process_count=n),
}

# Each finite evaluation pipeline as (process_index, process_count) -> iterator; global B=8.
EVALUATION = {
    "lm_eval": lambda p=0, n=1: data.eval_batches(TOKENS, 8, 8, eos_id=EOS, process_index=p,
                                                  process_count=n),
    "examples_eval": lambda p=0, n=1: data.example_batches(source(20), 8, process_index=p,
                                                           process_count=n),
    "padded": lambda p=0, n=1: data.padded_batches(
        {"id": np.arange(20), "weight": np.ones(20, np.float32)}, 8, process_index=p,
        process_count=n),
    "pairs_eval": lambda p=0, n=1: (b for b, _ in translation.padded_pairs(
        *pairs(20), 8, 20, pad_id=0, start_id=1, process_index=p, process_count=n)),
}


def assert_same(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def differs(a, b):
  return any(a[k].shape != b[k].shape or (a[k] != b[k]).any() for k in a)


# ------------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("name", TRAINING)
def test_same_seed_same_batches_other_seed_other_batches(name):
  make = TRAINING[name]
  first, again, other = make(3), make(3), make(4)
  a = [next(first) for _ in range(7)]
  for x, y in zip(a, [next(again) for _ in range(7)]):
    assert_same(x, y)
  assert any(differs(x, y) for x, y in zip(a, [next(other) for _ in range(7)]))


@pytest.mark.parametrize("name", TRAINING)
def test_pipeline_is_a_grain_map_dataset_read_in_order(name):
  it = TRAINING[name](0)
  assert isinstance(it.dataset, grain.MapDataset)
  for k in range(4):
    expected = it.dataset[k]
    assert_same(it.batch_at(k), expected)
    assert_same(next(it), expected)


# ------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("name", TRAINING)
def test_resume_mid_epoch_equals_uninterrupted(name):
  make = TRAINING[name]
  uninterrupted = [next(it) for it in [make(5)] for _ in range(9)]
  first = make(5)
  for _ in range(5):
    next(first)
  # Prefetching reads ahead, but the state counts only the batches handed out.
  state = json.loads(json.dumps(first.get_state()))  # what fit stores in the checkpoint meta
  assert state == {"step": 5}
  resumed = make(5)
  resumed.set_state({**state, "phase": 1})  # other keys (pretrain_bert's phase) are ignored
  for expected in uninterrupted[5:9]:
    assert_same(next(resumed), expected)
  first.set_state({"step": 2})  # rewinding drops what was prefetched
  assert_same(next(first), uninterrupted[2])
  assert first.get_state() == {"step": 3}


def test_resume_on_a_tfds_array_record_source(tmp_path):
  """ExampleBatchIterator over a prepared tfds ArrayRecord dataset (read through
  grain.MapDataset.source), resumed mid-epoch."""
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n\n".join(f"document {i} " + "x" * i for i in range(7)), encoding="utf-8")
  documents = data.load_documents(data_dir=str(tmp_path / "tfds"), train_path=str(corpus),
                                  document_split="blank_line")
  records = documents._source  # pylint: disable=protected-access
  make = lambda: data.ExampleBatchIterator(records, batch_size=4, seed=1)
  uninterrupted = [next(it) for it in [make()] for _ in range(5)]
  seen = np.concatenate([b["text"] for b in uninterrupted])[:7]
  assert sorted(t.decode() for t in seen) == sorted(documents)  # epoch 1: each document once
  resumed = make()
  resumed.set_state({"step": 3})
  for expected in uninterrupted[3:]:
    assert_same(next(resumed), expected)


def test_documents_iterate_through_grain_in_order(tmp_path, monkeypatch):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n\n".join(f"doc {i}" for i in range(11)), encoding="utf-8")
  documents = data.load_documents(data_dir=str(tmp_path / "tfds"), train_path=str(corpus),
                                  document_split="blank_line")
  monkeypatch.setattr(text, "_READ_CHUNK", 4)  # 3 chunks: 4 + 4 + 3 documents
  assert list(documents) == [f"doc {i}" for i in range(11)]


# ------------------------------------------------------------------------------ hosts


@pytest.mark.parametrize("name", TRAINING)
@pytest.mark.parametrize("hosts", [2, 4])
def test_host_rows_concatenate_to_the_single_host_batch(name, hosts):
  make = TRAINING[name]
  single = make(2)
  parts = [make(2, p, hosts) for p in range(hosts)]
  for _ in range(4):  # crosses an epoch for the examples (10 per epoch, 8 per batch)
    whole = next(single)
    got = [next(h) for h in parts]
    assert all(len(g[next(iter(g))]) == 8 // hosts for g in got)
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), whole[key])


@pytest.mark.parametrize("name", EVALUATION)
def test_evaluation_host_rows_concatenate_to_the_single_host_batch(name):
  make = EVALUATION[name]
  single = list(make())
  halves = [list(make(p, 2)) for p in range(2)]
  assert len(single) == len(halves[0]) == len(halves[1]) > 1
  for whole, *got in zip(single, *halves):
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), whole[key])
  assert len(list(make())) == len(single)  # the same again on every call


def test_batch_not_divisible_by_hosts_is_one_clear_error():
  for make in (TRAINING["examples"], TRAINING["lm_sequential"], TRAINING["pairs"]):
    with pytest.raises(ValueError, match="batch_size=8 is not divisible by process_count=3"):
      make(0, 0, 3)
  with pytest.raises(ValueError, match=r"process_index=2 is not in \[0, 2\)"):
    data.padded_batches({"weight": np.ones(4)}, 4, process_index=2, process_count=2)


# ------------------------------------------------------------------------------ coverage


def test_examples_each_once_per_epoch_with_transform_seeded_by_index_and_epoch():
  it = data.ExampleBatchIterator(SOURCE, batch_size=4, seed=0, transform=noise)
  rows = [next(it) for _ in range(5)]  # 20 rows: epochs 0 and 1 of 10 examples
  ids = np.concatenate([r["id"] for r in rows])
  epochs = [ids[:10], ids[10:]]
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(10))
  assert not np.array_equal(*epochs)  # reshuffled each epoch
  got = np.concatenate([r["noise"] for r in rows])
  for row, (i, value) in enumerate(zip(ids, got)):
    np.testing.assert_array_equal(value, noise({}, i, row // 10)["noise"])
  np.testing.assert_array_equal(np.concatenate([r["x"] for r in rows]), SOURCE.arrays["x"][ids])


def test_sequential_windows_each_once_per_epoch_across_hosts():
  tokens = np.arange(1 + 12 * 4, dtype=np.int32)  # 12 windows of 4
  hosts = [data.LMBatchIterator(tokens, batch_size=6, seq_len=4, seed=9, eos_id=-1,
                                mode="sequential", process_index=p, process_count=2)
           for p in range(2)]
  for _ in range(2):  # two epochs of two batches
    starts = np.concatenate([next(h)["inputs"][:, 0] for _ in range(2) for h in hosts])
    np.testing.assert_array_equal(np.sort(starts), np.arange(12) * 4)


def test_pair_batches_each_pair_once_per_epoch_in_length_buckets():
  sources, targets = PAIRS
  it = translation.PairBatches(sources, targets, batch_size=8, seed=0, pad_id=0, start_id=1,
                               length_multiple=4, pool=3)
  assert it.per_epoch == 3
  for epoch in range(2):
    rows = [next(it) for _ in range(it.per_epoch)]
    got = sorted(tuple(b["source"][i][b["source_mask"][i]]) for b in rows for i in range(8))
    assert got == sorted(tuple(s) for s in sources)
    for b in rows:  # padded to a multiple of 4 that the longest pair of the batch needs
      longest = max(b["source_mask"].sum(1).max(), (b["weight"] > 0).sum(1).max())
      assert b["source"].shape[1] == -(-longest // 4) * 4


def test_padded_evaluation_sees_every_example_once():
  arrays = {"id": np.arange(11), "weight": np.ones(11, np.float32)}
  got = list(data.padded_batches(arrays, 4))
  assert len(got) == 3
  ids, weight = (np.concatenate([b[k] for b in got]) for k in ("id", "weight"))
  np.testing.assert_array_equal(ids, [*range(11), 0])  # the filler is a copy of row 0 ...
  np.testing.assert_array_equal(weight, [1] * 11 + [0])  # ... that weighs nothing
  sources, targets = pairs(11)
  batches_ = list(translation.padded_pairs(sources, targets, 4, 20, pad_id=0, start_id=1))
  assert [n for _, n in batches_] == [4, 4, 3]
  rows = np.concatenate([b["source"] for b, _ in batches_])
  for row, s in zip(rows, sources):
    np.testing.assert_array_equal(row[:len(s)], s)
  assert not rows[11].any() and not batches_[-1][0]["weight"][3].any()


def test_example_batches_keep_whole_batches_in_order():
  got = list(data.example_batches(source(10), 4))
  np.testing.assert_array_equal(np.concatenate([b["id"] for b in got]), np.arange(8))


def test_epoch_order_small_is_the_numpy_permutation_per_epoch():
  order = batches.epoch_order(10, seed=3)
  for epoch in range(3):
    np.testing.assert_array_equal([order[epoch * 10 + i] for i in range(10)],
                                  np.random.default_rng([3, epoch]).permutation(10))


def test_epoch_order_large_is_grains_shuffle():
  n = batches.GRAIN_SHUFFLE_MIN
  order, shuffled = batches.epoch_order(n, seed=3), grain.MapDataset.range(n).seed(3).shuffle()
  for row in (0, 1, 2, n - 1, n, n + 1, 5 * n + 7):  # reseeded each epoch
    assert order[row] == shuffled[row]
  assert [order[n + i] for i in range(5)] != [order[i] for i in range(5)]


@pytest.fixture
def grain_shuffle(monkeypatch):
  """Grain's shuffle for every dataset size (it is slow below GRAIN_SHUFFLE_MIN rows)."""
  monkeypatch.setattr(batches, "GRAIN_SHUFFLE_MIN", 0)


def test_grain_shuffle_covers_each_epoch_resumes_and_shards(grain_shuffle):
  del grain_shuffle
  n = 300
  order = batches.epoch_order(n, seed=1)
  epochs = [[order[e * n + i] for i in range(n)] for e in range(2)]
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
  assert epochs[0] != epochs[1] and epochs[0] != [batches.epoch_order(n, 2)[i] for i in range(n)]
  make = lambda p=0, hosts=1: data.ExampleBatchIterator(
      source(n), batch_size=100, seed=1, transform=noise, process_index=p, process_count=hosts)
  uninterrupted = [next(it) for it in [make()] for _ in range(5)]  # crosses into epoch 2
  np.testing.assert_array_equal(np.concatenate([b["id"] for b in uninterrupted[:3]]), epochs[0])
  resumed = make()
  resumed.set_state({"step": 2})
  for expected in uninterrupted[2:]:
    assert_same(next(resumed), expected)
  hosts = [make(p, 4) for p in range(4)]
  for whole in uninterrupted:
    got = [next(h) for h in hosts]
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), whole[key])


# ------------------------------------------------------------------------------ packing


def test_packed_windows_segments_and_positions_by_hand():
  tok = data.ByteTokenizer()
  tokens = data.pack_documents(["ab", "cde", "f"], tok)
  a, b, c, d, e, f = b"abcdef"
  np.testing.assert_array_equal(tokens, [a, b, EOS, c, d, e, EOS, f, EOS])
  # seq_len 4: (9 - 1) // 4 = 2 windows of 5 tokens, tokens[0:5] and tokens[4:9].
  (batch,) = list(data.eval_batches(tokens, 2, 4, eos_id=EOS))
  np.testing.assert_array_equal(batch["inputs"], [[a, b, EOS, c], [d, e, EOS, f]])
  np.testing.assert_array_equal(batch["targets"], [[b, EOS, c, d], [e, EOS, f, EOS]])
  np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 2], [1, 1, 1, 2]])
  np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 0], [0, 1, 2, 0]])
  # Sequential mode visits the same two windows once per epoch, in a shuffled order.
  it = data.LMBatchIterator(tokens, batch_size=1, seq_len=4, seed=0, eos_id=EOS,
                            mode="sequential")
  for _ in range(3):
    rows = [next(it) for _ in range(2)]
    order = [int(r["inputs"][0, 0] == d) for r in rows]
    assert sorted(order) == [0, 1]
    for r, w in zip(rows, order):
      for key in batch:
        np.testing.assert_array_equal(r[key][0], batch[key][w])
  # A window that starts right after an EOS begins a fresh document at position 0.
  row = data.make_batch(tokens, np.array([3]), 5, EOS)
  np.testing.assert_array_equal(row["inputs"], [[c, d, e, EOS, f]])
  np.testing.assert_array_equal(row["segment_ids"], [[1, 1, 1, 1, 2]])
  np.testing.assert_array_equal(row["positions"], [[0, 1, 2, 3, 0]])


def test_random_windows_stay_nanogpt_draws_on_every_host():
  tokens = np.arange(300, dtype=np.int32)
  for p in range(2):
    it = data.LMBatchIterator(tokens, batch_size=4, seq_len=10, seed=7, eos_id=-1,
                              process_index=p, process_count=2)
    for step in range(3):
      starts = np.random.default_rng([7, step]).integers(0, 300 - 10, size=4)[2 * p:2 * p + 2]
      np.testing.assert_array_equal(next(it)["inputs"], starts[:, None] + np.arange(10))


def test_host_batches_takes_rows_p_b_to_p_plus_1_b_of_each_global_batch():
  rows = grain.MapDataset.range(24)
  for p in range(3):
    host = batches.host_batches(rows, 6, process_index=p, process_count=3)
    assert len(host) == 4
    for k in range(4):
      np.testing.assert_array_equal(host[k], [6 * k + 2 * p, 6 * k + 2 * p + 1])
