"""The training loop every program shares: shard, init or resume, step, log, evaluate, save.

A program (train/pretrain_gpt.py, ...) supplies the model, its loss and its data; `fit`
does the rest, identically for every task:

  mesh + rules -> (restore | sharded init) -> jit once -> loop:
      batch -> train_step -> [log: metrics.jsonl, TensorBoard, tqdm] -> [eval] -> [save]

Run config keys read here (see configs/*.py): seed, mesh.{data,fsdp,tensor}, sharding,
train.{steps, batch_size, learning_rate, warmup_steps, decay, end_factor, weight_decay,
b1, b2, eps, grad_clip, accum_steps, log_every, eval_every, save_every, keep_checkpoints}.
"""

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import numpy as np
import tqdm

from fmjax import checkpoint, metrics, sharding, training

log = logging.getLogger("fmjax")


@dataclasses.dataclass
class Task:
  """What a program hands to `fit`.

  Attributes:
    model: the Flax module; `init_args(batch)` gives the positional args for model.init.
    model_config: its config dataclass (stored with checkpoints to recognise them).
    loss_fn: (params, batch, rng, train) -> (loss, metrics dict).
    train_data: iterator of host-local numpy batches with get_state()/set_state().
    eval_data: () -> iterable of host-local numpy batches, or None.
    example_batch: one host-local batch (numpy), for shapes at init.
    init_args: batch -> tuple of example inputs for model.init.
    flops_per_example: training FLOPs per example (for MFU); tokens_per_example for tokens/s.
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


def optimizer_from_config(t):
  return training.make_optimizer(
      learning_rate=t.learning_rate, total_steps=t.steps, warmup_steps=t.warmup_steps,
      decay=t.decay, end_factor=t.end_factor, weight_decay=t.weight_decay, b1=t.b1, b2=t.b2,
      eps=t.eps, grad_clip=t.grad_clip)


def fit(config, workdir: str, task: Task, *, until: int | None = None):
  """Trains `task` to config.train.steps, resuming from workdir/checkpoints if present.

  `until` stops earlier (the schedule still spans config.train.steps): a multi-phase
  recipe calls fit once per phase with that phase's data, e.g. BERT's 128 then 512 tokens.

  Without a checkpoint, config.init_from (another workdir of the same model) supplies the
  starting parameters; the optimizer state and step start fresh.

  Returns:
    (final TrainState, list of the last logged metrics).
  """
  t = config.train
  mesh = sharding.make_mesh(dict(config.mesh))
  rules = sharding.get_rules(config.sharding)
  tx, schedule = optimizer_from_config(t)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=t.save_every,
                                 keep=t.keep_checkpoints)
  signature = checkpoint.model_signature(task.model_config)
  start = ckpt.latest_step()
  end = t.steps if until is None else until
  if start is not None:  # refuse another model's checkpoint before touching anything
    ckpt.check_compatible(signature, start)

  init = training.init_fn(task.model, tx, *task.init_args(task.example_batch))
  rng = jax.random.key(config.seed)
  abstract = jax.eval_shape(init, rng)
  sharding.check_divisible(abstract, mesh, rules)
  shardings = sharding.shardings_of(abstract, mesh, rules)
  if start is not None:
    target = checkpoint.abstract_with_shardings(nn.meta.unbox(abstract), shardings)
    state, meta = ckpt.restore(target, start)
    task.train_data.set_state(meta["data"])
    log.info("resumed from %s step %d", ckpt.directory, start)
  else:
    state, _ = sharding.sharded_init(init, mesh, rules, rng)
    if config.init_from:
      source = checkpoint.Checkpointer(os.path.join(config.init_from, "checkpoints"), save_every=1)
      if source.latest_step() is None:
        raise FileNotFoundError(f"config.init_from={config.init_from!r} has no checkpoint in "
                                f"{source.directory}")
      source.check_compatible(signature)
      target = checkpoint.abstract_with_shardings(nn.meta.unbox(abstract), shardings)
      state = state.replace(params=source.restore(target)[0].params)
      log.info("initialised params from %s", source.directory)
    start = 0

  train_step = training.make_train_step(task.loss_fn, tx, accum_steps=t.accum_steps,
                                        schedule=schedule)
  eval_step = training.make_eval_step(task.loss_fn)
  with sharding.context(mesh, rules):
    p_train, p_eval = training.jit_steps(train_step, eval_step, shardings, mesh)

  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
  peak, peak_source = metrics.peak_flops_per_device()
  peak_total = peak * jax.device_count()
  log.info("model: %s parameters; %.3g training FLOPs per token; peak %.3g FLOP/s per device "
           "(%s) x %d devices; mesh %s, rules %r", f"{n_params:,}",
           task.flops_per_example / task.tokens_per_example, peak, peak_source,
           jax.device_count(), dict(mesh.shape), config.sharding)

  if jax.process_index() == 0:  # recorded only now: a run refused above changes nothing
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  writer = metrics.MetricsWriter(workdir, resume_step=start)
  meta = lambda: {"model": signature, "data": task.train_data.get_state(), "seed": config.seed,
                  **task.extra_meta}
  bar = tqdm.tqdm(total=end, initial=start, desc="train", dynamic_ncols=True,
                  disable=jax.process_index() != 0)
  last, window_start, window_steps = writer.last, time.perf_counter(), 0
  step, began = start, time.perf_counter()
  with sharding.context(mesh, rules):
    while step < end:
      batch = sharding.shard_batch(next(task.train_data), mesh)
      state, step_metrics = p_train(state, batch, rng)
      step += 1
      window_steps += 1
      bar.update(1)
      out_of_time = bool(t.time_budget_s) and time.perf_counter() - began > t.time_budget_s
      final = step == end or out_of_time
      if step % t.log_every == 0 or final:
        m = jax.device_get(step_metrics)  # waits for the step: the window's time is all compute
        examples_per_s = window_steps * t.batch_size / (time.perf_counter() - window_start)
        m["tokens_per_second"] = examples_per_s * task.tokens_per_example
        m["mfu"] = examples_per_s * task.flops_per_example / peak_total
        if step % t.eval_every == 0 or final:
          m.update(evaluate_if(task, p_eval, state, mesh))
        writer.write(step, m)
        last = m
        bar.set_postfix({k.split("/")[-1] if k.startswith("train/") else k: f"{float(v):.4g}"
                         for k, v in m.items() if k in ("train/loss", "eval/loss",
                                                        "tokens_per_second", "mfu")})
      if ckpt.save(step, state, meta(), force=final) or step % t.log_every == 0:
        window_start, window_steps = time.perf_counter(), 0  # eval and saving are not throughput
      if out_of_time:
        log.info("time budget of %.0f s reached at step %d", t.time_budget_s, step)
        break
  bar.close()
  ckpt.close()
  writer.close()
  return state, last


def evaluate_if(task: Task, p_eval, state, mesh) -> dict:
  return {} if task.eval_data is None else evaluate(p_eval, state.params, task.eval_data(), mesh)


def evaluate(p_eval, params, batches, mesh) -> dict:
  """Averages eval metrics over batches (each batch's metrics are already means)."""
  totals, n = {}, 0
  for batch in batches:
    m = jax.device_get(p_eval(params, sharding.shard_batch(batch, mesh)))
    for k, v in m.items():
      totals[k] = totals.get(k, 0.0) + float(v)
    n += 1
  return {k: v / max(n, 1) for k, v in totals.items()}
