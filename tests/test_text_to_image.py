"""The text-to-image generator (fmjax/models/text_to_image.py) and classifier-free guidance
(fmjax/guidance.py).

Pinned: guidance scale 0 == the conditional logits, and the batched guided pass (prompts and
null captions as one batch of 2B) == two separate passes combined by hand in float64, at the
prefill and at later steps; cached image-token decoding == teacher-forced recomputation;
guided greedy sampling == a naive rollout that recomputes everything per token; the 2-D
positions (row + column table entries, by hand); caption dropout's rate and its null caption;
shapes and masked ids (BOS, padding).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import guidance
from fmjax.models import text_to_image as t2i
from fmjax.runtime import Runtime

C = t2i.get_config("tiny")  # K = 32 codes, G = 4: N = 16 image tokens, Vp = 128
NULL_ID = 1
TEXT = np.asarray([[5, 17, 3, 40, 9, 7], [8, 20, 13, 0, 0, 0]], np.int32)  # row 1 padded
MASK = TEXT > 0
CODES = np.asarray([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3],
                    [2, 7, 1, 8, 2, 8, 1, 8, 28, 18, 28, 4, 5, 9, 0, 31]], np.int32)


def random_params(model, scale=0.7, embed_scale=0.125, seed=3):
  """Parameters drawn at `scale` (tables at `embed_scale`) without compiling an init, so that
  outputs depend clearly on every input (the default init gives near-uniform logits); norms
  scale 1, biases 0."""
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), TEXT, MASK,
                                        CODES))["params"]
  rng = np.random.default_rng(seed)
  draw = lambda path, x: jnp.asarray(
      rng.normal(size=x.shape) * (embed_scale if "embedding" in jax.tree_util.keystr(path)
                                  else scale) if x.ndim >= 2
      else np.full(x.shape, 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0), x.dtype)
  return jax.tree_util.tree_map_with_path(draw, shapes)


MODEL = t2i.TextToImage(C, Runtime(attention_impl="xla"))


@pytest.fixture(scope="module")
def tiny():
  return MODEL, random_params(MODEL)


@jax.jit
def full(params, text, mask, image_in):
  """Teacher-forced logits (one compilation for every test)."""
  return MODEL.apply({"params": params}, text, mask, image_in)


@functools.partial(jax.jit, static_argnames=("guided", "first"))
def step(params, tok, cache, i, source, scale, *, guided, first):
  """One cached decoding step of the model, or of the model behind guidance (scale traced:
  one compilation for every scale)."""
  model = guidance.Guided(MODEL, scale) if guided else MODEL
  b = tok.shape[0]
  return model.apply({"params": params}, tok, cache, index=i, positions=jnp.full((b, 1), i),
                     kv_mask=jnp.ones((b, C.num_tokens), bool), method="decode",
                     **({"source": source} if first else {}))


def decode_steps(params, source, tokens, scale=None):
  """Logits of each step of cached decoding, feeding `tokens` (B, N) one at a time."""
  guided = scale is not None
  model = guidance.Guided(MODEL, scale) if guided else MODEL
  cache = model.init_cache(batch=tokens.shape[0], length=tokens.shape[1], source=source)
  out = []
  for i in range(tokens.shape[1]):
    logits, cache = step(params, tokens[:, i:i + 1], cache, i, source if i == 0 else None,
                         scale if guided else 0.0, guided=guided, first=i == 0)
    out.append(logits)
  return jnp.stack(out, 1)  # (B, N, Vp)


@jax.jit
def _encode(params, text, mask):
  return MODEL.apply({"params": params}, text, mask, method="encode")


def encode(model, params, text, mask):
  assert model is MODEL
  return _encode(params, text, mask)


# ------------------------------------------------------------------------------ the model


def test_shapes_and_masked_ids(tiny):
  model, params = tiny
  logits = full(params, TEXT, MASK, t2i.image_inputs(CODES, C.bos_id))
  assert logits.shape == (2, C.num_tokens, 128) and logits.dtype == jnp.float32
  assert np.isneginf(logits[..., C.codebook_size:]).all()  # BOS (id 32) and the padding
  assert np.isfinite(logits[..., :C.codebook_size]).all()
  np.testing.assert_array_equal(t2i.image_inputs(CODES, C.bos_id)[:, 0], [32, 32])
  np.testing.assert_array_equal(t2i.image_inputs(CODES, C.bos_id)[:, 1:], CODES[:, :-1])
  assert C.seq2seq.vocab_size == 33 and C.seq2seq.source_vocab_size == 64
  with pytest.raises(ValueError, match="TextToImageConfig.grid_size=0"):
    t2i.get_config("tiny", grid_size=0)


def test_cached_decoding_equals_teacher_forcing(tiny):
  """Step-by-step decoding with the KV cache (cross keys projected once at the first step)
  gives the teacher-forced logits of every image token, padded caption row included."""
  model, params = tiny
  image_in = t2i.image_inputs(CODES, C.bos_id)
  forced = full(params, TEXT, MASK, image_in)
  steps = decode_steps(params, encode(model, params, TEXT, MASK), image_in)
  np.testing.assert_allclose(steps[..., :32], forced[..., :32], atol=2e-5, rtol=1e-5)
  assert np.isneginf(steps[..., 32:]).all()
  # The caption matters (so the check above is not vacuous): another caption, other logits.
  other = full(params, TEXT[::-1], MASK[::-1], image_in)
  assert np.abs(other[0, :, :32] - forced[0, :, :32]).max() > 0.1


def test_grid_positions_are_row_plus_column_by_hand():
  """Position t is cell (t // G, t % G): its embedding is row[t // G] + col[t % G]."""
  pos = t2i.GridPositions(grid_size=3, embed_dim=2)
  row = np.asarray([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
  col = np.asarray([[0.0, 10.0], [0.0, 20.0], [0.0, 30.0]])
  out = pos.apply({"params": {"row": row, "col": col}}, jnp.asarray([[0, 1, 2, 3, 4, 5, 8]]))
  np.testing.assert_array_equal(out[0], [[1, 10], [1, 20], [1, 30], [2, 10], [2, 20], [2, 30],
                                         [3, 30]])


def test_the_decoder_adds_grid_positions(tiny):
  """In the model, decoder input t gets row[t // 4] + col[t % 4] of its own tables, and they
  matter: swapping rows for columns changes the logits (the grid is 2-D, not 16 free slots)."""
  model, params = tiny
  row, col = np.asarray(params["positions"]["row"]), np.asarray(params["positions"]["col"])
  t = np.arange(16)
  out = t2i.GridPositions(4, 64).apply({"params": params["positions"]}, t[None])
  np.testing.assert_allclose(out[0], row[t // 4] + col[t % 4], rtol=1e-6)
  swapped = {**params, "positions": {"row": col, "col": row}}
  a = full(params, TEXT, MASK, t2i.image_inputs(CODES, C.bos_id))
  b = full(swapped, TEXT, MASK, t2i.image_inputs(CODES, C.bos_id))
  assert np.abs(a[..., :32] - b[..., :32]).max() > 0.1


def test_caption_dropout_rate_and_null_caption():
  text = jnp.asarray(np.random.default_rng(0).integers(3, 60, (4000, 7)), jnp.int32)
  mask = jnp.asarray(np.arange(7)[None] < np.random.default_rng(1).integers(1, 8, (4000, 1)))
  out, out_mask = t2i.drop_captions(text, mask, jax.random.key(3), 0.2, NULL_ID)
  null = np.asarray([NULL_ID, 0, 0, 0, 0, 0, 0])
  dropped = np.all(np.asarray(out) == null, axis=1)
  assert abs(dropped.mean() - 0.2) < 4 * np.sqrt(0.2 * 0.8 / 4000)  # 4 sigma: 0.2 +- 0.025
  np.testing.assert_array_equal(np.asarray(out_mask)[dropped],
                                np.tile([True] + [False] * 6, (dropped.sum(), 1)))
  np.testing.assert_array_equal(np.asarray(out)[~dropped], np.asarray(text)[~dropped])
  np.testing.assert_array_equal(np.asarray(out_mask)[~dropped], np.asarray(mask)[~dropped])
  same = t2i.drop_captions(text, mask, jax.random.key(3), 0.0, NULL_ID)
  assert same[0] is text and same[1] is mask
  with pytest.raises(ValueError, match=r"rate=1\.0: must be in \[0, 1\)"):
    t2i.drop_captions(text, mask, jax.random.key(3), 1.0, NULL_ID)
  null_text, null_mask = t2i.null_caption(2, 3, NULL_ID)
  np.testing.assert_array_equal(null_text, [[1, 0, 0], [1, 0, 0]])
  np.testing.assert_array_equal(null_mask, [[True, False, False]] * 2)


# ------------------------------------------------------------------------------ guidance


def guided_source(model, params):
  null = encode(model, params, *t2i.null_caption(1, TEXT.shape[1], NULL_ID))
  return guidance.with_null(encode(model, params, TEXT, MASK), null)


def test_guide_logits_by_hand():
  cond = jnp.asarray([[1.0, 2.0, -jnp.inf], [0.5, -1.0, -jnp.inf]])
  uncond = jnp.asarray([[0.0, 3.0, -jnp.inf], [0.5, 1.0, -jnp.inf]])
  np.testing.assert_array_equal(guidance.guide_logits(cond, uncond, 0.0), cond)
  np.testing.assert_array_equal(guidance.guide_logits(cond, uncond, 2.0),
                                [[3.0, 0.0, -np.inf], [0.5, -5.0, -np.inf]])


@pytest.mark.parametrize("scale", [0.0, 2.5])
def test_batched_guided_pass_equals_two_separate_passes(tiny, scale):
  """Guided decoding runs prompts and null captions as one batch of 2B; its logits at every
  step equal cond + scale * (cond - uncond) of two separate cached decodes (float64 by hand),
  and scale 0 gives the conditional logits."""
  model, params = tiny
  image_in = t2i.image_inputs(CODES, C.bos_id)
  source = guided_source(model, params)
  cond = decode_steps(params, encode(model, params, TEXT, MASK), image_in)
  null = {"memory": source["null_memory"], "mask": source["null_mask"]}
  uncond = decode_steps(params, null, image_in)
  guided = decode_steps(params, source, image_in, scale)
  c, u = np.asarray(cond, np.float64)[..., :32], np.asarray(uncond, np.float64)[..., :32]
  np.testing.assert_allclose(guided[..., :32], c + scale * (c - u), atol=5e-5, rtol=1e-5)
  assert np.isneginf(guided[..., 32:]).all()
  if scale == 0:
    np.testing.assert_allclose(guided, cond, atol=2e-6, rtol=1e-6)
  else:
    assert np.abs(c - u).max() > 0.1  # the caption matters: guidance changes the logits


def test_guided_cache_rows_stay_paired(tiny):
  """The guided cache holds (2, B, ...) leaves: gathering rows (as beam search does) moves a
  prompt's conditional and null halves together."""
  model, params = tiny
  wrapped = guidance.Guided(model, 1.5)
  cache = wrapped.init_cache(batch=2, length=16, source=guided_source(model, params))
  assert cache["layer_0"]["self"]["k"].shape[:2] == (2, 2)
  assert cache["source_mask"].shape == (2, 2, 1, 6, 1)
  assert all(x.ndim >= 5 for x in jax.tree_util.tree_leaves(cache))  # batch axis at ndim-4


def test_guided_greedy_sampling_equals_a_naive_rollout(tiny):
  """sample_image_tokens (cached, guided, inside one while_loop) picks at each cell the argmax
  of the guided logits recomputed from scratch over the tokens chosen so far."""
  model, params = tiny
  scale = 2.0
  null_text, null_mask = t2i.null_caption(2, TEXT.shape[1], NULL_ID)
  codes = np.zeros((2, C.num_tokens), np.int32)
  for t in range(C.num_tokens):
    image_in = t2i.image_inputs(codes, C.bos_id)
    cond = np.asarray(full(params, TEXT, MASK, image_in)[:, t, :32], np.float64)
    uncond = np.asarray(full(params, null_text, null_mask, image_in)[:, t, :32], np.float64)
    codes[:, t] = np.argmax(cond + scale * (cond - uncond), -1)
  sample = jax.jit(lambda p, rng: guidance.sample_image_tokens(
      model, p, TEXT, MASK, rng, null_id=NULL_ID, guidance=scale, temperature=0.0))
  out = sample(params, jax.random.key(0))
  assert out.shape == (2, 16) and out.dtype == jnp.int32
  np.testing.assert_array_equal(out, codes)
  assert min(len(set(row)) for row in codes.tolist()) > 2  # varied codes: the test can fail
  assert ((0 <= codes) & (codes < 32)).all()


def test_with_null_refuses_another_length(tiny):
  model, params = tiny
  null = encode(model, params, *t2i.null_caption(1, 4, NULL_ID))
  with pytest.raises(ValueError, match="encode the null caption at the prompts' length"):
    guidance.with_null(encode(model, params, TEXT, MASK), null)
