"""A run that will not fit is refused before compiling; a signal before training steps flow
exits at once (issue 16, item 4).

  - the memory plan (train/common.plan_memory, in this process): a plan over budget is one
    error line with the plan, what dominates it and the settings that fit; applying those
    settings is accepted; nothing fitting names what to lower, and lowering it to the named
    value is accepted; allow_over_budget lets an over-budget plan through; an "auto"
    attention kernel is planned as the one that will run; the recipes' tiny variants fit.
  - the GPT program, as the issue ran it (seq_len 200000): exit 2, one `error:` line, in
    seconds, without allocating what the plan says it needs.
  - signals outside training steps (fmjax.trainer.ExitOnSignal): a SIGTERM or SIGINT while
    the main thread is inside a long C call exits at once with 143 / 130 and one line; the
    GPT program signalled while compiling its first step does the same, checkpoints
    untouched. (A signal once steps flow still finishes the step and saves:
    tests/test_reliability.py.)
"""

import os
import pathlib
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from configs import bert as bert_configs
from configs import gpt as gpt_configs
from fmjax import memory
from fmjax.models import bert, gpt
from fmjax.trainer import StopSignals
from train import common

REPO = pathlib.Path(__file__).resolve().parents[1]
GiB = memory.GiB


def gpt_config(**overrides):
  """configs/gpt.py:tiny with dotted overrides, e.g. {"data.seq_len": 200000}."""
  config = gpt_configs.get_config("tiny")
  for key, value in overrides.items():
    *path, leaf = key.split(".")
    node = config
    for part in path:
      node = node[part]
    node[leaf] = value
  return config


def plan_gpt(config):
  """What train/pretrain_gpt.py plans for `config` (a 65-character vocabulary)."""
  c = common.model_config(gpt.GPTConfig, config.model, types.SimpleNamespace(vocab_size=65))
  d, t = config.data, config.train
  return common.plan_memory(
      config, lambda rt: gpt.GPT(c, rt), (np.zeros((1, d.seq_len), np.int32),),
      memory.Shape(num_layers=c.num_layers, embed_dim=c.embed_dim, mlp_dim=c.mlp_dim,
                   num_heads=c.num_heads, vocab_size=c.padded_vocab_size, seq_len=d.seq_len,
                   batch_size=t.batch_size), common.runtime(config))


def refusal(config) -> str:
  with pytest.raises(ValueError) as e:
    plan_gpt(config)
  message = str(e.value)
  assert "\n" not in message
  return message


ISSUE = {"data.seq_len": 200_000, "model.max_len": 200_000}  # the issue's command
ISSUE_ON_16_GIB = (
    "memory plan: 24.2 GiB per device needed (remat 'none', accum_steps 1), over the budget "
    "of 16 GiB (--config.train.memory_budget_gb=16); the activations dominate (24 GiB). "
    "--config.train.auto_memory=true fits (8.11 GiB: remat 'none', accum_steps 4), or the "
    "same by hand: --config.train.accum_steps=4; or --config.train.allow_over_budget=true "
    "to compile anyway")


def test_the_issue_run_is_refused_with_the_plan_and_settings_that_fit():
  """tiny GPT (2 layers, D 64, F 256, Vp 128), batch 8 x 200000 tokens, on a 16 GiB budget.

  "auto" attention at 200000 x 200000 logits runs the chunked kernel (no T x T scores), so
  activations = 8 * 200000 tokens * (2 layers * (12 D + 3 F) + 12 D outside the layers)
  * 4 bytes + 1.5 logit-sized float32 buffers (8 * 200000 * 128 * 4 bytes) = 24.0 GiB; the
  12.9M parameters (the 200000 x 64 position table) add 4 copies (params, 2 AdamW moments,
  gradients): 24.2 GiB. auto_memory scans the layers (22 D + 3 F each), where 2 micro-batches
  need 16.06 GiB, just over: it accumulates 4 (8.11 GiB)."""
  message = refusal(gpt_config(**ISSUE, **{"train.memory_budget_gb": 16.0}))
  tokens = 8 * 200_000
  activations = tokens * (2 * (12 * 64 + 3 * 256) + 12 * 64) * 4 + 1.5 * tokens * 128 * 4
  assert round(activations / GiB, 1) == 24.0
  scanned_half = tokens / 2 * (2 * (22 * 64 + 3 * 256) + 12 * 64) * 4 + 1.5 * tokens / 2 * 512
  assert 16 * GiB < scanned_half + 4 * 12.9e6 * 4 < 16.2 * GiB
  assert message == ISSUE_ON_16_GIB
  # Either setting it names is accepted.
  _, accum, note = plan_gpt(gpt_config(**ISSUE, **{"train.memory_budget_gb": 16.0,
                                                   "train.accum_steps": 4}))
  assert accum == 4 and "over budget" not in note
  runtime, accum, note = plan_gpt(gpt_config(**ISSUE, **{"train.memory_budget_gb": 16.0,
                                                          "train.auto_memory": True}))
  assert (runtime.remat_policy, accum) == ("none", 4) and "over budget" not in note
  # A tighter budget: remat by hand, with scanned layers.
  message = refusal(gpt_config(**ISSUE, **{"train.memory_budget_gb": 3.0}))
  by_hand = message.split("or the same by hand: ")[1].split(";")[0].split()
  settings = dict(flag[len("--config."):].split("=") for flag in by_hand)
  assert settings["runtime.scan_layers"] == "true" and settings["runtime.remat_policy"] != "none"
  _, accum, note = plan_gpt(gpt_config(**ISSUE, **{
      "train.memory_budget_gb": 3.0, "runtime.remat_policy": settings["runtime.remat_policy"],
      "runtime.scan_layers": True, "train.accum_steps": int(settings["train.accum_steps"])}))
  assert "over budget" not in note


def test_nothing_fits_names_what_to_lower_and_by_how_much():
  # The xla kernel keeps 4 heads x T scores per token: at 200000 tokens that dominates, and
  # with a 3 GiB budget no remat or accumulation fits.
  config = gpt_config(**ISSUE, **{"train.memory_budget_gb": 3.0, "runtime.attention_impl": "xla"})
  message = refusal(config)
  assert "of them the 'xla' attention kernel's T x T scores" in message
  assert ("nothing fits at --config.train.batch_size=8 and --config.data.seq_len=200000: the "
          "smallest plan (remat 'full', accum_steps 8) needs") in message
  assert "--config.runtime.attention_impl=chunked with --config.train.auto_memory=true fits" \
      in message
  longest = int(message.split("lower --config.data.seq_len to ")[1].split()[0])
  assert 1000 < longest < 200_000
  assert "lower --config.train.batch_size" not in message  # the micro-batch is already 1
  # The length it names fits (with auto_memory), one token more does not.
  auto = {"train.memory_budget_gb": 3.0, "runtime.attention_impl": "xla",
          "train.auto_memory": True}
  plan_gpt(gpt_config(**{"data.seq_len": longest, "model.max_len": 200_000}, **auto))
  message = refusal(gpt_config(**{"data.seq_len": longest + 1, "model.max_len": 200_000}, **auto))
  assert message.startswith("memory plan: ") and "nothing fits" in message
  # Parameters alone over budget: lowering the length would not help.
  message = refusal(gpt_config(**{"train.memory_budget_gb": 0.001, "model.max_len": 200_000}))
  assert "the optimizer state dominates (98.5 MiB)" in message
  assert "the parameters, optimizer state and gradients alone need 197 MiB: shard them over " \
         "more devices (--config.mesh.fsdp) or train a smaller model" in message


def test_allow_over_budget_lets_the_plan_through_and_says_so():
  over = {**ISSUE, "train.memory_budget_gb": 2.0, "train.allow_over_budget": True}
  runtime, accum, note = plan_gpt(gpt_config(**over))
  assert (runtime.remat_policy, accum) == ("none", 1)
  assert note.endswith(" of a 2 GiB budget -- over budget; compiling anyway "
                       "(train.allow_over_budget)")
  # auto_memory with nothing fitting: the smallest plan, instead of the error.
  runtime, accum, note = plan_gpt(gpt_config(**over, **{"train.auto_memory": True,
                                                          "runtime.attention_impl": "xla"}))
  assert (runtime.remat_policy, runtime.scan_layers, accum) == ("full", True, 8)
  assert "over budget; compiling anyway" in note


def test_the_planned_attention_kernel_is_the_one_that_runs():
  run = lambda impl: common.runtime(gpt_config(**{"runtime.attention_impl": impl}))
  shape = lambda t: memory.Shape(num_layers=2, embed_dim=64, mlp_dim=256, num_heads=4,
                                 vocab_size=128, seq_len=t, batch_size=8)
  # fmjax.attention's "auto" off TPU/GPU: xla up to 4096 x 4096 logits per head, then chunked.
  assert common.attention_kernel(run("auto"), shape(4096)) == "xla"
  assert common.attention_kernel(run("auto"), shape(4097)) == "chunked"
  assert common.attention_kernel(run("xla"), shape(200_000)) == "xla"
  assert memory.activation_elements_per_token(
      memory.Shape(**{**shape(4097).__dict__, "attention_impl": "cudnn"}), "none") == \
      2 * (22 * 64 + 3 * 256) + 12 * 64  # flash kernels keep no scores (scan: 22 D + 3 F)


def test_the_default_budget_is_what_the_host_has_free(monkeypatch):
  """CPU: 80% of MemAvailable / local devices (not the RAM's size); memory_budget_gb=0 uses it."""
  with open("/proc/meminfo") as f:
    available = next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))
  import jax
  expected = 0.8 * available / jax.local_device_count()
  assert abs(memory.device_memory_bytes() / expected - 1) < 0.1  # other processes come and go
  monkeypatch.setattr(memory, "device_memory_bytes", lambda: 3 * GiB)
  message = refusal(gpt_config(**ISSUE))
  assert "over the budget of 3 GiB (80% of this host's free RAM; " \
         "--config.train.memory_budget_gb sets it)" in message


@pytest.mark.parametrize("recipe", ["gpt:tiny", "gpt:shakespeare_char", "bert:tiny",
                                    "bert:sample"])
def test_the_recipes_fit_a_small_laptop(recipe):
  """The CPU recipes' plans fit 4 GiB, so the refusal never fires on them."""
  name, variant = recipe.split(":")
  if name == "gpt":
    config = gpt_configs.get_config(variant)
    config.train.memory_budget_gb = 4.0
    assert "over budget" not in plan_gpt(config)[2]
    return
  config = bert_configs.get_config(variant)
  config.train.memory_budget_gb = 4.0
  d, t = config.data, config.train
  c = common.model_config(bert.BertConfig, config.model,
                          types.SimpleNamespace(vocab_size=d.vocab_size))
  length = max(d.max_seq_length, d.phase2_max_seq_length if d.phase1_fraction < 1 else 0)
  ids = np.zeros((1, length), np.int32)
  _, _, note = common.plan_memory(
      config, lambda rt: bert.BertForPreTraining(c, rt), (ids, ids, ids, ids[:, :20]),
      memory.Shape(num_layers=c.num_layers, embed_dim=c.embed_dim, mlp_dim=c.mlp_dim,
                   num_heads=c.num_heads, vocab_size=c.padded_vocab_size, seq_len=length,
                   batch_size=t.batch_size, logit_positions=20), common.runtime(config))
  assert "over budget" not in note


# --------------------------------------------------------------------------- the GPT program

def program(env, workdir, *overrides):
  return subprocess.Popen(
      [sys.executable, "-m", "train.pretrain_gpt", "--config=configs/gpt.py:tiny",
       f"--workdir={workdir}", *overrides], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True)


def test_the_issue_command_exits_2_at_once_naming_what_fits(env, tmp_path):
  began = time.monotonic()
  proc = program(env, tmp_path / "w", "--config.data.seq_len=200000",
                 "--config.model.max_len=200000", "--config.train.memory_budget_gb=16")
  _, status, usage = os.wait4(proc.pid, 0)
  seconds, stderr = time.monotonic() - began, proc.stderr.read()
  proc.returncode = os.waitstatus_to_exitcode(status)
  assert proc.returncode == 2, stderr[-3000:]
  errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr[-3000:]
  assert "Traceback" not in stderr
  assert errors[0] == "error: " + ISSUE_ON_16_GIB
  assert usage.ru_maxrss * 1024 < 3 * GiB  # planned, not allocated (the issue: 11 GB)
  assert seconds < 60
  assert not (tmp_path / "w" / "checkpoints").exists()


# ------------------------------------------------------------------------------------ signals

WATCHED = """
import hashlib, os, signal, sys, threading, time
from fmjax.trainer import ExitOnSignal
with ExitOnSignal():
  print("ready", flush=True)
  if sys.argv[1] == "c":  # one long C call that releases the GIL and never checks signals
    hashlib.pbkdf2_hmac("sha256", b"x", b"y", 50_000_000)
  else:  # Python code (data preparation), writing a temporary file it removes when stopped
    open(sys.argv[2], "w").close()
    try:
      deadline = time.monotonic() + 60
      while time.monotonic() < deadline:
        sum(range(1000))
    finally:
      os.remove(sys.argv[2])
  print("returned", flush=True)
"""


@pytest.mark.parametrize("where,signum", [("c", signal.SIGTERM), ("python", signal.SIGINT)])
def test_a_signal_outside_training_exits_at_once_even_inside_c_code(where, signum, tmp_path):
  """In Python code the handler raises (finally blocks run); inside one long C call, which
  runs no Python handler, the watcher thread exits after ExitOnSignal.GRACE_S (1 s)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  temporary = tmp_path / "cache.tmp"
  proc = subprocess.Popen([sys.executable, "-c", WATCHED, where, str(temporary)], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline() == "ready\n"
    time.sleep(0.5)
    sent = time.monotonic()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
  finally:
    proc.kill()
  assert time.monotonic() - sent < 3
  assert proc.returncode == 128 + signum, err
  assert "returned" not in out
  assert not temporary.exists()
  assert err.strip().splitlines()[-1] == (
      f"interrupted by {signal.Signals(signum).name}: exited at once, without saving; rerunning "
      "the same command resumes from the last complete checkpoint")


def test_the_setup_line_names_the_last_checkpoint(tmp_path):
  stop = StopSignals(str(tmp_path))
  assert stop.setup_line(signal.SIGTERM) == (
      "interrupted by SIGTERM during setup, before the first step finished: exited at once, "
      "without saving; no checkpoint was saved yet; rerunning the same command starts afresh")
  for name in ("3", "7", "8.orbax-checkpoint-tmp-1"):
    (tmp_path / name).mkdir()
  assert stop.setup_line(signal.SIGINT) == (
      f"interrupted by SIGINT during setup, before step 8 finished: exited at once, without "
      f"saving; the last checkpoint (step 7) in {tmp_path} is untouched; rerunning the same "
      "command resumes from it")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_fit_compiles_exits_at_once(env, tmp_path, signum):
  """fit makes WORKDIR/checkpoints, then traces, lowers and compiles the init and the step of
  16 unrolled layers (minutes on a busy 2-core machine, mostly inside XLA): a signal
  there used to wait for all of it and the first step."""
  env = {**env, "JAX_ENABLE_COMPILATION_CACHE": "false"}
  workdir = tmp_path / "w"
  proc = program(env, workdir, "--config.model.num_layers=16", "--config.train.steps=2")
  try:
    deadline = time.monotonic() + 120
    while not (workdir / "checkpoints").exists() and time.monotonic() < deadline:
      time.sleep(0.05)
    time.sleep(1)
    sent = time.monotonic()
    proc.send_signal(signum)
    stderr = proc.communicate(timeout=30)[1]
  finally:
    proc.kill()
  assert time.monotonic() - sent < 10, stderr[-3000:]
  assert proc.returncode == 128 + signum, stderr[-3000:]
  assert " model: " not in stderr  # it was still setting up
  assert stderr.strip().splitlines()[-1] == (
      f"interrupted by {signal.Signals(signum).name} during setup, before the first step "
      "finished: exited at once, without saving; no checkpoint was saved yet; rerunning the "
      "same command starts afresh")
  # Nothing saved: the workdir this run made is removed again (fmjax/workdir.py), or, where
  # the watcher had to exit from inside XLA, left with an empty checkpoints/.
  assert not workdir.exists() or os.listdir(workdir / "checkpoints") == []
