"""What every program in train/ shares: flags, the workdir, the model config and runtime,
the memory plan, errors.

A program is `run(config, workdir)` plus `main`; `main` parses --config (an ml_collections
config file with `:variant`, any leaf overridable as --config.a.b=value, unknown keys are
errors) and --workdir, and turns expected failures into one line on stderr and exit code 2.
SIGTERM/SIGINT stop training after a checkpoint (fmjax.trainer) and exit with 143/130; before
training steps flow (data preparation, compilation) they exit at once, with the same codes
(fmjax.trainer.ExitOnSignal).
"""

import contextlib
import dataclasses
import difflib
import functools
import json
import logging
import os
import sys

import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from fmjax import sources  # noqa: F401  (re-exported for the programs)
from fmjax import workdir as fworkdir
from fmjax.runtime import Runtime
from fmjax.trainer import (Interrupted, Schedule, Task, fit,  # noqa: F401  (re-exported)
                           resolve_schedule)
from fmjax.trainer import ExitOnSignal
from train import checks

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/gpt.py:tiny",
                                          lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and the tokenizer")
flags.DEFINE_string("coordinator_address", os.environ.get("FMJAX_COORDINATOR_ADDRESS"),
                    "host:port of process 0 in a multi-process run (jax.distributed); not needed "
                    "on a Cloud TPU slice, where it is detected")
flags.DEFINE_integer("num_processes", int(os.environ.get("FMJAX_NUM_PROCESSES", 1)),
                     "number of processes (with --coordinator_address)")
flags.DEFINE_integer("process_id", int(os.environ.get("FMJAX_PROCESS_ID", 0)),
                     "this process's index (with --coordinator_address)")

# Failures a user can fix; anything else is a bug and keeps its traceback. OSError: the
# file system's (a full disk, a failed checkpoint save), which name the file.
EXPECTED_ERRORS = (ValueError, OSError, UnicodeDecodeError, KeyError)

# fmjax's errors name a function's argument (ArgumentError, and a DataError that names the
# argument to check); where the run config sets that argument, the program names the flag:
# (function, argument) -> flag.
ARGUMENT_FLAGS = {
    ("make_mesh", "sizes"): "--config.mesh",
    ("get_rules", "rules"): "--config.sharding",
    ("check_divisible", "mesh"): "--config.mesh (or --config.sharding, --config.model)",
    ("check_batch_size", "batch_size"): "--config.train.batch_size (or --config.mesh)",
    ("resolve_schedule", "train.steps"): "--config.train.steps",
    ("resolve_schedule", "train.epochs"): "--config.train.epochs",
    ("fit", "train.best_metric"): "--config.train.best_metric",
    ("restorable_step", "step"): "--config.train.restore_step",
    ("PairBatches", "batch_size"): "--config.train.batch_size",
    ("train_sentencepiece", "vocab_size"): "--config.data.vocab_size",
    ("check_labels", "num_classes"): "--config.model.num_classes",
    **{("TableFormat", field): f"--config.data.{field}"
       for field in ("format", "header", "quoting", "text_columns", "label_column",
                     "label_names", "num_labels")},
}


def caption_tokenizer(workdir: str, texts, vocab_size: int, *, lowercase: bool = False):
  """A captioning program's tokenizer: WORKDIR/tokenizer when a run saved one, else a
  SentencePiece vocabulary learned on `texts` and saved there (by process 0).

  Args:
    workdir: the run's workdir.
    texts: the training captions.
    vocab_size: the pieces to learn (config.data.vocab_size).
    lowercase: whether the tokenizer lower-cases what it encodes.

  Returns:
    The fmjax.data tokenizer.
  """
  import jax
  from fmjax import data as fdata
  saved = os.path.join(workdir, "tokenizer")
  if os.path.exists(os.path.join(saved, fdata.tokenizers.METADATA_FILE)):
    return fdata.load_tokenizer(saved)
  tok = fdata.train_sentencepiece(texts, vocab_size, **({"lowercase": True} if lowercase else {}))
  if jax.process_index() == 0:
    tok.save(saved)
  return tok


def enable_compilation_cache() -> str | None:
  """Turns on JAX's persistent compilation cache for this process, so that a rerun (resume,
  another variant of the same shapes, the next notebook session) loads its compiled steps
  instead of compiling them again.

  Where: $JAX_COMPILATION_CACHE_DIR when set (JAX's own setting, left alone), else
  $FMJAX_COMPILATION_CACHE, else $XDG_CACHE_HOME/fmjax/jax (~/.cache/fmjax/jax).
  FMJAX_COMPILATION_CACHE=off turns it off. Executables that compiled in under a second are
  not stored (JAX's default threshold, jax_persistent_cache_min_compile_time_secs).

  Returns:
    The cache directory, or None when it is off.
  """
  import jax
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  directory = os.environ.get("FMJAX_COMPILATION_CACHE", "")
  if directory.lower() in ("off", "0", "none", "false"):
    return None
  if not directory:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    directory = os.path.join(base, "fmjax", "jax")
  jax.config.update("jax_compilation_cache_dir", directory)
  return directory


def explain(error: BaseException) -> str:
  """The message of an expected error, led by the flag that sets the argument it names."""
  flag = ARGUMENT_FLAGS.get((getattr(error, "function", None), getattr(error, "argument", None)))
  return f"{flag}: {error}" if flag else str(error)


def initialize_distributed() -> None:
  """Joins a multi-process run: explicit coordinator flags (any backend; CPU uses gloo
  collectives), or the TPU runtime's own description of a multi-host slice."""
  import jax
  if FLAGS.coordinator_address:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  elif len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
    jax.distributed.initialize()  # Cloud TPU VM slice: every worker runs the same command


def prepare_workdir(config, workdir: str) -> None:
  """Checks the run config (train/checks.py), then creates the workdir, refusing an
  unwritable one or one that another run holds.

  A program's run holds the workdir from its start (`holds_workdir`); called outside one,
  this only checks that no other process holds it. The resolved config is recorded
  (config.json) by `fit`, once the run has passed its checks, so a refused run leaves the
  workdir as it found it.
  """
  checks.validate(config)  # before anything is created, read or compiled
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test.{os.getpid()}")  # processes may share it
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise _unwritable(workdir, e) from None
  try:
    fworkdir.check_free(workdir)
  except fworkdir.WorkdirInUse as e:
    raise _in_use(e) from None


def _unwritable(workdir: str, error: OSError) -> PermissionError:
  return PermissionError(f"workdir {workdir!r} is not writable ({error.strerror}); "
                         "pass a --workdir you can write to")


def _in_use(error: fworkdir.WorkdirInUse) -> fworkdir.WorkdirInUse:
  return fworkdir.WorkdirInUse(error.path, error.owner,
                               advice="wait for it to finish or pass another --workdir")


def holds_workdir(run):
  """Decorates a program's `run(config, workdir)` to hold the workdir for the whole run.

  The workdir is made when missing and locked (fmjax.workdir.hold): a second run on it is
  refused at once, naming the process that holds it; a run that fails before training
  leaves no new workdir behind.
  """
  @functools.wraps(run)
  def run_holding_workdir(config, workdir: str, *args, **kwargs):
    with contextlib.ExitStack() as stack:
      try:
        stack.enter_context(fworkdir.hold(workdir))
      except fworkdir.WorkdirInUse as e:
        raise _in_use(e) from None
      except OSError as e:
        raise _unwritable(workdir, e) from None
      return run(config, workdir, *args, **kwargs)
  return run_holding_workdir


def refuse_changed_settings(config, workdir: str, settings) -> None:
  """Refuses to resume `workdir` with other values of the settings its saved work depends on.

  A resumed run keeps what the earlier one saved: its tokenizer, and checkpoints whose
  embeddings are that tokenizer's ids. A changed tokenizer setting would be half-applied
  (ignored, yet recorded in config.json), so it is refused instead, before anything is
  read or written. Compared with the earlier run's WORKDIR/config.json; a new workdir (no
  config.json) passes.

  Args:
    config: this run's config.
    workdir: the workdir.
    settings: config -> the config keys ("data.tokenizer", ...) that decide the tokenizer
      a run with that config builds; the keys of both runs are compared.

  Raises:
    ValueError: a changed key, named as its flag with both values and what to do.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = ml_collections.ConfigDict(json.load(f))
  try:
    keys = dict.fromkeys([*settings(config), *settings(saved)])
  except (KeyError, AttributeError):  # a config.json of an older version, without a key
    keys = dict.fromkeys(settings(config))
  for key in keys:
    old, new = _lookup(saved, key), _lookup(config, key)
    if old is not _MISSING and old != new:
      raise ValueError(
          f"--config.{key}={new!r}: the run in {workdir} was made with {key}={old!r} (its "
          f"config.json), and resuming it keeps the tokenizer and checkpoints it saved; set "
          f"it back to {old!r} (drop the override) to resume, or pass a new --workdir to "
          f"start a run with {new!r}")


_MISSING = object()


def _lookup(config, key: str):
  """config's value at the dotted `key`, or _MISSING."""
  node = config
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return _MISSING
    node = node[part]
  return node


def model_config(cls, cfg, tokenizer):
  """Builds the model's frozen dataclass from config.model; vocab_size -1 takes the tokenizer's."""
  fields = dict(cfg)
  unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
  if unknown:
    raise ValueError(f"config.model has keys {sorted(unknown)} that {cls.__name__} does not know")
  if fields.get("vocab_size", -1) == -1:
    fields["vocab_size"] = tokenizer.vocab_size
  elif fields["vocab_size"] < tokenizer.vocab_size:
    raise ValueError(f"config.model.vocab_size={fields['vocab_size']} is smaller than the "
                     f"tokenizer's vocabulary ({tokenizer.vocab_size}); use -1 to take the tokenizer's")
  return as_flags(cls, "config.model", **fields)


def runtime(config) -> Runtime:
  """config.runtime as a Runtime (bad values named as the flag that sets them)."""
  return as_flags(Runtime, "config.runtime", **config.runtime)


def as_flags(cls, where: str, **fields):
  """cls(**fields), its validation errors ("Cls.field=...") naming `where`.field instead."""
  try:
    return cls(**fields)
  except ValueError as e:
    raise ValueError(str(e).replace(f"{cls.__name__}.", f"{where}.", 1)) from None


def adapters(config, model, example_args, keep: tuple[str, ...] = ()):
  """LoRA from config.lora: the model wrapped in fmjax.lora.LoraModel and the Task fields.

  config.lora.rank 0 (or no config.lora): the model as it is, every parameter trained.

  Args:
    config: the run config.
    model: the program's model.
    example_args: its example inputs (the targets are checked against its Dense layers now).
    keep: path prefixes trained in full beside the adapters (a new head: PEFT's
      modules_to_save).

  Returns:
    (model, {"trainable": mask fn, "new_params": fmjax.lora.NEW_PARAMS}, spec) with LoRA;
    (model, {}, None) without.

  Raises:
    ValueError: a bad config.lora value or a target matching no Dense layer, naming the flag.
  """
  c = config.get("lora")
  if c is None or c.rank == 0:
    return model, {}, None
  import jax
  from fmjax import lora
  targets = tuple(p.strip() for p in c.targets.split(",") if p.strip()) or lora.DEFAULT_TARGETS
  spec = as_flags(lora.LoraSpec, "config.lora", rank=c.rank, alpha=float(c.alpha),
                  dropout=float(c.dropout), targets=targets, modules_to_save=tuple(keep))
  wrapped = lora.LoraModel(model, spec)
  rng = jax.random.key(0)
  try:
    jax.eval_shape(lambda: wrapped.init({"params": rng, "dropout": rng}, *example_args))
  except ValueError as e:
    if "LoraSpec.targets" not in str(e):
      raise
    raise ValueError(str(e).replace("LoraSpec.targets:", f"--config.lora.targets={c.targets}:")
                     + "; set --config.lora.targets to patterns among them") from None
  return wrapped, {"trainable": functools.partial(lora.trainable_mask, spec=spec),
                   "new_params": lora.NEW_PARAMS}, spec


def plan_memory(config, make_model, example_args, shape, run: Runtime,
                length_flag: str | None = "--config.data.seq_len", trainable=None):
  """The per-device memory plan of this run, before anything is compiled; refuses one that
  does not fit.

  The budget is config.train.memory_budget_gb, or (0) what the device reports (on CPU the
  host's free RAM, fmjax.memory.device_memory_bytes). An "auto" attention kernel is planned
  as the one fmjax.attention will pick for this length (e.g. chunked for long sequences).

  Args:
    make_model: Runtime -> the model (a Flax module).
    example_args: inputs for its init.
    shape: the fmjax.memory.Shape of a step (its runtime fields are filled in here).
    run: the runtime from config.runtime.
    length_flag: the flag that sets shape.seq_len, named in the advice (None: no such flag,
      e.g. ViT's tokens per image).
    trainable: params -> tree of bools (fmjax.lora.trainable_mask): optimizer state and
      gradients are planned for those leaves only; None: every parameter.
  Returns:
    (runtime, accum_steps, a line describing the plan for Task.notes). With
    config.train.auto_memory: the remat policy (with scanned layers) and the accumulation of
    the cheapest plan that fits; else `run` and config.train.accum_steps.
  Raises:
    ValueError: the plan (auto_memory: every plan) is over budget, unless
      config.train.allow_over_budget; one line with the plan, what dominates it and the
      settings that would fit (or what to lower when nothing does).
  """
  import flax.linen as nn
  import jax
  from fmjax import memory, sharding
  mesh = sharding.make_mesh(dict(config.mesh))
  rules = sharding.get_rules(config.sharding)
  rng = jax.random.key(0)
  abstract = jax.eval_shape(lambda: make_model(run).init(
      {"params": rng, "dropout": rng}, *example_args)["params"])
  shardings = sharding.shardings_of(abstract, mesh, rules)
  params = nn.meta.unbox(abstract)
  trained = None if trainable is None else nn.meta.unbox(trainable(abstract))
  t = config.train
  budget = int(t.memory_budget_gb * memory.GiB) or memory.device_memory_bytes()
  shape = dataclasses.replace(shape, compute_bytes=run.compute_dtype.itemsize,
                              attention_impl=attention_kernel(run, shape),
                              scan_layers=run.scan_layers)
  search = lambda s: memory.search(params, shardings, dataclasses.replace(s, scan_layers=True),
                                   budget=budget, trainable=trained)
  accum_steps = t.accum_steps
  if t.auto_memory:
    plan, smallest = search(shape)
    if plan is None:
      if not t.get("allow_over_budget", False):
        raise ValueError(over_budget(smallest, shape, search, run, t, length_flag,
                                     memory.mesh_shape_of(shardings)))
      plan = smallest
    if plan.remat_policy != "none":
      run = dataclasses.replace(run, remat_policy=plan.remat_policy, scan_layers=True)
    accum_steps = plan.accum_steps
  else:
    plan = memory.estimate(params, shardings, shape, remat_policy=run.remat_policy,
                           accum_steps=accum_steps, budget=budget, trainable=trained)
    if not plan.fits and not t.get("allow_over_budget", False):
      raise ValueError(over_budget(plan, shape, search, run, t, length_flag,
                                   memory.mesh_shape_of(shardings)))
  note = plan.describe() + ("" if plan.fits else
                             " -- over budget; compiling anyway (train.allow_over_budget)")
  return run, accum_steps, note


def attention_kernel(run: Runtime, shape) -> str:
  """The attention kernel a step of `shape` runs under `run` ("auto" resolved as
  fmjax.attention resolves it: by backend, dtype and length)."""
  if run.attention_impl != "auto":
    return run.attention_impl
  import jax
  from fmjax import attention
  q = jax.ShapeDtypeStruct((1, shape.seq_len, shape.num_heads,
                            shape.embed_dim // shape.num_heads), run.compute_dtype)
  # pylint: disable-next=protected-access  (the rule lives once, in fmjax.attention)
  return attention._auto_impl(q, shape.seq_len, run.attention_dropout_rate > 0, False)


def over_budget(plan, shape, search, run: Runtime, t, length_flag: str | None,
                mesh_shape) -> str:
  """The refusal of a plan over budget: the plan, what dominates it, and what would fit.

  Args:
    plan: the fmjax.memory.Plan over budget (with auto_memory: the smallest of all).
    shape: the step's fmjax.memory.Shape.
    search: Shape -> (cheapest fitting Plan or None, smallest Plan), layers scanned.
    run: the run's Runtime (its attention kernel, for other lengths).
    t: config.train.
    length_flag: the flag that sets shape.seq_len, or None.
    mesh_shape: {mesh axis: size}.
  Returns:
    One line (no trailing period).
  """
  import jax
  from fmjax import memory, sharding
  g = memory.human
  device = (f"{memory.HOST_FRACTION:.0%} of this host's free RAM" if jax.default_backend() == "cpu"
            else "what the device reports")
  source = (f"--config.train.memory_budget_gb={t.memory_budget_gb:g}" if t.memory_budget_gb
            else f"{device}; --config.train.memory_budget_gb sets it")
  parts = {"the parameters": plan.params, "the optimizer state": plan.optimizer,
           "the gradients": plan.gradients, "the activations": plan.activations}
  top = max(parts, key=parts.get)
  dominates = f"{top} {'dominates' if top.endswith('state') else 'dominate'} ({g(parts[top])})"
  if top == "the activations" and shape.attention_impl not in memory.FLASH_KERNELS:
    scores = plan.activations - memory.activation_bytes(
        dataclasses.replace(shape, attention_impl="chunked"), plan.remat_policy,
        plan.accum_steps, mesh_shape)
    if scores > plan.activations / 2:
      dominates += (f", {g(scores)} of them the {shape.attention_impl!r} attention kernel's "
                    "T x T scores")
  head = (f"memory plan: {g(plan.total)} per device needed (remat {plan.remat_policy!r}, "
          f"accum_steps {plan.accum_steps}), over the budget of {g(plan.budget)} ({source}); "
          f"{dominates}")
  fitting, smallest = (None, plan) if t.auto_memory else search(shape)
  if fitting is not None:
    accum = f"--config.train.accum_steps={fitting.accum_steps}"
    by_hand = (accum if fitting.remat_policy == "none" else
               f"--config.runtime.remat_policy={fitting.remat_policy} "
               f"--config.runtime.scan_layers=true {accum}")
    fix = (f"--config.train.auto_memory=true fits ({g(fitting.total)}: remat "
           f"{fitting.remat_policy!r}, accum_steps {fitting.accum_steps}), or the same by hand: "
           f"{by_hand}")
    return f"{head}. {fix}; or --config.train.allow_over_budget=true to compile anyway"
  length = f"{length_flag}={shape.seq_len}" if length_flag else f"{shape.seq_len} tokens"
  fix = (f"nothing fits at --config.train.batch_size={shape.batch_size} and {length}: "
         f"the smallest plan (remat {smallest.remat_policy!r}, "
         f"accum_steps {smallest.accum_steps}) needs {g(smallest.total)}")
  fixed = smallest.params + smallest.optimizer + smallest.gradients
  if fixed > plan.budget:
    ways = [f"the parameters, optimizer state and gradients alone need {g(fixed)}: shard them "
            "over more devices (--config.mesh.fsdp) or train a smaller model"]
  else:
    ways = []
    auto = " with --config.train.auto_memory=true"
    if shape.attention_impl not in memory.FLASH_KERNELS:
      chunked, _ = search(dataclasses.replace(shape, attention_impl="chunked"))
      if chunked is not None:
        ways.append(f"--config.runtime.attention_impl=chunked{auto} fits ({g(chunked.total)})")
    if shape.compute_bytes > 2:
      half, _ = search(dataclasses.replace(shape, compute_bytes=2))
      if half is not None:
        ways.append(f"--config.runtime.dtype=bfloat16{auto} fits ({g(half.total)})")
    at = lambda n: dataclasses.replace(shape, seq_len=n, attention_impl=attention_kernel(
        run, dataclasses.replace(shape, seq_len=n)))
    low, high = 0, shape.seq_len  # search(at(low)) fits (or low is 0); search(at(high)) does not
    while length_flag and high - low > 1:
      mid = (low + high) // 2
      low, high = (mid, high) if search(at(mid))[0] is not None else (low, mid)
    if low:
      ways.append(f"lower {length_flag} to {low} or less{auto}")
    per_device = max(1, shape.batch_size // sharding.batch_shards(mesh_shape))
    if per_device // smallest.accum_steps > 1:
      ways.append("lower --config.train.batch_size")
    ways = ways or ["train a smaller model"]
  return (f"{head}. {fix}; " + "; or ".join(ways) +
          "; or --config.train.allow_over_budget=true to compile anyway")


def report(workdir: str, last: dict) -> None:
  """Tells the user where everything went (process 0 only: one writer)."""
  import jax
  if jax.process_index() != 0:
    return
  keys = ("train/loss", "eval/loss", "eval/accuracy", "eval/f1", "eval/mcc", "eval/pearson",
          "eval/spearman", "eval/exact_match", "eval/masked_lm_accuracy",
          "eval/next_sentence_accuracy", "tokens_per_second", "mfu")
  summary = ", ".join(f"{k}={last[k]:.4g}" for k in keys if k in last)
  where = [("metrics.jsonl", "metrics:     {} (and loss_curve.png)"),
           ("tensorboard", "tensorboard: tensorboard --logdir {}"),
           ("checkpoints", "checkpoints: {}"), ("tokenizer", "tokenizer:   {}")]
  lines = [f"  {line.format(os.path.join(workdir, name))}" for name, line in where
           if os.path.exists(os.path.join(workdir, name))]  # e.g. ViT has no tokenizer
  print(f"\nfinal: {summary}\nworkdir: {os.path.abspath(workdir)}\n" + "\n".join(lines))


def fail(message: str, *, at_once: bool = False) -> None:
  """Reports an error the user can fix as one line on stderr and exits with status 2.

  at_once: exit without interpreter shutdown, once every save was waited for. A failed
  orbax restore leaves asyncio callbacks behind that print tracebacks at shutdown ("Event
  loop is closed"), burying the one line that says what to do.
  """
  print("error: " + " ".join(str(message).split()), file=sys.stderr)
  if at_once:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)  # pylint: disable=protected-access
  sys.exit(2)


def _unknown_override(argv) -> str | None:
  """Names the first --config.a.b=value in argv whose path is not a field of the config."""
  config_file = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")),
                     next((b for a, b in zip(argv, argv[1:]) if a == "--config"), None))
  if config_file is None:
    return None
  config = FLAGS["config"].parser.parse(config_file)  # as the file makes it, before overrides
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    node, where = config, "config"
    for key in arg[len("--config."):].split("=", 1)[0].split("."):
      if not isinstance(node, ml_collections.ConfigDict):
        return f"{arg}: {where} is the {type(node).__name__} {node!r}, it has no key {key!r}"
      if key not in node:
        close = difflib.get_close_matches(key, list(node.keys()), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"its keys are {sorted(node.keys())}"
        return f"{arg}: {where} has no key {key!r}; {hint}"
      node, where = node[key], f"{where}.{key}"
  return None


def parse_flags(argv):
  """absl's flag parsing, but a bad --config file or override is one `error:` line (exit 2)."""
  try:
    args = FLAGS(argv)
    if _CONFIG.value is not None:
      _CONFIG.value.keys()  # ml_collections defers a config file's load error to first use
    return args
  except (flags.Error, KeyError, AttributeError, OSError) as e:
    if os.environ.get("FMJAX_DEBUG"):
      raise
    if isinstance(e, (KeyError, AttributeError)):  # an override naming no config field
      fail(_unknown_override(argv) or repr(e))
    # A config file that failed to load gives a multi-line report ending with the cause.
    lines = str(e).strip().splitlines()
    fail(lines[0] if len(lines) == 1 else f"--config: {lines[-1]}")


def main(run, argv) -> None:
  """absl entry point shared by the programs."""
  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if FLAGS.workdir is None or _CONFIG.value is None:
      raise app.UsageError("both --config=FILE:VARIANT and --workdir=DIR are required")
    absl_logging.set_verbosity(absl_logging.ERROR)  # tfds and orbax chatter (the root logger)
    # fmjax's own progress lines (model size, resumed from ...) get their own handler, which
    # the root logger's ERROR level set just above would otherwise silence.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    fmjax_log = logging.getLogger("fmjax")
    fmjax_log.handlers, fmjax_log.propagate = [handler], False
    fmjax_log.setLevel(logging.INFO)
    import tensorflow_datasets as tfds  # here, not when a notebook imports a program
    tfds.disable_progress_bar()
    if not os.environ.get("FMJAX_DEBUG"):
      # orbax logs the failures of its writer threads with tracebacks; fmjax.checkpoint
      # reports them as one error line (with the checkpoints still good).
      absl_logging.get_absl_handler().addFilter(
          lambda record: f"{os.sep}orbax{os.sep}" not in record.pathname)
    initialize_distributed()
    enable_compilation_cache()
    try:
      with ExitOnSignal():  # outside training steps a signal exits at once, even mid-compile
        run(_CONFIG.value, FLAGS.workdir)
    except Interrupted as e:  # SIGTERM/SIGINT: fit saved a checkpoint, then stopped
      print(f"{e}", file=sys.stderr)
      sys.exit(128 + e.signum)  # as a shell reports a process ended by that signal
    except KeyboardInterrupt:  # a second Ctrl-C (or one before training): no waiting
      print("interrupted: exited at once, without saving; rerunning the same command resumes "
            "from the last complete checkpoint", file=sys.stderr)
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(130)  # pylint: disable=protected-access  (skips waiting for background saves)
    except EXPECTED_ERRORS as e:
      if os.environ.get("FMJAX_DEBUG"):
        raise
      import jax
      # fit closed its checkpointer (waiting for saves) before the error got here. With
      # several processes, the normal shutdown keeps jax.distributed's exit barrier.
      fail(explain(e), at_once=jax.process_count() == 1)
  app.run(_main, argv, flags_parser=parse_flags)
