"""Text data for language models: tokenizers, corpora as tfds datasets, packed LM batches.

Reading order: `tokenizers.py` (str <-> ids), `text.py` (files or tfds catalog -> documents),
`packing.py` (documents -> one cached token stream), `batches.py` (Grain pipelines: stream or
examples -> resumable per-host batches).
"""

from fmjax.data.batches import (ArraySource, Batches, ExampleBatchIterator, LMBatchIterator,
                                eval_batches, example_batches, host_batches, make_batch,
                                padded_batches)
from fmjax.data.packing import load_token_stream, pack_documents, token_cache_path, token_dtype
from fmjax.data.text import (DataError, Documents, LocalText, LocalTextConfig, load_documents,
                             split_documents, split_fraction)
from fmjax.data.tokenizers import (ByteTokenizer, CharTokenizer, SentencePieceTokenizer,
                                   Tokenizer, load_tokenizer, train_sentencepiece)

__all__ = [
    "ArraySource", "Batches", "host_batches", "padded_batches", "ByteTokenizer", "CharTokenizer", "ExampleBatchIterator", "example_batches", "DataError", "Documents", "LMBatchIterator", "LocalText",
    "LocalTextConfig", "SentencePieceTokenizer", "Tokenizer", "eval_batches",
    "load_documents", "load_token_stream", "load_tokenizer", "make_batch", "pack_documents",
    "split_documents", "split_fraction", "token_cache_path", "token_dtype",
    "train_sentencepiece",
]

from fmjax.data.bert_pretraining import (BertPretrainingConfig, BertPretrainingExamples,
                                         create_pretraining_examples, mask_tokens,
                                         prepare_pretraining_dataset, pretraining_fingerprint,
                                         read_pretraining_documents, token_pieces, word_starts)

__all__ += [
    "BertPretrainingConfig", "BertPretrainingExamples", "create_pretraining_examples",
    "mask_tokens", "prepare_pretraining_dataset", "pretraining_fingerprint",
    "read_pretraining_documents", "token_pieces", "word_starts",
]

from fmjax.data.images import (ImageFolder, Subset, TfdsImages, load_arrays, random_crop_flip,
                               read_idx, read_idx_dataset, resize_image)

__all__ += [
    "ImageFolder", "Subset", "TfdsImages", "load_arrays", "random_crop_flip", "read_idx",
    "read_idx_dataset", "resize_image",
]
