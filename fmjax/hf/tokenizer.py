"""Hugging Face tokenizers (the `tokenizers` library) behind fmjax's Tokenizer interface.

`tokenizer_from_pretrained(directory)` reads a Hugging Face tokenizer directory:
tokenizer.json (any model the `tokenizers` library runs: byte-level BPE as in GPT-2, Llama 3,
Qwen and SmolLM; SentencePiece-style BPE with byte fallback as in Llama 2, Mistral and Gemma;
WordPiece; Unigram), else a WordPiece vocab.txt (BERT; do_lower_case, strip_accents and
tokenize_chinese_chars from tokenizer_config.json), else a byte-level BPE vocab.json +
merges.txt (GPT-2). The special tokens come from tokenizer_config.json /
special_tokens_map.json: EOS is eos_token, else BERT's sep_token ([SEP]); PAD is pad_token,
else EOS (GPT-2 has no padding token); BOS is bos_token (None without one).

Which special tokens a model input gets (`encode(text, add_special_tokens=True)`, the batch
call) is decided by tokenizer.json's post-processor (e.g. Llama's `<s> $A`), as transformers 5
decides it when there is a tokenizer.json; without a tokenizer.json (vocab.txt, vocab.json +
merges.txt), by tokenizer_config.json's add_bos_token / add_eos_token.

Chat: `apply_chat_template(messages, add_generation_prompt=True)` renders the checkpoint's own
chat template (tokenizer_config.json's "chat_template" or chat_template.jinja) exactly as
transformers does and tokenizes it; see fmjax/hf/chat.py.

Called on a batch (`tok(texts, text_pairs, max_length=..., padding=...)`, see
`fmjax.data.tokenizers.Tokenizer.__call__`) it adds the special tokens of the tokenizer's own
post-processor (BERT's [CLS] A [SEP] B [SEP]; none for GPT-2), as transformers does.

Saved by `Tokenizer.save` as kind "hf" (fmjax_tokenizer.json + tokenizer.json), so that
`fmjax.data.load_tokenizer` restores it. `fmjax.data.load_tokenizer` also reads a Hugging Face
directory itself, by calling `tokenizer_from_pretrained`.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.implementations import ByteLevelBPETokenizer

from fmjax.data import tokenizers as fm_tokenizers
from fmjax.hf import chat
from fmjax.hf.chat import _read_json  # the one reader of a directory's JSON configs

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"

# Looked up in this order when the configs name no EOS / PAD token.
_EOS_CANDIDATES = ("[SEP]", "</s>", "<|endoftext|>", "<eos>")
_PAD_CANDIDATES = ("[PAD]", "<pad>")
# The named special tokens a chat template sees (transformers' SPECIAL_TOKENS_ATTRIBUTES).
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                "mask_token")


class HFTokenizer(fm_tokenizers.Tokenizer):
  """A `tokenizers.Tokenizer` with fmjax's interface: no special tokens are added by encode,
  offsets are character spans of the input with leading whitespace trimmed."""

  kind = "hf"

  def __init__(self, tokenizer: tokenizers.Tokenizer, *, eos_token: str, pad_token: str,
               bos_token: str | None = None, named_tokens: dict[str, str] | None = None,
               chat_template: str | dict[str, str] | None = None):
    """Wraps a Hugging Face tokenizer.

    Args:
      tokenizer: the Hugging Face tokenizer (its truncation and padding are switched off).
      eos_token, pad_token: tokens of the end-of-document and padding ids (may be equal).
      bos_token: the beginning-of-sequence token, if the tokenizer has one.
      named_tokens: {"bos_token": ..., "eos_token": ...} as tokenizer_config.json names them,
        given to chat templates (default: bos, eos and pad above).
      chat_template: Jinja source of the chat template, or a dict name -> source (see
        fmjax.hf.chat.read_chat_template); None for a tokenizer without one.

    Raises:
      KeyError: the vocabulary has no `eos_token`, `pad_token` or `bos_token`.
    """
    self._tok = tokenizer
    self._tok.no_truncation()
    self._tok.no_padding()
    self.eos_token, self.pad_token, self.bos_token = eos_token, pad_token, bos_token
    self.eos_id, self.pad_id = self.token_to_id(eos_token), self.token_to_id(pad_token)
    self.bos_id = None if bos_token is None else self.token_to_id(bos_token)
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    defaults = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
    self.named_tokens = dict(named_tokens if named_tokens is not None else
                             {k: v for k, v in defaults.items() if v is not None})
    self.chat_template = chat_template

  @property
  def backend(self) -> tokenizers.Tokenizer:
    """The underlying `tokenizers.Tokenizer`."""
    return self._tok

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    """Tokenizes one text.

    Args:
      text: the text (special tokens written in it, e.g. "<|im_start|>", become their ids).
      add_special_tokens: add those of a model input (e.g. Llama's BOS), as transformers'
        `tokenizer(text)["input_ids"]` does; False (the default) adds none.

    Returns:
      The token ids.
    """
    return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

  def apply_chat_template(self, messages: Sequence[dict[str, Any]], *,
                          add_generation_prompt: bool = False, tokenize: bool = True,
                          chat_template: str | None = None, tools=None, documents=None,
                          **context) -> list[int] | str:
    """Renders a conversation with the checkpoint's chat template, as transformers does.

    Args:
      messages: [{"role": "system" | "user" | "assistant", "content": "..."}, ...].
      add_generation_prompt: end with the header of the assistant's turn, so the model's
        continuation is its answer (True to generate; False to format a finished chat).
      tokenize: return ids (the rendered text encoded without adding special tokens: the
        template writes them) rather than the text.
      chat_template: another template's name or Jinja source (default: the tokenizer's).
      tools, documents: JSON-schema tool dicts / documents for templates that take them.
      **context: more template variables (e.g. enable_thinking=False).

    Returns:
      The prompt ids (tokenize=True), else the rendered text; equal to transformers'
      `apply_chat_template(..., return_dict=False)`.

    Raises:
      ValueError: the tokenizer has no chat template (a base model) and none was given.
      jinja2.TemplateError: the template refused the conversation (raise_exception).
    """
    template = chat.select_template(self.chat_template, chat_template, tools=tools)
    text = chat.render_chat_template(template, messages,
                                     add_generation_prompt=add_generation_prompt, tools=tools,
                                     documents=documents, special_tokens=self.named_tokens,
                                     **context)
    return self.encode(text) if tokenize else text

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    # Batched calls run multithreaded in Rust.
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = self._tok.encode(text, add_special_tokens=False)
    offsets = []
    for start, end in enc.offsets:  # character offsets into `text`, also after normalisation
      while start < end and text[start].isspace():
        start += 1
      offsets.append((start, end))
    return enc.ids, offsets

  @property
  def special_tokens(self) -> fm_tokenizers.SpecialTokens:
    """The special ids of the backend's post-processor (tokenizer.json's, e.g. BERT's
    TemplateProcessing), read by running it on two marker texts; without one (a tokenizer
    made from vocab.txt), the vocabulary decides as in `Tokenizer.special_tokens`."""
    if self._tok.post_processor is None:
      return super().special_tokens
    a, b = (self._tok.encode(text, add_special_tokens=False) for text in ("a", "b"))
    pair = self._tok.post_process(a, b, add_special_tokens=True)
    i = _find(pair.ids, a.ids, 0)
    j = _find(pair.ids, b.ids, i + len(a.ids))
    specials = fm_tokenizers.SpecialTokens(
        prefix=tuple(pair.ids[:i]), middle=tuple(pair.ids[i + len(a.ids):j]),
        suffix=tuple(pair.ids[j + len(b.ids):]), pair_type=pair.type_ids[j] if b.ids else 1)
    single = self._tok.post_process(a, None, add_special_tokens=True)
    if ((single.ids, single.type_ids) != specials.wrap(a.ids, None)
        or (pair.ids, pair.type_ids) != specials.wrap(a.ids, b.ids)):
      raise NotImplementedError(
          f"this tokenizer's post-processor ({type(self._tok.post_processor).__name__}) adds "
          "special tokens in a layout other than prefix A middle B suffix; encode with "
          "add_special_tokens=False and add them yourself")
    return specials

  def decode(self, ids: Iterable[int]) -> str:
    skip = {self.eos_id, self.pad_id}
    return self._tok.decode([int(i) for i in ids if int(i) not in skip],
                            skip_special_tokens=False)

  def token_to_id(self, token: str) -> int:
    i = self._tok.token_to_id(token)
    if i is None:
      raise KeyError(f"{token!r} is not a token of this Hugging Face tokenizer")
    return i

  def _metadata(self) -> dict[str, Any]:
    return {"tokenizer_file": TOKENIZER_FILE, "eos_token": self.eos_token,
            "pad_token": self.pad_token, "bos_token": self.bos_token,
            "named_tokens": self.named_tokens, "chat_template": self.chat_template}

  def _fingerprint_extra(self) -> bytes:
    return self._tok.to_str().encode("utf-8")

  def save(self, directory: str | os.PathLike) -> None:
    super().save(directory)
    self._tok.save(str(pathlib.Path(directory) / TOKENIZER_FILE))

  @classmethod
  def _restore(cls, directory, metadata):
    tok = tokenizers.Tokenizer.from_file(str(pathlib.Path(directory) / metadata["tokenizer_file"]))
    return cls(tok, eos_token=metadata["eos_token"], pad_token=metadata["pad_token"],
               bos_token=metadata.get("bos_token"), named_tokens=metadata.get("named_tokens"),
               chat_template=metadata.get("chat_template"))


def tokenizer_from_pretrained(directory: str | os.PathLike) -> HFTokenizer:
  """Reads a Hugging Face tokenizer directory (see the module docstring for the files).

  Args:
    directory: e.g. a model directory written by transformers' save_pretrained.

  Returns:
    An HFTokenizer; for BERT eos_id is [SEP] and pad_id [PAD], for GPT-2 both <|endoftext|>;
    with the directory's chat template (tokenizer.chat_template, None without one).

  Raises:
    FileNotFoundError: no such directory, or none of the tokenizer files.
    ValueError: no end-of-sequence token can be found.
  """
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"{directory} is not a directory; give a Hugging Face tokenizer "
                            f"directory with {TOKENIZER_FILE} (or vocab.txt, or vocab.json and "
                            "merges.txt)")
  config = _read_json(directory / SPECIAL_TOKENS_MAP)
  config.update(_read_json(directory / TOKENIZER_CONFIG))
  specials = {k: _token(config.get(k)) for k in NAMED_TOKENS}
  if (directory / TOKENIZER_FILE).is_file():
    # add_bos_token / add_eos_token do not apply here: transformers 5 drops them when there is
    # a tokenizer.json, whose post-processor says what a model input gets.
    tok = tokenizers.Tokenizer.from_file(str(directory / TOKENIZER_FILE))
    if config.get("tokenizer_class") in _LLAMA_CLASSES and _is_sentencepiece_bpe(tok):
      _llama_pretokenizer(tok, config)
  elif (directory / "vocab.txt").is_file():
    tok = _wordpiece(directory / "vocab.txt", config)
  elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
    tok = ByteLevelBPETokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"),
                                add_prefix_space=config.get("add_prefix_space", False))._tokenizer
    candidates = {*specials.values(), *_EOS_CANDIDATES} - {None}
    # Split out of text whole, as transformers does with <|endoftext|>.
    tok.add_special_tokens(sorted(t for t in candidates if tok.token_to_id(t) is not None))
  else:
    raise FileNotFoundError(f"{directory} has no {TOKENIZER_FILE}, vocab.txt (WordPiece) or "
                            "vocab.json + merges.txt (byte-level BPE); save the tokenizer there "
                            "with transformers' save_pretrained")
  has = lambda t: t is not None and tok.token_to_id(t) is not None
  eos = next((t for t in (specials["eos_token"], specials["sep_token"], *_EOS_CANDIDATES)
              if has(t)), None)
  if eos is None:
    raise ValueError(f"cannot tell the end-of-sequence token of the tokenizer in {directory}: "
                     f"{TOKENIZER_CONFIG} names no eos_token or sep_token in its vocabulary, and "
                     f"none of {list(_EOS_CANDIDATES)} is; set eos_token in {TOKENIZER_CONFIG}")
  pad = next((t for t in (specials["pad_token"], *_PAD_CANDIDATES) if has(t)), eos)
  bos = specials["bos_token"] if has(specials["bos_token"]) else None
  if not (directory / TOKENIZER_FILE).is_file():
    _add_bos_eos(tok, bos if config.get("add_bos_token") else None,
                 eos if config.get("add_eos_token") else None)
  named = {k: v for k, v in specials.items() if v is not None}
  return HFTokenizer(tok, eos_token=eos, pad_token=pad, bos_token=bos, named_tokens=named,
                     chat_template=chat.read_chat_template(directory, config))


# transformers 5 rebuilds these classes' normalizer, pre-tokenizer and decoder in code rather
# than reading tokenizer.json's (tokenization_llama.py); Llama 2, Mistral v0.x, TinyLlama.
_LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")


def _is_sentencepiece_bpe(tok: tokenizers.Tokenizer) -> bool:
  """A BPE with byte fallback ("<0x0A>" tokens), as converted from SentencePiece."""
  state = json.loads(tok.to_str())["model"]
  return state.get("type") == "BPE" and bool(state.get("byte_fallback"))


def _llama_pretokenizer(tok: tokenizers.Tokenizer, config: dict) -> None:
  """Sets the text handling transformers 5's LlamaTokenizer uses on this vocabulary.

  tokenizer.json (as SentencePiece) puts "▁" before every piece of text between special
  tokens and before leading spaces; LlamaTokenizer does so only at the start of the text
  (prepend_scheme "first"), unless tokenizer_config.json says legacy: true ("always") or
  add_prefix_space: false ("never"). Ids must equal transformers', so its rule is used.
  """
  prefix = config.get("add_prefix_space")
  prefix = True if prefix is None else bool(prefix)
  scheme = ("always" if config.get("legacy", False) else "first") if prefix else "never"
  tok.normalizer = None
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme,
                                               split=False)
  steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
  tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))


def _add_bos_eos(tok: tokenizers.Tokenizer, bos: str | None, eos: str | None) -> None:
  """Makes the post-processor add `bos` before and `eos` after each text (transformers'
  update_post_processor), for a tokenizer read without a tokenizer.json."""
  if bos is None and eos is None:
    return
  if tok.post_processor is not None and tok.post_processor.num_special_tokens_to_add(False):
    raise ValueError("add_bos_token/add_eos_token on a tokenizer that already adds special "
                     "tokens (BERT's [CLS] ... [SEP]); remove them from tokenizer_config.json")
  single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
  pair = " ".join([single, *([f"{bos}:1"] if bos else []), "$B:1",
                   *([f"{eos}:1"] if eos else [])])
  tok.post_processor = processors.TemplateProcessing(
      single=single, pair=pair,
      special_tokens=[(t, tok.token_to_id(t)) for t in dict.fromkeys((bos, eos)) if t])


def _wordpiece(vocab_file: pathlib.Path, config: dict) -> tokenizers.Tokenizer:
  """BERT's tokenizer from its vocab.txt, configured as transformers' BertTokenizer."""
  specials = {k: _token(config.get(k)) or default for k, default in (
      ("unk_token", "[UNK]"), ("sep_token", "[SEP]"), ("pad_token", "[PAD]"),
      ("cls_token", "[CLS]"), ("mask_token", "[MASK]"))}
  vocab = models.WordPiece.read_file(str(vocab_file))
  tok = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token=specials["unk_token"]))
  tok.normalizer = normalizers.BertNormalizer(
      clean_text=True, handle_chinese_chars=config.get("tokenize_chinese_chars", True),
      strip_accents=config.get("strip_accents"),
      lowercase=config.get("do_lower_case", True))  # BertTokenizer's defaults
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece(prefix="##")
  tok.add_special_tokens(sorted(t for t in specials.values() if t in vocab))  # split out whole
  return tok


def _find(ids: list[int], part: list[int], start: int) -> int:
  """The position of `part` in `ids` at or after `start` (len(ids) when absent or empty)."""
  for i in range(start, len(ids) - len(part) + 1):
    if part and ids[i:i + len(part)] == part:
      return i
  return len(ids)


def _token(value) -> str | None:
  """A special token as tokenizer configs write it: a string or {"content": ...}."""
  return value.get("content") if isinstance(value, dict) else value
