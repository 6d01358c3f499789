"""Loading a sharded checkpoint onto an 8-device fsdp mesh, one tensor at a time (issue 17).

fmjax.hf.from_pretrained(dir, mesh=...) reads each Hugging Face tensor, puts it on the
devices one shard at a time in its NamedSharding, and drops it before reading the next, so the
host never holds more than one tensor of the model. Pinned in a subprocess with 8 simulated
CPU devices on a Llama-shaped decoder whose largest tensor is a small fraction of the whole:

- the checkpoint is sharded (save_pretrained(max_shard_size=...) writes several files and
  model.safetensors.index.json, as transformers does) and stored in float16 (the tensors of
  the largest group) as well as float32;
- tracemalloc's peak during from_pretrained (numpy buffers and the bytes safetensors reads are
  traced; XLA's device buffers are not) stays within the largest tensor's stored bytes plus one
  device's float32 shard of it and 2 MiB of bookkeeping, while the model is 15 times the
  largest tensor; the same checkpoint assembled on the host first (read_weights, no mesh)
  peaks at the model's size, so the measure can fail. (Each load runs once untraced first, so
  jax's compilation caches do not count.)
- every array's sharding is the fsdp rule's (sharding.shardings_of) and its values equal the
  numbers written (float16-rounded, in float32), with the vocabulary rows fmjax pads zero;
- scanned layers (Runtime(scan_layers=True)) load the same way, stacked on the devices.

save_pretrained(max_shard_size=...) itself: shards within the size, an index naming every
tensor once, the other layout's files removed on a re-save, a bad size refused; transformers
reads the sharded export to the golden's logits (live, skips without torch).

The written numbers come from numpy's generator, not from fmjax; the expected values are those
numbers as float16 -> float32 (exact).
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

LLAMA = pathlib.Path(__file__).resolve().parent / "golden" / "hf" / "llama"

_SCRIPT = r"""
import json, pathlib, sys, tracemalloc
import flax.linen as nn
import jax, numpy as np
import safetensors.numpy
from fmjax import hf, sharding
from fmjax.checkpoint import stack_layers
from fmjax.models.decoder import Decoder, DecoderConfig
from fmjax.runtime import Runtime

root = pathlib.Path(sys.argv[1])
config = DecoderConfig(vocab_size=1000, max_len=64, num_layers=4, embed_dim=512, mlp_dim=2048,
                       num_heads=8, num_kv_heads=2)
model = Decoder(config)
abstract = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                        jax.ShapeDtypeStruct((1, 1), np.int32))["params"])
rng = np.random.default_rng(0)
params = jax.tree_util.tree_map(
    lambda s: rng.standard_normal(s.shape, dtype=np.float32), abstract)
for path in (("wte", "embedding"), ("lm_head", "kernel")):  # fmjax's padded rows are zero
  table = params[path[0]][path[1]]
  rows = np.arange(table.shape[0] if path[0] == "wte" else table.shape[1]) >= 1000
  table[rows if path[0] == "wte" else (slice(None), rows)] = 0
hf.save_pretrained(model, {"params": params}, root / "f32", max_shard_size="10MB")
# The same checkpoint with every tensor in float16 (as a half-precision release is stored).
(root / "f16").mkdir()
for f in (root / "f32").iterdir():
  if f.suffix == ".safetensors":
    tensors = {k: v.astype(np.float16) for k, v in safetensors.numpy.load_file(f).items()}
    safetensors.numpy.save_file(tensors, root / "f16" / f.name, metadata={"format": "pt"})
  else:
    (root / "f16" / f.name).write_bytes(f.read_bytes())

flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
out = {"files": sorted(f.name for f in (root / "f16").iterdir()),
       "largest": max(x.nbytes for x in flat.values()),
       "total": sum(x.nbytes for x in flat.values()), "devices": len(jax.devices())}
mesh = sharding.make_mesh({"fsdp": 8})


def traced(load):
  tracemalloc.start()
  try:
    result = jax.block_until_ready(load())
    return result, tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


for name, scan in (("f32", False), ("f16", False), ("f16_scan", True)):
  runtime = Runtime(scan_layers=scan)
  # Once untraced first: jax's tracing and compilation caches are not the checkpoint's memory.
  jax.block_until_ready(hf.from_pretrained(root / name[:3], mesh=mesh, runtime=runtime))
  (m, variables), peak = traced(lambda: hf.from_pretrained(root / name[:3], mesh=mesh,
                                                          runtime=runtime))
  got = variables["params"]
  want = jax.tree_util.tree_map(lambda x: x.astype(np.float16).astype(np.float32)
                                if name.startswith("f16") else x, params)
  if scan:
    want = {}
    flat_want = {"/".join(k.key for k in p): x for p, x in
                 jax.tree_util.tree_leaves_with_path(jax.tree_util.tree_map(
                     lambda x: x.astype(np.float16).astype(np.float32), params))}
    for path, x in stack_layers(flat_want).items():
      node = want
      *parents, leaf = path.split("/")
      for k in parents:
        node = node.setdefault(k, {})
      node[leaf] = x
  shardings = sharding.shardings_of(
      jax.eval_shape(m.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 1), np.int32)),
      mesh, "fsdp")["params"]
  leaves = jax.tree_util.tree_leaves_with_path(got)
  out[name] = {
      "peak": peak, "n": len(leaves), "want_n": len(jax.tree_util.tree_leaves(want)),
      "sharded": all(x.sharding.is_equivalent_to(s, x.ndim) for (_, x), s in
                     zip(leaves, jax.tree_util.tree_leaves(shardings))),
      "split": sum(len({str(s.index) for s in x.addressable_shards}) > 1 for _, x in leaves),
      "dtypes": sorted({str(x.dtype) for _, x in leaves}),
      "equal": all(np.array_equal(np.asarray(x), y) for (_, x), y in
                   zip(leaves, jax.tree_util.tree_leaves(want))),
      "query_spec": str(got["blocks"]["layers" if scan else "layer_0"]["attn"]["query"]
                        ["kernel"].sharding.spec)}

# The whole tree on the host first: the measure sees a whole model when there is one.
_, out["host_tree_peak"] = traced(lambda: hf.read_weights(root / "f16"))
print(json.dumps(out))
"""


def test_sharded_checkpoint_loads_one_tensor_at_a_time(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "FMJAX_CPU_DEVICES"}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  out = json.loads(run.stdout.strip().splitlines()[-1])
  assert out["devices"] == 8
  shards = [f for f in out["files"] if f.endswith(".safetensors")]
  assert "model.safetensors.index.json" in out["files"] and "model.safetensors" not in shards
  assert len(shards) >= 5 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  largest, total = out["largest"], out["total"]
  assert largest == 512 * 2048 * 4 and total >= 15 * largest  # 4 MiB of a 63 MB model
  # The tensor being read + one float32 shard of it (1/8) + jax's per-call bookkeeping (about
  # 1 MiB measured); two tensors at once (or a whole converted copy) would not fit.
  overhead = 2 * 2**20
  for name in ("f32", "f16", "f16_scan"):
    r = out[name]
    assert r["n"] == r["want_n"] and r["sharded"] and r["equal"], (name, r)
    assert r["dtypes"] == ["float32"], (name, r)  # float16 files load as float32 params
    assert r["split"] == r["n"], (name, r)  # every tensor really is cut across the devices
    stored = largest // 2 if name.startswith("f16") else largest
    assert r["peak"] <= stored + largest // 8 + overhead, (name, r["peak"], stored)
  assert out["f32"]["query_spec"] == "P('fsdp', None, None)"
  assert out["f16_scan"]["query_spec"] in ("P(None, 'fsdp', None, None)", "P(None, 'fsdp')")
  # The measure itself: assembling the whole tree on the host shows up as the model's size.
  assert out["host_tree_peak"] >= total * 0.9


def _save_sharded(tmp_path, size="20KB"):
  from fmjax import hf
  model, variables = hf.from_pretrained(LLAMA)
  out = tmp_path / "sharded"
  hf.save_pretrained(model, variables, out, max_shard_size=size)
  return model, variables, out


def test_save_pretrained_max_shard_size(tmp_path):
  from fmjax import hf
  model, variables, out = _save_sharded(tmp_path)
  single = safetensors.numpy.load_file(LLAMA / "model.safetensors")
  index = json.loads((out / "model.safetensors.index.json").read_text())
  shards = sorted(out.glob("model-*-of-*.safetensors"))
  assert len(shards) >= 3 and not (out / "model.safetensors").exists()
  assert sorted(index["weight_map"]) == sorted(single)
  assert set(index["weight_map"].values()) == {f.name for f in shards}
  assert index["metadata"]["total_size"] == sum(t.nbytes for t in single.values())
  for f in shards:
    tensors = safetensors.numpy.load_file(f)
    assert all(index["weight_map"][n] == f.name for n in tensors)
    assert sum(t.nbytes for t in tensors.values()) <= 20_000 or len(tensors) == 1
    for n, t in tensors.items():
      np.testing.assert_array_equal(t, single[n])
  again, again_vars = hf.from_pretrained(out)
  assert again == model
  for a, b in zip(*map(__import__("jax").tree_util.tree_leaves, (again_vars, variables))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  hf.save_pretrained(model, variables, out)  # one file again: the shards and index go
  assert sorted(f.name for f in out.iterdir()) == ["config.json", "model.safetensors"]
  for bad in ("lots", 0, -5, "1.5XB", True):
    with pytest.raises(ValueError, match=f"max_shard_size={bad!r}"):
      hf.save_pretrained(model, variables, out, max_shard_size=bad)
  assert sorted(f.name for f in out.iterdir()) == ["config.json", "model.safetensors"]


def test_transformers_reads_the_sharded_export(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  _, _, out = _save_sharded(tmp_path)
  ref = np.load(LLAMA / "reference.npz")
  pt = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  with torch.no_grad():
    logits = pt(torch.from_numpy(ref["input_ids"]).long()).logits.numpy()
  assert np.abs(logits - ref["logits"]).max() <= 1e-5
