"""Hugging Face interop: BERT, GPT-2, ViT and the decoder families (Llama, Mistral, Qwen2/3,
Gemma 1/2/3) checkpoints and tokenizers in and out of fmjax.

  model, variables = fmjax.hf.from_pretrained("path/to/bert-base-uncased", mesh=mesh)
  config, params = fmjax.hf.read_weights("path/to/gpt2")         # numpy, fmjax names
  fmjax.hf.save_pretrained(model, variables, "out/")             # transformers can load it
  tokenizer = fmjax.hf.tokenizer_from_pretrained("path/to/gpt2")  # an fmjax Tokenizer
  ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)  # chat models
  stop = fmjax.hf.generation_config("path/to/model").stop_tokens    # generation_config.json
  model, variables = fmjax.hf.from_pretrained("path/to/vit-base-patch16-224")  # a ViT classifier
  model, variables = fmjax.hf.from_pretrained("path/to/bert", task="classification", num_labels=3)
  fmjax.hf.save_pretrained(model, variables, "out/")  # an HF BertForSequenceClassification
  fmjax.hf.peft.save_adapter("out/peft", model, params, spec)  # fmjax.lora adapters as PEFT's
  params, spec = fmjax.hf.peft.load_adapter("peft_dir", model, variables["params"])

`fmjax.data.load_tokenizer(directory)` reads a Hugging Face tokenizer directory too (through
tokenizer_from_pretrained), as well as the tokenizers fmjax saves.

Needs only `safetensors` and `tokenizers` (torch only to read a legacy pytorch_model.bin).
Reading order: tables.py (which HF tensor is which fmjax parameter), decoders.py (the same for
the decoder families), weights.py (files, checks, sharded placement), tokenizer.py, peft.py
(LoRA adapters in PEFT's format, through the same tables).
"""

import importlib
import importlib.util

# name -> the submodule that defines it, imported on first use (PEP 562): the tokenizer does
# not load safetensors and the weights do not load tokenizers.
_MODULE_OF = {"ARCHITECTURES": "weights", "TASKS": "weights", "HFTokenizer": "tokenizer",
              "tokenizer_from_pretrained": "tokenizer", "from_pretrained": "weights",
              "read_weights": "weights", "save_pretrained": "weights",
              "generation_config": "chat", "GenerationDefaults": "chat"}

__all__ = ["ARCHITECTURES", "GenerationDefaults", "HFTokenizer", "TASKS", "from_pretrained",
           "generation_config", "read_weights", "save_pretrained", "tokenizer_from_pretrained"]


def __getattr__(name: str):
  if name in _MODULE_OF:
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value
  if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
    return importlib.import_module(f"{__name__}.{name}")  # a submodule, e.g. fmjax.hf.tables
  raise AttributeError(f"module 'fmjax.hf' has no attribute {name!r}")


def __dir__():
  return sorted({*globals(), *_MODULE_OF})
