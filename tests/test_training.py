"""Optimizer schedule, weight-decay mask, loss, gradient accumulation and mixed precision."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fmjax import sharding, training
from fmjax.models import gpt
from fmjax.runtime import Runtime


def test_schedule_warmup_then_cosine_and_linear():
  cos = training.learning_rate_schedule(learning_rate=1.0, total_steps=110, warmup_steps=10,
                                        decay="cosine", end_factor=0.1)
  np.testing.assert_allclose([cos(0), cos(5), cos(10)], [0.0, 0.5, 1.0], atol=1e-6)
  np.testing.assert_allclose(cos(60), 0.1 + 0.9 * 0.5, atol=1e-6)  # halfway down the cosine
  np.testing.assert_allclose(cos(110), 0.1, atol=1e-6)
  lin = training.learning_rate_schedule(learning_rate=2.0, total_steps=30, warmup_steps=10,
                                        decay="linear", end_factor=0.0)
  np.testing.assert_allclose([lin(10), lin(20), lin(30)], [2.0, 1.0, 0.0], atol=1e-6)
  with pytest.raises(ValueError, match="unknown decay 'exp'"):
    training.learning_rate_schedule(learning_rate=1.0, total_steps=3, warmup_steps=1, decay="exp")


def _tiny():
  c = gpt.get_config("tiny")
  model = gpt.GPT(c, Runtime(attention_impl="xla"))
  rng = np.random.RandomState(0)
  batch = {"inputs": rng.randint(0, c.vocab_size, (8, 16)).astype(np.int32),
           "targets": rng.randint(0, c.vocab_size, (8, 16)).astype(np.int32)}

  def loss_fn(params, b, rng, train):
    logits = model.apply({"params": params}, b["inputs"], train=train, rngs={"dropout": rng})
    loss, acc, _ = training.cross_entropy(logits, b["targets"])
    return loss, {"accuracy": acc}
  return model, batch, loss_fn


def test_decay_mask_excludes_norms_and_biases():
  model, batch, _ = _tiny()
  params = jax.eval_shape(model.init, jax.random.key(0), batch["inputs"])["params"]
  flat = {jax.tree_util.keystr(k): v for k, v in
          jax.tree_util.tree_leaves_with_path(training.decay_mask(params))}
  assert flat["['wte']['embedding'].value"] is True
  assert flat["['blocks']['layer_0']['attn']['query']['kernel'].value"] is True
  assert flat["['blocks']['layer_0']['attn']['query']['bias'].value"] is False
  assert flat["['blocks']['layer_0']['ln_attn']['scale'].value"] is False
  assert flat["['ln_f']['bias'].value"] is False
  assert sum(flat.values()) == 2 + 2 * 6  # wte, wpe + per layer: q, k, v, out, wi, wo


def test_adamw_leaves_undecayed_params_alone_with_zero_grad():
  """With zero gradients AdamW moves only decayed params: w <- w - lr * wd * w."""
  tx, _ = training.make_optimizer(learning_rate=0.1, total_steps=10, warmup_steps=0,
                                  decay="constant", weight_decay=0.5, grad_clip=None)
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "ln": {"scale": jnp.ones(2)}}
  grads = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["dense"]["kernel"], 1 - 0.1 * 0.5)
  np.testing.assert_allclose(new["dense"]["bias"], 1.0)
  np.testing.assert_allclose(new["ln"]["scale"], 1.0)


def test_gradient_clipping_scales_to_the_global_norm_then_adam_by_hand():
  """Two AdamW steps with clipping at 1.0, against NumPy Adam on hand-clipped gradients: the
  first gradient (global norm 13 over two leaves) is scaled by 1/13, the second (norm 0.5) is
  left alone. Without clipping the two steps differ (Adam is not scale-invariant across steps)."""
  lr, b1, b2, eps = 0.1, 0.9, 0.95, 1e-8
  make = lambda clip: training.make_optimizer(learning_rate=lr, total_steps=10, warmup_steps=0,
                                              decay="constant", weight_decay=0.0, b1=b1, b2=b2,
                                              eps=eps, grad_clip=clip)[0]
  params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
  grads = [{"a": jnp.array([3.0, 4.0]), "b": jnp.array([12.0])},  # norm 13
           {"a": jnp.array([0.3, 0.0]), "b": jnp.array([-0.4])}]  # norm 0.5

  def run(tx):
    p, state = params, tx.init(params)
    for g in grads:
      updates, state = tx.update(g, state, p)
      p = optax.apply_updates(p, updates)
    return np.concatenate([np.asarray(p["a"]), np.asarray(p["b"])])

  flat = [np.concatenate([np.asarray(g["a"]), np.asarray(g["b"])]) for g in grads]
  clipped = [g * min(1.0, 1.0 / np.linalg.norm(g)) for g in flat]
  np.testing.assert_allclose(np.linalg.norm(clipped[0]), 1.0, rtol=1e-6)
  w, m, v = np.zeros(3), np.zeros(3), np.zeros(3)
  for t, g in enumerate(clipped, 1):
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    w = w - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
  np.testing.assert_allclose(run(make(1.0)), w, rtol=1e-5, atol=1e-7)
  assert np.abs(run(make(None)) - w).max() > 1e-3  # the clip changed the result


def test_cross_entropy_hand_computed():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
  targets = jnp.array([[0, 2]])
  loss, acc, n = training.cross_entropy(logits, targets)
  np.testing.assert_allclose(loss, (-np.log(0.5) - np.log(0.1)) / 2, rtol=1e-6)
  np.testing.assert_allclose(acc, 0.5)
  loss_w, acc_w, n_w = training.cross_entropy(logits, targets, jnp.array([[1.0, 0.0]]))
  np.testing.assert_allclose([loss_w, acc_w, n_w], [-np.log(0.5), 1.0, 1.0], rtol=1e-6)


def _run_steps(accum, steps=2, sgd=False):
  model, batch, loss_fn = _tiny()
  tx, schedule = training.make_optimizer(learning_rate=1e-2, total_steps=10, warmup_steps=1)
  if sgd:  # plain gradient steps: parameter differences are gradient differences, unamplified
    tx = optax.sgd(1.0)
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  rules = sharding.get_rules("fsdp")
  state, shardings = sharding.sharded_init(training.init_fn(model, tx, batch["inputs"]), mesh,
                                           rules, jax.random.key(0))
  step = training.make_train_step(loss_fn, tx, accum_steps=accum, schedule=schedule)
  eval_step = training.make_eval_step(loss_fn)
  with sharding.context(mesh, rules):
    p_train, p_eval = training.jit_steps(step, eval_step, shardings, mesh)
    losses = []
    for _ in range(steps):
      state, m = p_train(state, sharding.shard_batch(batch, mesh), jax.random.key(1))
      losses.append(float(m["train/loss"]))
    ev = p_eval(state.params, sharding.shard_batch(batch, mesh))
  return losses, state, m, ev


def test_gradient_accumulation_equals_full_batch():
  full_losses, full, _, _ = _run_steps(1, sgd=True)
  acc_losses, acc, _, _ = _run_steps(4, sgd=True)
  np.testing.assert_allclose(acc_losses, full_losses, rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                         acc.params, full.params)


def test_adamw_steps_lower_the_loss_and_log_the_schedule():
  full_losses, full, m, _ = _run_steps(1, steps=3)
  assert int(full.step) == 3
  # The third update (optax count 2) uses schedule(2): one step into the 9-step cosine.
  np.testing.assert_allclose(m["learning_rate"], 1e-2 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi / 9))), rtol=1e-5)
  assert full_losses[1] == full_losses[0]  # the first update has learning rate 0 (warmup)
  assert full_losses[2] < full_losses[1]


def test_eval_step_reports_loss_of_current_params():
  _, state, _, ev = _run_steps(1, steps=1)
  model, batch, loss_fn = _tiny()
  loss, aux = loss_fn(state.params, batch, jax.random.key(0), False)
  np.testing.assert_allclose(ev["eval/loss"], loss, rtol=1e-6)
  np.testing.assert_allclose(ev["eval/accuracy"], aux["accuracy"], rtol=1e-6)
