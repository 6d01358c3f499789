"""End-to-end proofs of train/pretrain_gpt.py on the `tiny` recipe (configs/gpt.py).

Every invocation is a real subprocess, `python -m train.pretrain_gpt --config=... --workdir=...`
from the repository root, exactly as a user types it (absl parses flags once per process).
The 20-step run is a module fixture that the other tests copy; the runs share JAX's
persistent compilation cache. Runs on CPU, where float32 training is deterministic, so
resumed runs are compared bit for bit.
"""

import json
import math
import os
import pathlib
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = "configs/gpt.py:tiny"
CORPUS = REPO / "data" / "tiny_shakespeare.txt"
# The tiny recipe's numbers (configs/gpt.py); the tests check the program obeys them.
STEPS, LOG_EVERY, EVAL_EVERY, SAVE_EVERY = 20, 5, 10, 10
LR, WARMUP, END_FACTOR, SAMPLE_TOKENS = 3e-3, 5, 0.1, 40
TIMINGS = ("tokens_per_second", "mfu")
TRAIN_KEYS = {"step", "train/loss", "train/accuracy", "grad_norm", "learning_rate", *TIMINGS}
EVAL_KEYS = {"eval/loss", "eval/accuracy"}

pytestmark = pytest.mark.slow  # about a minute on 2 CPU cores: ~12 program runs


# ------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """The subprocesses' environment: one CPU device, a private cache, no debug re-raise."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "FMJAX_DEBUG")}
  env["JAX_PLATFORMS"] = "cpu"
  env["FMJAX_CPU_DEVICES"] = "1"  # one device whatever the core count (train/__init__.py)
  cache = tmp_path_factory.mktemp("cache")
  env["XDG_CACHE_HOME"] = str(cache)  # where the program caches the measured CPU peak FLOP/s
  # XLA executables are reused across the runs (it halves their time); same HLO, same code.
  env["JAX_COMPILATION_CACHE_DIR"] = str(cache / "jax")
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  return env


def program(env, workdir, *overrides, config=TINY):
  """Runs the GPT program to completion; returns the CompletedProcess (text stdout/stderr)."""
  cmd = [sys.executable, "-m", "train.pretrain_gpt", f"--config={config}",
         f"--workdir={workdir}", *overrides]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def check_ok(proc):
  assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
  assert "Traceback" not in proc.stderr


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def without_timings(rows):
  return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


def sample(stdout):
  """The text between the program's `--- sample ---` and `---...` lines."""
  head, sep, rest = stdout.partition("\n--- sample ---\n")
  assert sep, f"no sample printed:\n{stdout}"
  text, sep, _ = rest.partition("\n--------------\n")
  assert sep, f"sample not terminated:\n{stdout}"
  return text


def checkpoint_steps(workdir):
  return sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit())


def restore(workdir, step):
  """(TrainingState as a dict of numpy arrays, meta) of checkpoint `step`."""
  import jax
  import orbax.checkpoint as ocp
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "meta"))
  out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                      meta=ocp.args.JsonRestore()))
  manager.close()
  return jax.tree_util.tree_map(np.asarray, out["state"]), out["meta"]


def jax_leaves(tree):
  import jax
  return jax.tree_util.tree_leaves(tree)


def assert_trees_equal(a, b):
  import jax
  paths_a = jax.tree_util.tree_flatten_with_path(a)[0]
  paths_b = jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in paths_a] == [p for p, _ in paths_b]
  for (path, x), (_, y) in zip(paths_a, paths_b):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and np.array_equal(x, y), jax.tree_util.keystr(path)


def snapshot(directory, skip=()):
  """{relative path: (size, mtime_ns, bytes)} of everything under `directory` but `skip`."""
  out = {}
  for root, dirs, files in os.walk(directory):
    dirs[:] = [d for d in dirs if os.path.relpath(os.path.join(root, d), directory) not in skip]
    for name in dirs + files:
      path = os.path.join(root, name)
      st = os.stat(path)
      content = pathlib.Path(path).read_bytes() if name in files else None
      out[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns, content)
  return out


def tensorboard_scalars(workdir):
  """{tag: [(step, value), ...]} as TensorBoard shows them.

  Event files are read in creation order (their names start with the time); a SessionLog
  START at step s (tensorboardX's purge_step) hides the earlier events at steps >= s, as
  TensorBoard's event accumulator does.
  """
  from tensorboardX.proto import event_pb2
  directory = pathlib.Path(workdir, "tensorboard")
  files = sorted(directory.glob("events.out.tfevents.*"), key=lambda p: int(p.name.split(".")[3]))
  shown = {}
  for path in files:
    data, pos = path.read_bytes(), 0
    while pos < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
        shown = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in shown.items()}
      for value in event.summary.value:
        shown.setdefault(value.tag, []).append((event.step, value.simple_value))
  return shown


def assert_tensorboard_matches(workdir):
  """TensorBoard shows each metrics.jsonl value once, at its step, as float32."""
  expected = {}
  for row in metrics(workdir):
    for k, v in row.items():
      if k != "step":
        expected.setdefault(k, []).append((row["step"], float(np.float32(v))))
  assert tensorboard_scalars(workdir) == expected


def expected_learning_rate(step):
  """The tiny recipe's schedule at the update that ends at `step` (optimizer count step-1)."""
  i = step - 1
  if i < WARMUP:
    return LR * i / WARMUP
  end = LR * END_FACTOR
  return end + (LR - end) * 0.5 * (1 + math.cos(math.pi * (i - WARMUP) / (STEPS - WARMUP)))


# ------------------------------------------------------------------------------ the tiny run


@pytest.fixture(scope="module")
def tiny(env, tmp_path_factory):
  """The documented command, run once: (workdir, CompletedProcess)."""
  workdir = tmp_path_factory.mktemp("tiny") / "run"
  proc = program(env, workdir)
  check_ok(proc)
  return workdir, proc


def copy_of(tiny, tmp_path, name="copy"):
  """A copy of the finished tiny workdir (metadata and mtimes kept)."""
  workdir = tmp_path / name
  shutil.copytree(tiny[0], workdir)
  return workdir


def test_cli_end_to_end_writes_every_artifact(tiny):
  workdir, proc = tiny
  rows = metrics(workdir)
  assert [r["step"] for r in rows] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
  first = {"trainable_params", "total_params"}  # the first row says what trains
  assert rows[0]["trainable_params"] == rows[0]["total_params"] > 0  # no LoRA: everything
  for r in rows:
    want = TRAIN_KEYS | (EVAL_KEYS if r["step"] % EVAL_EVERY == 0 else set())
    assert set(r) == want | (first if r is rows[0] else set()), r["step"]
    assert all(math.isfinite(v) for v in r.values())
    assert r["tokens_per_second"] > 0 and r["mfu"] > 0
    assert 0 <= r["train/accuracy"] <= 1
    assert r["learning_rate"] == pytest.approx(expected_learning_rate(r["step"]), rel=1e-5)

  # It learns: from about uniform over the vocabulary to clearly better, on train and eval.
  text = CORPUS.read_text(encoding="utf-8")
  vocab = len(set(text[:int(len(text) * 0.9)])) + 2  # chars of the train split + EOS + PAD
  assert rows[0]["train/loss"] < math.log(vocab) + 0.1
  assert rows[-1]["train/loss"] < rows[0]["train/loss"] - 0.3
  evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
  assert len(evals) == STEPS // EVAL_EVERY and evals[-1] < evals[0] < math.log(vocab)

  assert_tensorboard_matches(workdir)
  assert checkpoint_steps(workdir) == list(range(SAVE_EVERY, STEPS + 1, SAVE_EVERY))
  state, meta = restore(workdir, STEPS)
  assert int(state["step"]) == STEPS and meta["data"] == {"step": STEPS} and meta["seed"] == 0
  assert meta["model"]["num_layers"] == 2 and meta["model"]["vocab_size"] == vocab
  # GPT-2 parameters of 2 layers, D=64, F=256, learned positions (64), tied embeddings, biases.
  d, f, layers, max_len = 64, 256, 2, 64
  per_layer = 4 * (d * d + d) + 2 * 2 * d + (d * f + f) + (f * d + d)
  padded = -(-vocab // 128) * 128  # the table stores the vocabulary padded to vocab_multiple 128
  n_params = layers * per_layer + padded * d + max_len * d + 2 * d
  assert sum(x.size for x in jax_leaves(state["params"])) == n_params
  assert f"model: {n_params:,} parameters" in proc.stderr

  tokenizer = json.loads((workdir / "tokenizer" / "fmjax_tokenizer.json").read_text())
  assert tokenizer["kind"] == "char" and len(tokenizer["chars"]) == vocab - 2
  config = json.loads((workdir / "config.json").read_text())
  assert config["train"]["steps"] == STEPS and config["model"]["num_layers"] == 2
  assert config["data"]["train_path"] == "data/tiny_shakespeare.txt"
  png = (workdir / "loss_curve.png").read_bytes()
  assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000

  text = sample(proc.stdout)
  assert text.startswith("ROMEO:")
  generated = text[len("ROMEO:"):]
  assert 0 < len(generated) <= SAMPLE_TOKENS and set(generated) <= set(tokenizer["chars"])
  assert f"final: train/loss={rows[-1]['train/loss']:.4g}, eval/loss={evals[-1]:.4g}" in proc.stdout
  assert f"workdir: {workdir}" in proc.stdout


# ------------------------------------------------------------------------------ resuming


def test_resume_after_a_crash_equals_the_uninterrupted_run(tiny, env, tmp_path):
  """Lose everything after the step-10 checkpoint, rerun the same command: same run."""
  workdir = copy_of(tiny, tmp_path)
  shutil.rmtree(workdir / "checkpoints" / str(STEPS))  # as if killed before the final save
  proc = program(env, workdir)
  check_ok(proc)
  assert f"resumed from {workdir / 'checkpoints'} step {SAVE_EVERY}\n" in proc.stderr
  assert without_timings(metrics(workdir)) == without_timings(metrics(tiny[0]))
  # Steps 11..20 were timed again; the rows of the lost steps were replaced, not appended.
  assert [r["step"] for r in metrics(workdir)] == [5, 10, 15, 20]
  assert_trees_equal(restore(workdir, STEPS), restore(tiny[0], STEPS))
  assert sample(proc.stdout) == sample(tiny[1].stdout)
  assert len(list((workdir / "tensorboard").glob("events.*"))) == 2
  assert_tensorboard_matches(workdir)  # the first file's steps 15, 20 are purged


def test_rerunning_a_finished_run_changes_nothing(tiny, env, tmp_path):
  workdir = copy_of(tiny, tmp_path)
  checkpoints_before = snapshot(workdir / "checkpoints")
  metrics_before = (workdir / "metrics.jsonl").read_bytes()
  proc = program(env, workdir)
  check_ok(proc)
  assert snapshot(workdir / "checkpoints") == checkpoints_before
  assert (workdir / "metrics.jsonl").read_bytes() == metrics_before
  assert f"resumed from {workdir / 'checkpoints'} step {STEPS}\n" in proc.stderr
  assert sample(proc.stdout) == sample(tiny[1].stdout)  # same params, same seed
  final = [line for line in tiny[1].stdout.splitlines() if line.startswith("final: ")]
  assert final[0].startswith("final: train/loss=") and final[0] in proc.stdout.splitlines()
  assert_tensorboard_matches(workdir)


@pytest.fixture(scope="module")
def constant_lr_straight(env, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight") / "run"
  check_ok(program(env, workdir, "--config.train.decay=constant"))
  return workdir


def test_training_10_then_20_steps_equals_20_steps(constant_lr_straight, env, tmp_path):
  """Extending a finished run with a larger train.steps continues it exactly.

  With a constant learning rate after warmup: the cosine schedule spans train.steps, so a
  10-step cosine run is a different run from the first half of a 20-step one.
  """
  workdir = tmp_path / "run"
  check_ok(program(env, workdir, "--config.train.decay=constant", "--config.train.steps=10"))
  assert [r["step"] for r in metrics(workdir)] == [5, 10]
  assert checkpoint_steps(workdir) == [10]
  assert_trees_equal(restore(workdir, 10), restore(constant_lr_straight, 10))
  proc = program(env, workdir, "--config.train.decay=constant")
  check_ok(proc)
  assert without_timings(metrics(workdir)) == without_timings(metrics(constant_lr_straight))
  assert [r["learning_rate"] for r in metrics(workdir)][1:] == pytest.approx([LR] * 3)
  assert_trees_equal(restore(workdir, STEPS), restore(constant_lr_straight, STEPS))
  assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == STEPS
  assert_tensorboard_matches(workdir)


# ------------------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def bad_corpora(tmp_path_factory):
  d = tmp_path_factory.mktemp("corpora")
  (d / "empty.txt").write_bytes(b"")
  (d / "latin1.txt").write_bytes("First Citizen:\nCaf\xe9 au lait.\n".encode("latin-1"))
  return d


def bad_input(case, corpora):
  """(--config, overrides, fragments the one error line must contain) of a bad-input case."""
  empty, latin1 = str(corpora / "empty.txt"), str(corpora / "latin1.txt")
  return {
      "missing_corpus": (TINY, ["--config.data.train_path=/nonexistent.txt"],
                         ["/nonexistent.txt", "no file matches"]),
      "empty_corpus": (TINY, [f"--config.data.train_path={empty}"], [empty, "empty (0 bytes)"]),
      "not_utf8_corpus": (TINY, [f"--config.data.train_path={latin1}"],
                          [latin1, "not valid UTF-8", "0xe9", "line 2"]),
      "unknown_key": (TINY, ["--config.train.stepz=3"],
                      ["--config.train.stepz=3", "no key 'stepz'", "did you mean 'steps'"]),
      "wrong_type": (TINY, ["--config.train.steps=abc"],
                     ["--config.train.steps=abc", "invalid literal for int()", "'abc'"]),
      "mesh_size": (TINY, ["--config.mesh.data=3"],
                    ["config.mesh", "'data': 3", "needs 3 devices but 1 are available"]),
      "other_model": (TINY, ["--config.model.num_layers=3"],
                      ["holds a checkpoint (step 20) of a different model",
                       "num_layers: checkpoint 2 vs config 3", "Nothing was changed"]),
      "missing_config_file": ("configs/gpt_typo.py:tiny", [],
                              ["--config", "configs/gpt_typo.py", "No such file"]),
  }[case]


@pytest.mark.parametrize("case", ["missing_corpus", "empty_corpus", "not_utf8_corpus",
                                  "unknown_key", "wrong_type", "mesh_size", "other_model",
                                  "missing_config_file"])
def test_bad_input_is_one_error_line_and_leaves_the_workdir_alone(case, tiny, env, bad_corpora,
                                                                 tmp_path):
  config, overrides, fragments = bad_input(case, bad_corpora)
  workdir = copy_of(tiny, tmp_path)
  # data/ holds tfds' prepared corpora; a corpus that fails to prepare leaves an empty
  # directory there (fmjax/data), which is harmless. Everything else must stay as it was.
  before = snapshot(workdir, skip=("data",))
  proc = program(env, workdir, *overrides, config=config)
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr + proc.stdout
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  for fragment in fragments:
    assert fragment in lines[0]
  assert snapshot(workdir, skip=("data",)) == before  # checkpoints, metrics, config, tokenizer


def test_unwritable_workdir_is_refused(env, tmp_path):
  """A workdir whose parent is a regular file (root ignores chmod, not this)."""
  parent = tmp_path / "a_file"
  parent.write_text("I am a file\n")
  proc = program(env, parent / "workdir")
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr + proc.stdout
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  assert str(parent / "workdir") in lines[0] and "not writable" in lines[0]
  assert parent.read_text() == "I am a file\n"


def test_continue_pretraining_a_hugging_face_gpt2(env, tmp_path):
  """--config.init_from=hf:DIR takes GPT-2's architecture, weights and BPE tokenizer; with a
  learning rate of 0 the first step's loss is the HF model's loss and the weights stay put."""
  from fmjax import hf
  directory = REPO / "tests" / "golden" / "hf" / "gpt2"
  workdir = tmp_path / "gpt2"
  proc = program(env, workdir, f"--config.init_from=hf:{directory}", "--config.train.steps=1",
                 "--config.train.learning_rate=0.0", "--config.sample.num_tokens=0",
                 "--config.train.allow_nonpositive_learning_rate=true")
  check_ok(proc)
  config, params = hf.read_weights(str(directory))
  state, meta = restore(workdir, 1)
  assert meta["model"]["vocab_size"] == config.vocab_size != 67  # not the char vocabulary
  for path in (("wte", "embedding"), ("blocks", "layer_1", "mlp", "wo", "kernel")):
    a, b = state["params"], params
    for key in path:
      a, b = a[key], b[key]
    np.testing.assert_array_equal(a, b, err_msg="/".join(path))
  assert json.load(open(workdir / "tokenizer" / "fmjax_tokenizer.json"))["kind"] == "hf"
