"""Two LoRA train steps (AdamW, frozen base) of the tiny GPT on 1 device and on a (2, 2, 2)
fsdp_tp mesh; prints losses, the trained params and the optimizer's moment sizes as JSON.

Executed in a subprocess by tests/test_lora.py, with 8 simulated CPU devices:
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/lora_steps.py
"""

import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from fmjax import lora, sharding, training  # noqa: E402
from fmjax.models import gpt  # noqa: E402
from fmjax.runtime import Runtime  # noqa: E402


def run(rules, mesh_sizes, n_devices):
  spec = lora.LoraSpec(rank=4, alpha=8.0)
  model = lora.LoraModel(gpt.GPT(gpt.get_config("tiny", num_kv_heads=2),
                                 Runtime(attention_impl="xla")), spec)
  rng = np.random.RandomState(0)
  batches = [{"inputs": rng.randint(0, 256, (8, 16)).astype(np.int32),
              "targets": rng.randint(0, 256, (8, 16)).astype(np.int32)} for _ in range(2)]

  def loss_fn(params, b, r, train):
    logits = model.apply({"params": params}, b["inputs"], train=train)
    loss, acc, _ = training.cross_entropy(logits, b["targets"])
    return loss, {"accuracy": acc}

  mask = lambda p: lora.trainable_mask(p, spec)
  tx, schedule = training.make_optimizer(learning_rate=1e-2, total_steps=10, warmup_steps=0)
  mesh = sharding.make_mesh(mesh_sizes, devices=jax.devices()[:n_devices])
  state, shardings = sharding.sharded_init(
      training.init_fn(model, tx, batches[0]["inputs"], trainable=mask), mesh, rules,
      jax.random.key(0))
  step = training.make_train_step(loss_fn, tx, schedule=schedule, trainable=mask)
  with sharding.context(mesh, rules):
    p_train, _ = training.jit_steps(step, training.make_eval_step(loss_fn), shardings, mesh)
    losses = []
    for b in batches:
      state, m = p_train(state, sharding.shard_batch(b, mesh), jax.random.key(1))
      losses.append(float(m["train/loss"]))
  q = state.params["blocks"]["layer_0"]["attn"]["query"]
  host = jax.device_get(state.params)
  params = {jax.tree_util.keystr(k): np.asarray(v).ravel().tolist()  # whole parameters
            for k, v in jax.tree_util.tree_leaves_with_path(host) if "lora" in jax.tree_util.keystr(k)}
  moments = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim > 0)
  return {"losses": losses, "params": params, "spec": [str(q[n].sharding.spec) for n in ("lora_a", "lora_b")],
          "moments": int(moments),
          "adapters": lora.count(nn.meta.unbox(host), lora.trainable_mask(host))}


if __name__ == "__main__":
  json.dump({"one": run("dp", {"data": 1}, 1),
             "fsdp_tp": run("fsdp_tp", {"data": 2, "fsdp": 2, "tensor": 2}, 8)}, sys.stdout)
