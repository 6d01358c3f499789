"""What a run reports: metrics.jsonl, TensorBoard, the loss-curve PNG, and MFU.

MFU (model FLOPs utilisation, PaLM appendix B) = achieved model FLOP/s / peak FLOP/s.
Peak numbers are per device: dense bf16 from the vendors' data sheets for TPUs and
GPUs; on CPU the fp32 matmul rate is measured and cached per machine (CPU model, cores, JAX
devices, XLA_FLAGS), with its date and load, and measured again when it is older than
PEAK_MAX_AGE_DAYS, was taken on a loaded machine, or FMJAX_MEASURE_PEAK=1 asks. An MFU above 1
is impossible: `mfu` raises, and the trainer first measures the peak again (a peak cached while
other jobs shared the cores reads low).
"""

import datetime
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak FLOP/s per JAX device (a TPU v2/v3 device is one core).
PEAK_FLOPS = {
    "TPU v2": 22.5e12, "TPU v3": 61.5e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
    "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6 lite": 918e12,
    "TPU v6e": 918e12, "TPU7x": 2307e12,
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
    "V100": 125e12, "T4": 65e12, "B200": 2250e12,
}

# Dense TF32 peak FLOP/s per GPU: what float32 matmuls run at there, at JAX's default
# precision. (A TPU runs float32 matmuls at default precision as bf16 passes on its MXU.)
PEAK_FLOPS_TF32 = {"H200": 494.7e12, "H100": 494.7e12, "A100": 156e12, "L4": 60e12,
                   "A10": 62.5e12, "B200": 1100e12}

PEAK_MAX_AGE_DAYS = 30


def cpu_model() -> str:
  """The CPU's model name (/proc/cpuinfo), else platform's processor or machine string.

  Returns:
    e.g. "Intel(R) Xeon(R) Processor".
  """
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def mfu(flops_per_second: float, peak: float) -> float:
  """Model FLOPs utilisation: achieved / peak FLOP/s.

  Args:
    flops_per_second: the model FLOPs achieved per second (all devices).
    peak: the peak FLOP/s of those devices together.

  Returns:
    The ratio, in [0, 1].

  Raises:
    ValueError: a ratio above 1, which no computation reaches: the FLOP count or the peak is
      wrong.
  """
  ratio = flops_per_second / peak
  if ratio > 1:
    raise ValueError(f"MFU {ratio:.3f} > 1: {flops_per_second:.4g} model FLOP/s against a peak "
                     f"of {peak:.4g} FLOP/s; the model's FLOP count or the peak is wrong")
  return ratio


def _cache_path():
  base = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
  return os.path.join(base, "fmjax", "cpu_peak_flops.json")


def measure_cpu_peak_flops(n: int = 1024, repeats: int = 5) -> float:
  """Best observed fp32 matmul FLOP/s of an (n x n) @ (n x n) product on the default device.

  Args:
    n: the matrix size.
    repeats: timed runs after one warm-up (compile) run; the fastest counts.

  Returns:
    2 * n**3 / the best time in seconds.
  """
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def peak_flops_per_device(device=None, *, remeasure: bool = False,
                          dtype: str = "bfloat16") -> tuple[float, str]:
  """(peak FLOP/s of one device, where the number comes from).

  Args:
    device: a jax Device; defaults to jax.devices()[0]. Accelerators are looked up in
      PEAK_FLOPS by device kind (dense bf16; on a GPU a float32 `dtype` looks up
      PEAK_FLOPS_TF32 instead); a CPU is measured with `measure_cpu_peak_flops`
      and cached under $XDG_CACHE_HOME/fmjax (or ~/.cache/fmjax), keyed by the CPU model, the
      cores this process may use, the JAX device count and XLA_FLAGS.
    remeasure: measure the CPU again even if a fresh entry is cached (FMJAX_MEASURE_PEAK=1
      does the same for every call).
    dtype: the compute dtype of the model's matmuls ("bfloat16", "float16" or "float32").

  Returns:
    (FLOP/s as a float, NaN for an unknown accelerator; a sentence naming the source, with the
    measurement's date on CPU).
  """
  device = device or jax.devices()[0]
  kind = device.device_kind
  if device.platform != "cpu":
    tf32 = device.platform == "gpu" and dtype == "float32"
    table, what = (PEAK_FLOPS_TF32, "tf32 dense, for float32") if tf32 else (
        PEAK_FLOPS, "bf16 dense" + (", float32 matmuls run as bf16 passes"
                                    if dtype == "float32" else ""))
    for name, flops in sorted(table.items(), key=lambda kv: -len(kv[0])):
      if name.lower() in kind.lower():
        return flops, f"data sheet ({kind}, {what})"
    return float("nan"), f"unknown device kind {kind!r} for {dtype}: MFU not reported"
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  key = (f"{cpu_model()} | cores {cores} | devices {jax.device_count()} | "
         f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")
  path = _cache_path()
  try:
    with open(path) as f:
      cached = json.load(f)
    if not isinstance(cached, dict):
      cached = {}
  except (OSError, ValueError):
    cached = {}
  entry = cached.get(key)
  remeasure = remeasure or os.environ.get("FMJAX_MEASURE_PEAK", "") not in ("", "0")
  if not remeasure and _fresh(entry, cores):
    return entry["flops"], (f"fp32 matmul measured on this CPU on {entry['date']} at load "
                            f"{entry['load']} (cached in {path})")
  # Measured on one device: with N host devices (--xla_force_host_platform_device_count) each
  # device runs its ops on its own thread, so this is already the per-device peak.
  load = round(os.getloadavg()[0], 2)
  flops = measure_cpu_peak_flops()
  if isinstance(entry, dict) and entry.get("date") == _today() and not remeasure:
    flops = max(flops, entry["flops"])  # a second look today: the better of the two
  date = _today()
  cached[key] = {"flops": flops, "date": date, "load": load}
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomically(path, json.dumps(cached, indent=1))
  except OSError:
    pass
  return flops, f"fp32 matmul measured on this CPU on {date} at load {load}"


def _today() -> str:
  return datetime.date.today().isoformat()


def _fresh(entry, cores: int) -> bool:
  """A cached CPU peak still to be trusted: this format, measured within PEAK_MAX_AGE_DAYS
  on a machine whose load did not exceed its cores."""
  try:
    age = datetime.date.today() - datetime.date.fromisoformat(entry["date"])
    return (isinstance(entry["flops"], float) and age.days <= PEAK_MAX_AGE_DAYS
            and entry["load"] <= cores)
  except (TypeError, KeyError, ValueError):
    return False


class MetricsWriter:
  """metrics.jsonl + TensorBoard events + loss-curve PNG in the workdir; one writer per job.

  On resume at step s, lines with step > s are dropped first, so a resumed run's
  metrics.jsonl equals an uninterrupted one's (and TensorBoard is told to purge them too).
  Crash safe: that rewrite is atomic, and each row is one append of one line, so a kill
  leaves at most a cut-short last line, which `read_metrics` drops.

  Args:
    workdir: the run's directory (must exist): metrics.jsonl, tensorboard/ and
      loss_curve.png go there.
    resume_step: the step resumed from; rows of metrics.jsonl with a larger step are dropped.
    enabled: whether this process writes; None: only process 0 does.

  Attributes:
    last: the last row kept on resume, without "step" ({} when there is none): a finished
      run's final metrics.
  """

  def __init__(self, workdir: str, *, resume_step: int = 0, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.workdir = workdir
    self._tb = None
    self.last = {}  # the last row kept on resume (without "step"): a finished run's result
    if not self.enabled:
      return
    kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
    self.last = {k: v for k, v in kept[-1].items() if k != "step"} if kept else {}
    # Rewritten whole then renamed: a process killed here leaves the old file or the new one.
    write_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))
    from tensorboardX import SummaryWriter  # imported lazily: heavy, and only process 0 needs it
    # purge_step: TensorBoard hides the earlier event files' steps > resume_step, which
    # this run writes again (as metrics.jsonl drops them above).
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

  def write(self, step: int, metrics: dict) -> None:
    """Appends one row to metrics.jsonl and each value to TensorBoard (if enabled).

    Args:
      step: the training step the metrics belong to.
      metrics: {name: number}, scalars (Python, numpy or jax); stored as floats.
    """
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in row.items():
      if k != "step":
        self._tb.add_scalar(k, v, step)

  def write_images(self, step: int, images: dict) -> None:
    """Writes pictures as WORKDIR/<name>/step_XXXXXX.png and to TensorBoard (if enabled).

    Args:
      step: the training step they belong to.
      images: {name: (H, W, C) uint8 array, C 1 or 3}.
    """
    if not self.enabled:
      return
    from PIL import Image
    for name, image in images.items():
      image = np.asarray(image, np.uint8)
      path = os.path.join(self.workdir, name, f"step_{int(step):06d}.png")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
      self._tb.add_image(name, image, step, dataformats="HWC")

  def close(self) -> None:
    """Flushes TensorBoard and draws loss_curve.png from metrics.jsonl (if enabled)."""
    if self.enabled:
      self._tb.close()
      plot_loss_curve(self.path, os.path.join(self.workdir, "loss_curve.png"))


def read_metrics(path: str) -> list[dict]:
  """The rows of a metrics.jsonl; a last line cut short (the writer was killed) is dropped.

  Args:
    path: the metrics.jsonl file; a missing file has no rows.

  Returns:
    [{"step": int, name: float, ...}, ...] in file order.

  Raises:
    ValueError: a line other than a cut-short last one is not JSON (names the line).
  """
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [(i, line) for i, line in enumerate(f, start=1) if line.strip()]
  rows = []
  for i, line in lines:
    try:
      rows.append(json.loads(line))
    except ValueError:
      if (i, line) == lines[-1] and not line.endswith("\n"):  # an append that never finished
        break
      raise ValueError(f"{path}:{i}: not a JSON metrics row ({line.strip()[:80]!r}); fix or "
                       "remove that line (rows past the resumed step are rewritten anyway)") from None
  return rows


def write_atomically(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file and a rename.

  Readers (and a rerun after a crash) see the old content or the new, never half of it.

  Args:
    path: the file to replace or create.
    text: its new content.
  """
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def plot_loss_curve(metrics_path: str, png_path: str) -> None:
  """Plots every key of metrics.jsonl ending in "loss" against step, into a PNG.

  Args:
    metrics_path: the metrics.jsonl to read (see `read_metrics`).
    png_path: the image to write (100 dpi, 6 x 4 inches).
  """
  # A bare Figure renders with Agg without touching pyplot's global backend, so a notebook
  # that trains through a program still shows its own plots inline.
  from matplotlib.figure import Figure
  rows = read_metrics(metrics_path)
  keys = sorted({k for r in rows for k in r if k.endswith("loss")})
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  for k in keys:
    pts = [(r["step"], r[k]) for r in rows if k in r]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, marker="." if len(pts) < 30 else None)
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(metrics_path))))
  if keys:
    ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(png_path, dpi=100)
