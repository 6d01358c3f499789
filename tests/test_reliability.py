"""Reliability: SIGTERM/SIGINT, kill -9 at set points, non-finite steps, bad inputs.

Three kinds of proof:
  - `fit` in this process on a one-layer regression task (synthetic data whose batch k can
    hold a NaN or send this process a signal): the exact semantics, numbers pinned.
  - the GPT program (configs/gpt.py:tiny, save_every=1) as real subprocesses: SIGTERM, then
    kill -9 before a save, inside one (orbax's temporary directory left), between its commit
    and its checksums (fmjax/checkpoint.py's FMJAX_TEST_KILL_AT hook) and at a random moment
    of the launch, each asserted, then a rerun: metrics.jsonl and the final state
    equal an uninterrupted run's, loss for loss (CPU float32 is deterministic).
  - bad inputs, each one `error:` line naming what and where, exit code 2, checkpoints
    untouched. Bad inputs tested elsewhere: tests/test_pretrain_gpt.py (missing, empty,
    non-UTF-8 corpus; config typo; wrong type; mesh size; another model's checkpoint;
    missing config file; unwritable workdir), tests/test_pretrain_bert.py (a one-document
    corpus), tests/test_finetune.py and tests/test_finetune_data.py (ragged TSV row, bad
    JSON line, unknown label, a head of another size), tests/test_hf.py (a missing Hugging
    Face tensor), tests/test_sharding.py (a parameter that does not divide over the mesh).
"""

import errno
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # configs/ and train/ (the programs run in-process below)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs.common import base_config  # noqa: E402
from fmjax import checkpoint, metrics, trainer  # noqa: E402

TIMINGS = ("tokens_per_second", "mfu")
GPT = ("--config=configs/gpt.py:tiny", "--config.train.save_every=1",
       "--config.sample.num_tokens=0")


# ------------------------------------------------------------------------------ helpers


def read_rows(workdir):
  return metrics.read_metrics(os.path.join(workdir, "metrics.jsonl"))


def without_timings(rows):
  return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


def checkpoint_steps(workdir):
  return sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit())


def snapshot(directory):
  """{relative path: (size, mtime_ns, bytes)} of everything under `directory`."""
  out = {}
  for root, dirs, files in os.walk(directory):
    for name in dirs + files:
      path = os.path.join(root, name)
      st = os.stat(path)
      content = pathlib.Path(path).read_bytes() if name in files else None
      out[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns, content)
  return out


def restore(workdir, step):
  """(state as a tree of numpy arrays, meta) of checkpoint `step`, read-only."""
  import orbax.checkpoint as ocp
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                  item_names=("state", "meta"))
  out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                      meta=ocp.args.JsonRestore()))
  manager.close()
  return jax.tree_util.tree_map(np.asarray, out["state"]), out["meta"]


def read_meta(workdir, step):
  import orbax.checkpoint as ocp
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                  item_names=("state", "meta"))
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  manager.close()
  return meta


def assert_trees_equal(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


# ------------------------------------------------------------------------------ fit in-process


class Data:
  """Batches of y = x . w; batch k (for step k+1) is random with seed k. `nan_steps` put a NaN
  in x; `signals` maps a step to the signals this process receives when its batch is read."""

  def __init__(self, nan_steps=(), signals=None, skip=()):
    self.step, self.nan_steps, self.signals = 0, set(nan_steps), dict(signals or {})
    self.order = [k for k in range(100) if k + 1 not in set(skip)]  # batches to leave out

  def batch_at(self, step):
    k = self.order[step]
    rng = np.random.default_rng(k)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    y = (x @ np.float32([1, -2, 3, 0.5]))[:, None]
    if k + 1 in self.nan_steps:
      x[0, 0] = np.nan
    return {"x": x, "y": y}

  def __next__(self):
    for signum in self.signals.get(self.step + 1, ()):
      os.kill(os.getpid(), signum)  # the handler runs now, in this (main) thread
      # ... once Python gets to it: a signal landing on another thread only flags it, and a
      # second one flagged before the handler ran would be the same one.
      time.sleep(0.05)
    batch = self.batch_at(self.step)
    self.step += 1
    return batch

  def get_state(self):
    return {"step": self.step}

  def set_state(self, state):
    self.step = state["step"]


def regression_task(data):
  model = nn.Dense(1)

  def loss_fn(params, batch, rng, train):
    del rng, train
    error = model.apply({"params": params}, batch["x"]) - batch["y"]
    return jnp.mean(error ** 2), {}
  return trainer.Task(model=model, model_config={"features": 1}, loss_fn=loss_fn,
                      train_data=data, eval_data=None, example_batch=data.batch_at(0),
                      init_args=lambda b: (b["x"],), flops_per_example=1.0,
                      tokens_per_example=1)


def fit_config(**train):
  config = base_config()
  config.mesh.data = -1
  t = config.train
  t.steps, t.batch_size, t.learning_rate, t.warmup_steps, t.decay = 8, 8, 0.1, 0, "constant"
  t.log_every, t.eval_every, t.save_every, t.keep_checkpoints = 4, 1000, 1, 100
  t.update(train)
  return config


@pytest.fixture(scope="module", autouse=True)
def _known_peak_flops():
  """fit measures the CPU's matmul peak once per cache dir; not needed here."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(metrics, "peak_flops_per_device", lambda device=None, **_: (1e13, "test"))
    yield


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("fit") / "straight"
  state, _ = trainer.fit(fit_config(), str(workdir), regression_task(Data()))
  return workdir, jax.device_get(state)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_step_saves_and_resuming_equals_uninterrupted(
    signum, uninterrupted, tmp_path):
  before = signal.getsignal(signum)
  workdir = tmp_path / "run"
  with pytest.raises(trainer.Interrupted) as e:
    trainer.fit(fit_config(), str(workdir), regression_task(Data(signals={6: [signum]})))
  assert (e.value.signum, e.value.step) == (signum, 6)
  assert str(e.value) == (f"stopped by {signal.Signals(signum).name} at step 6; checkpoint "
                          f"saved in {workdir / 'checkpoints'}; rerun the same command to resume")
  assert signal.getsignal(signum) is before  # fit's handler is gone
  assert checkpoint_steps(workdir) == [1, 2, 3, 4, 5, 6]
  assert [r["step"] for r in read_rows(workdir)] == [4]  # no extra row for the stop
  state, _ = trainer.fit(fit_config(), str(workdir), regression_task(Data()))
  assert_trees_equal(jax.device_get(state), uninterrupted[1])
  assert without_timings(read_rows(workdir)) == without_timings(read_rows(uninterrupted[0]))


def test_a_second_signal_exits_at_once_without_saving(tmp_path):
  workdir = tmp_path / "run"
  with pytest.raises(KeyboardInterrupt) as e:  # Ctrl-C twice: Python's own KeyboardInterrupt
    trainer.fit(fit_config(), str(workdir),
                regression_task(Data(signals={6: [signal.SIGINT, signal.SIGINT]})))
  assert not isinstance(e.value, trainer.Interrupted)
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  for _ in range(100):  # the step-5 save may still be committing in the background
    if 5 in checkpoint_steps(workdir):
      break
    time.sleep(0.1)
  assert checkpoint_steps(workdir) == [1, 2, 3, 4, 5]  # step 6 never ran


def test_a_nan_step_stops_naming_it_and_the_last_good_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  with pytest.raises(trainer.NonFiniteError) as e:
    trainer.fit(fit_config(), str(workdir), regression_task(Data(nan_steps=[3])))
  assert str(e.value) == (
      "non-finite training step 3 (train/loss=nan, grad_norm=nan, learning_rate=0.1): stopped, "
      f"and nothing after step 2 was saved; the last good checkpoint is {workdir}/checkpoints/2 "
      "(step 2), where rerunning resumes. Lower train.learning_rate, raise train.warmup_steps, "
      "set train.grad_clip, or set train.skip_nonfinite=True to skip such steps")
  assert checkpoint_steps(workdir) == [1, 2]


def test_a_nan_between_logs_and_saves_is_caught_before_the_next_save(tmp_path):
  """save_every=4, log_every=4: step 2's NaN is read at step 4, which is then not saved."""
  workdir = tmp_path / "run"
  with pytest.raises(trainer.NonFiniteError, match=r"step 2 .*no checkpoint was saved yet"):
    trainer.fit(fit_config(save_every=4), str(workdir), regression_task(Data(nan_steps=[2])))
  assert checkpoint_steps(workdir) == []


def test_skip_nonfinite_leaves_the_state_and_equals_training_without_those_batches(tmp_path):
  workdir = tmp_path / "skip"
  state, last = trainer.fit(fit_config(skip_nonfinite=True), str(workdir),
                            regression_task(Data(nan_steps=[3, 6])))
  assert [(r["step"], r["skipped_steps"]) for r in read_rows(workdir)] == [(4, 1), (8, 2)]
  assert last["skipped_steps"] == 2
  two, three = restore(workdir, 2)[0], restore(workdir, 3)[0]
  assert_trees_equal(three, two)  # the skipped step changed nothing, step count included
  final, meta = restore(workdir, 8)
  assert int(final["step"]) == 6 and meta["skipped_steps"] == 2
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(final))
  # The same 6 updates as a run that never saw batches 3 and 6 (constant learning rate).
  clean, _ = trainer.fit(fit_config(steps=6), str(tmp_path / "clean"),
                         regression_task(Data(skip=[3, 6])))
  assert_trees_equal(jax.device_get(state), jax.device_get(clean))


def test_skipping_gives_up_when_nothing_is_finite(tmp_path):
  workdir = tmp_path / "run"
  with pytest.raises(trainer.NonFiniteError, match=r"the last 10 steps \(to step 12\) were all "
                                                  r"non-finite.*not recovering"):
    trainer.fit(fit_config(skip_nonfinite=True, steps=20), str(workdir),
                regression_task(Data(nan_steps=range(3, 21))))
  assert checkpoint_steps(workdir)[-1] == 11  # the skipped steps' (unchanged) states


def test_batch_that_does_not_split_over_the_mesh_is_refused_before_any_work(tmp_path):
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=r"batch_size=8 does not split evenly in 3 "
                                       r"micro-batches over the \d+ batch shards"):
    trainer.fit(fit_config(accum_steps=3), str(workdir), regression_task(Data()))
  assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")
  mesh = jax.sharding.AbstractMesh((3, 1, 1), ("data", "fsdp", "tensor"))
  with pytest.raises(ValueError, match=r"batch_size=8 does not split evenly over the 3 batch "
                                       r"shards of the mesh .*use a multiple of 3"):
    trainer.check_batch_size(8, 1, mesh)


def test_a_save_cut_short_is_ignored_and_removed(uninterrupted, tmp_path):
  """What kill -9 during a save leaves (orbax's temporary directory) is not a checkpoint."""
  directory = tmp_path / "checkpoints"
  shutil.copytree(uninterrupted[0] / "checkpoints", directory)
  (directory / "9.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
  (directory / "9.orbax-checkpoint-tmp" / "state" / "_METADATA").write_text('{"tree_meta')
  ckpt = checkpoint.Checkpointer(str(directory), save_every=1)
  assert ckpt.latest_step() == 8
  assert "9.orbax-checkpoint-tmp" in os.listdir(directory)  # a reader leaves it (a live save?)
  ckpt.remove_unfinished()  # the writer, fit, removes it before training
  ckpt.close()
  assert sorted(os.listdir(directory)) == [str(s) for s in range(1, 9)]


def test_metrics_writer_drops_a_cut_short_last_row_and_rewrites_atomically(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 5, "train/loss": 1.5}\n{"step": 10, "train/loss": 1.25}\n{"step": 1')
  assert metrics.read_metrics(str(path)) == [{"step": 5, "train/loss": 1.5},
                                             {"step": 10, "train/loss": 1.25}]
  writer = metrics.MetricsWriter(str(tmp_path), resume_step=5)
  writer.close()
  assert path.read_text() == '{"step": 5, "train/loss": 1.5}\n'
  assert sorted(os.listdir(tmp_path)) == ["loss_curve.png", "metrics.jsonl", "tensorboard"]
  path.write_text('{"step": 5}\nnot json\n{"step": 10}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON metrics row \('not json'\)"):
    metrics.read_metrics(str(path))


# ------------------------------------------------------------------------------ the GPT program


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "FMJAX_DEBUG")}
  env["JAX_PLATFORMS"] = "cpu"
  env["FMJAX_CPU_DEVICES"] = "1"
  cache = tmp_path_factory.mktemp("cache")
  env["XDG_CACHE_HOME"] = str(cache)
  env["JAX_COMPILATION_CACHE_DIR"] = str(cache / "jax")
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  return env


class Program:
  """`python -m train.pretrain_gpt` running in the background; stderr collected by a thread,
  `training` set once fit has logged the model (the first step compiles next)."""

  def __init__(self, env, workdir, *overrides, module="train.pretrain_gpt", prefix=(),
               env_extra=None):
    cmd = [sys.executable, *prefix, *(["-m", module] if not prefix else []),
           *GPT, f"--workdir={workdir}", *overrides]
    self.began = time.monotonic()
    self.proc = subprocess.Popen(cmd, cwd=REPO, env={**env, **(env_extra or {})}, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
    self.lines, self.training = [], threading.Event()
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.proc.stderr:
      self.lines.append(line)
      if " model: " in line:
        self.training.set()

  def wait(self, timeout=600):
    self.proc.wait(timeout)
    self._reader.join(timeout)
    return self.proc.returncode

  @property
  def stderr(self):
    return "".join(self.lines)

  def error_line(self):
    """The program's one `error:` line (asserting there is exactly one, and no traceback)."""
    assert "Traceback" not in self.stderr, self.stderr[-3000:]
    errors = [line for line in self.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and self.stderr.rstrip().endswith(errors[0]), self.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
  """The uninterrupted tiny run with a checkpoint every step: (workdir, seconds from the
  `model:` line to the end, seconds in all)."""
  workdir = tmp_path_factory.mktemp("gpt") / "straight"
  run = Program(env, workdir)
  run.training.wait(600)
  started = time.monotonic()
  assert run.wait() == 0, run.stderr[-3000:]
  assert checkpoint_steps(workdir) == [18, 19, 20]
  return workdir, time.monotonic() - started, time.monotonic() - run.began


@pytest.mark.slow
def test_sigterm_then_kill_9_in_and_around_saves_resume_to_the_uninterrupted_run(
    reference, env, tmp_path):
  workdir = tmp_path / "run"
  straight, training_s, total_s = reference
  # SIGTERM (preemption) early in training: exit 143 once the checkpoint of that step is saved.
  run = Program(env, workdir)
  run.training.wait(600)
  time.sleep(0.3 * training_s)
  run.proc.send_signal(signal.SIGTERM)
  assert run.wait() == 128 + signal.SIGTERM, run.stderr[-3000:]
  last = run.stderr.strip().splitlines()[-1]
  stopped = int(last.split(" at step ")[1].split(";")[0])
  assert last == (f"stopped by SIGTERM at step {stopped}; checkpoint saved in "
                  f"{workdir / 'checkpoints'}; rerun the same command to resume")
  assert checkpoint_steps(workdir)[-1] == stopped <= 14  # room for the kills below, at +2..+6
  # kill -9 at set points of the checkpoint writer (its test hook, fmjax/checkpoint.py) ...
  for point, step, left in (("before_save", stopped + 2, stopped + 1),
                            ("in_save", stopped + 4, stopped + 3),
                            ("before_checksums", stopped + 6, stopped + 6)):
    run = Program(env, workdir, env_extra={"FMJAX_TEST_KILL_AT": f"{point}@{step}"})
    assert run.wait() == -signal.SIGKILL, run.stderr[-3000:]
    assert checkpoint_steps(workdir)[-1] == left, (point, os.listdir(workdir / "checkpoints"))
    names = os.listdir(workdir / "checkpoints")
    if point == "in_save":  # orbax's temporary directory of the save cut short
      assert any(n.startswith(f"{step}.orbax-checkpoint-tmp") for n in names), names
    if point == "before_checksums":  # committed, without checksums: restored unverified
      assert not (workdir / "checkpoints" / str(step) / checkpoint.CHECKSUMS).exists()
  # ... and at a random moment of the launch (startup, data, tokenizer; seeded).
  run = Program(env, workdir)
  time.sleep(random.Random(0).uniform(0.2, 0.9) * (total_s - training_s))
  run.proc.kill()
  run.wait()
  final = Program(env, workdir)
  assert final.wait() == 0, final.stderr[-3000:]
  assert without_timings(read_rows(workdir)) == without_timings(read_rows(straight))
  assert_trees_equal(restore(workdir, 20), restore(straight, 20))
  assert not [n for n in os.listdir(workdir / "checkpoints") if not n.isdigit()]


@pytest.mark.slow
def test_all_processes_stop_at_the_same_step_when_one_is_signalled(env, tmp_path):
  """2 processes x 1 CPU device (jax.distributed, gloo); SIGTERM reaches process 1 only."""
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  workdir = tmp_path / "run"
  runs = [Program(env, workdir, "--config.train.steps=200", "--config.train.save_every=50",
                  "--config.mesh.data=2", f"--coordinator_address=localhost:{port}",
                  "--num_processes=2", f"--process_id={i}") for i in range(2)]
  runs[1].training.wait(600)
  time.sleep(2)
  runs[1].proc.send_signal(signal.SIGTERM)
  assert [run.wait() for run in runs] == [128 + signal.SIGTERM] * 2, runs[0].stderr[-2000:]
  last = [run.stderr.strip().splitlines()[-1] for run in runs]
  step = int(last[1].split(" at step ")[1].split(";")[0])
  assert last == [f"stopped by {by} at step {step}; checkpoint saved in {workdir / 'checkpoints'}; "
                  "rerun the same command to resume" for by in ("another process's signal",
                                                                 "SIGTERM")]
  assert checkpoint_steps(workdir) == [step]
  assert read_meta(workdir, step)["data"] == {"step": step}


@pytest.fixture
def finished(reference, tmp_path):
  """A copy of the reference workdir (step 20, checkpoints 18-20)."""
  workdir = tmp_path / "copy"
  shutil.copytree(reference[0], workdir)
  return workdir


@pytest.mark.slow
def test_truncated_checkpoint_is_one_error_line_and_nothing_changes(finished, env):
  # without its checksums, as saved by an earlier fmjax (with them: tests/test_integrity.py)
  (finished / "checkpoints" / "20" / checkpoint.CHECKSUMS).unlink()
  data = finished / "checkpoints" / "20" / "state" / "ocdbt.process_0" / "d"
  biggest = max(data.iterdir(), key=lambda p: p.stat().st_size)
  os.truncate(biggest, biggest.stat().st_size // 2)
  before = snapshot(finished / "checkpoints")
  run = Program(env, finished)
  assert run.wait() == 2
  where = finished / "checkpoints" / "20"
  assert run.error_line().startswith(
      f"error: checkpoint {where} cannot be read (state: ")
  assert run.error_line().endswith(
      f"its files are incomplete or damaged. Move it aside (mv {where} {where}.damaged) to "
      "resume from step 19, the previous one, or use a new workdir. Nothing was changed.")
  assert snapshot(finished / "checkpoints") == before


def test_corrupted_checkpoint_meta_is_refused_by_name(finished):
  (finished / "checkpoints" / "20" / "meta" / "metadata").write_text('{"model": {"num_la')
  ckpt = checkpoint.Checkpointer(str(finished / "checkpoints"), save_every=1)
  with pytest.raises(checkpoint.CheckpointReadError,
                     match=r"checkpoint .*/checkpoints/20 cannot be read \(meta: JSONDecodeError: "
                           r"Unterminated string.*resume from step 19"):
    ckpt.check_compatible({})
  ckpt.close()


DISK_FULL = """
import errno, os, runpy, sys
from etils import epath
cls = type(epath.Path("/"))
write_text = cls.write_text
def full(self, *args, **kwargs):  # the disk fills up while step 21's meta is written
  if str(self).endswith("21.orbax-checkpoint-tmp/meta.orbax-checkpoint-tmp/metadata"):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
  return write_text(self, *args, **kwargs)
cls.write_text = full
sys.path.insert(0, os.getcwd())
sys.argv[0] = "train/pretrain_gpt.py"
runpy.run_module("train.pretrain_gpt", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_disk_full_during_a_save_keeps_the_earlier_checkpoints(finished, env):
  before = snapshot(finished / "checkpoints")
  run = Program(env, finished, "--config.train.steps=22", prefix=("-c", DISK_FULL))
  assert run.wait() == 2
  where = finished / "checkpoints"
  assert run.error_line() == (
      f"error: saving checkpoint step 21 in {where} failed (OSError: [Errno 28] No space left "
      f"on device: '{where}/21.orbax-checkpoint-tmp/meta.orbax-checkpoint-tmp/metadata'); its "
      "unfinished files were removed, and the checkpoints kept are steps [18, 19, 20]. Free "
      "space (or fix the cause) and rerun the same command to resume from step 20")
  assert snapshot(where) == before


@pytest.mark.slow
def test_nan_in_the_program_is_one_error_line_naming_the_good_checkpoint(finished, env):
  before = snapshot(finished / "checkpoints")
  run = Program(env, finished, "--config.train.steps=22", "--config.train.learning_rate=1e30")
  assert run.wait() == 2
  line = run.error_line()
  assert line.startswith("error: non-finite training step 21 (train/loss=")
  assert (f"nothing after step 20 was saved; the last good checkpoint is "
          f"{finished}/checkpoints/20 (step 20), where rerunning resumes") in line
  assert snapshot(finished / "checkpoints") == before


# ------------------------------------------------------------------------------ bad inputs, in-process


def gpt_config(**changes):
  from configs import gpt as gpt_configs
  config = gpt_configs.get_config("tiny")
  for key, value in changes.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.mark.parametrize("case", ["over_long_sequence", "vocabulary_mismatch",
                                  "finetune_from_a_gpt"])
def test_bad_input_before_any_jax_work(case, finished, monkeypatch, tmp_path):
  """Errors raised before training: one line each (train/common.py prints str(e))."""
  monkeypatch.chdir(REPO)
  before = snapshot(finished / "checkpoints")
  if case == "finetune_from_a_gpt":
    from configs import finetune as finetune_configs
    from train import finetune
    config = finetune_configs.get_config("tiny")
    config.init_from = str(finished)
    run, workdir = finetune.run, tmp_path / "finetune"
    expected = (f"init_from='{finished}' holds a checkpoint of a model that is not a "
                "BertConfig (missing [")
  else:
    from train import pretrain_gpt
    run, workdir = pretrain_gpt.run, finished
    config, expected = {
        "over_long_sequence": (gpt_config(**{"data.seq_len": 128}),
                               "config.data.seq_len=128 exceeds config.model.max_len=64; lower "
                               "one or raise the other"),
        "vocabulary_mismatch": (gpt_config(**{"model.vocab_size": 10}),
                                "config.model.vocab_size=10 is smaller than the tokenizer's "
                                "vocabulary (67); use -1 to take the tokenizer's"),
    }[case]
  with pytest.raises(ValueError) as e:
    run(config, str(workdir))
  assert str(e.value).startswith(expected) and "\n" not in str(e.value)
  assert snapshot(finished / "checkpoints") == before
