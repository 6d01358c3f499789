"""Finetuning recipes for a BERT encoder (Devlin et al. 2019, section 4 and appendix A.3).

Run (the encoder from a pretrain_bert workdir, a Hugging Face directory, or random init):
  python -m train.finetune --config=configs/finetune.py:sst2 --workdir=workdirs/sst2 \\
      --config.init_from=workdirs/bert_wt2_uncased \\
      --config.data.train_path=../shared/data/sst2/train.tsv \\
      --config.data.eval_path=../shared/data/sst2/test.tsv

Variants (tasks; with train_path/eval_path empty they read the tfds catalog dataset):
  tiny      a 2-layer encoder on the bundled toy sentiment TSV (data/finetune_tiny; seconds).
  tiny_qa   the same on the bundled toy SQuAD JSON, short windows so contexts span several.
  sst2      single sentences, 2 labels (glue/sst2; local GLUE TSV: header, no quoting).
  sst2_small  SST-2 from ../shared/data/sst2 (train.tsv; test.tsv is GLUE's dev set) with a
            4-layer x 128 encoder, 1 epoch at 3e-4: the acceptance run, from
            configs/bert.py:sst2_text or from random init beside it (bench/RESULTS.md).
  rte       sentence pairs, entailment / not_entailment (glue/rte; local TSV with CSV quoting).
  stsb      sentence-pair regression, scores 0..5 (glue/stsb), Pearson and Spearman.
  squad     extractive QA, SQuAD v1.1 (tfds squad; local SQuAD JSON), exact match and F1.
  xquad     squad on ../shared/data/xquad/xquad.en.json, the last 25% of articles held out.
BERT's finetuning optimizer: AdamW (wd 0.01, eps 1e-6), 10% warmup, linear decay to 0,
a few epochs at 2e-5..5e-5 for pretrained encoders, dropout 0.1 (config.runtime). Variants
train by config.train.epochs (with train.steps=0); an explicit --config.train.steps=N wins
(the log says epochs is ignored).
"""

import ml_collections

from configs.common import base_config, lora_config, model_config
from fmjax.models import bert

VARIANTS = ("tiny", "tiny_qa", "sst2", "sst2_small", "rte", "stsb", "squad", "xquad")


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
  config = base_config()
  config.task = "qa" if variant in ("tiny_qa", "squad", "xquad") else (
      "regression" if variant == "stsb" else "classification")
  # The encoder when config.init_from is empty (random init). With init_from, its own
  # architecture is used; config.runtime (dropout, attention_impl, remat, dtypes) applies.
  config.model = model_config(bert.get_config("tiny" if variant.startswith("tiny") else "mini"))
  config.model.vocab_size = -1
  config.runtime.dropout_rate = config.runtime.attention_dropout_rate = 0.1  # BERT's
  # LoRA (--config.lora.rank=8): adapters train, the encoder stays frozen, the head trains.
  config.lora = lora_config()

  d = config.data = ml_collections.ConfigDict()
  d.train_path = ""  # local file(s) or glob; empty: tfds_name
  d.eval_path = ""
  d.predict_path = ""  # any input file: predictions written to WORKDIR/predictions/
  d.tfds_name = ""  # e.g. glue/sst2, glue/rte, glue/stsb, squad
  d.train_split, d.eval_split = "train", "validation"
  d.data_dir = ""  # tfds data_dir; empty: the tfds default
  d.max_train_examples = 0  # >0: only the first N training examples
  # Table files (classification, regression)
  d.format = ""  # tsv | csv | jsonl; empty: from the file extension
  d.header = True
  d.quoting = "none"  # "none" (every character is text) or "csv" (quoted fields)
  d.text_columns = "sentence"  # one column, or two comma-separated for pairs
  d.label_column = "label"
  d.label_names = ""  # comma-separated label strings in id order; empty: ids as written
  d.num_labels = 2
  d.max_seq_length = 128
  # Length buckets: each batch is padded to the next power of two >= its longest row (at
  # least min_bucket_length, at most max_seq_length), one compiled program per bucket, so
  # short texts cost what their tokens cost. False: every batch padded to max_seq_length.
  d.bucket = True
  d.min_bucket_length = 16
  # Rows of similar length share a batch: each run of group_batches batches of the shuffled
  # order is sorted by length, then visited in random order (Hugging Face's group_by_length,
  # tf.data's bucket_by_sequence_length), so buckets hold little padding. 0: plain shuffle.
  d.group_batches = 32
  d.eval_batch_size = 0  # 0: train.batch_size
  # QA
  d.doc_stride, d.max_query_length, d.n_best_size, d.max_answer_length = 128, 64, 20, 30
  d.eval_fraction = 0.0  # QA without eval_path: hold out this fraction of the articles
  # Random init only (init_from brings its own tokenizer): a saved tokenizer directory (e.g.
  # a pretrain_bert workdir's tokenizer/), or else one learned on the training text.
  d.tokenizer_dir = ""
  d.vocab_size, d.lowercase = 8000, True

  t = config.train
  t.decay, t.end_factor, t.weight_decay, t.b1, t.b2, t.eps = "linear", 0.0, 0.01, 0.9, 0.999, 1e-6
  t.learning_rate, t.batch_size, t.grad_clip = 5e-5, 32, 1.0
  t.steps = 0  # 0: from epochs; > 0 wins over epochs
  t.epochs = 3.0  # with steps 0: steps = epochs x train examples / batch_size
  t.warmup_fraction = 0.1  # >0: warmup_steps = fraction x steps
  t.log_every, t.eval_every, t.save_every = 50, 500, 500
  t.best_metric = "eval/accuracy"

  if variant == "tiny":
    d.train_path = "data/finetune_tiny/sentiment_train.tsv"
    d.eval_path = "data/finetune_tiny/sentiment_dev.tsv"
    d.max_seq_length, d.vocab_size, d.group_batches = 32, 120, 0
    t.epochs, t.learning_rate, t.batch_size = 0.0, 1e-3, 8
    t.steps, t.log_every, t.eval_every, t.save_every = 20, 5, 10, 10
  elif variant == "tiny_qa":
    d.train_path = d.eval_path = "data/finetune_tiny/qa.json"
    d.max_seq_length, d.doc_stride, d.max_query_length, d.vocab_size = 48, 16, 16, 200
    d.group_batches = 0
    t.epochs, t.learning_rate, t.batch_size = 0.0, 1e-3, 8
    t.steps, t.log_every, t.eval_every, t.save_every = 20, 5, 10, 10
    t.best_metric = "eval/f1"
  elif variant == "sst2":
    d.tfds_name, d.max_seq_length = "glue/sst2", 64
    t.epochs, t.learning_rate = 1.0, 1e-4
  elif variant == "sst2_small":
    d.train_path = "../shared/data/sst2/train.tsv"
    d.eval_path = "../shared/data/sst2/test.tsv"  # GLUE's dev set (labelled)
    d.max_seq_length = 64
    config.model.update(num_layers=4, num_heads=4, embed_dim=128, mlp_dim=512, max_len=128)
    t.epochs, t.learning_rate, t.batch_size = 1.0, 3e-4, 32
    t.log_every, t.eval_every, t.save_every = 100, 500, 500
  elif variant == "rte":
    d.tfds_name, d.text_columns = "glue/rte", "sentence1,sentence2"
    d.quoting, d.label_names = "csv", "entailment,not_entailment"
    t.epochs, t.learning_rate, t.batch_size = 3.0, 5e-5, 16
  elif variant == "stsb":
    d.tfds_name, d.text_columns = "glue/stsb", "sentence1,sentence2"
    t.epochs, t.best_metric = 3.0, "eval/pearson"
  else:  # squad, xquad
    d.tfds_name, d.max_seq_length = "squad", 384
    t.epochs, t.learning_rate, t.best_metric = 2.0, 5e-5, "eval/f1"
    if variant == "xquad":
      d.tfds_name, d.train_path = "", "../shared/data/xquad/xquad.en.json"
      d.eval_fraction, d.max_seq_length = 0.25, 256
      t.epochs, t.learning_rate, t.batch_size = 4.0, 1e-4, 16
  return config
