"""Fixtures shared by the tests that run the programs as subprocesses."""

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"  # the team's datasets, ../shared beside the repo


def pytest_sessionstart(session):
  """Stops the run at once, with where the data must be, when ../shared/data is missing: the
  tests that read it fail loudly instead of skipping (what the repo bundles, data/, they read
  from there)."""
  del session
  if not SHARED_DATA.is_dir():
    raise pytest.UsageError(
        f"{SHARED_DATA} is missing: fmjax's tests read WikiText-2, RTE/SST-2 and MNIST from "
        "../shared/data, a folder beside the repo (clone or copy the shared folder there, so "
        f"that {SHARED_DATA / 'mnist'} exists), then run `make test` again")


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
