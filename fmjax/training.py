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
class TrainingState:
  """What a train step carries from one step to the next (a pytree, so it can be jitted).

  Not flax.training.train_state.TrainState, and not interchangeable with it: only arrays
  (step, params, opt_state), no apply_fn or tx fields and no apply_gradients method; the step
  functions of make_train_step close over the model and optimizer instead. Its tree (and so a
  checkpoint's) is {"step", "params", "opt_state"}.

  Attributes:
    step: () int32, the number of optimizer updates applied (skipped non-finite steps excluded).
    params: the model parameters (flax "params" collection), float32 by default.
    opt_state: the optax state of the optimizer, shaped like `params` where it has moments.
  """
  step: jax.Array
  params: Any
  opt_state: Any


def learning_rate_schedule(*, learning_rate: float, total_steps: int, warmup_steps: int,
                           decay: str = "cosine", end_factor: float = 0.1) -> optax.Schedule:
  """Linear warmup from 0, then cosine or linear decay to end_factor * learning_rate.

  Args:
    learning_rate: the peak rate, reached at `warmup_steps`.
    total_steps: the step at which the decay reaches its end value.
    warmup_steps: steps of linear warmup from 0 (0: start at the peak).
    decay: "cosine" or "linear" down to end_factor * learning_rate over the steps after
      warmup, or "constant" (stay at the peak).
    end_factor: the final rate as a fraction of the peak.

  Returns:
    An optax schedule, step (int) -> learning rate (float32 scalar).

  Raises:
    ValueError: an unknown `decay`.
  """
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
  """True where weight decay applies: matrices and embeddings, not norms or biases.

  Args:
    params: a parameter pytree (flax "params").

  Returns:
    The same pytree of Python bools: False for a leaf with "bias" or "scale" in its path.
  """
  def keep(path, leaf):
    names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
    return not any(n in ("bias", "scale") for n in names)
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(*, learning_rate: float, total_steps: int, warmup_steps: int,
                   decay: str = "cosine", end_factor: float = 0.1, weight_decay: float = 0.1,
                   b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   grad_clip: float | None = 1.0):
  """AdamW with warmup + decay, no decay on norms/biases, global-norm clipping.

  Args:
    learning_rate: the peak learning rate.
    total_steps: the length of the schedule in optimizer steps.
    warmup_steps: steps of linear warmup from 0.
    decay: "cosine", "linear" or "constant" after warmup (see `learning_rate_schedule`).
    end_factor: the final learning rate as a fraction of the peak.
    weight_decay: AdamW's decoupled weight decay, on the leaves of `decay_mask`.
    b1, b2, eps: Adam's moment decay rates and epsilon.
    grad_clip: the global gradient norm to clip to; None or 0: no clipping.

  Returns:
    (optax.GradientTransformation, schedule) — the schedule is logged as learning_rate.
  """
  schedule = learning_rate_schedule(learning_rate=learning_rate, total_steps=total_steps,
                                    warmup_steps=warmup_steps, decay=decay, end_factor=end_factor)
  adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
  tx = optax.chain(optax.clip_by_global_norm(grad_clip), adamw) if grad_clip else adamw
  return tx, schedule


def init_fn(model: nn.Module, tx, *example_args, trainable: Callable | None = None,
            **example_kwargs):
  """A function rng -> boxed TrainingState, for sharding.sharded_init.

  Args:
    model: the flax module to initialise.
    tx: the optax optimizer whose state is initialised from the parameters.
    *example_args: example inputs for model.init (only their shapes and dtypes matter), e.g.
      (1, T) int32 token ids.
    trainable: params -> tree of bools (e.g. fmjax.lora.trainable_mask): only those leaves
      are trained and get optimizer state; None: all of them.
    **example_kwargs: keyword inputs for model.init.

  Returns:
    init(rng) -> TrainingState with step 0, the "params" collection (leaves still boxed with
    their logical axes) and tx's state (of the trainable params only); rng seeds both
    "params" and "dropout".
  """
  def init(rng):
    params = model.init({"params": rng, "dropout": rng}, *example_args, **example_kwargs)["params"]
    opt_state = tx.init(params if trainable is None else partition(params, trainable)[0])
    return TrainingState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)
  return init


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def partition(params, trainable: Callable):
  """(trainable, frozen): params split by the mask trainable(params).

  Each part is params' tree with optax.MaskedNode() (an empty subtree) where the other part
  has the leaf, so optax transforms, jit shardings and checkpoints see only real leaves.

  Args:
    params: the params pytree (boxed with logical axes or not).
    trainable: params -> the same tree with a bool per leaf (per box for boxed params).

  Returns:
    (trainable part, frozen part); `join` puts them back together.
  """
  mask = trainable(params)
  pick = lambda keep: jax.tree_util.tree_map(
      lambda m, x: x if m == keep else optax.MaskedNode(), mask, params)
  return pick(True), pick(False)


def join(trained, frozen, mask):
  """The params again from `partition`'s two parts.

  Args:
    trained: the trainable part.
    frozen: the frozen part.
    mask: the tree of bools `partition` split by.

  Returns:
    The whole params pytree.
  """
  return jax.tree_util.tree_map(lambda m, a, b: a if m else b, mask, trained, frozen)


def make_train_step(loss_fn: LossFn, tx, *, accum_steps: int = 1, schedule=None,
                    trainable: Callable | None = None, post_update: Callable | None = None):
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

  Args:
    loss_fn: loss_fn(params, batch, rng, train) -> (scalar loss, {name: scalar}).
    tx: the optax optimizer.
    accum_steps: micro-batches per update; the batch's leading dimension B must be a multiple.
    schedule: the learning-rate schedule, logged as metrics["learning_rate"] when given.
    trainable: params -> tree of bools (e.g. fmjax.lora.trainable_mask): gradients, the
      optimizer state (from `init_fn` with the same mask) and updates cover only those
      leaves; the others stay as they are (a frozen base). None: all leaves.
    post_update: (params, batch, rng) -> params, applied to the parameters after each optimizer
      update, on the whole batch of the step (all micro-batches), e.g. a VQ-VAE's EMA codebook
      (fmjax.models.vqvae.make_post_update); a non-finite step discards its result too.

  Returns:
    train_step(state, batch, rng) -> (new TrainingState, metrics): metrics holds float32 scalars
    "train/loss", "grad_norm", "train/<name>" for each of loss_fn's metrics, "nonfinite"
    (int32 0/1) and, with a schedule, "learning_rate". rng is folded with the step.
  """
  def train_step(state: TrainingState, batch, rng):
    if trainable is None:
      params, frozen, mask = state.params, None, None
      grad_fn = jax.value_and_grad(lambda p, b, r: loss_fn(p, b, r, True), has_aux=True)
    else:  # differentiate the trainable leaves only: no gradient of the frozen base is made
      mask = trainable(state.params)
      params, frozen = partition(state.params, trainable)
      grad_fn = jax.value_and_grad(lambda p, b, r: loss_fn(join(p, frozen, mask), b, r, True),
                                   has_aux=True)
    rng = jax.random.fold_in(rng, state.step)
    if accum_steps == 1:
      (loss, aux), grads = grad_fn(params, batch, rng)
    else:
      micro = jax.tree_util.tree_map(
          lambda x: x.reshape((accum_steps, x.shape[0] // accum_steps) + x.shape[1:]), batch)

      def body(carry, i):
        b = jax.tree_util.tree_map(lambda x: x[i], micro)
        return jax.tree_util.tree_map(jnp.add, carry, grad_fn(params, b, jax.random.fold_in(rng, i))), None

      shapes = jax.eval_shape(grad_fn, params, jax.tree_util.tree_map(lambda x: x[0], micro), rng)
      zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      ((loss, aux), grads), _ = jax.lax.scan(body, zeros, jnp.arange(accum_steps))
      loss, aux, grads = jax.tree_util.tree_map(lambda x: x / accum_steps, (loss, aux, grads))
    updates, opt_state = tx.update(grads, state.opt_state, params)
    grad_norm = optax.tree.norm(grads)
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
              & jnp.isfinite(optax.tree.norm(updates)))  # e.g. a NaN learning rate
    params = optax.apply_updates(params, updates)
    if mask is not None:
      params = join(params, frozen, mask)
    if post_update is not None:  # its own rng: the loss used rng or fold_in(rng, 0..accum-1)
      params = post_update(params, batch, jax.random.fold_in(rng, accum_steps))
    new = TrainingState(step=state.step + 1, params=params, opt_state=opt_state)
    new = jax.tree_util.tree_map(lambda n, old: jnp.where(finite, n, old), new, state)
    metrics = {"train/loss": loss, "grad_norm": grad_norm,
               **{f"train/{k}": v for k, v in aux.items()},
               "nonfinite": 1 - finite.astype(jnp.int32)}
    if schedule is not None:
      metrics["learning_rate"] = schedule(state.step)
    return new, metrics

  return train_step


def make_eval_step(loss_fn: LossFn):
  """eval_step(params, batch) -> metrics: loss_fn with train=False and a fixed rng.

  Args:
    loss_fn: loss_fn(params, batch, rng, train) -> (scalar loss, {name: scalar}).

  Returns:
    eval_step(params, batch) -> {"eval/loss": loss, "eval/<name>": value, ...}, the batch
    means that loss_fn returns (fmjax.trainer.evaluate averages them over batches).
  """
  def eval_step(params, batch):
    loss, aux = loss_fn(params, batch, jax.random.key(0), False)
    return {"eval/loss": loss, **{f"eval/{k}": v for k, v in aux.items()}}
  return eval_step


def jit_steps(train_step, eval_step, state_shardings, mesh):
  """Compiles both steps once with explicit in/out shardings; the state is donated.

  Args:
    train_step: from `make_train_step`.
    eval_step: from `make_eval_step`.
    state_shardings: a TrainingState of NamedShardings (e.g. from sharding.sharded_init).
    mesh: the mesh; batches are split by sharding.batch_sharding(mesh), rngs and metrics
      are replicated.

  Returns:
    (jitted train_step, jitted eval_step); the train step donates its state argument, so
    the caller must use the state it returns.
  """
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
    logits: (..., V) float, e.g. (B, T, V); computed in float32.
    targets: (...) int, e.g. (B, T), the true ids in [0, V).
    weights: (...) float, or None for all ones; positions with weight 0 do not count.

  Returns:
    (loss, accuracy, total weight) as float32 scalars.
  """
  logits = logits.astype(jnp.float32)
  weights = jnp.ones(targets.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  total = jnp.maximum(weights.sum(), 1e-8)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return (nll * weights).sum() / total, (correct * weights).sum() / total, weights.sum()
