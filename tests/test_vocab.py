"""Vocabulary padding (fmjax/layers.py Embed): tables of Vp = round_up(V, vocab_multiple) rows,
the padded logits masked to -inf, so every rule set runs with any tokenizer.

Pinned: the padded ids get probability exactly 0 and are never chosen (argmax, sampling, beam
search, fill-mask), even when their raw scores are made huge; a padded model's logits on the
real ids, its losses and its decoding equal those of the same weights unpadded
(vocab_multiple=1); cross-entropy and label-smoothed sequence_loss against NumPy by hand (the
smoothing mass over the real vocabulary only); padded rows start at zero and get zero
gradient; the stored counts; gpt2_medium passes the fsdp_tp pre-flight check at tensor 2/4/8
(and fails it unpadded); the HF round trip; and the tiny GPT recipe under fsdp_tp on a
(2, 2, 2) mesh of 8 simulated devices == one device, losses and whole parameters.
"""

import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import checkpoint, generate, heads, hf, sharding, training
from fmjax.layers import Embed, mask_padded_logits, round_up
from fmjax.models import bert, gpt, seq2seq

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "hf"
V = 67  # the character vocabulary of data/tiny_shakespeare.txt (65 characters + 2 specials)
HUGE = 1e4


def unbox_init(model, *args):
  return nn.meta.unbox(model.init(jax.random.key(0), *args)["params"])


def redrawn(params, scale=0.3, seed=2):
  """Matrices redrawn at `scale` so outputs depend clearly on the inputs (see test_generate)."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return tree.unflatten([np.asarray(jax.random.normal(k, x.shape) * scale) if x.ndim >= 2
                         else np.asarray(x) for k, x in zip(keys, leaves)])


def poison(params, padded):
  """Sets the padded vocabulary entries to HUGE: were they not masked, they would win every
  argmax. padded: {"a/b/param": (axis, true vocabulary size)}."""
  flat = checkpoint.flatten_params(params)
  for path, (axis, vocab) in padded.items():
    x = np.array(flat[path])
    index = [slice(None)] * x.ndim
    index[axis] = slice(vocab, None)
    x[tuple(index)] = HUGE
    flat[path] = x
  return checkpoint.unflatten_params(flat)


def unpadded(params, abstract):
  """The padded tree cut to the shapes of `abstract` (the same model with vocab_multiple=1)."""
  return jax.tree_util.tree_map(lambda x, a: x[tuple(slice(0, n) for n in a.shape)], params,
                                nn.meta.unbox(abstract))


def gpt_pair(**overrides):
  """(padded model, its params with poisoned padding, unpadded model, the same weights cut)."""
  model = gpt.GPT(gpt.get_config("tiny", vocab_size=V, **overrides))
  ref = gpt.GPT(gpt.get_config("tiny", vocab_size=V, vocab_multiple=1, **overrides))
  tokens = jnp.zeros((1, 8), jnp.int32)
  head = {"wte/embedding": (0, V)} if model.config.tie_embeddings else {"lm_head/kernel": (1, V)}
  params = poison(redrawn(unbox_init(model, tokens)), head)
  return model, params, ref, unpadded(params, jax.eval_shape(ref.init, jax.random.key(0),
                                                             tokens)["params"])


TOKENS = np.random.RandomState(0).randint(0, V, (3, 12)).astype(np.int32)


# ------------------------------------------------------------------------------ the layer


def test_round_up_and_its_error():
  assert [round_up(n, 128) for n in (1, 67, 128, 129, 50257)] == [128, 128, 128, 256, 50304]
  assert round_up(67, 1) == 67
  with pytest.raises(ValueError, match=r"vocab_multiple .* must be a positive int; got 0"):
    round_up(67, 0)
  with pytest.raises(ValueError, match=r"vocab_multiple"):
    gpt.GPT(gpt.get_config("tiny", vocab_multiple=0)).init(jax.random.key(0),
                                                           jnp.zeros((1, 4), jnp.int32))


def test_embed_table_is_padded_and_attend_masks():
  e = Embed(5, 3, pad_to_multiple=4)
  params = {"embedding": np.arange(24, dtype=np.float32).reshape(8, 3)}
  params["embedding"][5:] = HUGE  # padded rows: never looked up, never predicted
  x = jnp.asarray([[[1.0, 0.0, -1.0]]])
  logits = e.apply({"params": params}, x, method="attend")
  # By hand: row r = (3r, 3r + 1, 3r + 2) gives 3r - (3r + 2) = -2 for every real row.
  np.testing.assert_array_equal(logits, [[[-2, -2, -2, -2, -2] + [-np.inf] * 3]])
  np.testing.assert_array_equal(e.apply({"params": params}, x[:, 0], method="attend_rows"),
                                logits[:, 0])
  np.testing.assert_array_equal(jax.nn.softmax(logits)[..., 5:], 0.0)
  np.testing.assert_array_equal(e.apply({"params": params}, jnp.asarray([[4]])), [[[12, 13, 14]]])
  fresh = unbox_init(Embed(5, 3, pad_to_multiple=4), jnp.zeros((1, 1), jnp.int32))["embedding"]
  assert fresh.shape == (8, 3) and np.all(fresh[5:] == 0) and np.all(fresh[:5] != 0)
  assert mask_padded_logits(jnp.ones((2, 5)), 5).shape == (2, 5)  # nothing padded: unchanged


# ------------------------------------------------------------------------------ the models


def test_padded_rows_start_at_zero():
  model = gpt.GPT(gpt.get_config("tiny", vocab_size=V, tie_embeddings=False))
  params = unbox_init(model, jnp.zeros((1, 4), jnp.int32))
  for table in (params["wte"]["embedding"], params["lm_head"]["kernel"].T):
    assert table.shape == (128, 64) and np.all(table[V:] == 0) and np.all(table[:V] != 0)


@pytest.mark.parametrize("tie", [True, False])
def test_gpt_padded_logits_masked_and_equal_unpadded(tie):
  model, params, ref, ref_params = gpt_pair(tie_embeddings=tie)
  table = params["wte"]["embedding"] if tie else params["lm_head"]["kernel"].T
  assert table.shape == (128, 64) and np.all(table[V:] == HUGE)
  logits = np.asarray(model.apply({"params": params}, TOKENS))
  assert logits.shape == (3, 12, 128)
  assert np.all(logits[..., V:] == -np.inf) and np.all(np.isfinite(logits[..., :V]))
  np.testing.assert_allclose(logits[..., :V], ref.apply({"params": ref_params}, TOKENS),
                             atol=1e-5)
  assert np.all(jax.nn.softmax(logits)[..., V:] == 0.0)
  assert logits.argmax(-1).max() < V


def test_gpt_decoding_never_picks_padded_ids():
  """Greedy, sampling (temperature, top-k, top-p) and beam search through the KV-cached
  decode path (Embed.attend_rows) with HUGE padded rows; greedy and beams equal the unpadded
  model's tokens."""
  model, params, ref, ref_params = gpt_pair()
  prompts = [[5, 9, 2], [40, 41, 42, 43, 1]]
  for kw in ({}, {"num_beams": 3}):
    got = generate.generate(model, params, prompts, max_new_tokens=10, **kw)
    assert got == generate.generate(ref, ref_params, prompts, max_new_tokens=10, **kw)
    assert max(max(r) for r in got) < V
  for kw in ({"temperature": 1.0}, {"temperature": 5.0, "top_k": 100},
             {"temperature": 5.0, "top_p": 0.999}):
    for seed in range(3):
      got = generate.generate(model, params, prompts, max_new_tokens=20, seed=seed, **kw)
      assert max(max(r) for r in got) < V, kw


def test_bert_mlm_and_fill_mask_masked():
  model = bert.BertForPreTraining(bert.get_config("tiny", vocab_size=11))
  ref = bert.BertForPreTraining(bert.get_config("tiny", vocab_size=11, vocab_multiple=1))
  ids = np.asarray([[1, 2, 3, 4, 10, 5], [6, 10, 7, 8, 9, 0]], np.int32)
  params = poison(redrawn(unbox_init(model, ids)), {"bert/word_embeddings/embedding": (0, 11),
                                                    "mlm_bias": (0, 11)})
  assert params["bert"]["word_embeddings"]["embedding"].shape == (128, 128)
  assert params["mlm_bias"].shape == (128,) and np.all(params["mlm_bias"][11:] == HUGE)
  ref_params = unpadded(params, jax.eval_shape(ref.init, jax.random.key(0), ids)["params"])
  out = model.apply({"params": params}, ids)["mlm_logits"]
  assert out.shape == (2, 6, 128) and np.all(out[..., 11:] == -np.inf)
  np.testing.assert_allclose(out[..., :11], ref.apply({"params": ref_params}, ids)["mlm_logits"],
                             atol=1e-4)
  got = generate.fill_mask(model, params, ids, mask_id=10, top_k=11)
  want = generate.fill_mask(ref, ref_params, ids, mask_id=10, top_k=11)
  for row, ref_row in zip(got, want):
    for pred, ref_pred in zip(row, ref_row):
      assert sorted(pred["ids"]) == list(range(11)) and pred["ids"] == ref_pred["ids"]
      np.testing.assert_allclose(pred["probs"], ref_pred["probs"], atol=1e-6)
      assert sum(pred["probs"]) == pytest.approx(1.0, abs=1e-5)


def test_seq2seq_tables_padded_and_outputs_masked():
  over = dict(vocab_size=V, source_vocab_size=45)
  model = seq2seq.Seq2Seq(seq2seq.get_config("tiny", **over))
  ref = seq2seq.Seq2Seq(seq2seq.get_config("tiny", vocab_multiple=1, **over))
  src = np.asarray([[5, 17, 3, 44, 2, 7], [8, 20, 13, 0, 0, 0]], np.int32)
  tgt = np.asarray([[1, 40, 41, 66, 43], [1, 9, 10, 11, 12]], np.int32)
  params = poison(redrawn(unbox_init(model, src, src > 0, tgt)),
                  {"embed/embedding": (0, V), "source_embed/embedding": (0, 45)})
  assert params["embed"]["embedding"].shape == params["source_embed"]["embedding"].shape == (
      128, 64)
  ref_params = unpadded(params, jax.eval_shape(ref.init, jax.random.key(0), src, src > 0,
                                               tgt)["params"])
  logits = model.apply({"params": params}, src, src > 0, tgt)
  assert logits.shape == (2, 5, 128) and np.all(logits[..., V:] == -np.inf)
  np.testing.assert_allclose(logits[..., :V], ref.apply({"params": ref_params}, src, src > 0, tgt),
                             atol=1e-4)
  config = generate.GenerateConfig(max_new_tokens=6)
  outs = []
  for m, p in ((model, params), (ref, ref_params)):
    source = m.apply({"params": p}, src, src > 0, method="encode")
    outs.append(np.asarray(generate.generate_from_source(m, p, source, config, start_id=1).tokens))
  np.testing.assert_array_equal(outs[0], outs[1])
  assert outs[0].max() < V


# ------------------------------------------------------------------------------ the losses


def _padded(logits, vp=8):
  """(..., V) logits -> (..., vp) with the padded ids as a model returns them (-inf)."""
  return mask_padded_logits(jnp.pad(jnp.asarray(logits), [(0, 0)] * (logits.ndim - 1)
                                    + [(0, vp - logits.shape[-1])], constant_values=HUGE),
                            logits.shape[-1])


LOGITS = np.log(np.asarray([[[1, 2, 1], [3, 3, 2], [1, 1, 1]]], np.float32))  # (1, 3, V = 3)
TARGETS = np.asarray([[1, 2, 0]])
WEIGHTS = np.asarray([[1.0, 1.0, 0.0]], np.float32)  # the last token is padding


def test_cross_entropy_over_real_vocabulary():
  # probabilities [1/4, 1/2, 1/4] and [3/8, 3/8, 1/4]: targets 1 and 2 cost ln 2 and ln 4.
  loss, acc, _ = training.cross_entropy(_padded(LOGITS), TARGETS, WEIGHTS)
  np.testing.assert_allclose(loss, (np.log(2) + np.log(4)) / 2, rtol=1e-6)
  assert acc == 0.5  # argmax 1 (right) and 0 (a tie of ln 3s; wrong); never a padded id


def test_label_smoothed_sequence_loss_spreads_over_real_vocabulary():
  eps = 0.1
  p = np.exp(LOGITS) / np.exp(LOGITS).sum(-1, keepdims=True)
  logp = np.log(p[0, :2])  # (2, 3), the weighted tokens
  by_hand = [(1 - eps) * -logp[t, TARGETS[0, t]] - eps * logp[t].mean() for t in range(2)]
  loss, m = heads.sequence_loss(_padded(LOGITS), TARGETS, WEIGHTS, label_smoothing=eps)
  np.testing.assert_allclose(loss, np.mean(by_hand), rtol=1e-6)
  np.testing.assert_allclose(m["nll"], (np.log(2) + np.log(4)) / 2, rtol=1e-6)
  unpadded_loss, _ = heads.sequence_loss(jnp.asarray(LOGITS), TARGETS, WEIGHTS,
                                         label_smoothing=eps)
  np.testing.assert_allclose(loss, unpadded_loss, rtol=1e-6)
  grad = jax.grad(lambda x: heads.sequence_loss(mask_padded_logits(x, 3), TARGETS, WEIGHTS,
                                                label_smoothing=eps)[0])(
      jnp.pad(jnp.asarray(LOGITS), [(0, 0), (0, 0), (0, 5)], constant_values=HUGE))
  assert np.all(np.isfinite(grad)) and np.all(grad[..., 3:] == 0)


def test_model_loss_equals_unpadded_and_padded_rows_get_no_gradient():
  model, params, ref, ref_params = gpt_pair()
  targets = np.roll(TOKENS, -1, axis=1)

  def loss(m):
    return lambda p: training.cross_entropy(m.apply({"params": p}, TOKENS), targets)[0]
  value, grads = jax.value_and_grad(loss(model))(params)
  np.testing.assert_allclose(value, loss(ref)(ref_params), rtol=1e-6)
  g = np.asarray(grads["wte"]["embedding"])
  assert np.all(np.isfinite(g)) and np.all(g[V:] == 0) and np.abs(g[:V]).max() > 0
  smoothed = lambda m, p: heads.sequence_loss(m.apply({"params": p}, TOKENS), targets,
                                              np.ones(targets.shape), label_smoothing=0.1)[0]
  np.testing.assert_allclose(smoothed(model, params), smoothed(ref, ref_params), rtol=1e-6)


# ------------------------------------------------------------------------------ counts, sharding


def test_stored_counts_include_the_padding():
  c = gpt.get_config("gpt2_small")
  assert c.padded_vocab_size == 50304
  assert gpt.num_params(c) == 124_439_808 + (50304 - 50257) * 768
  c = bert.get_config("base")
  assert bert.num_params(c, with_heads=True) == 110_106_428 + (30592 - 30522) * (768 + 1)
  c = seq2seq.get_config("tiny", vocab_size=V, source_vocab_size=45)
  params = jax.eval_shape(seq2seq.Seq2Seq(c).init, jax.random.key(0), jnp.zeros((1, 3), jnp.int32),
                          jnp.ones((1, 3), bool), jnp.zeros((1, 2), jnp.int32))["params"]
  assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == seq2seq.num_params(c)
  assert seq2seq.num_params(c) - seq2seq.num_params(seq2seq.get_config(
      "tiny", vocab_size=V, source_vocab_size=45, vocab_multiple=1)) == (61 + 83) * 64


@pytest.fixture(scope="module")
def gpt2_medium_abstract():
  """{vocab_multiple: gpt2_medium's abstract params} (jax.eval_shape: nothing initialised)."""
  return {m: jax.eval_shape(gpt.GPT(gpt.get_config("gpt2_medium", vocab_multiple=m)).init,
                            jax.random.key(0), jax.ShapeDtypeStruct((1, 8), jnp.int32))
          for m in (128, 1)}


@pytest.mark.parametrize("tensor", [2, 4, 8])
def test_gpt2_medium_passes_fsdp_tp_check(gpt2_medium_abstract, tensor):
  mesh = jax.sharding.AbstractMesh((1, 2, tensor), sharding.MESH_AXES)
  rules = sharding.get_rules("fsdp_tp")
  sharding.check_divisible(gpt2_medium_abstract[128], mesh, rules)
  with pytest.raises(ValueError, match=rf"50257 % {tensor} != 0"):  # what it was unpadded
    sharding.check_divisible(gpt2_medium_abstract[1], mesh, rules)


# ------------------------------------------------------------------------------ HF interop


@pytest.mark.parametrize("name,tables,vocab", [
    ("gpt2", ["wte/embedding"], 300), ("bert", ["bert/word_embeddings/embedding", "mlm_bias"], 200)])
def test_hf_load_pads_with_zeros_and_export_cuts(name, tables, vocab, tmp_path):
  model, variables = hf.from_pretrained(GOLDEN / name)
  assert model.config.vocab_size == vocab
  flat = checkpoint.flatten_params(variables["params"])
  for path in tables:
    x = np.asarray(flat[path])
    assert x.shape[0] == round_up(vocab, 128) and np.all(x[vocab:] == 0), path
    assert np.abs(x[:vocab]).max() > 0, path
  hf.save_pretrained(model, variables, tmp_path)
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  theirs = safetensors.numpy.load_file(GOLDEN / name / "model.safetensors")
  ours = safetensors.numpy.load_file(tmp_path / "model.safetensors")
  assert {k: v.shape for k, v in ours.items()} == {k: theirs[k].shape for k in ours}
  key = {"gpt2": "transformer.wte.weight", "bert": "bert.embeddings.word_embeddings.weight"}[name]
  assert ours[key].shape == (vocab, 32) and np.array_equal(ours[key], theirs[key])
  assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == vocab


# ------------------------------------------------------------------------------ the recipe


def _program(tmp_path, name, devices, *flags):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "FMJAX_DEBUG")}
  env.update(JAX_PLATFORMS="cpu", FMJAX_CPU_DEVICES=str(devices),
             XDG_CACHE_HOME=str(tmp_path / "cache"))
  workdir = tmp_path / name
  cmd = [sys.executable, "-m", "train.pretrain_gpt", "--config=configs/gpt.py:tiny",
         f"--workdir={workdir}", "--config.train.steps=10", "--config.sample.num_tokens=12",
         *flags]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  return rows, workdir, proc.stdout


@pytest.mark.slow
def test_tiny_gpt_fsdp_tp_on_8_devices_equals_one_device(tmp_path):
  """The issue's command: the character vocabulary (67) used to stop it with "dimension 67 is
  split over mesh axes ('tensor',)"."""
  one, one_dir, _ = _program(tmp_path, "one", 1)
  tp, tp_dir, out = _program(tmp_path, "tp", 8, "--config.sharding=fsdp_tp",
                             "--config.mesh.data=2", "--config.mesh.fsdp=2",
                             "--config.mesh.tensor=2")
  assert "--- sample ---" in out
  losses = lambda rows: [(r["step"], r[k]) for r in rows for k in ("train/loss", "eval/loss")
                         if k in r]
  assert len(losses(one)) >= 3 and [s for s, _ in losses(tp)] == [s for s, _ in losses(one)]
  np.testing.assert_allclose([l for _, l in losses(tp)], [l for _, l in losses(one)], rtol=1e-6)
  a, b = checkpoint.load_params(str(one_dir)), checkpoint.load_params(str(tp_dir))
  flat_a, flat_b = checkpoint.flatten_params(a), checkpoint.flatten_params(b)
  assert flat_a.keys() == flat_b.keys() and flat_a["wte/embedding"].shape == (128, 64)
  for flat in (flat_a, flat_b):  # padded rows: zero at init, zero gradient, still zero
    assert np.all(np.asarray(flat["wte/embedding"])[V:] == 0)
  for path in flat_a:
    np.testing.assert_allclose(np.asarray(flat_b[path]), np.asarray(flat_a[path]), atol=2e-5,
                               err_msg=path)
