"""The programs: one module per task, each a `run(config, workdir)` plus a short `main`.

On a CPU host the programs use one JAX device whose ops run on all cores (XLA's intra-op
threads). FMJAX_CPU_DEVICES=N makes N host devices instead, and the programs then train data
parallel over them: that pays for tiny models (+18% tokens/s on the char-level demo GPT) and
costs for real ones (finetuning MiniLM on SST-2: 0.80 s per step on 2 devices against 0.51 s
on one, bench/RESULTS.md), where the all-reduce of every gradient over host memory outweighs
the larger per-thread ops. Your own --xla_force_host_platform_device_count in XLA_FLAGS wins.
This only takes effect when jax has not been imported yet, and does nothing on TPU or GPU.

On a CPU with AVX-512, XLA is asked for 512-bit vectors (its default is 256): 14% more
tokens/s for GPT-2 decoding here (bench/RESULTS.md).

The in-process CPU collectives wait up to an hour for a late device thread instead of XLA's default
40 s: on a CPU shared with other jobs one core's thread can be starved that long, and XLA
would abort the whole run ("may be stuck ... not all of them arrived on time").
"""

import os
import sys


def _has_avx512() -> bool:
  """Whether this Linux host's CPU has AVX-512F (False where /proc/cpuinfo is absent)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      return any(line.startswith("flags") and " avx512f" in line for line in f)
  except OSError:
    return False


if "jax" not in sys.modules:
  _flags = os.environ.get("XLA_FLAGS", "")
  _n = os.environ.get("FMJAX_CPU_DEVICES")
  if _n and "xla_force_host_platform_device_count" not in _flags:
    _flags = f"{_flags} --xla_force_host_platform_device_count={_n}"
  _defaults = [("xla_cpu_collective_call_terminate_timeout_seconds", 3600),
               ("xla_cpu_collective_call_warn_stuck_timeout_seconds", 300)]
  if _has_avx512():
    _defaults.append(("xla_cpu_prefer_vector_width", 512))
  for _flag, _value in _defaults:
    if _flag not in _flags:
      _flags = f"{_flags} --{_flag}={_value}"
  os.environ["XLA_FLAGS"] = _flags.strip()
