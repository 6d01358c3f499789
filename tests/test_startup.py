"""Start-up: the programs keep JAX's persistent compilation cache by default (under the user's
cache directory, overridable), and log how long each jitted step took to compile."""

import os
import pathlib
import subprocess
import sys

import jax

from train import common

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_the_cache_directory_by_precedence(monkeypatch, tmp_path):
  before = jax.config.jax_compilation_cache_dir
  try:
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv("FMJAX_COMPILATION_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert common.enable_compilation_cache() == str(tmp_path / "xdg" / "fmjax" / "jax")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xdg" / "fmjax" / "jax")
    monkeypatch.setenv("FMJAX_COMPILATION_CACHE", str(tmp_path / "mine"))
    assert common.enable_compilation_cache() == str(tmp_path / "mine")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax's"))  # JAX's own wins
    assert common.enable_compilation_cache() == str(tmp_path / "jax's")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv("FMJAX_COMPILATION_CACHE", "off")
    jax.config.update("jax_compilation_cache_dir", None)
    assert common.enable_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir is None
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


def test_a_program_fills_the_default_cache_and_logs_its_compiles(env, tmp_path):
  env = {k: v for k, v in env.items()
         if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
  env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # store even the tiny model's steps
  cmd = [sys.executable, "-m", "train.pretrain_gpt", "--config=configs/gpt.py:tiny",
         "--config.train.steps=2", "--config.train.eval_every=2", "--config.sample.num_tokens=0",
         f"--workdir={tmp_path / 'run'}"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "compiled the train step for batch shape (8, 32) in " in proc.stderr
  assert "compiled the eval step for batch shape (8, 32) in " in proc.stderr
  stored = os.listdir(tmp_path / "xdg" / "fmjax" / "jax")
  assert any(name.startswith("jit_train_step-") for name in stored), stored
