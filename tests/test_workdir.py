"""One run per workdir, resumes that keep their word, and logs a file can hold.

- The workdir lock (fmjax/workdir.py): while this process trains in a workdir, the GPT
  program started on it exits 2 at once with one line naming this process, touching
  nothing, and the training here finishes intact; a lock file left by a killed process
  blocks nothing; the lock is re-entrant within a process.
- A run refused before training leaves no new workdir (train/common.holds_workdir).
- Resuming with another tokenizer setting is refused by name, config.json untouched
  (train/common.refuse_changed_settings and each program's tokenizer_settings).
- Logs: with stderr not a terminal, one plain line per logged row and no carriage return;
  the steps that compiled are left out of tokens_per_second and logged on their own.
- train/common.report names only the folders that exist.
"""

import io
import json
import logging
import os
import pathlib
import re
import subprocess
import sys
import time
import types

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # configs/ and train/ (run in-process below)

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs.common import base_config  # noqa: E402
from fmjax import metrics, trainer  # noqa: E402
from fmjax import workdir as fworkdir  # noqa: E402



def snapshot(directory, skip=None):
  """{relative path: (size, mtime_ns)} of everything under `directory` (but `skip`)."""
  out = {}
  for root, dirs, files in os.walk(directory):
    dirs[:] = [d for d in dirs if d != skip]
    for name in dirs + files:
      path = os.path.join(root, name)
      st = os.stat(path)
      out[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns)
  return out


@pytest.fixture(scope="module", autouse=True)
def _known_peak_flops():
  """fit measures the CPU's matmul peak once per cache dir; not needed in-process."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(metrics, "peak_flops_per_device", lambda device=None, **_: (1e13, "test"))
    yield


# ------------------------------------------------------------------------------ two runs, one workdir


class Data:
  """y = x . w; the batch also carries a `pad` array the loss ignores, one column wide until
  step `widen` and two from then on: a second batch shape, compiled on its own (a length
  bucket). `hook(step)` runs as the batch of that step is read."""

  def __init__(self, widen=1000, hook=None):
    self.step, self.widen, self.hook = 0, widen, hook

  def batch_at(self, step):
    rng = np.random.default_rng(step)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    return {"x": x, "y": (x @ np.float32([1, -2, 3, 0.5]))[:, None],
            "pad": np.zeros((8, 1 if step + 1 < self.widen else 2), np.float32)}

  def __next__(self):
    if self.hook is not None:
      self.hook(self.step + 1)
    batch = self.batch_at(self.step)
    self.step += 1
    return batch

  def get_state(self):
    return {"step": self.step}

  def set_state(self, state):
    self.step = state["step"]


def regression(data, trace_s=0.0):
  """A one-layer regression Task; each compile of its train step sleeps `trace_s` seconds."""
  model = nn.Dense(1)

  def loss_fn(params, batch, rng, train):
    del rng, train
    time.sleep(trace_s)  # Python runs while tracing only: once per compiled batch shape
    return jnp.mean((model.apply({"params": params}, batch["x"]) - batch["y"]) ** 2), {}
  return trainer.Task(model=model, model_config={"features": 1}, loss_fn=loss_fn,
                      train_data=data, eval_data=None, example_batch=data.batch_at(0),
                      init_args=lambda b: (b["x"],), flops_per_example=1.0,
                      tokens_per_example=1)


def fit_config(**train):
  config = base_config()
  config.mesh.data = -1
  t = config.train
  t.steps, t.batch_size, t.learning_rate, t.warmup_steps, t.decay = 8, 8, 0.1, 0, "constant"
  t.log_every, t.eval_every, t.save_every = 2, 1000, 4
  t.update(train)
  return config


def test_a_second_run_on_a_busy_workdir_is_refused_at_once(env, tmp_path):
  """This process trains in `workdir`; at step 3 the GPT program is started on it too. It
  exits 2 with one line naming this process, having touched nothing, and this run
  finishes intact."""
  workdir = tmp_path / "wd"
  second = {}

  def start_the_second(step):
    if step != 3:
      return
    # tensorboardX flushes from a thread of its own: everything else stands still meanwhile
    second["before"] = snapshot(workdir, skip="tensorboard")
    began = time.monotonic()
    second["proc"] = subprocess.run(
        [sys.executable, "-m", "train.pretrain_gpt", "--config=configs/gpt.py:tiny",
         f"--workdir={workdir}"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300)
    second["seconds"] = time.monotonic() - began
    second["after"] = snapshot(workdir, skip="tensorboard")
  trainer.fit(fit_config(), str(workdir), regression(Data(hook=start_the_second)))

  proc = second["proc"]
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  with open("/proc/self/cmdline", "rb") as f:
    command = " ".join(a.decode() for a in f.read().split(b"\0") if a)
  assert re.fullmatch(
      rf"error: workdir {re.escape(str(workdir))} is in use by process {os.getpid()} "
      rf"\(started \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d \w*, command {re.escape(command)}\); "
      r"wait for it to finish or pass another --workdir", lines[0]), lines[0]
  assert second["after"] == second["before"]  # not a byte written, config.json included
  assert second["seconds"] < 120  # no data, tokenizer or compile work before refusing
  # This run went on as if alone: every row once, in order; its checkpoints; the lock released.
  rows = metrics.read_metrics(str(workdir / "metrics.jsonl"))
  assert [r["step"] for r in rows] == [2, 4, 6, 8]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "8"]
  assert not (workdir / ".lock").exists()


def test_resuming_with_another_tokenizer_is_refused_and_config_json_kept(env, tmp_path):
  """A char-tokenizer GPT workdir (its config.json), resumed with data.tokenizer=byte."""
  from configs import gpt as gpt_configs
  workdir = tmp_path / "wd"
  workdir.mkdir()
  (workdir / "config.json").write_text(gpt_configs.get_config("tiny").to_json_best_effort())
  saved = (workdir / "config.json").read_bytes()
  assert json.loads(saved)["data"]["tokenizer"] == "char"
  before = snapshot(workdir)
  proc = subprocess.run(
      [sys.executable, "-m", "train.pretrain_gpt", "--config=configs/gpt.py:tiny",
       f"--workdir={workdir}", "--config.data.tokenizer=byte"], cwd=REPO, env=env,
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines() == [
      f"error: --config.data.tokenizer='byte': the run in {workdir} was made with "
      "data.tokenizer='char' (its config.json), and resuming it keeps the tokenizer and "
      "checkpoints it saved; set it back to 'char' (drop the override) to resume, or pass a "
      "new --workdir to start a run with 'byte'"]
  assert (workdir / "config.json").read_bytes() == saved
  assert snapshot(workdir) == before


@pytest.mark.parametrize("saved, new, refused", [
    ({}, {}, None),
    ({}, {"data.vocab_size": 100}, None),  # a char tokenizer has no vocab_size setting
    ({}, {"data.tokenizer": "byte"}, "data.tokenizer"),
    ({}, {"data.tokenizer_path": "spm.model"}, "data.tokenizer_path"),
    ({}, {"init_from": "hf:gpt2"}, "init_from"),
    ({"data.tokenizer": "sentencepiece"}, {"data.tokenizer": "sentencepiece"}, None),
    ({"data.tokenizer": "sentencepiece"},
     {"data.tokenizer": "sentencepiece", "data.vocab_size": 4096}, "data.vocab_size"),
    ({"init_from": "hf:gpt2"}, {"init_from": "hf:gpt2", "data.tokenizer": "byte"}, None),
])
def test_which_gpt_settings_a_resume_refuses(saved, new, refused, tmp_path):
  from configs import gpt as gpt_configs
  from train import common, pretrain_gpt

  def config_with(changes):
    config = gpt_configs.get_config("tiny")
    for key, value in changes.items():
      node, leaf = config, key.split(".")
      for part in leaf[:-1]:
        node = node[part]
      node[leaf[-1]] = value
    return config
  (tmp_path / "config.json").write_text(config_with(saved).to_json_best_effort())
  check = lambda: common.refuse_changed_settings(config_with(new), str(tmp_path),
                                                 pretrain_gpt.tokenizer_settings)
  if refused is None:
    check()
  else:
    with pytest.raises(ValueError, match=rf"^--config\.{re.escape(refused)}="):
      check()


# ------------------------------------------------------------------------------ refused runs


def test_a_refused_run_leaves_no_new_workdir(monkeypatch, tmp_path):
  """Refused after it saved its tokenizer: the directories it made go, with what is in them;
  a workdir that existed stays."""
  from configs import gpt as gpt_configs
  from train import pretrain_gpt
  monkeypatch.chdir(REPO)
  config = gpt_configs.get_config("tiny")
  config.data.seq_len = 128  # > model.max_len 64: refused once the tokenizer is built
  for workdir in (tmp_path / "new" / "wd", tmp_path):
    with pytest.raises(ValueError, match="config.data.seq_len=128 exceeds"):
      pretrain_gpt.run(config, str(workdir))
  assert not (tmp_path / "new").exists()
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".lock")]


def test_a_lock_of_a_killed_process_blocks_nothing(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import fcntl, json, os, sys, time\n"
       f"fd = os.open({str(tmp_path / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
       "fcntl.flock(fd, fcntl.LOCK_EX)\n"
       "os.write(fd, json.dumps({'pid': os.getpid(), 'started': 'then', 'command': 'x'})"
       ".encode())\n"
       "print('locked', flush=True)\ntime.sleep(600)\n"], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "locked\n"
    with pytest.raises(fworkdir.WorkdirInUse) as e:
      with fworkdir.hold(str(tmp_path)):
        pass
    assert str(e.value) == (f"workdir {tmp_path} is in use by process {holder.pid} (started "
                            "then, command x); wait for it to finish or use another workdir")
    from configs import gpt
    from train import common  # outside a program's run, prepare_workdir checks it too
    with pytest.raises(fworkdir.WorkdirInUse, match=r"x\); wait for it to finish or pass "
                       "another --workdir$"):
      common.prepare_workdir(gpt.get_config("tiny"), str(tmp_path))
  finally:
    holder.kill()
    holder.wait()
  assert (tmp_path / ".lock").exists()  # stale, as kill -9 leaves it
  with fworkdir.hold(str(tmp_path)) as lock:
    with fworkdir.hold(str(tmp_path)) as again:  # re-entrant: fit inside a program's run
      assert again is lock and fworkdir.held(str(tmp_path)) is lock
      fworkdir.check_free(str(tmp_path))
    record = json.loads((tmp_path / ".lock").read_text())
    assert record["pid"] == os.getpid() and record["command"]
  assert fworkdir.held(str(tmp_path)) is None and not (tmp_path / ".lock").exists()


# ------------------------------------------------------------------------------ logs


TRACE_S = 1.5  # each compile of the train step takes at least this (a sleep while tracing)


def test_throughput_leaves_out_the_steps_that_compiled_and_the_log_is_plain(
    monkeypatch, caplog, tmp_path):
  """Steps 1 and 6 compile (a new batch shape each), for at least TRACE_S seconds: logged on
  their own and left out of tokens_per_second. stderr is not a terminal: one plain line per
  logged row, no tqdm bar."""
  stderr = io.StringIO()  # not a terminal, wherever pytest's own output goes
  monkeypatch.setattr(sys, "stderr", stderr)
  caplog.set_level(logging.INFO, logger="fmjax")
  config = fit_config(log_every=4, save_every=1000)
  trainer.fit(config, str(tmp_path), regression(Data(widen=6), trace_s=TRACE_S))

  messages = [r.getMessage() for r in caplog.records]
  compiles = [re.fullmatch(r"compiled the train step for batch shape (.*) in ([0-9.]+) s \(step "
                           r"(\d+); left out of tokens_per_second and mfu\)", m) for m in messages]
  compiles = [(c.group(1), float(c.group(2)), int(c.group(3))) for c in compiles if c]
  assert [(shape, step) for shape, _, step in compiles] == [("(8, 1), (8, 4)", 1),
                                                            ("(8, 2), (8, 4), (8, 1)", 6)]
  assert all(seconds >= TRACE_S for _, seconds, _ in compiles)
  rows = metrics.read_metrics(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in rows] == [4, 8]
  for row in rows:  # 3 timed steps each (2-4; 5, 7, 8): milliseconds, never a compile's seconds
    window_s = 3 * config.train.batch_size / row["tokens_per_second"]
    assert window_s < TRACE_S / 2, (row, window_s)
  lines = [m for m in messages if m.startswith("step ")]
  assert [int(re.match(r"step (\d+)/8: loss [0-9.e+-]+, [0-9.e+]+ tokens/s, mfu ", m).group(1))
          for m in lines] == [4, 8]
  assert "\r" not in stderr.getvalue() and "train:" not in stderr.getvalue()


def test_progress_line():
  row = {"train/loss": 2.34567, "eval/loss": 2.4, "eval/accuracy": 0.3125, "grad_norm": 1.0,
         "tokens_per_second": 12345.6, "mfu": 0.0123}
  assert trainer.progress_line(20, 100, row, 12.34) == (
      "step 20/100: loss 2.346, eval/loss 2.4, eval/accuracy 0.3125, 1.235e+04 tokens/s, "
      "mfu 0.0123, 12.3 s elapsed")
  # jax.device_get's 0-d arrays; a row whose only step compiled has no throughput
  assert trainer.progress_line(1, 8, {"train/loss": np.asarray(np.float32(4.1949854))}, 0.5) == (
      "step 1/8: loss 4.195, 0.5 s elapsed")


def test_a_terminal_keeps_the_tqdm_bar(monkeypatch):
  class Terminal(io.StringIO):
    def isatty(self):
      return True
  monkeypatch.setattr(sys, "stderr", Terminal())
  progress = trainer.Progress(20, 0)
  assert not progress.bar.disable and not progress.lines
  assert trainer.Progress(20, 0, enabled=False).bar.disable  # process 1 of 2: nothing
  monkeypatch.setattr(sys, "stderr", io.StringIO())
  # a process that merely imported ipykernel (a notebook-running test before this one) is no
  # notebook; one whose IPython shell has a kernel is
  monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
  progress = trainer.Progress(20, 0)
  assert progress.bar.disable and progress.lines
  ipython = types.ModuleType("IPython")
  ipython.get_ipython = lambda: types.SimpleNamespace(kernel=object())
  monkeypatch.setitem(sys.modules, "IPython", ipython)
  progress = trainer.Progress(20, 0)
  assert not progress.bar.disable and not progress.lines


def test_report_names_only_the_folders_that_exist(tmp_path, capsys):
  from train import common
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "metrics.jsonl").write_text("")
  common.report(str(tmp_path), {"eval/accuracy": 0.5})
  out = capsys.readouterr().out
  assert out.splitlines()[1:] == [
      "final: eval/accuracy=0.5", f"workdir: {tmp_path}",
      f"  metrics:     {tmp_path / 'metrics.jsonl'} (and loss_curve.png)",
      f"  checkpoints: {tmp_path / 'checkpoints'}"]


def test_each_process_of_a_run_locks_its_own_file_and_only_process_0_removes(monkeypatch,
                                                                           tmp_path):
  monkeypatch.setattr(fworkdir, "_process_index", lambda: 1)
  with pytest.raises(RuntimeError):
    with fworkdir.hold(str(tmp_path / "new")):
      assert os.listdir(tmp_path / "new") == [".lock.1"]
      raise RuntimeError("refused before training")
  assert os.listdir(tmp_path / "new") == []  # process 0 removes a refused run's new workdir


def test_an_impossible_mfu_measures_the_peak_again(monkeypatch, tmp_path):
  """A CPU peak cached while the cores were shared reads low and would give MFU > 1: the
  trainer measures it again, once, and logs the true fraction."""
  calls = []

  def peak(device=None, remeasure=False, **_):
    calls.append(remeasure)
    return (1e12 if remeasure else 1e-3), "test"
  monkeypatch.setattr(metrics, "peak_flops_per_device", peak)
  trainer.fit(fit_config(log_every=4, save_every=1000), str(tmp_path), regression(Data()))
  rows = metrics.read_metrics(str(tmp_path / "metrics.jsonl"))
  assert calls == [False, True]
  assert [r["step"] for r in rows] == [4, 8] and all(0 < r["mfu"] < 1e-6 for r in rows), rows
