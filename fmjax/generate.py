"""Sampling from a causal LM (simple form: full recomputation over a fixed window).

Shape key: B batch, T length, V vocab.

The whole loop is one jitted lax.fori_loop over a fixed-size token buffer, so any number
of new tokens compiles once per (batch, window) shape.
"""

import functools

import jax
import jax.numpy as jnp


def sample_logits(logits, rng, *, temperature: float = 1.0, top_k: int = 0):
  """Draws one token per row from (B, V) logits; temperature 0 is greedy."""
  if temperature == 0.0:
    return jnp.argmax(logits, -1)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1)


@functools.partial(jax.jit, static_argnames=("apply_fn", "window", "max_new_tokens",
                                             "temperature", "top_k"))
def _generate(params, prompt, prompt_len, rng, *, apply_fn, window, max_new_tokens,
              temperature, top_k):
  b = prompt.shape[0]
  buf = jnp.zeros((b, prompt.shape[1] + max_new_tokens), jnp.int32)
  buf = jax.lax.dynamic_update_slice(buf, prompt, (0, 0))

  def body(i, buf):
    pos = prompt_len + i  # index of the token to write
    start = jnp.maximum(pos - window, 0)  # the model sees at most `window` tokens
    ctx = jax.lax.dynamic_slice(buf, (0, start), (b, window))
    logits = apply_fn(params, ctx)  # (B, window, V)
    last = jnp.take(logits, pos - start - 1, axis=1)
    tok = sample_logits(last, jax.random.fold_in(rng, i), temperature=temperature, top_k=top_k)
    return jax.lax.dynamic_update_slice(buf, tok[:, None].astype(jnp.int32), (0, pos))

  return jax.lax.fori_loop(0, max_new_tokens, body, buf)


def generate(apply_fn, params, prompt_ids, *, max_new_tokens: int, window: int, rng,
             temperature: float = 1.0, top_k: int = 0):
  """Continues one prompt.

  Args:
    apply_fn: (params, tokens (B, window)) -> logits (B, window, V); must be causal.
    prompt_ids: list of ints (at least one).
    window: the model's context length (max_len).
  Returns:
    list of the new token ids.
  """
  prompt = jnp.asarray([list(prompt_ids)], jnp.int32)
  n = prompt.shape[1]
  # Pad the buffer so the first window slice is in bounds for short prompts.
  pad = max(window - n, 0)
  prompt = jnp.pad(prompt, ((0, 0), (0, pad)))
  out = _generate(params, prompt, n, rng, apply_fn=apply_fn, window=window,
                  max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k)
  return [int(t) for t in out[0, n:n + max_new_tokens]]
