"""Fixtures shared by the tests that run the programs as subprocesses."""

import os

import pytest


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """The programs' environment: CPU, one device, a private cache (the measured peak FLOP/s,
  XLA executables reused across a module's runs), no FMJAX_DEBUG re-raise. A test module
  may define its own `env` to change it."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "FMJAX_DEBUG")}
  env["JAX_PLATFORMS"] = "cpu"
  env["FMJAX_CPU_DEVICES"] = "1"
  cache = tmp_path_factory.mktemp("cache")
  env["XDG_CACHE_HOME"] = str(cache)
  env["JAX_COMPILATION_CACHE_DIR"] = str(cache / "jax")
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return env
