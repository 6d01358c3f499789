"""End-to-end proofs of train/finetune.py (configs/finetune.py), as real subprocesses."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def program(env, workdir, *overrides, config="configs/finetune.py:tiny", module="finetune",
            devices=None):
  cmd = [sys.executable, "-m", f"train.{module}", f"--config={config}", f"--workdir={workdir}",
         *overrides]
  if devices:
    env = {**env, "FMJAX_CPU_DEVICES": str(devices)}
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def check_ok(proc):
  assert proc.returncode == 0, proc.stderr[-3000:]


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


LEARN = ("--config.train.steps=60", "--config.train.learning_rate=2e-3",
         "--config.runtime.dropout_rate=0.0", "--config.train.log_every=10",
         "--config.train.eval_every=20")


@pytest.fixture(scope="module")
def tiny(env, tmp_path_factory):
  root = tmp_path_factory.mktemp("finetune")
  unlabelled = root / "new_reviews.tsv"
  unlabelled.write_text("sentence\nthe cast is charming .\nthe script is dull .\ni found it awful .\n")
  workdir = root / "run"
  proc = program(env, workdir, *LEARN, f"--config.data.predict_path={unlabelled}")
  check_ok(proc)
  return workdir, proc, unlabelled


def test_classification_learns_and_writes_predictions_and_best(tiny):
  workdir, proc, _ = tiny
  rows = metrics(workdir)
  evals = [r for r in rows if "eval/accuracy" in r]
  assert [r["step"] for r in evals] == [20, 40, 60]
  assert {"eval/loss", "eval/accuracy", "eval/f1", "eval/mcc"} <= set(evals[-1])
  assert evals[-1]["eval/accuracy"] == 1.0 and evals[-1]["eval/mcc"] == 1.0
  assert "eval/accuracy=1" in proc.stdout
  best = json.load(open(workdir / "best" / "best.json"))
  assert best["metrics"]["eval/accuracy"] == max(r["eval/accuracy"] for r in evals)
  assert best["step"] == min(r["step"] for r in evals
                             if r["eval/accuracy"] == best["metrics"]["eval/accuracy"])
  # The eval predictions file agrees with the reported accuracy, row by row.
  predictions = jsonl(workdir / "predictions" / "eval.jsonl")
  assert len(predictions) == 24  # every dev example: the last, partial batch is padded, not dropped
  assert predictions[0]["where"] == "data/finetune_tiny/sentiment_dev.tsv:2"
  accuracy = np.mean([p["prediction"] == p["label"] for p in predictions])
  results = json.load(open(workdir / "eval_results.json"))
  assert accuracy == results["eval/accuracy"] == best["metrics"]["eval/accuracy"]
  assert all(abs(sum(p["probabilities"]) - 1) < 1e-4 for p in predictions)


def test_predictions_for_an_unlabelled_file_and_a_rerun_only_predicts(tiny, env, tmp_path):
  workdir, _, unlabelled = tiny
  new = jsonl(workdir / "predictions" / "new_reviews.jsonl")
  assert [p["texts"][0] for p in new] == ["the cast is charming .", "the script is dull .",
                                          "i found it awful ."]
  assert [p["prediction"] for p in new] == [1, 0, 0] and "label" not in new[0]
  before = (workdir / "metrics.jsonl").read_text()
  other = tmp_path / "more.tsv"
  other.write_text("sentence\nthe music was delightful .\n")
  proc = program(env, workdir, *LEARN, f"--config.data.predict_path={other}")
  check_ok(proc)
  assert (workdir / "metrics.jsonl").read_text() == before  # finished: nothing retrained
  assert jsonl(workdir / "predictions" / "more.jsonl")[0]["prediction"] == 1


def test_question_answering_end_to_end(env, tmp_path):
  proc = program(env, tmp_path / "qa", "--config.train.steps=100",
                 "--config.train.learning_rate=2e-3", config="configs/finetune.py:tiny_qa")
  check_ok(proc)
  last = metrics(tmp_path / "qa")[-1]
  assert {"eval/exact_match", "eval/f1", "eval/loss"} <= set(last)
  assert last["eval/exact_match"] >= 50 and last["eval/f1"] >= last["eval/exact_match"]
  answers = json.load(open(tmp_path / "qa" / "predictions" / "eval.json"))
  assert sorted(answers) == sorted(f"q{i}" for i in range(1, 11))
  assert answers["q2"] == "the Black Sea"


def test_sentence_pair_regression(env, tmp_path):
  data = "data/finetune_tiny/similarity_train.tsv"
  proc = program(env, tmp_path / "sts", "--config.task=regression",
                 "--config.data.text_columns=sentence1,sentence2", f"--config.data.train_path={data}",
                 f"--config.data.eval_path={data}", "--config.data.max_seq_length=40",
                 "--config.train.best_metric=eval/pearson", "--config.train.steps=100",
                 *LEARN[1:3])
  check_ok(proc)
  last = metrics(tmp_path / "sts")[-1]
  assert {"eval/pearson", "eval/spearman", "eval/loss"} <= set(last)
  assert last["eval/pearson"] > 0.5  # 0.69 here; an untrained head gives ~0
  predictions = jsonl(tmp_path / "sts" / "predictions" / "eval.jsonl")
  assert isinstance(predictions[0]["prediction"], float) and predictions[0]["label"] == 5.0


def test_eight_devices_equal_one(env, tmp_path):
  common = ("--config.train.steps=2", "--config.train.log_every=1", "--config.train.eval_every=2")
  one = program(env, tmp_path / "one", *common)
  eight = program(env, tmp_path / "eight", *common, "--config.mesh.data=2",
                  "--config.mesh.fsdp=4", devices=8)
  check_ok(one)
  check_ok(eight)
  assert "x 8 devices" in eight.stderr and "'fsdp': 4" in eight.stderr
  a, b = metrics(tmp_path / "one"), metrics(tmp_path / "eight")
  assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
  for ra, rb in zip(a, b):
    for key in ("train/loss", "grad_norm", "eval/loss", "eval/accuracy"):
      if key in ra:
        assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), key


@pytest.fixture(scope="module")
def pretrained(env, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("bert") / "pretrain"
  check_ok(program(env, workdir, "--config.train.steps=2", config="configs/bert.py:tiny",
                   module="pretrain_bert"))
  return workdir


def restore_params(workdir):
  import orbax.checkpoint as ocp
  directory = workdir / "checkpoints"
  step = max(int(p.name) for p in directory.iterdir() if p.name.isdigit())
  with ocp.PyTreeCheckpointer() as ckpt:
    return ckpt.restore(directory / str(step) / "state")["params"]


def test_init_from_a_pretraining_workdir_loads_the_encoder(pretrained, env, tmp_path):
  workdir = tmp_path / "ft"
  proc = program(env, workdir, f"--config.init_from={pretrained}", "--config.train.steps=2",
                 "--config.train.learning_rate=0.0",
                 "--config.train.allow_nonpositive_learning_rate=true")
  check_ok(proc)
  assert "initialised" in proc.stderr and "not used: ['mlm_bias'" in proc.stderr
  source, tuned = restore_params(pretrained), restore_params(workdir)
  assert set(tuned) == {"bert", "classifier"}
  a, b = checkpoint_flat(source["bert"]), checkpoint_flat(tuned["bert"])
  assert a.keys() == b.keys()
  for key in a:  # learning rate 0: the encoder is exactly the pretrained one
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  # the tokenizer comes with the encoder
  assert (workdir / "tokenizer" / "tokenizer.model").read_bytes() == \
      (pretrained / "tokenizer" / "tokenizer.model").read_bytes()

  # A head of another size is refused with the parameter, both shapes and the reason.
  proc = program(env, tmp_path / "three", f"--config.init_from={workdir}",
                 "--config.data.num_labels=3", "--config.train.steps=2")
  assert proc.returncode == 2
  assert "classifier/dense/bias has shape (2,) there but (3,) in this model (a task head" in proc.stderr
  assert not (tmp_path / "three" / "checkpoints").exists() or \
      not any((tmp_path / "three" / "checkpoints").iterdir())


def test_bad_input_is_one_error_line(env, tmp_path):
  bad = tmp_path / "ragged.tsv"
  bad.write_text("sentence\tlabel\ngood film\t1\nbad film\t0\toops\n")
  proc = program(env, tmp_path / "w", f"--config.data.train_path={bad}")
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert lines[-1] == (f"error: --config.data.quoting: {bad}:3: 3 fields where the header has "
                       "2 (['sentence', 'label']); a ragged row, or a quote or tab inside a field "
                       "(is TableFormat.quoting='none' right for this file?)")
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_init_from_a_hugging_face_bert_directory(env, tmp_path):
  """--config.init_from=hf:DIR: the HF weights (fmjax.hf names) and the HF tokenizer."""
  from fmjax import hf
  directory = REPO / "tests" / "golden" / "hf" / "bert"
  workdir = tmp_path / "hf"
  proc = program(env, workdir, f"--config.init_from=hf:{directory}", "--config.train.steps=2",
                 "--config.train.learning_rate=0.0",
                 "--config.train.allow_nonpositive_learning_rate=true")
  check_ok(proc)
  config, arrays = hf.read_weights(str(directory))
  tuned = restore_params(workdir)
  assert json.load(open(workdir / "config.json"))["init_from"] == f"hf:{directory}"
  for key, value in checkpoint_flat(arrays["bert"]).items():
    np.testing.assert_array_equal(checkpoint_flat(tuned["bert"])[key], value, err_msg=key)
  assert json.load(open(workdir / "tokenizer" / "fmjax_tokenizer.json"))["kind"] == "hf"


def checkpoint_flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(checkpoint_flat(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = np.asarray(v)
  return out
