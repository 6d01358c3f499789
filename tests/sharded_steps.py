"""Runs two train steps of the tiny GPT on several meshes and prints losses and params as JSON.

Executed in a subprocess by tests/test_sharding.py, with 8 simulated CPU devices:
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_steps.py
"""

import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from fmjax import sharding, training  # noqa: E402
from fmjax.models import gpt  # noqa: E402
from fmjax.runtime import Runtime  # noqa: E402

CASES = [("none", {"data": 1}, 1), ("dp", {"data": 8}, 8), ("fsdp", {"data": 2, "fsdp": 4}, 8),
         ("fsdp_tp", {"data": 2, "fsdp": 2, "tensor": 2}, 8)]


def run(rules_name, mesh_sizes, n_devices, accum=1, adamw=False, model=None):
  """model: default the tiny GPT (with GQA); any causal LM of tokens (B, T) -> logits."""
  if model is None:
    model = gpt.GPT(gpt.get_config("tiny", num_kv_heads=2), Runtime(attention_impl="xla"))
  c = model.config
  rng = np.random.RandomState(0)
  batches = [{"inputs": rng.randint(0, c.vocab_size, (8, 16)).astype(np.int32),
              "targets": rng.randint(0, c.vocab_size, (8, 16)).astype(np.int32)} for _ in range(2)]

  def loss_fn(params, b, r, train):
    logits = model.apply({"params": params}, b["inputs"], train=train)
    loss, acc, _ = training.cross_entropy(logits, b["targets"])
    return loss, {"accuracy": acc}

  tx, schedule = training.make_optimizer(learning_rate=1e-2, total_steps=10, warmup_steps=0)
  if not adamw:  # SGD: parameter differences are gradient differences, not Adam-normalised noise
    tx = optax.sgd(0.5)
  mesh = sharding.make_mesh(mesh_sizes, devices=jax.devices()[:n_devices])
  rules = sharding.get_rules("dp" if rules_name == "none" else rules_name)
  state, shardings = sharding.sharded_init(training.init_fn(model, tx, batches[0]["inputs"]),
                                           mesh, rules, jax.random.key(0))
  step = training.make_train_step(loss_fn, tx, accum_steps=accum, schedule=schedule)
  with sharding.context(mesh, rules):
    p_train, _ = training.jit_steps(step, training.make_eval_step(loss_fn), shardings, mesh)
    losses = []
    for b in batches:
      state, m = p_train(state, sharding.shard_batch(b, mesh), jax.random.key(1))
      losses.append(float(m["train/loss"]))
  wte = state.params["wte"]["embedding"]
  params = {jax.tree_util.keystr(k): np.asarray(v).ravel().tolist()  # whole parameters
            for k, v in jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))}
  return {"losses": losses, "params": params, "wte_spec": str(wte.sharding.spec),
          "num_shards": len(wte.addressable_shards)}


if __name__ == "__main__":
  out = {name: run(name, sizes, n) for name, sizes, n in CASES}
  out["fsdp_accum2"] = run("fsdp", {"data": 2, "fsdp": 4}, 8, accum=2)
  out["none_adamw"] = run("none", {"data": 1}, 1, adamw=True)
  out["fsdp_tp_adamw"] = run("fsdp_tp", {"data": 2, "fsdp": 2, "tensor": 2}, 8, adamw=True)
  json.dump(out, sys.stdout)
