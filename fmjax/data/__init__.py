"""Text data for language models: tokenizers, corpora as tfds datasets, packed LM batches.

Reading order: `tokenizers.py` (str <-> ids), `text.py` (files or tfds catalog -> documents),
`packing.py` (documents -> one cached token stream), `batches.py` (Grain pipelines: stream or
examples -> resumable per-host batches).

Each name below, and each submodule, is imported on first use (PEP 562), so that
`fmjax.data.CharTokenizer` does not load tensorflow_datasets, which `text.py` needs.
"""

import importlib
import importlib.util

# name -> the submodule that defines it
_NAMES = {
    "batches": ("ArraySource", "Batches", "ExampleBatchIterator", "LMBatchIterator", "eval_batches",
                "example_batches", "host_batches", "make_batch", "padded_batches"),
    "packing": ("load_token_stream", "pack_documents", "token_cache_path", "token_dtype"),
    "text": ("DataError", "Documents", "LocalText", "LocalTextConfig", "load_documents",
             "split_documents", "split_fraction"),
    "tokenizers": ("ByteTokenizer", "CharTokenizer", "SentencePieceTokenizer", "Tokenizer",
                   "load_tokenizer", "train_sentencepiece"),
    "bert_pretraining": ("BertPretrainingConfig", "BertPretrainingExamples",
                         "create_pretraining_examples", "mask_tokens",
                         "prepare_pretraining_dataset", "pretraining_fingerprint",
                         "read_pretraining_documents", "token_pieces", "word_starts"),
    "images": ("ImageFolder", "Subset", "TfdsImages", "load_arrays", "random_crop_flip",
               "read_idx", "read_idx_dataset", "resize_image"),
}
_MODULE_OF = {name: module for module, names in _NAMES.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
  if name in _MODULE_OF:
    value = getattr(importlib.import_module(f"fmjax.data.{_MODULE_OF[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value
  if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
    return importlib.import_module(f"{__name__}.{name}")  # a submodule, e.g. fmjax.data.glue
  raise AttributeError(f"module 'fmjax.data' has no attribute {name!r}")


def __dir__():
  return sorted({*globals(), *_MODULE_OF})
