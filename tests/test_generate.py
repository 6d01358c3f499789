"""Generation and fill-mask (fmjax/generate.py), the KV cache underneath, and train/sample.py.

Pinned: cached decoding == full recomputation step by step; greedy == argmax rollout; the
samplers' allowed sets and frequencies on a hand-made distribution; beam search on a
hand-made bigram model (greedy loses; the length penalty decides); stop tokens; a batch of
different-length prompts == each prompt alone; one compile per shape bucket; 8 simulated
devices == 1; greedy == transformers' generate on a golden GPT-2; fill-mask == a softmax by
hand; the sampling CLI's output and its one-line errors.

Run as a script (`python tests/test_generate.py --sharded`) it prints the sharded-vs-single
comparison as JSON: the test runs it in a subprocess with 8 simulated CPU devices.
"""

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

from fmjax import generate, sharding  # noqa: E402
from fmjax.models import bert, gpt  # noqa: E402
from fmjax.runtime import Runtime  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
HF_GPT2 = REPO / "tests" / "golden" / "hf" / "gpt2"


def tiny_gpt(scale=0.3, scan_layers=False, **overrides):
  """The tiny GPT with weights redrawn at `scale`: the default init (std 0.02) gives nearly
  uniform next-token distributions, so greedy would repeat one token; these make every
  choice depend on the context. 1-D parameters (norms, biases) keep their init."""
  c = gpt.get_config("tiny", **overrides)
  model = gpt.GPT(c, Runtime(attention_impl="xla", scan_layers=scan_layers))

  @jax.jit
  def init():
    params = nn.meta.unbox(model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32)))["params"]
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    return tree.unflatten([jax.random.normal(k, x.shape) * scale if x.ndim >= 2 else x
                           for k, x in zip(keys, leaves)])
  return model, init()


PROMPTS, N = [[1, 2, 3, 4, 5], [7, 8, 9]], 10  # most tests share these: one compile


def argmax_rollout(model, params, prompt, n):
  """Greedy decoding by full recomputation: the reference for the cached loop. The sequence
  sits at the start of a fixed 32-token buffer (causal: the zeros after it change nothing),
  so the jitted forward pass compiles once."""
  forward = jax.jit(lambda p, t: model.apply({"params": p}, t))
  buf = np.zeros((1, 32), np.int32)
  buf[0, :len(prompt)] = prompt
  for t in range(len(prompt), len(prompt) + n):
    buf[0, t] = int(jnp.argmax(forward(params, buf)[0, t - 1]))
  return buf[0, len(prompt):len(prompt) + n].tolist()


# ------------------------------------------------------------------------------ KV cache


@pytest.mark.parametrize("overrides", [
    {},  # GPT-2: learned positions, MHA
    {"position": "rope", "num_kv_heads": 2, "norm": "rms"},  # GQA, rotary
    {"num_kv_heads": 1, "scan_layers": True},  # MQA, scanned stack (stacked cache)
])
def test_cached_decoding_equals_full_recomputation(overrides):
  """Prefill a left-padded prompt, then feed one token at a time: at every step the last
  logits equal the full forward pass over the unpadded sequence (fp32, 1e-5)."""
  model, params = tiny_gpt(**overrides)
  seq = np.asarray([[5, 17, 3, 99, 42, 7, 250, 1, 64, 9, 33, 120],
                    [8, 8, 200, 13, 77, 2, 150, 61, 5, 44, 19, 230]], np.int32)
  full = np.asarray(jax.jit(model.apply)({"params": params}, seq))  # (2, 12, V)
  prompt_len, pad, new = (5, 3), 4, 7  # row 0: prompt 5, row 1: prompt 3 (+2 extra padding)
  T = prompt_len[0] + pad
  prompt = np.zeros((2, T), np.int32)
  for b, n in enumerate(prompt_len):
    prompt[b, T - n:] = seq[b, :n]
  lengths = np.asarray(prompt_len)
  kv_mask = np.arange(T + new)[None] >= (T - lengths)[:, None]
  positions = np.maximum(np.arange(T)[None] - (T - lengths)[:, None], 0)
  cache = model.init_cache(batch=2, length=T + new)
  decode = jax.jit(lambda *a, **k: model.apply({"params": params}, *a, method="decode", **k))
  logits, cache = decode(prompt, cache, index=0, positions=positions, kv_mask=kv_mask)
  for b, n in enumerate(prompt_len):
    np.testing.assert_allclose(logits[b], full[b, n - 1], atol=1e-5, rtol=0)
  for i in range(new):
    tok = np.asarray([seq[b, prompt_len[b] + i] for b in range(2)], np.int32)[:, None]
    logits, cache = decode(tok, cache, index=T + i, positions=(lengths + i)[:, None],
                           kv_mask=kv_mask)
    for b, n in enumerate(prompt_len):
      np.testing.assert_allclose(logits[b], full[b, n + i], atol=1e-5, rtol=0,
                                 err_msg=f"step {i} row {b}")


def test_cache_layout_mirrors_the_stack():
  c = gpt.get_config("tiny", num_kv_heads=2)
  cache = gpt.GPT(c).init_cache(batch=3, length=20)
  assert sorted(cache) == ["layer_0", "layer_1"]
  assert cache["layer_0"]["k"].shape == (3, 2, 20, 16)  # (B, K, S, H): no transposes per step
  scanned = gpt.GPT(gpt.get_config("tiny"), Runtime(scan_layers=True)).init_cache(batch=3,
                                                                                 length=20)
  assert scanned["layers"]["v"].shape == (2, 3, 4, 20, 16)  # (L, B, K, S, H)


# ------------------------------------------------------------------------------ greedy, batches


def test_greedy_equals_argmax_rollout():
  model, params = tiny_gpt()
  out = generate.generate(model, params, PROMPTS, max_new_tokens=N)
  for p, o in zip(PROMPTS, out):
    assert o == argmax_rollout(model, params, p, N)
  assert len(set(out[0])) > 3  # the weights are not degenerate


def test_mixed_length_batch_equals_each_prompt_alone():
  """Left padding is invisible: prompts of 3, 9 and 5 tokens (bucket 16 together, 8/16/8
  alone) give the same greedy tokens batched as alone, also with rotary positions."""
  for overrides in ({}, {"position": "rope"}):
    model, params = tiny_gpt(**overrides)
    prompts = [[11, 22, 33], [1, 2, 3, 4, 5, 6, 7, 8, 9], [200, 100, 50, 25, 12]]
    together = generate.generate(model, params, prompts, max_new_tokens=10)
    alone = [generate.generate(model, params, [p], max_new_tokens=10)[0] for p in prompts]
    assert together == alone


def test_stop_tokens_end_rows():
  model, params = tiny_gpt()
  prompts = PROMPTS
  free = generate.generate(model, params, prompts, max_new_tokens=N)
  stop = free[0][3]  # row 0 stops at its 4th token (or earlier if it appears before)
  first = [row.index(stop) + 1 if stop in row else N for row in free]
  out = generate.generate(model, params, prompts, max_new_tokens=N, stop_tokens=[stop])
  assert [len(o) for o in out] == first and first[0] <= 4
  for o, f in zip(out, free):
    assert o == f[:len(o)]
  # The jitted core pads after the stop and counts the stop token in the length.
  cfg = generate.GenerateConfig(max_new_tokens=N, stop_tokens=(stop,))
  res = jax.jit(lambda p, t, n: generate.generate_tokens(model, p, t, n, jax.random.key(0), cfg,
                                                         pad_id=-1))(
      params, jnp.asarray([[0, 0, 0, 1, 2, 3, 4, 5]]), jnp.asarray([5]))
  n = first[0]
  assert int(res.lengths[0]) == n and res.tokens[0, n - 1] == stop
  assert (np.asarray(res.tokens[0, n:]) == -1).all()


def test_all_rows_stopped_ends_the_loop_early():
  """Every row stops at its first token: the while loop ends and the rest is padding."""
  model, params = tiny_gpt()
  prompts = PROMPTS
  firsts = [o[0] for o in generate.generate(model, params, prompts, max_new_tokens=N)]
  out = generate.generate(model, params, prompts, max_new_tokens=30, stop_tokens=firsts)
  assert out == [[firsts[0]], [firsts[1]]]


# ------------------------------------------------------------------------------ sampling


PROBS = np.asarray([0.4, 0.3, 0.15, 0.1, 0.05])  # a controlled next-token distribution


def _draws(n=4000, **kw):
  logits = jnp.log(jnp.tile(jnp.asarray(PROBS, jnp.float32), (n, 1)))
  return np.asarray(generate.select_tokens(logits, jax.random.key(0), **kw))


@pytest.mark.parametrize("kw,allowed", [
    ({"top_k": 2}, [0, 1]),
    ({"top_p": 0.6}, [0, 1]),  # 0.4 < 0.6 so token 1 is needed; 0.7 >= 0.6 stops there
    ({"top_p": 0.75}, [0, 1, 2]),
    ({"top_p": 0.3}, [0]),  # the most likely token is always kept
    ({"top_k": 4, "top_p": 0.8}, [0, 1, 2]),  # top_k first, then the nucleus of what is left
    ({}, [0, 1, 2, 3, 4]),
])
def test_top_k_top_p_stay_in_the_allowed_set_with_renormalised_frequencies(kw, allowed):
  draws = _draws(temperature=1.0, **kw)
  assert set(draws.tolist()) == set(allowed)
  expected = PROBS[allowed] / PROBS[allowed].sum()
  freq = np.bincount(draws, minlength=5)[allowed] / len(draws)
  np.testing.assert_allclose(freq, expected, atol=0.025)  # ~3 standard errors at n=4000


def test_temperature_sharpens_and_zero_is_greedy():
  draws = _draws(temperature=0.5)
  sharpened = PROBS ** 2 / (PROBS ** 2).sum()  # softmax(log p / 0.5)
  np.testing.assert_allclose(np.bincount(draws, minlength=5) / len(draws), sharpened,
                             atol=0.025)
  assert (_draws(n=10, temperature=0.0) == 0).all()


def test_seeds_repeat_and_differ():
  model, params = tiny_gpt()
  kw = dict(max_new_tokens=12, temperature=1.0, top_k=20)
  a = generate.generate(model, params, [[1, 2, 3]], seed=1, **kw)
  assert a == generate.generate(model, params, [[1, 2, 3]], seed=1, **kw)
  assert a != generate.generate(model, params, [[1, 2, 3]], seed=2, **kw)


def test_bad_settings_are_clear_errors():
  with pytest.raises(ValueError, match=r"top_p=1.5 must be in \(0, 1\]"):
    generate.GenerateConfig(max_new_tokens=4, top_p=1.5)
  with pytest.raises(ValueError, match="num_beams=3 is deterministic beam search"):
    generate.GenerateConfig(max_new_tokens=4, num_beams=3, temperature=0.7)
  model, params = tiny_gpt()
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    generate.generate(model, params, [[1], []], max_new_tokens=3)
  with pytest.raises(ValueError, match="needs 70 positions but the model has max_len=64"):
    generate.generate(model, params, [[1] * 10], max_new_tokens=60)


# ------------------------------------------------------------------------------ beam search


class BigramLM(nn.Module):
  """A hand-made model: next-token log-probs depend only on the last token (table (V, V)).
  It speaks the decode interface; its 'cache' is a dummy (B, K, S, H) buffer."""
  log_probs: tuple

  def init_cache(self, *, batch, length):
    return {"k": jnp.zeros((batch, 1, length, 1))}

  @nn.compact
  def decode(self, tokens, cache, *, index, positions, kv_mask):
    table = jnp.asarray(self.log_probs, jnp.float32)
    return table[tokens[:, -1]], cache


def bigram(rows):
  """Row r: the next-token distribution after token r (zeros become a tiny probability)."""
  p = np.asarray(rows, np.float64) + 1e-9
  return BigramLM(tuple(map(tuple, np.log(p / p.sum(1, keepdims=True)).tolist())))


def beam(model, config, prompt=(0,)):
  out = generate.generate_tokens(model, {}, jnp.asarray([list(prompt)], jnp.int32),
                                 jnp.asarray([len(prompt)]), jax.random.key(0), config)
  return np.asarray(out.tokens[0, :int(out.lengths[0])]).tolist(), float(out.scores[0])


def test_beam_search_finds_the_sequence_greedy_misses():
  # From 0: 1 (0.5) or 2 (0.4). After 1 everything is flat (0.25); after 2, 3 is 0.9.
  # Greedy: 0 -> 1 -> any, p = 0.125. Best two-step path: 0 -> 2 -> 3, p = 0.36.
  m = bigram([[0, 0.5, 0.4, 0.1], [0.25] * 4, [0, 0.05, 0.05, 0.9], [0.25] * 4])
  greedy = generate.generate(m, {}, [[0]], max_new_tokens=2)[0]
  assert greedy[0] == 1
  tokens, score = beam(m, generate.GenerateConfig(max_new_tokens=2, num_beams=2))
  assert tokens == [2, 3]
  np.testing.assert_allclose(score, np.log(0.36) / 2, rtol=1e-6)  # length_penalty 1
  # Exhaustively: no 2-token sequence scores higher.
  lp = np.asarray(m.log_probs)
  best = max(((a, b) for a in range(4) for b in range(4)), key=lambda s: lp[0, s[0]] + lp[s[0], s[1]])
  assert list(best) == tokens


@pytest.mark.parametrize("length_penalty,expected", [(1.0, [1, 3]), (0.0, [3])])
def test_beam_search_length_penalty_decides_between_finished_hypotheses(length_penalty, expected):
  # Stop token 3. From 0: stop at once (0.5) or 1 (0.45); after 1, stop (0.9).
  # [3]: log 0.5 = -0.693 / 1.  [1, 3]: log 0.405 = -0.904, / 2 = -0.452 with penalty 1.
  m = bigram([[0, 0.45, 0.05, 0.5], [0, 0.05, 0.05, 0.9], [0.25] * 4, [0.25] * 4])
  cfg = generate.GenerateConfig(max_new_tokens=6, num_beams=2, stop_tokens=(3,),
                                length_penalty=length_penalty)
  tokens, score = beam(m, cfg)
  assert tokens == expected
  want = {1.0: np.log(0.405) / 2, 0.0: np.log(0.5)}[length_penalty]
  np.testing.assert_allclose(score, want, rtol=1e-6)


def test_beam_width_1_equals_greedy():
  model, params = tiny_gpt()
  greedy = generate.generate(model, params, PROMPTS, max_new_tokens=N)
  prompt = np.asarray([[0, 0, 0, 1, 2, 3, 4, 5], [0] * 5 + [7, 8, 9]], np.int32)
  cfg = generate.GenerateConfig(max_new_tokens=N, num_beams=1)
  out = jax.jit(lambda p, t, n: generate.beam_search(model, p, t, n, cfg))(
      params, prompt, np.asarray([5, 3]))
  assert np.asarray(out.tokens).tolist() == greedy


def test_beam_search_on_gpt_beats_greedy_log_prob():
  """Width 4 finds a continuation at least as likely as greedy's (scored by the model)."""
  model, params = tiny_gpt()
  prompt, n = PROMPTS[0], N

  def log_prob(new):
    logits = model.apply({"params": params}, jnp.asarray([prompt + new]))[0]
    lp = jax.nn.log_softmax(logits, -1)
    return float(sum(lp[len(prompt) - 1 + i, t] for i, t in enumerate(new)))

  greedy = generate.generate(model, params, PROMPTS, max_new_tokens=n)[0]
  beamed = generate.generate(model, params, PROMPTS, max_new_tokens=n, num_beams=4)[0]
  assert len(beamed) == n and log_prob(beamed) >= log_prob(greedy) - 1e-5


# ------------------------------------------------------------------------------ compile once


def test_compiles_once_per_shape_bucket():
  model, params = tiny_gpt()
  kw = dict(max_new_tokens=6, temperature=0.8, top_k=10)
  generate.generate(model, params, [[1, 2, 3, 4, 5], [6, 7]], seed=0, **kw)
  before = generate._generate_jit._cache_size()
  # Other prompts (lengths 7 and 1: still bucket 8), another seed: nothing compiles.
  generate.generate(model, params, [[9] * 7, [4]], seed=1, **kw)
  generate.generate(model, params, [[3, 1, 4], [1, 5, 9, 2, 6]], seed=2, **kw)
  assert generate._generate_jit._cache_size() == before
  generate.generate(model, params, [[1] * 9, [2]], seed=0, **kw)  # bucket 16: one more
  assert generate._generate_jit._cache_size() == before + 1
  assert generate.bucket_length(1) == 8 and generate.bucket_length(9) == 16
  assert generate.bucket_length(64) == 64


# ------------------------------------------------------------------------------ sharding


def sharded_results():
  """Tokens of greedy, sampled and beam generation on one device and on 8 (fsdp_tp and dp)."""
  model, params = tiny_gpt(num_kv_heads=2)
  prompts = [[1, 2, 3, 4, 5], [7, 8, 9], [100, 50, 25, 12, 6, 3, 1, 0, 42], [5] * 4, [9, 9]]
  settings = {"greedy": {}, "sampled": {"temperature": 0.9, "top_k": 30, "top_p": 0.9},
              "beam": {"num_beams": 3}}
  out = {"single": {k: generate.generate(model, params, prompts, max_new_tokens=8, seed=3, **s)
                    for k, s in settings.items()}}
  host_params = jax.device_get(params)
  for name, sizes in (("fsdp_tp", {"data": 2, "fsdp": 2, "tensor": 2}), ("dp", {"data": 8})):
    mesh = sharding.make_mesh(sizes)
    rules = sharding.get_rules(name)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32)))
    shardings = sharding.shardings_of(abstract, mesh, rules)["params"]
    placed = jax.device_put(host_params, shardings)
    out[name] = {k: generate.generate(model, placed, prompts, max_new_tokens=8, seed=3, mesh=mesh,
                                      rules=rules, **s) for k, s in settings.items()}
    out[name]["wte_spec"] = str(placed["wte"]["embedding"].sharding.spec)
  out["devices"] = jax.device_count()
  return out


@pytest.fixture(scope="module")
def sharded():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, __file__, "--sharded"], env=env, capture_output=True,
                        text=True, timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("rules", ["fsdp_tp", "dp"])
def test_sharded_generation_equals_one_device(sharded, rules):
  assert sharded["devices"] == 8
  for kind in ("greedy", "sampled", "beam"):
    assert sharded[rules][kind] == sharded["single"][kind], kind
  if rules == "fsdp_tp":
    assert sharded[rules]["wte_spec"] == "P('tensor', 'fsdp')"  # really split


# ------------------------------------------------------------------------------ HF golden


def test_greedy_tokens_equal_transformers_generate():
  """A tiny random GPT-2 (tests/golden/hf/gpt2): greedy tokens == HF generate(do_sample=False,
  max_new_tokens=12), which does not stop at EOS there."""
  hf = pytest.importorskip("fmjax.hf", reason="fmjax.hf (Hugging Face interop) not present")
  if not (HF_GPT2 / "reference.npz").exists():
    pytest.skip(f"golden {HF_GPT2 / 'reference.npz'} not present")
  ref = np.load(HF_GPT2 / "reference.npz")
  if "greedy_prompt" not in ref:
    pytest.skip("the golden has no greedy_prompt / greedy_tokens")
  model, variables = hf.from_pretrained(HF_GPT2, runtime=Runtime(attention_impl="xla"))
  prompt, expected = ref["greedy_prompt"], ref["greedy_tokens"]
  n = expected.shape[1] - prompt.shape[1]
  out = generate.generate(model, variables["params"], prompt.tolist(), max_new_tokens=n)
  np.testing.assert_array_equal(np.asarray(out), expected[:, prompt.shape[1]:])


# ------------------------------------------------------------------------------ fill-mask


def test_fill_mask_top_k_equals_softmax_by_hand():
  c = bert.get_config("tiny")
  model = bert.BertForPreTraining(c)
  ids = np.asarray([[2, 10, 4, 11, 12, 4, 3, 0], [2, 20, 21, 4, 3, 0, 0, 0]], np.int32)
  mask_id = 4
  attention = (ids != 0).astype(np.int32)
  params = nn.meta.unbox(model.init(jax.random.key(0), ids, None, attention)["params"])

  class Tok:
    def decode(self, ids):
      return "".join(f"<{i}>" for i in ids)

  got = generate.fill_mask(model, params, ids, mask_id=mask_id, top_k=3,
                           attention_mask=attention, tokenizer=Tok())
  full = model.apply({"params": params}, ids, None, attention)["mlm_logits"]  # all T positions
  probs = np.asarray(jax.nn.softmax(full, -1))
  assert [[p["position"] for p in row] for row in got] == [[2, 5], [3]]
  for b, row in enumerate(got):
    for pred in row:
      want = np.argsort(-probs[b, pred["position"]])[:3]
      assert pred["ids"] == want.tolist()
      np.testing.assert_allclose(pred["probs"], probs[b, pred["position"], want], rtol=1e-5)
      assert pred["tokens"] == [f"<{i}>" for i in want]
  with pytest.raises(ValueError, match="row 0 of input_ids has no \\[MASK\\]"):
    generate.fill_mask(model, params, ids[:, :2], mask_id=mask_id)


# ------------------------------------------------------------------------------ the CLI


def _run(*args, cwd=REPO):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "FMJAX_DEBUG")}
  env.update(JAX_PLATFORMS="cpu", FMJAX_CPU_DEVICES="1")
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=600)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A pretrain_gpt tiny workdir (10 steps, no sample)."""
  wd = tmp_path_factory.mktemp("gpt")
  proc = _run("-m", "train.pretrain_gpt", "--config=configs/gpt.py:tiny", f"--workdir={wd}",
              "--config.train.steps=10", "--config.sample.num_tokens=0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return wd


@pytest.mark.slow
def test_sample_cli_prints_prompt_and_completion(workdir):
  chars = set(json.loads((workdir / "tokenizer" / "fmjax_tokenizer.json").read_text())["chars"])
  runs = {}
  for extra in ([], ["--num_beams=2"], ["--temperature=0"]):
    proc = _run("-m", "train.sample", f"--workdir={workdir}", "--prompt=ROMEO:",
                "--max_new_tokens=50", *extra)  # 50 > the 32-token context: two chunks
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout.rstrip("\n")
    assert text.startswith("ROMEO:") and 0 < len(text) - 6 <= 50
    assert set(text) <= chars | {"\n"}
    runs[tuple(extra)] = text
  again = _run("-m", "train.sample", f"--workdir={workdir}", "--prompt=ROMEO:",
               "--max_new_tokens=50")
  assert again.stdout.rstrip("\n") == runs[()]  # seeded


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["--prompt="], "error: --prompt is empty"),
    (["--prompt=ROMEO€"], "error: --prompt='ROMEO€': the char tokenizer of "),
    (["--prompt=ROMEO", "--top_p=0"], "error: top_p=0.0 must be in (0, 1]"),
])
def test_sample_cli_bad_input_is_one_error_line(workdir, args, message):
  proc = _run("-m", "train.sample", f"--workdir={workdir}", *args)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and \
      proc.stderr.startswith(message), proc.stderr


def test_sample_cli_without_checkpoint(tmp_path):
  proc = _run("-m", "train.sample", f"--workdir={tmp_path}", "--prompt=ROMEO:")
  assert proc.returncode == 2
  assert proc.stderr.strip() == (f"error: no checkpoint in {tmp_path}/checkpoints; train one "
                                 f"first with python -m train.pretrain_gpt --config=... "
                                 f"--workdir={tmp_path}")


if __name__ == "__main__":
  if sys.argv[1:] == ["--sharded"]:
    print(json.dumps(sharded_results()))
