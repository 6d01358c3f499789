"""fmjax.hf pinned against transformers: golden outputs of tiny HF models, exact round trips,
sharded placement, tokenizations, and the error messages.

The goldens in tests/golden/hf/ are written by tests/golden/make_hf_goldens.py with torch and
transformers; these tests need neither (except the last one, skipped without them).
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from fmjax import hf
from fmjax.data import tokenizers as fm_tokenizers
from fmjax.models.bert import BertEncoder, BertForPreTraining
from fmjax.models.gpt import GPT, GPTConfig
from fmjax.runtime import Runtime

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "hf"
BERT_DIR, GPT2_DIR = GOLDEN / "bert", GOLDEN / "gpt2"
ATOL = 1e-5  # float32 vs transformers' float32 PyTorch outputs
TOKENIZATIONS = json.loads((GOLDEN / "tokenizations.json").read_text(encoding="utf-8"))


def reference(directory):
  return dict(np.load(directory / "reference.npz"))


def max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def flat(tree):
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_trees_equal(a, b):
  a, b = flat(a), flat(b)
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k


def read_tensors(directory):
  return safetensors.numpy.load_file(directory / "model.safetensors")


def write_model_dir(directory, config, tensors):
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(config))
  safetensors.numpy.save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
  return directory


def bert_model_dir(tmp_path):
  """The golden BERT as HF's BertModel saves it: no heads, no "bert." prefix."""
  config = json.loads((BERT_DIR / "config.json").read_text())
  tensors = {k[len("bert."):]: v for k, v in read_tensors(BERT_DIR).items()
             if k.startswith("bert.")}
  return write_model_dir(tmp_path / "bert_model", {**config, "architectures": ["BertModel"]},
                         tensors)


@pytest.fixture(scope="module")
def bert():
  return hf.from_pretrained(BERT_DIR)


@pytest.fixture(scope="module")
def gpt2():
  return hf.from_pretrained(GPT2_DIR)


def test_bert_pretraining_matches_transformers(bert):
  model, variables = bert
  assert type(model) is BertForPreTraining
  c = model.config
  assert (c.vocab_size, c.embed_dim, c.num_layers, c.num_heads, c.mlp_dim, c.max_len) == (
      200, 32, 2, 2, 64, 64)
  assert c.norm_eps == 1e-12
  ref = reference(BERT_DIR)
  out = jax.jit(model.apply)(variables, ref["input_ids"], ref["token_type_ids"],
                             ref["attention_mask"])
  assert out["mlm_logits"].shape == (2, 16, 256)  # the vocabulary padded to vocab_multiple 128
  out["mlm_logits"] = out["mlm_logits"][..., :200]
  assert max_diff(out["sequence_output"], ref["last_hidden_state"]) <= ATOL
  assert max_diff(out["pooled_output"], ref["pooler_output"]) <= ATOL
  assert max_diff(out["mlm_logits"], ref["prediction_logits"]) <= ATOL
  assert max_diff(out["nsp_logits"], ref["seq_relationship_logits"]) <= ATOL
  # The goldens are not near zero: a dropped bias or transpose would show far above ATOL.
  assert np.abs(ref["prediction_logits"]).max() > 5 and np.abs(ref["pooler_output"]).max() > 0.5


def test_bert_model_checkpoint_gives_encoder(tmp_path):
  model, variables = hf.from_pretrained(bert_model_dir(tmp_path))
  assert type(model) is BertEncoder
  ref = reference(BERT_DIR)
  seq, pooled = jax.jit(model.apply)(variables, ref["input_ids"],
                                     token_type_ids=ref["token_type_ids"],
                                     attention_mask=ref["attention_mask"])
  assert max_diff(seq, ref["last_hidden_state"]) <= ATOL
  assert max_diff(pooled, ref["pooler_output"]) <= ATOL


def test_gpt2_matches_transformers(gpt2):
  model, variables = gpt2
  assert type(model) is GPT
  c = model.config
  assert (c.vocab_size, c.embed_dim, c.num_layers, c.num_heads, c.mlp_dim, c.max_len) == (
      300, 32, 2, 2, 128, 64)
  assert c.mlp_activation == "gelu_tanh" and c.tie_embeddings and c.position == "learned"
  ref = reference(GPT2_DIR)
  logits = jax.jit(model.apply)(variables, ref["input_ids"])
  assert logits.shape == (2, 16, 384)  # the vocabulary padded to vocab_multiple 128
  assert max_diff(logits[..., :300], ref["logits"]) <= ATOL
  assert np.abs(ref["logits"]).max() > 5


def test_gpt2_greedy_golden_is_argmax_rollout(gpt2):
  """The stored HF greedy tokens are what repeated argmax of fmjax's logits gives (causal: the
  logits at t only see tokens <= t, so one fixed-length buffer serves every step)."""
  model, variables = gpt2
  ref = reference(GPT2_DIR)
  prompt, expected = ref["greedy_prompt"], ref["greedy_tokens"]
  assert prompt.shape == (2, 8) and expected.shape == (2, 20)
  np.testing.assert_array_equal(expected[:, :8], prompt)
  step = jax.jit(lambda tokens: model.apply(variables, tokens))
  tokens = np.zeros((2, 20), np.int32)
  tokens[:, :8] = prompt
  for t in range(8, 20):
    tokens[:, t] = np.argmax(np.asarray(step(tokens))[:, t - 1], axis=-1)
  np.testing.assert_array_equal(tokens, expected)


@pytest.mark.parametrize("which", ["bert", "bert_model", "gpt2"])
def test_read_weights_has_init_paths(which, tmp_path):
  directory = {"bert": BERT_DIR, "gpt2": GPT2_DIR}.get(which) or bert_model_dir(tmp_path)
  config, params = hf.read_weights(directory)
  module = {"bert": BertForPreTraining, "bert_model": BertEncoder, "gpt2": GPT}[which]
  init = jax.eval_shape(module(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  init = nn.meta.unbox(init["params"])
  if which == "bert_model":
    init = {"bert": init}  # encoder params wrapped, as BertForPreTraining nests them
  got = {k: (x.shape, x.dtype) for k, x in flat(params).items()}
  assert got == {k: (x.shape, x.dtype) for k, x in flat(init).items()}
  assert all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(params))
  # One mapping spelled out: HF query.weight (out, in) -> fmjax kernel (D, N, H).
  if which != "gpt2":
    w = read_tensors(BERT_DIR)["bert.encoder.layer.1.attention.self.query.weight"]
    np.testing.assert_array_equal(params["bert"]["blocks"]["layer_1"]["attn"]["query"]["kernel"],
                                  w.T.reshape(32, 2, 16))


def test_read_weights_scanned_and_bfloat16():
  config, plain = hf.read_weights(GPT2_DIR)
  runtime = Runtime(scan_layers=True, param_dtype="bfloat16")
  config_s, scanned = hf.read_weights(GPT2_DIR, runtime=runtime)
  assert config_s == config  # the architecture; the layout and dtype are the runtime's
  init = jax.eval_shape(GPT(config_s, runtime).init, jax.random.key(0),
                        jnp.zeros((1, 1), jnp.int32))
  assert ({k: x.shape for k, x in flat(scanned).items()}
          == {k: x.shape for k, x in flat(nn.meta.unbox(init["params"])).items()})
  q = scanned["blocks"]["layers"]["attn"]["query"]["kernel"]
  assert q.shape == (2, 32, 2, 16) and q.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      q[1], plain["blocks"]["layer_1"]["attn"]["query"]["kernel"].astype(jnp.bfloat16))


@pytest.mark.parametrize("source", ["bert", "bert_model", "gpt2"])
def test_export_import_round_trip_is_exact(source, tmp_path):
  directory = {"bert": BERT_DIR, "gpt2": GPT2_DIR}.get(source) or bert_model_dir(tmp_path)
  model, variables = hf.from_pretrained(directory)
  out = tmp_path / "export"
  hf.save_pretrained(model, variables, out)
  # The same tensors, bit for bit and by HF's names, as transformers saved them.
  theirs, ours = read_tensors(directory), read_tensors(out)
  assert ours.keys() == theirs.keys()
  for k in theirs:
    assert ours[k].dtype == theirs[k].dtype and np.array_equal(ours[k], theirs[k]), k
  config = json.loads((out / "config.json").read_text())
  assert config["architectures"] == [{"bert": "BertForPreTraining", "bert_model": "BertModel",
                                      "gpt2": "GPT2LMHeadModel"}[source]]
  model2, variables2 = hf.from_pretrained(out)
  assert model2 == model
  assert_trees_equal(variables2, variables)


def test_gpt2_untied_lm_head(tmp_path):
  config = {**json.loads((GPT2_DIR / "config.json").read_text()), "tie_word_embeddings": False}
  tensors = read_tensors(GPT2_DIR)
  tensors["lm_head.weight"] = np.random.default_rng(0).normal(size=(300, 32)).astype(np.float32)
  d = write_model_dir(tmp_path / "untied", config, tensors)
  model, variables = hf.from_pretrained(d)
  assert not model.config.tie_embeddings
  np.testing.assert_array_equal(variables["params"]["lm_head"]["kernel"][:, :300],
                                tensors["lm_head.weight"].T)  # torch Linear (V, D) -> (D, V)
  assert np.all(variables["params"]["lm_head"]["kernel"][:, 300:] == 0)  # padding to 384
  hf.save_pretrained(model, variables, tmp_path / "export")
  assert np.array_equal(read_tensors(tmp_path / "export")["lm_head.weight"],
                        tensors["lm_head.weight"])
  exported = json.loads((tmp_path / "export" / "config.json").read_text())
  assert exported["tie_word_embeddings"] is False


def test_unused_tensors_are_named_in_a_warning(tmp_path):
  """A task checkpoint (e.g. BertForSequenceClassification) loads its encoder; the rest is
  reported, not silently dropped."""
  tensors = read_tensors(BERT_DIR)
  tensors["classifier.weight"] = np.zeros((3, 32), np.float32)
  d = write_model_dir(tmp_path / "cls", json.loads((BERT_DIR / "config.json").read_text()),
                      tensors)
  with pytest.warns(UserWarning, match=r"ignores 1 tensors of .*model.safetensors that a "
                                       r"BertForPreTraining does not have: "
                                       r"\['classifier.weight'\]"):
    hf.read_weights(d)


def test_export_scanned_bfloat16_round_trip(tmp_path):
  model, variables = hf.from_pretrained(GPT2_DIR, dtype="bfloat16",
                                        runtime=Runtime(scan_layers=True))
  assert model.runtime == Runtime(scan_layers=True, dtype="bfloat16", param_dtype="bfloat16")
  hf.save_pretrained(model, variables, tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
  assert read_tensors(tmp_path)["transformer.h.0.attn.c_attn.weight"].dtype == jnp.bfloat16
  model2, variables2 = hf.from_pretrained(tmp_path, dtype="bfloat16",
                                          runtime=Runtime(scan_layers=True))
  assert model2 == model
  assert_trees_equal(variables2, variables)


_SHARDED = r"""
import json, sys
import jax, numpy as np
from fmjax import hf, sharding
out = {}
for name, sizes, rules in [("gpt2", {"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tp"),
                           ("bert", {"fsdp": 8}, None)]:
  directory = sys.argv[1] + "/" + name
  mesh = sharding.make_mesh(sizes)
  model, variables = hf.from_pretrained(directory, mesh=mesh, rules=rules)
  abstract = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 1), np.int32))
  expected = sharding.shardings_of(abstract, mesh, sharding.get_rules(rules or "fsdp"))
  leaves = jax.tree_util.tree_leaves_with_path(variables)
  want = jax.tree_util.tree_leaves(expected)
  ok = all(x.sharding.is_equivalent_to(s, x.ndim) for (_, x), s in zip(leaves, want))
  specs = {jax.tree_util.keystr(p): str(x.sharding.spec) for p, x in leaves}
  ref = np.load(directory + "/reference.npz")
  apply = jax.jit(model.apply)  # computes on the sharded weights as placed
  if name == "gpt2":
    got = apply(variables, ref["input_ids"])
    diff = float(np.abs(np.asarray(got)[..., :300] - ref["logits"]).max())
  else:
    got = apply(variables, ref["input_ids"], ref["token_type_ids"], ref["attention_mask"])
    diff = float(np.abs(np.asarray(got["mlm_logits"])[..., :200] - ref["prediction_logits"]).max())
  out[name] = {"ok": ok, "n": len(leaves), "want": len(want), "specs": specs, "diff": diff,
               "devices": len(jax.devices())}
print(json.dumps(out))
"""


def test_from_pretrained_places_weights_on_mesh_shardings():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  run = subprocess.run([sys.executable, "-c", _SHARDED, str(GOLDEN)], env=env,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  out = json.loads(run.stdout.strip().splitlines()[-1])
  for name in ("gpt2", "bert"):
    assert out[name]["devices"] == 8 and out[name]["ok"] and out[name]["n"] == out[name]["want"]
    assert out[name]["diff"] <= ATOL
  gpt, bert = out["gpt2"]["specs"], out["bert"]["specs"]
  assert gpt["['params']['wte']['embedding']"] == "P('tensor', 'fsdp')"
  assert gpt["['params']['blocks']['layer_0']['attn']['query']['kernel']"] == (
      "P('fsdp', 'tensor', None)")
  assert gpt["['params']['blocks']['layer_1']['mlp']['wo']['kernel']"] == (
      "P('tensor', 'fsdp')")
  assert bert["['params']['bert']['word_embeddings']['embedding']"] == "P(None, 'fsdp')"
  assert bert["['params']['mlm_bias']"] == "P(None,)"


# --- Tokenizers -------------------------------------------------------------------------------

def expected_offsets(text, offsets):
  """HF's raw offsets with leading whitespace trimmed, as fmjax's Tokenizer interface reports."""
  out = []
  for start, end in offsets:
    while start < end and text[start].isspace():
      start += 1
    out.append((start, end))
  return out


def assert_matches_reference(tok, name):
  ref = TOKENIZATIONS[name]
  for s in ref["strings"]:
    assert tok.encode(s["text"]) == s["ids"], s["text"]
    ids, offsets = tok.encode_with_offsets(s["text"])
    assert ids == s["ids"] and offsets == expected_offsets(s["text"], s["offsets"]), s["text"]
  texts = [s["text"] for s in ref["strings"]]
  assert tok.encode_batch(texts) == [s["ids"] for s in ref["strings"]]
  assert tok.vocab_size == ref["vocab_size"]


def test_bert_tokenizer_matches_transformers(tmp_path):
  tok = hf.tokenizer_from_pretrained(BERT_DIR)
  assert isinstance(tok, fm_tokenizers.Tokenizer) and tok.kind == "hf"
  ref = TOKENIZATIONS["bert"]
  assert_matches_reference(tok, "bert")
  assert (tok.eos_id, tok.pad_id) == (ref["sep_id"], ref["pad_id"]) == (3, 0)
  assert tok.token_to_id("[MASK]") == ref["mask_id"] and tok.token_to_id("[CLS]") == ref["cls_id"]
  # Uncased: "Hello World!" -> hello world ! with spans on the original text.
  assert tok.encode_with_offsets("Hello World!")[1] == [(0, 5), (6, 11), (11, 12)]
  assert tok.decode(tok.encode("Hello World!") + [tok.eos_id, tok.pad_id]) == "hello world!"
  # The WordPiece vocab.txt path, honouring do_lower_case from tokenizer_config.json.
  for f in ("vocab.txt", "tokenizer_config.json"):
    shutil.copy(BERT_DIR / f, tmp_path / f)
  assert_matches_reference(hf.tokenizer_from_pretrained(tmp_path), "bert")
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "do_lower_case": False}))
  assert hf.tokenizer_from_pretrained(tmp_path).encode("Hello") != tok.encode("Hello")


def test_gpt2_tokenizer_matches_transformers(tmp_path):
  tok = hf.tokenizer_from_pretrained(GPT2_DIR)
  ref = TOKENIZATIONS["gpt2"]
  assert_matches_reference(tok, "gpt2")
  assert tok.eos_id == tok.pad_id == ref["eos_id"] == tok.token_to_id("<|endoftext|>")
  for s in ref["strings"]:  # byte-level BPE is lossless; EOS/PAD decode to nothing
    assert tok.decode(s["ids"] + [tok.eos_id]) == s["text"]
  assert tok.encode("a<|endoftext|>b") == tok.encode("a") + [tok.eos_id] + tok.encode("b")
  with pytest.raises(KeyError, match="'<nope>' is not a token"):
    tok.token_to_id("<nope>")
  # The vocab.json + merges.txt path.
  for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
    shutil.copy(GPT2_DIR / f, tmp_path / f)
  from_files = hf.tokenizer_from_pretrained(tmp_path)
  assert_matches_reference(from_files, "gpt2")
  assert from_files.eos_id == tok.eos_id
  assert from_files.encode("a<|endoftext|>b") == tok.encode("a<|endoftext|>b")


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_tokenizer_save_restores_through_fmjax_data(name, tmp_path):
  tok = hf.tokenizer_from_pretrained(GOLDEN / name)
  tok.save(tmp_path)
  assert json.loads((tmp_path / "fmjax_tokenizer.json").read_text())["kind"] == "hf"
  restored = fm_tokenizers.load_tokenizer(tmp_path)
  assert type(restored) is hf.HFTokenizer and restored.fingerprint == tok.fingerprint
  assert (restored.eos_id, restored.pad_id, restored.vocab_size) == (
      tok.eos_id, tok.pad_id, tok.vocab_size)
  assert_matches_reference(restored, name)
  assert hf.tokenizer_from_pretrained(GOLDEN / "gpt2").fingerprint != hf.tokenizer_from_pretrained(
      GOLDEN / "bert").fingerprint


def test_tokenizer_kind_restores_without_importing_fmjax_hf(tmp_path):
  hf.tokenizer_from_pretrained(GPT2_DIR).save(tmp_path)
  code = ("import sys; from fmjax.data import load_tokenizer; "
          "assert 'fmjax.hf' not in sys.modules; t = load_tokenizer(sys.argv[1]); "
          "print(type(t).__name__, t.eos_id)")
  run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert run.returncode == 0, run.stderr[-2000:]
  assert run.stdout.split() == ["HFTokenizer", str(TOKENIZATIONS["gpt2"]["eos_id"])]


# --- Errors -----------------------------------------------------------------------------------

def copy_dir(src, dst, **config_changes):
  shutil.copytree(src, dst)
  config = json.loads((dst / "config.json").read_text())
  (dst / "config.json").write_text(json.dumps({**config, **config_changes}))
  return dst


def test_errors_name_the_file_and_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nowhere is not a directory; give a Hugging Face"):
    hf.from_pretrained(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"empty has no config.json"):
    hf.read_weights(tmp_path / "empty")
  d = copy_dir(GPT2_DIR, tmp_path / "mamba", model_type="mamba")
  with pytest.raises(ValueError, match=r"config.json has model_type='mamba'; fmjax.hf supports "
                                       r"\['bert', 'gemma', 'gemma2', 'gemma3_text', 'gpt2', "
                                       r"'llama', 'mistral', 'qwen2', 'qwen3'\]"):
    hf.read_weights(d)
  d = copy_dir(BERT_DIR, tmp_path / "relu", hidden_act="relu")
  with pytest.raises(ValueError, match=r"hidden_act='relu'.*supports only hidden_act in "
                                       r"\['gelu', 'gelu_python'\]"):
    hf.read_weights(d)
  d = copy_dir(BERT_DIR, tmp_path / "vocab", vocab_size=201)
  with pytest.raises(ValueError, match=r"model.safetensors: tensor "
                                       r"'bert.embeddings.word_embeddings.weight' has shape "
                                       r"\(200, 32\), but config.json \(vocab_size=201.*needs "
                                       r"\(201, 32\)"):
    hf.read_weights(d)
  tensors = read_tensors(GPT2_DIR)
  del tensors["transformer.h.1.mlp.c_fc.bias"]
  d = write_model_dir(tmp_path / "missing", json.loads((GPT2_DIR / "config.json").read_text()),
                      tensors)
  with pytest.raises(ValueError, match=r"model.safetensors has no tensor "
                                       r"'transformer.h.1.mlp.c_fc.bias' \(fmjax "
                                       r"blocks/layer_1/mlp/wi/bias\).*Re-save it"):
    hf.read_weights(d)
  (d / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match=r"missing has no model.safetensors"):
    hf.read_weights(d)
  tensors = read_tensors(GPT2_DIR)
  tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1
  d = write_model_dir(tmp_path / "untied", json.loads((GPT2_DIR / "config.json").read_text()),
                      tensors)
  with pytest.raises(ValueError, match=r"'lm_head.weight' differs from 'transformer.wte.weight', "
                                       r"but fmjax ties them"):
    hf.read_weights(d)
  tensors = {k: v for k, v in read_tensors(BERT_DIR).items()
             if not k.startswith(("cls.seq_relationship", "bert.pooler"))}
  d = write_model_dir(tmp_path / "mlm", json.loads((BERT_DIR / "config.json").read_text()),
                      tensors)
  # Once an error, the MLM head alone is HF's BertForMaskedLM (tests/test_hf_tasks.py).
  assert type(hf.from_pretrained(d)[0]).__name__ == "BertForMaskedLM"


def test_pytorch_bin_without_torch_says_what_to_do(tmp_path, monkeypatch):
  shutil.copy(GPT2_DIR / "config.json", tmp_path / "config.json")
  (tmp_path / "pytorch_model.bin").write_bytes(b"")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  with pytest.raises(FileNotFoundError, match=r"has only pytorch_model.bin, which needs torch"):
    hf.read_weights(tmp_path)


def test_export_errors(gpt2, tmp_path):
  rope = GPT(GPTConfig(vocab_size=16, max_len=8, num_layers=1, num_heads=2, embed_dim=8,
                       mlp_dim=16, position="rope"))
  params = jax.eval_shape(rope.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ValueError, match=r"GPTConfig.position='rope' has no GPT-2 equivalent"):
    hf.save_pretrained(rope, params, tmp_path)
  model, variables = gpt2
  broken = jax.tree_util.tree_map(lambda x: x, variables)
  del broken["params"]["ln_f"]
  with pytest.raises(ValueError, match=r"variables have no parameter 'ln_f/bias'"):
    hf.save_pretrained(model, broken, tmp_path)
  with pytest.raises(ValueError, match=r"cannot export a Dense"):
    hf.save_pretrained(nn.Dense(3), {}, tmp_path)


def test_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nowhere is not a directory"):
    hf.tokenizer_from_pretrained(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=r"has no tokenizer.json, vocab.txt \(WordPiece\) "
                                              r"or vocab.json \+ merges.txt"):
    hf.tokenizer_from_pretrained(tmp_path)
  (tmp_path / "vocab.txt").write_text("a\nb\n##c\n")
  with pytest.raises(ValueError, match=r"cannot tell the end-of-sequence token.*set eos_token"):
    hf.tokenizer_from_pretrained(tmp_path)


# --- With transformers installed: fmjax's export loads in transformers and agrees. -------------

def _has_transformers():
  try:
    import torch, transformers  # noqa: F401  pylint: disable=g-import-not-at-top,multiple-imports
  except ImportError:
    return False
  return True


def _random_params(model, seed=0):
  """Random fmjax params drawn on the host (no init to compile): LayerNorm scales 1 + noise,
  every other tensor, biases included, N(0, 0.1^2)."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  return jax.tree_util.tree_map_with_path(
      lambda path, x: np.float32(path[-1].key == "scale") + rng.normal(0, 0.1, x.shape).astype(
          np.float32), nn.meta.unbox(abstract))


@pytest.mark.skipif(not _has_transformers(), reason="needs torch and transformers")
def test_transformers_loads_fmjax_exports(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from fmjax.models.bert import BertConfig  # pylint: disable=g-import-not-at-top

  def load(cls, directory):
    m, info = cls.from_pretrained(directory, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    return m.eval()

  ref = reference(BERT_DIR)
  args = {k: torch.tensor(ref[k], dtype=torch.long)
          for k in ("input_ids", "token_type_ids", "attention_mask")}
  # Fresh fmjax BERT with heads -> HF BertForPreTraining.
  model = BertForPreTraining(BertConfig(vocab_size=200, max_len=64, num_layers=2, num_heads=2,
                                        embed_dim=32, mlp_dim=64))
  variables = _random_params(model)
  hf.save_pretrained(model, variables, tmp_path / "bert")
  ours = jax.jit(model.apply)(variables, ref["input_ids"], ref["token_type_ids"],
                              ref["attention_mask"])
  with torch.no_grad():
    theirs = load(transformers.AutoModelForPreTraining, tmp_path / "bert")(**args)
  assert max_diff(ours["mlm_logits"][..., :200], theirs.prediction_logits) <= ATOL
  assert max_diff(ours["nsp_logits"], theirs.seq_relationship_logits) <= ATOL
  # Encoder only -> HF BertModel.
  encoder = BertEncoder(model.config)
  hf.save_pretrained(encoder, {"params": variables["params"]["bert"]}, tmp_path / "encoder")
  seq, pooled = jax.jit(encoder.apply)({"params": variables["params"]["bert"]}, ref["input_ids"],
                              token_type_ids=ref["token_type_ids"],
                              attention_mask=ref["attention_mask"])
  with torch.no_grad():
    theirs = load(transformers.AutoModel, tmp_path / "encoder")(**args)
  assert max_diff(seq, theirs.last_hidden_state) <= ATOL
  assert max_diff(pooled, theirs.pooler_output) <= ATOL
  # Fresh fmjax GPT (scanned) -> HF GPT2LMHeadModel.
  gpt = GPT(GPTConfig(vocab_size=300, max_len=64, num_layers=2, num_heads=2, embed_dim=32,
                      mlp_dim=128), Runtime(scan_layers=True))
  variables = _random_params(gpt)
  hf.save_pretrained(gpt, variables, tmp_path / "gpt2")
  ids = reference(GPT2_DIR)["input_ids"]
  with torch.no_grad():
    theirs = load(transformers.AutoModelForCausalLM, tmp_path / "gpt2")(
        torch.tensor(ids, dtype=torch.long)).logits
  assert max_diff(jax.jit(gpt.apply)(variables, ids)[..., :300], theirs) <= ATOL
