"""Train an image captioner: a ViT encoder and the encoder-decoder Transformer's text decoder.

  python -m train.caption --config=configs/caption.py:shapes --workdir=DIR

Data: generated scenes of coloured shapes with their captions (fmjax/data/captions.py), or
caption folders (config.data.train_folder / eval_folder). The captions' SentencePiece
vocabulary is learned on the training captions and saved in DIR/tokenizer. Training and
evaluation are translate.py's with images in place of source sentences: label-smoothed
cross-entropy, eval/accuracy (next caption token), and greedy captions scored by
eval/exact_match and eval/bleu, written to DIR/predictions/eval.tsv at the end.
"""

import dataclasses
import json
import os
import sys

import jax
import numpy as np

from fmjax import errors, evaluation, generate, heads, trainer
from fmjax import data as fdata
from fmjax.data import captions as fcaptions
from fmjax.data import translation
from fmjax.models import seq2seq, vit
from train import common
from train.translate import detokenize


def load_split(config, split: str):
  """(images (n, S, S, 3) uint8, captions) of the train or eval split."""
  d, size = config.data, config.vit.image_size
  folder = d[f"{split}_folder"]
  if folder:
    return fcaptions.read_caption_folder(folder, image_size=size)
  n = d.num_train if split == "train" else d.num_eval
  return fcaptions.shapes(n, image_size=size, seed=config.seed + (0 if split == "train" else 1))


def tokenizer_settings(config) -> list[str]:
  """The config keys that decide the tokenizer common.caption_tokenizer makes (fixed on resume)."""
  del config
  return ["data.vocab_size"]




def encode(images, texts, tok, max_length: int) -> dict[str, np.ndarray]:
  """Arrays of the examples: images scaled to [-1, 1] and the caption's decoder inputs,
  targets and weights (translation.make_batch's layout)."""
  ids = [np.asarray((t + [tok.eos_id])[:max_length], np.int32) for t in tok.encode_batch(texts)]
  batch = translation.make_batch(ids, ids, max_length, pad_id=tok.pad_id, start_id=tok.eos_id)
  return {"images": images.astype(np.float32) / 127.5 - 1.0, "target_in": batch["target_in"],
          "target_out": batch["target_out"], "weight": batch["weight"]}


def make_loss_fn(model, label_smoothing: float):
  def loss_fn(params, batch, rng, train):
    logits = model.apply({"params": params}, batch["images"], batch["target_in"], train=train,
                         rngs={"dropout": rng})
    return heads.sequence_loss(logits, batch["target_out"], batch["weight"], label_smoothing)
  return loss_fn


def make_predict_fn(model, gen: generate.GenerateConfig, start_id: int, pad_id: int):
  def predict_fn(params, batch):
    encoded = model.apply({"params": params}, batch["images"], method="encode")
    return {"tokens": generate.generate_from_source(model, params, encoded, gen,
                                                    start_id=start_id, pad_id=pad_id).tokens}
  return predict_fn


def caption_images(predict, images, batch_size: int, tok) -> list[str]:
  """Greedy captions of every image (the last batch padded with blank images)."""
  out = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    padded = np.zeros((batch_size, *images.shape[1:]), np.float32)
    padded[:len(chunk)] = chunk
    out += detokenize(tok, predict({"images": padded})["tokens"][:len(chunk)])
  return out


@common.holds_workdir
def run(config, workdir: str):
  common.prepare_workdir(config, workdir)
  common.refuse_changed_settings(config, workdir, tokenizer_settings)
  d, t = config.data, config.train
  train_images, train_texts = load_split(config, "train")
  eval_images, eval_texts = load_split(config, "eval")
  if config.init_from:  # the tokenizer is learned per run: another run's ids would not match
    raise ValueError(f"config.init_from={config.init_from!r}: caption trains from fresh "
                     "weights; leave config.init_from empty")
  tok = common.caption_tokenizer(workdir, train_texts, config.data.vocab_size)
  decoder = common.model_config(seq2seq.Seq2SeqConfig, config.model, tok)
  encoder = common.as_flags(vit.ViTConfig, "config.vit", **config.vit)
  model = seq2seq.ImageCaptioner(decoder, encoder, common.runtime(config))
  train_arrays = encode(train_images, train_texts, tok, d.max_length)
  eval_arrays = encode(eval_images, eval_texts, tok, d.max_length)
  trainer.log.info("%d train and %d eval captions; %d pieces", len(train_texts),
                   len(eval_texts), tok.vocab_size)
  train_data = fdata.ExampleBatchIterator(
      fdata.ArraySource(train_arrays), batch_size=t.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  eval_data = lambda: fdata.example_batches(
      fdata.ArraySource(eval_arrays), t.batch_size, process_index=jax.process_index(),
      process_count=jax.process_count())
  gen = generate.GenerateConfig(max_new_tokens=d.max_length, stop_tokens=(tok.eos_id,))

  def score_fn(predict):
    hypotheses = caption_images(predict, eval_arrays["images"], t.batch_size, tok)
    exact = np.mean([h == r for h, r in zip(hypotheses, eval_texts)])
    return {"eval/exact_match": float(exact),
            "eval/bleu": evaluation.corpus_bleu(hypotheses, eval_texts)["bleu"]}

  tokens = encoder.num_tokens
  task = common.Task(
      model=model, model_config={"decoder": dataclasses.asdict(decoder),
                                 "vit": dataclasses.asdict(encoder), "task": "caption"},
      loss_fn=make_loss_fn(model, t.label_smoothing), train_data=train_data,
      eval_data=eval_data, example_batch=train_data.batch_at(0),
      init_args=lambda b: (b["images"], b["target_in"]),
      flops_per_example=seq2seq.flops_per_example(  # approximately: the ViT as the encoder
          dataclasses.replace(decoder, encoder_layers=encoder.num_layers), tokens, d.max_length),
      tokens_per_example=d.max_length,
      predict_fn=make_predict_fn(model, gen, tok.eos_id, tok.pad_id), score_fn=score_fn)
  state, last = common.fit(config, workdir, task, source=common.sources.Source())

  params = trainer.best_params(workdir, state.params)
  predict = trainer.make_predict(task.predict_fn, params)
  hypotheses = caption_images(predict, eval_arrays["images"], t.batch_size, tok)
  if jax.process_index() == 0:
    path = os.path.join(workdir, "predictions", "eval.tsv")
    with errors.writing(path, "predictions"):
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "w", encoding="utf-8") as f:
        f.write("prediction\treference\n")
        f.write("".join(f"{h}\t{r}\n" for h, r in zip(hypotheses, eval_texts)))
    path = os.path.join(workdir, "eval_results.json")
    with errors.writing(path, "evaluation results"), open(path, "w") as f:
      json.dump({k: float(v) for k, v in last.items() if k.startswith("eval/")}, f, indent=1)
  common.report(workdir, last)
  print(f"  predictions: {os.path.join(workdir, 'predictions', 'eval.tsv')}")
  return last


if __name__ == "__main__":
  common.main(run, sys.argv)
