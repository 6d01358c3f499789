"""BERT masked-LM + next-sentence pretraining.

  python -m train.pretrain_bert --config=configs/bert.py:sample --workdir=DIR [--config.a.b=v]

Reads one-sentence-per-line text (a blank line between documents), trains or loads a
sentencepiece tokenizer with [PAD] [UNK] [CLS] [SEP] [MASK], builds the MLM+NSP instances
exactly as google-research/bert's create_pretraining_data.py (stored once as a tfds
ArrayRecord dataset), and trains loss = MLM + NSP with BERT's optimizer. Rerunning resumes.
config.init_from (a workdir, or hf:DIR of a Hugging Face BERT) continues pretraining its
weights, with its architecture and tokenizer.
"""

import dataclasses
import os
import random
import sys

import jax
import numpy as np

from fmjax import data as fdata
from fmjax import memory
from fmjax.models import bert
from train import common

SPECIAL = ("[CLS]", "[SEP]", "[MASK]")


def tokenizer_settings(config) -> list[str]:
  """The config keys that decide the tokenizer `build_tokenizer` makes (fixed on resume)."""
  if config.init_from:
    return ["init_from"]
  if config.data.tokenizer_path:
    return ["init_from", "data.tokenizer_path", "data.lowercase"]
  return ["init_from", "data.tokenizer_path", "data.vocab_size", "data.lowercase"]


def build_tokenizer(config, workdir: str, documents, source) -> fdata.Tokenizer:
  """Loaded from the workdir when resuming, else the source's (init_from), else an existing
  model file or trained on the corpus."""
  saved = os.path.join(workdir, "tokenizer")
  if os.path.exists(os.path.join(saved, "fmjax_tokenizer.json")):
    return fdata.load_tokenizer(saved)
  d = config.data
  if source:
    tok = source.tokenizer()
  elif d.tokenizer_path:
    tok = fdata.SentencePieceTokenizer.from_file(d.tokenizer_path, lowercase=d.lowercase)
  else:
    text = ("\n".join(sentence for sentence in doc) for doc in documents)
    tok = fdata.train_sentencepiece(text, vocab_size=d.vocab_size, pad_piece="[PAD]",
                                    unk_piece="[UNK]", special_tokens=SPECIAL,
                                    lowercase=d.lowercase)
  if jax.process_index() == 0:
    tok.save(saved)
  return tok


def pretraining_loss_fn(model):
  def loss_fn(params, batch, rng, train):
    outputs = model.apply({"params": params}, batch["input_ids"], batch["token_type_ids"],
                          batch["input_mask"], batch["masked_lm_positions"], train=train,
                          rngs={"dropout": rng})
    labels = {**batch, "next_sentence_labels": batch["next_sentence_labels"].reshape(-1)}
    return bert.pretraining_loss(outputs, labels)
  return loss_fn


class PhaseData:
  """One phase's instances as a resumable iterator whose state names its phase.

  A checkpoint written in another phase restores to this phase's start, so a run that
  crosses from phase 1 to phase 2 picks phase 2's data up from its first batch.
  """

  def __init__(self, phase: int, iterator):
    self.phase, self.iterator = phase, iterator

  def get_state(self):
    return {"phase": self.phase, **self.iterator.get_state()}

  def set_state(self, state):
    self.iterator.set_state(state if state.get("phase", 1) == self.phase else {"step": 0})

  def batch_at(self, step):
    return self.iterator.batch_at(step)

  def __next__(self):
    return next(self.iterator)


def instances(config, tokenizer, documents, data_dir, *, max_seq_length, max_predictions,
              dynamic):
  """The phase's prepared instances (a tfds data source) and, when `dynamic`, the masker
  that masks each instance afresh every epoch (then the stored instances are unmasked)."""
  d = config.data
  kwargs = dict(max_seq_length=max_seq_length, short_seq_prob=d.short_seq_prob,
                masked_lm_prob=0.0 if dynamic else d.masked_lm_prob,
                max_predictions_per_seq=max_predictions,
                dupe_factor=1 if dynamic else d.dupe_factor,
                whole_word_mask=d.whole_word_mask, seed=config.seed)
  source = fdata.prepare_pretraining_dataset(documents, tokenizer, data_dir=data_dir, **kwargs)
  if not dynamic:
    return source, None

  def mask(example, index, epoch):
    rng = random.Random(hash((config.seed, index, epoch)) & 0xFFFFFFFF)
    masked = fdata.mask_tokens(example["input_ids"][example["input_mask"] > 0], tokenizer, rng,
                               masked_lm_prob=d.masked_lm_prob,
                               max_predictions_per_seq=max_predictions,
                               whole_word_mask=d.whole_word_mask)
    ids = example["input_ids"].copy()
    ids[:len(masked["input_ids"])] = masked["input_ids"]
    return {**example, **{k: v for k, v in masked.items() if k != "input_ids"}, "input_ids": ids}
  return source, mask


@common.holds_workdir
def run(config, workdir: str):
  common.prepare_workdir(config, workdir)
  common.refuse_changed_settings(config, workdir, tokenizer_settings)
  d, t = config.data, config.train
  data_dir = d.data_dir or os.path.join(workdir, "data")
  documents = [doc for doc in fdata.read_pretraining_documents(d.train_path) if doc]
  if len(documents) < 2:  # checked before any tokenizer training: the cheapest clear failure
    raise fdata.DataError(
        f"{d.train_path}: {len(documents)} document(s); next-sentence prediction needs at least "
        "two (NSP needs a random B from another document): separate documents with a blank line")
  if d.eval_path:
    eval_documents = fdata.read_pretraining_documents(d.eval_path)
  elif d.eval_fraction > 0:
    cut = max(2, int(len(documents) * (1 - d.eval_fraction)))
    documents, eval_documents = documents[:cut], documents[cut:]
  else:
    eval_documents = documents  # overfitting runs (sample): evaluate on the training instances
  weights = common.sources.parse(config.init_from)
  tokenizer = build_tokenizer(config, workdir, documents, weights)
  model_config = (weights.architecture(bert.BertConfig)
                  or common.model_config(bert.BertConfig, config.model, tokenizer))
  schedule = common.resolve_schedule(t)

  phases = [(d.max_seq_length, d.max_predictions_per_seq,
             int(schedule.steps * d.phase1_fraction))]
  if d.phase1_fraction < 1.0:
    phases.append((d.phase2_max_seq_length, d.phase2_max_predictions_per_seq, schedule.steps))
  for length, _, _ in phases:
    if length > model_config.max_len:
      raise ValueError(f"max_seq_length {length} exceeds config.model.max_len={model_config.max_len}")
  # The memory plan of the longest phase (one runtime and accumulation for both phases).
  longest = max(range(len(phases)), key=lambda i: phases[i][:2])
  length, predictions, _ = phases[longest]
  ids = np.zeros((1, length), np.int32)
  runtime, accum_steps, memory_note = common.plan_memory(
      config, lambda rt: bert.BertForPreTraining(model_config, rt),
      (ids, ids, ids, np.zeros((1, predictions), np.int32)),
      memory.Shape(num_layers=model_config.num_layers, embed_dim=model_config.embed_dim,
                   mlp_dim=model_config.mlp_dim, num_heads=model_config.num_heads,
                   vocab_size=model_config.padded_vocab_size, seq_len=length,
                   batch_size=t.batch_size, logit_positions=predictions),
      common.runtime(config),
      length_flag=("--config.data.max_seq_length", "--config.data.phase2_max_seq_length")[longest])
  model = bert.BertForPreTraining(model_config, runtime)
  schedule = dataclasses.replace(schedule, accum_steps=accum_steps)
  last, state = {}, None
  for phase, (length, predictions, until) in enumerate(phases, start=1):
    source, mask = instances(config, tokenizer, documents, data_dir, max_seq_length=length,
                             max_predictions=predictions, dynamic=d.dynamic_masking)
    # Eval always uses statically masked instances: the same positions at every evaluation.
    eval_source, _ = instances(config, tokenizer, eval_documents, os.path.join(data_dir, "eval"),
                               max_seq_length=length, max_predictions=predictions, dynamic=False)
    train_data = PhaseData(phase, fdata.ExampleBatchIterator(
        source, batch_size=t.batch_size, seed=config.seed, transform=mask,
        process_index=jax.process_index(), process_count=jax.process_count()))
    eval_data = lambda src=eval_source: fdata.example_batches(
        _head(src, t.eval_batches * t.batch_size), t.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count())
    task = common.Task(
        model=model, model_config=model_config, loss_fn=pretraining_loss_fn(model),
        train_data=train_data, eval_data=eval_data, example_batch=train_data.batch_at(0),
        init_args=lambda b: (b["input_ids"], b["token_type_ids"], b["input_mask"],
                             b["masked_lm_positions"]),
        flops_per_example=bert.flops_per_token(model_config, length) * length,
        tokens_per_example=length, notes=(memory_note,))
    state, last = common.fit(config, workdir, task, schedule=schedule, source=weights,
                             until=until)
  common.report(workdir, last)
  return state, tokenizer, model, last


class _head:
  """The first n items of an indexable source (all of it when shorter)."""

  def __init__(self, source, n):
    self.source, self.n = source, min(n, len(source))

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return self.source[i]


if __name__ == "__main__":
  common.main(run, sys.argv)
