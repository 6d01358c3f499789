"""Supervised finetuning (instruction tuning) recipes for a causal LM.

Run:
  python -m train.sft --config=configs/sft.py:tiny --workdir=/tmp/sft_tiny      # seconds
  python -m train.sft --config=configs/sft.py:full --workdir=workdirs/sft \\
      --config.init_from=hf:DIR --config.data.train_path=train.jsonl \\
      --config.data.eval_path=eval.jsonl

Data: JSONL rows {"prompt": ..., "response": ...} (optionally "system") or
{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]} ending with the
assistant's turn (fmjax/data/sft.py). Rendered with the checkpoint's chat template when it has
one (data.prompt_format=auto), else the plain format; the loss counts the assistant's tokens and the
end-of-turn token only. Short examples are packed into seq_len rows (data.packing).

Variants:
  tiny  a 2-layer GPT from random init with the byte tokenizer (no init_from) on the bundled
        data/sft_tiny/*.jsonl (its eval file repeats four training rows: a toy that shows
        the answers being learnt, not generalisation): the response loss falls far below its
        start and the eval answers turn into the trained responses (about a minute on a
        2-core CPU). With --config.init_from=hf:DIR it finetunes that model instead.
  full  full finetuning of SmolLM2-135M-Instruct ($FMJAX_SMOLLM2, else
        ~/.cache/fmjax/smollm2-135m-instruct, which bench/make_smollm2.py writes; any
        Llama/Mistral/Qwen/Gemma or GPT-2 directory, or an fmjax workdir, works the same):
        on the bundled sample unless --config.data.train_path/eval_path name yours;
        lr 2e-5, 512 tokens, bfloat16 compute with scanned, rematerialised layers.
  lora  the same with rank-8 LoRA adapters (alpha 16) on the attention and MLP projections
        and LoRA's learning rate (2e-4); export/peft/ holds the adapter for peft.
At the end, WORKDIR/export/merged/ holds the model in Hugging Face format (config.json,
model.safetensors and the tokenizer files), loadable by fmjax.hf.from_pretrained and
transformers; evaluations write eval/loss (response tokens) and the sampled answers to the log,
TensorBoard (text) and WORKDIR/predictions/.
"""

import os

import ml_collections

from configs.common import base_config, lora_config, model_config
from fmjax.models import gpt

VARIANTS = ("tiny", "full", "lora")
SMOLLM2 = os.environ.get("FMJAX_SMOLLM2") or os.path.join(
    os.path.expanduser("~"), ".cache", "fmjax", "smollm2-135m-instruct")


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
  config = base_config()
  # The model without init_from: a GPT over the byte tokenizer. With init_from, the source's
  # own architecture and tokenizer (config.model is not used).
  config.model = model_config(gpt.get_config("tiny"))
  config.model.vocab_size = -1  # the tokenizer's

  d = config.data = ml_collections.ConfigDict()
  d.train_path = "data/sft_tiny/train.jsonl"  # JSONL file(s) or glob
  d.eval_path = "data/sft_tiny/eval.jsonl"  # empty: no evaluation
  d.prompt_format = "auto"  # auto | chat_template | plain
  d.seq_len = 128  # input positions per row; longer examples are truncated (prompt end kept)
  d.packing = True  # several short examples per row (segment ids keep them apart)

  s = config.sample = ml_collections.ConfigDict()
  s.num_prompts = 4  # eval prompts answered at each evaluation (0: none)
  s.num_tokens = 64  # new tokens per answer at most
  s.temperature = 0.0  # 0: greedy
  s.top_k = 0  # 0: every token

  config.lora = lora_config()  # rank 0: full finetuning

  t = config.train
  t.epochs = 0.0  # with steps 0: steps = epochs x packed rows / batch_size
  t.weight_decay = 0.0
  if variant == "tiny":
    config.model.max_len = d.seq_len
    t.steps, t.batch_size, t.learning_rate, t.warmup_steps = 120, 8, 3e-3, 10
    t.log_every, t.eval_every, t.save_every = 20, 60, 60
    s.num_tokens = 32  # prompts keep their last max_len - num_tokens = 96 tokens
  else:
    config.init_from = "hf:" + SMOLLM2
    d.seq_len = 512
    config.runtime.update(scan_layers=True, remat_policy="dots_no_batch", dtype="bfloat16")
    t.steps, t.batch_size, t.warmup_steps = 200, 8, 20
    t.learning_rate = 2e-5 if variant == "full" else 2e-4
    if variant == "lora":
      config.lora.rank, config.lora.alpha = 8, 16.0
    t.decay, t.end_factor = "cosine", 0.1
    t.log_every, t.eval_every, t.save_every = 10, 50, 50
    s.num_prompts, s.num_tokens = 4, 128
  return config
