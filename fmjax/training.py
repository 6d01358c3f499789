"""Train state, optimizer and the pure train/eval steps.

`train_step(state, batch, rng) -> (state, metrics)` is a pure function of pytrees: no
flags inside, jitted once by `jit_steps` with explicit shardings and donated state.
Mixed precision is the model's business (compute `dtype` bfloat16, `param_dtype` float32):
parameters, gradients and optimizer state stay float32 here.
"""

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fmjax import sharding

# loss_fn(params, batch, rng, train) -> (scalar loss, dict of scalar metrics)
LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def learning_rate_schedule(*, learning_rate: float, total_steps: int, warmup_steps: int,
                           decay: str = "cosine", end_factor: float = 0.1) -> optax.Schedule:
  """Linear warmup from 0, then cosine or linear decay to end_factor * learning_rate."""
  if decay not in ("cosine", "linear", "constant"):
    raise ValueError(f"unknown decay {decay!r}; choose 'cosine', 'linear' or 'constant'")
  warmup = optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1))
  rest = max(total_steps - warmup_steps, 1)
  end = learning_rate * end_factor
  after = {"cosine": optax.cosine_decay_schedule(learning_rate, rest, alpha=end_factor),
           "linear": optax.linear_schedule(learning_rate, end, rest),
           "constant": optax.constant_schedule(learning_rate)}[decay]
  return optax.join_schedules([warmup, after], [warmup_steps])


def decay_mask(params):
  """True where weight decay applies: matrices and embeddings, not norms or biases."""
  def keep(path, leaf):
    names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
    return not any(n in ("bias", "scale") for n in names)
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(*, learning_rate: float, total_steps: int, warmup_steps: int,
                   decay: str = "cosine", end_factor: float = 0.1, weight_decay: float = 0.1,
                   b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   grad_clip: float | None = 1.0):
  """AdamW with warmup + decay, no decay on norms/biases, global-norm clipping.

  Returns:
    (optax.GradientTransformation, schedule) — the schedule is logged as learning_rate.
  """
  schedule = learning_rate_schedule(learning_rate=learning_rate, total_steps=total_steps,
                                    warmup_steps=warmup_steps, decay=decay, end_factor=end_factor)
  adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
  tx = optax.chain(optax.clip_by_global_norm(grad_clip), adamw) if grad_clip else adamw
  return tx, schedule


def init_fn(model: nn.Module, tx, *example_args, **example_kwargs):
  """A function rng -> boxed TrainState, for sharding.sharded_init."""
  def init(rng):
    params = model.init({"params": rng, "dropout": rng}, *example_args, **example_kwargs)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return init


def make_train_step(loss_fn: LossFn, tx, *, accum_steps: int = 1, schedule=None):
  """Builds train_step(state, batch, rng) -> (state, metrics).

  With accum_steps > 1 the batch's leading dimension is split into accum_steps
  micro-batches whose gradients are averaged before one optimizer update (same result as
  the full batch for losses that are means over equal-sized micro-batches).

  A step whose loss, gradient norm or update norm is not finite (NaN, inf; an update norm
  that overflows float32 too) returns `state` unchanged, step count included, with
  metrics["nonfinite"] = 1 (else 0): no NaN reaches the parameters or optimizer state, so
  none can be checkpointed. The host decides whether to stop or go on (fmjax.trainer.fit,
  config.train.skip_nonfinite) when it next reads the metrics; the check costs one more
  norm (the update's) and a select, and no host synchronisation.
  """
  grad_fn = jax.value_and_grad(lambda p, b, r: loss_fn(p, b, r, True), has_aux=True)

  def train_step(state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    if accum_steps == 1:
      (loss, aux), grads = grad_fn(state.params, batch, rng)
    else:
      micro = jax.tree_util.tree_map(
          lambda x: x.reshape((accum_steps, x.shape[0] // accum_steps) + x.shape[1:]), batch)

      def body(carry, i):
        b = jax.tree_util.tree_map(lambda x: x[i], micro)
        return jax.tree_util.tree_map(jnp.add, carry, grad_fn(state.params, b, jax.random.fold_in(rng, i))), None

      shapes = jax.eval_shape(grad_fn, state.params, jax.tree_util.tree_map(lambda x: x[0], micro), rng)
      zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      ((loss, aux), grads), _ = jax.lax.scan(body, zeros, jnp.arange(accum_steps))
      loss, aux, grads = jax.tree_util.tree_map(lambda x: x / accum_steps, (loss, aux, grads))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    grad_norm = optax.tree.norm(grads)
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
              & jnp.isfinite(optax.tree.norm(updates)))  # e.g. a NaN learning rate
    new = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                     opt_state=opt_state)
    new = jax.tree_util.tree_map(lambda n, old: jnp.where(finite, n, old), new, state)
    metrics = {"train/loss": loss, "grad_norm": grad_norm,
               **{f"train/{k}": v for k, v in aux.items()},
               "nonfinite": 1 - finite.astype(jnp.int32)}
    if schedule is not None:
      metrics["learning_rate"] = schedule(state.step)
    return new, metrics

  return train_step


def make_eval_step(loss_fn: LossFn):
  """eval_step(params, batch) -> metrics, sums weighted by the batch's example count."""
  def eval_step(params, batch):
    loss, aux = loss_fn(params, batch, jax.random.key(0), False)
    return {"eval/loss": loss, **{f"eval/{k}": v for k, v in aux.items()}}
  return eval_step


def jit_steps(train_step, eval_step, state_shardings, mesh):
  """Compiles both steps once with explicit in/out shardings; the state is donated."""
  batch = sharding.batch_sharding(mesh)
  repl = sharding.replicated(mesh)
  train = jax.jit(train_step, in_shardings=(state_shardings, batch, repl),
                  out_shardings=(state_shardings, repl), donate_argnums=(0,))
  evaluate = jax.jit(eval_step, in_shardings=(state_shardings.params, batch),
                     out_shardings=repl)
  return train, evaluate


def cross_entropy(logits, targets, weights=None):
  """Mean token cross-entropy and accuracy over positions with weight > 0.

  Args:
    logits: (..., V) float; targets: (...) int; weights: (...) float or None (all ones).
  Returns:
    (loss, accuracy, total weight) as float32 scalars.
  """
  logits = logits.astype(jnp.float32)
  weights = jnp.ones(targets.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  total = jnp.maximum(weights.sum(), 1e-8)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return (nll * weights).sum() / total, (correct * weights).sum() / total, weights.sum()
