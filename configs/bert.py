"""BERT MLM+NSP pretraining recipes (Devlin et al. 2019), data as google-research/bert builds it.

Run:
  python -m train.pretrain_bert --config=configs/bert.py:sample --workdir=workdirs/bert_sample

Variants:
  tiny      2 layers x 128 on the bundled sample text, a few steps (tests; seconds).
  sample    the bundled BERT sample text (3 documents), a mini model overfits it: masked-LM and
            next-sentence accuracy >= 0.95 on its own instances within a few hundred steps.
  wikitext  WikiText-2 text converted to one sentence per line (train/prepare_wikitext.py),
            a mini model; the last 10% of documents are held out for eval.
  sst2_text a small encoder (4 layers x 128) on SST-2's own unlabelled training sentences plus
            WikiText-2 (train/prepare_corpus.py makes the corpus); the encoder behind the SST-2
            result in bench/RESULTS.md (finetune with configs/finetune.py:sst2_small).
  base      BERT-base, two phases: 90% of steps at 128 tokens, the rest at 512 (TPU-sized).
"""

import ml_collections

from configs.common import base_config, model_config
from fmjax.models import bert

SAMPLE = "data/bert_sample_text.txt"


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  config = base_config()
  preset = {"tiny": "tiny", "sample": "mini", "wikitext": "mini", "sst2_text": "tiny",
            "base": "base"}.get(variant)
  if preset is None:
    raise ValueError(f"unknown variant {variant!r}; choose tiny, sample, wikitext, sst2_text "
                     "or base")
  config.model = model_config(bert.get_config(preset))
  config.model.vocab_size = -1  # -1: the tokenizer's vocabulary size
  config.runtime.dropout_rate = config.runtime.attention_dropout_rate = 0.1  # BERT's

  d = config.data = ml_collections.ConfigDict()
  d.train_path = SAMPLE  # one sentence per line, a blank line between documents
  d.eval_path = ""  # empty: eval_fraction of the documents, or the train instances if 0
  d.eval_fraction = 0.0
  d.data_dir = ""  # prepared instances; empty: WORKDIR/data
  d.tokenizer_path = ""  # an existing sentencepiece .model with [PAD] [UNK] [CLS] [SEP] [MASK]
  d.vocab_size = 8192  # sentencepiece vocabulary trained on the corpus
  d.lowercase = False  # an uncased vocabulary: the tokenizer lower-cases all text
  d.max_seq_length = 128
  d.max_predictions_per_seq = 20
  d.masked_lm_prob = 0.15
  d.short_seq_prob = 0.1
  d.dupe_factor = 10
  d.whole_word_mask = False
  d.dynamic_masking = False  # re-mask every epoch instead of dupe_factor static copies
  # Two-phase recipe: after phase1_fraction of the steps, continue at phase2_max_seq_length
  # (with phase2_max_predictions_per_seq). phase1_fraction = 1.0: one phase.
  d.phase1_fraction = 1.0
  d.phase2_max_seq_length = 512
  d.phase2_max_predictions_per_seq = 80

  t = config.train  # BERT's optimizer: AdamW, wd 0.01, eps 1e-6, warmup then linear decay to 0
  t.decay, t.end_factor, t.weight_decay, t.b1, t.b2, t.eps = "linear", 0.0, 0.01, 0.9, 0.999, 1e-6
  t.learning_rate, t.warmup_steps = 1e-4, 10_000
  if variant == "tiny":
    d.vocab_size, d.max_seq_length, d.dupe_factor = 300, 64, 2
    t.steps, t.batch_size, t.learning_rate, t.warmup_steps = 10, 8, 1e-3, 2
    t.log_every, t.eval_every, t.save_every, t.eval_batches = 5, 10, 10, 2
  elif variant == "sample":
    d.vocab_size, d.dupe_factor = 400, 5
    config.runtime.dropout_rate = config.runtime.attention_dropout_rate = 0.0  # memorise
    t.steps, t.batch_size, t.learning_rate, t.warmup_steps = 300, 16, 1e-3, 30
    t.log_every, t.eval_every, t.save_every, t.eval_batches = 25, 100, 100, 100
  elif variant == "wikitext":
    d.train_path = "workdirs/wikitext2_sentences.txt"
    d.eval_fraction, d.vocab_size, d.dupe_factor, d.lowercase = 0.1, 8192, 5, True
    t.steps, t.batch_size, t.learning_rate, t.warmup_steps = 1500, 32, 5e-4, 100
    t.log_every, t.eval_every, t.save_every, t.eval_batches = 50, 500, 500, 20
  elif variant == "sst2_text":
    d.train_path = "workdirs/sst2_corpus.txt"
    config.model.update(num_layers=4, num_heads=4, embed_dim=128, mlp_dim=512)
    d.eval_fraction, d.vocab_size, d.lowercase = 0.02, 8192, True
    d.max_seq_length, d.max_predictions_per_seq, d.dupe_factor = 64, 10, 1
    d.dynamic_masking = True
    t.steps, t.batch_size, t.learning_rate, t.warmup_steps = 4000, 64, 1e-3, 200
    t.log_every, t.eval_every, t.save_every, t.eval_batches = 100, 1000, 500, 10
  else:  # base
    d.train_path, d.vocab_size = "", 30522
    d.phase1_fraction = 0.9
    config.runtime.update(scan_layers=True, remat_policy="dots_no_batch", dtype="bfloat16")
    t.steps, t.batch_size = 1_000_000, 256
    t.log_every, t.eval_every, t.save_every = 100, 5000, 5000
  return config
