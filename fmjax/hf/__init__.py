"""Hugging Face interop: BERT, GPT-2 and ViT checkpoints and tokenizers in and out of fmjax.

  model, variables = fmjax.hf.from_pretrained("path/to/bert-base-uncased", mesh=mesh)
  config, params = fmjax.hf.load_params("path/to/gpt2")          # numpy, fmjax names
  fmjax.hf.save_pretrained(model, variables, "out/")             # transformers can load it
  tokenizer = fmjax.hf.load_tokenizer("path/to/gpt2")            # an fmjax Tokenizer
  model, variables = fmjax.hf.from_pretrained("path/to/vit-base-patch16-224")  # a ViT classifier

Needs only `safetensors` and `tokenizers` (torch only to read a legacy pytorch_model.bin).
Reading order: tables.py (which HF tensor is which fmjax parameter), weights.py (files,
checks, sharded placement), tokenizer.py.
"""

from fmjax.hf.tables import ARCHITECTURES
from fmjax.hf.tokenizer import HFTokenizer, load_tokenizer
from fmjax.hf.weights import from_pretrained, load_params, save_pretrained

__all__ = ["ARCHITECTURES", "HFTokenizer", "from_pretrained", "load_params",
           "load_tokenizer", "save_pretrained"]
