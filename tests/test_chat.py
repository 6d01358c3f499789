"""Chat: templates rendered as transformers renders them, tokenizer ids, stop ids, the chat CLI.

fmjax/hf/chat.py, the chat parts of fmjax/hf/tokenizer.py, fmjax.generate.stream and
train/chat.py. Where transformers is installed every rendering and id list is compared with
its `apply_chat_template`; the expected strings and ids are also written here (checked by hand
against the templates), so the tests mean something without transformers too.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jinja2
import pytest

from fmjax import hf
from fmjax.hf import chat

REPO = pathlib.Path(__file__).resolve().parents[1]
GPT2 = REPO / "tests" / "golden" / "hf" / "gpt2"
SMOLLM2 = pathlib.Path(os.environ.get("FMJAX_SMOLLM2") or
                       pathlib.Path.home() / ".cache" / "fmjax" / "smollm2-135m-instruct")

try:
  import transformers
  transformers.logging.set_verbosity_error()
except ImportError:
  transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers not installed")

# --------------------------------------------------------------------------- templates

CHATML = (  # SmolLM2-135M-Instruct's, as its GGUF ships it
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")

LLAMA3 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {{- "You have these tools:\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=2) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

GEMMA = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is AI? Ünï 東京"},
            {"role": "assistant", "content": " A field. "},
            {"role": "user", "content": "More?"}]
TOOLS = [{"name": "clock", "description": "<time> & \"zone\"", "parameters": {"tz": "é"}}]
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>"}

EXPECTED = {  # (template, messages, context) -> text, written out by hand from the templates
    "chatml": (CHATML, MESSAGES[1:2], {},
               "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
               "Hugging Face<|im_end|>\n<|im_start|>user\nWhat is AI? Ünï 東京<|im_end|>\n"
               "<|im_start|>assistant\n"),
    "llama3": (LLAMA3, MESSAGES, {"date_string": "26 Jul 2024"},
               "<s><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
               "December 2023\nToday Date: 26 Jul 2024\n\nYou are terse.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nWhat is AI? Ünï 東京<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nA field.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nMore?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "gemma": (GEMMA, MESSAGES, {},
              "<s><start_of_turn>user\nYou are terse.\n\nWhat is AI? Ünï 東京<end_of_turn>\n"
              "<start_of_turn>model\nA field.<end_of_turn>\n<start_of_turn>user\nMore?"
              "<end_of_turn>\n<start_of_turn>model\n"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_templates_render_the_pinned_text(name):
  template, messages, context = EXPECTED[name][:3]
  text = chat.render_chat_template(template, messages, add_generation_prompt=True,
                                   special_tokens=SPECIALS, **context)
  assert text == EXPECTED[name][3]


def test_template_environment_is_transformers():
  # tojson keeps non-ASCII and HTML characters (Jinja's own escapes them) and takes indent.
  text = chat.render_chat_template(LLAMA3, MESSAGES[:2], tools=TOOLS, special_tokens=SPECIALS,
                                   date_string="1 Jan 2025")
  assert json.dumps(TOOLS[0], ensure_ascii=False, indent=2) + "\n\nYou are terse." in text
  # strftime_now: today's date when the caller gives none.
  import datetime
  today = datetime.datetime.now().strftime("%d %b %Y")
  assert f"Today Date: {today}\n" in chat.render_chat_template(LLAMA3, MESSAGES[1:2])
  # raise_exception is a TemplateError with the template's message.
  with pytest.raises(jinja2.TemplateError, match="roles must alternate"):
    chat.render_chat_template(GEMMA, [MESSAGES[1], MESSAGES[1]])
  # A sandbox: no attribute escapes; {% generation %} blocks render their body; None values drop.
  with pytest.raises(jinja2.exceptions.SecurityError):
    chat.render_chat_template("{{ messages.__class__.__mro__ }}", MESSAGES)
  assert chat.render_chat_template("{% generation %}[{{ messages[0].content }}]"
                                   "{% endgeneration %}", MESSAGES) == "[You are terse.]"
  assert chat.render_chat_template("{{ messages[0].tool_calls is defined }}",
                                   [{"role": "user", "content": "x", "tool_calls": None}]) == "False"


@needs_transformers
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_templates_equal_transformers(name, gpt2_chat_dir):
  ref = transformers.AutoTokenizer.from_pretrained(str(gpt2_chat_dir))
  tok = hf.tokenizer_from_pretrained(gpt2_chat_dir)
  template, _, context = EXPECTED[name][:3]
  for messages in (MESSAGES, MESSAGES[1:2], MESSAGES[:2]):
    for prompt in (True, False):
      for tools in (None, TOOLS):
        kw = dict(add_generation_prompt=prompt, chat_template=template, tools=tools, **context)
        if name == "gemma" and messages is MESSAGES[:2] and not prompt:
          continue
        assert (tok.apply_chat_template(messages, tokenize=False, **kw)
                == ref.apply_chat_template(messages, tokenize=False, **kw))
        assert (tok.apply_chat_template(messages, **kw)
                == ref.apply_chat_template(messages, return_dict=False, **kw))


# --------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def gpt2_chat_dir(tmp_path_factory):
  """The tiny GPT-2 golden with a chat template and a generation_config.json whose stop ids
  are a list: 0 (<|endoftext|>) and 158, the 5th token of its greedy answer below."""
  d = tmp_path_factory.mktemp("gpt2_chat")
  for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "vocab.json", "merges.txt"):
    shutil.copy(GPT2 / name, d / name)
  config = json.loads((d / "tokenizer_config.json").read_text())
  config["chat_template"] = ("{% for m in messages %}{{ m['role'][0] }}: {{ m['content'] }}\n"
                             "{% endfor %}{% if add_generation_prompt %}a:{% endif %}")
  (d / "tokenizer_config.json").write_text(json.dumps(config))
  (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 158]}))
  return d


CHAT_IDS = [83, 26, 221, 34, 69, 221, 66, 82, 73, 69, 70, 14, 199, 85, 26, 221, 40, 69, 297,
            79, 266, 269, 199, 65, 26]  # "s: Be brief.\nu: Hello there\na:" in the golden BPE


def test_chat_ids_pinned(gpt2_chat_dir):
  tok = hf.tokenizer_from_pretrained(gpt2_chat_dir)
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
  assert tok.apply_chat_template(messages, add_generation_prompt=True,
                                 tokenize=False) == "s: Be brief.\nu: Hello there\na:"
  assert tok.apply_chat_template(messages, add_generation_prompt=True) == CHAT_IDS
  # The template survives Tokenizer.save / fmjax.data.load_tokenizer.
  from fmjax import data
  tok.save(gpt2_chat_dir / "saved")
  again = data.load_tokenizer(gpt2_chat_dir / "saved")
  assert again.apply_chat_template(messages, add_generation_prompt=True) == CHAT_IDS


def test_no_chat_template_is_a_clear_error():
  tok = hf.tokenizer_from_pretrained(GPT2)
  with pytest.raises(ValueError, match="no chat template.*base model"):
    tok.apply_chat_template([{"role": "user", "content": "hi"}])


def _train(tmp_path, kind: str):
  """A tiny tokenizer trained offline and saved as transformers would find it, in the layout
  of Llama 3 (byte-level BPE), Llama 2 / Mistral (SentencePiece-style BPE with byte fallback
  and a "▁" prepended) or Gemma (the same without the prepended "▁"); all add a BOS, and
  tokenizer_config.json names the class the real checkpoints name (transformers 5 rebuilds
  the Llama and Gemma ones from the vocabulary)."""
  import tokenizers
  from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
  text = ["What is artificial intelligence? It is a field of computer science.",
          "Hello there, how are you today? Ünïcode 東京 café 🙂 naïve tabs\tand  spaces"] * 20
  if kind == "llama3":
    specials = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos, eos, template, cls = "<|begin_of_text|>", "<|eot_id|>", LLAMA3, "PreTrainedTokenizerFast"
  else:
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    base = tokenizers.Tokenizer(models.BPE())
    base.normalizer = normalizers.Replace(" ", "▁")
    base.train_from_iterator(["▁" + t for t in text], trainers.BpeTrainer(vocab_size=300))
    state = json.loads(base.to_str())["model"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for t in sorted(state["vocab"], key=state["vocab"].get):
      vocab.setdefault(t, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True,
                                          fuse_unk=True))
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if kind.startswith("llama2"):
      tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                             normalizers.Replace(" ", "▁")])
      tok.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)])
      cls = "LlamaTokenizer"
    else:
      tok.normalizer = normalizers.Replace(" ", "▁")
      tok.decoder = decoders.Sequence(steps)
      cls = "GemmaTokenizer"
    tok.add_special_tokens(specials)
    bos, eos, template = "<bos>", "<eos>", GEMMA
  tok.post_processor = processors.TemplateProcessing(
      single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, tok.token_to_id(bos))])
  d = tmp_path / kind
  d.mkdir()
  tok.save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": cls, "bos_token": bos, "legacy": kind == "llama2-legacy", "eos_token": eos,
      "chat_template": template}))
  return d


TEXTS = ["Hello there", "What is artificial intelligence?", "  spaces\tand\nlines ",
         "Ünïcode 東京 café 🙂 ☃ unseen words", "<|eot_id|><end_of_turn> inline specials",
         "a <start_of_turn>user\nhi<end_of_turn>\n", ""]


@needs_transformers
@pytest.mark.parametrize("kind", ["llama3", "llama2", "llama2-legacy", "gemma"])
def test_trained_tokenizers_equal_transformers(tmp_path, kind):
  d = _train(tmp_path, kind)
  ref = transformers.AutoTokenizer.from_pretrained(str(d))
  tok = hf.tokenizer_from_pretrained(d)
  assert tok.bos_token == ref.bos_token and tok.bos_id == ref.bos_token_id
  for text in TEXTS:
    assert tok.encode(text, add_special_tokens=True) == ref(text)["input_ids"], text
    assert tok.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text
    assert tok.encode(text, add_special_tokens=True)[0] == tok.bos_id
  for messages in (MESSAGES[1:2], MESSAGES):
    kw = dict(add_generation_prompt=True, date_string="26 Jul 2024")
    assert (tok.apply_chat_template(messages, **kw)
            == ref.apply_chat_template(messages, return_dict=False, **kw))
  # Each template's BOS is its tokenizer's.
  assert tok.apply_chat_template(MESSAGES[1:2], date_string="x")[0] == tok.bos_id


@needs_transformers
@pytest.mark.skipif(not (SMOLLM2 / "tokenizer.json").is_file(),
                    reason=f"no SmolLM2 directory at {SMOLLM2} (bench/make_smollm2.py writes it)")
def test_smollm2_tokenizer_equals_transformers():
  ref = transformers.AutoTokenizer.from_pretrained(str(SMOLLM2))
  tok = hf.tokenizer_from_pretrained(SMOLLM2)
  for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
    assert tok.encode(text, add_special_tokens=True) == ref(text)["input_ids"], text
  for messages in (MESSAGES, MESSAGES[1:2]):
    for prompt in (True, False):
      assert (tok.apply_chat_template(messages, add_generation_prompt=prompt)
              == ref.apply_chat_template(messages, add_generation_prompt=prompt,
                                         return_dict=False))
  assert hf.generation_config(SMOLLM2).stop_tokens == (tok.eos_id,) == (2,)


# --------------------------------------------------------------------------- generation_config


def test_generation_config(tmp_path):
  def read(**config):
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    return hf.generation_config(tmp_path)
  assert read(eos_token_id=7) == hf.GenerationDefaults(stop_tokens=(7,))
  assert read(eos_token_id=[128001, 128008, 128009, 128001]).stop_tokens == (128001, 128008,
                                                                             128009)
  # Greedy unless do_sample, as transformers; then transformers' defaults fill the gaps.
  assert read(eos_token_id=1, temperature=0.6, top_p=0.9).sampling() == {
      "temperature": 0.0, "top_k": 0, "top_p": 1.0}
  assert read(do_sample=True, temperature=0.6, top_p=0.9, max_new_tokens=99) == \
      hf.GenerationDefaults(temperature=0.6, top_k=50, top_p=0.9, max_new_tokens=99)
  with pytest.raises(ValueError, match="eos_token_id='2'"):
    read(eos_token_id="2")
  (tmp_path / "generation_config.json").unlink()  # then config.json's, as transformers
  (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [5, 6]}))
  assert hf.generation_config(tmp_path).stop_tokens == (5, 6)


# --------------------------------------------------------------------------- streaming + CLI


class _Chars:
  """decode() of a byte tokenizer: ids are UTF-8 bytes."""

  def decode(self, ids):
    return bytes(ids).decode("utf-8", errors="replace")


def test_text_stream_waits_for_whole_characters():
  stream = chat.TextStream(_Chars(), skip=[0])
  pieces = [stream.push(b) for b in "a東b".encode("utf-8")] + [stream.push(0)]
  assert pieces == ["a", "", "", "東", "b", ""]
  assert stream.text == "a東b"


def test_chat_cli_prompt_streams_and_stops(gpt2_chat_dir, env):
  # Greedy, the tiny model answers 26 26 26 26 158 120 120 ...: ":::: " then a byte that is
  # half a character; the stop id 158 (generation_config.json's list) ends it after 5 tokens,
  # well before --max_new_tokens=20.
  proc = subprocess.run(
      [sys.executable, "-m", "train.chat", f"--hf={gpt2_chat_dir}", "--prompt=Hello there",
       "--system=Be brief.", "--max_new_tokens=20"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout == "::::\n"


def test_chat_and_sample_programs_in_process(gpt2_chat_dir):
  from train import chat as chat_program
  from train import sample
  with pytest.raises(ValueError, match="has no chat template.*train.sample --hf="):
    chat_program.run(str(GPT2), prompt="Hello")
  with pytest.raises(ValueError, match="--prompt is empty"):
    chat_program.run(str(gpt2_chat_dir), prompt=" ")
  # train/sample.py --hf: plain text (no template: the chat prompt written out gives the
  # same ids as CHAT_IDS); greedy as generation_config.json says; the stop id 158 ends it
  # and is not shown.
  prompt = "s: Be brief.\nu: Hello there\na:"
  assert sample.sample_hf(str(gpt2_chat_dir), prompt, max_new_tokens=20) == prompt + "::::"


def test_interactive_chat_keeps_the_conversation(gpt2_chat_dir, monkeypatch, capsys):
  import io
  from train import chat as chat_program
  # Two turns, then an empty line ends; the second turn's prompt is the whole conversation.
  # (Greedy, the tiny model answers "Hello there" with 26 26 26: ":::".)
  monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\nOk\n\n"))
  calls = []
  real = chat_program.reply
  monkeypatch.setattr(chat_program, "reply",
                      lambda *a, **k: (calls.append([dict(m) for m in a[3]]), real(*a, **k))[1])
  chat_program.run(str(gpt2_chat_dir), max_new_tokens=3)
  lines = capsys.readouterr().out.split("\n")
  assert lines[0] == "> :::" and lines[1].startswith("> ") and lines[2] == "> "
  assert calls[1] == [{"role": "user", "content": "Hello there"},
                      {"role": "assistant", "content": ":::"},
                      {"role": "user", "content": "Ok"}]


def test_stream_equals_generate_when_sampling(gpt2_chat_dir):
  # The same seed gives the same tokens, and a stop id ends the stream right after it.
  from fmjax import generate
  model, variables = hf.from_pretrained(gpt2_chat_dir, task="causal_lm")
  settings = dict(max_new_tokens=10, temperature=2.0, top_k=50, top_p=0.95, seed=3)
  expected = generate.generate(model, variables["params"], [CHAT_IDS], **settings)[0]
  stop = expected[5]  # 213 with jax 0.10's PRNG: [63, 21, 21, 142, 174, 213, 131, ...]
  assert expected.index(stop) >= 4  # so that several sampled tokens are compared
  got = list(generate.stream(model, variables["params"], CHAT_IDS, stop_tokens=[stop], **settings))
  assert got == expected[:expected.index(stop) + 1]
