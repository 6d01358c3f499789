"""PEFT LoRA adapters in and out of fmjax (fmjax/hf/peft.py).

Goldens made by peft (tests/golden/make_peft_goldens.py): a PEFT LoRA with random non-zero A
and B on the tiny Llama and GPT-2 of tests/golden/hf, and the PeftModel's logits. fmjax loads
them and matches those logits; fmjax's own export has the golden's tensor names and shapes
(bit-exact round trip), and (live, when peft is installed) peft reads fmjax's adapters.
"""

import json
import pathlib

import flax.linen as nn
import jax
import numpy as np
import pytest
import safetensors.numpy

import fmjax.hf
from fmjax import lora
from fmjax.hf import peft as fpeft
from fmjax.runtime import Runtime

GOLDEN = pathlib.Path(__file__).parent / "golden"
ATOL = 1e-5


def load(name, **runtime):
  model, variables = fmjax.hf.from_pretrained(GOLDEN / "hf" / name,
                                              runtime=Runtime(attention_impl="xla", **runtime))
  params, spec = fpeft.load_adapter(GOLDEN / "peft" / name, model, variables["params"])
  return model, variables["params"], params, spec


@pytest.mark.parametrize("name,scan", [("llama", False), ("llama", True), ("gpt2", False)])
def test_a_peft_adapter_gives_peft_logits(name, scan):
  ref = dict(np.load(GOLDEN / "peft" / name / "reference.npz"))
  model, base, params, spec = load(name, scan_layers=scan)
  assert (spec.rank, spec.alpha, spec.scale) == (4, 8.0, 2.0)
  v = model.config.vocab_size
  got = np.asarray(lora.apply(model, params, spec, ref["input_ids"]))[..., :v]
  np.testing.assert_allclose(got, ref["logits"], atol=ATOL, rtol=0)
  plain = np.asarray(model.apply({"params": base}, ref["input_ids"]))[..., :v]
  assert np.abs(plain - ref["logits"]).max() > 100 * ATOL  # the adapter matters
  merged = model.apply({"params": lora.merge(params, spec)}, ref["input_ids"])[..., :v]
  np.testing.assert_allclose(np.asarray(merged), ref["logits"], atol=ATOL, rtol=0)


def test_gpt2_fused_c_attn_shares_a_across_query_key_value():
  _, _, params, _ = load("gpt2")
  attn = params["blocks"]["layer_0"]["attn"]
  peft_a = safetensors.numpy.load_file(GOLDEN / "peft" / "gpt2" / fpeft.WEIGHTS_FILE)[
      "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]  # (r, D)
  for n in ("query", "key", "value"):
    np.testing.assert_array_equal(np.asarray(attn[n]["lora_a"]).reshape(-1, 4), peft_a.T)
  assert attn["query"]["lora_b"].shape == (4, 2, 16)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_export_has_the_goldens_names_shapes_and_values(name, tmp_path):
  model, _, params, spec = load(name, scan_layers=name == "llama")
  fpeft.save_adapter(tmp_path, model, params, spec)
  ours = safetensors.numpy.load_file(tmp_path / fpeft.WEIGHTS_FILE)
  theirs = safetensors.numpy.load_file(GOLDEN / "peft" / name / fpeft.WEIGHTS_FILE)
  assert sorted(ours) == sorted(theirs)
  for k, v in theirs.items():
    assert ours[k].shape == v.shape and ours[k].dtype == v.dtype, k
    np.testing.assert_array_equal(ours[k], v, err_msg=k)  # bit for bit
  mine = json.loads((tmp_path / fpeft.CONFIG_FILE).read_text())
  golden = json.loads((GOLDEN / "peft" / name / fpeft.CONFIG_FILE).read_text())
  for key in ("peft_type", "task_type", "r", "lora_alpha", "fan_in_fan_out"):
    assert mine[key] == golden[key], key
  assert sorted(mine["target_modules"]) == sorted(golden["target_modules"])


def test_independent_adapters_on_a_fused_module_round_trip_exactly(tmp_path):
  """fmjax's q/k/v adapters with their own A: rank 3r, block-diagonal B, split back on load."""
  model, base, _, _ = load("gpt2")
  spec = lora.LoraSpec(rank=2, alpha=3.0, targets=("query", "key", "value", "wo"))
  x = np.arange(10, dtype=np.int32).reshape(1, 10)
  params = lora.add_adapters(model, base, spec, jax.random.key(0), x)
  keys = iter(jax.random.split(jax.random.key(1), 64))
  params = jax.tree_util.tree_map_with_path(
      lambda p, t: 0.1 * jax.random.normal(next(keys), t.shape) if lora._names(p)[-1] == "lora_b"
      else t, params)
  fpeft.save_adapter(tmp_path, model, params, spec)
  cfg = json.loads((tmp_path / fpeft.CONFIG_FILE).read_text())
  assert cfg["rank_pattern"] == {"c_attn": 6} and cfg["alpha_pattern"] == {"c_attn": 9.0}
  # not every c_proj is adapted (the attention output is not): full module names
  assert cfg["target_modules"] == sorted(f"transformer.h.{i}.{m}" for i in range(2)
                                         for m in ("attn.c_attn", "mlp.c_proj"))
  back, spec2 = fpeft.load_adapter(tmp_path, model, base)
  assert (spec2.rank, spec2.scale) == (2, 1.5)
  for (k, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(params),
                            jax.tree_util.tree_leaves_with_path(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(k))
  np.testing.assert_allclose(lora.apply(model, back, spec2, x), lora.apply(model, params, spec, x),
                             atol=1e-6)


def test_bad_adapters_are_refused(tmp_path):
  model, base, params, spec = load("llama")
  with pytest.raises(FileNotFoundError, match="adapter_config.json"):
    fpeft.load_adapter(tmp_path, model, base)
  fpeft.save_adapter(tmp_path, model, params, spec)
  cfg = json.loads((tmp_path / fpeft.CONFIG_FILE).read_text())
  (tmp_path / fpeft.CONFIG_FILE).write_text(json.dumps({**cfg, "use_dora": True}))
  with pytest.raises(ValueError, match="LoRA adapters only"):
    fpeft.load_adapter(tmp_path, model, base)
  gpt_model, gpt_base, _, _ = load("gpt2")
  with pytest.raises(ValueError, match="match no weight matrix"):
    fpeft.load_adapter(GOLDEN / "peft" / "llama", gpt_model, gpt_base)


def test_peft_reads_fmjax_adapters(tmp_path):
  """Live: transformers + peft load fmjax's merged-free export and compute fmjax's logits."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  transformers = pytest.importorskip("transformers")
  for name in ("llama", "gpt2"):
    model, base, _, _ = load(name)
    spec = lora.LoraSpec(rank=2, alpha=5.0)
    x = np.random.RandomState(0).randint(0, model.config.vocab_size, (2, 9)).astype(np.int32)
    params = lora.add_adapters(model, base, spec, jax.random.key(0), x)
    keys = iter(jax.random.split(jax.random.key(1), 64))
    params = jax.tree_util.tree_map_with_path(
        lambda p, t: 0.1 * jax.random.normal(next(keys), t.shape) if lora._names(p)[-1] == "lora_b"
        else t, params)
    fmjax.hf.save_pretrained(model, {"params": base}, tmp_path / name / "base")
    fpeft.save_adapter(tmp_path / name / "adapter", model, params, spec)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name / "base",
                                                          dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / name / "adapter").eval()
    with torch.no_grad():
      want = pm(input_ids=torch.from_numpy(x.astype(np.int64))).logits.numpy()
    got = np.asarray(lora.apply(model, params, spec, x))[..., :model.config.vocab_size]
    assert np.abs(got - np.asarray(model.apply({"params": base}, x))[..., :want.shape[-1]]).max() > 1e-3
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=name)


def test_init_from_a_base_checkpoint_leaves_the_adapters_fresh():
  """fmjax.sources loads the base into a LoRA model (Task.new_params + lora.NEW_PARAMS)."""
  from fmjax import sharding, sources
  model, base = fmjax.hf.from_pretrained(GOLDEN / "hf" / "llama",
                                         runtime=Runtime(attention_impl="xla", scan_layers=True))
  spec = lora.LoraSpec(rank=2, alpha=4.0)
  wrapped = lora.LoraModel(model, spec)
  x = np.zeros((1, 4), np.int32)
  abstract = jax.eval_shape(lambda: wrapped.init(jax.random.key(0), x)["params"])
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  fresh = jax.jit(lambda k: nn.meta.unbox(wrapped.init(k, x)["params"]))(jax.random.key(3))
  loaded = sources.parse(f"hf:{GOLDEN / 'hf' / 'llama'}").load(
      fresh, sharding.shardings_of(abstract, mesh, "dp"), lora.NEW_PARAMS)
  got, want = lora.split(loaded), lora.split(fresh)
  for (k, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(got[0]),
                            jax.tree_util.tree_leaves_with_path(nn.meta.unbox(base["params"]))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(k))
  for a, b in zip(jax.tree_util.tree_leaves(got[1]), jax.tree_util.tree_leaves(want[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the adapters as initialised
  with pytest.raises(Exception, match="lacks"):  # without NEW_PARAMS the adapters are missing
    sources.parse(f"hf:{GOLDEN / 'hf' / 'llama'}").load(
        fresh, sharding.shardings_of(abstract, mesh, "dp"))


def _bert_cls_with_adapters():
  model, variables = fmjax.hf.from_pretrained(GOLDEN / "hf" / "bert_cls",
                                              runtime=Runtime(attention_impl="xla"))
  base = variables["params"]
  spec = lora.LoraSpec(rank=2, alpha=4.0, targets=("query", "value"),
                       modules_to_save=("classifier",))
  ids = np.random.RandomState(0).randint(5, 100, (2, 7)).astype(np.int32)
  args = (ids, np.zeros_like(ids), np.ones_like(ids))
  params = lora.add_adapters(model, base, spec, jax.random.key(0), *args)
  keys = iter(jax.random.split(jax.random.key(1), 64))
  params = jax.tree_util.tree_map_with_path(  # B non-zero, and a "trained" classifier
      lambda p, t: t + 0.1 * jax.random.normal(next(keys), t.shape)
      if lora._names(p)[-1] == "lora_b" or "classifier" in lora._names(p) else t, params)
  return model, base, params, spec, args


def test_bert_classifier_adapters_and_modules_to_save_round_trip(tmp_path):
  model, base, params, spec, args = _bert_cls_with_adapters()
  fpeft.save_adapter(tmp_path, model, params, spec)
  cfg = json.loads((tmp_path / fpeft.CONFIG_FILE).read_text())
  assert (cfg["task_type"], cfg["modules_to_save"], cfg["target_modules"]) == (
      "SEQ_CLS", ["classifier"], ["query", "value"])
  names = set(safetensors.numpy.load_file(tmp_path / fpeft.WEIGHTS_FILE))
  assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias",
          "base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight"} <= names
  back, spec2 = fpeft.load_adapter(tmp_path, model, base)
  assert spec2.modules_to_save == ("classifier/dense",) and spec2.scale == spec.scale
  for (k, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(params),
                            jax.tree_util.tree_leaves_with_path(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(k))


def test_peft_reads_fmjax_bert_classifier_adapters(tmp_path):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  transformers = pytest.importorskip("transformers")
  model, base, params, spec, args = _bert_cls_with_adapters()
  fmjax.hf.save_pretrained(model, {"params": base}, tmp_path / "base")
  fpeft.save_adapter(tmp_path / "adapter", model, params, spec)
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base",
                                                                       dtype=torch.float32)
  pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
  with torch.no_grad():
    want = pm(input_ids=torch.from_numpy(args[0].astype(np.int64)),
              token_type_ids=torch.from_numpy(args[1].astype(np.int64)),
              attention_mask=torch.from_numpy(args[2].astype(np.int64))).logits.numpy()
  got = np.asarray(lora.apply(model, params, spec, *args))
  assert np.abs(got - np.asarray(model.apply({"params": base}, *args))).max() > 1e-3
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
