"""CLIP (fmjax/models/clip.py, train/clip.py): the symmetric contrastive loss against a float64
hand computation, unit-norm embeddings and the clamped logit scale, padding-invariant text
pooling, zero-shot classification by hand, and the tiny program learning and resuming."""

import math
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.models import clip, vit

REPO = pathlib.Path(__file__).resolve().parents[1]


def small_config(**text):
  return clip.CLIPConfig(
      text=clip.TextConfig(vocab_size=20, max_length=8, num_layers=1, num_heads=2, embed_dim=16,
                           mlp_dim=32, **text),
      image=vit.ViTConfig(image_size=8, patch_size=4, num_channels=1, num_classes=0,
                          num_layers=1, num_heads=2, embed_dim=16, mlp_dim=32),
      embed_dim=8)


@pytest.fixture(scope="module")
def tiny():
  """(params, images, tokens, mask): one initialisation for every test (the parameters do not
  depend on causal or pool), each test compiling what it runs once (eager Flax is slow)."""
  model = clip.CLIP(small_config())
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (3, 8, 8, 1)).astype(np.float32)
  tokens = rng.integers(3, 20, (3, 8)).astype(np.int32)
  mask = np.arange(8)[None] < np.array([3, 5, 8])[:, None]
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), images, tokens, mask)["params"])
  return params, images, tokens, mask


def reference_loss(logits):
  """(CE over rows + CE over columns) / 2 with targets arange(B), in float64 numpy."""
  logits = np.asarray(logits, np.float64)
  def ce(x):
    x = x - x.max(axis=1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    return -np.mean(np.diag(logp))
  return (ce(logits) + ce(logits.T)) / 2


def test_loss_is_the_symmetric_cross_entropy():
  # Two pairs, each image closest to its own text by a margin of 2: each CE is log(1 + e^-2).
  assert float(clip.contrastive_loss(jnp.array([[2.0, 0.0], [0.0, 2.0]]))) == pytest.approx(
      math.log(1 + math.exp(-2)), rel=1e-6)
  # An asymmetric case: rows and columns give different CEs, the loss is their mean.
  logits = np.array([[3.0, 1.0, -2.0], [0.5, 0.0, 4.0], [1.0, 2.0, 2.5]])
  rows = np.mean([math.log(sum(math.exp(v) for v in logits[i])) - logits[i, i] for i in range(3)])
  cols = np.mean([math.log(sum(math.exp(v) for v in logits[:, i])) - logits[i, i]
                  for i in range(3)])
  assert rows != pytest.approx(cols)
  assert float(clip.contrastive_loss(jnp.asarray(logits, jnp.float32))) == pytest.approx(
      (rows + cols) / 2, rel=1e-6)
  random = np.random.default_rng(1).normal(0, 5, (7, 7))
  assert float(clip.contrastive_loss(jnp.asarray(random, jnp.float32))) == pytest.approx(
      reference_loss(random), rel=1e-5)


def test_retrieval_accuracy_by_hand():
  logits = jnp.array([[5.0, 1.0, 0.0],   # image 0 -> text 0 (right)
                      [0.0, 1.0, 2.0],   # image 1 -> text 2 (wrong)
                      [0.0, 0.0, 3.0]])  # image 2 -> text 2 (right)
  # Columns: text 0 -> image 0 (right), text 1 -> image 0 or 1 (max 1.0 at rows 0, 1: argmax
  # picks row 0, wrong), text 2 -> image 2 (right).
  i2t, t2i = clip.retrieval_accuracy(logits)
  assert float(i2t) == pytest.approx(2 / 3) and float(t2i) == pytest.approx(2 / 3)


def test_unit_norm_embeddings_and_a_logit_scale_clamped_at_100(tiny):
  params, images, tokens, mask = tiny
  model = clip.CLIP(small_config())
  assert float(params["logit_scale"]) == pytest.approx(math.log(1 / 0.07))

  @jax.jit
  def outputs(p):
    apply = lambda *a, **k: model.apply({"params": p}, *a, **k)
    return {"image": apply(images, method="encode_image"),
            "text": apply(tokens, mask, method="encode_text"),
            "logits": apply(images, tokens, mask),
            "score": clip.score(model, p, images, tokens, mask),
            "grad": jax.grad(lambda p: clip.contrastive_loss(
                model.apply({"params": p}, images, tokens, mask)))(p)["logit_scale"]}

  out = outputs(params)
  image, text = np.asarray(out["image"], np.float64), np.asarray(out["text"], np.float64)
  assert image.shape == (3, 8) and text.shape == (3, 8)
  np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1, rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1, rtol=1e-6)
  np.testing.assert_allclose(out["logits"], image @ text.T / 0.07, rtol=1e-5, atol=1e-6)
  # score: the cosine of each image with its own text (the diagonal, unscaled).
  np.testing.assert_allclose(out["score"], np.diag(image @ text.T), rtol=1e-5, atol=1e-6)
  assert float(out["grad"]) != 0.0
  # exp(t) = 1000 is clamped to 100, and t no longer moves.
  big = outputs({**params, "logit_scale": jnp.asarray(math.log(1000.0), jnp.float32)})
  np.testing.assert_allclose(big["logits"], 100 * image @ text.T, rtol=1e-4, atol=1e-5)
  assert float(big["grad"]) == 0.0
  with pytest.raises(ValueError, match="init_temperature"):
    clip.CLIPConfig(init_temperature=0.001)
  with pytest.raises(ValueError, match="num_classes"):
    clip.CLIPConfig(image=vit.ViTConfig(image_size=8, patch_size=4, num_classes=10))


@pytest.mark.parametrize("causal,pool", [(True, "eos"), (False, "eos"), (False, "mean")])
def test_text_padding_is_invisible(tiny, causal, pool):
  """Junk ids past the mask leave the embedding as it is (the stack masks the padding keys,
  the pooling reads only real tokens), while every real token counts: the EOS (the pooled
  token under causal + eos) and the first one."""
  params = tiny[0]
  model = clip.CLIP(small_config(causal=causal, pool=pool))
  tokens = np.array([[5, 7, 9, 1, 13, 17, 4, 11],
                     [5, 7, 9, 1, 2, 3, 19, 6],  # other junk
                     [5, 7, 9, 2, 13, 17, 4, 11],  # another last real token
                     [6, 7, 9, 1, 13, 17, 4, 11]], np.int32)  # another first token
  text = jax.jit(lambda p, t, m: model.apply({"params": p}, t, m, method="encode_text"))(
      params, tokens, np.arange(8)[None] < 4)
  np.testing.assert_allclose(text[0], text[1], rtol=1e-5, atol=1e-6)
  assert not np.allclose(text[0], text[2], atol=1e-4)
  assert not np.allclose(text[0], text[3], atol=1e-4)
  with pytest.raises(ValueError, match="max_length"):  # 9 tokens for 8 positions
    jax.eval_shape(lambda: model.apply({"params": params}, np.ones((1, 9), np.int32),
                                       np.ones((1, 9), bool), method="encode_text"))


class WordTokenizer:
  """Stand-in tokenizer: one id per word (3 + its index), pad 0, EOS 1."""
  pad_id, eos_id = 0, 1

  def __init__(self, words):
    self.ids = {w: 3 + i for i, w in enumerate(words)}

  def encode_batch(self, texts):
    return [[self.ids[w] for w in t.split()] for t in texts]


def test_tokenize_appends_eos_truncates_and_pads():
  tok = WordTokenizer("a b c d e f".split())
  tokens, mask = clip.tokenize(tok, ["a b", "a b c d e f", ""], 4)
  np.testing.assert_array_equal(tokens, [[3, 4, 1, 0], [3, 4, 5, 1], [1, 0, 0, 0]])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
  assert tokens.dtype == np.int32 and mask.dtype == bool


def test_zero_shot_by_hand():
  s = 1 / math.sqrt(2)
  classes = jnp.array([[1.0, 0.0], [0.0, 1.0], [-s, s]])
  images = jnp.array([[0.9, 0.1], [0.1, 0.9], [-0.8, 0.6], [0.6, -0.8]])
  # cosines row by row: image 2 is closest to class 2 (0.99), image 3 to class 0 (0.6).
  np.testing.assert_array_equal(clip.zero_shot_predict(images, classes), [0, 1, 2, 0])
  # class embedding: the mean of the prompt embeddings, renormalised.
  prompts = np.array([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [0.6, -0.8]]])  # (K=2, P=2, E=2)
  np.testing.assert_allclose(clip.class_embeddings(prompts), [[s, s], [1.0, 0.0]], rtol=1e-6)


class BagOfWords:
  """Stand-in CLIP for zero_shot_classifier: a text's embedding is its normalised token
  histogram (EOS and padding left out)."""
  config = small_config()

  def apply(self, variables, tokens, mask, method):
    assert method == "encode_text" and variables == {"params": "P"}
    counts = np.zeros((len(tokens), 12))
    for i, (row, keep) in enumerate(zip(tokens, mask)):
      for t in row[keep]:
        counts[i, t] += t > 1
    return counts / np.linalg.norm(counts, axis=1, keepdims=True)


def test_zero_shot_classifier_averages_every_name_and_template():
  tok = WordTokenizer("a photo of zero one 0 1".split())  # ids 3 .. 9
  got = clip.zero_shot_classifier(BagOfWords(), "P", tok, [("zero", "0"), ("one", "1")],
                                  ("a photo of {}", "{}"))
  # class 0: "a photo of zero" (1/2 each of a, photo, of, zero), "zero", "a photo of 0", "0"
  # -> mean (a, photo, of, zero, 0) = (1/4, 1/4, 1/4, 3/8, 3/8), then renormalised.
  want = np.zeros((2, 12))
  want[0, [3, 4, 5, 6, 8]] = want[1, [3, 4, 5, 7, 9]] = [2, 2, 2, 3, 3]
  np.testing.assert_allclose(got, want / np.linalg.norm(want, axis=1, keepdims=True), rtol=1e-6)
  with pytest.raises(ValueError, match="names per class"):
    clip.zero_shot_classifier(BagOfWords(), "P", tok, [("zero", "0"), "one"], ("{}",))


# The program ---------------------------------------------------------------------------------

def program(env, workdir, *overrides):
  cmd = [sys.executable, "-m", "train.clip", "--config=configs/clip.py:tiny",
         f"--workdir={workdir}", *overrides]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_tiny_program_learns_resumes_and_scores(env, tmp_path):
  """The tiny recipe (768 bundled MNIST digits with phrased captions) retrieves above chance
  (1/64 in a batch of 64) and beats chance zero-shot (1/10); a rerun resumes; load_clip gives
  a scorer that prefers an image's own caption."""
  from fmjax.metrics import read_metrics
  workdir = tmp_path / "clip"
  proc = program(env, workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  evals = [r for r in rows if "eval/loss" in r]
  assert [r["step"] for r in evals] == [150, 300]
  assert rows[-1]["train/loss"] < rows[0]["train/loss"] - 0.3
  last = evals[-1]
  assert last["eval/loss"] < math.log(64) - 0.3  # log(64): an untrained model's
  # In-batch retrieval: chance is 1/64 each way. (Digit captions repeat within a batch, ~6
  # of a class, so even a perfect model stays near 1/6.)
  assert last["eval/i2t_accuracy"] + last["eval/t2i_accuracy"] > 3 / 64
  assert last["eval/zero_shot_accuracy"] > 0.2  # chance: 0.1
  proc = program(env, workdir, "--config.train.steps=310")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed from" in proc.stderr and "step 300" in proc.stderr
  assert [r["step"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))][-2:] == [300, 310]

  from fmjax.data import captions
  from train import clip as program_module
  model, params, tok, size, channels = program_module.load_clip(str(workdir))
  assert (size, channels) == (32, 1) and model.config.text.vocab_size == tok.vocab_size
  images, labels, texts = captions.digits(*captions.mnist_files(str(REPO / "data/mnist_tiny")),
                                          start=768, stop=896, image_size=size)
  score = jax.jit(lambda *a: clip.score(model, params, *a))
  pixels = images.astype(np.float32) / 127.5 - 1
  own = score(pixels, *clip.tokenize(tok, texts, 16))
  wrong = [captions.digit_caption((int(l) + 5) % 10, np.random.default_rng(i))
           for i, l in enumerate(labels)]  # another digit's caption
  other = score(pixels, *clip.tokenize(tok, wrong, 16))
  assert np.mean(np.asarray(own) > np.asarray(other)) > 0.6


def test_recipes_have_a_rule_for_every_key_and_refuse_bad_values(monkeypatch):
  from configs import clip as recipes
  from train import checks
  from train import clip as program_module
  monkeypatch.chdir(REPO)
  def leaves(config, prefix=""):
    for key, value in config.items():
      if hasattr(value, "items"):
        yield from leaves(value, f"{prefix}{key}.")
      else:
        yield prefix + key
  for variant in recipes.VARIANTS:
    config = recipes.get_config(variant)
    assert not set(leaves(config)) - set(checks.RULES) - checks.FREE_FORM, variant
    if variant != "digits":  # digits reads ../shared/data/mnist, absent in CI
      checks.validate(config)
      program_module.model_config(config, None)  # the architecture builds
  assert set(program_module.LOADERS) == set(checks.RULES["data.kind"].choices)
  config = recipes.get_config("tiny")
  config.data.kind, config.text.pool, config.model.init_temperature = "pictures", "cls", 0.001
  with pytest.raises(ValueError) as e:
    checks.validate(config)
  assert str(e.value) == (
      "--config.data.kind=pictures: not one of ['digits', 'shapes', 'folder']; choose one of "
      "them; --config.model.init_temperature=0.001: must be a number >= 0.01 (the logit scale "
      "1 / temperature is at most 100); --config.text.pool=cls: not one of ['eos', 'mean']; "
      "choose one of them")
  config = recipes.get_config("tiny")
  config.text.num_heads = 5
  with pytest.raises(ValueError, match=r"^config.text.embed_dim=32 is not divisible by "):
    program_module.model_config(config, None)


def test_a_folder_too_small_to_hold_out_is_refused(tmp_path):
  from PIL import Image
  from configs import clip as recipes
  from train import clip as program_module
  for i in range(3):
    Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / f"{i}.txt").write_text(f"picture {i}\n")
  config = recipes.get_config("shapes")
  config.data.kind, config.data.train_path, config.data.num_eval = "folder", str(tmp_path), 3
  with pytest.raises(ValueError, match="holds 3 images: too few to hold out"):
    program_module.load_folder(config, 32, 3)
  config.data.num_eval = 1
  train, held, names = program_module.load_folder(config, 32, 3)
  assert train.captions == ["picture 0", "picture 1"] and held.captions == ["picture 2"]
  assert train.images.shape == (2, 32, 32, 3) and names is None
