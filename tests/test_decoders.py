"""The decoder families (fmjax/models/decoder.py, fmjax/hf/decoders.py) pinned against
transformers: golden logits and greedy tokens of a tiny random model per architecture, exact
export, the sliding-window and soft-capping kernels against a naive reference, and the errors.

The goldens in tests/golden/hf/{llama,llama_tied,mistral,qwen2,qwen3,gemma,gemma2,gemma3_text}/
are written by tests/golden/make_hf_goldens.py (`decoders`) with torch and transformers; these
tests need neither.
"""

import dataclasses
import json
import pathlib
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from fmjax import attention, generate, hf, sharding
from fmjax.hf import decoders
from fmjax.layers import Rope
from fmjax.models import decoder
from fmjax.runtime import Runtime

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "hf"
FAMILIES = ["llama", "llama_tied", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"]
ATOL = 1e-5  # float32 vs transformers' float32 PyTorch logits


def reference(name):
  return dict(np.load(GOLDEN / name / "reference.npz"))


def hf_config(name):
  return json.loads((GOLDEN / name / "config.json").read_text())


def hf_tensors(directory):
  out = {}
  for f in sorted(pathlib.Path(directory).glob("*.safetensors")):
    out.update(safetensors.numpy.load_file(f))
  return out


_MODELS = {}


def loaded(name):
  """from_pretrained of a golden directory, once per test session."""
  if name not in _MODELS:
    _MODELS[name] = hf.from_pretrained(GOLDEN / name)
  return _MODELS[name]


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers(name):
  model, variables = loaded(name)
  ref = reference(name)
  assert model.config.family == hf_config(name)["model_type"]
  logits = model.apply(variables, ref["input_ids"])
  assert logits.shape == (2, 12, model.config.padded_vocab_size)
  V = model.config.vocab_size
  np.testing.assert_allclose(np.asarray(logits[..., :V]), ref["logits"], atol=ATOL, rtol=0)
  assert np.all(np.isneginf(np.asarray(logits[..., V:])))  # padded ids, even after soft-capping


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_tokens_through_generate(name):
  """Prompts of 6 tokens left-padded to 8 slots, 10 new tokens: 16 > the window of 4."""
  model, variables = loaded(name)
  ref = reference(name)
  out = generate.generate(model, variables["params"], ref["greedy_prompt"].tolist(),
                          max_new_tokens=10)
  assert out == ref["greedy_tokens"][:, 6:].tolist()


def test_the_goldens_switch_the_quirks_on():
  """A golden that lost its quirk would pass for the wrong reason."""
  c = {name: loaded(name)[0].config for name in FAMILIES}
  assert c["llama"].attention.rope.scaling == "llama3" and c["llama"].attention_bias
  assert c["llama"].mlp_bias and not c["llama"].tie_embeddings
  assert c["llama_tied"].attention.rope.scaling == "linear" and c["llama_tied"].tie_embeddings
  assert c["llama_tied"].num_kv_heads == 1
  assert c["mistral"].local == decoder.LocalLayers(window=4, layers=(0, 1))
  assert c["qwen2"].attention.qkv_bias and not c["qwen2"].attention_bias
  assert c["qwen3"].attention.qk_norm and c["qwen3"].head_width != 32 // 4
  assert c["gemma"].gemma == decoder.Gemma() and c["gemma"].num_kv_heads == 1
  assert c["gemma2"].attention.softcap == 3.0 and c["gemma2"].gemma.final_softcap == 5.0
  assert c["gemma2"].local.layers == (0, 2) and c["gemma2"].attention.scale == 24 ** -0.5
  g3 = c["gemma3_text"]
  assert g3.local == decoder.LocalLayers(4, (0, 2), Rope(10_000.0))
  assert g3.attention.rope == Rope(1e6, "linear", 2.0) and g3.attention.qk_norm
  assert (GOLDEN / "mistral" / "model.safetensors.index.json").is_file()
  assert hf_config("llama_tied")["dtype"] == "bfloat16"
  for name in FAMILIES:  # the window is shorter than the test sequence
    window = c[name].local.window if c[name].local else None
    assert window is None or window < reference(name)["input_ids"].shape[1]


@pytest.mark.parametrize("name", FAMILIES)
def test_export_equals_the_original_tensors(name, tmp_path):
  model, variables = loaded(name)
  hf.save_pretrained(model, variables, tmp_path)
  ours, theirs = hf_tensors(tmp_path), hf_tensors(GOLDEN / name)
  assert ours.keys() == theirs.keys()
  for k in ours:  # the bf16 golden was read into float32: the same numbers
    assert np.array_equal(ours[k], theirs[k].astype(ours[k].dtype)), k
  written = json.loads((tmp_path / "config.json").read_text())
  assert written["model_type"] == hf_config(name)["model_type"]
  assert written["architectures"] == hf_config(name)["architectures"]
  assert decoders.ARCHITECTURES[written["model_type"]].config_from_hf(written) == model.config


def test_causal_lm_task_builds_the_decoder():
  model, _ = hf.from_pretrained(GOLDEN / "qwen3", task="causal_lm")
  assert isinstance(model, decoder.Decoder) and model.config == loaded("qwen3")[0].config
  with pytest.raises(ValueError, match=r"task='classification' needs a bert checkpoint.*"
                                       r"model_type='qwen3', which serves tasks \['causal_lm'\]"):
    hf.from_pretrained(GOLDEN / "qwen3", task="classification")


def test_bf16_checkpoint_round_trips_bit_for_bit(tmp_path):
  model, variables = hf.from_pretrained(GOLDEN / "llama_tied", dtype="bfloat16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(variables))
  hf.save_pretrained(model, variables, tmp_path)
  ours, theirs = hf_tensors(tmp_path), hf_tensors(GOLDEN / "llama_tied")
  assert ours.keys() == theirs.keys()
  for k in ours:
    assert ours[k].dtype == theirs[k].dtype and np.array_equal(ours[k], theirs[k]), k
  assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
  _, again = hf.from_pretrained(tmp_path, dtype="bfloat16")
  for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(again)):
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_fp16_checkpoint_loads_its_values(tmp_path):
  shutil.copy(GOLDEN / "qwen2" / "config.json", tmp_path / "config.json")
  half = {k: v.astype(np.float16) for k, v in hf_tensors(GOLDEN / "qwen2").items()}
  safetensors.numpy.save_file(half, tmp_path / "model.safetensors", metadata={"format": "pt"})
  model, variables = hf.from_pretrained(tmp_path)
  q = variables["params"]["blocks"]["layer_1"]["attn"]["query"]["bias"]
  assert q.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(q).reshape(-1),
                                half["model.layers.1.self_attn.q_proj.bias"].astype(np.float32))
  ref = reference("qwen2")
  logits = model.apply(variables, ref["input_ids"])[..., :model.config.vocab_size]
  assert np.abs(np.asarray(logits) - ref["logits"]).max() < 0.05  # fp16 rounding, not a bug


def test_sharded_checkpoint_placed_into_the_mesh_shardings():
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1})
  model, variables = hf.from_pretrained(GOLDEN / "mistral", mesh=mesh, rules="fsdp_tp")
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  expected = sharding.shardings_of(abstract, mesh, "fsdp_tp")["params"]
  got = jax.tree_util.tree_map(lambda x: x.sharding, variables["params"])
  assert jax.tree_util.tree_leaves(got) == jax.tree_util.tree_leaves(expected)
  # The logical axes the decoder names, through the fsdp_tp table (fmjax/sharding.py).
  layer = variables["params"]["blocks"]["layer_0"]
  P = jax.sharding.PartitionSpec
  assert layer["attn"]["query"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
  assert layer["attn"]["key"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
  assert layer["attn"]["out"]["kernel"].sharding.spec == P("tensor", None, "fsdp")
  assert layer["mlp"]["wi_up"]["kernel"].sharding.spec == P("fsdp", "tensor")
  assert variables["params"]["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")
  _, plain = loaded("mistral")
  for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(plain)):
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_mesh_loading_places_each_tensor_before_reading_the_next(monkeypatch):
  """Streaming: the host holds one converted tensor at a time, devices only their shards."""
  from fmjax.hf import weights  # pylint: disable=g-import-not-at-top
  events = []
  read, place = weights._Checkpoint.get, weights._put
  monkeypatch.setattr(weights._Checkpoint, "get",
                      lambda self, name: events.append("read") or read(self, name))
  monkeypatch.setattr(weights, "_put",
                      lambda *args, **kw: events.append("place") or place(*args, **kw))
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1})
  _, variables = hf.from_pretrained(GOLDEN / "mistral", mesh=mesh)
  n = len(jax.tree_util.tree_leaves(variables))
  assert events == ["read", "place"] * n


def test_gemma2_through_the_chunked_kernel():
  """The sliding window and the soft cap inside the online softmax of a whole model."""
  model, variables = hf.from_pretrained(GOLDEN / "gemma2",
                                        runtime=Runtime(attention_impl="chunked"))
  ref = reference("gemma2")
  logits = jax.jit(model.apply)(variables, ref["input_ids"])[..., :model.config.vocab_size]
  np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=ATOL, rtol=0)


def test_legacy_config_spellings_read_the_same():
  """rope_theta + rope_scaling (older transformers, most Hub files), Gemma 3's
  rope_local_base_freq and sliding_window_pattern, Gemma 2 without layer_types."""
  read = lambda hf_dict: decoders.ARCHITECTURES[hf_dict["model_type"]].config_from_hf(hf_dict)
  llama = hf_config("llama")
  params = llama.pop("rope_parameters")
  old = {**llama, "rope_theta": params.pop("rope_theta"),
         "rope_scaling": {**{k: v for k, v in params.items() if k != "rope_type"},
                          "type": "llama3"}}
  assert read(old) == read(hf_config("llama"))
  g3 = hf_config("gemma3_text")
  rope, types = g3.pop("rope_parameters"), g3.pop("layer_types")
  old = {**g3, "rope_theta": 1e6, "rope_local_base_freq": 10_000.0, "sliding_window_pattern": 2,
         "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
  assert read(old) == read(hf_config("gemma3_text"))
  g2 = hf_config("gemma2")
  del g2["layer_types"]
  assert read(g2) == read(hf_config("gemma2"))
  mistral = {**hf_config("mistral"), "sliding_window": None}  # Mistral v0.2+: no window
  assert read(mistral).local is None


def _reference_attention(q, k, v, window, softcap, scale):
  """Float64 NumPy attention with the rule in attention.py's docstring (causal)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  k, v = np.repeat(k, N // K, axis=2), np.repeat(v, N // K, axis=2)
  logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
  if softcap:
    logits = softcap * np.tanh(logits / softcap)
  t, s = np.arange(T)[:, None], np.arange(S)[None, :]
  allowed = (t >= s) & (t - s < (window or S + T))
  logits = np.where(allowed, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", p, v)


def test_sliding_window_mask_by_hand():
  mask = np.asarray(attention.make_attention_mask(q_len=5, kv_len=5, causal=True, window=2))
  assert mask[0, 0].astype(int).tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0],
                                             [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]


def test_sliding_window_kernels_equal_naive_reference():
  rng = np.random.default_rng(0)
  B, T, N, K, H, window = 2, 11, 4, 2, 8, 3
  q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32)
             for s in ((B, T, N, H), (B, T, K, H), (B, T, K, H)))
  scale, softcap = 0.7, 2.0
  cases = [(impl, cap) for impl in ("xla", "chunked") for cap in (None, softcap)]
  outs = jax.jit(lambda q, k, v: [attention.dot_product_attention(  # one compilation
      q, k, v, causal=True, window=window, softcap=cap, scale=scale, impl=impl, chunk_size=4)
                                  for impl, cap in cases])(q, k, v)
  for (impl, cap), got in zip(cases, outs):
    want = _reference_attention(q, k, v, window, cap, scale)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, err_msg=f"{impl} {cap}")
  want = _reference_attention(q, k, v, window, softcap, scale)
  # The chunked backward (recomputed, soft-capping's tanh' included) equals xla's gradients.
  loss = lambda impl: lambda q, k, v: jnp.sum(jnp.sin(attention.dot_product_attention(
      q, k, v, causal=True, window=window, softcap=softcap, scale=scale, impl=impl,
      chunk_size=4)))
  g_xla, g_chunked = jax.jit(lambda q, k, v: [jax.grad(loss(impl), argnums=(0, 1, 2))(q, k, v)
                                               for impl in ("xla", "chunked")])(q, k, v)
  for a, b in zip(g_xla, g_chunked):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  # Splash (the Pallas TPU kernel, interpreted here): a LocalMask and its own soft cap.
  got = attention.splash_attention(q, k, v, causal=True, window=window, softcap=softcap,
                                   scale=scale, interpret=True)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)
  # Decoding: the cache's last query sees the same window.
  out = jax.jit(lambda q, k, v: attention.cached_attention(
      q[:, -1:], k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
      q_slots=jnp.asarray([[T - 1]]), window=window, softcap=softcap, scale=scale))(q, k, v)
  np.testing.assert_allclose(np.asarray(out), want[:, -1:], atol=2e-6)


def test_auto_never_picks_a_kernel_without_window_support(monkeypatch):
  q = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
  monkeypatch.setattr(attention.jax, "default_backend", lambda: "tpu")
  assert attention._auto_impl(q, 256, False, False, True) == "splash"  # a LocalMask
  monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
  assert attention._auto_impl(q, 256, False, False) == "cudnn"
  assert attention._auto_impl(q, 256, False, False, True) == "xla"  # not a dense mask in cuDNN
  with pytest.raises(ValueError, match="impl='cudnn' does not support logit soft-capping"):
    attention.dot_product_attention(q, q, q, causal=True, softcap=50.0, impl="cudnn")
  with pytest.raises(ValueError, match="window=0 must be a positive int"):
    attention.dot_product_attention(q, q, q, causal=True, window=0)


def test_num_params_formula_matches_init():
  for name in decoder.PRESETS:
    local = decoder.PRESETS[name].local  # 2 layers of each preset, the first one local
    c = decoder.get_config(name, num_layers=2, vocab_size=1000,
                           local=local and dataclasses.replace(local, layers=(0,)))
    shapes = jax.eval_shape(decoder.Decoder(c).init, jax.random.key(0),
                            jnp.zeros((1, 1), jnp.int32))
    assert sum(x.size for x in jax.tree_util.tree_leaves(shapes)) == decoder.num_params(c), name
  published = {"smollm2_135m": 134_515_008, "llama3_2_1b": 1_235_814_400,
               "qwen2_5_0_5b": 494_032_768, "gemma3_1b": 999_885_952}  # their model cards
  for name, count in published.items():
    assert decoder.num_params(decoder.get_config(name, vocab_multiple=1)) == count, name


def test_flops_per_token_counts_the_matmul_parameters():
  c = decoder.get_config("tiny")  # untied, no biases: every parameter but the norms and the
  L, D, V, T = c.num_layers, c.embed_dim, c.padded_vocab_size, 64  # input table is a matmul
  matmul = decoder.num_params(c) - L * 2 * D - D - V * D
  assert decoder.flops_per_token(c, T) == 6 * matmul + 12 * L * T * c.num_heads * c.head_width


def test_every_preset_writes_and_reads_back_the_same_config_json():
  for name, c in decoder.PRESETS.items():
    arch = decoders.ARCHITECTURES[c.family]
    written = {"model_type": c.family, **arch.config_to_hf(c)}
    assert arch.config_from_hf(json.loads(json.dumps(written))) == c, name


def _edit(tmp_path, name, config=None, drop=None, reshape=None):
  """A copy of a golden directory with config.json fields replaced and/or a tensor dropped or
  cut."""
  d = tmp_path / name
  shutil.copytree(GOLDEN / name, d)
  if config:
    (d / "config.json").write_text(json.dumps({**hf_config(name), **config}))
  if drop or reshape:
    tensors = hf_tensors(d)
    tensors.pop(drop, None)
    if reshape:
      tensors[reshape] = tensors[reshape][:-1]
    for f in d.glob("*.safetensors"):
      f.unlink()
    safetensors.numpy.save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
  return d


def test_errors_name_what_is_wrong_and_what_is_supported(tmp_path):
  cases = [
      (dict(config={"model_type": "phi3"}), r"model_type='phi3'; fmjax.hf supports .*'gemma2'"),
      (dict(config={"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4}}),
       r"rope type 'yarn'; fmjax supports rope types \['default', 'linear', 'llama3'\]"),
      (dict(drop="model.layers.1.self_attn.k_proj.bias"),
       r"has no tensor 'model.layers.1.self_attn.k_proj.bias'.*LlamaForCausalLM"),
      (dict(reshape="model.layers.0.mlp.up_proj.weight"),
       r"tensor 'model.layers.0.mlp.up_proj.weight' has shape \(63, 32\), but config.json .* "
       r"needs \(64, 32\)"),
      (dict(config={"hidden_act": "relu2"}), r"hidden_act='relu2'; fmjax supports"),
  ]
  for i, (edit, message) in enumerate(cases):
    d = _edit(tmp_path / str(i), "llama", **edit)
    with pytest.raises(ValueError, match=message):
      hf.from_pretrained(d)
  d = _edit(tmp_path / "types", "gemma2", config={"layer_types": ["chunked_attention"] * 3})
  with pytest.raises(ValueError, match=r"layer_types=\['chunked_attention'.*fmjax supports 3 "
                                       r"entries of \['full_attention', 'sliding_attention'\]"):
    hf.from_pretrained(d)


def test_export_and_runtime_refuse_what_they_cannot_express(tmp_path):
  c = dataclasses.replace(decoder.get_config("tiny"), attention=dataclasses.replace(
      decoder.get_config("tiny").attention, qk_norm=True))
  model = decoder.Decoder(c)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  with pytest.raises(ValueError, match=r"family='llama'\) uses \['qk_norm'\].*LlamaForCausalLM"):
    hf.save_pretrained(model, params, tmp_path)
  scanned = decoder.Decoder(decoder.get_config("tiny"), Runtime(scan_layers=True))  # same layers
  shapes = jax.eval_shape(scanned.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  assert nn.meta.unbox(shapes)["params"]["blocks"]["layers"]["attn"]["query"]["kernel"].shape == (
      2, 64, 4, 16)
  gemma3 = decoder.Decoder(decoder.get_config("gemma3_tiny"), Runtime(scan_layers=True))
  with pytest.raises(ValueError, match="scan_layers=True stacks identical layers"):
    jax.eval_shape(gemma3.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))


def test_transformers_reads_the_exports_with_the_golden_logits(tmp_path):
  """The config.json fmjax writes means the same model to transformers (rope_parameters,
  layer_types, query_pre_attn_scalar, soft caps): its logits of the export equal the goldens."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  for name in ("llama", "qwen2", "gemma2", "gemma3_text"):  # the config.json subtleties
    model, variables = loaded(name)
    hf.save_pretrained(model, variables, tmp_path / name)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / name, dtype=torch.float32, attn_implementation="eager").eval()
    assert type(theirs).__name__ == hf_config(name)["architectures"][0]
    ref = reference(name)
    with torch.no_grad():
      logits = theirs(torch.tensor(ref["input_ids"], dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(logits, ref["logits"], atol=ATOL, rtol=0, err_msg=name)
