"""The training loop every program shares: shard, init or resume, step, log, evaluate, save.

A program (train/pretrain_gpt.py, ...) supplies the model, its loss and its data; `fit`
does the rest, identically for every task:

  mesh + rules -> (restore | sharded init) -> jit once -> loop:
      batch -> train_step -> [log: metrics.jsonl, TensorBoard, tqdm] -> [eval] -> [save]

Throughput (tokens_per_second, mfu) leaves out the steps that compiled (the first, and the
first of each new batch shape): their time is logged on its own. Where stderr is not a
terminal, the tqdm bar gives way to one plain line per logged row (`Progress`).

Run config keys read here (see configs/*.py): seed, mesh.{data,fsdp,tensor}, sharding,
train.{batch_size, learning_rate, decay, end_factor, weight_decay, b1, b2, eps, grad_clip,
log_every, eval_every, save_every, keep_checkpoints, skip_nonfinite}. What a program resolves
comes as typed values, never written back into the config: the `Schedule` (steps, warmup,
accumulation; `resolve_schedule` reads train.{steps, epochs, warmup_steps, warmup_fraction,
accum_steps}), the `fmjax.sources.Source` of the first weights, and the model's
`fmjax.runtime.Runtime` (a field of the model). WORKDIR/config.json records the run config
with these resolved values filled in.

Reliability (what a run does when things go wrong):
  SIGTERM (a Cloud TPU VM's preemption notice) or SIGINT (Ctrl-C): the current step
      finishes, a checkpoint is saved, and `fit` raises `Interrupted` (the programs exit
      with 128 + the signal number: 143, 130). A second signal gets the process's usual
      behaviour at once (termination; KeyboardInterrupt). All processes of a multi-process
      run stop at the same step: the flags are all-reduced every step, one step behind.
      Until the first step has finished (restore, init, compiling and running it) a
      program's one process exits at once instead, even inside a long C call, the
      checkpoints as they were (ExitOnSignal).
  kill -9, power loss: checkpoints are written to a temporary directory and renamed when
      complete (orbax), so the rerun resumes from the last complete one; metrics.jsonl
      rows past it are dropped (metrics.MetricsWriter), so the resumed run's file equals
      an uninterrupted run's.
  NaN or inf loss, gradients or update: the train step leaves the state unchanged
      (training.make_train_step). When the metrics are next read (log and save steps, so
      no extra host synchronisation) `fit` raises `NonFiniteError`, naming the step and
      the last good checkpoint, before anything after that step is saved; with
      train.skip_nonfinite it goes on and logs the count as `skipped_steps`.
"""

import copy
import dataclasses
import itertools
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from fmjax import checkpoint, metrics, sharding, sources, training
from fmjax import workdir as workdir_lock
from fmjax.errors import ArgumentError

log = logging.getLogger("fmjax")
_write_atomically = metrics.write_atomically  # BestTracker.update's `metrics` is a dict


@dataclasses.dataclass
class Task:
  """What a program hands to `fit`.

  Attributes:
    model: the Flax module; `init_args(batch)` gives the positional args for model.init.
      Its `runtime` field (fmjax models have one) is recorded with the checkpoints.
    model_config: its architecture, a config dataclass (or a dict of them), stored with
      checkpoints to recognise them; runtime choices do not belong in it.
    loss_fn: (params, batch, rng, train) -> (loss, metrics dict).
    train_data: iterator of host-local numpy batches with get_state()/set_state().
    eval_data: () -> iterable of host-local numpy batches, or None.
    example_batch: one host-local batch (numpy), for shapes at init.
    init_args: batch -> tuple of example inputs for model.init.
    flops_per_example: training FLOPs per example (for MFU); tokens_per_example for tokens/s.
    predict_fn: optional (params, batch) -> dict of per-example outputs (B, ...), pure; fit
      jits it on the mesh for `score_fn`.
    score_fn: optional (predict) -> {"eval/...": value}, where predict(host batch) returns
      predict_fn's outputs for the whole global batch as numpy: task metrics that need every
      prediction at once (accuracy, F1, Spearman, SQuAD exact match).
    new_params: path prefixes (e.g. "classifier") that the source of the first weights need
      not supply: the task's new head, initialised fresh.
    notes: lines to log once the run has passed its checks (e.g. the memory plan).
    trainable: params -> tree of bools (e.g. fmjax.lora.trainable_mask): only those leaves
      are trained and have optimizer state (a frozen base); None: every parameter.
    post_update: (params, batch, rng) -> params, applied to the parameters after each optimizer
      step, inside the jitted step (training.make_train_step), e.g. a VQ-VAE's EMA codebook.
    images_fn: optional (predict) -> {name: (H, W, C) uint8 image}, predict as for score_fn:
      pictures of the current params at each evaluation (e.g. samples for fixed prompts),
      written to WORKDIR/<name>/step_XXXXXX.png and to TensorBoard.
  """
  model: Any
  model_config: Any
  loss_fn: Callable
  train_data: Any
  eval_data: Callable[[], Iterator[dict]] | None
  example_batch: dict
  init_args: Callable[[dict], tuple]
  flops_per_example: float
  tokens_per_example: int
  extra_meta: dict = dataclasses.field(default_factory=dict)
  predict_fn: Callable | None = None
  score_fn: Callable | None = None
  new_params: tuple[str, ...] = ()
  notes: tuple[str, ...] = ()  # lines logged once the run has passed its checks (memory plan)
  trainable: Callable | None = None
  post_update: Callable | None = None
  images_fn: Callable | None = None


@dataclasses.dataclass(frozen=True)
class Schedule:
  """How long a run trains, as resolved by its program (see `resolve_schedule`).

  Attributes:
    steps: optimizer steps in all (the learning-rate schedule spans them).
    warmup_steps: linear warmup steps at the start.
    accum_steps: micro-batches whose gradients make one step (gradient accumulation).
  """
  steps: int
  warmup_steps: int = 0
  accum_steps: int = 1

  def __post_init__(self):
    for name, low in (("steps", 1), ("warmup_steps", 0), ("accum_steps", 1)):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Schedule.{name}={value!r}: must be an integer >= {low}")


def resolve_schedule(t, num_examples: int | None = None, *,
                     accum_steps: int | None = None) -> Schedule:
  """The Schedule of run config `t` (config.train).

  An explicit train.steps > 0 wins; train.epochs (when the config has it) counts only with
  steps = 0, as steps = ceil(epochs * num_examples / batch_size); a config setting both logs
  that epochs is ignored. warmup_steps = warmup_fraction * steps when train.warmup_fraction
  > 0, else train.warmup_steps.

  Args:
    t: the run config's train block.
    num_examples: training examples per epoch (programs that train by epochs).
    accum_steps: the accumulation chosen by the memory planner; default train.accum_steps.

  Returns:
    The Schedule (steps, warmup_steps, accum_steps).

  Raises:
    ArgumentError: neither steps nor epochs set, a negative one, or epochs without
      num_examples (argument "train.steps" or "train.epochs").
  """
  epochs = float(t.get("epochs", 0.0))
  steps = int(t.steps)
  if steps < 0 or epochs < 0:
    raise ArgumentError(f"train.steps={t.steps} and train.epochs={epochs:g} must not be "
                        "negative", function="resolve_schedule",
                        argument="train.steps" if steps < 0 else "train.epochs")
  if steps > 0 and epochs > 0:
    log.warning("train.steps=%d is set: train.epochs=%g is ignored (set train.steps=0 to "
                "train by epochs)", steps, epochs)
  elif steps == 0 and epochs > 0:
    if num_examples is None:
      raise ArgumentError("train.epochs is set, but this caller trains by steps (it passes no "
                          "num_examples): set train.steps instead", function="resolve_schedule",
                          argument="train.epochs")
    steps = max(1, math.ceil(epochs * num_examples / t.batch_size))
    log.info("train.epochs=%g: %d steps of %d over %d examples", epochs, steps,
             t.batch_size, num_examples)
  elif steps == 0:
    raise ArgumentError("train.steps=0 and train.epochs=0: set one of them (steps wins when "
                        "both are set)", function="resolve_schedule", argument="train.steps")
  fraction = float(t.get("warmup_fraction", 0.0))
  warmup = int(fraction * steps) if fraction > 0 else int(t.warmup_steps)
  return Schedule(steps=steps, warmup_steps=warmup,
                  accum_steps=int(t.accum_steps if accum_steps is None else accum_steps))


def optimizer_from_config(t, schedule: Schedule | None = None):
  """AdamW of config.train `t`, its schedule spanning `schedule` (default: resolved from t).

  Args:
    t: the run config's train block (learning_rate, decay, end_factor, weight_decay, b1, b2,
      eps, grad_clip).
    schedule: the run's Schedule (its steps and warmup_steps shape the learning rate); None:
      `resolve_schedule(t)`.

  Returns:
    The optax GradientTransformation of training.make_optimizer.
  """
  schedule = schedule or resolve_schedule(t)
  return training.make_optimizer(
      learning_rate=t.learning_rate, total_steps=schedule.steps,
      warmup_steps=schedule.warmup_steps, decay=t.decay, end_factor=t.end_factor,
      weight_decay=t.weight_decay, b1=t.b1, b2=t.b2, eps=t.eps, grad_clip=t.grad_clip)


class Interrupted(KeyboardInterrupt):
  """`fit` stopped on SIGTERM or SIGINT after saving a checkpoint; rerun to resume.

  A KeyboardInterrupt, so that `except Exception` does not swallow it.

  Args:
    signum: the signal's number (the programs exit with 128 + signum).
    step: the step the run stopped (and saved) at.
    directory: the checkpoint directory.
    elsewhere: the signal reached another process of a multi-process run, not this one.
  """

  def __init__(self, signum: int, step: int, directory: str, elsewhere: bool = False):
    self.signum, self.step, self.directory = signum, step, directory
    by = "another process's signal" if elsewhere else signal.Signals(signum).name
    super().__init__(f"stopped by {by} at step {step}; checkpoint saved in {directory}; "
                     "rerun the same command to resume")


class NonFiniteError(ValueError):
  """A train step's loss, gradients or update were NaN or inf (and skip_nonfinite is off)."""


def fit(config, workdir: str, task: Task, *, schedule: Schedule | None = None,
        source: sources.Source | None = None, until: int | None = None):
  """Trains `task` for `schedule.steps`, resuming from workdir/checkpoints if present.

  Args:
    config: the run config (seed, mesh, sharding, optimizer and logging keys of train).
    workdir: checkpoints, metrics and config.json go here.
    task: the model, its loss and its data.
    schedule: steps, warmup and accumulation; default `resolve_schedule(config.train)`.
    source: the starting parameters when there is no checkpoint yet (the optimizer state
      and step start fresh); default `fmjax.sources.parse(config.init_from)`.
    until: stop earlier (the schedule still spans schedule.steps): a multi-phase recipe
      calls fit once per phase with that phase's data, e.g. BERT's 128 then 512 tokens.

  A checkpoint written under another runtime (attention kernel, remat, dtypes, dropout,
  scan_layers: its stacked layout is converted) resumes; another architecture is refused.
  With config.train.best_metric set (e.g. "eval/accuracy"), the params of the best
  evaluation so far are kept in workdir/best (see `best_params`).

  Returns:
    (final TrainingState, list of the last logged metrics).
  Raises:
    Interrupted: on SIGTERM/SIGINT, after saving (see the module docstring).
    NonFiniteError: a non-finite step without config.train.skip_nonfinite.
    checkpoint.CheckpointWriteError: a save failed (e.g. disk full).
    fmjax.workdir.WorkdirInUse: another process holds `workdir` (one run per workdir).
  """
  one_run = workdir_lock.hold(workdir)  # re-entrant: a program's run() holds it already
  # From the start: a signal during setup stops after step one, or under a program's
  # ExitOnSignal (one process) exits at once, the checkpoints as they were.
  with one_run, StopSignals(os.path.join(workdir, "checkpoints")) as stop:
    return _fit(config, workdir, task, schedule or resolve_schedule(config.train), source,
                until, stop)


def _fit(config, workdir: str, task: Task, plan: Schedule, source, until: int | None,
         stop: "StopSignals"):
  t = config.train
  runtime = getattr(task.model, "runtime", None)
  mesh = sharding.make_mesh(dict(config.mesh))
  rules = sharding.get_rules(config.sharding)
  check_batch_size(t.batch_size, plan.accum_steps, mesh)
  tx, schedule = optimizer_from_config(t, plan)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=t.save_every,
                                 keep=t.keep_checkpoints)
  signature = checkpoint.model_signature(task.model_config)
  start = ckpt.restorable_step(t.get("restore_step", 0))  # checked against its checksums
  end = plan.steps if until is None else until
  if start is not None:  # refuse another model's checkpoint before touching anything
    saved_meta = ckpt.check_compatible(signature, start)

  init = training.init_fn(task.model, tx, *task.init_args(task.example_batch),
                          trainable=task.trainable)
  rng = jax.random.key(config.seed)
  abstract = jax.eval_shape(init, rng)
  sharding.check_divisible(abstract, mesh, rules)
  shardings = sharding.shardings_of(abstract, mesh, rules)
  nonfinite = NonFiniteGuard(t.get("skip_nonfinite", False), t.log_every)
  if start is not None:
    target = checkpoint.abstract_with_shardings(nn.meta.unbox(abstract), shardings)
    saved_scan = checkpoint.saved_scan_layers(saved_meta)
    if runtime is not None and saved_scan != runtime.scan_layers:
      state, meta = _restore_other_layout(ckpt, start, task, tx, rng, mesh, rules, target,
                                          dataclasses.replace(runtime, scan_layers=saved_scan))
    else:
      state, meta = ckpt.restore(target, start)
    task.train_data.set_state(meta["data"])
    nonfinite.skipped = meta.get("skipped_steps", 0)
    log.info("resumed from %s step %d", ckpt.directory, start)
  else:
    state, _ = sharding.sharded_init(init, mesh, rules, rng)
    source = sources.parse(config.get("init_from", "")) if source is None else source
    if source:
      state = state.replace(params=source.load(state.params, shardings.params, task.new_params))
    start = 0

  train_step = training.make_train_step(task.loss_fn, tx, accum_steps=plan.accum_steps,
                                        schedule=schedule, trainable=task.trainable,
                                        post_update=task.post_update)
  eval_step = training.make_eval_step(task.loss_fn)
  with sharding.context(mesh, rules):
    p_train, p_eval = training.jit_steps(train_step, eval_step, shardings, mesh)
    p_eval = LogsCompiles(p_eval, "eval step")
    p_predict = None if task.predict_fn is None else LogsCompiles(jax.jit(
        task.predict_fn, in_shardings=(shardings.params, sharding.batch_sharding(mesh))),
        "predict step")
  best = BestTracker(workdir, t.best_metric)

  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
  n_trained = n_params if task.trainable is None else sum(
      int(np.prod(x.shape))
      for x in jax.tree_util.tree_leaves(training.partition(state.params, task.trainable)[0]))
  counts = {"trainable_params": n_trained, "total_params": n_params}
  compute_dtype = runtime.dtype if runtime is not None else "float32"
  peak, peak_source = metrics.peak_flops_per_device(dtype=compute_dtype)
  peak_total = peak * jax.device_count()
  log.info("model: %s parameters (%s trained); %.3g training FLOPs per token; peak %.3g "
           "FLOP/s per device (%s) x %d devices; mesh %s, rules %r", f"{n_params:,}",
           f"{n_trained:,}",
           task.flops_per_example / task.tokens_per_example, peak, peak_source,
           jax.device_count(), dict(mesh.shape), config.sharding)
  for note in task.notes:
    log.info("%s", note)

  ckpt.remove_unfinished()  # a save that a killed run left half-written (only now: as above)
  workdir_lock.held(workdir).keep()  # training starts: a failure from here on keeps the workdir
  if jax.process_index() == 0:  # recorded only now: a run refused above changes nothing
    resolved = resolved_config(config, plan, runtime, source, task.model_config)
    metrics.write_atomically(os.path.join(workdir, "config.json"),
                             resolved.to_json_best_effort(indent=2))
  writer = metrics.MetricsWriter(workdir, resume_step=start)
  counts = {} if writer.last else counts  # in metrics.jsonl's first row only
  ran = {"runtime": dataclasses.asdict(runtime)} if runtime is not None else {}
  meta = lambda: {"model": signature, **ran, "data": task.train_data.get_state(),
                  "seed": config.seed, **nonfinite.logged(), **task.extra_meta}
  bar = Progress(end, start, enabled=jax.process_index() == 0)
  last, window_start, window_steps = writer.last, time.perf_counter(), 0
  step, began = start, time.perf_counter()
  compiled = set()  # the batch shapes the train step was compiled for
  closers = [bar.close, ckpt.close, best.close, writer.close]
  # XLA's CPU runtime runs every device's part of a step on one shared thread pool. With
  # several steps in flight (and, with length buckets, several executables), the pool's
  # threads can all end up in a later step's collective waiting for a device whose earlier
  # step no thread is left to run: a 2-device finetune hung at 0% CPU. On CPU meshes one step
  # is in flight at a time; host and devices share the cores there, so little overlap is lost.
  one_in_flight = jax.default_backend() == "cpu" and jax.local_device_count() > 1
  try:
    with sharding.context(mesh, rules):
      while step < end:
        batch = sharding.shard_batch(next(task.train_data), mesh)
        shape = _batch_shape(batch)
        compiles = shape not in compiled  # the first step, and the first of each bucket
        if compiles:
          compiled.add(shape)
          jax.block_until_ready(state)  # the steps before this one are the window's
          compile_began = time.perf_counter()
        state, step_metrics = p_train(state, batch, rng)
        if one_in_flight or compiles:
          jax.block_until_ready(step_metrics)
        step += 1
        if compiles:  # its time is left out of the throughput, and logged on its own
          compile_s = time.perf_counter() - compile_began
          window_start += compile_s
          log.info("compiled the train step for batch shape %s in %.1f s (step %d; left out "
                   "of tokens_per_second and mfu)", _describe_shape(shape), compile_s, step)
        else:
          window_steps += 1
        bar.update(1)
        nonfinite.add(step, step_metrics)
        out_of_time = bool(t.time_budget_s) and time.perf_counter() - began > t.time_budget_s
        final = step == end or out_of_time
        signalled = stop.agreed(step_metrics) and not final
        log_now = step % t.log_every == 0 or final  # a signal adds no row: as if uninterrupted
        if log_now or final or signalled or ckpt.due(step):
          nonfinite.check(ckpt)  # before anything is saved; these steps are waited for anyway
        if log_now:
          m = jax.device_get(step_metrics)  # waits for the step: the window's time is all compute
          m.pop("nonfinite")
          m.update(nonfinite.logged())
          if window_steps:  # none when every step since the last row compiled
            examples_per_s = window_steps * t.batch_size / (time.perf_counter() - window_start)
            m["tokens_per_second"] = examples_per_s * task.tokens_per_example
            try:
              m["mfu"] = metrics.mfu(examples_per_s * task.flops_per_example, peak_total)
            except ValueError:  # a peak cached on a loaded machine reads low: measure it again
              peak, peak_source = metrics.peak_flops_per_device(remeasure=True,
                                                                dtype=compute_dtype)
              peak_total = peak * jax.device_count()
              log.info("peak measured again (%s): %.3g FLOP/s per device", peak_source, peak)
              m["mfu"] = metrics.mfu(examples_per_s * task.flops_per_example, peak_total)
          if step % t.eval_every == 0 or final:
            m.update(evaluate_if(task, p_eval, p_predict, state, mesh))
            if task.images_fn is not None:
              writer.write_images(step, task.images_fn(lambda batch: to_host(p_predict(
                  state.params, sharding.shard_batch(batch, mesh)))))
            best.update(step, m, state)
          writer.write(step, {**counts, **m})
          counts = {}
          last = m
          bar.show(step, m)
        if ckpt.save(step, state, meta(), force=final or signalled) or step % t.log_every == 0:
          window_start, window_steps = time.perf_counter(), 0  # eval and saving are not throughput
        if out_of_time:
          log.info("time budget of %.0f s reached at step %d", t.time_budget_s, step)
          break
        if signalled:
          ckpt.close()  # the checkpoint is complete before the process may be killed
          raise Interrupted(stop.received or signal.SIGTERM, step, ckpt.directory,
                            elsewhere=stop.received is None)
  except KeyboardInterrupt as e:
    if not isinstance(e, Interrupted):  # a second signal: at once, without waiting for saves
      raise
    _close_quietly(closers)
    raise
  except BaseException:
    _close_quietly(closers)
    raise
  for close in closers:
    close()
  return state, last


def _in_a_notebook() -> bool:
  """Whether this process is a Jupyter kernel running cells (not merely one that imported
  ipykernel, as a notebook-running test or tool does)."""
  ipython = sys.modules.get("IPython")
  shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
  return shell is not None and hasattr(shell, "kernel")


class Progress:
  """The training loop's progress: tqdm's bar where it is seen live (a terminal, a notebook);
  elsewhere, e.g. a log redirected to a file, one plain line per logged row (`progress_line`),
  since the bar's carriage returns would make the whole log one huge line.

  Args:
    total: the step the run ends at.
    initial: the step it starts from.
    enabled: show anything at all (process 0 of a multi-process run).
  """

  def __init__(self, total: int, initial: int, *, enabled: bool = True):
    live = sys.stderr.isatty() or _in_a_notebook()  # tqdm writes to stderr
    self.total, self.began, self.lines = total, time.perf_counter(), enabled and not live
    self.bar = tqdm.tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True,
                         disable=not (enabled and live))

  def update(self, steps: int) -> None:
    """Advances the bar.

    Args:
      steps: the steps just done.
    """
    self.bar.update(steps)

  def show(self, step: int, row: dict) -> None:
    """Shows a logged metrics row: the bar's postfix, or a plain line on the fmjax logger.

    Args:
      step: the step the row is of.
      row: its metrics.
    """
    self.bar.set_postfix({k.split("/")[-1] if k.startswith("train/") else k: f"{float(v):.4g}"
                          for k, v in row.items() if k in ("train/loss", "eval/loss",
                                                           "tokens_per_second", "mfu")})
    if self.lines:
      log.info("%s", progress_line(step, self.total, row, time.perf_counter() - self.began))

  def close(self) -> None:
    """Closes the bar."""
    self.bar.close()


def progress_line(step: int, total: int, row: dict, elapsed: float) -> str:
  """One plain-text progress line, e.g.
  "step 20/100: loss 2.345, eval/loss 2.401, 1.23e+04 tokens/s, mfu 0.0123, 12.3 s elapsed".

  Args:
    step: the step just done.
    total: the step the run ends at.
    row: the step's logged metrics (train/loss, eval/..., tokens_per_second, mfu: any
      may be missing).
    elapsed: seconds since the training loop began.

  Returns:
    The line (no carriage return, no newline).
  """
  parts = [f"loss {_number(row['train/loss'])}"] if "train/loss" in row else []
  parts += [f"{k} {_number(v)}" for k, v in row.items() if k.startswith("eval/")]
  if "tokens_per_second" in row:
    parts.append(f"{row['tokens_per_second']:.4g} tokens/s")
  if "mfu" in row:
    parts.append(f"mfu {row['mfu']:.3g}")
  parts.append(f"{elapsed:.1f} s elapsed")
  return f"step {step}/{total}: " + ", ".join(parts)


def _number(value) -> str:
  """A metric for a log line: 4 significant digits when it is a number (numpy ones included)."""
  try:
    return f"{float(value):.4g}"
  except (TypeError, ValueError):
    return str(value)


def _batch_shape(batch) -> tuple:
  """What the train step is compiled for: each leaf's path, shape and dtype."""
  return tuple((jax.tree_util.keystr(path), tuple(x.shape), str(x.dtype))
               for path, x in jax.tree_util.tree_leaves_with_path(batch))


def _describe_shape(shape: tuple) -> str:
  """The distinct array shapes of a `_batch_shape`, e.g. "(32, 64)" or "(32, 48), (32, 64)"."""
  return ", ".join(dict.fromkeys(str(s) for _, s, _ in shape))


def _restore_other_layout(ckpt, step, task, tx, rng, mesh, rules, target, saved_runtime):
  """(state, meta) of a checkpoint written with the other scan_layers: restored in its own
  (stacked or per-layer) layout, then converted into `target`'s layout and shardings."""
  saved_model = task.model.clone(runtime=saved_runtime)
  abstract = jax.eval_shape(training.init_fn(saved_model, tx, *task.init_args(task.example_batch),
                                             trainable=task.trainable), rng)
  saved, meta = ckpt.restore(checkpoint.abstract_with_shardings(
      nn.meta.unbox(abstract), sharding.shardings_of(abstract, mesh, rules)), step)
  flat = checkpoint.convert_layout(checkpoint.flatten_params(saved),
                                   not saved_runtime.scan_layers, stack=jnp.stack)
  log.info("checkpoint step %d was written with scan_layers=%s: its layers were %s", step,
           saved_runtime.scan_layers, "unstacked" if saved_runtime.scan_layers else "stacked")
  state = jax.tree_util.tree_map_with_path(
      lambda path, t: jax.device_put(flat[checkpoint.path_str(path)].astype(t.dtype),
                                     t.sharding), target)
  return state, meta


def resolved_config(config, schedule: Schedule, runtime, source, model_config):
  """A copy of the run config with what the run resolved filled in (for config.json).

  The schedule, the runtime, the source of the first weights and, in config.model, the
  fields of the architecture built.

  Args:
    config: the run config (an ml_collections.ConfigDict); not modified.
    schedule: the run's Schedule (train.steps, warmup_steps, accum_steps are set from it).
    runtime: the model's Runtime (stored as config.runtime), or None.
    source: the Source of the first weights (its spec stored as config.init_from), or None.
    model_config: the architecture built; its fields replace the config.model keys of the
      same name.

  Returns:
    The resolved deep copy of `config`.
  """
  resolved = copy.deepcopy(config)
  with resolved.unlocked():
    t = resolved.train
    t.steps, t.warmup_steps, t.accum_steps = (schedule.steps, schedule.warmup_steps,
                                              schedule.accum_steps)
    if runtime is not None:
      resolved.runtime = ml_collections.ConfigDict(dataclasses.asdict(runtime))
    if source is not None:
      resolved.init_from = source.spec
    built = checkpoint.model_signature(model_config)
    for key in resolved.model.keys() if "model" in resolved else ():
      if key in built:  # e.g. vocab_size -1 -> the tokenizer's; init_from's architecture
        resolved.model[key] = built[key]
  return resolved


def check_batch_size(batch_size: int, accum_steps: int, mesh) -> None:
  """Checks that each micro-batch splits evenly over the mesh's batch shards (data x fsdp).

  A micro-batch is batch_size / accum_steps examples; refused here, before JAX reports it as
  a sharding error.

  Args:
    batch_size: the global batch size.
    accum_steps: gradient accumulation steps (micro-batches per step).
    mesh: the jax.sharding.Mesh.

  Raises:
    ValueError: accum_steps does not divide batch_size, or the batch shards do not divide
      the micro-batch.
  """
  shards = sharding.batch_shards(mesh)
  if batch_size % accum_steps or (batch_size // accum_steps) % shards:
    accum = f" in {accum_steps} micro-batches" if accum_steps > 1 else ""
    raise ArgumentError(
        f"batch_size={batch_size} does not split evenly{accum} over the {shards} batch shards "
        f"of the mesh {dict(mesh.shape)} (data x fsdp); use a multiple of "
        f"{shards * accum_steps}, or another mesh", function="check_batch_size",
        argument="batch_size")


def _close_quietly(closers):
  """Runs each closer, ignoring their own failures (the first error is the one reported)."""
  for close in closers:
    try:
      close()
    except Exception:  # pylint: disable=broad-except
      pass


class StopSignals:
  """SIGTERM and SIGINT handlers for the duration of a `with` block (`fit`).

  Once training steps flow (the first step has finished), the first signal only sets `received`:
  the step finishes, a checkpoint is saved and fit stops. The previous handlers come back at
  once, so a second signal acts as it would have without fit (SIGTERM terminates, Ctrl-C
  raises KeyboardInterrupt; under a program's ExitOnSignal: exits at once). Before that (the
  restore, the init, compiling and running the first step) no step could take that path
  soon: the first step of a run too big for its machine may take an hour. A program's
  `ExitOnSignal` (train/common.main) then ends a one-process run at once, with a line saying
  the checkpoints are as they were. Without one (a notebook) or with several processes (which
  must stop at the same step) the signal is kept, and the run stops after its first step.
  Handlers can only be installed from the main thread; elsewhere signals keep their usual
  behaviour.

  Args:
    directory: the run's checkpoint directory, named when a signal ends the setup.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, directory: str | None = None):
    self.received = None
    self.directory = directory
    self._first = None  # the first step's outputs, until they are computed
    self._stepped = False
    self._previous = {}
    self._outer = None  # the program's ExitOnSignal, if any
    self._pending = None  # multi-process: the all-reduce of the flags started last step
    self._reduce = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
      outer = self._previous[signal.SIGTERM]
      if isinstance(outer, ExitOnSignal):
        self._outer = outer.attach(self)
    return self

  def __exit__(self, *exc):
    self._restore()
    if self._outer is not None:
      self._outer.attach(None)
      self._outer = None

  def _restore(self):
    for s, handler in self._previous.items():
      signal.signal(s, signal.SIG_DFL if handler is None else handler)
    self._previous = {}

  @property
  def stepping(self) -> bool:
    """Whether training steps flow: the first step's outputs (given to `agreed`) are computed."""
    if not self._stepped and self._first is not None:
      self._stepped = all(x.is_ready() for x in jax.tree_util.tree_leaves(self._first)
                          if hasattr(x, "is_ready"))
      if self._stepped:
        self._first = None
    return self._stepped

  def ends_setup(self) -> bool:
    """Whether a signal now ends the process at once.

    Returns:
      True before the first step finished, in a one-process run, under a program's
      ExitOnSignal.
    """
    return self._outer is not None and not self.stepping and jax.process_count() == 1

  def setup_line(self, signum: int) -> str:
    """The line a signal that ends the setup leaves: where the checkpoints stand.

    Args:
      signum: the signal's number.

    Returns:
      "interrupted by SIGTERM during setup, before step N+1 finished: exited at once, without
      saving; the last checkpoint (step N) in DIR is untouched; rerunning ... resumes from it".
    """
    name = signal.Signals(signum).name
    try:
      steps = [int(n) for n in os.listdir(self.directory) if n.isdigit()] if self.directory else []
    except OSError:  # not there yet, or not a local path (gs://)
      steps = []
    where = (f"the last checkpoint (step {max(steps)}) in {self.directory} is untouched; "
             "rerunning the same command resumes from it" if steps else
             "no checkpoint was saved yet; rerunning the same command starts afresh")
    at = f"step {max(steps) + 1}" if steps else "the first step"
    return (f"interrupted by {name} during setup, before {at} finished: exited at once, "
            f"without saving; {where}")

  def _handle(self, signum, frame):
    del frame
    if self.ends_setup():  # nothing to save yet: the program's ExitOnSignal exits
      raise SignalExit(signum, self.setup_line(signum))
    self.received = signum
    self._restore()
    log.warning("%s received: finishing this step, saving a checkpoint and stopping (send "
                "it again to exit at once, without saving)", signal.Signals(signum).name)

  def agreed(self, step_outputs=None) -> bool:
    """Whether to stop after the current step: the same answer on every process.

    One process: the flag. Several: the maximum over processes of the flags as they were
    one step ago, all-reduced on the devices while that step ran (no extra host wait).

    Args:
      step_outputs: the step's outputs (jax.Arrays, not waited for): once the first step's
        are computed, training steps flow (`stepping`); None: they flow from now on.

    Returns:
      True when a stop signal was received (by any process, one step ago when several).
    """
    if self._first is None and not self._stepped:
      self._first = () if step_outputs is None else step_outputs
    if jax.process_count() == 1:
      return self.received is not None
    if self._reduce is None:
      self._reduce = _process_max()
    previous, self._pending = self._pending, self._reduce(int(self.received is not None))
    return previous is not None and bool(np.asarray(previous.addressable_data(0)))


class SignalExit(KeyboardInterrupt):
  """A signal that ends a program outside training steps (see ExitOnSignal); a
  KeyboardInterrupt, so that `except Exception` does not swallow it.

  Args:
    signum: the signal's number (the process exits with 128 + signum).
    line: what the program prints.
  """

  def __init__(self, signum: int, line: str):
    self.signum = signum
    super().__init__(line)


class ExitOnSignal:
  """A program's SIGTERM/SIGINT: one line on stderr, then exit with 128 + the signal, at once.

  train/common.main enters it around a program's run. Outside training steps (data
  preparation, compilation, sampling) nothing is being saved and nothing could be waited
  for. The handler raises SignalExit, so `finally` blocks still clean up (a half-written
  token cache's temporary file), and leaving the block prints the line and exits. But
  Python runs handlers only between bytecodes of the main thread, and a long C call (XLA
  compiling or running a step, a tokenizer's training) can hold them off for minutes: the
  signal's number is also written to a pipe from C (`signal.set_wakeup_fd`), and a daemon
  thread reading it exits the process itself if the main thread has not within GRACE_S.
  Inside `fit`, StopSignals takes the signals over (`attach`): until the first step has
  finished this exits with StopSignals' line; once steps flow the first signal is left to
  StopSignals (the step finishes, a checkpoint is saved) and a second exits at once.
  Entered outside the main thread it does nothing.
  """

  GRACE_S = 1.0

  def __init__(self):
    self._previous = {}
    self._previous_fd = -1
    self._write = None
    self._stop = None  # the StopSignals of the fit running now
    self._while_stepping = 0  # signals seen while its steps flow
    self._exits = itertools.count()

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    read, self._write = os.pipe()
    os.set_blocking(self._write, False)  # the C handler must never block
    self._previous = {s: signal.signal(s, self) for s in StopSignals.SIGNALS}
    self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
    threading.Thread(target=self._watch, args=(read,), name="fmjax-signals", daemon=True).start()
    return self

  def __exit__(self, exc_type, exc, traceback):
    if self._write is not None:
      signal.set_wakeup_fd(self._previous_fd)
      for s, handler in self._previous.items():
        signal.signal(s, signal.SIG_DFL if handler is None else handler)
      os.close(self._write)  # the watcher reads the end of the pipe and stops
      self._write, self._previous = None, {}
    if isinstance(exc, SignalExit):
      self.exit(exc.signum, str(exc))

  def attach(self, stop: "StopSignals | None") -> "ExitOnSignal":
    """Hands the signals to a fit's StopSignals (None: back to exiting at once).

    Args:
      stop: the StopSignals entered by `fit`, or None when it exits.

    Returns:
      This ExitOnSignal.
    """
    self._stop, self._while_stepping = stop, 0
    return self

  def line(self, signum: int) -> str:
    """The line of a signal outside training steps.

    Args:
      signum: the signal's number.

    Returns:
      "interrupted by SIG...: exited at once, without saving; rerunning the same command
      resumes from the last complete checkpoint".
    """
    return (f"interrupted by {signal.Signals(signum).name}: exited at once, without saving; "
            "rerunning the same command resumes from the last complete checkpoint")

  def __call__(self, signum, frame):
    """The Python-level handler (main thread, between bytecodes).

    Args:
      signum: the signal's number.
      frame: the interrupted frame (unused).

    Raises:
      SignalExit: with `line`; leaving the `with` block exits.
    """
    del frame
    raise SignalExit(signum, self.line(signum))

  def _watch(self, read: int):
    while True:
      try:
        received = os.read(read, 64)
      except OSError:
        break
      if not received:
        break
      for signum in received:
        if signum not in StopSignals.SIGNALS:
          continue  # another handler's signal: Python runs that one
        stop = self._stop
        if stop is None:
          self._exit_unless_main_does(signum, self.line(signum))
        elif stop.ends_setup():
          self._exit_unless_main_does(signum, stop.setup_line(signum))
        else:
          self._while_stepping += 1
          if self._while_stepping > 1:  # a second signal, the main thread busy in C code
            self._exit_unless_main_does(signum, self.line(signum))
    os.close(read)

  def _exit_unless_main_does(self, signum: int, line: str):
    """The main thread's handler raises SignalExit, unwinds and exits; if it is inside a long
    C call, this thread exits the process after GRACE_S."""
    timer = threading.Timer(self.GRACE_S, self.exit, (signum, line))
    timer.daemon = True
    timer.start()

  def exit(self, signum: int, line: str) -> None:
    """Writes `line` to stderr and ends the process with 128 + signum (returns at once if
    another call already is ending it).

    Args:
      signum: the signal's number.
      line: the line.
    """
    if next(self._exits):
      return  # another thread, or this one interrupted inside this call, is exiting
    for stream in (sys.stdout, sys.stderr):
      try:
        stream.flush()
      except Exception:  # pylint: disable=broad-except  (e.g. interrupted inside a write)
        pass
    try:
      os.write(2, (line + "\n").encode())
    except OSError:  # stderr gone: the exit status still says it
      pass
    os._exit(128 + signum)  # pylint: disable=protected-access


def _process_max():
  """flag (int, this process's) -> jax.Array holding the maximum over all processes."""
  mesh = sharding.process_mesh()
  spread = sharding.over_processes(mesh)
  reduce = jax.jit(lambda x: x.max(), out_shardings=sharding.replicated(mesh))

  def process_max(flag: int):
    local = np.full((1,), flag, np.int32)
    with jax.set_mesh(mesh):
      return reduce(jax.make_array_from_process_local_data(spread, local,
                                                           (jax.process_count(),)))
  return process_max


class NonFiniteGuard:
  """The host side of non-finite steps.

  Reads the steps' `nonfinite` flags when the loop reads metrics anyway, then stops (raises
  NonFiniteError) or counts the skipped steps.

  The train step already left the state unchanged on those steps (training.make_train_step),
  so nothing non-finite exists to be saved; stopping also means no state after the first
  bad step is saved (it would have silently skipped a batch).

  Args:
    skip: go on past non-finite steps, counting them (config.train.skip_nonfinite), unless
      max(log_every, 10) steps in a row are non-finite.
    log_every: the logging interval (config.train.log_every).
  """

  def __init__(self, skip: bool, log_every: int):
    self.skip, self.log_every = skip, log_every
    self.skipped = 0  # over the whole run, resumes included (kept in the checkpoint meta)
    self._run = 0  # consecutive skipped steps
    self._pending = []  # (step, device metrics) of the steps not checked yet

  def add(self, step: int, step_metrics) -> None:
    """Records a step's device metrics to be checked at the next `check`; does not wait for them.

    Args:
      step: the step number (after the step: 1 for the first).
      step_metrics: the train step's metrics dict of device arrays, with "nonfinite".
    """
    self._pending.append((step, step_metrics))

  def check(self, ckpt: checkpoint.Checkpointer) -> None:
    """Reads the flags of the steps added since the last check; skips or stops on a bad one.

    Args:
      ckpt: the run's Checkpointer, to name the last good checkpoint in the error.

    Raises:
      NonFiniteError: a non-finite step without `skip`, or, with `skip`, too many non-finite
        steps in a row.
    """
    pending, self._pending = self._pending, []
    flags = jax.device_get([m["nonfinite"] for _, m in pending])
    bad = [(step, m) for (step, m), flag in zip(pending, flags) if flag]
    for flag in flags:
      self._run = self._run + 1 if flag else 0
    if not bad:
      return
    steps = [step for step, _ in bad]
    first = jax.device_get(bad[0][1])
    what = ", ".join(f"{k}={float(first[k]):.4g}" for k in ("train/loss", "grad_norm",
                                                             "learning_rate") if k in first)
    if all(math.isfinite(float(first[k])) for k in ("train/loss", "grad_norm")):
      what += ": the optimizer's update overflowed"
    if self.skip and self._run < max(self.log_every, 10):
      self.skipped += len(bad)
      log.warning("skipped %d non-finite update(s) at step(s) %s (%s at step %d); %d in all",
                  len(bad), steps[:10], what, steps[0], self.skipped)
      return
    ckpt.wait()
    good = ckpt.latest_step()
    where = (f"the last good checkpoint is {os.path.join(ckpt.directory, str(good))} (step "
             f"{good}), where rerunning resumes" if good is not None else
             "no checkpoint was saved yet")
    if self.skip:
      raise NonFiniteError(f"the last {self._run} steps (to step {steps[-1]}) were all "
                           f"non-finite and skipped ({what} at step {steps[0]}): training is "
                           f"not recovering; {where}. Lower train.learning_rate or check "
                           "the data")
    raise NonFiniteError(
        f"non-finite training step {steps[0]} ({what}): stopped, and nothing after step "
        f"{steps[0] - 1} was saved; {where}. Lower train.learning_rate, raise "
        "train.warmup_steps, set train.grad_clip, or set train.skip_nonfinite=True to skip "
        "such steps")

  def logged(self) -> dict:
    """The metrics row's and the checkpoint meta's share: the count, when skipping.

    Returns:
      {"skipped_steps": int} with `skip`, else {}.
    """
    return {"skipped_steps": self.skipped} if self.skip else {}


class LogsCompiles:
  """A jitted function that logs how long its first call for each batch shape took: the
  compilation, mostly (the train step's is logged by the loop, apart from its throughput).

  Args:
    fn: the jitted function, called as fn(params, batch).
    name: what the log line calls it, e.g. "eval step".
  """

  def __init__(self, fn, name: str):
    self.fn, self.name, self._seen = fn, name, set()

  def __call__(self, params, batch):
    """fn(params, batch); the first call for a batch shape is waited for and timed.

    Args:
      params: the parameters, as fn takes them.
      batch: a sharded batch; its shape names the compilation.

    Returns:
      fn's outputs.
    """
    shape = _batch_shape(batch)
    if shape in self._seen:
      return self.fn(params, batch)
    self._seen.add(shape)
    began = time.perf_counter()
    out = jax.block_until_ready(self.fn(params, batch))
    log.info("compiled the %s for batch shape %s in %.1f s (its first call, run included)",
             self.name, _describe_shape(shape), time.perf_counter() - began)
    return out


def evaluate_if(task: Task, p_eval, p_predict, state, mesh) -> dict:
  """The evaluation metrics of the current params: the eval loss metrics and the task's scores.

  Args:
    task: the Task (its eval_data and score_fn; either may be None).
    p_eval: the jitted eval step, (params, sharded batch) -> {"eval/...": scalar}.
    p_predict: the jitted predict_fn, (params, sharded batch) -> outputs, or None.
    state: the TrainState (its params are evaluated).
    mesh: the jax.sharding.Mesh the batches are sharded onto.

  Returns:
    {"eval/...": float or value} from `evaluate` and task.score_fn; {} when the task has
    neither.
  """
  m = {} if task.eval_data is None else evaluate(p_eval, state.params, task.eval_data(), mesh)
  if task.score_fn is not None:
    m.update(task.score_fn(lambda batch: to_host(p_predict(state.params,
                                                           sharding.shard_batch(batch, mesh)))))
  return m


def to_host(tree):
  """Global jax.Arrays -> numpy, gathered from every process (each computes the same metrics).

  Args:
    tree: a pytree of jax.Arrays (global, possibly sharded over processes).

  Returns:
    The pytree of numpy arrays of the whole global arrays.
  """
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def make_predict(predict_fn, params):
  """host batch -> predict_fn's outputs as numpy, with params where they are (on their mesh).

  Compiled once per batch shape.

  Args:
    predict_fn: (params, batch) -> dict of per-example outputs (B, ...), pure.
    params: the params pytree of jax.Arrays, sharded on one mesh.

  Returns:
    predict(host batch) -> predict_fn's outputs for the global batch as numpy.
  """
  mesh = jax.tree_util.tree_leaves(params)[0].sharding.mesh
  jitted = jax.jit(predict_fn)
  return lambda batch: to_host(jitted(params, sharding.shard_batch(batch, mesh)))


class BestTracker:
  """Keeps the params of the best evaluation of `metric` in workdir/best (one checkpoint).

  Its step and metrics are in workdir/best/best.json; lower is better for a metric whose
  name holds "loss", higher for the others.

  Args:
    workdir: the run's workdir; the best params go to workdir/best.
    metric: the metric to track, e.g. "eval/accuracy"; "" tracks nothing.
  """

  def __init__(self, workdir: str, metric: str):
    self.metric, self.directory = metric, os.path.join(workdir, "best")
    self.record = None
    self._ckpt = None
    if metric:
      path = os.path.join(self.directory, "best.json")
      if os.path.exists(path):
        with open(path) as f:
          self.record = json.load(f)
      self._ckpt = checkpoint.Checkpointer(self.directory, save_every=1, keep=1, async_save=False)
      self._ckpt.remove_unfinished()

  def better(self, value: float) -> bool:
    """Whether `value` beats the best recorded evaluation.

    Args:
      value: the metric's new value.

    Returns:
      True without a record, else value < best for a loss, value > best otherwise.
    """
    if self.record is None:
      return True
    old = self.record["metrics"][self.metric]
    return value < old if "loss" in self.metric else value > old

  def update(self, step: int, metrics: dict, state) -> None:
    """Saves the params when `metrics[metric]` is the best so far, and records it in best.json.

    Args:
      step: the current step.
      metrics: the step's metrics, holding `metric`.
      state: the TrainState; its params are saved.

    Raises:
      ValueError: `metric` is not among `metrics`.
    """
    if not self.metric:
      return
    if self.metric not in metrics:
      raise ArgumentError(f"train.best_metric={self.metric!r} is not among the eval metrics "
                          f"{sorted(k for k in metrics if k.startswith('eval/'))}",
                          function="fit", argument="train.best_metric")
    value = float(metrics[self.metric])
    if not self.better(value):
      return
    self._ckpt.save(step, state.params, {"step": step}, force=True)
    self._ckpt.wait()
    self.record = {"step": step, "metrics": {k: float(v) for k, v in metrics.items()}}
    if jax.process_index() == 0:
      _write_atomically(os.path.join(self.directory, "best.json"),
                        json.dumps(self.record, indent=1))

  def close(self):
    """Waits for the best checkpoint's saves and closes its Checkpointer."""
    if self._ckpt is not None:
      self._ckpt.close()


def best_params(workdir: str, params):
  """The params kept in workdir/best, restored into `params`' shardings; `params` if none.

  Args:
    workdir: the run's workdir.
    params: the params pytree of jax.Arrays whose shapes, dtypes and shardings the best ones
      are restored into.

  Returns:
    The best params (a pytree like `params`), or `params` itself when no best was kept.
  """
  directory = os.path.join(workdir, "best")
  if not os.path.isdir(directory):
    return params
  ckpt = checkpoint.Checkpointer(directory, save_every=1, keep=1)
  if ckpt.latest_step() is None:
    return params
  target = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
  restored = ckpt.restore(target)[0]
  ckpt.close()
  return restored


def evaluate(p_eval, params, batches, mesh) -> dict:
  """Averages eval metrics over batches (each batch's metrics are already means).

  Args:
    p_eval: the jitted eval step, (params, sharded batch) -> {name: scalar}.
    params: the params pytree.
    batches: iterable of host-local numpy batches.
    mesh: the jax.sharding.Mesh the batches are sharded onto.

  Returns:
    {name: float}, the unweighted mean over batches; {} for no batches.
  """
  totals, n = {}, 0
  for batch in batches:
    m = jax.device_get(p_eval(params, sharding.shard_batch(batch, mesh)))
    for k, v in m.items():
      totals[k] = totals.get(k, 0.0) + float(v)
    n += 1
  return {k: v / max(n, 1) for k, v in totals.items()}
