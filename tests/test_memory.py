"""The memory planner against XLA's own buffer assignment, and its choices by hand."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import memory, sharding, training
from fmjax.models import gpt
from fmjax.runtime import Runtime

MiB = 1024 ** 2
# fmjax/memory.py's coefficients were fitted on 35 GPT shapes (4 widths x lengths x vocabularies
# x 5 policies/kernels: 0.89-1.27 of XLA's total there); the cases below are others (MLP
# ratios 3 and 4, 2-8 heads, widths 128-384, lengths 128-2048, another mesh), where the plan
# must stay within the README's bound: at most 20% under XLA's total, at most 30% over.
LOW, HIGH = 0.8, 1.3


def gpt_case(policy="none", impl="xla", b=8, t=256, scan=True, layers=4, d=256, v=512,
             heads=4, f=None, mesh=None, rules="fsdp"):
  f = f or 4 * d
  c = gpt.GPTConfig(vocab_size=v, max_len=t, num_layers=layers, num_heads=heads, embed_dim=d,
                    mlp_dim=f)
  model = gpt.GPT(c, Runtime(remat_policy=policy, attention_impl=impl, scan_layers=scan))
  tx, schedule = training.make_optimizer(learning_rate=1e-3, total_steps=10, warmup_steps=1)
  init = training.init_fn(model, tx, jnp.zeros((b, t), jnp.int32))
  mesh = mesh or sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                                    devices=jax.devices()[:1])
  rules = sharding.get_rules(rules)
  abstract = jax.eval_shape(init, jax.random.key(0))
  unboxed = nn.meta.unbox(abstract)
  shardings = sharding.shardings_of(abstract, mesh, rules)
  shape = memory.Shape(num_layers=layers, embed_dim=d, mlp_dim=f, num_heads=heads,
                       vocab_size=v, seq_len=t, batch_size=b, attention_impl=impl,
                       scan_layers=scan)
  return model, tx, schedule, mesh, rules, unboxed, shardings, shape


def xla_bytes(case):
  model, tx, schedule, mesh, rules, unboxed, shardings, shape = case

  def loss_fn(params, batch, rng, train):
    logits = model.apply({"params": params}, batch["inputs"], train=train)
    return training.cross_entropy(logits, batch["targets"])[0], {}
  step = training.make_train_step(loss_fn, tx, schedule=schedule)
  with sharding.context(mesh, rules):
    p_train, _ = training.jit_steps(step, training.make_eval_step(loss_fn), shardings, mesh)
    tokens = jax.ShapeDtypeStruct((shape.batch_size, shape.seq_len), jnp.int32)
    compiled = p_train.lower(unboxed, {"inputs": tokens, "targets": tokens},
                             jax.random.key(0)).compile()
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
          - m.alias_size_in_bytes)


@pytest.mark.parametrize("kwargs", [
    dict(policy="none", t=384, b=4, d=192, f=576, heads=8, v=1000, layers=3),
    dict(policy="none", scan=False, t=768, b=2, d=128, f=512, heads=2, v=2000, layers=3),
    dict(policy="full", t=768, b=2, d=192, f=768, heads=6, v=1000, layers=3),
    dict(policy="dots_no_batch", t=384, b=4, d=320, f=960, heads=8, v=3000, layers=2),
    dict(policy="none", scan=False, impl="chunked", t=2048, b=1, d=128, f=384, heads=4,
         v=1000, layers=2),
    dict(policy="full", t=128, b=16, d=384, f=1536, heads=6, v=8000, layers=2),
])
def test_estimate_is_within_the_bound_at_shapes_it_was_not_fitted_on(kwargs):
  case = gpt_case(**kwargs)
  *_, unboxed, shardings, shape = case
  plan = memory.estimate(unboxed.params, shardings.params, shape,
                         remat_policy=kwargs["policy"], accum_steps=1, budget=1 << 40)
  actual = xla_bytes(case)
  assert LOW <= plan.total / actual <= HIGH, (plan.describe(), actual / MiB)


MESH_CASE = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
sys.path.insert(0, sys.argv[1])
import jax
from test_memory import gpt_case, memory, sharding, xla_bytes
for sizes, rules in (({"data": 1, "fsdp": 4, "tensor": 1}, "fsdp"),
                     ({"data": 2, "fsdp": 1, "tensor": 2}, "fsdp_tp")):
  mesh = sharding.make_mesh(sizes, devices=jax.devices()[:4])
  case = gpt_case("none", t=256, b=8, d=256, f=1024, heads=4, v=2048, layers=2, mesh=mesh,
                  rules=rules)
  *_, unboxed, shardings, shape = case
  plan = memory.estimate(unboxed.params, shardings.params, shape, remat_policy="none",
                         accum_steps=1, budget=1 << 40)
  print(rules, plan.total / xla_bytes(case))
"""


def test_estimate_is_within_the_bound_per_device_on_other_meshes():
  """4 simulated devices, fsdp=4 and data=2 x tensor=2: XLA's per-device total."""
  import os
  import subprocess
  import sys
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-c", MESH_CASE, os.path.dirname(__file__)], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  ratios = dict(line.split() for line in proc.stdout.splitlines())
  assert set(ratios) == {"fsdp", "fsdp_tp"}, proc.stdout
  for rules, ratio in ratios.items():
    assert LOW <= float(ratio) <= HIGH, (rules, ratio)


def test_parameter_bytes_are_exact_and_split_by_the_mesh():
  *_, unboxed, shardings, shape = gpt_case(layers=2)
  n = sum(x.size for x in jax.tree_util.tree_leaves(unboxed.params))
  assert memory.sharded_bytes(unboxed.params, shardings.params) == 4 * n


def test_plan_picks_the_cheapest_fit_and_refuses_clearly():
  *_, unboxed, shardings, shape = gpt_case()
  est = lambda policy, accum: memory.estimate(unboxed.params, shardings.params, shape,
                                              remat_policy=policy, accum_steps=accum,
                                              budget=0).total
  p = lambda budget: memory.plan(unboxed.params, shardings.params, shape, budget=budget)
  assert (p(est("none", 1)).remat_policy, p(est("none", 1)).accum_steps) == ("none", 1)
  # a little less than "none" needs: dots_no_batch (1.15) beats accumulating 2 (1.10)? No:
  # 1 + 0.1 log2(2) = 1.10 < 1.15, so the planner accumulates first when that fits.
  budget = est("none", 1) - 1
  chosen = p(budget)
  assert chosen.fits and chosen.total <= budget
  assert (chosen.remat_policy, chosen.accum_steps) == (
      ("none", 2) if est("none", 2) <= budget else ("dots_no_batch", 1))
  smallest = min(est(policy, a) for policy in memory.POLICIES for a in (1, 2, 4, 8))
  assert p(smallest).total == smallest
  with pytest.raises(MemoryError, match=r"nothing fits: the smallest plan needs .* MiB per device"):
    p(smallest - 1)


def test_the_mesh_comes_from_the_shardings(monkeypatch):
  """Activations split over the batch axes (data x fsdp) and `tensor` of the params' mesh:
  the same parameters laid out on a (2, 2, 2) mesh plan 8 times fewer activation bytes than on
  one device (at a batch that divides), with no mesh passed separately."""
  *_, unboxed, shardings, shape = gpt_case(layers=2, b=8)
  devices = np.array(jax.devices()[:1] * 8).reshape(2, 2, 2)
  mesh = jax.sharding.Mesh(devices, ("data", "fsdp", "tensor"))
  spread = jax.tree_util.tree_map(
      lambda s: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), shardings.params)
  assert memory.mesh_shape_of(spread) == {"data": 2, "fsdp": 2, "tensor": 2}
  est = lambda s: memory.estimate(unboxed.params, s, shape, remat_policy="none", accum_steps=1,
                                  budget=0)
  one, eight = est(shardings.params), est(spread)
  assert one.activations == memory.activation_bytes(shape, "none", 1, {})
  assert eight.activations == memory.activation_bytes(
      shape, "none", 1, {"data": 2, "fsdp": 2, "tensor": 2})
  assert 7.9 < one.activations / eight.activations <= 8.0
  with pytest.raises(ValueError, match="NamedShardings on one mesh"):
    memory.mesh_shape_of([None])
