"""Chats with a Hugging Face chat model, printing the answer while it is made.

  python -m train.chat --hf=DIR                                   # interactive
  python -m train.chat --hf=DIR --prompt="What is artificial intelligence?"   # one answer
      [--system="You are a pirate." --max_new_tokens=256 --temperature=0.7 --top_k=50 \
       --top_p=0.9 --seed=0]

DIR is a transformers model directory (config.json, weights, tokenizer.json and a chat
template), e.g. the SmolLM2-135M-Instruct one that bench/make_smollm2.py writes. The model is
fmjax.hf.from_pretrained(DIR, task="causal_lm"); each turn the whole conversation (the
--system message, then the user's and the model's turns) is rendered with the checkpoint's own
chat template (tokenizer.apply_chat_template(..., add_generation_prompt=True), ids equal to
transformers'), continued with fmjax.generate.stream and printed token by token. An answer
ends at generation_config.json's eos_token_id(s) (else the tokenizer's end-of-sequence token)
or after --max_new_tokens. Sampling follows the checkpoint's generation_config.json (greedy
unless it says do_sample, as transformers' generate) where the flags are not given.

Interactive: type a message and Enter; an empty line or Ctrl-D ends. A turn that does not fit
(e.g. past the model's positions) is one `error:` line and the chat goes on. With --prompt, bad
input (no such directory, no chat template, an impossible setting) is one `error:` line on
stderr and exit status 2.
"""

import os
import sys
from collections.abc import Iterator

from absl import app, flags

from fmjax import generate, hf
from fmjax.hf import chat
from train import common
from train import sample  # --hf, --prompt, --max_new_tokens, --temperature, ... and loading

FLAGS = flags.FLAGS
flags.DEFINE_string("system", None, "system message opening the conversation")

DEFAULT_MAX_NEW_TOKENS = 256


def settings(defaults: hf.GenerationDefaults, **given) -> dict:
  """generate.stream's settings: the checkpoint's defaults, overridden by `given` (not None)."""
  out = {**defaults.sampling(),
         "max_new_tokens": defaults.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, "seed": 0}
  out.update({k: v for k, v in given.items() if v is not None})
  generate.GenerateConfig(**{k: v for k, v in out.items() if k != "seed"})  # check first
  return out


def reply(model, params, tokenizer, messages: list[dict], *, stop_tokens, **settings
          ) -> Iterator[str]:
  """The model's next turn in `messages`, as pieces of text while they are made.

  Args:
    model, params, tokenizer: from train.sample.load_hf.
    messages: the conversation so far, [{"role": ..., "content": ...}], ending with the user's.
    stop_tokens: ids that end the answer (not shown).
    **settings: max_new_tokens, temperature, top_k, top_p, seed (generate.stream's).
  """
  ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
  text = chat.TextStream(tokenizer, skip=stop_tokens)
  for token in generate.stream(model, params, ids, stop_tokens=stop_tokens,
                               pad_id=tokenizer.pad_id, **settings):
    piece = text.push(token)
    if piece:
      yield piece
  rest = text.flush()
  if rest:
    yield rest


def _answer(model, params, tokenizer, messages, out, **kwargs) -> str:
  text = ""
  for piece in reply(model, params, tokenizer, messages, **kwargs):
    out.write(piece)
    out.flush()
    text += piece
  out.write("\n")
  out.flush()
  return text


def run(directory: str, *, prompt: str | None = None, system: str | None = None,
        out=None, **given) -> None:
  """One answer to `prompt`, or (prompt None) an interactive chat on stdin, streamed to `out`.

  Args:
    directory: a Hugging Face chat model directory.
    prompt: the user's message; None reads turns from stdin until an empty line or EOF.
    system: an optional system message.
    out: where the answers go (default: sys.stdout at the time of the call).
    **given: max_new_tokens, temperature, top_k, top_p, seed; None keeps the checkpoint's.
  """
  out = sys.stdout if out is None else out
  if prompt is not None and not prompt.strip():
    raise ValueError("--prompt is empty; give the user's message, e.g. --prompt='Hello!'")
  tokenizer = hf.tokenizer_from_pretrained(directory)
  if tokenizer.chat_template is None:
    raise ValueError(f"{directory} has no chat template (tokenizer_config.json chat_template or "
                     f"chat_template.jinja): it is not a chat model; continue plain text with "
                     f"python -m train.sample --hf={directory} --prompt=...")
  defaults = hf.generation_config(directory)
  kwargs = settings(defaults, **given)
  kwargs["stop_tokens"] = defaults.stop_tokens or (tokenizer.eos_id,)
  messages = [] if system is None else [{"role": "system", "content": system}]
  if prompt is not None:
    tokenizer.apply_chat_template(messages + [{"role": "user", "content": prompt}],
                                  add_generation_prompt=True)  # a template error, before loading
  model, params, _ = sample.load_hf(directory)
  if prompt is not None:
    _answer(model, params, tokenizer, messages + [{"role": "user", "content": prompt}], out,
            **kwargs)
    return
  print(f"chatting with {directory}: type a message and Enter; an empty line or Ctrl-D ends",
        file=sys.stderr)
  while True:
    try:
      line = input("> ")
    except EOFError:
      break
    if not line.strip():
      break
    messages.append({"role": "user", "content": line})
    try:
      messages.append({"role": "assistant",
                       "content": _answer(model, params, tokenizer, messages, out, **kwargs)})
    except ValueError as e:  # e.g. the conversation outgrew the model's positions
      messages.pop()
      print(f"error: {e}", file=sys.stderr)


def main(argv):
  if len(argv) > 1:
    common.fail(f"unexpected arguments {argv[1:]}; quote the prompt: --prompt=\"...\"")
  if FLAGS.hf is None:
    common.fail("--hf=DIR is required: a Hugging Face chat model directory (e.g. the one "
                "bench/make_smollm2.py prints)")
  given = {name: FLAGS[name].value if FLAGS[name].present else None
           for name in ("max_new_tokens", "temperature", "top_k", "top_p", "seed")}
  common.enable_compilation_cache()
  try:
    run(FLAGS.hf, prompt=FLAGS.prompt, system=FLAGS.system, **given)
  except common.EXPECTED_ERRORS as e:
    if os.environ.get("FMJAX_DEBUG"):
      raise
    common.fail(str(e))
  except ImportError as e:  # jinja2 missing
    common.fail(str(e))
  except Exception as e:  # pylint: disable=broad-except
    if type(e).__module__.split(".")[0] != "jinja2" or os.environ.get("FMJAX_DEBUG"):
      raise
    common.fail(f"the chat template of {FLAGS.hf} refused the conversation: {e}")


if __name__ == "__main__":
  app.run(main, sys.argv, flags_parser=common.parse_flags)
