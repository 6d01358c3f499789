"""Sliding-window layers decode with a window-sized KV cache (a ring buffer).

Pinned: the ring's slot arithmetic by hand; cached attention over keys in ring order equals
a float64 naive reference; the cache's leaf shapes (local layers min(window, S) entries,
global ones S; a scanned Mistral stacks them, a scanned Gemma is refused); the logits of a
prefill longer and shorter than the window and of every decoding step equal the full forward
pass (Mistral scanned, Gemma 2, Gemma 3); greedy, sampled and beam-search tokens of
`generate` (and `stream`) equal the full-length cache's and a recomputation without any
cache, on left-padded batches whose prompts are longer and shorter than the window; the
bytes saved on Gemma 3 1B at S = 4096; on 8 simulated devices (fsdp_tp) the ring keeps the
cache's logical axes (CACHE_AXES) and the logits of one device.

Run as a script (`python tests/test_ring_cache.py --sharded`) it prints the sharded-vs-single
comparison as JSON: the test runs it in a subprocess with 8 simulated CPU devices.
"""

import dataclasses
import functools
import json
import os
import pathlib
import subprocess
import sys

if __name__ == "__main__":  # the subprocess: devices must be set before jax is imported
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  os.environ["JAX_PLATFORMS"] = "cpu"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fmjax import attention, generate, sharding, transformer  # noqa: E402
from fmjax.layers import Rope  # noqa: E402
from fmjax.models import decoder  # noqa: E402
from fmjax.models.decoder import Decoder, Gemma, LocalLayers  # noqa: E402
from fmjax.runtime import Runtime  # noqa: E402
from fmjax.transformer import AttentionOptions  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]

_BASE = dict(vocab_size=256, max_len=128, embed_dim=64, mlp_dim=128, num_heads=4,
             num_kv_heads=2)
CONFIGS = {
    # Mistral: every layer slides (a scanned stack of equal layers).
    "mistral": decoder.DecoderConfig(family="mistral", num_layers=2,
                                     local=LocalLayers(window=4, layers=(0, 1)), **_BASE),
    # Gemma 2: local and global layers alternate; attention and final soft-capping.
    "gemma2": decoder.DecoderConfig(
        family="gemma2", num_layers=2, head_dim=16, norm_eps=1e-6, mlp_activation="gelu_tanh",
        attention=AttentionOptions(scale=16 ** -0.5, softcap=5.0),
        local=LocalLayers(window=16, layers=(0,)),
        gemma=Gemma(sandwich_norms=True, final_softcap=10.0), **_BASE),
    # Gemma 3: two local layers (their own rotary base) before a global one, q/k norms. Both
    # Gemmas untied here: random tied embeddings make greedy repeat the last token.
    "gemma3": dataclasses.replace(decoder.get_config("gemma3_tiny"), tie_embeddings=False,
                                  local=LocalLayers(window=5, layers=(0, 1), rope=Rope(1e4))),
}


@functools.lru_cache(maxsize=None)
def make(name, scan_layers=False, scale=0.3):
  """A tiny model of CONFIGS[name] with random weights drawn in numpy (no compilation):
  matrices at std `scale` (the default init's 0.02 gives nearly uniform next-token
  distributions: greedy would repeat one token), norm scales near their identity."""
  c = CONFIGS[name]
  model = Decoder(c, Runtime(attention_impl="xla", scan_layers=scan_layers))
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                        jnp.zeros((1, 8), jnp.int32))["params"])
  rng = np.random.default_rng(2)
  one = 0.0 if c.gemma else 1.0  # Gemma's RMSNorm applies (1 + w)

  def draw(path, x):
    if getattr(path[-1], "key", None) == "scale":  # a norm
      return jnp.asarray(one + 0.1 * rng.normal(size=x.shape), jnp.float32)
    return jnp.asarray(rng.normal(size=x.shape) * scale, jnp.float32)
  return model, jax.tree_util.tree_map_with_path(draw, shapes)


@functools.lru_cache(maxsize=None)
def forward(name, scan_layers=False):
  """The jitted full forward pass (no cache) of make(name): logits of a (B, 32) buffer."""
  model, params = make(name, scan_layers)
  return jax.jit(lambda t: model.apply({"params": params}, t))


class FullCacheDecoder(Decoder):
  """The same model with every layer keeping all S slots (nothing is ever overwritten)."""

  def init_cache(self, *, batch: int, length: int):
    """Every layer's cache S slots long (see Decoder.init_cache).

    Args:
      batch: B.
      length: S.

    Returns:
      {"layer_i": {"k", "v"}} of (B, K, S, H) zeros (stacked when scanned).
    """
    blocks = tuple(dataclasses.replace(b, attention=dataclasses.replace(b.attention, window=None))
                   for b in self.config.blocks(self.runtime))
    return transformer.init_cache(blocks, self.config.num_layers, batch=batch, length=length,
                                  scan=self.runtime.scan_layers)


def leaf_shapes(cache):
  return {"/".join(str(getattr(k, "key", k)) for k in path): x.shape
          for path, x in jax.tree_util.tree_leaves_with_path(cache)}


# ------------------------------------------------------------------------------ the ring


def test_ring_slots_by_hand():
  assert attention.ring_slots(0, 4).tolist() == [-4, -3, -2, -1]  # empty
  assert attention.ring_slots(2, 4).tolist() == [0, 1, -2, -1]  # two written
  assert attention.ring_slots(6, 4).tolist() == [4, 5, 2, 3]  # slots 2..5, 4 and 5 wrapped
  assert attention.ring_slots(9, 4).tolist() == [8, 5, 6, 7]
  assert attention.ring_slots(3, 3).tolist() == [0, 1, 2]
  assert jax.jit(attention.ring_slots, static_argnums=1)(jnp.int32(13), 5).tolist() == \
      [10, 11, 12, 8, 9]


def test_cached_attention_over_a_ring_equals_naive_reference():
  """Keys in ring order (entry r holds slot ring_slots[r]), two empty entries, padding and a
  window: the same numbers as a float64 softmax over the keys in slot order."""
  rng = np.random.default_rng(0)
  B, N, K, H, window, index, W, T = 2, 4, 2, 8, 4, 3, 4, 2
  slots = np.concatenate([np.asarray(attention.ring_slots(index, W)), index + np.arange(T)])
  assert slots.tolist() == [0, 1, 2, -1, 3, 4]
  q = rng.normal(size=(B, T, N, H)).astype(np.float32)
  k, v = (rng.normal(size=(B, K, W + T, H)).astype(np.float32) for _ in range(2))
  pad = np.asarray([[True] * 8, [False] * 2 + [True] * 6])  # (B, S): row 1 pads slots 0, 1
  kv_mask = pad[:, np.maximum(slots, 0)]
  scale, cap = 0.6, 3.0
  got = attention.cached_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                   q_slots=slots[None, W:], kv_slots=slots[None],
                                   kv_mask=kv_mask, scale=scale, window=window, softcap=cap)
  want = np.zeros((B, T, N, H))
  for b in range(B):
    for t in range(T):
      qs = index + t
      ok = [s >= 0 and s <= qs and qs - s < window and pad[b, s] for s in slots]
      for n in range(N):
        kk = n // (N // K)
        logits = cap * np.tanh(k[b, kk].astype(np.float64) @ q[b, t, n] * scale / cap)
        p = np.exp(np.where(ok, logits, -np.inf) - logits[ok].max())
        want[b, t, n] = (p / p.sum()) @ v[b, kk]
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)
  # Query slot 4, row 1, window 4: slots 1..4 minus padded 1 minus the empty entry -> 2, 3, 4.
  ok = [s >= 0 and s <= 4 and 4 - s < window and pad[1, s] for s in slots]
  assert np.flatnonzero(ok).tolist() == [2, 4, 5]


def test_cache_shapes_are_window_sized_for_local_layers():
  g3 = Decoder(CONFIGS["gemma3"])  # window 5, layers 0 and 1 local, 2 global; K 2, H 32
  assert leaf_shapes(g3.init_cache(batch=3, length=40)) == {
      "layer_0/k": (3, 2, 5, 32), "layer_0/v": (3, 2, 5, 32),
      "layer_1/k": (3, 2, 5, 32), "layer_1/v": (3, 2, 5, 32),
      "layer_2/k": (3, 2, 40, 32), "layer_2/v": (3, 2, 40, 32)}
  short = leaf_shapes(g3.init_cache(batch=1, length=3))  # S < window: S entries
  assert {s[2] for s in short.values()} == {3}
  g2 = leaf_shapes(Decoder(CONFIGS["gemma2"]).init_cache(batch=2, length=20))  # window 16
  assert g2["layer_0/k"] == (2, 2, 16, 16) and g2["layer_1/k"] == (2, 2, 20, 16)
  mistral = Decoder(CONFIGS["mistral"], Runtime(scan_layers=True))
  assert leaf_shapes(mistral.init_cache(batch=2, length=30)) == {
      "layers/k": (2, 2, 2, 4, 16), "layers/v": (2, 2, 2, 4, 16)}  # (L, B, K, W, H)
  with pytest.raises(ValueError, match="scanned stack keeps one cache length.*use "
                                       "scan_layers=False"):
    Decoder(CONFIGS["gemma3"], Runtime(scan_layers=True)).init_cache(batch=1, length=40)
  assert transformer.cache_length(Decoder(CONFIGS["gemma3"]).config.blocks(Runtime())[0], 99) == 5


def test_gemma3_1b_cache_bytes_at_4096():
  """Gemma 3 1B (26 layers, 22 local with window 512, one kv head of 256): fp32 cache of one
  row at S = 4096 shrinks from 26 * 4096 slots to 4 * 4096 + 22 * 512."""
  model = Decoder(decoder.get_config("gemma3_1b"))
  nbytes = lambda cache: sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache))
  ring = nbytes(jax.eval_shape(lambda: model.init_cache(batch=1, length=4096)))
  full = nbytes(jax.eval_shape(lambda: FullCacheDecoder(model.config).init_cache(batch=1,
                                                                                 length=4096)))
  per_slot = 2 * 1 * 256 * 4  # k and v, K = 1, H = 256, float32
  assert full == 26 * 4096 * per_slot == 218_103_808
  assert ring == (4 * 4096 + 22 * 512) * per_slot == 56_623_104


def test_a_cache_shorter_than_the_window_is_refused():
  model = Decoder(CONFIGS["mistral"])
  params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                        jnp.zeros((1, 8), jnp.int32))["params"])
  small = jax.tree_util.tree_map(lambda x: x[:, :, :3], model.init_cache(batch=1, length=10))
  with pytest.raises(ValueError, match="KV cache has 3 entries, but its window of 4 over 10 "
                                       "slots needs min"):
    jax.eval_shape(lambda p, c: model.apply({"params": p}, jnp.zeros((1, 8), jnp.int32), c,
                                            index=0, positions=jnp.zeros((1, 8), jnp.int32),
                                            kv_mask=jnp.ones((1, 10), bool), method="decode"),
                   params, small)


# ------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("name,scan,prefill", [
    ("gemma2", False, 12),  # window 16: a prefill inside the ring, which wraps while decoding
    ("gemma3", False, 12),  # window 5 on layers 0 and 1 (the prefill overflows it), global 2
])  # Mistral (scanned, window 4): its tokens below, its goldens in tests/test_decoders.py
def test_decoding_logits_equal_the_forward_pass(name, scan, prefill):
  """A left-padded batch (prompts of 11 and 3 tokens: longer and shorter than the window):
  the prefill's and every decoding step's logits over the ring equal the forward pass over
  the unpadded sequence (fp32, within 1e-5 of the largest logit: the
  float32 noise of another summation order is 3e-6 of it, a wrong mask changes logits by
  percents)."""
  model, params = make(name, scan)
  seq = np.random.default_rng(3).integers(1, 256, size=(2, 32)).astype(np.int32)
  full = np.asarray(forward(name, scan)(seq))  # (2, 32, Vp)
  lengths, new, T = np.asarray([11, 3]), 9, prefill
  prompt = np.zeros((2, T), np.int32)
  for b, n in enumerate(lengths):
    prompt[b, T - n:] = seq[b, :n]
  kv_mask = np.arange(T + new)[None] >= (T - lengths)[:, None]
  positions = np.maximum(np.arange(T)[None] - (T - lengths)[:, None], 0)
  cache = model.init_cache(batch=2, length=T + new)
  shapes = leaf_shapes(cache)
  window = CONFIGS[name].local.window
  assert min(s[-2] for s in shapes.values()) == min(window, T + new)
  decode = jax.jit(lambda *a, **k: model.apply({"params": params}, *a, method="decode", **k))

  def check(logits, step, want):
    for b in range(2):
      np.testing.assert_allclose(logits[b], want[b], atol=1e-5 * np.abs(want[b]).max(), rtol=0,
                                 err_msg=f"step {step} row {b}")

  logits, cache = decode(prompt, cache, index=0, positions=positions, kv_mask=kv_mask)
  check(logits, "prefill", [full[b, n - 1] for b, n in enumerate(lengths)])
  for i in range(new):
    tok = np.asarray([seq[b, lengths[b] + i] for b in range(2)], np.int32)[:, None]
    logits, cache = decode(tok, cache, index=T + i, positions=(lengths + i)[:, None],
                           kv_mask=kv_mask)
    check(logits, i, [full[b, n + i] for b, n in enumerate(lengths)])
  assert leaf_shapes(cache) == shapes  # still window-sized


def recomputed(name, scan, prompts, n, *, seed=0, **settings):
  """`generate`'s token choice from logits recomputed without any cache: each step runs the
  full forward pass over every row's unpadded text so far (at the start of a 32-token buffer:
  causal, the zeros after it change nothing) and picks all rows' tokens together, as the
  cached loop does (the same rng per step)."""
  rows = [list(p) for p in prompts]
  key = jax.random.key(seed)
  select = jax.jit(functools.partial(generate.select_tokens, **settings))
  for i in range(n):
    buf = np.zeros((len(rows), 32), np.int32)
    for b, r in enumerate(rows):
      buf[b, :len(r)] = r
    logits = np.asarray(forward(name, scan)(buf))[np.arange(len(rows)),
                                                  [len(r) - 1 for r in rows]]
    tok = select(logits, jax.random.fold_in(key, i))
    for r, t in zip(rows, np.asarray(tok).tolist()):
      r.append(t)
  return [r[len(p):] for r, p in zip(rows, prompts)]


PROMPTS = [[5, 17, 3, 99, 42, 7, 250, 1, 64, 9, 33], [8, 200, 13]]  # 11 and 3: bucket 16
SETTINGS = {"greedy": {}, "sampled": dict(temperature=1.0, top_k=20)}
NEW = 12


@functools.lru_cache(maxsize=None)
def generated(name, scan):
  """{kind: {"ring"|"full": B lists of new tokens}} of generate_tokens on PROMPTS (left-padded
  to 16 slots, 12 new: 28 > every window), greedy and sampled, in one compilation."""
  model, params = make(name, scan)
  full_model = FullCacheDecoder(model.config, model.runtime)
  prompt = np.zeros((2, 16), np.int32)
  for row, p in zip(prompt, PROMPTS):
    row[16 - len(p):] = p
  lengths = np.asarray([len(p) for p in PROMPTS], np.int32)

  @jax.jit
  def run():
    return {kind: {m_name: generate.generate_tokens(
        m, params, prompt, lengths, jax.random.key(4),
        generate.GenerateConfig(max_new_tokens=NEW, **s)).tokens
                   for m_name, m in (("ring", model), ("full", full_model))}
            for kind, s in SETTINGS.items()}
  return jax.tree_util.tree_map(lambda x: np.asarray(x).tolist(), run())


@pytest.mark.parametrize("name,scan", [("mistral", True), ("gemma3", False)])
def test_generate_equals_the_full_cache_and_recomputation(name, scan):
  """Greedy and sampled tokens: ring == every layer's full cache == no cache at all (Gemma 2:
  beam search below; greedy for every family against transformers: tests/test_decoders.py)."""
  out = generated(name, scan)
  for kind, settings in SETTINGS.items():
    assert out[kind]["ring"] == out[kind]["full"], kind
    assert out[kind]["ring"] == recomputed(name, scan, PROMPTS, NEW, seed=4, **settings), kind
    assert all(len(set(r)) > 3 for r in out[kind]["ring"]), out[kind]  # not degenerate


def test_beam_search_and_stream_over_the_ring():
  """Beam search reorders the ring's rows (_cache_take): each row's best hypothesis scores
  the mean of its tokens' log-probabilities recomputed without a cache (length penalty 1);
  `stream` (one jitted step per token, the ring donated) yields the recomputed tokens."""
  model, params = make("gemma2")
  prompt = np.zeros((2, 16), np.int32)
  for row, p in zip(prompt, PROMPTS):
    row[16 - len(p):] = p
  out = jax.jit(lambda: generate.beam_search(
      model, params, prompt, np.asarray([11, 3]),
      generate.GenerateConfig(max_new_tokens=NEW, num_beams=3)))()
  buf = np.zeros((2, 32), np.int32)  # both rows' texts, through the full forward pass
  for b, p in enumerate(PROMPTS):
    buf[b, :len(p) + NEW] = p + out.tokens[b].tolist()
  logp = np.asarray(jax.nn.log_softmax(forward("gemma2")(buf), -1))  # (2, 32, Vp)
  for b, p in enumerate(PROMPTS):
    assert int(out.lengths[b]) == NEW  # no stop tokens: every hypothesis runs to the end
    want = sum(logp[b, len(p) - 1 + i, buf[b, len(p) + i]] for i in range(NEW)) / NEW
    np.testing.assert_allclose(float(out.scores[b]), want, rtol=1e-5)
  want = recomputed("gemma2", False, PROMPTS, NEW)[0]  # greedy: the same alone as batched
  assert list(generate.stream(model, params, PROMPTS[0], max_new_tokens=NEW)) == want


# ------------------------------------------------------------------------------ sharding


def sharded_results():
  """A Gemma 3 prefill (16 slots > the window of 5) and one greedy decoding step on a
  (data 2, fsdp 2, tensor 2) mesh: the logits, the tokens and each cache leaf's shape and
  whether its sharding is CACHE_AXES' under fsdp_tp."""
  model, params = make("gemma3")
  prompts = PROMPTS * 2  # 4 rows: the batch splits over data x fsdp
  prompt = np.zeros((4, 16), np.int32)
  for row, p in zip(prompt, prompts):
    row[16 - len(p):] = p
  lengths = np.asarray([len(p) for p in prompts], np.int32)

  @jax.jit
  def run(params, prompt, lengths):  # the prefill, then the greedy token's decoding step
    logits, cache, kv_mask, lengths = generate._prefill(model, params, prompt, lengths, NEW)
    tok = jnp.argmax(logits, -1).astype(jnp.int32)
    step, cache = model.apply({"params": params}, tok[:, None], cache, index=16,
                              positions=lengths[:, None], kv_mask=kv_mask, method="decode")
    return logits, tok, step, cache

  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  placed = jax.device_put(params, sharding.shardings_of(abstract, mesh, "fsdp_tp")["params"])
  with sharding.context(mesh, "fsdp_tp"):
    logits, tok, step, cache = run(placed, jax.device_put(prompt, sharding.batch_sharding(mesh)),
                                   jax.device_put(lengths, sharding.batch_sharding(mesh)))
  want = jax.sharding.NamedSharding(mesh, sharding.logical_to_mesh(
      jax.sharding.PartitionSpec(*transformer.CACHE_AXES), "fsdp_tp"))
  return {"devices": jax.device_count(), "logits": np.asarray(logits).tolist(),
          "tokens": np.asarray(tok).tolist(), "step": np.asarray(step).tolist(),
          "cache": {path: [list(x.shape), x.sharding.is_equivalent_to(want, x.ndim)]
                    for path, x in zip(leaf_shapes(cache), jax.tree_util.tree_leaves(cache))},
          "spec": str(want.spec)}


def test_sharded_ring_keeps_the_cache_axes_and_the_logits():
  """8 simulated devices, fsdp_tp: the rings and the global cache split as CACHE_AXES say
  (batch over data x fsdp, kv heads over tensor), and the prefill's and the next step's
  logits equal the forward pass without a cache on one device."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, __file__, "--sharded"], env=env, capture_output=True,
                        text=True, timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == 8
  assert out["spec"] == "P(('data', 'fsdp'), 'tensor', None, None)"
  assert out["cache"] == {f"layer_{i}/{n}": [[4, 2, 5 if i < 2 else 28, 32], True]
                          for i in range(3) for n in ("k", "v")}  # the rings too
  buf = np.zeros((2, 32), np.int32)
  for b, p in enumerate(PROMPTS):
    buf[b, :len(p) + 1] = p + [out["tokens"][b]]
  full = np.asarray(forward("gemma3")(buf))
  for b, p in enumerate(PROMPTS * 2):
    for got, want in ((out["logits"][b], full[b % 2, len(p) - 1]),
                      (out["step"][b], full[b % 2, len(p)])):
      np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)
  assert out["tokens"][:2] == out["tokens"][2:]


if __name__ == "__main__":
  if sys.argv[1:] == ["--sharded"]:
    print(json.dumps(sharded_results()))
