"""GPT causal-LM pretraining recipes.

Run:
  python -m train.pretrain_gpt --config=configs/gpt.py:shakespeare_char --workdir=workdirs/sc

Variants:
  tiny              2 layers x 64 wide, a few steps on the bundled text (tests; seconds).
  shakespeare_char  the demo: char-level tiny Shakespeare, 4 layers x 192, block 128, batch 32.
                    600 steps, about 5 minutes on a 2-core CPU (val loss ~1.8); 10 minutes of it is what
                    bench/shakespeare_quality.py measures against HF PyTorch (bench/RESULTS.md).
  gpt2_small        GPT-2 124M on a tfds catalog corpus (openwebtext-like); accelerator-sized.
  gpt2_medium       GPT-2 350M, FSDP + tensor parallel.
  smollm2           continued pretraining of SmolLM2-135M-Instruct (a Llama) on tiny Shakespeare:
                    its weights, architecture and tokenizer from --config.init_from=hf:DIR
                    (default $FMJAX_SMOLLM2, else ~/.cache/fmjax/smollm2-135m-instruct, which
                    bench/make_smollm2.py writes), full parameters, lr 3e-5 with warmup and
                    cosine decay, 512 tokens, bfloat16 compute with scanned, rematerialised
                    layers. Any Llama/Mistral/Qwen/Gemma directory works the same way.
"""

import os

import ml_collections

from configs.common import base_config, model_config
from fmjax.models import gpt

SHAKESPEARE = "data/tiny_shakespeare.txt"
SMOLLM2 = os.environ.get("FMJAX_SMOLLM2") or os.path.join(
    os.path.expanduser("~"), ".cache", "fmjax", "smollm2-135m-instruct")


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  config = base_config()
  config.model = model_config(gpt.get_config(
      {"tiny": "tiny", "shakespeare_char": "shakespeare_char", "smollm2": "tiny"}.get(
          variant, variant)))  # smollm2: unused, the architecture is init_from's
  config.model.vocab_size = -1  # -1: the tokenizer's vocabulary size

  d = config.data = ml_collections.ConfigDict()
  d.train_path = SHAKESPEARE  # local files or globs
  d.eval_path = ""  # empty: the last val_fraction of train_path
  d.val_fraction = 0.1
  d.document_split = "file"  # "file": a file is one document; "blank_line": blank lines separate
  d.tfds_name = ""  # a tfds catalog name instead of local files, e.g. "lm1b" or "c4/en:3.1.0"
  d.text_key = "text"
  d.data_dir = ""  # tfds data and token caches; empty: WORKDIR/data
  d.tokenizer = "char"  # char | byte | sentencepiece
  d.vocab_size = 8192  # sentencepiece vocabulary when training one
  d.tokenizer_path = ""  # an existing sentencepiece .model or a saved fmjax tokenizer directory
  d.seq_len = 256
  d.mode = "random"  # random windows (nanoGPT) | sequential (each window once per epoch)

  s = config.sample = ml_collections.ConfigDict()
  s.prompt = "ROMEO:"
  s.num_tokens = 300
  s.temperature = 0.8
  s.top_k = 40

  t = config.train
  if variant == "tiny":
    config.model.max_len = 64
    d.seq_len = 32
    t.steps, t.batch_size, t.learning_rate, t.warmup_steps = 20, 8, 3e-3, 5
    t.log_every, t.eval_every, t.save_every, t.eval_batches = 5, 10, 10, 2
    s.num_tokens = 40
  elif variant == "shakespeare_char":
    d.seq_len = 128
    t.steps, t.batch_size, t.learning_rate, t.warmup_steps = 600, 32, 2e-3, 100
    t.weight_decay, t.b2, t.end_factor = 0.1, 0.99, 0.1
    t.log_every, t.eval_every, t.save_every, t.eval_batches = 25, 200, 200, 20
  elif variant in ("gpt2_small", "gpt2_medium"):
    d.train_path, d.tfds_name, d.text_key = "", "c4/en", "text"
    d.tokenizer, d.vocab_size, d.seq_len, d.mode = "sentencepiece", 50257, 1024, "sequential"
    config.model.vocab_size = 50257
    config.runtime.update(scan_layers=True, remat_policy="dots_no_batch", dtype="bfloat16")
    t.steps, t.batch_size, t.learning_rate, t.warmup_steps = 600_000, 512, 6e-4, 2000
    t.log_every, t.eval_every, t.save_every = 100, 2000, 2000
    s.prompt = "The"
    if variant == "gpt2_medium":
      t.learning_rate = 3e-4
      config.sharding = "fsdp_tp"
  elif variant == "smollm2":
    config.init_from = "hf:" + SMOLLM2
    d.seq_len = 512
    config.runtime.update(scan_layers=True, remat_policy="dots_no_batch", dtype="bfloat16")
    t.steps, t.batch_size, t.learning_rate, t.warmup_steps = 300, 8, 3e-5, 30
    t.decay, t.end_factor = "cosine", 0.1
    t.log_every, t.eval_every, t.save_every, t.eval_batches = 10, 100, 100, 10
    s.prompt, s.num_tokens = "ROMEO:", 100
  else:
    raise ValueError(f"unknown variant {variant!r}; choose tiny, shakespeare_char, "
                     "gpt2_small, gpt2_medium or smollm2")
  return config
