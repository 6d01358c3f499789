"""Supervised finetuning data: JSONL conversations -> token ids with a response-only loss mask
-> packed rows with segment ids.

Shape key: T = seq_len, the input positions of a row; an example of n tokens fills n - 1.

  read_jsonl(paths)           rows {"prompt", "response"} or {"messages": [{"role", "content"}]}
                              -> Conversations (each knows its "file:line")
  make_format(tokenizer)      the checkpoint's chat template when it has one (ChatTemplate),
                              else `Plain`
  format.encode(conversation) -> (ids (n,), loss (n,) bool: True on the tokens trained on)
  truncate(ids, loss, n_max)  keeps the prompt's end (and the response's start)
  pack(examples, seq_len)     -> rows {"inputs", "targets", "weights", "segment_ids",
                              "positions"} (R, T); several examples per row, none attending
                              another (segment ids), positions restarting in each

What the loss counts: the assistant turns' tokens and the end-of-turn token that closes each
(the template's <|im_end|>, <|eot_id|>, <end_of_turn>, ..., or EOS in the plain format);
nothing of the system or user turns, nor the assistant's header. With a chat template the
spans are found by rendering prefixes: the text of messages[:i] with the generation prompt is
where assistant turn i starts, and messages[:i + 1] rendered, trailing whitespace dropped, is
where it ends; a token is trained on when its characters (offsets, leading spaces trimmed)
overlap one of those spans. The template must render each prefix as the start of the whole
conversation (templates that rewrite earlier turns, e.g. strip their reasoning, are refused:
use the plain format).

The plain format (a base model's tokenizer without a chat template, or `format="plain"`):

  [BOS]{system}\\n\\nUser: {user}\\nAssistant: {assistant}<EOS>User: {user}\\nAssistant: ...<EOS>

each piece encoded on its own, the assistant's text and its EOS trained on.

A row's token t predicts token t + 1 of the same example only: an example of n tokens gives n - 1
(input, target) pairs, so no target crosses into the next example and a packed row's loss
equals the examples' separate losses.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fmjax.data.text import DataError, resolve_files

log = logging.getLogger("fmjax")

ROLES = ("system", "user", "assistant")
FORMATS = ("auto", "chat_template", "plain")


@dataclasses.dataclass(frozen=True)
class Conversation:
  """One training example: its messages and where it was read.

  Attributes:
    messages: ({"role": "system" | "user" | "assistant", "content": str}, ...), the last
      one the assistant's.
    where: "FILE:LINE" of its JSONL row (or any label).
  """
  messages: tuple[Mapping[str, str], ...]
  where: str = ""

  @property
  def response(self) -> str:
    """The last assistant turn's content (the reference answer)."""
    return self.messages[-1]["content"]


# ------------------------------------------------------------------------------ reading


def parse_row(row: Any, where: str) -> Conversation:
  """Checks one decoded JSONL row and makes it a Conversation.

  Args:
    row: the decoded JSON value: {"prompt": str, "response": str} (an optional "system": str),
      or {"messages": [{"role": ..., "content": ...}, ...]}; other keys are ignored.
    where: "FILE:LINE", named by every error.

  Returns:
    The Conversation (a prompt/response row is [system], user, assistant).

  Raises:
    DataError: one line "FILE:LINE: what is wrong; what to do".
  """
  fix = ('each line must be one JSON object, {"prompt": "...", "response": "..."} or '
         '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", '
         '"content": "..."}]}')
  if not isinstance(row, dict):
    raise DataError(f"{where}: a JSON {type(row).__name__}, not an object; {fix}")
  if "messages" in row:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
      raise DataError(f"{where}: \"messages\" must be a non-empty list; {fix}")
    out = []
    for i, m in enumerate(messages):
      if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise DataError(f"{where}: message {i} must be an object with \"role\" and "
                        f"\"content\", got {json.dumps(m)[:80]}")
      if m["role"] not in ROLES:
        raise DataError(f"{where}: message {i} has role {m['role']!r}; roles are {list(ROLES)}")
      if not isinstance(m["content"], str):
        raise DataError(f"{where}: message {i}'s content must be a string, got "
                        f"{type(m['content']).__name__}")
      if m["role"] == "system" and i > 0:
        raise DataError(f"{where}: message {i} is a system message; only the first may be")
      out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "assistant":
      raise DataError(f"{where}: the last message is the {out[-1]['role']}'s; a training "
                      "example ends with the assistant's answer (drop the trailing messages)")
    for i, m in enumerate(out):
      if m["role"] == "assistant" and not m["content"].strip():
        raise DataError(f"{where}: message {i} (assistant) is empty; give it an answer or "
                        "drop the row")
    return Conversation(tuple(out), where)
  missing = [k for k in ("prompt", "response") if k not in row]
  if missing:
    raise DataError(f"{where}: no {' and no '.join(repr(k) for k in missing)} key (keys: "
                    f"{sorted(row)}); {fix}")
  for key in ("prompt", "response", "system"):
    if key in row and not isinstance(row[key], str):
      raise DataError(f"{where}: \"{key}\" must be a string, got {type(row[key]).__name__}")
  if not row["response"].strip():
    raise DataError(f"{where}: the response is empty; give it an answer or drop the row")
  system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
  return Conversation(tuple(system + [{"role": "user", "content": row["prompt"]},
                                      {"role": "assistant", "content": row["response"]}]), where)


def read_jsonl(paths: str | Sequence[str]) -> list[Conversation]:
  """Reads JSONL files of conversations (blank lines are skipped).

  Args:
    paths: a path or glob, or several (fmjax.data.text.resolve_files).

  Returns:
    The Conversations in file and line order.

  Raises:
    DataError: "FILE:LINE: ..." for the first bad line (malformed JSON, missing keys, a wrong
      role, an empty response; see `parse_row`), or a file that is missing or empty.
  """
  conversations = []
  for path in resolve_files(paths):
    try:
      with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not JSON
        lines = f.read().split("\n")  # not splitlines: JSON strings may hold U+2028
    except UnicodeDecodeError as e:
      raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as "
                      "UTF-8") from None
    for number, line in enumerate(lines, start=1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno}); each line "
                        "must be one JSON object") from None
      conversations.append(parse_row(row, where))
  if not conversations:
    raise DataError(f"{paths}: no rows; give JSONL files with one example per line")
  return conversations


# ------------------------------------------------------------------------------ formats


class ChatTemplate:
  """Conversations rendered with a Hugging Face tokenizer's chat template (module docstring).

  Args:
    tokenizer: an fmjax.hf.HFTokenizer with a chat template (`apply_chat_template`,
      `encode_with_offsets`).
  """

  name = "chat_template"

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.stop_tokens = self._end_of_turn()

  def _render(self, messages, generation_prompt: bool = False) -> str:
    return self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                              add_generation_prompt=generation_prompt)

  def spans(self, conversation: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans the loss counts.

    Args:
      conversation: the example.

    Returns:
      (text, [(start, end), ...]) one span per assistant turn: its content and end of turn.

    Raises:
      DataError: the template refused the conversation, or renders a prefix differently.
    """
    import jinja2
    messages = conversation.messages
    try:
      text = self._render(messages)
      spans = []
      for i, m in enumerate(messages):
        if m["role"] != "assistant":
          continue
        before = self._render(messages[:i], True) if i else ""
        through = self._render(messages[:i + 1])
        if not (text.startswith(through) and through.startswith(before)):
          raise DataError(
              f"{conversation.where}: the chat template renders the conversation up to "
              f"message {i} differently from the start of the whole conversation, so the "
              "assistant's tokens cannot be told apart; use the plain format")
        spans.append((len(before), len(through.rstrip())))
    except jinja2.TemplateError as e:
      raise DataError(f"{conversation.where}: the chat template refused this conversation: "
                      f"{e}") from None
    return text, spans

  def encode(self, conversation: Conversation) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and their loss mask.

    Args:
      conversation: the example.

    Returns:
      (ids (n,) int32, loss (n,) bool), loss True on tokens that overlap an assistant span.
    """
    text, spans = self.spans(conversation)
    ids, offsets = self.tokenizer.encode_with_offsets(text)
    return np.asarray(ids, np.int32), span_mask(offsets, spans)

  def prompt(self, conversation: Conversation) -> list[int]:
    """The ids a model continues with the last assistant turn (its generation prompt).

    Args:
      conversation: the example.

    Returns:
      The rendered messages before the last one, with the generation prompt, encoded.
    """
    return self.tokenizer.encode(self._render(conversation.messages[:-1], True))

  def _end_of_turn(self) -> tuple[int, ...]:
    """The id that closes an assistant turn when the template writes a special token there."""
    probe = Conversation(({"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Yes"}), "probe")
    try:
      text, spans = self.spans(probe)
    except DataError:
      return ()
    start, end = spans[0]
    turn = text[start:end]
    if "Yes" not in turn:
      return ()
    tail = turn[turn.rfind("Yes") + 3:]
    added = getattr(getattr(self.tokenizer, "backend", None), "get_added_tokens_decoder",
                    lambda: {})()
    ids = self.tokenizer.encode(tail) if tail.strip() else []
    return (ids[-1],) if ids and ids[-1] in added else ()


class Plain:
  """The plain format of a tokenizer without a chat template (module docstring).

  Args:
    tokenizer: any fmjax Tokenizer (its eos_id ends each assistant turn; a bos_id, when it has
      one, starts the text).
  """

  name = "plain"

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.stop_tokens = (tokenizer.eos_id,)

  def pieces(self, messages) -> list[tuple[list[int], bool]]:
    """The text as (ids, trained) pieces.

    Args:
      messages: the conversation's messages.

    Returns:
      [(ids, trained on?), ...] in order; the last piece is an assistant turn's EOS when the
      messages end with the assistant's.
    """
    tok = self.tokenizer
    bos = getattr(tok, "bos_id", None)
    pieces = [([bos], False)] if bos is not None else []
    for m in messages:
      if m["role"] == "system":
        pieces.append((tok.encode(m["content"] + "\n\n"), False))
      elif m["role"] == "user":
        pieces.append((tok.encode(f"User: {m['content']}\n"), False))
      else:
        pieces += [(tok.encode("Assistant: "), False), (tok.encode(m["content"]), True),
                   ([tok.eos_id], True)]
    return pieces

  def encode(self, conversation: Conversation) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and their loss mask.

    Args:
      conversation: the example.

    Returns:
      (ids (n,) int32, loss (n,) bool), loss True on the assistant's tokens and their EOS.
    """
    pieces = self.pieces(conversation.messages)
    ids = np.asarray([i for p, _ in pieces for i in p], np.int32)
    loss = np.asarray([t for p, t in pieces for _ in p], bool)
    return ids, loss

  def prompt(self, conversation: Conversation) -> list[int]:
    """The ids a model continues with the last assistant turn.

    Args:
      conversation: the example.

    Returns:
      Everything before the last assistant's content ("...Assistant: "), encoded.
    """
    pieces = self.pieces(conversation.messages)[:-2]
    return [i for p, _ in pieces for i in p]


def make_format(tokenizer, kind: str = "auto"):
  """The format conversations are rendered in.

  Args:
    tokenizer: the model's tokenizer.
    kind: "auto" (the chat template when the tokenizer has one, else plain), "chat_template"
      or "plain".

  Returns:
    A ChatTemplate or a Plain (`encode`, `prompt`, `stop_tokens`, `name`).

  Raises:
    ValueError: an unknown kind, or "chat_template" for a tokenizer without one.
  """
  if kind not in FORMATS:
    raise ValueError(f"format={kind!r}: choose one of {list(FORMATS)}")
  has_template = getattr(tokenizer, "chat_template", None) is not None
  if kind == "chat_template" and not has_template:
    raise ValueError("format='chat_template' but this tokenizer has no chat template (a base "
                     "model's); use format 'plain' or 'auto'")
  return ChatTemplate(tokenizer) if kind != "plain" and has_template else Plain(tokenizer)


def span_mask(offsets: Sequence[tuple[int, int]], spans: Iterable[tuple[int, int]]) -> np.ndarray:
  """Which tokens overlap any character span.

  Args:
    offsets: (n,) (start, end) character offsets of the tokens.
    spans: (start, end) character spans.

  Returns:
    (n,) bool, True where start < span end and end > span start for some span.
  """
  offsets = np.asarray(offsets, np.int64).reshape(-1, 2)
  mask = np.zeros(len(offsets), bool)
  for start, end in spans:
    mask |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
  return mask


# ------------------------------------------------------------------------------ rows


def truncate(ids: np.ndarray, loss: np.ndarray, max_tokens: int):
  """Cuts an example to at most `max_tokens`, keeping the prompt's end.

  The prompt's start goes first; when the response (from its first trained token) does not fit
  behind one prompt token, the prompt keeps its last min(its length, max_tokens // 2) tokens
  and the response its start.

  Args:
    ids: (n,) token ids.
    loss: (n,) bool loss mask.
    max_tokens: the most tokens kept (seq_len + 1: a row's inputs and the last target).

  Returns:
    (ids, loss, how): how is None (it fitted), "prompt" (the prompt's start was cut) or
    "response" (the response's end was cut too).
  """
  n = len(ids)
  if n <= max_tokens:
    return ids, loss, None
  first = int(np.argmax(loss)) if loss.any() else n
  cut = n - max_tokens
  if cut < first:
    return ids[cut:], loss[cut:], "prompt"
  start = first - min(first, max_tokens // 2)
  return ids[start:start + max_tokens], loss[start:start + max_tokens], "response"


def encode_all(conversations: Sequence[Conversation], fmt, seq_len: int):
  """Encodes and truncates every conversation for rows of seq_len inputs.

  Args:
    conversations: the examples.
    fmt: make_format's result.
    seq_len: T.

  Returns:
    ([(ids, loss), ...], {"prompt": count cut at the prompt's start, "response": count whose
    response was cut too}).

  Raises:
    DataError: an example with no token to train on (names its "file:line").
  """
  examples, cut = [], {"prompt": 0, "response": 0}
  for conversation in conversations:
    ids, loss = fmt.encode(conversation)
    ids, loss, how = truncate(ids, loss, seq_len + 1)
    if how:
      cut[how] += 1
    if not loss[1:].any():
      raise DataError(f"{conversation.where}: no response token to train on once rendered "
                      f"({len(ids)} tokens); check the row")
    examples.append((ids, loss))
  return examples, cut


def pack(examples: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, *,
         packing: bool = True) -> dict[str, np.ndarray]:
  """Rows of seq_len positions, several examples each (best fit, longest first) or one each.

  Args:
    examples: (ids (n,), loss (n,)) pairs, n <= seq_len + 1 (`truncate`).
    seq_len: T.
    packing: False puts each example in its own row.

  Returns:
    {"inputs", "targets", "segment_ids", "positions"} int32 (R, T) and "weights" float32
    (R, T): example j of a row holds ids[:-1] as inputs, ids[1:] as targets, loss[1:] as
    weights, segment id j + 1 and positions 0..n - 2; padding has segment 0 and weight 0.
  """
  lengths = [len(ids) - 1 for ids, _ in examples]
  if any(n < 1 or n > seq_len for n in lengths):
    raise ValueError(f"every example needs 2..{seq_len + 1} tokens (truncate first); got "
                     f"lengths {sorted(set(n + 1 for n in lengths))[:5]}...")
  rows: list[list[int]] = []  # example indices per row
  if not packing:
    rows = [[i] for i in range(len(examples))]
  else:
    free: list[tuple[int, int]] = []  # (room left, row), sorted: best fit is the first >= n
    for i in sorted(range(len(examples)), key=lambda i: (-lengths[i], i)):
      k = bisect.bisect_left(free, (lengths[i], -1))
      if k == len(free):
        rows.append([])
        room, row = seq_len, len(rows) - 1
      else:
        room, row = free.pop(k)
      rows[row].append(i)
      if room - lengths[i] > 0:
        bisect.insort(free, (room - lengths[i], row))
  out = {k: np.zeros((len(rows), seq_len), np.int32)
         for k in ("inputs", "targets", "segment_ids", "positions")}
  out["weights"] = np.zeros((len(rows), seq_len), np.float32)
  for r, members in enumerate(rows):
    at = 0
    for j, i in enumerate(sorted(members)):
      ids, loss = examples[i]
      n = len(ids) - 1
      out["inputs"][r, at:at + n] = ids[:-1]
      out["targets"][r, at:at + n] = ids[1:]
      out["weights"][r, at:at + n] = loss[1:]
      out["segment_ids"][r, at:at + n] = j + 1
      out["positions"][r, at:at + n] = np.arange(n)
      at += n
  return out
