"""Finetune a BERT encoder: classification, sentence pairs, regression, extractive QA.

  python -m train.finetune --config=configs/finetune.py:sst2 --workdir=DIR \\
      --config.init_from=WORKDIR_OF_PRETRAIN_BERT   (or hf:DIRECTORY, or "" for random init)

config.task picks the head: "classification" (SST-2, RTE, MNLI: fmjax.heads.ClassificationHead
over the pooled [CLS] output), "regression" (STS-B: the same head with one output and a
squared error), "qa" (SQuAD v1.1: fmjax.heads.SpanHead over the tokens). Data comes from
local files (config.data.train_path / eval_path, any format fmjax.data.glue reads, or SQuAD
JSON) or, when those are empty, from the tfds catalog (config.data.tfds_name).

Batches are padded by length (config.data.bucket, fmjax.data.bucketing): each to the next
power of two >= its longest row, from config.data.min_bucket_length up to max_seq_length, one
compiled program per bucket; tokens_per_second and mfu count those padded tokens.

Evaluation runs every eval_every steps and at the end (eval/accuracy, eval/f1, eval/mcc,
eval/pearson, eval/spearman, eval/exact_match as they apply); the best evaluation's params
are kept in DIR/best, and the end of the run writes DIR/predictions/ for the eval file and
for config.data.predict_path, from those best params. Rerunning resumes (or, when finished,
only predicts: pass a new --config.data.predict_path to label another file).

LoRA (config.lora.rank > 0, fmjax.lora): adapters of that rank on the encoder's attention and
MLP projections train with the head; the encoder's own weights stay as loaded, and the
optimizer keeps state for the adapters and the head only (metrics.jsonl's first row:
trainable_params, total_params).
"""

import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import errors, evaluation, heads, trainer
from fmjax import data as fdata
from fmjax.data import bucketing, glue, squad
from fmjax.models import bert
from train import common

TASKS = ("classification", "regression", "qa")
SPECIAL = ("[CLS]", "[SEP]", "[MASK]")
# QA start/end logits at padding positions: never an answer, and the same whatever width a
# batch is padded to, so that bucketed batches score exactly as max_seq_length ones.
PADDING_LOGIT = -1e9
# tokens_per_second and MFU count the padded tokens of each bucket, averaged over (at most)
# this many of the run's batches.
LENGTH_SAMPLE_STEPS = 4096


def _csv(value: str) -> tuple[str, ...]:
  return tuple(v.strip() for v in value.split(",") if v.strip())


def table_format(config) -> glue.TableFormat:
  d = config.data
  num_labels = 1 if config.task == "regression" else d.num_labels
  names = _csv(d.label_names)
  if names and len(names) != num_labels:
    raise ValueError(f"config.data.label_names has {len(names)} names {list(names)} but "
                     f"config.data.num_labels={num_labels}")
  return glue.TableFormat(text_columns=_csv(d.text_columns), label_column=d.label_column,
                          format=d.format, header=d.header, quoting=d.quoting,
                          label_names=names, num_labels=num_labels)


# Data -------------------------------------------------------------------------------------------

def read_split(config, split: str):
  """The train or eval examples: local files when a path is set, else the tfds split."""
  d = config.data
  path = d.train_path if split == "train" else d.eval_path
  if config.task == "qa":
    if path:
      return squad.read_squad(path)
    if d.tfds_name:
      return squad.read_tfds(d.tfds_name, d.train_split if split == "train" else d.eval_split,
                             d.data_dir)
  else:
    fmt = table_format(config)
    if path:
      return glue.read_examples(path, fmt)
    if d.tfds_name:
      return glue.read_tfds(d.tfds_name, d.train_split if split == "train" else d.eval_split,
                            fmt, d.data_dir)
  raise ValueError(f"no {split} data: set config.data.{split}_path (local files) or "
                   "config.data.tfds_name (a tfds catalog name)")


def load_data(config):
  """(train examples, eval examples); a QA set without eval_path is split by article."""
  d = config.data
  train = read_split(config, "train")
  if d.max_train_examples:
    train = train[:d.max_train_examples]
  if config.task == "qa" and not d.eval_path and d.eval_fraction > 0:
    return squad.split_by_article(train, d.eval_fraction)
  return train, read_split(config, "eval")


def encode(config, tokenizer, examples):
  """Examples -> (arrays, spans or None); the arrays carry a "weight" column."""
  d = config.data
  if config.task == "qa":
    return squad.make_features(examples, tokenizer, max_seq_length=d.max_seq_length,
                               doc_stride=d.doc_stride, max_query_length=d.max_query_length)
  arrays, truncated = glue.encode_examples(examples, tokenizer, d.max_seq_length)
  if truncated:
    trainer.log.info("%d of %d examples truncated to max_seq_length=%d", truncated,
                     len(examples), d.max_seq_length)
  return arrays, None


def min_bucket(config) -> int:
  """The shortest batch width: config.data.min_bucket_length when bucketing, else every batch
  is padded to max_seq_length."""
  d = config.data
  return d.min_bucket_length if d.bucket else d.max_seq_length


def texts_of(config, examples):
  if config.task == "qa":
    return [text for e in examples for text in (e.question, e.context)]
  return [text for e in examples for text in e.texts]


# Tokenizer and model ----------------------------------------------------------------------------

def tokenizer_settings(config) -> list[str]:
  """The config keys that decide the tokenizer `build_tokenizer` makes (fixed on resume)."""
  if config.init_from:
    return ["init_from"]
  if config.data.tokenizer_dir:
    return ["init_from", "data.tokenizer_dir"]
  return ["init_from", "data.tokenizer_dir", "data.vocab_size", "data.lowercase"]


def build_tokenizer(config, workdir: str, train_examples, source) -> fdata.Tokenizer:
  """The encoder's own tokenizer (the source's), the workdir's when resuming, else
  config.data.tokenizer_dir's, else one trained on the training texts."""
  saved = os.path.join(workdir, "tokenizer")
  if source:
    tok = source.tokenizer()
  elif os.path.exists(os.path.join(saved, fdata.tokenizers.METADATA_FILE)):
    return fdata.load_tokenizer(saved)
  elif config.data.tokenizer_dir:  # random init with a given vocabulary
    tok = fdata.load_tokenizer(config.data.tokenizer_dir)
  else:  # random init: a vocabulary learned on the training texts
    d = config.data
    tok = fdata.train_sentencepiece(texts_of(config, train_examples), vocab_size=d.vocab_size,
                                    pad_piece="[PAD]", unk_piece="[UNK]",
                                    special_tokens=SPECIAL, lowercase=d.lowercase)
  if jax.process_index() == 0:
    tok.save(saved)
  return tok


def encoder_config(config, tokenizer, source) -> bert.BertConfig:
  """The encoder's architecture: the source's (init_from), else config.model's."""
  c = source.architecture(bert.BertConfig)
  if c is None:
    return common.model_config(bert.BertConfig, config.model, tokenizer)
  if tokenizer.vocab_size > c.vocab_size:
    raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the encoder of "
                     f"{source.spec!r} embeds {c.vocab_size}: they do not belong together")
  return c


def build_model(config, encoder: bert.BertConfig, num_labels: int, runtime):
  if config.task == "qa":
    return bert.BertForQuestionAnswering(encoder, runtime), "qa_outputs"
  return bert.BertForSequenceClassification(encoder, num_labels, runtime), "classifier"


# Loss, predictions and metrics -------------------------------------------------------------------

def make_loss_fn(model, task: str):
  def loss_fn(params, batch, rng, train):
    out = model.apply({"params": params}, batch["input_ids"], batch["token_type_ids"],
                      batch["input_mask"], train=train, rngs={"dropout": rng})
    if task == "qa":
      start, end = (mask_padding(x, batch["input_mask"]) for x in out)
      return heads.span_loss(start, end, batch["start_position"], batch["end_position"],
                             batch["weight"])
    if task == "regression":
      return heads.regression_loss(out, batch["label"], batch["weight"])
    return heads.classification_loss(out, batch["label"], batch["weight"])
  return loss_fn


def make_predict_fn(model, task: str):
  def predict_fn(params, batch):
    out = model.apply({"params": params}, batch["input_ids"], batch["token_type_ids"],
                      batch["input_mask"], train=False)
    if task == "qa":
      return {"start_logits": mask_padding(out[0], batch["input_mask"]),
              "end_logits": mask_padding(out[1], batch["input_mask"])}
    return {"logits": out}
  return predict_fn


def mask_padding(logits, input_mask):
  """(B, L) per-token logits with PADDING_LOGIT where input_mask is 0."""
  return jnp.where(input_mask > 0, logits, PADDING_LOGIT)


def collect(config, predict, arrays) -> dict[str, np.ndarray]:
  """predict over every example (bucketed batches, in order) -> outputs for the real examples,
  in order; QA's per-token logits come back (N, max_seq_length), PADDING_LOGIT past each
  batch's width."""
  batch_size = config.data.eval_batch_size or config.train.batch_size
  width = arrays["input_mask"].shape[1]
  outputs = []
  for batch in bucketing.eval_batches(arrays, batch_size, min_length=min_bucket(config),
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count()):
    out = predict(batch)
    if config.task == "qa":  # (B, L) -> (B, T)
      pad = [(0, 0), (0, width - batch["input_mask"].shape[1])]
      out = {k: np.pad(v, pad, constant_values=PADDING_LOGIT) for k, v in out.items()}
    outputs.append(out)
  n = len(arrays["weight"])
  return {k: np.concatenate([o[k] for o in outputs])[:n] for k in outputs[0]}


def log_softmax(x, axis=-1):
  x = x - x.max(axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis, keepdims=True))


def score(config, outputs, arrays, examples, spans) -> dict[str, float]:
  """Eval metrics from every prediction (keys eval/...)."""
  if config.task == "qa":
    start_nll = -np.take_along_axis(log_softmax(outputs["start_logits"]),
                                    arrays["start_position"][:, None], 1)
    end_nll = -np.take_along_axis(log_softmax(outputs["end_logits"]),
                                  arrays["end_position"][:, None], 1)
    answers = squad.best_answers(examples, spans, outputs["start_logits"],
                                 outputs["end_logits"], n_best_size=config.data.n_best_size,
                                 max_answer_length=config.data.max_answer_length)
    truths = {e.qid: [text for text, _ in e.answers] for e in examples if e.answers}
    m = evaluation.squad_scores(answers, truths)
    m["loss"] = float((start_nll.mean() + end_nll.mean()) / 2)
  elif config.task == "regression":
    predictions = outputs["logits"][:, 0]
    m = evaluation.regression_metrics(predictions, arrays["label"])
    m["loss"] = float(np.mean((predictions - arrays["label"]) ** 2))
  else:
    logits = outputs["logits"]
    m = evaluation.classification_metrics(logits.argmax(-1), arrays["label"], logits.shape[-1])
    m["loss"] = float(-np.take_along_axis(log_softmax(logits), arrays["label"][:, None], 1).mean())
  return {f"eval/{k}": v for k, v in m.items()}


def write_predictions(config, path: str, outputs, examples, spans, label_names) -> None:
  """One JSON line per example (classification, regression), or SQuAD's {id: answer} JSON."""
  with errors.writing(path, "predictions"):
    _write_predictions(config, path, outputs, examples, spans, label_names)


def _write_predictions(config, path: str, outputs, examples, spans, label_names) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if config.task == "qa":
    answers = squad.best_answers(examples, spans, outputs["start_logits"],
                                 outputs["end_logits"], n_best_size=config.data.n_best_size,
                                 max_answer_length=config.data.max_answer_length)
    with open(path, "w", encoding="utf-8") as f:
      json.dump(answers, f, indent=1, ensure_ascii=False)
    return
  with open(path, "w", encoding="utf-8") as f:
    for example, logits in zip(examples, outputs["logits"]):
      record = {"where": example.where, "texts": list(example.texts)}
      if config.task == "regression":
        record["prediction"] = float(logits[0])
      else:
        probabilities = np.exp(log_softmax(logits))
        label = int(logits.argmax())
        record["prediction"] = label_names[label] if label_names else label
        record["probabilities"] = [round(float(p), 6) for p in probabilities]
      if example.label is not None:
        record["label"] = (label_names[example.label] if label_names and config.task != "regression"
                           else example.label)
      f.write(json.dumps(record, ensure_ascii=False) + "\n")


# The program -------------------------------------------------------------------------------------

@common.holds_workdir
def run(config, workdir: str):
  if config.task not in TASKS:
    raise ValueError(f"config.task={config.task!r}: choose one of {TASKS}")
  common.prepare_workdir(config, workdir)
  common.refuse_changed_settings(config, workdir, tokenizer_settings)
  d, t = config.data, config.train
  train_examples, eval_examples = load_data(config)
  source = common.sources.parse(config.init_from)
  tokenizer = build_tokenizer(config, workdir, train_examples, source)
  encoder = encoder_config(config, tokenizer, source)
  if d.max_seq_length > encoder.max_len:
    raise ValueError(f"config.data.max_seq_length={d.max_seq_length} exceeds the encoder's "
                     f"{encoder.max_len} positions (config.model.max_len)")
  num_labels = 1 if config.task == "regression" else d.num_labels
  model, head = build_model(config, encoder, num_labels, common.runtime(config))
  train_arrays, _ = encode(config, tokenizer, train_examples)
  eval_arrays, eval_spans = encode(config, tokenizer, eval_examples)
  trainer.log.info("%d train and %d eval examples (%d and %d features)", len(train_examples),
                   len(eval_examples), len(train_arrays["weight"]), len(eval_arrays["weight"]))
  schedule = common.resolve_schedule(t, len(train_arrays["weight"]))  # steps, or from epochs

  # Each batch padded to its bucket (a power of two), one compiled program per bucket.
  train_data = bucketing.BucketedBatches(
      train_arrays, batch_size=t.batch_size, seed=config.seed, min_length=min_bucket(config),
      group_batches=d.group_batches, process_index=jax.process_index(),
      process_count=jax.process_count())
  lengths = train_data.lengths(min(schedule.steps, LENGTH_SAMPLE_STEPS))
  widths, counts = np.unique(lengths, return_counts=True)
  trainer.log.info("train batch widths (tokens: batches, of the first %d): %s", len(lengths),
                   dict(zip(widths.tolist(), counts.tolist())))
  flops_per_example = float(np.mean([bert.flops_per_token(encoder, int(n), masked_fraction=0.0)
                                     * int(n) for n in lengths]))
  score_fn = lambda predict: score(config, collect(config, predict, eval_arrays),
                                   eval_arrays, eval_examples, eval_spans)
  init_args = lambda b: (b["input_ids"], b["token_type_ids"], b["input_mask"])
  # config.lora.rank > 0: adapters on the frozen encoder; the head trains in full.
  model, adapted, spec = common.adapters(config, model, init_args(train_data.batch_at(0)),
                                         keep=(head,))
  task = common.Task(
      model=model, model_config={**dataclasses.asdict(encoder), "task": config.task,
                                 "num_labels": num_labels,
                                 **({"lora": dataclasses.asdict(spec)} if spec else {})},
      loss_fn=make_loss_fn(model, config.task), train_data=train_data, eval_data=None,
      example_batch=train_data.batch_at(0), init_args=init_args,
      flops_per_example=flops_per_example, tokens_per_example=float(np.mean(lengths)),
      predict_fn=make_predict_fn(model, config.task),
      score_fn=score_fn, new_params=(head,) + adapted.pop("new_params", ()), **adapted)
  state, last = common.fit(config, workdir, task, schedule=schedule, source=source)

  # Predictions from the best evaluation's params (the last ones without best_metric).
  params = trainer.best_params(workdir, state.params)
  predict = lambda arrays: collect(config, trainer.make_predict(task.predict_fn, params),
                                   arrays)
  label_names = _csv(d.label_names)
  outputs = predict(eval_arrays)
  final = score(config, outputs, eval_arrays, eval_examples, eval_spans)
  suffix = ".json" if config.task == "qa" else ".jsonl"
  if jax.process_index() == 0:
    write_predictions(config, os.path.join(workdir, "predictions", "eval" + suffix), outputs,
                      eval_examples, eval_spans, label_names)
  if d.predict_path:
    if config.task == "qa":
      examples = squad.read_squad(d.predict_path)
    else:
      examples = glue.read_examples(d.predict_path, table_format(config), labelled=False)
    arrays, spans = encode(config, tokenizer, examples)
    name = os.path.splitext(os.path.basename(d.predict_path.rstrip("/*")))[0] or "predict"
    if jax.process_index() == 0:
      write_predictions(config, os.path.join(workdir, "predictions", name + suffix),
                        predict(arrays), examples, spans, label_names)
  if jax.process_index() == 0:
    path = os.path.join(workdir, "eval_results.json")
    with errors.writing(path, "evaluation results"), open(path, "w") as f:
      json.dump({"best_metric": t.best_metric, **final}, f, indent=1)
  common.report(workdir, {**last, **final})
  print(f"  predictions: {os.path.join(workdir, 'predictions')}")
  return final


if __name__ == "__main__":
  common.main(run, sys.argv)
