"""GPT causal-LM pretraining.

  python -m train.pretrain_gpt --config=configs/gpt.py:shakespeare_char --workdir=DIR \
      [--config.train.steps=3000 ...]

Reads text (local files or a tfds catalog name), trains or loads a tokenizer, packs the
documents into one token stream, trains, evaluates, checkpoints and finally prints a
sample. Rerunning the same command resumes from DIR/checkpoints. config.init_from (a
workdir, or hf:DIR of a Hugging Face GPT-2, Llama, Mistral, Qwen2/3 or Gemma 1/2/3 directory)
brings its architecture, tokenizer and weights: the model built is the one the weights hold
(MODELS), e.g. continued pretraining of SmolLM2 (configs/gpt.py:smollm2).
"""

import itertools
import os
import sys

import jax
import numpy as np

from fmjax import data as fdata
from fmjax import generate, heads, memory
from fmjax.models import decoder, gpt
from train import common

# The causal LMs this program trains, by config class: (model class, training FLOPs per token).
# config.model describes a GPT; init_from may bring either (GPT-2, or a decoder family).
MODELS = {gpt.GPTConfig: (gpt.GPT, gpt.flops_per_token),
          decoder.DecoderConfig: (decoder.Decoder, decoder.flops_per_token)}


def tokenizer_settings(config) -> list[str]:
  """The config keys that decide the tokenizer `build_tokenizer` makes (fixed on resume)."""
  d = config.data
  if config.init_from:
    return ["init_from"]
  if d.tokenizer_path:
    return ["init_from", "data.tokenizer_path"]
  return ["init_from", "data.tokenizer_path", "data.tokenizer",
          *(["data.vocab_size"] if d.tokenizer == "sentencepiece" else [])]


def build_tokenizer(config, workdir: str, documents, source,
                    eval_documents=()) -> fdata.Tokenizer:
  """The run's tokenizer: loaded from the workdir when resuming, else the source's (init_from),
  else made. A char vocabulary is learned on all the text (as nanoGPT's shakespeare_char):
  `documents` and `eval_documents`; a SentencePiece one on `documents`. `run` saves it in
  the workdir once the prompt and the corpus have been checked against it."""
  d = config.data
  saved = os.path.join(workdir, "tokenizer")
  if os.path.exists(os.path.join(saved, "fmjax_tokenizer.json")):
    return fdata.load_tokenizer(saved)
  if source:  # continue pretraining: the weights' own tokenizer
    tok = source.tokenizer()
  elif d.tokenizer_path:
    tok = (fdata.SentencePieceTokenizer.from_file(d.tokenizer_path)
           if d.tokenizer_path.endswith(".model") else fdata.load_tokenizer(d.tokenizer_path))
  elif d.tokenizer == "char":
    tok = fdata.CharTokenizer.from_text(itertools.chain(documents, eval_documents))
  elif d.tokenizer == "byte":
    tok = fdata.ByteTokenizer()
  elif d.tokenizer == "sentencepiece":
    tok = fdata.train_sentencepiece(iter(documents), vocab_size=d.vocab_size)
  else:
    raise ValueError(f"config.data.tokenizer={d.tokenizer!r}: choose char, byte or sentencepiece")
  return tok


def check_prompt(config, tokenizer: fdata.Tokenizer, resumed: bool = False) -> None:
  """Refuses, before any training, a sample prompt the tokenizer cannot encode (resumed: the
  tokenizer is the workdir's, so another one needs another workdir)."""
  s = config.sample
  if s.num_tokens <= 0:
    return
  fixes = ("give another --config.sample.prompt, skip the sample with "
           "--config.sample.num_tokens=0")
  if not s.prompt:
    raise ValueError(f"--config.sample.prompt is empty; {fixes}")
  missing = tokenizer.missing_characters(s.prompt)
  if missing:
    chars = ", ".join(repr(c) for c in missing)
    raise ValueError(
        f"--config.sample.prompt={s.prompt!r}: the {tokenizer.kind} tokenizer cannot encode "
        f"{chars} (not in the training text); {fixes}, or use --config.data.tokenizer=byte"
        f"{' in a new --workdir' if resumed else ''}, which encodes any text")


def token_stream(config, workdir: str, tokenizer, split: str, source: dict,
                 resumed: bool = False):
  """The split's token stream; a character the tokenizer lacks is named with the fix."""
  try:
    return fdata.load_token_stream(tokenizer, split=split, **source)
  except fdata.tokenizers.UnknownCharacter as e:
    d = config.data
    origin = ("the tokenizer" if not (resumed or config.init_from or d.tokenizer_path) else
              f"the tokenizer saved in {os.path.join(workdir, 'tokenizer')} (resuming)" if resumed
              else f"--config.init_from={config.init_from}'s tokenizer" if config.init_from
              else f"the tokenizer of --config.data.tokenizer_path={d.tokenizer_path}")
    raise ValueError(
        f"{e.where}: character {e.char!r} (U+{ord(e.char):04X}) is not in {origin} "
        f"({e.vocabulary} characters); rerun{' in a new --workdir' if resumed else ''} with "
        "--config.data.tokenizer=byte" + (" --config.init_from=''" if config.init_from else "")
        + (" --config.data.tokenizer_path=''" if d.tokenizer_path else "")
        + " (it encodes any text), or remove the character") from None


@common.holds_workdir
def run(config, workdir: str):
  """Trains per `config` in `workdir`; returns (state, tokenizer, model, last metrics)."""
  common.prepare_workdir(config, workdir)
  common.refuse_changed_settings(config, workdir, tokenizer_settings)
  d, t = config.data, config.train
  data_dir = d.data_dir or os.path.join(workdir, "data")
  source = dict(data_dir=data_dir, train_path=d.train_path or None, eval_path=d.eval_path or None,
                tfds_name=d.tfds_name or None, text_key=d.text_key,
                val_fraction=0.0 if d.eval_path else d.val_fraction, document_split=d.document_split)
  train_docs = fdata.load_documents(split="train", **source)
  eval_docs = fdata.load_documents(split="validation", **source)
  weights = common.sources.parse(config.init_from)
  saved = os.path.join(workdir, "tokenizer", "fmjax_tokenizer.json")
  resumed = os.path.exists(saved)
  tokenizer = build_tokenizer(config, workdir, train_docs, weights, eval_docs)
  check_prompt(config, tokenizer, resumed)
  # The source's architecture (init_from), else config.model's.
  model_config = (weights.architecture(tuple(MODELS))
                  or common.model_config(gpt.GPTConfig, config.model, tokenizer))
  make_model, flops_per_token = MODELS[type(model_config)]
  if d.seq_len > model_config.max_len:
    raise ValueError(f"config.data.seq_len={d.seq_len} exceeds config.model.max_len="
                     f"{model_config.max_len}; lower one or raise the other")
  if tokenizer.vocab_size > model_config.vocab_size:  # init_from's (config.model's is checked)
    raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model of "
                     f"--config.init_from={config.init_from} has vocab_size="
                     f"{model_config.vocab_size}; use the tokenizer that goes with the weights")
  runtime, accum_steps, memory_note = common.plan_memory(
      config, lambda rt: make_model(model_config, rt), (np.zeros((1, d.seq_len), np.int32),),
      memory.Shape(num_layers=model_config.num_layers, embed_dim=model_config.embed_dim,
                   mlp_dim=model_config.mlp_dim, num_heads=model_config.num_heads,
                   num_kv_heads=model_config.num_kv_heads, head_dim=model_config.head_dim,
                   vocab_size=model_config.padded_vocab_size, seq_len=d.seq_len,
                   batch_size=t.batch_size), common.runtime(config))
  model = make_model(model_config, runtime)

  train_tokens = token_stream(config, workdir, tokenizer, "train", source, resumed)
  eval_tokens = token_stream(config, workdir, tokenizer, "validation", source, resumed)
  if jax.process_index() == 0 and not resumed:
    tokenizer.save(os.path.dirname(saved))  # now that it encodes the prompt and the corpus
  train_data = fdata.LMBatchIterator(
      train_tokens, batch_size=t.batch_size, seq_len=d.seq_len, seed=config.seed, mode=d.mode,
      eos_id=tokenizer.eos_id, process_index=jax.process_index(),
      process_count=jax.process_count())
  eval_data = lambda: fdata.eval_batches(
      eval_tokens, t.batch_size, d.seq_len, max_batches=t.eval_batches, eos_id=tokenizer.eos_id,
      process_index=jax.process_index(), process_count=jax.process_count())

  task = common.Task(
      model=model, model_config=model_config, loss_fn=heads.causal_lm_loss_fn(model),
      train_data=train_data, eval_data=eval_data, example_batch=train_data.batch_at(0),
      init_args=lambda b: (b["inputs"],),
      flops_per_example=flops_per_token(model_config, d.seq_len) * d.seq_len,
      tokens_per_example=d.seq_len, notes=(memory_note,))
  state, last = common.fit(config, workdir, task, source=weights,
                           schedule=common.resolve_schedule(t, accum_steps=accum_steps))

  if config.sample.num_tokens > 0 and jax.process_index() == 0:
    # KV-cached sampling within the trained context (the same as python -m train.sample).
    ids = generate.complete(model, jax.device_get(state.params),
                            tokenizer.encode(config.sample.prompt),
                            max_new_tokens=config.sample.num_tokens,
                            context=min(d.seq_len, model_config.max_len), seed=config.seed,
                            temperature=config.sample.temperature, top_k=config.sample.top_k,
                            stop_tokens=[tokenizer.eos_id])
    print("\n--- sample ---\n" + config.sample.prompt + tokenizer.decode(ids) + "\n--------------")
  common.report(workdir, last)
  return state, tokenizer, model, last


if __name__ == "__main__":
  common.main(run, sys.argv)
