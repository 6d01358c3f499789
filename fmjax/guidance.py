"""Classifier-free guidance (Ho & Salimans 2022) for encoder-decoder decoding, and sampling
the image tokens of a text-to-image model (fmjax/models/text_to_image.py).

Shape key: B batch, S source length, T tokens per step, V vocab (padded), N image tokens.

A model trained with caption dropout predicts both p(x | caption) and p(x | null caption).
Guidance sharpens the conditioning by extrapolating away from the unconditional logits:

  guided = cond + scale * (cond - uncond)          (scale 0: the conditional model itself)

(dalle-mini's "condition scale" s is uncond + s * (cond - uncond), i.e. scale = s - 1.)

`Guided(model, scale)` has the model interface of fmjax.generate (`init_cache`, and `apply`
with method="decode"), so `generate_tokens` / `generate_from_source` sample from the guided
logits with their usual temperature and top-k, compiled once. Each step runs the B prompts
and their B null captions as one batch of 2B rows; the cache holds both halves as leaves of
shape (2, B, ...), so that gathering cache rows (beam search) moves both halves alike. The
source is the prompts' encoding with the null caption's beside it (`with_null`).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from fmjax import generate
from fmjax.models import text_to_image


def guide_logits(cond, uncond, scale: float):
  """cond + scale * (cond - uncond), keeping -inf (masked ids) where cond has it.

  Args:
    cond: (B, V) float, logits given the prompts.
    uncond: (B, V) float, logits given the null caption.
    scale: the guidance scale; 0 returns cond.

  Returns:
    (B, V) float32 guided logits.
  """
  cond, uncond = cond.astype(jnp.float32), uncond.astype(jnp.float32)
  return jnp.where(jnp.isneginf(cond), cond, cond + scale * (cond - uncond))


def with_null(source, null_source):
  """The source of a guided decode: the prompts' encoding and the null caption's.

  Args:
    source: the model's `encode` output for B prompts ({"memory": (B, S, D), "mask": (B, S)}).
    null_source: its `encode` output for the null caption, one row or B, same S.

  Returns:
    {"memory", "mask"} of the prompts plus {"null_memory", "null_mask"} (B rows).

  Raises:
    ValueError: the two sources differ in length or width.
  """
  b, s = source["mask"].shape
  if null_source["memory"].shape[1:] != source["memory"].shape[1:]:
    raise ValueError(f"null_source memory {null_source['memory'].shape} does not match the "
                     f"prompts' {source['memory'].shape} after the batch axis; encode the "
                     "null caption at the prompts' length")
  grow = lambda x: jnp.broadcast_to(x, (b, *x.shape[1:]))
  return {**source, "null_memory": grow(null_source["memory"]),
          "null_mask": grow(null_source["mask"])}


def _both(source):
  """The 2B-row source of one batched pass: prompts first, null captions second."""
  return {"memory": jnp.concatenate([source["memory"], source["null_memory"]]),
          "mask": jnp.concatenate([source["mask"], source["null_mask"]])}


@dataclasses.dataclass(frozen=True)
class Guided:
  """An encoder-decoder model behind classifier-free guidance, with the model interface of
  fmjax.generate; hashable, so it can be a static argument of a jitted function.

  Attributes:
    model: e.g. a TextToImage (a flax module with `init_cache` and a `decode` method taking
      `source=`).
    scale: the guidance scale (0: the conditional logits).
  """
  model: Any
  scale: float

  def init_cache(self, *, batch: int, length: int, source):
    """The model's cache for the 2B rows, each leaf reshaped to (2, B, ...).

    Args:
      batch: B, the prompts.
      length: target cache slots.
      source: `with_null`'s output (B rows).

    Returns:
      The cache pytree, leaves (2, B, ...).
    """
    cache = self.model.init_cache(batch=2 * batch, length=length, source=_both(source))
    return jax.tree_util.tree_map(lambda x: x.reshape(2, batch, *x.shape[1:]), cache)

  def apply(self, variables, tokens, cache, *, index, positions, kv_mask, method="decode",
            source=None):
    """One guided decoding step: the prompts and the null captions in one batch of 2B.

    Args:
      variables: {"params": the model's parameters}.
      tokens: (B, T) ids.
      cache: from `init_cache`.
      index, positions, kv_mask: as the model's decode.
      method: "decode" (the only one).
      source: `with_null`'s output on the first call, else None.

    Returns:
      (guided logits (B, V) float32, the updated cache).
    """
    if method != "decode":
      raise ValueError(f"Guided.apply(method={method!r}): only 'decode' is guided; call the "
                       "model itself for anything else")
    b = tokens.shape[0]
    two = lambda x: jnp.concatenate([x, x])
    flat = jax.tree_util.tree_map(lambda x: x.reshape(2 * b, *x.shape[2:]), cache)
    extra = {} if source is None else {"source": _both(source)}
    logits, flat = self.model.apply(variables, two(tokens), flat, index=index,
                                    positions=two(positions), kv_mask=two(kv_mask),
                                    method="decode", **extra)
    cache = jax.tree_util.tree_map(lambda x: x.reshape(2, b, *x.shape[1:]), flat)
    return guide_logits(logits[:b], logits[b:], self.scale), cache


def sample_image_tokens(model, params, text, text_mask, rng, *, null_id: int,
                        guidance: float = 0.0, temperature: float = 1.0,
                        top_k: int = 0) -> jax.Array:
  """Samples each caption's image codes; traceable (guidance, temperature, top_k static).

  Args:
    model: a fmjax.models.text_to_image.TextToImage.
    params: its parameters.
    text: (B, S) int caption ids.
    text_mask: (B, S) bool, False on padding.
    rng: PRNG key.
    null_id: the null caption's token (the tokenizer's EOS id; see text_to_image.null_caption).
    guidance: the classifier-free guidance scale (0: conditional sampling, no null pass).
    temperature: softmax temperature (0: greedy).
    top_k: sample among the k most likely codes (0: all).

  Returns:
    (B, N) int32 codes in [0, codebook_size), row-major over the grid.
  """
  c = model.config
  source = model.apply({"params": params}, text, text_mask, method="encode")
  if guidance:
    null = model.apply({"params": params}, *text_to_image.null_caption(1, text.shape[1], null_id),
                       method="encode")
    source, model = with_null(source, null), Guided(model, float(guidance))
  config = generate.GenerateConfig(max_new_tokens=c.num_tokens, temperature=temperature,
                                   top_k=top_k)
  return generate.generate_from_source(model, params, source, config, start_id=c.bos_id,
                                       rng=rng).tokens
