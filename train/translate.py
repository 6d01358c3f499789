"""Train an encoder-decoder Transformer to translate, and decode with beam search.

  python -m train.translate --config=configs/translate.py:multi30k --workdir=DIR \\
      [--config.train.time_budget_s=3000] [--config.a.b=value ...]

Data: line-aligned local files (config.data.train_source / train_target, ..., plain or .gz)
or a tfds catalog dataset (config.data.tfds_name, e.g. wmt14_translate/de-en). Tokenizers:
SentencePiece learned on the training pairs, one shared vocabulary or one per language
(config.data.shared_vocab), saved in DIR/tokenizer (and DIR/source_tokenizer).

Training minimises label-smoothed cross-entropy (config.train.label_smoothing); evaluation
reports eval/loss (smoothed), eval/nll, eval/accuracy (next-token, teacher forced) and
eval/bleu (sacrebleu's default corpus BLEU of the decoded eval text, fmjax.evaluation). The
end of the run decodes the eval and test sets with beam search from the best eval/bleu
params into DIR/predictions/{eval,test}.txt and writes DIR/eval_results.json.
"""

import dataclasses
import json
import os
import sys

import jax
import numpy as np

from fmjax import errors, evaluation, generate, heads, trainer
from fmjax import data as fdata
from fmjax.data import translation
from fmjax.models import seq2seq
from train import common


# Data and tokenizers ----------------------------------------------------------------------------

def read_split(config, split: str) -> list[translation.Pair]:
  """The train, eval or test pairs: local files when set, else the tfds split ([] for a test
  split that is not configured)."""
  d = config.data
  source, target = d[f"{split}_source"], d[f"{split}_target"]
  if source or target:
    if not (source and target):
      raise ValueError(f"config.data.{split}_source and {split}_target go together; got "
                       f"{source!r} and {target!r}")
    return translation.read_parallel(source, target)
  if d.tfds_name:
    return translation.read_tfds(d.tfds_name, d[f"{split}_split"], d.source_lang,
                                 d.target_lang, d.data_dir)
  if split == "test":
    return []
  raise ValueError(f"no {split} data: set config.data.{split}_source and {split}_target "
                   "(line-aligned files) or config.data.tfds_name (a tfds catalog name)")


def tokenizer_settings(config) -> list[str]:
  """The config keys that decide the tokenizers `build_tokenizers` makes (fixed on resume)."""
  del config
  return ["data.vocab_size", "data.shared_vocab"]


def build_tokenizers(config, workdir: str, train_pairs):
  """(source, target) tokenizers: the workdir's when resuming, else learned on train_pairs."""
  d = config.data
  target_dir = os.path.join(workdir, "tokenizer")
  source_dir = os.path.join(workdir, "source_tokenizer")
  saved = lambda p: os.path.exists(os.path.join(p, fdata.tokenizers.METADATA_FILE))
  if saved(target_dir):
    target = fdata.load_tokenizer(target_dir)
    return (fdata.load_tokenizer(source_dir) if saved(source_dir) else target), target
  source, target = translation.train_tokenizers(train_pairs, d.vocab_size,
                                                shared=d.shared_vocab)
  if jax.process_index() == 0:
    target.save(target_dir)
    if source is not target:
      source.save(source_dir)
  return source, target


def model_config(config, source_tok, target_tok) -> seq2seq.Seq2SeqConfig:
  fields = dict(config.model)
  if fields["vocab_size"] == -1:
    fields["vocab_size"] = target_tok.vocab_size
  shared = source_tok is target_tok
  if fields["source_vocab_size"] == -1:
    fields["source_vocab_size"] = 0 if shared else source_tok.vocab_size
  if shared and fields["source_vocab_size"]:
    raise ValueError("config.model.source_vocab_size must be -1 or 0 with a shared vocabulary "
                     "(config.data.shared_vocab=True)")
  if not shared and not fields["source_vocab_size"]:
    raise ValueError("separate vocabularies (config.data.shared_vocab=False) need "
                     "config.model.source_vocab_size -1 (the source tokenizer's)")
  for key, tok in (("vocab_size", target_tok), ("source_vocab_size", None if shared else source_tok)):
    if tok is not None and fields[key] < tok.vocab_size:
      raise ValueError(f"config.model.{key}={fields[key]} is smaller than the tokenizer's "
                       f"{tok.vocab_size} pieces; use -1")
  return common.as_flags(seq2seq.Seq2SeqConfig, "config.model", **fields)


# Loss and decoding ------------------------------------------------------------------------------

def make_loss_fn(model, label_smoothing: float):
  def loss_fn(params, batch, rng, train):
    logits = model.apply({"params": params}, batch["source"], batch["source_mask"],
                         batch["target_in"], train=train, rngs={"dropout": rng})
    return heads.sequence_loss(logits, batch["target_out"], batch["weight"], label_smoothing)
  return loss_fn


def make_predict_fn(model, gen: generate.GenerateConfig, start_id: int, pad_id: int):
  def predict_fn(params, batch):
    encoded = model.apply({"params": params}, batch["source"], batch["source_mask"],
                          method="encode")
    return {"tokens": generate.generate_from_source(model, params, encoded, gen,
                                                    start_id=start_id, pad_id=pad_id).tokens}
  return predict_fn


def generate_config(config, num_beams: int, stop_id: int) -> generate.GenerateConfig:
  return generate.GenerateConfig(max_new_tokens=config.data.max_length, num_beams=num_beams,
                                 length_penalty=config.eval.length_penalty,
                                 stop_tokens=(stop_id,))


def detokenize(tokenizer, rows) -> list[str]:
  """Generated ids -> text, each row cut at its first EOS."""
  texts = []
  for row in rows:
    row = list(row)
    if tokenizer.eos_id in row:
      row = row[:row.index(tokenizer.eos_id)]
    texts.append(tokenizer.decode([i for i in row if i != tokenizer.pad_id]))
  return texts


def translate(predict, sources, batch_size: int, length: int, target_tok) -> list[str]:
  """Decodes every encoded source (predict: host batch -> {"tokens"}) into text."""
  out = []
  empty = [np.zeros((0,), np.int32)] * len(sources)
  for batch, n in translation.padded_pairs(sources, empty, batch_size, length,
                                           pad_id=target_tok.pad_id, start_id=target_tok.eos_id,
                                           process_index=jax.process_index(),
                                           process_count=jax.process_count()):
    out += detokenize(target_tok, predict(batch)["tokens"][:n])
  return out


# The program ------------------------------------------------------------------------------------

@common.holds_workdir
def run(config, workdir: str):
  common.prepare_workdir(config, workdir)
  common.refuse_changed_settings(config, workdir, tokenizer_settings)
  d, t, e = config.data, config.train, config.eval
  train_pairs = read_split(config, "train")
  if d.max_train_examples:
    train_pairs = train_pairs[:d.max_train_examples]
  eval_pairs, test_pairs = read_split(config, "eval"), read_split(config, "test")
  if config.init_from:  # the tokenizers are learned per run: another run's ids would not match
    raise ValueError(f"config.init_from={config.init_from!r}: translate trains from fresh "
                     "weights; leave config.init_from empty")
  source_tok, target_tok = build_tokenizers(config, workdir, train_pairs)
  model_cfg = model_config(config, source_tok, target_tok)
  model = seq2seq.Seq2Seq(model_cfg, common.runtime(config))
  pad, start = target_tok.pad_id, target_tok.eos_id
  encode = lambda pairs: translation.encode_pairs(pairs, source_tok, target_tok, d.max_length)
  train_src, train_tgt, cut = encode(train_pairs)
  eval_src, eval_tgt, _ = encode(eval_pairs)
  trainer.log.info("%d train pairs (%d cut to max_length=%d), %d eval, %d test; vocabulary "
                   "%s", len(train_pairs), cut, d.max_length, len(eval_pairs), len(test_pairs),
                   target_tok.vocab_size if source_tok is target_tok else
                   f"{source_tok.vocab_size} + {target_tok.vocab_size}")
  train_data = translation.PairBatches(
      train_src, train_tgt, batch_size=t.batch_size, seed=config.seed, pad_id=pad,
      start_id=start, length_multiple=d.length_multiple, process_index=jax.process_index(),
      process_count=jax.process_count())
  eval_length = -(-d.max_length // d.length_multiple) * d.length_multiple
  eval_batches = lambda: (b for b, _ in translation.padded_pairs(
      eval_src, eval_tgt, e.batch_size, eval_length, pad_id=pad, start_id=start,
      process_index=jax.process_index(), process_count=jax.process_count()))
  bleu_n = e.max_examples or len(eval_pairs)
  references = [tgt for _, tgt in eval_pairs[:bleu_n]]

  def score_fn(predict):
    hypotheses = translate(predict, eval_src[:bleu_n], e.batch_size, eval_length, target_tok)
    return {"eval/bleu": evaluation.corpus_bleu(hypotheses, references)["bleu"]}

  mean_len = float(np.mean([len(s) for s in train_src])), float(np.mean([len(x) for x in train_tgt]))
  task = common.Task(
      model=model, model_config={**dataclasses.asdict(model_cfg), "task": "translate"},
      loss_fn=make_loss_fn(model, t.label_smoothing), train_data=train_data,
      eval_data=eval_batches, example_batch=train_data.batch_at(0),
      init_args=lambda b: (b["source"], b["source_mask"], b["target_in"]),
      flops_per_example=seq2seq.flops_per_example(model_cfg, *map(round, mean_len)),
      tokens_per_example=round(mean_len[1]),
      predict_fn=make_predict_fn(model, generate_config(config, e.num_beams, start), start, pad),
      score_fn=score_fn)
  state, last = common.fit(config, workdir, task, source=common.sources.Source())

  # The best evaluation's params decode the eval and test sets with the final beam width.
  params = trainer.best_params(workdir, state.params)
  final_fn = make_predict_fn(model, generate_config(config, e.final_num_beams, start), start, pad)
  predict = trainer.make_predict(final_fn, params)
  results = {"num_beams": e.final_num_beams, "length_penalty": e.length_penalty}
  for split, pairs, src in (("eval", eval_pairs, eval_src),
                            ("test", test_pairs, encode(test_pairs)[0] if test_pairs else [])):
    if not pairs:
      continue
    hypotheses = translate(predict, src, e.batch_size, eval_length, target_tok)
    bleu = evaluation.corpus_bleu(hypotheses, [tgt for _, tgt in pairs])
    results[f"{split}/bleu"] = bleu["bleu"]
    results[f"{split}/bleu_detail"] = bleu
    if jax.process_index() == 0:
      path = os.path.join(workdir, "predictions", f"{split}.txt")
      with errors.writing(path, "predictions"):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
          f.write("".join(h + "\n" for h in hypotheses))
  if jax.process_index() == 0:
    path = os.path.join(workdir, "eval_results.json")
    with errors.writing(path, "evaluation results"), open(path, "w") as f:
      json.dump(results, f, indent=1)
  common.report(workdir, last)
  print("  " + ", ".join(f"{k}={v:.2f}" for k, v in results.items() if k.endswith("/bleu"))
        + f" (beam {e.final_num_beams}); predictions: {os.path.join(workdir, 'predictions')}")
  return results


if __name__ == "__main__":
  common.main(run, sys.argv)
