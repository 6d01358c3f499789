"""Proofs of fmjax/lora.py: adapters on Dense kernels, merge, the frozen base in training.

Numbers pinned by a NumPy reference of one adapted Dense, by exact equalities (zero B ==
base, frozen leaves bit for bit) and by sizes from formulas; 8 devices == 1 in a subprocess.
"""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import generate, lora, memory, sharding, training
from fmjax.layers import Dense
from fmjax.models import bert, decoder, gpt, seq2seq, vit
from fmjax.runtime import Runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = lora.LoraSpec(rank=4, alpha=8.0)


def tiny_gpt(**runtime):
  return gpt.GPT(gpt.get_config("tiny", num_kv_heads=2), Runtime(attention_impl="xla", **runtime))


def tokens(batch=2, length=8, seed=0):
  return np.random.RandomState(seed).randint(0, 256, (batch, length)).astype(np.int32)


def randomise_b(params, seed=1, scale=0.05):
  """Adapters with non-zero B (a fresh B is zero), so the low-rank term is seen."""
  keys = iter(jax.random.split(jax.random.key(seed), 256))
  return jax.tree_util.tree_map_with_path(
      lambda path, x: scale * jax.random.normal(next(keys), x.shape, x.dtype)
      if lora._names(path)[-1] == "lora_b" else x, params)


def flat(params):
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}


def test_one_dense_against_numpy():
  """y = x W + b + (alpha / r) x A B, for a Dense contracting two axes into a tuple of features."""
  x = np.random.RandomState(0).randn(2, 7, 4, 6).astype(np.float32)
  spec = lora.LoraSpec(rank=2, alpha=3.0, targets=("Dense_0",))

  class Wrap(nn.Module):
    @nn.compact
    def __call__(self, x):
      return Dense((3, 5), ("heads", "head_dim", "embed"), axis=(-2, -1))(x)

  params = lora.LoraModel(Wrap(), spec).init(jax.random.key(0), x)["params"]["Dense_0"]
  a, b = np.asarray(params["lora_a"].unbox()), np.asarray(params["lora_b"].unbox())
  assert a.shape == (4, 6, 2) and b.shape == (2, 3, 5)
  assert params["lora_a"].names == ("heads", "head_dim", None)
  assert params["lora_b"].names == (None, "embed")
  # PEFT's kaiming-uniform on (r, in): |A| <= 1/sqrt(in), spread over the range.
  assert np.abs(a).max() <= 1 / np.sqrt(24) and np.abs(a).max() > 0.6 / np.sqrt(24)
  assert not b.any()
  b = np.random.RandomState(1).randn(*b.shape).astype(np.float32)
  p = nn.meta.unbox({"Dense_0": params})
  p["Dense_0"]["lora_b"] = b
  got = lora.LoraModel(Wrap(), spec).apply({"params": p}, x)
  w, bias = np.asarray(p["Dense_0"]["kernel"]), np.asarray(p["Dense_0"]["bias"])
  x2 = x.reshape(2, 7, 24)
  want = (x2 @ w.reshape(24, 15) + bias.reshape(15) + 1.5 * x2 @ a.reshape(24, 2) @ b.reshape(2, 15))
  np.testing.assert_allclose(np.asarray(got).reshape(2, 7, 15), want, rtol=1e-5, atol=1e-5)


def test_zero_b_equals_base_and_merge_equals_adapters():
  model, x = tiny_gpt(), tokens()
  base = jax.jit(lambda k: nn.meta.unbox(model.init(k, x)["params"]))(jax.random.key(0))
  params = lora.add_adapters(model, base, SPEC, jax.random.key(1), x)
  # Each layer: q, k, v, o and wi, wo; the base leaves are the very same arrays.
  names = [k for k in flat(params) if "lora" in k]
  assert len(names) == 2 * 6 * 2
  assert all(flat(params)[k] is v for k, v in flat(base).items())  # the base untouched
  plain = jax.jit(lambda p: model.apply({"params": p}, x))
  adapted_fn = jax.jit(lambda p: lora.apply(model, p, SPEC, x))
  want = plain(base)
  np.testing.assert_array_equal(adapted_fn(params), want)  # B = 0: exact
  params = randomise_b(params)
  adapted = adapted_fn(params)
  assert np.abs(adapted - want).max() > 1e-3  # the adapters do something
  merged = lora.merge(params, SPEC)
  assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(base)
  np.testing.assert_allclose(plain(merged), adapted, atol=1e-5, rtol=1e-5)
  # generation (one compiled loop over the KV cache) with the adapters == with merged weights
  prompts = [[5, 6, 7], [9]]
  adapted_tokens = generate.generate(lora.LoraModel(model, SPEC), params, prompts, max_new_tokens=4)
  assert adapted_tokens == generate.generate(model, merged, prompts, max_new_tokens=4)
  back = lora.unmerge(merged, lora.split(params)[1], SPEC)
  for k, v in flat(params).items():
    np.testing.assert_allclose(flat(back)[k], v, atol=1e-6)


def test_scanned_layers_get_stacked_adapters_and_equal_the_loop():
  x = tokens()
  loop, scan = tiny_gpt(), tiny_gpt(scan_layers=True)
  p_scan = jax.jit(lambda k: nn.meta.unbox(lora.LoraModel(scan, SPEC).init(k, x)["params"]))(
      jax.random.key(0))
  p_scan = randomise_b(p_scan)
  q = p_scan["blocks"]["layers"]["attn"]["query"]
  assert q["lora_a"].shape == (2, 64, 4) and q["lora_b"].shape == (2, 4, 4, 16)
  boxed = jax.eval_shape(lambda: lora.LoraModel(scan, SPEC).init(jax.random.key(0), x))
  assert boxed["params"]["blocks"]["layers"]["attn"]["query"]["lora_a"].names == (
      "layers", "embed", None)
  p_loop = {k: v for k, v in p_scan.items() if k != "blocks"}
  p_loop["blocks"] = {f"layer_{i}": jax.tree_util.tree_map(lambda t: t[i], p_scan["blocks"]["layers"])
                      for i in range(2)}
  got_scan = jax.jit(lambda p: lora.apply(scan, p, SPEC, x))(p_scan)
  got_loop = jax.jit(lambda p: lora.apply(loop, p, SPEC, x))(p_loop)
  np.testing.assert_allclose(got_scan, got_loop, atol=1e-5, rtol=1e-5)
  merged = jax.jit(lambda p: scan.apply({"params": lora.merge(p, SPEC)}, x))(p_scan)
  np.testing.assert_allclose(merged, got_scan, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["decoder", "bert", "vit", "seq2seq"])
def test_default_targets_adapt_every_model_family(name):
  """Attention q/k/v/o (self and cross) and the MLP of each layer; heads and embeddings not."""
  rt = Runtime(attention_impl="xla")
  if name == "decoder":  # gated MLP: wi, wi_up, wo
    model, args, per_layer, layers = decoder.Decoder(decoder.get_config("tiny"), rt), (tokens(),), 7, 2
  elif name == "bert":
    model = bert.BertForSequenceClassification(bert.get_config("tiny", vocab_size=256), 3, rt)
    args, per_layer, layers = (tokens(),), 6, 2
  elif name == "vit":
    model, args, per_layer, layers = vit.ViT(vit.get_config("tiny"), rt), (
        np.zeros((1, 28, 28, 1), np.float32),), 6, 2
  else:
    c = seq2seq.get_config("tiny")
    model = seq2seq.Seq2Seq(c, rt)
    src = tokens(length=6)
    args = (src, np.ones(src.shape, bool), tokens(length=5))
    per_layer, layers = None, None
  params = nn.meta.unbox(jax.eval_shape(
      lambda: lora.LoraModel(model, SPEC).init(jax.random.key(0), *args))["params"])
  paths = sorted(k for k in flat(params) if "lora_a" in k)
  assert all(any(f"['{m}']" in p for m in ("attn", "cross", "mlp")) for p in paths), paths
  if per_layer is not None:
    assert len(paths) == per_layer * layers, paths
  else:  # encoder layers: 6 each, decoder layers: self 4 + cross 4 + MLP 2
    c = seq2seq.get_config("tiny")
    assert len(paths) == 6 * c.encoder_layers + 10 * c.decoder_layers, paths


def test_a_pattern_matching_nothing_names_it_and_lists_the_dense_paths():
  spec = lora.LoraSpec(rank=2, alpha=2.0, targets=("query", "q_proj"))
  with pytest.raises(ValueError, match=r"\['q_proj'\] match\(es\) no Dense.*blocks/layer_0/attn/query"):
    lora.LoraModel(tiny_gpt(), spec).init(jax.random.key(0), tokens())
  with pytest.raises(ValueError, match="rank=0"):
    lora.LoraSpec(rank=0, alpha=1.0)
  with pytest.raises(ValueError, match="not a regular expression"):
    lora.LoraSpec(rank=2, alpha=1.0, targets=("(",))
  # adapters that the spec does not target are refused, not ignored
  model, x = tiny_gpt(), tokens()
  params = lora.add_adapters(model, model.init(jax.random.key(0), x)["params"], SPEC,
                             jax.random.key(1), x)
  with pytest.raises(ValueError, match="holds LoRA adapters but no pattern"):
    lora.apply(model, params, lora.LoraSpec(rank=4, alpha=8.0, targets=("query",)), x)


def _loss_fn(model):
  def loss_fn(params, b, rng, train):
    logits = model.apply({"params": params}, b["inputs"], train=train, rngs={"dropout": rng})
    loss, acc, _ = training.cross_entropy(logits, b["targets"])
    return loss, {"accuracy": acc}
  return loss_fn


def test_train_step_moves_only_adapters_and_keeps_adam_moments_for_them_only():
  """A bfloat16 base with float32 adapters (and adapter dropout)."""
  param_dtype = "bfloat16"
  spec = lora.LoraSpec(rank=4, alpha=8.0, dropout=0.1)
  model = lora.LoraModel(tiny_gpt(param_dtype=param_dtype), spec)
  x = tokens(4, 16)
  batch = {"inputs": x, "targets": tokens(4, 16, seed=1)}
  tx, _ = training.make_optimizer(learning_rate=1e-2, total_steps=10, warmup_steps=0)
  mask = lambda p: lora.trainable_mask(p, spec)
  state = jax.jit(lambda k: nn.meta.unbox(training.init_fn(model, tx, x, trainable=mask)(k)))(
      jax.random.key(0))
  n_adapters = lora.count(state.params, mask(state.params))
  # per layer: q and out (D 64, N H 64), k and v (K H 32: two kv heads), wi and wo (F 256)
  assert n_adapters == 2 * (2 * (64 * 4 + 4 * 64) + 2 * (64 * 4 + 4 * 32) + 2 * (64 * 4 + 4 * 256))
  moments = [x for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim > 0]
  assert sum(x.size for x in moments) == 2 * n_adapters  # Adam's mu and nu, adapters only
  assert all(x.dtype == jnp.float32 for x in moments)
  step = jax.jit(training.make_train_step(_loss_fn(model), tx, trainable=mask))
  new, m = step(state, batch, jax.random.key(2))
  new, m = step(new, batch, jax.random.key(2))
  assert int(m["nonfinite"]) == 0 and np.isfinite(float(m["train/loss"]))
  before, after, trained = flat(state.params), flat(new.params), flat(mask(state.params))
  for k in before:
    if trained[k]:
      assert not np.array_equal(before[k], after[k]), k  # B moved off zero, A moved
      assert after[k].dtype == jnp.float32
    else:
      assert after[k].dtype == jnp.dtype(param_dtype)
      np.testing.assert_array_equal(before[k], after[k])  # frozen, bit for bit


def test_memory_plan_counts_optimizer_state_for_adapters_only():
  model = lora.LoraModel(tiny_gpt(), SPEC)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens())["params"])
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  shardings = sharding.shardings_of(abstract, mesh, "dp")
  params = nn.meta.unbox(abstract)
  mask = nn.meta.unbox(lora.trainable_mask(abstract))
  shape = memory.Shape(batch_size=2, seq_len=8, embed_dim=64, mlp_dim=256, num_heads=4,
                       num_layers=2, vocab_size=256)
  plan = memory.estimate(params, shardings, shape, remat_policy="none", accum_steps=1,
                         trainable=mask)
  adapters = 4 * lora.count(params, mask)
  assert plan.gradients == adapters and plan.optimizer == 2 * adapters
  assert plan.params == 4 * lora.count(params)
  full = memory.estimate(params, shardings, shape, remat_policy="none", accum_steps=1)
  assert full.optimizer == 2 * plan.params


@pytest.mark.slow
def test_eight_devices_fsdp_tp_equal_one_for_a_lora_step():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "lora_steps.py")],
                        env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout)
  one, eight = out["one"], out["fsdp_tp"]
  # a query's lora_a ("embed", None) and lora_b (None, "heads", "head_dim") under fsdp_tp
  assert eight["spec"] == ["P('fsdp', None)", "P(None, 'tensor', None)"]
  np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5)
  for k, v in one["params"].items():
    np.testing.assert_allclose(eight["params"][k], v, atol=2e-5, rtol=1e-4, err_msg=k)
  assert one["moments"] == eight["moments"] == one["adapters"] * 2


# The programs: config.lora in train/finetune.py and train/classify_images.py ------------------

def _program(env, module, config, workdir, *overrides):
  cmd = [sys.executable, "-m", f"train.{module}", f"--config={config}", f"--workdir={workdir}",
         *overrides]
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _finish(proc):
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  return out, err


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


LORA_RUN = ("--config.lora.rank=4", "--config.lora.alpha=8", "--config.train.learning_rate=1e-2",
            "--config.train.decay=constant", "--config.train.warmup_steps=0",
            "--config.runtime.dropout_rate=0.0", "--config.runtime.attention_dropout_rate=0.0",
            "--config.train.log_every=1", "--config.train.eval_every=100",
            "--config.train.save_every=3")


@pytest.mark.slow
def test_finetune_with_lora_trains_adapters_and_head_and_resumes(env, tmp_path):
  """Tiny BERT (D 128, F 512, 2 layers, 2 labels): adapters 2 x (3 x (128 x 4 + 4 x 128) +
  (128 x 4 + 4 x 128) + (128 x 4 + 4 x 512) + (512 x 4 + 4 x 128)) = 18,432, the head 258."""
  whole = _program(env, "finetune", "configs/finetune.py:tiny", tmp_path / "whole", *LORA_RUN,
                   "--config.train.steps=6")
  part = _program(env, "finetune", "configs/finetune.py:tiny", tmp_path / "part", *LORA_RUN,
                  "--config.train.steps=3")
  _, err = _finish(whole)
  _finish(part)
  _finish(_program(env, "finetune", "configs/finetune.py:tiny", tmp_path / "part", *LORA_RUN,
                   "--config.train.steps=6"))  # resumes from step 3: optimizer state restored
  rows = _rows(tmp_path / "whole")
  assert rows[0]["trainable_params"] == 18_432 + 258
  assert rows[0]["trainable_params"] < rows[0]["total_params"] / 10
  assert "trainable_params" not in rows[1]
  resumed = _rows(tmp_path / "part")
  assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
  for a, b in zip(rows, resumed):
    assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-6), a["step"]
  assert f"{18_690:,} trained" in err


def _idx(path, array):
  """An IDX file (MNIST's format) of uint8 data."""
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
      int(n).to_bytes(4, "big") for n in array.shape)
  path.write_bytes(header + array.astype(np.uint8).tobytes())
  return path


def test_lora_targets_matching_nothing_is_one_error_line(env, tmp_path):
  rng = np.random.default_rng(0)
  x = _idx(tmp_path / "images", rng.integers(0, 256, (20, 28, 28)))
  y = _idx(tmp_path / "labels", np.arange(20) % 10)
  proc = _program(env, "classify_images", "configs/vit.py:tiny", tmp_path / "run",
                  f"--config.data.train_images={x}", f"--config.data.train_labels={y}",
                  "--config.data.train_stop=10", "--config.data.eval_start=10",
                  "--config.data.eval_stop=0",
                  "--config.lora.rank=2", "--config.lora.targets=query,q_proj")
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 2, err[-2000:]
  line = err.strip().splitlines()[-1]
  assert line.startswith("error: --config.lora.targets=query,q_proj: ['q_proj'] match(es) no "
                         "Dense layer"), line
  assert "encoder/blocks/layer_0/attn/query" in line
