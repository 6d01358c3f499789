"""Writes the Hugging Face golden models that tests/test_hf.py checks fmjax against.

Run from the repository root where torch and transformers are installed (they are optional
extras; the tests themselves run without them):

  .venv/bin/python tests/golden/make_hf_goldens.py            # all of them
  .venv/bin/python tests/golden/make_hf_goldens.py vit        # only the named ones

It writes, under tests/golden/hf/ (about 0.6 MB in all):
  bert/  a tiny random BertForPreTraining (config.json + model.safetensors), an uncased
         WordPiece tokenizer learned from TEXT (tokenizer.json, tokenizer_config.json and
         vocab.txt; see wordpiece_vocab) and
         reference.npz: input_ids, token_type_ids, attention_mask (B=2, T=16, the second row
         padded), last_hidden_state (B, T, D), pooler_output (B, D), prediction_logits
         (B, T, V), seq_relationship_logits (B, 2).
  gpt2/  a tiny random GPT2LMHeadModel, a byte-level BPE tokenizer (tokenizer.json,
         tokenizer_config.json, vocab.json, merges.txt) and reference.npz: input_ids (2, 16),
         logits (2, 16, V), greedy_prompt (2, 8) and greedy_tokens (2, 20) = prompt + 12 tokens
         of HF generate(do_sample=False), without stopping at EOS.
  tokenizations.json  HF's ids and character offsets of STRINGS for both tokenizers (raw
         offsets, as transformers reports them) and their special-token ids (written only when
         both bert and gpt2 are made).
  vit/   a tiny random ViTForImageClassification (image 16, patch 4, D=32, 2 layers, 2 heads,
         F=64, 3 channels, 5 labels; about 0.1 MB; tests/test_vit.py) and reference.npz:
         images (2, 16, 16, 3) channels last (HF's pixel_values are their (0, 3, 1, 2)
         transpose), last_hidden_state (2, 17, 32) of the ViTModel inside, logits (2, 5).
  bert_cls/, bert_qa/, bert_mlm/  (name: bert_tasks; tests/test_hf_tasks.py) tiny random
         BertForSequenceClassification (3 labels, named in id2label), BertForQuestionAnswering
         and BertForMaskedLM (D=16, 2 layers, 2 heads, F=32, V=200 as bert/'s vocabulary, 32
         positions; about 40 KB each; QA and MLM without the pooler, as HF builds them) and
         reference.npz: input_ids, token_type_ids, attention_mask (B=2, T=12, the second row
         padded) and logits (2, 3) | start_logits, end_logits (2, 12) | logits (2, 12, 200).

  llama/, llama_tied/, mistral/, qwen2/, qwen3/, gemma/, gemma2/, gemma3_text/  (name: decoders;
         tests/test_decoders.py) tiny random *ForCausalLM models of each decoder family in
         DECODERS below, with the family's quirks switched on (rope scaling llama3 / linear,
         biases, tied and untied heads, GQA and MQA, a sliding window of 4 < the 12-token test
         sequence, q/k norms, soft-capping, local and global layers with their own rotary
         bases); mistral/ saved sharded (model.safetensors.index.json), llama_tied/ in bfloat16.
         reference.npz: input_ids (2, 12), logits (2, 12, V) (float32, computed from the saved
         weights), greedy_prompt (2, 6) and greedy_tokens (2, 16) = prompt + 10 argmax tokens
         of HF generate, without stopping at EOS. About 0.1 MB each.

Weights are drawn with fixed seeds at a larger scale than HF's init (std 0.1 matrices,
LayerNorm scales 1 +- 0.2, non-zero biases) so that every tensor, bias and LayerNorm offset
moves the outputs: a wrong transpose or a dropped bias cannot hide in near-zero numbers.
"""

import collections
import json
import pathlib
import shutil
import sys

import numpy as np
import torch
import transformers
from tokenizers import normalizers, pre_tokenizers
from tokenizers.implementations import BertWordPieceTokenizer, ByteLevelBPETokenizer

OUT = pathlib.Path(__file__).resolve().parent / "hf"

TEXT = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away!",
    "A transformer maps tokens to vectors, and attention mixes the vectors of a sequence.",
    "Hello World, hello world: HELLO again. Tokenizers split words into pieces.",
    "Café, naïve, résumé and Straße keep their accents; 東京 and Zürich are places.",
    "Numbers like 42, 3.14 and 2024 appear too, as do emails (me@example.com) and URLs.",
    "Pretraining predicts masked words; generation predicts the next token, left to right.",
] * 4

STRINGS = [
    "Hello World!",
    "the quick brown fox",
    "  Leading spaces and MiXeD CaSe",
    "Café naïve Straße — 東京 😀",
    "unknownword xyz123, tokenizers!",
]

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
EOS = "<|endoftext|>"


def perturb(model, seed):
  """Redraws every parameter: matrices ~ N(0, 0.1^2), LayerNorm scales 1 + N(0, 0.2^2),
  biases and offsets ~ N(0, 0.05^2), embeddings ~ N(0, 0.5^2)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if "LayerNorm.weight" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) \
          or ("layernorm" in name and name.endswith(".weight")):  # ViT's
        p.copy_(1 + 0.2 * noise)
      elif p.ndim == 1:
        p.copy_(0.05 * noise)
      elif "embeddings" in name or name.endswith(("wte.weight", "wpe.weight")):
        p.copy_(0.5 * noise)
      else:
        p.copy_(0.1 * noise)


def wordpiece_vocab(texts, size):
  """An uncased WordPiece vocabulary of `size` tokens learned from `texts`: the specials, every
  character alone and as a "##" continuation, then the most frequent word prefixes and "##"
  suffixes. Deterministic, unlike the tokenizers library's WordPiece trainer, which breaks
  frequency ties differently from run to run (the goldens would change on every rerun)."""
  normalize = normalizers.BertNormalizer(lowercase=True)
  words = collections.Counter(w for t in texts for w, _ in
                              pre_tokenizers.BertPreTokenizer().pre_tokenize_str(
                                  normalize.normalize_str(t)))
  chars = sorted({c for w in words for c in w})
  pieces = collections.Counter()
  for w, n in words.items():
    for i in range(2, len(w) + 1):
      pieces[w[:i]] += n
    for i in range(1, len(w) - 1):
      pieces["##" + w[i:]] += n
  vocab = BERT_SPECIALS + chars + ["##" + c for c in chars]
  for piece, _ in sorted(pieces.items(), key=lambda kv: (-kv[1], kv[0]))[:size - len(vocab)]:
    vocab.append(piece)
  return {t: i for i, t in enumerate(vocab)}


def tokenizations(directory):
  """HF's own tokenization of STRINGS (no special tokens), with raw character offsets."""
  tok = transformers.AutoTokenizer.from_pretrained(directory)
  out = []
  for s in STRINGS:
    enc = tok(s, add_special_tokens=False, return_offsets_mapping=True)
    out.append({"text": s, "ids": enc["input_ids"],
                "offsets": [list(o) for o in enc["offset_mapping"]]})
  return tok, out


def make_bert(rng):
  d = OUT / "bert"
  wp = BertWordPieceTokenizer(wordpiece_vocab(TEXT, 200), lowercase=True)
  transformers.BertTokenizerFast(tokenizer_object=wp._tokenizer, do_lower_case=True
                                 ).save_pretrained(d)
  wp.save_model(str(d))  # vocab.txt too, for the loader's WordPiece-vocabulary path
  tok, ref_tok = tokenizations(d)
  vocab = tok.vocab_size
  # The vocab.txt path of transformers must agree with tokenizer.json, so one reference serves both.
  only_vocab = OUT / "_bert_vocab_only"
  only_vocab.mkdir(exist_ok=True)
  for f in ("vocab.txt", "tokenizer_config.json"):
    shutil.copy(d / f, only_vocab / f)
  _, ref_vocab = tokenizations(only_vocab)
  shutil.rmtree(only_vocab)
  assert ref_vocab == ref_tok, (ref_vocab, ref_tok)

  config = transformers.BertConfig(
      vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=64, max_position_embeddings=64, type_vocab_size=2,
      pad_token_id=tok.pad_token_id)
  torch.manual_seed(0)
  model = transformers.BertForPreTraining(config).eval()
  perturb(model, seed=1)
  model.save_pretrained(d)

  b, t = 2, 16
  ids = rng.integers(len(BERT_SPECIALS), vocab, size=(b, t))
  ids[:, 0] = tok.cls_token_id
  ids[:, 7] = tok.sep_token_id
  ids[:, -1] = tok.sep_token_id
  mask = np.ones((b, t), np.int64)
  mask[1, 11:] = 0  # the second example is 11 tokens long
  ids[1, 10] = tok.sep_token_id
  ids[1, 11:] = tok.pad_token_id
  types = np.zeros((b, t), np.int64)
  types[:, 8:] = 1
  types[1, 11:] = 0
  with torch.no_grad():
    args = dict(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types),
                attention_mask=torch.tensor(mask))
    base = model.bert(**args)
    heads = model(**args)
  np.savez(d / "reference.npz", input_ids=ids.astype(np.int32),
           token_type_ids=types.astype(np.int32), attention_mask=mask.astype(np.int32),
           last_hidden_state=base.last_hidden_state.numpy(),
           pooler_output=base.pooler_output.numpy(),
           prediction_logits=heads.prediction_logits.numpy(),
           seq_relationship_logits=heads.seq_relationship_logits.numpy())
  specials = {"pad_id": tok.pad_token_id, "sep_id": tok.sep_token_id, "cls_id": tok.cls_token_id,
              "mask_id": tok.mask_token_id, "vocab_size": vocab}
  return {"strings": ref_tok, **specials}


def make_gpt2(rng):
  d = OUT / "gpt2"
  bpe = ByteLevelBPETokenizer()
  bpe.train_from_iterator(TEXT, vocab_size=300, min_frequency=1, special_tokens=[EOS])
  transformers.GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS,
                                 unk_token=EOS).save_pretrained(d)
  bpe.save_model(str(d))  # vocab.json + merges.txt, for the loader's BPE-files path
  tok, ref_tok = tokenizations(d)
  vocab = len(tok)
  eos = tok.convert_tokens_to_ids(EOS)

  config = transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2,
                                   n_positions=64, bos_token_id=eos, eos_token_id=eos)
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(config).eval()
  perturb(model, seed=2)
  model.save_pretrained(d)

  ids = rng.integers(0, vocab, size=(2, 16))
  prompt = rng.integers(0, vocab, size=(2, 8))
  model.generation_config.eos_token_id = None  # pure argmax rollouts of exactly 12 tokens
  with torch.no_grad():
    logits = model(torch.tensor(ids)).logits.numpy()
    gen = model.generate(torch.tensor(prompt), attention_mask=torch.ones(2, 8, dtype=torch.long),
                         do_sample=False, max_new_tokens=12, pad_token_id=eos,
                         output_scores=True, return_dict_in_generate=True)
  # A near-tie between the top two logits would make the greedy golden fragile.
  top2 = torch.stack(gen.scores).topk(2, dim=-1).values
  gap = float((top2[..., 0] - top2[..., 1]).min())
  assert gap > 1e-3, f"greedy rollout has a near-tie (gap {gap}); change the seed"
  np.savez(d / "reference.npz", input_ids=ids.astype(np.int32), logits=logits,
           greedy_prompt=prompt.astype(np.int32),
           greedy_tokens=gen.sequences.numpy().astype(np.int32))
  return {"strings": ref_tok, "eos_id": eos, "vocab_size": vocab, "greedy_min_gap": gap}


def make_vit():
  d = OUT / "vit"
  config = transformers.ViTConfig(
      image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
      num_attention_heads=2, intermediate_size=64, num_labels=5)
  torch.manual_seed(0)
  model = transformers.ViTForImageClassification(config).eval()
  perturb(model, seed=3)
  model.save_pretrained(d)
  images = np.random.default_rng(3).uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    pixel_values = torch.tensor(images.transpose(0, 3, 1, 2))
    hidden = model.vit(pixel_values).last_hidden_state.numpy()
    logits = model(pixel_values).logits.numpy()
  np.savez(d / "reference.npz", images=images, last_hidden_state=hidden, logits=logits)


BERT_TASKS = {  # directory -> (transformers class, extra config, perturb seed)
    "bert_cls": ("BertForSequenceClassification",
                 {"id2label": {0: "negative", 1: "neutral", 2: "positive"}}, 4),
    "bert_qa": ("BertForQuestionAnswering", {}, 5),
    "bert_mlm": ("BertForMaskedLM", {}, 6),
}


def make_bert_tasks():
  """The task classes of transformers' BERT, each with its own random weights, on one input."""
  pad, cls, sep = (BERT_SPECIALS.index(t) for t in ("[PAD]", "[CLS]", "[SEP]"))
  b, t, vocab = 2, 12, 200
  rng = np.random.default_rng(4)
  ids = rng.integers(len(BERT_SPECIALS), vocab, size=(b, t))
  ids[:, 0], ids[:, 5], ids[:, -1] = cls, sep, sep
  mask = np.ones((b, t), np.int64)
  mask[1, 9:] = 0  # the second example is 9 tokens long
  ids[1, 8], ids[1, 9:] = sep, pad
  types = np.zeros((b, t), np.int64)
  types[0, 6:] = 1
  types[1, 6:9] = 1
  inputs = dict(input_ids=ids, token_type_ids=types, attention_mask=mask)
  for name, (cls_name, extra, seed) in BERT_TASKS.items():
    d = OUT / name
    config = transformers.BertConfig(
        vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, type_vocab_size=2, pad_token_id=pad,
        **extra)
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(config).eval()
    perturb(model, seed=seed)
    with torch.no_grad():  # the (D, 3) and (D, 2) heads at std 1, so logits are O(1), not O(0.1)
      for n, p in model.named_parameters():
        if n.startswith(("classifier.", "qa_outputs.")):
          p.mul_(10)
    model.save_pretrained(d)
    with torch.no_grad():
      out = model(**{k: torch.tensor(v) for k, v in inputs.items()})
    outputs = ({"start_logits": out.start_logits.numpy(), "end_logits": out.end_logits.numpy()}
               if name == "bert_qa" else {"logits": out.logits.numpy()})
    np.savez(d / "reference.npz", **{k: v.astype(np.int32) for k, v in inputs.items()},
             **outputs)


# name -> (transformers config class, model class, config fields, how it is saved). Tiny shapes:
# D=32, F=64, 4 query heads; every quirk on where the family has it.
_SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=4,
              max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
DECODERS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_hidden_layers=2, num_key_value_heads=2, tie_word_embeddings=False,
        attention_bias=True, mlp_bias=True, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                         "low_freq_factor": 0.5, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 40}), {}),  # one blended band
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(  # SmolLM2-like, saved in bfloat16
        num_hidden_layers=2, num_key_value_heads=1, tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 100000.0, "factor": 2.0}),
        {"dtype": "bfloat16"}),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(  # saved sharded
        num_hidden_layers=2, num_key_value_heads=2, sliding_window=4, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        {"max_shard_size": "40KB"}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        num_hidden_layers=2, num_key_value_heads=2, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}), {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        num_hidden_layers=2, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}), {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(
        num_hidden_layers=2, num_key_value_heads=1, head_dim=16, hidden_act="gelu_pytorch_tanh"),
        {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        num_hidden_layers=3, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        sliding_window=4, attn_logit_softcapping=3.0, final_logit_softcapping=5.0), {}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_hidden_layers=3, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        sliding_window=4, layer_types=["sliding_attention", "full_attention",
                                       "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0,
                                            "factor": 2.0}}), {}),
}


def perturb_decoder(model, seed, gemma):
  """perturb for the decoder families: norm scales 1 + N(0, 0.2^2) (Gemma stores the offset
  from 1, so N(0, 0.2^2) there), biases N(0, 0.1^2), embeddings N(0, 0.5^2), matrices
  N(0, 0.15^2)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if "norm" in name:
        p.copy_((0 if gemma else 1) + 0.2 * noise)
      elif p.ndim == 1:
        p.copy_(0.1 * noise)
      elif "embed_tokens" in name:
        p.copy_(0.5 * noise)
      else:
        p.copy_(0.15 * noise)


def make_decoder(name, seed):
  config_cls, model_cls, fields, save = DECODERS[name]
  d = OUT / name
  shutil.rmtree(d, ignore_errors=True)
  config = getattr(transformers, config_cls)(**_SMALL, **fields)
  config._attn_implementation = "eager"  # soft-capping: the reference implementation
  torch.manual_seed(0)
  model = getattr(transformers, model_cls)(config).eval()
  perturb_decoder(model, seed, gemma=name.startswith("gemma"))
  if save.get("dtype") == "bfloat16":
    model = model.to(torch.bfloat16)
    model.save_pretrained(d)
    # The bf16 values exactly, computed in float32 (a fresh load: .float() would keep the rotary
    # frequencies rounded to bf16).
    model = getattr(transformers, model_cls).from_pretrained(
        d, dtype=torch.float32, attn_implementation="eager").eval()
  else:
    model.save_pretrained(d, max_shard_size=save.get("max_shard_size", "2GB"))
  rng = np.random.default_rng(seed)
  vocab = config.vocab_size
  ids = rng.integers(3, vocab, size=(2, 12))
  prompt = rng.integers(3, vocab, size=(2, 6))
  model.generation_config.eos_token_id = None  # pure argmax rollouts of exactly 10 tokens
  with torch.no_grad():
    logits = model(torch.tensor(ids)).logits.float().numpy()
    gen = model.generate(torch.tensor(prompt), attention_mask=torch.ones(2, 6, dtype=torch.long),
                         do_sample=False, max_new_tokens=10, pad_token_id=0,
                         output_scores=True, return_dict_in_generate=True)
  top2 = torch.stack(gen.scores).topk(2, dim=-1).values
  gap = float((top2[..., 0] - top2[..., 1]).min())
  assert gap > 1e-3, f"{name}: greedy rollout has a near-tie (gap {gap}); change the seed"
  np.savez(d / "reference.npz", input_ids=ids.astype(np.int32), logits=logits,
           greedy_prompt=prompt.astype(np.int32),
           greedy_tokens=gen.sequences.numpy().astype(np.int32))
  print(f"{name}: greedy gap {gap:.3g}, files {sorted(f.name for f in d.iterdir())}")


def make_decoders():
  for i, name in enumerate(DECODERS):
    make_decoder(name, seed=10 + i)


def main(names):
  OUT.mkdir(parents=True, exist_ok=True)
  unknown = set(names) - {"bert", "gpt2", "vit", "bert_tasks", "decoders", *DECODERS}
  assert not unknown, (f"unknown goldens {sorted(unknown)}; choose from bert, gpt2, vit, "
                       f"bert_tasks, decoders (or one of {sorted(DECODERS)})")
  names = names or ["bert", "gpt2", "vit", "bert_tasks", "decoders"]
  rng = np.random.default_rng(0)  # bert then gpt2 draw from it, in this order
  refs = {"transformers": transformers.__version__}
  if "bert" in names or "gpt2" in names:
    refs["bert"] = make_bert(rng)
    refs["gpt2"] = make_gpt2(rng)
    (OUT / "tokenizations.json").write_text(json.dumps(refs, indent=1, ensure_ascii=False)
                                            + "\n", encoding="utf-8")
  if "vit" in names:
    make_vit()
  if "bert_tasks" in names:
    make_bert_tasks()
  if "decoders" in names:
    make_decoders()
  for i, name in enumerate(DECODERS):
    if name in names:
      make_decoder(name, seed=10 + i)
  total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
  print(f"wrote {OUT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
  main(sys.argv[1:])
