"""fmjax: Transformer foundation models in JAX/Flax.

Reading order: attention.py -> layers.py -> transformer.py -> models/gpt.py (then models/bert.py) -> sharding.py
-> training.py -> checkpoint.py -> data/ -> trainer.py (the loop the programs in train/ share).

`import fmjax` loads the models and the maths they need (JAX, Flax, optax). The parts with
heavy optional dependencies load on first use: `fmjax.checkpoint` (orbax), `fmjax.data`
(tensorflow_datasets, sentencepiece), `fmjax.hf` (safetensors, tokenizers), `fmjax.trainer`,
and the small tools beside them. Importing fmjax installs no logging handler.

The API reference is built from these docstrings by `make docs` (docs/api/index.html): each
public callable's `Args:` and `Returns:` give shapes in one key, B batch, T length, S key
length, D width, F MLP width, N heads, K kv heads, H head dim, V vocab.
"""

import importlib
import importlib.util

from fmjax import attention, heads, layers, runtime, sharding, training, transformer
from fmjax.attention import dot_product_attention, make_attention_mask
from fmjax.heads import ClassificationHead, SpanHead
from fmjax.models.bert import (BertConfig, BertEncoder, BertForMaskedLM, BertForPreTraining,
                               BertForQuestionAnswering, BertForSequenceClassification)
from fmjax.models.gpt import GPT, GPTConfig
from fmjax.models.seq2seq import ImageCaptioner, Seq2Seq, Seq2SeqConfig
from fmjax.models.vit import ViT, ViTConfig, ViTEncoder, resize_posemb
from fmjax.runtime import Runtime
from fmjax.sharding import make_mesh, sharded_init, shard_batch
from fmjax.training import TrainingState, make_eval_step, make_optimizer, make_train_step
from fmjax.transformer import (Block, BlockConfig, DecoderBlock, MultiHeadAttention,
                               TransformerStack)

__version__ = "0.1.0"

# Submodules imported on first attribute access (PEP 562), for what they pull in; any other
# submodule (e.g. fmjax.models) is found the same way.
_LAZY_SUBMODULES = ("checkpoint", "data", "evaluation", "generate", "hf", "memory", "metrics",
                    "sources", "trainer")

__all__ = [
    "GPT", "GPTConfig", "Runtime", "runtime", "sources", "BertConfig", "BertEncoder",
    "BertForMaskedLM", "BertForPreTraining",
    "BertForQuestionAnswering", "BertForSequenceClassification", "ClassificationHead", "SpanHead",
    "evaluation", "heads", "ViT", "ViTConfig", "ViTEncoder", "resize_posemb", "Seq2Seq", "Seq2SeqConfig",
    "ImageCaptioner", "DecoderBlock", "Block", "BlockConfig", "MultiHeadAttention", "TransformerStack",
    "TrainingState", "attention", "checkpoint", "data", "dot_product_attention", "generate",
    "layers", "make_attention_mask", "make_eval_step", "make_mesh", "make_optimizer",
    "make_train_step", "metrics", "shard_batch", "sharded_init", "sharding", "training",
    "transformer",
]


def __getattr__(name: str):
  if name in _LAZY_SUBMODULES or (
      not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None):
    return importlib.import_module(f"{__name__}.{name}")  # also binds it as an attribute
  raise AttributeError(f"module 'fmjax' has no attribute {name!r}")


def __dir__():
  return sorted({*globals(), *_LAZY_SUBMODULES})
