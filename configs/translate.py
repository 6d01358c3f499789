"""Translation recipes for the encoder-decoder Transformer (Vaswani et al. 2017).

Run:
  python -m train.translate --config=configs/translate.py:multi30k --workdir=workdirs/m30k

Variants:
  tiny      2 + 2 layers x 64 wide on the bundled toy German -> English number-and-colour
            phrases (data/translate_tiny); seconds on a CPU; the tests run it.
  multi30k  Multi30k de -> en (../shared/data/multi30k, 29,000 training pairs): 3 + 3 layers
            x 256 wide, one shared 8,000-piece SentencePiece vocabulary, label smoothing 0.1,
            2,800 steps of 64 pairs, beam 4: test_2016_flickr 39.47 BLEU in about an hour of
            the shared 2-core CPU (bench/RESULTS.md; the bar is 20). On a heavily loaded
            machine prefix FMJAX_CPU_DEVICES=1: XLA aborts a 2-device CPU run whose all-reduce
            waits more than 40 s for a starved thread.
  wmt14     WMT'14 de -> en from the tfds catalog (wmt14_translate/de-en, prepared online):
            the paper's base model (6 + 6 x 512, 8 heads, F 2048), 37,000 shared pieces; sized
            for an accelerator, not run here.
Every variant evaluates eval/loss, eval/accuracy (next-token) and eval/bleu (sacrebleu's
default corpus BLEU on the detokenized eval text), keeps the best eval/bleu params in
WORKDIR/best, and at the end writes WORKDIR/predictions/{eval,test}.txt from them with beam
search (eval_results.json has the BLEU). Rerunning resumes.
"""

import ml_collections

from configs.common import base_config, model_config
from fmjax.models import seq2seq

VARIANTS = ("tiny", "multi30k", "wmt14")
MULTI30K = "../shared/data/multi30k/{}.{}.gz"


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
  config = base_config()
  config.model = model_config(seq2seq.get_config(
      {"tiny": "tiny", "multi30k": "small", "wmt14": "base"}[variant]))
  config.model.vocab_size = -1  # -1: the tokenizer's
  config.model.source_vocab_size = -1  # -1: the source tokenizer's (0 when shared)

  d = config.data = ml_collections.ConfigDict()
  # Local line-aligned files (plain or .gz); empty train_source: tfds_name instead.
  d.train_source, d.train_target = "", ""
  d.eval_source, d.eval_target = "", ""
  d.test_source, d.test_target = "", ""  # optional: decoded with beam search at the end
  d.tfds_name = ""  # e.g. wmt14_translate/de-en
  d.source_lang, d.target_lang = "de", "en"  # the tfds feature names
  d.train_split, d.eval_split, d.test_split = "train", "validation", "test"
  d.data_dir = ""  # tfds data_dir; empty: the tfds default
  d.max_train_examples = 0  # >0: only the first N training pairs
  d.max_length = 64  # tokens per side (longer pairs are cut)
  d.length_multiple = 16  # batches are padded to a multiple of this (few compiled shapes)
  d.vocab_size = 8000  # SentencePiece pieces (each, when not shared)
  d.shared_vocab = True  # one vocabulary and embedding for both languages

  e = config.eval = ml_collections.ConfigDict()
  e.num_beams = 1  # during training (greedy is fast); the final decode uses final_num_beams
  e.final_num_beams = 4
  e.length_penalty = 0.6  # beam score = log-prob / length ** length_penalty (GNMT's alpha)
  e.max_examples = 0  # >0: BLEU during training on the first N eval pairs only
  e.batch_size = 128

  t = config.train
  t.learning_rate, t.warmup_steps, t.decay, t.end_factor = 1e-3, 400, "cosine", 0.05
  t.b1, t.b2, t.eps, t.weight_decay, t.grad_clip = 0.9, 0.98, 1e-9, 0.0, 1.0
  t.label_smoothing = 0.1
  t.best_metric = "eval/bleu"
  t.keep_checkpoints = 2

  if variant == "tiny":
    d.train_source, d.train_target = "data/translate_tiny/train.de", "data/translate_tiny/train.en"
    d.eval_source = "data/translate_tiny/val.de.gz"
    d.eval_target = "data/translate_tiny/val.en.gz"
    d.vocab_size, d.max_length = 60, 32
    e.final_num_beams, e.batch_size = 2, 32
    t.steps, t.batch_size, t.warmup_steps, t.learning_rate = 300, 32, 30, 3e-3
    t.log_every, t.eval_every, t.save_every = 50, 150, 150
  elif variant == "multi30k":
    config.runtime.dropout_rate = 0.1
    for split, name in (("train", "train"), ("eval", "val"), ("test", "test_2016_flickr")):
      d[f"{split}_source"] = MULTI30K.format(name, "de")
      d[f"{split}_target"] = MULTI30K.format(name, "en")
    t.steps, t.batch_size = 2800, 64
    t.log_every, t.eval_every, t.save_every = 100, 500, 500
  else:  # wmt14
    config.runtime.dropout_rate = 0.1  # the paper's P_drop
    d.tfds_name, d.vocab_size, d.max_length = "wmt14_translate/de-en", 37000, 128
    e.batch_size = 64
    t.steps, t.batch_size, t.warmup_steps, t.learning_rate = 100_000, 512, 4000, 7e-4
    t.log_every, t.eval_every, t.save_every = 100, 5000, 5000
    e.max_examples = 1000
  return config
