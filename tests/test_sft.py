"""Supervised finetuning: fmjax/data/sft.py and train/sft.py (issue 18, item 3, without LoRA).

Pinned: the loss masks of both row kinds, rendered with a ChatML chat template and in the plain
format, token by token by hand; truncation and packing by hand; a packed batch's per-example
losses equal the examples' separate losses (a tiny Llama, segment ids and restarted
positions); the program, from a tiny random Llama saved by fmjax.hf.save_pretrained with a
character-level tokenizer and a chat template, overfits a handful of examples (response loss
far below its start), answers the eval prompts with the trained responses, resumes to the
same metrics and parameters, and exports a merged Hugging Face directory that reloads with
equal logits; bad rows are one error line naming the file and line.
"""

import copy
import importlib
import json
import pathlib
import shutil
import subprocess
import re
import sys

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models

from fmjax.data import sft
from fmjax.data.text import DataError

REPO = pathlib.Path(__file__).resolve().parents[1]
SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
TRAIN = [
    {"prompt": "Capital of France?", "response": "Paris."},
    {"prompt": "Spell cat backwards.", "response": "tac"},
    {"prompt": "Two plus three?", "response": "Five."},
    {"messages": [{"role": "system", "content": "Be terse."},
                  {"role": "user", "content": "Is water wet?"},
                  {"role": "assistant", "content": "Yes."}]},
    {"messages": [{"role": "user", "content": "Count to three."},
                  {"role": "assistant", "content": "1, 2, 3."},
                  {"role": "user", "content": "Backwards."},
                  {"role": "assistant", "content": "3, 2, 1."}]},
]
STEPS, SAVE_EVERY, SEQ_LEN = 60, 30, 96
TIMINGS = ("tokens_per_second", "mfu")


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
  return make_chat_dir(tmp_path_factory.mktemp("chat_llama"))


def make_chat_dir(d: pathlib.Path) -> pathlib.Path:
  """A tiny random Llama (fmjax.hf.save_pretrained) with a character-level tokenizer.json,
  ChatML special tokens and chat template (tokenizer_config.json), in `d`."""
  import jax
  from fmjax import hf
  from fmjax.models import decoder
  vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
  tok.add_special_tokens(SPECIALS)
  tok.decoder = decoders.Fuse()
  tok.save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps(
      {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>",
       "chat_template": CHATML}))
  config = decoder.get_config("tiny", vocab_size=len(vocab), max_len=128, embed_dim=32,
                              mlp_dim=64)
  model = decoder.Decoder(config)
  variables = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 8), np.int32))
  hf.save_pretrained(model, variables, d)
  return d


@pytest.fixture(scope="module")
def chat_tok(chat_dir):
  from fmjax import hf
  return hf.tokenizer_from_pretrained(chat_dir)


def ids_of(tok, pieces):
  """Hand-written tokens: a special token whole, any other string character by character."""
  return [tok.token_to_id(p) for piece in pieces
          for p in ([piece] if piece in SPECIALS else list(piece))]


# ------------------------------------------------------------------------------ loss masks


def test_chat_template_mask_prompt_response_row_by_hand(chat_tok):
  conversation = sft.parse_row({"prompt": "Hi", "response": "Yo"}, "x.jsonl:1")
  fmt = sft.make_format(chat_tok)
  assert fmt.name == "chat_template"
  ids, loss = fmt.encode(conversation)
  prompt = ["<|im_start|>", "user\nHi", "<|im_end|>", "\n", "<|im_start|>", "assistant\n"]
  trained = ["Yo", "<|im_end|>"]
  assert ids.tolist() == ids_of(chat_tok, prompt + trained + ["\n"])
  n_prompt, n_trained = len(ids_of(chat_tok, prompt)), len(ids_of(chat_tok, trained))
  assert loss.tolist() == [False] * n_prompt + [True] * n_trained + [False]
  assert fmt.stop_tokens == (chat_tok.token_to_id("<|im_end|>"),)
  assert fmt.prompt(conversation) == ids_of(chat_tok, prompt)


def test_chat_template_mask_messages_row_by_hand(chat_tok):
  conversation = sft.parse_row({"messages": [
      {"role": "system", "content": "S"}, {"role": "user", "content": "A"},
      {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"},
      {"role": "assistant", "content": "D"}]}, "x.jsonl:2")
  ids, loss = sft.make_format(chat_tok).encode(conversation)
  turn = lambda role, text: ["<|im_start|>", f"{role}\n{text}", "<|im_end|>", "\n"]
  expected = [(p, False) for p in turn("system", "S") + turn("user", "A")]
  expected += [("<|im_start|>", False), ("assistant\n", False), ("B", True),
               ("<|im_end|>", True), ("\n", False)]
  expected += [(p, False) for p in turn("user", "C")]
  expected += [("<|im_start|>", False), ("assistant\n", False), ("D", True),
               ("<|im_end|>", True), ("\n", False)]
  assert ids.tolist() == ids_of(chat_tok, [p for p, _ in expected])
  assert loss.tolist() == [t for p, t in expected for _ in ids_of(chat_tok, [p])]


def test_plain_format_mask_by_hand():
  from fmjax.data import ByteTokenizer
  tok = ByteTokenizer()
  fmt = sft.make_format(tok)
  assert fmt.name == "plain" and fmt.stop_tokens == (tok.eos_id,)
  row = sft.parse_row({"system": "Sys", "prompt": "Hi", "response": "Yo"}, "x.jsonl:3")
  ids, loss = fmt.encode(row)
  prompt = "Sys\n\nUser: Hi\nAssistant: "
  assert ids.tolist() == list(prompt.encode()) + list(b"Yo") + [tok.eos_id]
  assert loss.tolist() == [False] * len(prompt) + [True] * 3
  assert fmt.prompt(row) == list(prompt.encode())
  two = sft.parse_row({"messages": [
      {"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
      {"role": "user", "content": "C"}, {"role": "assistant", "content": "D"}]}, "x.jsonl:4")
  ids, loss = fmt.encode(two)
  parts = [("User: A\nAssistant: ", False), ("B", True), (None, True),
           ("User: C\nAssistant: ", False), ("D", True), (None, True)]
  assert ids.tolist() == [i for p, _ in parts
                          for i in (list(p.encode()) if p else [tok.eos_id])]
  assert loss.tolist() == [t for p, t in parts for _ in (p or "x")]


def test_truncation_keeps_the_prompt_end():
  ids = np.arange(10)
  loss = np.asarray([False] * 6 + [True] * 4)
  out, kept, how = sft.truncate(ids, loss, 8)  # the prompt's first 2 tokens go
  assert (out.tolist(), how) == (list(range(2, 10)), "prompt") and kept.sum() == 4
  out, kept, how = sft.truncate(ids, loss, 4)  # the response does not fit: 2 + 2
  assert (out.tolist(), kept.tolist(), how) == ([4, 5, 6, 7], [False, False, True, True],
                                                "response")
  assert sft.truncate(ids, loss, 10)[2] is None
  from fmjax.data import ByteTokenizer
  rows = [sft.parse_row({"prompt": p, "response": r}, f"t:{i}")
          for i, (p, r) in enumerate([("a" * 30, "b"), ("c", "d" * 30), ("e", "f")])]
  examples, cut = sft.encode_all(rows, sft.make_format(ByteTokenizer()), 24)  # 25 tokens
  assert cut == {"prompt": 1, "response": 1}
  assert [len(ids) for ids, _ in examples] == [25, 25, 21]  # 21: "User: e\nAssistant: f<EOS>"
  ids, loss = examples[0]  # 50 tokens: the last 25, the prompt's end
  assert bytes(ids[:-1].tolist()) == b"a" * 11 + b"\nAssistant: b" and loss.sum() == 2
  ids, loss = examples[1]  # response of 31 > 25: 12 prompt tokens, the response's first 13
  assert bytes(ids.tolist()) == b"\nAssistant: " + b"d" * 13
  assert loss.tolist() == [False] * 12 + [True] * 13


def test_packing_by_hand():
  ex = lambda n, trained: (np.arange(100, 100 + n, dtype=np.int32),
                           np.asarray([False] * (n - trained) + [True] * trained))
  rows = sft.pack([ex(3, 1), ex(4, 2), ex(2, 1)], 4)
  # Best fit, longest first: example 1 (3 pairs) opens row 0, example 0 (2) row 1, example 2
  # (1) fills row 0.
  assert rows["inputs"].tolist() == [[100, 101, 102, 100], [100, 101, 0, 0]]
  assert rows["targets"].tolist() == [[101, 102, 103, 101], [101, 102, 0, 0]]
  assert rows["segment_ids"].tolist() == [[1, 1, 1, 2], [1, 1, 0, 0]]
  assert rows["positions"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 0]]
  assert rows["weights"].tolist() == [[0, 1, 1, 1], [0, 1, 0, 0]]
  single = sft.pack([ex(3, 1), ex(4, 2), ex(2, 1)], 4, packing=False)
  assert single["segment_ids"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]]


@pytest.fixture(scope="module")
def untrained(chat_dir, chat_tok):
  """Each TRAIN example's summed response-token loss and token count under the untrained
  weights, from packed rows and from one row per example (one jitted forward pass)."""
  import jax
  import optax
  from fmjax import hf
  model, variables = hf.from_pretrained(chat_dir)
  examples, _ = sft.encode_all([sft.parse_row(r, f"t:{i}") for i, r in enumerate(TRAIN)],
                               sft.make_format(chat_tok), SEQ_LEN)
  packed, alone = sft.pack(examples, SEQ_LEN), sft.pack(examples, SEQ_LEN, packing=False)
  both = {k: np.concatenate([packed[k], alone[k]]) for k in packed}
  logits = jax.jit(model.apply)(variables, both["inputs"], positions=both["positions"],
                                segment_ids=both["segment_ids"])
  nll = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, both["targets"]))
  nll, seg = nll * both["weights"], both["segment_ids"]
  per_segment = lambda rows: sorted(float(nll[r][seg[r] == s].sum())
                                    for r in rows for s in set(seg[r].tolist()) - {0})
  n = len(packed["inputs"])
  return {"packed": per_segment(range(n)), "alone": [float(nll[n + i].sum()) for i in range(
      len(TRAIN))], "tokens": [float(alone["weights"][i].sum()) for i in range(len(TRAIN))],
          "packed_rows": n}


def test_packed_losses_equal_the_examples_alone(untrained):
  assert untrained["packed_rows"] < len(TRAIN)  # some rows hold several examples
  np.testing.assert_allclose(untrained["packed"], sorted(untrained["alone"]), rtol=1e-5,
                             atol=1e-5)


# ------------------------------------------------------------------------------ bad rows


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a"}', "no 'response' key"),
    ('{"messages": [{"role": "bot", "content": "a"}]}', "role 'bot'; roles are"),
    ('{"prompt": "a", "response": "  "}', "the response is empty"),
    ('{"messages": [{"role": "user", "content": "a"}]}', "ends with the assistant's answer"),
    ('{"prompt": "a", "response": "b"', "malformed JSON"),
])
def test_bad_rows_name_file_and_line(tmp_path, line, message):
  path = tmp_path / "rows.jsonl"
  path.write_text('{"prompt": "ok", "response": "fine"}\n\n' + line + "\n")
  with pytest.raises(DataError) as e:
    sft.read_jsonl(str(path))
  assert str(e.value).startswith(f"{path.resolve()}:3: ") and message in str(e.value)
  assert "\n" not in str(e.value)


def test_bad_row_is_one_error_line_from_the_program(env, tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": "b"\n')
  proc = subprocess.run(
      [sys.executable, "-m", "train.sft", "--config=configs/sft.py:tiny",
       f"--workdir={tmp_path / 'run'}", f"--config.data.train_path={bad}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and lines[-1] == (
      f"error: {bad.resolve()}:2: malformed JSON (Expecting ',' delimiter at column 32); each "
      "line must be one JSON object"), proc.stderr
  assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ the program


def tiny_config(chat_dir, data, **overrides):
  config = importlib.import_module("configs.sft").get_config("tiny")
  config.init_from = f"hf:{chat_dir}"
  config.data.train_path, config.data.eval_path = str(data / "train.jsonl"), str(
      data / "eval.jsonl")
  config.data.seq_len = SEQ_LEN
  config.train.update(steps=STEPS, batch_size=4, learning_rate=1e-2, warmup_steps=5,
                      log_every=10, eval_every=SAVE_EVERY, save_every=SAVE_EVERY)
  config.sample.update(num_prompts=2, num_tokens=12)
  for key, value in overrides.items():
    *parents, last = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[last] = value
  return config


@pytest.fixture(scope="module")
def trained(chat_dir, tmp_path_factory):
  from train import sft as program
  data = tmp_path_factory.mktemp("sft_data")
  write_jsonl(data / "train.jsonl", TRAIN)
  write_jsonl(data / "eval.jsonl", [TRAIN[0], TRAIN[4]])  # as `untrained` sees them
  workdir = tmp_path_factory.mktemp("sft") / "run"
  state, tokenizer, model, last = program.run(tiny_config(chat_dir, data), str(workdir))
  return data, workdir, state, model, last


def rows(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_overfits_and_answers_with_the_trained_response(trained, untrained):
  data, workdir, _, _, last = trained
  start = sum(untrained["alone"][i] for i in (0, 4)) / sum(untrained["tokens"][i] for i in (0, 4))
  assert start > 3.0  # a random model: about ln(100 ids)
  assert last["eval/loss"] < 0.1 * start
  assert last["eval/answer_match"] == 1.0
  answers = [json.loads(line) for line in
             (workdir / "predictions" / f"step_{STEPS}.jsonl").read_text().splitlines()]
  assert [(a["answer"], a["reference"]) for a in answers] == [("Paris.", "Paris."),
                                                              ("3, 2, 1.", "3, 2, 1.")]
  assert list((workdir / "tensorboard").glob("*.answers"))


def test_resume_equals_uninterrupted(trained, chat_dir, tmp_path):
  from fmjax import checkpoint
  from train import sft as program
  data, workdir, state, _, _ = trained
  again = tmp_path / "run"
  shutil.copytree(workdir, again)
  shutil.rmtree(again / "checkpoints" / str(STEPS))  # as if killed before the final save
  resumed, *_ = program.run(tiny_config(chat_dir, data), str(again))
  strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMINGS} for r in rs]
  assert strip(rows(again)) == strip(rows(workdir))
  flat = lambda params: checkpoint.flatten_params(params)
  for path, x in flat(state.params).items():
    np.testing.assert_array_equal(np.asarray(flat(resumed.params)[path]), np.asarray(x), path)


def test_export_reloads_with_equal_logits(trained):
  import jax
  from fmjax import hf
  _, workdir, state, model, _ = trained
  merged = workdir / "export" / "merged"
  loaded, variables = hf.from_pretrained(merged)
  assert loaded == model  # the same architecture and runtime: one compiled forward pass
  forward = jax.jit(model.apply)
  tokens = np.asarray([[5, 9, 2, 40, 41, 3, 17]], np.int32)
  np.testing.assert_allclose(np.asarray(forward(variables, tokens)),
                             np.asarray(forward({"params": state.params}, tokens)),
                             rtol=1e-5, atol=1e-5)
  tok = hf.tokenizer_from_pretrained(merged)
  assert tok.chat_template == CHATML


def test_lora_trains_the_adapters_only_and_exports_peft_and_merged(chat_dir, untrained,
                                                                   tmp_path):
  """config.lora.rank=4: only adapters train (trainable_params by hand from the kernels'
  shapes), the base weights come out bit for bit, the response loss falls, and the run ends
  with a PEFT adapter whose logits on the base equal the merged export's."""
  import jax
  from fmjax import checkpoint, hf, lora
  from fmjax.hf import peft as hf_peft
  from train import sft as program
  write_jsonl(tmp_path / "train.jsonl", TRAIN)
  write_jsonl(tmp_path / "eval.jsonl", [TRAIN[0], TRAIN[4]])
  config = tiny_config(chat_dir, tmp_path, **{"lora.rank": 4, "lora.alpha": 8.0,
                                              "train.steps": 40, "train.save_every": 40,
                                              "train.eval_every": 40})
  workdir = tmp_path / "run"
  state, _, model, last = program.run(config, str(workdir))

  base_model, base = hf.from_pretrained(chat_dir)
  kernels = {p: x.shape for p, x in checkpoint.flatten_params(base["params"]).items()
             if re.search(r"/(attn/(query|key|value|out)|mlp/(wi|wi_up|wo))/kernel$", p)}
  split = {"query": 1, "key": 1, "value": 1, "out": 2, "wi": 1, "wi_up": 1, "wo": 1}
  by_hand = sum(4 * (int(np.prod(shape[:split[p.split("/")[-2]]]))
                     + int(np.prod(shape[split[p.split("/")[-2]]:])))
                for p, shape in kernels.items())
  first = rows(workdir)[0]
  assert first["trainable_params"] == by_hand > 0
  assert first["total_params"] == sum(x.size for x in jax.tree.leaves(base["params"])) + by_hand
  trained_flat = checkpoint.flatten_params(state.params)
  for path, x in checkpoint.flatten_params(base["params"]).items():  # the base is frozen
    np.testing.assert_array_equal(np.asarray(trained_flat[path]), np.asarray(x), path)
  start = sum(untrained["alone"][i] for i in (0, 4)) / sum(untrained["tokens"][i] for i in (0, 4))
  # adapters on a random 2-layer base under frozen random embeddings learn slowly (plain
  # optax Adam on the same adapters gives the same curve): 4.60 -> 4.14 in 40 steps
  assert last["eval/loss"] < 0.93 * start, (last, start)

  peft_dir = workdir / "export" / "peft"
  assert {p.name for p in peft_dir.iterdir()} >= {"adapter_config.json",
                                                  "adapter_model.safetensors"}
  adapted, spec = hf_peft.load_adapter(peft_dir, base_model, base["params"])
  assert (spec.rank, spec.alpha) == (4, 8.0)
  merged_model, merged = hf.from_pretrained(workdir / "export" / "merged")
  tokens = np.asarray([[5, 9, 2, 40, 41, 3, 17]], np.int32)
  with_adapter = lora.apply(base_model, adapted, spec, tokens)
  np.testing.assert_allclose(np.asarray(with_adapter),
                             np.asarray(jax.jit(merged_model.apply)(merged, tokens)),
                             rtol=1e-5, atol=1e-5)


def test_every_key_of_every_variant_has_a_rule_or_a_reason(monkeypatch):
  from train import checks
  monkeypatch.chdir(REPO)  # the tiny recipe names its data relative to the repository
  module = importlib.import_module("configs.sft")

  def leaves(node, prefix=""):
    for key, value in node.items():
      if hasattr(value, "items"):
        yield from leaves(value, f"{prefix}{key}.")
      else:
        yield prefix + key

  for variant in module.VARIANTS:
    config = module.get_config(variant)
    assert set(leaves(config)) - set(checks.RULES) - checks.FREE_FORM == set(), variant
  checks.validate(module.get_config("tiny"))
  bad = copy.deepcopy(module.get_config("tiny"))
  bad.data.prompt_format = "chatml"
  with pytest.raises(ValueError, match="--config.data.prompt_format=chatml: not one of"):
    checks.validate(bad)


def test_export_loads_in_transformers_with_equal_logits(trained):
  """Live: transformers reads export/merged (weights, tokenizer, chat template)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  import jax
  _, workdir, state, model, _ = trained
  merged = workdir / "export" / "merged"
  reference = transformers.AutoModelForCausalLM.from_pretrained(merged)
  tokenizer = transformers.AutoTokenizer.from_pretrained(merged)
  messages = [{"role": "user", "content": "Capital of France?"}]
  ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
  from fmjax import hf
  assert ids == hf.tokenizer_from_pretrained(merged).apply_chat_template(
      messages, add_generation_prompt=True)
  with torch.no_grad():
    expected = reference(torch.tensor([ids])).logits.numpy()
  ours = np.asarray(jax.jit(model.apply)({"params": state.params}, np.asarray([ids], np.int32)))
  np.testing.assert_allclose(ours[..., :expected.shape[-1]], expected, rtol=1e-4, atol=1e-4)
