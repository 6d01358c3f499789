"""The programs: one module per task, each a `run(config, workdir)` plus a short `main`.

On a CPU host every core becomes one JAX device, so the programs' data-parallel mesh keeps
all cores busy with independent work instead of splitting each small op across threads
(measured +18% tokens/s on the demo model, bench/RESULTS.md). Set FMJAX_CPU_DEVICES=N to
choose N, or pass your own --xla_force_host_platform_device_count in XLA_FLAGS. This only
takes effect when jax has not been imported yet, and does nothing on TPU or GPU backends.
"""

import os
import sys

if "jax" not in sys.modules:
  _flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in _flags:
    _n = os.environ.get("FMJAX_CPU_DEVICES") or str(os.cpu_count() or 1)
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count={_n}".strip()
