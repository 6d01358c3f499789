"""The CPU peak behind MFU: keyed by the machine, dated, measured again when stale or loaded,
and an MFU above 1 refused (issue 21)."""

import datetime
import json

import pytest

from fmjax import metrics


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  monkeypatch.delenv("FMJAX_MEASURE_PEAK", raising=False)
  measured = []

  def measure():
    measured.append(1)
    return 1e10 * len(measured)  # each measurement differs: 1e10, 2e10, ...
  monkeypatch.setattr(metrics, "measure_cpu_peak_flops", measure)
  monkeypatch.setattr(metrics.os, "getloadavg", lambda: (0.5, 0.5, 0.5))
  return tmp_path / "fmjax" / "cpu_peak_flops.json", measured


def test_the_peak_is_cached_under_the_machine_with_its_date(cache, monkeypatch):
  path, measured = cache
  flops, source = metrics.peak_flops_per_device()
  assert flops == 1e10 and len(measured) == 1
  assert datetime.date.today().isoformat() in source and "load 0.5" in source
  (key, entry), = json.loads(path.read_text()).items()
  assert metrics.cpu_model() in key and "cores" in key and "XLA_FLAGS=" in key
  assert entry == {"flops": 1e10, "date": datetime.date.today().isoformat(), "load": 0.5}
  assert metrics.peak_flops_per_device()[0] == 1e10 and len(measured) == 1  # from the cache
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")  # another machine
  assert metrics.peak_flops_per_device()[0] == 2e10 and len(json.loads(path.read_text())) == 2


@pytest.mark.parametrize("entry", [
    38812074498.45,  # the old format: a bare number, no date
    {"flops": 5e9, "date": "2020-01-01", "load": 0.1},  # stale
    {"flops": 5e9, "date": datetime.date.today().isoformat(), "load": 9.0},  # a loaded machine
])
def test_an_untrustworthy_entry_is_measured_again(cache, entry):
  path, measured = cache
  metrics.peak_flops_per_device()
  key, = json.loads(path.read_text())
  path.write_text(json.dumps({key: entry}))
  assert metrics.peak_flops_per_device()[0] == 2e10 and len(measured) == 2


def test_asking_measures_again(cache, monkeypatch):
  path, measured = cache
  metrics.peak_flops_per_device()
  assert metrics.peak_flops_per_device(remeasure=True)[0] == 2e10
  monkeypatch.setenv("FMJAX_MEASURE_PEAK", "1")
  assert metrics.peak_flops_per_device()[0] == 3e10 and len(measured) == 3


def test_an_mfu_above_one_is_an_error():
  assert metrics.mfu(5e9, 1e10) == 0.5
  assert metrics.mfu(1e10, 1e10) == 1.0
  with pytest.raises(ValueError, match=r"MFU 1\.006 > 1"):
    metrics.mfu(1.006e10, 1e10)


def test_accelerator_peaks_come_from_the_data_sheets_by_dtype():
  class Device:  # what jax reports for the accelerators (no such device here)
    def __init__(self, platform, kind):
      self.platform, self.device_kind = platform, kind

  h200, v5e = Device("gpu", "NVIDIA H200"), Device("tpu", "TPU v5 lite")
  assert metrics.peak_flops_per_device(h200, dtype="bfloat16") == (
      989e12, "data sheet (NVIDIA H200, bf16 dense)")
  assert metrics.peak_flops_per_device(h200, dtype="float32") == (
      494.7e12, "data sheet (NVIDIA H200, tf32 dense, for float32)")
  assert metrics.peak_flops_per_device(v5e, dtype="float32") == (
      197e12, "data sheet (TPU v5 lite, bf16 dense, float32 matmuls run as bf16 passes)")
  flops, source = metrics.peak_flops_per_device(Device("gpu", "Some GPU"))
  assert flops != flops and "unknown device kind 'Some GPU'" in source  # NaN: no MFU
