"""Supervised finetuning (instruction tuning) of a causal LM on prompt/response conversations.

  python -m train.sft --config=configs/sft.py:tiny --workdir=DIR \\
      [--config.init_from=hf:DIR_OR_WORKDIR] [--config.data.train_path=train.jsonl ...]

The base model is config.init_from: a Hugging Face directory (hf:DIR, a decoder family or
GPT-2) or an fmjax workdir, whose architecture and tokenizer come with it; without one, a
config.model GPT over the byte tokenizer starts from random weights (the tiny recipe). The
JSONL rows (fmjax/data/sft.py) are rendered with the tokenizer's chat template when it has one
(config.data.prompt_format), the loss counting only the assistant's tokens and end-of-turn token,
and packed into config.data.seq_len rows with segment ids (no attention between examples).
Every evaluation computes eval/loss and eval/accuracy over the eval file's response tokens
and answers its first config.sample.num_prompts prompts with fmjax.generate (inside the jitted
predict step, on the mesh): the answers go to the log, TensorBoard (text, "eval_answers") and
DIR/predictions/step_N.jsonl, and eval/answer_match is the fraction equal to the reference.
When training ends, DIR/export/merged/ gets the model in Hugging Face format with its tokenizer
files (rerun a finished run to export again). Rerunning resumes from DIR/checkpoints.
config.lora.rank > 0 (LoRA, fmjax.lora): adapters of that rank on the attention and MLP
projections (config.lora.targets) train while the base stays as loaded, with optimizer state
for the adapters only; the end also writes DIR/export/peft/ (adapter_config.json +
adapter_model.safetensors, loadable by peft.PeftModel.from_pretrained(base, DIR/export/peft))
and export/merged/ holds the model with the adapters merged in.
"""

import json
import logging
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fmjax import data as fdata
from fmjax import errors, generate, heads, hf, lora, memory, sharding, sources
from fmjax.hf import peft as hf_peft
from fmjax.data import sft
from fmjax.data.tokenizers import METADATA_FILE
from fmjax.models import gpt
from train import common, pretrain_gpt

log = logging.getLogger("fmjax")

# The tokenizer's files in a Hugging Face directory, copied into the export as they are.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt",
                   "vocab.txt", "tokenizer.model", "additional_chat_templates")


def tokenizer_settings(config) -> list[str]:
  """The config keys fixed on resume: the source (it decides the tokenizer: the source's or
  bytes) and the adapters' rank and targets (the checkpoint's parameters)."""
  return ["init_from", "lora.rank", "lora.targets"]


def build_tokenizer(workdir: str, source):
  """The workdir's tokenizer when resuming, else the source's, else the byte tokenizer."""
  saved = os.path.join(workdir, "tokenizer")
  if os.path.exists(os.path.join(saved, METADATA_FILE)):
    return fdata.load_tokenizer(saved)
  return source.tokenizer() if source else fdata.ByteTokenizer()


def read(config, key: str) -> list[sft.Conversation]:
  """The conversations of config.data.<key> ([] when it is empty)."""
  path = config.data[key]
  return sft.read_jsonl(path) if path else []


def encode(config, fmt, conversations, what: str):
  """Conversations -> packed rows (with a "weight" column of ones), logged."""
  d = config.data
  examples, cut = sft.encode_all(conversations, fmt, d.seq_len)
  rows = sft.pack(examples, d.seq_len, packing=d.packing)
  rows["weight"] = np.ones(len(rows["inputs"]), np.float32)
  used = sum(len(ids) - 1 for ids, _ in examples)
  log.info(
      "%s: %d examples (%s format) -> %d rows of %d positions (%.0f%% filled), %d response "
      "tokens%s", what, len(examples), fmt.name, len(rows["inputs"]), d.seq_len,
      100 * used / rows["inputs"].size, int(rows["weights"].sum()),
      f"; truncated to {d.seq_len + 1} tokens: {cut['prompt']} at the prompt's start, "
      f"{cut['response']} at the response's end too" if cut["prompt"] + cut["response"] else "")
  return examples, rows


def show(tokenizer, ids, loss) -> str:
  """An encoded example as text, the tokens the loss counts in [[...]] (EOS shown, which
  decode leaves out)."""
  eos = getattr(tokenizer, "eos_token", "<eos>")
  text = lambda run: eos.join(tokenizer.decode(part) for part in np.split(
      run, np.flatnonzero(run == tokenizer.eos_id)) for part in [part[part != tokenizer.eos_id]])
  parts, start = [], 0
  for i in range(1, len(ids) + 1):
    if i == len(ids) or loss[i] != loss[start]:
      parts.append(f"[[{text(ids[start:i])}]]" if loss[start] else text(ids[start:i]))
      start = i
  return "".join(parts)


def make_predict_fn(model, settings: generate.GenerateConfig, seed: int):
  """predict_fn(params, batch) for fit: a batch of eval rows -> per-row response-token sums
  {"nll", "correct", "tokens"}; a batch {"prompt", "prompt_lengths"} -> generated
  {"tokens", "lengths"} (fmjax.generate.generate_tokens inside the jitted step)."""
  def predict_fn(params, batch):
    if "prompt" in batch:
      out = generate.generate_tokens(model, params, batch["prompt"], batch["prompt_lengths"],
                                     jax.random.key(seed), settings)
      return {"tokens": out.tokens, "lengths": out.lengths}
    logits = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                         segment_ids=batch["segment_ids"], train=False).astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    w = batch["weights"] * batch["weight"][:, None]
    correct = (logits.argmax(-1) == batch["targets"]).astype(jnp.float32)
    return {"nll": (nll * w).sum(-1), "correct": (correct * w).sum(-1), "tokens": w.sum(-1)}
  return predict_fn


def prompt_batch(prompts: list[list[int]], longest: int, shards: int):
  """This process's rows of the left-padded prompt batch (rows repeated up to `shards`)."""
  prompts = [p[-longest:] for p in prompts]
  rows = prompts + [prompts[0]] * (-len(prompts) % (shards * jax.process_count()))
  width = generate.bucket_length(max(len(p) for p in rows))
  tokens = np.zeros((len(rows), width), np.int32)
  for row, p in zip(tokens, rows):
    row[width - len(p):] = p
  b = len(rows) // jax.process_count()
  mine = slice(jax.process_index() * b, (jax.process_index() + 1) * b)
  return {"prompt": tokens[mine], "prompt_lengths": np.asarray([len(p) for p in rows],
                                                               np.int32)[mine]}


class Evaluation:
  """fit's score_fn: response-token loss over the eval rows, and answers to eval prompts.

  Args:
    config: the run config.
    workdir: predictions/ and tensorboard/ go here.
    tokenizer, fmt: decode answers; render prompts.
    conversations: the eval conversations (the first config.sample.num_prompts are answered).
    rows: their packed rows.
    train_data: the train iterator (its step is the step evaluated).
    max_prompt: prompts keep their last max_prompt tokens.
    stop_tokens: ids that end an answer (dropped from its text).
    shards: the mesh's batch shards.
  """

  def __init__(self, config, workdir, tokenizer, fmt, conversations, rows, train_data,
               max_prompt: int, stop_tokens, shards: int):
    self.config, self.workdir, self.tokenizer = config, workdir, tokenizer
    self.rows, self.train_data, self.stop_tokens = rows, train_data, set(stop_tokens)
    self.asked = conversations[:config.sample.num_prompts]
    self.prompts = [fmt.prompt(c) for c in self.asked]
    self.max_prompt, self.shards = max_prompt, shards
    clipped = sum(len(p) > max_prompt for p in self.prompts)
    if clipped:
      log.warning("%d of the %d eval prompts answered are longer than the model's max_len - "
                  "sample.num_tokens = %d tokens: they keep their last %d", clipped,
                  len(self.prompts), max_prompt, max_prompt)
    self._tb = None

  def __call__(self, predict) -> dict:
    sums = np.zeros(3)
    for batch in fdata.padded_batches(self.rows, self.config.train.batch_size,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count()):
      out = predict(batch)
      sums += [out["nll"].sum(), out["correct"].sum(), out["tokens"].sum()]
    m = {"eval/loss": sums[0] / sums[2], "eval/accuracy": sums[1] / sums[2]}
    if self.asked:
      answers = self.answers(predict)
      m["eval/answer_match"] = float(np.mean([a.strip() == c.response.strip()
                                              for a, c in zip(answers, self.asked)]))
      self.write(self.train_data.step, answers)
    return m

  def answers(self, predict) -> list[str]:
    out = predict(prompt_batch(self.prompts, self.max_prompt, self.shards))
    texts = []
    for tokens, n in zip(out["tokens"][:len(self.prompts)], out["lengths"]):
      ids = [int(i) for i in tokens[:n]]
      if ids and ids[-1] in self.stop_tokens:
        ids = ids[:-1]
      texts.append(self.tokenizer.decode(ids))
    return texts

  def write(self, step: int, answers: list[str]) -> None:
    if jax.process_index() != 0:
      return
    records = [{"where": c.where, "messages": list(c.messages[:-1]), "reference": c.response,
                "answer": a} for c, a in zip(self.asked, answers)]
    for r in records:
      log.info("step %d answer (%s): %r; reference %r", step, r["where"],
                              r["answer"], r["reference"])
    path = os.path.join(self.workdir, "predictions", f"step_{step}.jsonl")
    with errors.writing(path, "predictions"):
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if self._tb is None:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(self.workdir, "tensorboard"),
                               filename_suffix=".answers")
    self._tb.add_text("eval_answers", "\n\n".join(
        f"**{r['where']}**  \nanswer: `{r['answer']}`  \nreference: `{r['reference']}`"
        for r in records), step)
    self._tb.flush()

  def close(self) -> None:
    """Closes the TensorBoard writer of the answers."""
    if self._tb is not None:
      self._tb.close()


def export(model, params, tokenizer, source, directory: str, stop_tokens=()) -> None:
  """The model in Hugging Face format with its tokenizer's files (see the module docstring);
  a source without a Hugging Face directory gets a generation_config.json naming
  `stop_tokens` (the end-of-turn and EOS ids) as eos_token_id."""
  hf.save_pretrained(model, params, directory)
  if jax.process_index() != 0:
    return
  if isinstance(source, sources.HuggingFace):
    for name in TOKENIZER_FILES:
      path = os.path.join(source.directory, name)
      copy = shutil.copytree if os.path.isdir(path) else shutil.copy
      if os.path.exists(path):
        copy(path, os.path.join(directory, name), **({"dirs_exist_ok": True}
                                                     if os.path.isdir(path) else {}))
    return
  tokenizer.save(directory)  # fmjax_tokenizer.json (+ tokenizer.json for a Hugging Face one)
  if stop_tokens:
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
      json.dump({"eos_token_id": sorted(int(i) for i in stop_tokens)}, f, indent=2)
  if tokenizer.kind != "hf":
    log.warning("export: the %s tokenizer has no Hugging Face form; fmjax reads "
                               "it (fmjax.data.load_tokenizer), transformers does not",
                               tokenizer.kind)
    return
  template = tokenizer.chat_template
  if isinstance(template, dict):
    template = [{"name": k, "template": v} for k, v in template.items()]
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({**tokenizer.named_tokens, **({"chat_template": template} if template else {})},
              f, indent=2)


@common.holds_workdir
def run(config, workdir: str):
  """Finetunes per `config` in `workdir`; returns (state, tokenizer, model, last metrics)."""
  common.prepare_workdir(config, workdir)
  common.refuse_changed_settings(config, workdir, tokenizer_settings)
  d, t, s = config.data, config.train, config.sample
  source = common.sources.parse(config.init_from)
  resumed = os.path.exists(os.path.join(workdir, "tokenizer", METADATA_FILE))
  tokenizer = build_tokenizer(workdir, source)
  try:
    fmt = sft.make_format(tokenizer, d.prompt_format)
  except ValueError as e:
    raise ValueError(f"--config.data.prompt_format={d.prompt_format}: {e}") from None
  if not d.train_path:
    raise ValueError("--config.data.train_path is empty; name the JSONL file(s) to train on")
  train_conversations, eval_conversations = read(config, "train_path"), read(config, "eval_path")

  model_config = (source.architecture(tuple(pretrain_gpt.MODELS))
                  or common.model_config(gpt.GPTConfig, config.model, tokenizer))
  make_model, flops_per_token = pretrain_gpt.MODELS[type(model_config)]
  if d.seq_len > model_config.max_len:
    raise ValueError(f"--config.data.seq_len={d.seq_len} exceeds the model's max_len="
                     f"{model_config.max_len}; lower it (or raise --config.model.max_len)")
  if tokenizer.vocab_size > model_config.vocab_size:
    raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model of "
                     f"--config.init_from={config.init_from} has vocab_size="
                     f"{model_config.vocab_size}; use the tokenizer that goes with the weights")
  max_prompt = model_config.max_len - s.num_tokens
  if s.num_prompts and eval_conversations and max_prompt < 1:
    raise ValueError(f"--config.sample.num_tokens={s.num_tokens} leaves no room for a prompt in "
                     f"the model's {model_config.max_len} positions; lower it")

  train_examples, train_rows = encode(config, fmt, train_conversations, "train")
  log.info("first training example, the trained tokens in [[...]]: %r",
                          show(tokenizer, *train_examples[0]))
  example = (np.zeros((1, d.seq_len), np.int32),)
  # config.lora.rank > 0: adapters on the frozen model's attention and MLP projections.
  _, adapted, spec = common.adapters(config, make_model(model_config, common.runtime(config)),
                                     example)
  build = lambda rt: (make_model(model_config, rt) if spec is None
                      else lora.LoraModel(make_model(model_config, rt), spec))
  runtime, accum_steps, memory_note = common.plan_memory(
      config, build, example,
      memory.Shape(num_layers=model_config.num_layers, embed_dim=model_config.embed_dim,
                   mlp_dim=model_config.mlp_dim, num_heads=model_config.num_heads,
                   num_kv_heads=model_config.num_kv_heads, head_dim=model_config.head_dim,
                   vocab_size=model_config.padded_vocab_size, seq_len=d.seq_len,
                   batch_size=t.batch_size), common.runtime(config),
      trainable=adapted.get("trainable"))
  model = build(runtime)
  if jax.process_index() == 0 and not resumed:
    tokenizer.save(os.path.join(workdir, "tokenizer"))

  train_data = fdata.ExampleBatchIterator(
      fdata.ArraySource({k: v for k, v in train_rows.items() if k != "weight"}),
      batch_size=t.batch_size, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count())
  # An answer ends at the template's end-of-turn id, EOS, or the checkpoint's own stop ids.
  stops = {*fmt.stop_tokens, tokenizer.eos_id}
  if isinstance(source, sources.HuggingFace):
    stops |= set(hf.generation_config(source.directory).stop_tokens)
  evaluation = predict_fn = None
  if eval_conversations:
    _, eval_rows = encode(config, fmt, eval_conversations, "eval")
    settings = generate.GenerateConfig(max_new_tokens=s.num_tokens, temperature=s.temperature,
                                       top_k=s.top_k, stop_tokens=tuple(sorted(stops)))
    evaluation = Evaluation(config, workdir, tokenizer, fmt, eval_conversations, eval_rows,
                            train_data, max_prompt, stops,
                            sharding.batch_shards(sharding.make_mesh(dict(config.mesh))))
    predict_fn = make_predict_fn(model, settings, config.seed)
  task = common.Task(
      model=model, model_config=model_config, loss_fn=heads.causal_lm_loss_fn(model),
      train_data=train_data, eval_data=None, example_batch=train_data.batch_at(0),
      init_args=lambda b: (b["inputs"],),
      flops_per_example=flops_per_token(model_config, d.seq_len) * d.seq_len,
      tokens_per_example=d.seq_len, predict_fn=predict_fn, score_fn=evaluation,
      notes=(memory_note,), **adapted)
  schedule = common.resolve_schedule(t, len(train_rows["inputs"]), accum_steps=accum_steps)
  try:
    state, last = common.fit(config, workdir, task, source=source, schedule=schedule)
  finally:
    if evaluation is not None:
      evaluation.close()

  merged = os.path.join(workdir, "export", "merged")
  if spec is None:
    export(model, state.params, tokenizer, source, merged, stop_tokens=stops)
  else:  # the adapters as PEFT saves them, and the model with them merged in
    peft_dir = os.path.join(workdir, "export", "peft")
    if jax.process_index() == 0:
      hf_peft.save_adapter(peft_dir, model.model, state.params, spec)
    export(model.model, lora.merge(state.params, spec), tokenizer, source, merged,
           stop_tokens=stops)
  common.report(workdir, last)
  if jax.process_index() == 0:
    print(f"  export:      {merged} (Hugging Face format)")
    if spec is not None:
      print(f"               {peft_dir} (PEFT adapter: "
            f"peft.PeftModel.from_pretrained(base, this directory))")
  return state, tokenizer, model, last


if __name__ == "__main__":
  common.main(run, sys.argv)
