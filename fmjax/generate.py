"""Inference: text generation from a causal LM with a KV cache, and BERT fill-mask.

Shape key: B batch, W beams, T prompt length (bucketed), N new tokens, S = T + N cache slots,
V vocab, P [MASK] positions per row.

Generation is a prefill (the whole prompt through the model once, filling the KV cache) and
then one token per step, each step attending the cache instead of recomputing the prefix.
The steps run inside one lax.while_loop that stops early once every row has stopped.

Padding: prompts are LEFT-padded to a bucket length T (a power of two, at least 8). Every
row's last prompt token then sits at slot T - 1, so the prefill's next-token logits come from
one column and each step writes one cache slot shared by all rows (a dynamic_update_slice,
no per-row scatter). Padding slots are masked out of attention and positions count from each
row's first real token, so a row's tokens do not depend on how much padding it got.

Compile once: `generate` (lists of ids in, lists of ids out) jits one function per model,
batch, prompt bucket, max_new_tokens, `GenerateConfig` and mesh, and reuses it;
`generate_tokens` is the traceable core to call inside your own jit.
`stream` yields one prompt's new tokens as they are chosen (for chat: the same tokens as
`generate`, one jitted step per token).

The model interface (GPT has it): `model.init_cache(batch=, length=)` returns a pytree of
(..., B, K, S', H) buffers (S' = S, or fewer for a sliding-window layer's ring buffer), and `model.apply(variables, tokens, cache, index=, positions=,
kv_mask=, method="decode")` returns (next-token logits (B, V) of the last token, cache).
Encoder-decoder models (fmjax/models/seq2seq.py) take `source=`, their encoder's output, in
`init_cache` and in the first (prefill) `decode` call: `generate_tokens(..., source=)` encodes
nothing itself, so the source is encoded once, outside the decoding loop.
"""

import dataclasses
import functools
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fmjax import sharding

_NEG_INF = -jnp.inf
MIN_BUCKET = 8


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  """How to pick new tokens; hashable, so it is a static argument of the jitted loop.

  Attributes:
    max_new_tokens: N, new tokens per row at most (a stop token counts).
    temperature: 0 is greedy (argmax); > 0 samples from softmax(logits / temperature).
    top_k: sample only among the k most likely tokens (0: no cut).
    top_p: nucleus: sample among the most likely tokens whose probabilities sum to top_p
      (after temperature and top_k; 1.0: no cut). The most likely token is always kept.
    num_beams: > 1 runs beam search (deterministic: needs temperature 0).
    length_penalty: beam score = sum of log-probs / (new tokens) ** length_penalty; > 0
      favours longer outputs (as in Hugging Face; new tokens count the stop token).
    stop_tokens: ids that end a row; the stop token is kept as the row's last token.
  """
  max_new_tokens: int
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  num_beams: int = 1
  length_penalty: float = 1.0
  stop_tokens: tuple[int, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))
    problems = []
    if self.max_new_tokens < 1:
      problems.append(f"max_new_tokens={self.max_new_tokens} must be at least 1")
    if self.temperature < 0:
      problems.append(f"temperature={self.temperature} must be >= 0 (0 is greedy)")
    if self.top_k < 0:
      problems.append(f"top_k={self.top_k} must be >= 0 (0 keeps every token)")
    if not 0 < self.top_p <= 1:
      problems.append(f"top_p={self.top_p} must be in (0, 1] (1 keeps every token)")
    if self.num_beams < 1:
      problems.append(f"num_beams={self.num_beams} must be at least 1")
    if self.num_beams > 1 and (self.temperature > 0 or self.top_k or self.top_p < 1):
      problems.append(f"num_beams={self.num_beams} is deterministic beam search; it takes no "
                      "temperature, top_k or top_p (set temperature=0 or num_beams=1)")
    if problems:
      raise ValueError("; ".join(problems))

  @property
  def greedy(self) -> bool:
    """Whether tokens are picked by argmax (temperature 0), with no sampling."""
    return self.temperature == 0


@flax.struct.dataclass
class Generated:
  """What `generate_tokens` returns.

  Attributes:
    tokens: (B, N) int32 new tokens, pad_id after each row's end.
    lengths: (B,) int32 new tokens per row (a stop token included).
    scores: (B,) float32 beam scores (length-penalised log-probability); None unless beams.
  """
  tokens: jax.Array
  lengths: jax.Array
  scores: Any = None


# ------------------------------------------------------------------------------ token choice


def select_tokens(logits, rng, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
  """Picks one token per row from next-token logits.

  Temperature, then top-k, then top-p, as Hugging Face orders them. Greedy is a plain
  argmax; top_k works on the k largest logits only, so no full-vocabulary softmax is formed
  (top_p alone sorts the whole vocabulary).

  Args:
    logits: (B, V) float.
    rng: a PRNG key (unused when greedy).
    temperature: 0 picks the argmax; > 0 divides the logits before sampling.
    top_k: sample among the k largest logits only (0: all V).
    top_p: sample among the most likely tokens whose probabilities (after temperature and
      top_k) sum to top_p; the most likely is always kept (1.0: no cut).

  Returns:
    (B,) int32 token ids.
  """
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if not top_k and top_p >= 1:
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
  k = top_k or logits.shape[-1]
  values, ids = jax.lax.top_k(logits, k)  # (B, k), descending
  if top_p < 1:
    probs = jax.nn.softmax(values, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
    values = jnp.where(before < top_p, values, _NEG_INF)  # the first is always kept
  choice = jax.random.categorical(rng, values, axis=-1)  # (B,)
  return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _is_stop(tokens, stop_tokens):
  if not stop_tokens:
    return jnp.zeros(tokens.shape, bool)
  return jnp.isin(tokens, jnp.asarray(stop_tokens, jnp.int32))


# ------------------------------------------------------------------------------ the core


def _prefill(model, params, prompt, prompt_lengths, num_new, source=None):
  """Runs the left-padded prompt through the model into a fresh cache of T + num_new slots
  (conditioned on the encoded `source` for an encoder-decoder model).

  Returns (logits (B, V), cache, kv_mask (B, S), prompt_lengths (B,)).
  """
  B, T = prompt.shape
  prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)
  pad = T - prompt_lengths  # (B,)
  kv_mask = jnp.arange(T + num_new)[None, :] >= pad[:, None]  # (B, S)
  kv_mask = nn.with_logical_constraint(kv_mask, ("batch", "length"))
  positions = jnp.maximum(jnp.arange(T)[None, :] - pad[:, None], 0)  # (B, T)
  extra = {} if source is None else {"source": source}
  cache = model.init_cache(batch=B, length=T + num_new, **extra)
  logits, cache = model.apply({"params": params}, prompt, cache, index=0, positions=positions,
                              kv_mask=kv_mask, method="decode", **extra)
  return logits, cache, kv_mask, prompt_lengths


def generate_tokens(model, params, prompt, prompt_lengths, rng, config: GenerateConfig, *,
                    pad_id: int = 0, source=None) -> Generated:
  """Continues a batch of left-padded prompts; traceable (jit it, or call it inside jit).

  Args:
    model: a module with `init_cache` and a `decode` method (see the module docstring).
    params: its parameters (sharded or not).
    prompt: (B, T) int ids, row b's prompt in its last prompt_lengths[b] columns.
    prompt_lengths: (B,) int, each at least 1.
    rng: PRNG key for sampling (ignored when greedy or beam search).
    config: a GenerateConfig (static).
    pad_id: written after a row has stopped.
    source: an encoder-decoder model's encoded inputs (e.g. Seq2Seq.encode's {"memory",
      "mask"}, B rows), given to init_cache and the prefill; None for a decoder-only model.
  Returns:
    Generated(tokens (B, N), lengths (B,), scores (B,) for beam search else None).
  """
  if config.num_beams > 1:
    return beam_search(model, params, prompt, prompt_lengths, config, pad_id=pad_id,
                       source=source)
  B, T = prompt.shape
  N = config.max_new_tokens
  logits, cache, kv_mask, prompt_lengths = _prefill(model, params, prompt, prompt_lengths, N,
                                                    source)
  pick = functools.partial(select_tokens, temperature=config.temperature, top_k=config.top_k,
                           top_p=config.top_p)

  def choose(i, logits, tokens, lengths, done):
    tok = jnp.where(done, pad_id, pick(logits, jax.random.fold_in(rng, i)))
    tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, i))
    return tok, tokens, lengths + (~done).astype(jnp.int32), done | _is_stop(tok, config.stop_tokens)

  def body(carry):
    i, logits, cache, tokens, lengths, done = carry
    tok, tokens, lengths, done = choose(i, logits, tokens, lengths, done)
    logits, cache = model.apply({"params": params}, tok[:, None], cache, index=T + i,
                                positions=(prompt_lengths + i)[:, None], kv_mask=kv_mask,
                                method="decode")
    return i + 1, logits, cache, tokens, lengths, done

  def cond(carry):
    i, done = carry[0], carry[-1]
    return (i < N - 1) & ~jnp.all(done)  # the last token needs no forward pass after it

  tokens = jnp.full((B, N), pad_id, jnp.int32)
  zeros = jnp.zeros((B,), jnp.int32)
  i, logits, _, tokens, lengths, done = jax.lax.while_loop(
      cond, body, (jnp.int32(0), logits, cache, tokens, zeros, zeros.astype(bool)))
  _, tokens, lengths, _ = choose(i, logits, tokens, lengths, done)
  return Generated(tokens=tokens, lengths=lengths)


def _cache_take(cache, rows):
  """Gathers cache rows (the batch axis of every (..., B, K, S', H) leaf)."""
  return jax.tree_util.tree_map(lambda x: jnp.take(x, rows, axis=x.ndim - 4), cache)


def beam_search(model, params, prompt, prompt_lengths, config: GenerateConfig, *,
                pad_id: int = 0, source=None) -> Generated:
  """Beam search with a length penalty; traceable. Returns each row's best hypothesis.

  W = config.num_beams beams per row (W = 1 is allowed and, without stop tokens, is greedy).
  Each step extends every alive beam by every token, keeps the 2W best extensions, moves those
  ending in a stop token to the row's finished list (scored sum log-prob / length **
  length_penalty) and keeps the W best others alive. At N new tokens the alive beams are
  scored too. The loop stops early once no alive beam can beat a row's W finished ones, so
  the answer equals running all N steps.

  Args:
    model: a module with `init_cache` and a `decode` method (see the module docstring).
    params: its parameters.
    prompt: (B, T) int ids, left-padded, as for `generate_tokens`.
    prompt_lengths: (B,) int, each at least 1.
    config: a GenerateConfig (static); num_beams gives W, temperature must be 0.
    pad_id: written after each hypothesis' end.
    source: an encoder-decoder model's encoded inputs (B rows), as for `generate_tokens`.

  Returns:
    Generated(tokens (B, N) int32, lengths (B,) int32, scores (B,) float32): each row's best
    hypothesis and its length-penalised beam score.
  """
  B, T = prompt.shape
  N, W = config.max_new_tokens, config.num_beams
  logits, cache, kv_mask, prompt_lengths = _prefill(model, params, prompt, prompt_lengths, N,
                                                    source)
  V = logits.shape[-1]
  rows = jnp.repeat(jnp.arange(B), W)  # (B*W,) beam b*W + w continues prompt b
  logits, cache, kv_mask = logits[rows], _cache_take(cache, rows), kv_mask[rows]
  positions = prompt_lengths[rows]
  penalty = lambda n: jnp.asarray(n, jnp.float32) ** config.length_penalty

  def merge_finished(fin, cand_seq, cand_score, cand_len):
    """Keeps the W best of the finished list and new candidates (B, C)."""
    seq = jnp.concatenate([fin[0], cand_seq], 1)
    score = jnp.concatenate([fin[1], cand_score], 1)
    length = jnp.concatenate([fin[2], cand_len], 1)
    best, idx = jax.lax.top_k(score, W)
    return (jnp.take_along_axis(seq, idx[..., None], 1), best,
            jnp.take_along_axis(length, idx, 1))

  def body(carry):
    i, logits, cache, seq, alive_lp, fin = carry
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1).reshape(B, W, V)
    cand = (alive_lp[:, :, None] + lp).reshape(B, W * V)
    vals, flat = jax.lax.top_k(cand, 2 * W)  # (B, 2W)
    parent, tok = flat // V, (flat % V).astype(jnp.int32)
    cand_seq = jnp.take_along_axis(seq, parent[..., None], 1)  # (B, 2W, N)
    cand_seq = jax.lax.dynamic_update_slice(cand_seq, tok[..., None], (0, 0, i))
    stop = _is_stop(tok, config.stop_tokens)
    fin = merge_finished(fin, cand_seq, jnp.where(stop, vals / penalty(i + 1), _NEG_INF),
                         jnp.full(tok.shape, i + 1, jnp.int32))
    alive_lp, keep = jax.lax.top_k(jnp.where(stop, _NEG_INF, vals), W)  # (B, W)
    seq = jnp.take_along_axis(cand_seq, keep[..., None], 1)
    parent = jnp.take_along_axis(parent, keep, 1)
    tok = jnp.take_along_axis(tok, keep, 1)
    cache = _cache_take(cache, (jnp.arange(B)[:, None] * W + parent).reshape(-1))
    logits, cache = model.apply({"params": params}, tok.reshape(-1, 1), cache, index=T + i,
                                positions=(positions + i)[:, None], kv_mask=kv_mask,
                                method="decode")
    return i + 1, logits, cache, seq, alive_lp, fin

  def cond(carry):
    i, _, _, _, alive_lp, fin = carry
    # The best score an alive beam could still reach: log-probs only fall, and the length
    # term is largest at N new tokens (penalty >= 0) or at the next token (penalty < 0).
    best_len = N if config.length_penalty >= 0 else i + 1
    bound = jnp.max(alive_lp, 1) / penalty(best_len)
    settled = jnp.min(fin[1], 1) >= bound  # (B,)
    return (i < N) & ~jnp.all(settled)

  seq = jnp.full((B, W, N), pad_id, jnp.int32)
  alive_lp = jnp.tile(jnp.asarray([0.0] + [-np.inf] * (W - 1), jnp.float32), (B, 1))
  fin = (seq, jnp.full((B, W), _NEG_INF, jnp.float32), jnp.zeros((B, W), jnp.int32))
  i, _, _, seq, alive_lp, fin = jax.lax.while_loop(
      cond, body, (jnp.int32(0), logits, cache, seq, alive_lp, fin))
  # Beams still alive at the end are hypotheses of length i (only counts when i == N).
  alive_score = jnp.where(i == N, alive_lp / penalty(i), _NEG_INF)
  seq, score, length = merge_finished(fin, seq, alive_score, jnp.full((B, W), i, jnp.int32))
  tokens = jnp.where(jnp.arange(N)[None] < length[:, :1], seq[:, 0], pad_id)
  return Generated(tokens=tokens, lengths=length[:, 0], scores=score[:, 0])


def generate_from_source(model, params, source, config: GenerateConfig, *, start_id: int,
                         pad_id: int = 0, rng=None) -> Generated:
  """An encoder-decoder model's outputs for an encoded batch, each row starting from `start_id`.

  Greedy, sampled or beam search as `config` says; traceable.

  Args:
    model, params: e.g. fmjax.models.seq2seq.Seq2Seq and its parameters.
    source: model.encode's output for B rows ({"memory": (B, S, D), "mask": (B, S)}).
    config: a GenerateConfig (static).
    start_id: the token each row's decoding starts from (a one-token prompt).
    pad_id: written after a row has stopped.
    rng: PRNG key for sampling; None: jax.random.key(0).

  Returns:
    Generated, as generate_tokens (the start token is not among the new tokens).
  """
  batch = source["mask"].shape[0]
  prompt = jnp.full((batch, 1), start_id, jnp.int32)
  rng = jax.random.key(0) if rng is None else rng
  return generate_tokens(model, params, prompt, jnp.ones((batch,), jnp.int32), rng, config,
                         pad_id=pad_id, source=source)


# ------------------------------------------------------------------------------ host API


def bucket_length(n: int) -> int:
  """The prompt bucket: the next power of two >= n, at least MIN_BUCKET.

  Args:
    n: the longest prompt's length in tokens.

  Returns:
    The padded prompt length T, e.g. 8 for n <= 8, 16 for n = 9.
  """
  return max(MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("model", "config", "pad_id", "mesh", "rules"))
def _generate_jit(params, prompt, lengths, rng, *, model, config, pad_id, mesh, rules):
  del mesh, rules  # part of the cache key: constraints resolve against them at trace time
  return generate_tokens(model, params, prompt, lengths, rng, config, pad_id=pad_id)


def _check_positions(model, longest: int, max_new_tokens: int) -> None:
  c = getattr(model, "config", None)
  if getattr(c, "position", None) == "learned" and longest + max_new_tokens > c.max_len:
    raise ValueError(
        f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} needs "
        f"{longest + max_new_tokens} positions but the model has max_len={c.max_len} learned "
        f"positions; shorten the prompt or ask for at most {max(c.max_len - longest, 0)} new "
        "tokens")


def generate(model, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, num_beams: int = 1,
             length_penalty: float = 1.0, stop_tokens: Sequence[int] = (), seed: int = 0,
             pad_id: int = 0, mesh=None, rules=None) -> list[list[int]]:
  """Continues each prompt; compiles once per (batch, prompt bucket, settings) and reuses it.

  Args:
    model, params: e.g. fmjax.models.gpt.GPT(config) and its parameters.
    prompts: B lists of token ids, each non-empty; lengths may differ (they are left-padded
      to a power-of-two bucket, so nearby lengths share one compiled program).
    max_new_tokens, temperature, top_k, top_p, num_beams, length_penalty, stop_tokens: see
      GenerateConfig.
    seed: sampling seed; the same seed, prompts and settings give the same tokens.
    pad_id: the id prompts are padded with (never attended).
    mesh, rules: run on a mesh (fmjax.sharding.make_mesh) with logical-axis rules (a rule-set
      name such as "fsdp_tp", or a rule list): pass params already sharded (e.g. by
      sharding.sharded_init); the batch is split over the mesh's batch shards, padded with
      copies of the first prompt to a multiple of their number.
  Returns:
    B lists of new token ids; a row that stopped ends with its stop token.
  """
  config = GenerateConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, num_beams=num_beams, length_penalty=length_penalty,
                          stop_tokens=tuple(stop_tokens))
  if isinstance(params, dict) and set(params) == {"params"}:
    raise ValueError("got a variables dict {'params': ...}; pass variables['params']")
  prompts = [list(p) for p in prompts]
  if not prompts:
    raise ValueError("prompts is empty; pass at least one list of token ids")
  for i, p in enumerate(prompts):
    if not p:
      raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
  longest = max(len(p) for p in prompts)
  _check_positions(model, longest, max_new_tokens)
  B = len(prompts)
  if mesh is not None:
    data = sharding.batch_shards(mesh)
    prompts += [prompts[0]] * (-B % data)
  T = bucket_length(longest)
  tokens = np.full((len(prompts), T), pad_id, np.int32)
  for row, p in zip(tokens, prompts):
    row[T - len(p):] = p
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  rng = jax.random.key(seed)
  call = functools.partial(_generate_jit, model=model, config=config, pad_id=pad_id, mesh=mesh,
                           rules=None if rules is None else tuple(sharding.get_rules(rules)))
  if mesh is None:
    out = call(params, tokens, lengths, rng)
  else:
    with sharding.context(mesh, rules):
      out = call(params, jax.device_put(tokens, sharding.batch_sharding(mesh)),
                 jax.device_put(lengths, sharding.batch_sharding(mesh)), rng)
  out_tokens, out_lengths = jax.device_get((out.tokens, out.lengths))
  return [row[:n].tolist() for row, n in zip(out_tokens[:B], out_lengths[:B])]


def complete(model, params, prompt: Sequence[int], *, max_new_tokens: int, context: int,
             seed: int = 0, stop_tokens: Sequence[int] = (), **settings) -> list[int]:
  """Continues one prompt for any number of tokens, seeing at most `context` tokens at a time.

  A KV cache cannot slide with learned absolute positions, so the text is made in chunks:
  the first continues the prompt (its last context - 1 tokens) up to `context` tokens; each
  later one restarts from the last context // 2 tokens and adds context - context // 2. All
  later chunks share one compiled program.

  Args:
    model, params: as for `generate`.
    prompt: token ids, at least one.
    max_new_tokens: how many tokens to make (fewer if a stop token comes).
    context: the longest window the model should see, e.g. its training length.
    seed: chunk c samples with seed + c.
    stop_tokens, settings: as for `generate` (temperature, top_k, top_p, num_beams, ...).
  Returns:
    the new token ids (ending with the stop token if one came).
  """
  if context < 2:
    raise ValueError(f"context={context} must be at least 2 tokens")
  if not prompt:
    raise ValueError("the prompt is empty; give at least one token to continue")
  keep = context // 2
  new: list[int] = []
  chunk = 0
  while len(new) < max_new_tokens:
    window = (list(prompt) + new)[-(context - 1 if chunk == 0 else keep):]
    out = generate(model, params, [window], max_new_tokens=context - len(window),
                   stop_tokens=stop_tokens, seed=seed + chunk, **settings)[0]
    new += out[:max_new_tokens - len(new)]
    if len(out) < context - len(window) or (out and out[-1] in stop_tokens):
      break
    chunk += 1
  return new


# ------------------------------------------------------------------------------ streaming


@functools.partial(jax.jit, static_argnames=("model", "num_new"))
def _stream_prefill(params, prompt, lengths, *, model, num_new):
  return _prefill(model, params, prompt, lengths, num_new)


@functools.partial(jax.jit, static_argnames=("model", "config"), donate_argnames=("cache",))
def _stream_step(params, logits, cache, kv_mask, prompt_lengths, rng, i, index, *, model,
                 config):
  """Token i from `logits` (as generate_tokens picks it), then its next-token logits (the
  last token's forward pass is not needed, but its slot T + N - 1 exists, and one compiled
  step serves every token)."""
  tok = select_tokens(logits, jax.random.fold_in(rng, i), temperature=config.temperature,
                      top_k=config.top_k, top_p=config.top_p)
  logits, cache = model.apply({"params": params}, tok[:, None], cache, index=index,
                              positions=(prompt_lengths + i)[:, None], kv_mask=kv_mask,
                              method="decode")
  return tok, logits, cache


def stream(model, params, prompt: Sequence[int], *, max_new_tokens: int,
           temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           stop_tokens: Sequence[int] = (), seed: int = 0, pad_id: int = 0):
  """Continues one prompt, yielding each new token id as soon as it is chosen (for chat).

  The same prefill, cache and token choice as `generate` (the same seed gives the same
  tokens), but the decoding loop runs in Python, one jitted step per token, so the caller
  can show text while it is made; `generate` is faster for whole answers and batches.

  Args:
    model, params: as for `generate` (one device).
    prompt: token ids, at least one.
    max_new_tokens, temperature, top_k, top_p, stop_tokens, seed, pad_id: as for `generate`
      (no beam search).

  Yields:
    New token ids (int); the last is a stop token when one came.
  """
  config = GenerateConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, stop_tokens=tuple(stop_tokens))
  prompt = list(prompt)
  if not prompt:
    raise ValueError("the prompt is empty; give at least one token to continue")
  _check_positions(model, len(prompt), max_new_tokens)
  T = bucket_length(len(prompt))
  tokens = np.full((1, T), pad_id, np.int32)
  tokens[0, T - len(prompt):] = prompt
  lengths = np.asarray([len(prompt)], np.int32)
  logits, cache, kv_mask, lengths = _stream_prefill(params, tokens, lengths, model=model,
                                                    num_new=max_new_tokens)
  rng = jax.random.key(seed)
  for i in range(max_new_tokens):
    tok, logits, cache = _stream_step(params, logits, cache, kv_mask, lengths, rng,
                                      np.int32(i), np.int32(T + i), model=model, config=config)
    tok = int(tok[0])
    yield tok
    if tok in config.stop_tokens:
      return


# ------------------------------------------------------------------------------ fill-mask


@functools.partial(jax.jit, static_argnames=("model", "top_k"))
def _fill_mask_jit(params, input_ids, token_type_ids, attention_mask, positions, *, model,
                   top_k):
  out = model.apply({"params": params}, input_ids, token_type_ids, attention_mask, positions)
  probs, ids = jax.lax.top_k(jax.nn.softmax(out["mlm_logits"], -1), top_k)  # (B, P, k)
  return ids, probs


def fill_mask(model, params, input_ids, *, mask_id: int, top_k: int = 5, token_type_ids=None,
              attention_mask=None, tokenizer=None) -> list[list[dict]]:
  """Top-k predictions for every [MASK] of a BertForPreTraining (its masked-LM head).

  The encoder runs once per batch; the MLM head runs only at the [MASK] positions
  (masked_lm_positions), padded per row to the batch's largest count.

  Args:
    model, params: fmjax.models.bert.BertForPreTraining and its parameters.
    input_ids: (B, T) int ids holding mask_id where a prediction is wanted.
    mask_id: the [MASK] id (tokenizer.token_to_id("[MASK]")).
    top_k: predictions per position.
    token_type_ids, attention_mask: (B, T), as BertEncoder takes them.
    tokenizer: optional; gives each predicted id its text (tokenizer.decode([id])).
  Returns:
    per row, per [MASK] in order, {"position": t, "ids": [k ints], "probs": [k floats,
    descending], "tokens": [k strings] (with a tokenizer)}.
  """
  input_ids = np.asarray(input_ids, np.int32)
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be (B, T); got shape {input_ids.shape}")
  if not 1 <= top_k <= model.config.vocab_size:
    raise ValueError(f"top_k={top_k} must be in [1, vocab_size={model.config.vocab_size}]")
  where = [np.flatnonzero(row == mask_id) for row in input_ids]
  for i, w in enumerate(where):
    if not len(w):
      raise ValueError(f"row {i} of input_ids has no [MASK] (id {mask_id}); put mask_id "
                       "where a prediction is wanted")
  positions = np.zeros((len(where), max(len(w) for w in where)), np.int32)
  for row, w in zip(positions, where):
    row[:len(w)] = w
  types = np.zeros_like(input_ids) if token_type_ids is None else np.asarray(token_type_ids)
  mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
  ids, probs = jax.device_get(_fill_mask_jit(params, input_ids, types, mask, positions,
                                             model=model, top_k=top_k))
  results = []
  for b, w in enumerate(where):
    row = []
    for p, t in enumerate(w):
      pred = {"position": int(t), "ids": ids[b, p].tolist(), "probs": probs[b, p].tolist()}
      if tokenizer is not None:
        pred["tokens"] = [tokenizer.decode([i]) for i in pred["ids"]]
      row.append(pred)
    results.append(row)
  return results
