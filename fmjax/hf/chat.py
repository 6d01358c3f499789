"""Talking to a Hugging Face chat checkpoint: its chat template, its stop ids, streamed text.

  tok = fmjax.hf.tokenizer_from_pretrained(dir)
  ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
  gen = fmjax.hf.generation_config(dir)  # stop ids (eos_token_id: an int or a list), sampling
  new = fmjax.generate.generate(model, params, [ids], max_new_tokens=64,
                                stop_tokens=gen.stop_tokens, **gen.sampling())

A chat template is Jinja source shipped with the checkpoint (tokenizer_config.json's
"chat_template", or chat_template.jinja, or additional_chat_templates/NAME.jinja). It is
rendered as transformers renders it (transformers/utils/chat_template_utils.py), so the prompt
is the one the model was trained on: a sandboxed environment (ImmutableSandboxedEnvironment)
with trim_blocks and lstrip_blocks, the loopcontrols extension and `{% generation %}` blocks,
`raise_exception`, `strftime_now`, a `tojson` filter that keeps non-ASCII text and escapes no
HTML, and in the context `messages`, `tools`, `documents`, `add_generation_prompt` and the named
special tokens (`bos_token`, `eos_token`, ...). The rendered text is then tokenized without
adding special tokens (the template writes them itself).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
GENERATION_CONFIG = "generation_config.json"
# transformers' GenerationConfig defaults, used when generation_config.json leaves them unset.
_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


# ------------------------------------------------------------------------------ templates


def read_chat_template(directory: str | os.PathLike,
                       tokenizer_config: Mapping[str, Any] | None = None
                       ) -> str | dict[str, str] | None:
  """The chat template(s) of a Hugging Face tokenizer directory, as transformers reads them.

  chat_template.jinja and additional_chat_templates/*.jinja take priority over the
  "chat_template" entry of tokenizer_config.json (a string, or a list of {"name", "template"}).

  Args:
    directory: the tokenizer (model) directory.
    tokenizer_config: its tokenizer_config.json, if already read.

  Returns:
    The template source; a dict name -> source when there are several ("default" is used
    unless another is asked for); None when the checkpoint has none.
  """
  directory = pathlib.Path(directory)
  templates = {}
  if (directory / CHAT_TEMPLATE_FILE).is_file():
    templates["default"] = (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
  if (directory / CHAT_TEMPLATE_DIR).is_dir():
    for path in sorted((directory / CHAT_TEMPLATE_DIR).glob("*.jinja")):
      templates[path.stem] = path.read_text(encoding="utf-8")
  if not templates:
    entry = (tokenizer_config or {}).get("chat_template")
    if isinstance(entry, list):
      templates = {t["name"]: t["template"] for t in entry}
    elif entry is not None:
      templates["default"] = entry
  if not templates:
    return None
  return templates["default"] if list(templates) == ["default"] else templates


def select_template(templates: str | Mapping[str, str] | None, chat_template: str | None = None,
                    *, tools=None) -> str:
  """The template source to render, as transformers' get_chat_template picks it.

  Args:
    templates: the tokenizer's template(s) (read_chat_template's result).
    chat_template: None for the tokenizer's own; a template's name; or Jinja source.
    tools: when given and the tokenizer has a "tool_use" template, that one is the default.

  Returns:
    The Jinja source to render.

  Raises:
    ValueError: the tokenizer has no chat template and none was given, or several and none
      is named "default".
  """
  if isinstance(templates, Mapping):
    if chat_template is not None:
      return templates.get(chat_template, chat_template)
    if tools is not None and "tool_use" in templates:
      return templates["tool_use"]
    if "default" in templates:
      return templates["default"]
    raise ValueError(f"this tokenizer has several chat templates {sorted(templates)} and none "
                     "is named 'default'; pass chat_template=NAME")
  if chat_template is not None:
    return chat_template
  if templates is None:
    raise ValueError(
        "this tokenizer has no chat template (no chat_template in tokenizer_config.json and no "
        f"{CHAT_TEMPLATE_FILE}): it is probably a base model, not a chat model; pass "
        "chat_template=JINJA_SOURCE, or give the prompt as plain text (e.g. train/sample.py)")
  return templates


def render_chat_template(template: str, messages: Sequence[Mapping[str, Any]], *,
                         add_generation_prompt: bool = False, tools=None, documents=None,
                         special_tokens: Mapping[str, str] | None = None, **context) -> str:
  """Renders a chat template as transformers does (see the module docstring).

  Args:
    template: Jinja source.
    messages: the conversation, dicts with "role" and "content" (keys whose value is None are
      dropped, as transformers drops them).
    add_generation_prompt: end with the header that starts the assistant's turn.
    tools, documents: JSON-schema dicts of tools / documents for templates that use them.
    special_tokens: {"bos_token": "<s>", ...} put in the context (`context` overrides them).
    **context: more template variables (e.g. enable_thinking=False, date_string=...).

  Returns:
    The rendered prompt text.

  Raises:
    jinja2.TemplateError: the template raised (raise_exception) or is not valid Jinja.
    TypeError: a message is not a dict.
  """
  if not messages:
    raise ValueError("messages is empty; give at least one {'role': ..., 'content': ...}")
  chat = []
  for message in messages:
    if not isinstance(message, Mapping):
      raise TypeError(f"chat messages should be dicts with 'role' and 'content'; got {message!r}")
    chat.append({k: v for k, v in message.items() if v is not None})
  if tools is not None:
    for tool in tools:
      if not isinstance(tool, Mapping):
        raise TypeError(f"tools should be JSON-schema dicts; got {tool!r}")
  if documents is not None:
    for document in documents:
      if not isinstance(document, Mapping):
        raise TypeError("documents should be a list of dicts with 'title' and 'text' keys")
  variables = {**(special_tokens or {}), **context}
  return _compile(template).render(
      messages=_plain(chat), tools=_plain(tools), documents=_plain(documents),
      add_generation_prompt=add_generation_prompt, **_plain(variables))


def _plain(value):
  """Plain JSON data for the sandbox (transformers' _plain_template_data, without media)."""
  if value is None or type(value) in (str, int, float, bool):
    return value
  if isinstance(value, str):
    return str.__str__(value)
  if isinstance(value, bool):
    return bool(value)
  if isinstance(value, int):
    return int.__int__(value)
  if isinstance(value, float):
    return float.__float__(value)
  if isinstance(value, Mapping):
    return {_plain(k): _plain(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_plain(v) for v in value]
  if isinstance(value, tuple):
    return tuple(_plain(v) for v in value)
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
  if hasattr(value, "item") and callable(value.item):  # numpy scalars
    return _plain(value.item())
  return f"<{type(value).__name__}>"


@functools.lru_cache(maxsize=16)
def _compile(template: str):
  """The template compiled in transformers' sandboxed environment (cached per source)."""
  try:
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.sandbox
  except ImportError:
    raise ImportError("chat templates need jinja2 (pip install 'jinja2>=3.1')") from None

  class Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's tokens for training
    masks in transformers; rendering keeps its body unchanged."""
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  def strftime_now(format):
    return datetime.datetime.now().strftime(format)

  class Namespace(jinja2.utils.Namespace):
    """Jinja's namespace() without underscore attributes (a sandbox escape route)."""

    def __init__(*args, **kwargs):
      self, args = args[0], args[1:]
      attrs = dict(*args, **kwargs)
      for name in attrs:
        Namespace._check(name)
      jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
      Namespace._check(name)
      jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
      if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"chat templates cannot set underscore attributes on a namespace; got {name!r}")

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now,
                     namespace=Namespace, dict=lambda *a, **k: dict(*a, **k))
  return env.from_string(template)


# ------------------------------------------------------------------------------ generation


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
  """What a checkpoint's generation_config.json says about generating from it.

  Attributes:
    stop_tokens: eos_token_id(s) (an int or a list in the file); from config.json when there
      is no generation_config.json, as transformers does; () when neither names one.
    temperature, top_k, top_p: fmjax sampling settings equal to transformers' defaults for the
      checkpoint: greedy (0, 0, 1.0) unless do_sample is true, then the file's values with
      transformers' defaults (1.0, 50, 1.0) for those it leaves out.
    max_new_tokens: the file's max_new_tokens, else None.
  """
  stop_tokens: tuple[int, ...] = ()
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  max_new_tokens: int | None = None

  def sampling(self) -> dict[str, Any]:
    """The sampling settings as fmjax.generate.generate's keyword arguments.

    Returns:
      {"temperature": float, "top_k": int, "top_p": float}.
    """
    return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}


def generation_config(directory: str | os.PathLike) -> GenerationDefaults:
  """Reads a Hugging Face model directory's generation_config.json (else config.json).

  Args:
    directory: the model directory.

  Returns:
    A GenerationDefaults: the stop ids and the sampling settings transformers' generate would
    use for this checkpoint.

  Raises:
    ValueError: a file is not valid JSON, or eos_token_id is neither an int nor a list of ints.
  """
  directory = pathlib.Path(directory)
  path = directory / GENERATION_CONFIG
  if not path.is_file():
    path = directory / "config.json"
  config = _read_json(path)
  eos = config.get("eos_token_id")
  eos = [] if eos is None else [eos] if isinstance(eos, int) else eos
  if not isinstance(eos, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                          for i in eos):
    raise ValueError(f"{path}: eos_token_id={config.get('eos_token_id')!r} should be an int or a "
                     "list of ints")
  stop = tuple(dict.fromkeys(eos))
  max_new = config.get("max_new_tokens")
  if not config.get("do_sample"):
    return GenerationDefaults(stop_tokens=stop, max_new_tokens=max_new)
  values = {k: config[k] if config.get(k) is not None else default
            for k, default in _SAMPLING_DEFAULTS.items()}
  return GenerationDefaults(stop_tokens=stop, temperature=float(values["temperature"]),
                            top_k=int(values["top_k"]), top_p=float(values["top_p"]),
                            max_new_tokens=max_new)


def _read_json(path: pathlib.Path) -> dict:
  if not path.is_file():
    return {}
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e})") from None


# ------------------------------------------------------------------------------ streaming


class TextStream:
  """Turns token ids arriving one at a time into text, as soon as it is complete.

  Byte-level BPE tokens can end inside a multi-byte UTF-8 character, and SentencePiece
  tokens change how the previous one decodes (a leading space), so each new id decodes all
  the ids so far (fast in Rust for a chat answer's length) and emits only what is new and
  whole: text ending in U+FFFD, an unfinished character, waits for the next token.

    stream = TextStream(tokenizer)
    for i in ids: print(stream.push(i), end="", flush=True)
    print(stream.flush())
  """

  def __init__(self, tokenizer, *, skip: Iterable[int] = ()):
    """Starts an empty stream.

    Args:
      tokenizer: has decode(ids) -> str.
      skip: ids never shown (e.g. the stop ids).
    """
    self._tok = tokenizer
    self._skip = set(int(i) for i in skip)
    self._ids: list[int] = []
    self._shown = 0  # characters of decode(self._ids) already emitted
    self.text = ""  # all text emitted so far

  def push(self, token: int) -> str:
    """Adds one id.

    Args:
      token: the next token id.

    Returns:
      The text it completes ("" while a character is unfinished, or for a skipped id).
    """
    if int(token) in self._skip:
      return ""
    self._ids.append(int(token))
    text = self._tok.decode(self._ids)
    if text.endswith("\ufffd"):
      return ""
    return self._emit(text)

  def flush(self) -> str:
    """Ends the stream.

    Returns:
      The text still held back (an unfinished character at the end), else "".
    """
    return self._emit(self._tok.decode(self._ids)) if self._ids else ""

  def _emit(self, text: str) -> str:
    new = text[self._shown:]
    self._shown = len(text)
    self.text += new
    return new
