"""BERT: a bidirectional Transformer encoder pretrained by masked LM + next sentence prediction
(Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for Language
Understanding").

Shape key: B batch, T length, D width, F MLP width, N heads, H head dim, V vocab,
P masked predictions per sequence.

tokens + positions + token types -> LayerNorm -> dropout
       -> L post-LN bidirectional blocks (exact erf GELU) -> sequence output (B, T, D)
       -> pooler: tanh(Dense(first token, [CLS]))                -> pooled output (B, D)
Pretraining heads (section 3.1, appendix A.1):
  MLM: hidden at the P masked positions -> Dense -> GELU -> LayerNorm -> tied embedding + bias
  NSP: Dense(2) over the pooled output.
BertForMaskedLM is the MLM head alone on an encoder without pooler; BertForSequenceClassification
and BertForQuestionAnswering are the finetuning heads (fmjax/heads.py), all as Hugging Face's.
Every weight starts from normal(0.02), biases at zero, as in the reference implementation.
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from fmjax import heads, transformer
from fmjax.layers import ACTIVATIONS, Dense, Embed, Norm, partitioned, round_up
from fmjax.runtime import Runtime
from fmjax.training import cross_entropy
from fmjax.transformer import BlockConfig, TransformerStack


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The architecture; how it runs is a Runtime (BERT trains with dropout_rate and
  attention_dropout_rate 0.1: Runtime(dropout_rate=0.1, attention_dropout_rate=0.1))."""
  vocab_size: int = 30522  # WordPiece, uncased
  vocab_multiple: int = 128  # table rows padded to a multiple (tensor parallelism); see Embed
  max_len: int = 512
  type_vocab_size: int = 2  # sentence A / sentence B
  num_layers: int = 12
  num_heads: int = 12
  embed_dim: int = 768
  mlp_dim: int = 3072
  norm_eps: float = 1e-12  # as the TensorFlow reference; 1e-5 would not match checkpoints

  def __post_init__(self):
    transformer.check_config(self, positive=("vocab_size", "max_len", "type_vocab_size",
                                             "num_layers", "num_heads", "embed_dim", "mlp_dim"))

  @property
  def padded_vocab_size(self) -> int:
    """Vp, the rows of the embedding and LM head: vocab_size rounded up to vocab_multiple."""
    return round_up(self.vocab_size, self.vocab_multiple)

  @property
  def head_dim(self) -> int:
    """H, the width of one attention head: embed_dim // num_heads."""
    return self.embed_dim // self.num_heads

  def block(self, runtime: Runtime) -> BlockConfig:
    """The BlockConfig of BERT's layers: bidirectional, post-LN, LayerNorm, exact erf GELU.

    Args:
      runtime: how the model runs (its dropout rates, attention kernel and dtypes go in).

    Returns:
      The BlockConfig shared by the num_layers blocks.
    """
    return BlockConfig(
        num_heads=self.num_heads, head_dim=self.head_dim, mlp_dim=self.mlp_dim, causal=False,
        pre_ln=False, norm="layer", norm_eps=self.norm_eps, mlp_activation="gelu",
        **runtime.block_fields())


PRESETS = {
    "tiny": BertConfig(vocab_size=1000, max_len=128, num_layers=2, num_heads=2, embed_dim=128,
                       mlp_dim=512),
    # The small BERTs of Turc et al. 2019 ("Well-Read Students Learn Better").
    "mini": BertConfig(num_layers=4, num_heads=4, embed_dim=256, mlp_dim=1024),
    "small": BertConfig(num_layers=4, num_heads=8, embed_dim=512, mlp_dim=2048),
    "medium": BertConfig(num_layers=8, num_heads=8, embed_dim=512, mlp_dim=2048),
    "base": BertConfig(),  # 110M
    "large": BertConfig(num_layers=24, num_heads=16, embed_dim=1024, mlp_dim=4096),  # 340M
}


def get_config(name: str, **overrides) -> BertConfig:
  """A preset by name with field overrides, e.g. get_config("tiny", vocab_size=8000).

  Args:
    name: a key of PRESETS: "tiny", "mini", "small", "medium", "base" or "large".
    **overrides: BertConfig fields to replace.

  Returns:
    The BertConfig (validated by its __post_init__).

  Raises:
    ValueError: an unknown preset name, or an invalid field value.
  """
  if name not in PRESETS:
    raise ValueError(f"unknown BERT preset {name!r}; choose from {sorted(PRESETS)}")
  return dataclasses.replace(PRESETS[name], **overrides)


class BertEncoder(nn.Module):
  """The BERT encoder: embeddings, post-LN stack and pooler (Hugging Face's `BertModel`)."""
  config: BertConfig
  runtime: Runtime = Runtime()

  def setup(self):
    c, rt = self.config, self.runtime
    dtype, param_dtype = rt.compute_dtype, rt.params_dtype
    embed = lambda n, axes: Embed(n, c.embed_dim, axes=axes, dtype=dtype, param_dtype=param_dtype)
    self.word_embeddings = Embed(c.vocab_size, c.embed_dim, dtype=dtype, param_dtype=param_dtype,
                                 pad_to_multiple=c.vocab_multiple)
    self.position_embeddings = embed(c.max_len, (None, "embed"))
    self.token_type_embeddings = embed(c.type_vocab_size, (None, "embed"))
    self.ln_embed = Norm("layer", epsilon=c.norm_eps, dtype=dtype, param_dtype=param_dtype)
    self.dropout = nn.Dropout(rt.dropout_rate)
    self.blocks = TransformerStack(c.block(rt), c.num_layers, scan=rt.scan_layers,
                                   remat_policy=rt.remat_policy)
    self.pooler = Dense(c.embed_dim, ("embed", None), dtype=dtype, param_dtype=param_dtype)

  def __call__(self, input_ids, *, token_type_ids=None, attention_mask=None, train: bool = False):
    """Contextual token representations and the pooled [CLS] representation.

    Args:
      input_ids: (B, T) int token ids, T <= max_len.
      token_type_ids: (B, T) int token types (0 = sentence A, 1 = sentence B); default 0.
      attention_mask: (B, T) 1 for real tokens, 0 for padding keys; default all 1.
      train: enables dropout.
    Returns:
      (sequence_output (B, T, D), pooled_output (B, D)) in the compute dtype.
    """
    x = self.encode(input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask,
                    train=train)
    pooled = jnp.tanh(self.pooler(x[:, 0]))  # (B, D), from the [CLS] token
    return x, pooled

  def encode(self, input_ids, *, token_type_ids=None, attention_mask=None, train: bool = False):
    """The sequence output (B, T, D) alone; the pooler is neither run nor created.

    Models with only token-level heads have none, as HF's BertForMaskedLM and
    BertForQuestionAnswering.

    Args:
      input_ids: (B, T) int token ids, T <= max_len.
      token_type_ids: (B, T) int segment ids (0 = sentence A, 1 = sentence B); default 0.
      attention_mask: (B, T) 1 for real tokens, 0 for padding keys; default all 1.
      train: enables dropout.

    Returns:
      (B, T, D) sequence output in the compute dtype.

    Raises:
      ValueError: T > max_len.
    """
    c = self.config
    t = input_ids.shape[1]
    if t > c.max_len:
      raise ValueError(f"input_ids has length {t} but this BERT has max_len={c.max_len} learned "
                       "positions; truncate the inputs or use a config with a larger max_len")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    positions = jnp.arange(t)[None]  # (1, T)
    x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
         + self.token_type_embeddings(token_type_ids))  # (B, T, D)
    x = self.ln_embed(x)
    x = self.dropout(x, deterministic=not train)
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    kv_mask = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    return self.blocks(x, kv_mask=kv_mask, train=train)  # bidirectional: every real key is visible

  def attend(self, x):
    """Tied output projection through the word embedding: (B, P, D) -> (B, P, Vp).

    Vp is the vocabulary padded to vocab_multiple, the padded ids masked to -inf (layers.Embed).

    Args:
      x: (B, P, D) float.

    Returns:
      (B, P, Vp) logits in the compute dtype, -inf at the padded ids.
    """
    return self.word_embeddings.attend(x)


def masked_lm_head(module: nn.Module, bert: BertEncoder, seq, masked_lm_positions=None):
  """MLM logits at the masked positions: Dense -> GELU -> LayerNorm -> tied embedding + bias.

  Its parameters ("mlm_dense", "mlm_ln", "mlm_bias") belong to `module`, the model that calls
  it from its compact __call__; the output projection is bert's word embedding (tied). The
  hidden states are gathered first, so the D x Vp projection runs on P rows, not T.

  Args:
    module: the calling nn.Module (inside its compact __call__), owner of the head's params.
    bert: the BertEncoder submodule whose word embedding is the output projection.
    seq: (B, T, D) float, the encoder's sequence output.
    masked_lm_positions: (B, P) int indices into T of the predicted tokens; None for all T.

  Returns:
    (B, P, Vp) float32 logits, Vp the vocabulary padded to vocab_multiple, the padded ids
    -inf.
  """
  c, rt = bert.config, bert.runtime
  dtype, param_dtype = rt.compute_dtype, rt.params_dtype
  if masked_lm_positions is None:
    masked_lm_positions = jnp.broadcast_to(jnp.arange(seq.shape[1]), seq.shape[:2])
  # Gather first: the D x V projection runs on P (~15% of T) rows, not on all T.
  h = jnp.take_along_axis(seq, masked_lm_positions[..., None], axis=1)  # (B, P, D)
  h = Dense(c.embed_dim, ("embed", None), dtype=dtype, param_dtype=param_dtype,
            name="mlm_dense")(h)
  h = ACTIVATIONS["gelu"](h)
  h = Norm("layer", epsilon=c.norm_eps, dtype=dtype, param_dtype=param_dtype, name="mlm_ln")(h)
  bias = module.param("mlm_bias", partitioned(nn.initializers.zeros, ("vocab",)),
                      (c.padded_vocab_size,), param_dtype)
  return bert.attend(h).astype(jnp.float32) + bias.astype(jnp.float32)


class BertForPreTraining(nn.Module):
  """The encoder (submodule "bert") with the masked-LM and next-sentence heads."""
  config: BertConfig
  runtime: Runtime = Runtime()

  @nn.compact
  def __call__(self, input_ids, token_type_ids=None, attention_mask=None,
               masked_lm_positions=None, *, train: bool = False):
    """Pretraining logits; MLM logits are computed only at the P masked positions.

    Args:
      input_ids, token_type_ids, attention_mask: (B, T), as in BertEncoder.
      masked_lm_positions: (B, P) int indices into T of the predicted tokens (padded
        predictions point anywhere, e.g. 0, and get weight 0 in the loss); default all T.
      train: enables dropout.
    Returns:
      {"mlm_logits": (B, P, Vp) float32 (padded ids -inf), "nsp_logits": (B, 2) float32,
       "sequence_output": (B, T, D), "pooled_output": (B, D)}.
    """
    c, rt = self.config, self.runtime
    dtype, param_dtype = rt.compute_dtype, rt.params_dtype
    bert = BertEncoder(c, rt, name="bert")
    seq, pooled = bert(input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask,
                       train=train)
    mlm_logits = masked_lm_head(self, bert, seq, masked_lm_positions)  # (B, P, Vp)
    nsp_logits = Dense(2, ("embed", None), dtype=dtype, param_dtype=param_dtype,
                       name="nsp_dense")(pooled)  # (B, 2): 0 = IsNext, 1 = NotNext
    return {"mlm_logits": mlm_logits, "nsp_logits": nsp_logits.astype(jnp.float32),
            "sequence_output": seq, "pooled_output": pooled}


class BertForMaskedLM(nn.Module):
  """The encoder without its pooler (submodule "bert") and the masked-LM head alone: Hugging
  Face's BertForMaskedLM, e.g. for domain-adaptive MLM pretraining or fill-in-the-blank."""
  config: BertConfig
  runtime: Runtime = Runtime()

  @nn.compact
  def __call__(self, input_ids, token_type_ids=None, attention_mask=None,
               masked_lm_positions=None, *, train: bool = False):
    """Masked-LM logits at `masked_lm_positions`.

    Args:
      input_ids, token_type_ids, attention_mask: (B, T), as in BertEncoder.
      masked_lm_positions: (B, P) int indices into T, as in BertForPreTraining; default every
        position (P = T).
      train: enables dropout.

    Returns:
      (B, P, Vp) float32 logits (Vp the padded vocabulary, the padded ids -inf).
    """
    bert = BertEncoder(self.config, self.runtime, name="bert")
    seq = bert.encode(input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask,
                      train=train)
    return masked_lm_head(self, bert, seq, masked_lm_positions)


class BertForSequenceClassification(nn.Module):
  """The encoder with a classification (or, num_labels = 1, regression) head on the pooled
  [CLS] output: single sentences (SST-2) and sentence pairs (RTE, MNLI, STS-B)."""
  config: BertConfig
  num_labels: int
  runtime: Runtime = Runtime()

  @nn.compact
  def __call__(self, input_ids, token_type_ids=None, attention_mask=None, *,
               train: bool = False):
    """Classification logits (regression scores) from the pooled [CLS] output.

    Args:
      input_ids, token_type_ids, attention_mask: (B, T), as in BertEncoder.
      train: enables dropout (the encoder's and the head's).

    Returns:
      (B, num_labels) float32 logits (scores when num_labels == 1).
    """
    rt = self.runtime
    _, pooled = BertEncoder(self.config, rt, name="bert")(
        input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask, train=train)
    return heads.ClassificationHead(self.num_labels, rt.dropout_rate, dtype=rt.compute_dtype,
                                    param_dtype=rt.params_dtype,
                                    name="classifier")(pooled, train=train)


class BertForQuestionAnswering(nn.Module):
  """The encoder (no pooler) with a span head over its token outputs (SQuAD-style extractive
  QA), as Hugging Face's BertForQuestionAnswering."""
  config: BertConfig
  runtime: Runtime = Runtime()

  @nn.compact
  def __call__(self, input_ids, token_type_ids=None, attention_mask=None, *,
               train: bool = False):
    """Start and end logits of every token (extractive QA).

    Args:
      input_ids, token_type_ids, attention_mask: (B, T), as in BertEncoder.
      train: enables dropout.

    Returns:
      (start_logits, end_logits), (B, T) float32 each.
    """
    rt = self.runtime
    seq = BertEncoder(self.config, rt, name="bert").encode(
        input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask, train=train)
    return heads.SpanHead(dtype=rt.compute_dtype, param_dtype=rt.params_dtype,
                          name="qa_outputs")(seq)


def pretraining_loss(outputs, batch):
  """Weighted-mean masked-LM cross-entropy plus mean next-sentence cross-entropy.

  Args:
    outputs: BertForPreTraining's dict (mlm_logits (B, P, V), nsp_logits (B, 2)).
    batch: masked_lm_ids (B, P) int, masked_lm_weights (B, P) float (0 on padded
      predictions), next_sentence_labels (B,) int.
  Returns:
    (scalar loss, {masked_lm_loss, masked_lm_accuracy, next_sentence_loss,
    next_sentence_accuracy}).
  """
  mlm_loss, mlm_acc, _ = cross_entropy(outputs["mlm_logits"], batch["masked_lm_ids"],
                                       batch["masked_lm_weights"])
  nsp_loss, nsp_acc, _ = cross_entropy(outputs["nsp_logits"], batch["next_sentence_labels"])
  return mlm_loss + nsp_loss, {"masked_lm_loss": mlm_loss, "masked_lm_accuracy": mlm_acc,
                               "next_sentence_loss": nsp_loss, "next_sentence_accuracy": nsp_acc}


def num_params(c: BertConfig, with_heads: bool = False) -> int:
  """Closed-form count of the stored parameters: encoder with pooler, plus pretraining heads.

  The vocabulary is padded to vocab_multiple (1: the unpadded count Hugging Face reports).

  Args:
    c: the config.
    with_heads: add the MLM head (transform, LayerNorm, output bias; the output weights are
      tied) and the NSP classifier.

  Returns:
    The number of parameters.
  """
  d, f, v, l = c.embed_dim, c.mlp_dim, c.padded_vocab_size, c.num_layers
  embeddings = (v + c.max_len + c.type_vocab_size) * d + 2 * d
  attn = 4 * (d * d + d)  # query, key, value, out (all N * H = D wide) with biases
  mlp = d * f + f + f * d + d
  total = embeddings + l * (attn + mlp + 2 * 2 * d) + d * d + d  # + pooler
  if with_heads:
    total += (d * d + d) + 2 * d + v  # MLM transform, its LayerNorm, output bias (tied weights)
    total += 2 * d + 2  # NSP classifier
  return total


def flops_per_token(c: BertConfig, seq_len: int, masked_fraction: float = 0.15) -> float:
  """Training FLOPs per token (forward + backward = 3x forward), PaLM appendix B style.

  6 * (encoder matmul params + the MLM head's D x D and D x V matmuls on the masked_fraction of
  tokens it runs on) + 12 * L * T * D for attention. The per-sequence pooler and NSP are ignored.
  V is the padded vocabulary (vocab_multiple): it is computed.

  Args:
    c: the config.
    seq_len: T, the sequence length.
    masked_fraction: the fraction of tokens the MLM head runs on.

  Returns:
    FLOPs per token, a float.
  """
  d, f, v, l = c.embed_dim, c.mlp_dim, c.padded_vocab_size, c.num_layers
  matmul = l * (4 * d * d + 2 * d * f) + masked_fraction * (d * d + d * v)
  return 6.0 * matmul + 12.0 * l * seq_len * d
