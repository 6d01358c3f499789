"""Meshes, rule sets, the pre-flight check, the golden sharding table, sharded == unsharded."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fmjax import sharding
from fmjax.models import gpt

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "golden", "gpt_tiny_sharding.txt")


def _abstract(c):
  return jax.eval_shape(gpt.GPT(c).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8), jnp.int32))


def _table():
  c = gpt.get_config("tiny", num_kv_heads=2)
  lines = []
  for rules in ("dp", "fsdp", "fsdp_tp"):
    for path, shape, logical, spec in sharding.describe(_abstract(c), sharding.get_rules(rules)):
      lines.append(f"{rules:8s} {path:40s} {str(shape):14s} {str(logical):38s} {spec}")
  return "\n".join(lines) + "\n"


def test_golden_sharding_table():
  """param path -> logical axes -> PartitionSpec, for every rule set. Regenerate with
  FMJAX_REGEN_GOLDEN=1 after an intended change and review the diff."""
  table = _table()
  if os.environ.get("FMJAX_REGEN_GOLDEN"):
    with open(GOLDEN, "w") as f:
      f.write(table)
  with open(GOLDEN) as f:
    assert table == f.read()


def test_rules_map_logical_axes():
  fsdp_tp = sharding.get_rules("fsdp_tp")
  specs = sharding.logical_to_mesh({"q": P("embed", "heads", "head_dim"), "w": P("mlp", "embed"),
                                    "x": P("batch", "length", "act_embed")}, fsdp_tp)
  assert specs == {"q": P("fsdp", "tensor", None), "w": P("tensor", "fsdp"),
                   "x": P(("data", "fsdp"), None, None)}
  assert sharding.logical_to_mesh(P("embed", "mlp"), sharding.get_rules("dp")) == P(None, None)
  with pytest.raises(ValueError, match="unknown sharding rule set 'zero3'"):
    sharding.get_rules("zero3")


def test_make_mesh_sizes_and_errors():
  n = jax.device_count()
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  assert dict(mesh.shape) == {"data": n, "fsdp": 1, "tensor": 1}
  with pytest.raises(ValueError, match=rf"needs {3 * n} devices but {n} are available"):
    sharding.make_mesh({"data": 3 * n})
  with pytest.raises(ValueError, match="at most one size may be -1"):
    sharding.make_mesh({"data": -1, "fsdp": -1})
  with pytest.raises(ValueError, match=r"unknown mesh axes \['model'\]"):
    sharding.make_mesh({"model": 1})


def test_preflight_check_names_parameter_shape_and_mesh():
  c = gpt.get_config("tiny", embed_dim=60, num_heads=4, mlp_dim=120)
  mesh = jax.sharding.AbstractMesh((1, 8, 1), sharding.MESH_AXES)
  with pytest.raises(ValueError) as e:
    sharding.check_divisible(_abstract(c), mesh, sharding.get_rules("fsdp"))
  msg = str(e.value)
  assert "['blocks']['layer_0']['attn']['key']['kernel']" in msg or "wte" in msg
  assert "(60," in msg or ", 60)" in msg
  assert "60 % 8 != 0" in msg and "'fsdp': 8" in msg
  sharding.check_divisible(_abstract(c), jax.sharding.AbstractMesh((8, 1, 1), sharding.MESH_AXES),
                           sharding.get_rules("fsdp"))  # dp-style mesh: nothing sharded by 8


@pytest.fixture(scope="module")
def sharded_runs():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, os.path.join(HERE, "sharded_steps.py")], env=env,
                       capture_output=True, text=True, timeout=600, cwd=os.path.dirname(HERE))
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout)


@pytest.mark.parametrize("name", ["dp", "fsdp", "fsdp_tp", "fsdp_accum2"])
def test_sharded_steps_equal_one_device(sharded_runs, name):
  ref, run = sharded_runs["none"], sharded_runs[name]
  np.testing.assert_allclose(run["losses"], ref["losses"], rtol=1e-6)
  for path, values in ref["params"].items():
    np.testing.assert_allclose(run["params"][path], values, atol=1e-6, err_msg=path)


def test_sharded_adamw_matches_one_device(sharded_runs):
  """AdamW (optimizer state sharded too). Key biases get zero gradient in exact arithmetic
  (softmax ignores them), so Adam blows their float noise up to full steps: params are
  compared to 2% of one lr=1e-2 step, losses tightly."""
  ref, run = sharded_runs["none_adamw"], sharded_runs["fsdp_tp_adamw"]
  np.testing.assert_allclose(run["losses"], ref["losses"], rtol=1e-6)
  for path, values in ref["params"].items():
    np.testing.assert_allclose(run["params"][path], values, atol=2e-4, err_msg=path)


def test_sharded_params_are_really_split(sharded_runs):
  assert sharded_runs["dp"]["wte_spec"] == str(P(None, None))
  assert sharded_runs["fsdp"]["wte_spec"] == str(P(None, "fsdp"))
  assert sharded_runs["fsdp_tp"]["wte_spec"] == str(P("tensor", "fsdp"))
  assert sharded_runs["fsdp"]["num_shards"] == 8
