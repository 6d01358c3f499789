"""Length-bucketed batches (fmjax.data.bucketing): buckets by hand, every example once per
epoch, exact resume, hosts' rows, and the finetune program's padding invariance."""

import ast
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from fmjax.data import bucketing

REPO = pathlib.Path(__file__).resolve().parents[1]


def examples(lengths, width=32):
  """Encoded-looking arrays: row i holds `lengths[i]` tokens (ids 100*i + position) then padding;
  "id" names the row, so batches can be traced back to examples."""
  n = len(lengths)
  position = np.arange(width)[None]
  mask = (position < np.asarray(lengths)[:, None]).astype(np.int32)
  return {"input_ids": ((100 * np.arange(n)[:, None] + position + 1) * mask).astype(np.int32),
          "token_type_ids": (mask * (position % 2)).astype(np.int32), "input_mask": mask,
          "id": np.arange(n), "weight": np.ones(n, np.float32)}


def test_length_groups_sort_each_group_and_keep_coverage_and_resume():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 33, 120)
  arrays = examples(lengths)
  g, b = 4, 6  # groups of 4 batches of 6: 20 batches an epoch, 5 groups
  grouped = bucketing.BucketedBatches(arrays, batch_size=b, seed=3, group_batches=g)
  plain = bucketing.BucketedBatches(arrays, batch_size=b, seed=3)
  for group in range(10):
    batches = [grouped.indices_at(group * g + j) for j in range(g)]
    members = np.concatenate([plain.indices_at(group * g + j) for j in range(g)])
    # The same examples as the plain shuffle's group, re-cut so that batches hold similar lengths.
    assert sorted(np.concatenate(batches).tolist()) == sorted(members.tolist())
    spans = sorted((lengths[i].min(), lengths[i].max()) for i in batches)
    assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:]))
  seen = np.concatenate([grouped.indices_at(s) for s in range(40)])  # two whole epochs
  assert np.bincount(seen, minlength=120).tolist() == [2] * 120
  assert grouped.lengths(40).sum() < plain.lengths(40).sum()
  resumed = bucketing.BucketedBatches(arrays, batch_size=b, seed=3, group_batches=g)
  resumed.set_state({"step": 6})  # the middle of the second group
  for step in range(6, 15):
    np.testing.assert_array_equal(next(resumed)["id"], grouped.batch_at(step)["id"])
  with pytest.raises(ValueError, match="group_batches=-1"):
    bucketing.BucketedBatches(arrays, batch_size=b, seed=3, group_batches=-1)


def test_bucket_length_by_hand():
  assert [bucketing.bucket_length(n) for n in (0, 1, 2, 3, 5, 8, 9)] == [1, 1, 2, 4, 8, 8, 16]
  assert [bucketing.bucket_length(n, minimum=16, maximum=128) for n in (1, 16, 17, 100, 128)] \
      == [16, 16, 32, 128, 128]
  assert bucketing.bucket_length(40, minimum=16, maximum=48) == 48  # capped: not a power of two
  assert bucketing.bucket_length(3, minimum=16, maximum=8) == 8
  with pytest.raises(ValueError, match="minimum=0"):
    bucketing.bucket_length(3, minimum=0)
  np.testing.assert_array_equal(
      bucketing.row_lengths(np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0]])),
      [2, 0, 4, 3])


def test_each_batch_is_cut_to_the_bucket_of_its_longest_row():
  lengths = [3, 20, 5, 9, 2, 17, 31, 4, 6, 8, 1, 12]
  arrays = examples(lengths)
  it = bucketing.BucketedBatches(arrays, batch_size=4, seed=3, min_length=4)
  widths = set()
  for step in range(9):
    batch = it.batch_at(step)
    rows = batch["id"]
    longest = max(lengths[r] for r in rows)
    width = batch["input_ids"].shape[1]
    assert width == bucketing.bucket_length(longest, minimum=4, maximum=32) == it.length_at(step)
    widths.add(width)
    for k in ("input_ids", "token_type_ids", "input_mask"):  # only padding columns were cut
      np.testing.assert_array_equal(batch[k], arrays[k][rows, :width])
      assert not arrays[k][rows, width:].any()
    np.testing.assert_array_equal(batch["weight"], 1)
  assert len(widths) > 1  # the stream really mixes buckets
  np.testing.assert_array_equal(it.lengths(9), [it.length_at(s) for s in range(9)])
  # min_length = max_length: every batch at the full width, as without bucketing
  flat = bucketing.BucketedBatches(arrays, batch_size=4, seed=3, min_length=32)
  for step in range(6):
    np.testing.assert_array_equal(flat.batch_at(step)["input_ids"],
                                  arrays["input_ids"][it.batch_at(step)["id"]])


def test_every_example_once_per_epoch_in_a_new_order():
  n, b = 10, 4  # 2.5 batches per epoch: batches straddle the epochs' seams
  it = bucketing.BucketedBatches(examples(range(1, n + 1)), batch_size=b, seed=0)
  stream = np.concatenate([next(it)["id"] for _ in range(3 * n // 2)])  # 6 epochs of rows
  epochs = stream.reshape(-1, n)
  for order in epochs:
    assert sorted(order) == list(range(n))
  assert len({tuple(order) for order in epochs}) == len(epochs)  # reshuffled every epoch
  other = bucketing.BucketedBatches(examples(range(1, n + 1)), batch_size=b, seed=1)
  assert not np.array_equal(other.batch_at(0)["id"], it.batch_at(0)["id"])


def test_resume_mid_epoch_gives_the_same_batches():
  arrays = examples([3, 20, 5, 9, 2, 17, 31, 4, 6, 8, 1, 12, 7])
  a = bucketing.BucketedBatches(arrays, batch_size=4, seed=5)
  first = [next(a) for _ in range(5)]  # into the second epoch (13 examples, 4 per batch)
  state = a.get_state()
  assert state == {"step": 5}
  rest = [next(a) for _ in range(4)]
  b = bucketing.BucketedBatches(arrays, batch_size=4, seed=5)
  b.set_state(json.loads(json.dumps(state)))  # as a checkpoint's metadata carries it
  for want in rest:
    got = next(b)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  c = bucketing.BucketedBatches(arrays, batch_size=4, seed=5)
  for want in first:  # a fresh iterator replays the run from step 0
    np.testing.assert_array_equal(next(c)["input_ids"], want["input_ids"])


@pytest.mark.parametrize("process_count", [2, 4])
def test_hosts_rows_concatenate_to_the_single_host_batch(process_count):
  arrays = examples([3, 20, 5, 9, 2, 17, 31, 4, 6, 8, 1, 12, 7, 30, 2, 2])
  one = bucketing.BucketedBatches(arrays, batch_size=8, seed=2)
  hosts = [bucketing.BucketedBatches(arrays, batch_size=8, seed=2, process_index=p,
                                     process_count=process_count) for p in range(process_count)]
  for step in range(5):
    whole = one.batch_at(step)
    parts = [h.batch_at(step) for h in hosts]
    for k in whole:  # one width on every host: the global batch's bucket
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])
  eval_one = list(bucketing.eval_batches(arrays, 8, min_length=4))
  eval_hosts = [list(bucketing.eval_batches(arrays, 8, min_length=4, process_index=p,
                                            process_count=process_count))
                for p in range(process_count)]
  for k, whole in enumerate(eval_one):
    np.testing.assert_array_equal(
        np.concatenate([host[k]["input_ids"] for host in eval_hosts]), whole["input_ids"])


def test_eval_batches_keep_order_and_weight_the_real_examples():
  lengths = [3, 20, 5, 9, 2, 17, 31, 4, 6, 8, 1]
  arrays = examples(lengths)
  batches = list(bucketing.eval_batches(arrays, 4, min_length=4))
  assert [b["input_ids"].shape for b in batches] == [(4, 32), (4, 32), (4, 8)]
  ids = np.concatenate([b["id"] for b in batches])
  weights = np.concatenate([b["weight"] for b in batches])
  np.testing.assert_array_equal(ids, list(range(11)) + [0])  # topped up with row 0 ...
  np.testing.assert_array_equal(weights, [1] * 11 + [0])  # ... weighted 0
  # the last batch's width follows its real rows (6, 8, 1 -> 8), not the copy of row 0 (3)
  np.testing.assert_array_equal(batches[2]["input_ids"][:3], arrays["input_ids"][8:11, :8])
  assert [b["input_ids"].shape[1] for b in bucketing.eval_batches(arrays, 4, min_length=32)] \
      == [32, 32, 32]


def test_bad_arguments_are_named():
  arrays = examples([3, 20, 5])
  with pytest.raises(ValueError, match="batch_size=3 is not divisible by process_count=2"):
    bucketing.BucketedBatches(arrays, batch_size=3, seed=0, process_count=2)
  with pytest.raises(ValueError, match="a row has 20 tokens, more than max_length=16"):
    bucketing.BucketedBatches(arrays, batch_size=2, seed=0, max_length=16)
  with pytest.raises(ValueError, match=r"seed=-1: the data seed must be in \[0, 2\*\*32\)"):
    bucketing.BucketedBatches(arrays, batch_size=2, seed=-1)
  with pytest.raises(ValueError, match="mask_key='attention_mask' is not one of the arrays"):
    bucketing.BucketedBatches(arrays, batch_size=2, seed=0, mask_key="attention_mask")
  del arrays["weight"]
  with pytest.raises(ValueError, match="eval_batches needs a 'weight' column"):
    bucketing.eval_batches(arrays, 2)


# The program: bucketed batches train and predict as max_seq_length ones ---------------------

def program(env, workdir, *overrides, config="configs/finetune.py:tiny"):
  cmd = [sys.executable, "-m", "train.finetune", f"--config={config}", f"--workdir={workdir}",
         "--config.runtime.dropout_rate=0.0", "--config.runtime.attention_dropout_rate=0.0",
         "--config.train.log_every=4", "--config.train.eval_every=8", *overrides]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  widths = re.search(r"train batch widths \(tokens: batches, of the first \d+\): (\{.*\})",
                     proc.stderr).group(1)
  return rows, ast.literal_eval(widths)  # {width: number of batches}


# tiny: sentences of 7-24 tokens. tiny_qa: windows as long as the contexts, 46-128 tokens.
SHAPES = {"tiny": ("--config.train.batch_size=4", "--config.data.max_seq_length=64"),
          "tiny_qa": ("--config.train.batch_size=2", "--config.data.max_seq_length=128",
                      "--config.data.doc_stride=128")}


@pytest.mark.slow
@pytest.mark.parametrize("variant,prediction", [("tiny", "eval.jsonl"), ("tiny_qa", "eval.json")])
def test_finetune_with_buckets_equals_max_seq_length_padding(env, tmp_path, variant, prediction):
  """Dropout off, the same seed: the same examples in every step, so bucketed training is the
  padded one up to float rounding -- losses, eval metrics and the predictions file."""
  config = f"configs/finetune.py:{variant}"
  steps = ("--config.train.steps=8", "--config.train.learning_rate=3e-3", *SHAPES[variant])
  bucketed, widths = program(env, tmp_path / "b", *steps, config=config)
  padded, padded_widths = program(env, tmp_path / "p", *steps, "--config.data.bucket=False",
                                  config=config)
  width = 64 if variant == "tiny" else 128  # max_seq_length
  assert padded_widths == {width: 8}
  assert sum(widths.values()) == 8 and min(widths) < width  # shorter batches ran
  assert [r["step"] for r in bucketed] == [r["step"] for r in padded] == [4, 8]
  assert padded[0]["train/loss"] != padded[1]["train/loss"]  # it trains
  for a, b in zip(bucketed, padded):
    for key in a:
      if key.startswith(("train/", "eval/")) or key == "grad_norm":
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
  a_path, b_path = tmp_path / "b" / "predictions" / prediction, tmp_path / "p" / "predictions" / prediction
  if variant == "tiny_qa":
    assert json.loads(a_path.read_text()) == json.loads(b_path.read_text())
  else:
    a_rows = [json.loads(line) for line in a_path.read_text().splitlines()]
    b_rows = [json.loads(line) for line in b_path.read_text().splitlines()]
    assert [r["prediction"] for r in a_rows] == [r["prediction"] for r in b_rows]
    np.testing.assert_allclose([r["probabilities"] for r in a_rows],
                               [r["probabilities"] for r in b_rows], atol=1e-5)
