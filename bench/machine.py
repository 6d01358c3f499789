"""What every bench line records: the machine, the versions, and the load around a round.

Every script under bench/ adds `machine()` to its JSON lines and measures each round inside
`measured(...)` (or a `Load` it closes itself):

  machine()  {"cpu": CPU model from /proc/cpuinfo, "cores": the cores this process may run on
             (len(os.sched_getaffinity(0)), what `taskset` and containers leave), "versions":
             {python, jax, jaxlib, flax, optax, torch, transformers: those importable},
             "xla_flags": $XLA_FLAGS}
  Load       the 1-minute load average before and after a round; `loaded` when either
             exceeds the core count: other jobs shared the CPU, and PyTorch's spinning OpenMP
             threads slow far more than XLA's under contention, so a ratio taken then is not a
             measurement.
  measured   the rule: a loaded round is repeated (up to `retries` more times); if it is still
             loaded it is kept, marked `"loaded": true`, never dropped silently.

`report.py` shows the machine, the versions and the load of each table row from these fields.
"""

import dataclasses
import os
import platform
import sys
from typing import Any, Callable

PACKAGES = ("jax", "jaxlib", "flax", "optax", "torch", "transformers")


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (platform's guess where that is unreadable).

  Returns:
    e.g. "Intel(R) Xeon(R) Processor".
  """
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def cores() -> int:
  """The cores this process may run on (its affinity mask, not the host's count).

  Returns:
    the number of usable cores.
  """
  return len(os.sched_getaffinity(0))


def versions(names=PACKAGES) -> dict:
  """Installed versions of python and of `names` (those that are importable; torch and
  transformers are only imported when already installed, never required).

  Args:
    names: distribution names to look up.

  Returns:
    {"python": "3.11.7", "jax": "0.10.2", ...}.
  """
  import importlib.metadata
  out = {"python": platform.python_version()}
  for name in names:
    module = sys.modules.get(name)
    version = getattr(module, "__version__", None) if module else None
    if version is None:
      try:
        version = importlib.metadata.version(name)
      except importlib.metadata.PackageNotFoundError:
        continue
    out[name] = str(version)
  return out


def machine() -> dict:
  """The CPU, its cores, the versions and the XLA flags the numbers depend on.

  Returns:
    {"cpu": str, "cores": int, "versions": {...}, "xla_flags": str}.
  """
  return {"cpu": cpu_model(), "cores": cores(), "versions": versions(),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def load_average() -> float:
  """The host's 1-minute load average.

  Returns:
    os.getloadavg()[0].
  """
  return os.getloadavg()[0]


@dataclasses.dataclass
class Load:
  """The 1-minute load average around one round: `Load()` before it, `.close()` after.

  Attributes:
    before: the load when the round began.
    after: the load when it ended (None until closed).
    limit: the core count above which the round counts as loaded.
    attempts: how many times the round was run (set by `measured`).
  """
  before: float = dataclasses.field(default_factory=lambda: load_average())
  after: float | None = None
  limit: int = dataclasses.field(default_factory=lambda: cores())
  attempts: int = 1

  def close(self) -> "Load":
    """Records the load after the round.

    Returns:
      self.
    """
    self.after = load_average()
    return self

  @property
  def loaded(self) -> bool:
    """Whether the load before or after the round exceeded the core count."""
    return max(self.before, self.after if self.after is not None else 0.0) > self.limit

  def fields(self) -> dict:
    """The JSON fields of a bench line.

    Returns:
      {"load_average": [before, after], "loaded": bool, "load_attempts": int}.
    """
    if self.after is None:
      self.close()
    return {"load_average": [round(self.before, 2), round(self.after, 2)],
            "loaded": self.loaded, "load_attempts": self.attempts}


def measured(round_fn: Callable[[], Any], *, retries: int = 2, log=None) -> tuple[Any, Load]:
  """Runs one round, repeating it while the machine was loaded.

  Args:
    round_fn: runs the round and returns its result.
    retries: how many more times a loaded round is run; the last attempt is kept, marked
      loaded, when every attempt was.
    log: optional callable(str) told about each repeat (e.g. print to stderr).

  Returns:
    (the kept attempt's result, its Load).
  """
  for attempt in range(retries + 1):
    load = Load()
    result = round_fn()
    load.close()
    load.attempts = attempt + 1
    if not load.loaded:
      break
    if log is not None and attempt < retries:
      log(f"load {load.before:.2f} / {load.after:.2f} > {load.limit} cores: repeating the round")
  return result, load


def combine(loads: list[Load]) -> dict:
  """The load fields of a line made of several rounds: the first round's load before, the
  last one's after, loaded if any round was.

  Args:
    loads: the rounds' Loads, in order (at least one).

  Returns:
    {"load_average": [before, after], "loaded": bool, "loaded_rounds": int,
     "load_max": float}.
  """
  for load in loads:
    if load.after is None:
      load.close()
  return {"load_average": [round(loads[0].before, 2), round(loads[-1].after, 2)],
          "loaded": any(x.loaded for x in loads),
          "loaded_rounds": sum(x.loaded for x in loads),
          "load_max": round(max(max(x.before, x.after) for x in loads), 2)}
