"""Name tables of the decoder families: Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3.

HF's *ForCausalLM checkpoints of these model_types all name their tensors alike
("model.layers.{i}.self_attn.q_proj.weight", ...) and all load into one fmjax module,
fmjax.models.decoder.Decoder; what differs is which tensors exist (biases, q/k norms, Gemma's
extra norms) and how config.json spells the quirks. So there is one rule list, filtered by the
DecoderConfig, and one config reader, told by a `_Family` what each model_type can express.

config.json is read in both spellings transformers has used: `rope_parameters` (transformers
5) and `rope_theta` + `rope_scaling` (+ Gemma 3's `rope_local_base_freq`, and the
`sliding_window_pattern` of older Gemma 3 files); it is written in transformers 5's.
fmjax/hf/weights.py joins ARCHITECTURES and CAUSAL_LM here to tables.py's registries.
"""

from __future__ import annotations

import dataclasses

from fmjax.hf.tables import FLAT, LINEAR, Architecture, Matrix, Variant, _get, _require, rule
from fmjax.layers import HF_ACTIVATIONS, Rope
from fmjax.models.decoder import Decoder, DecoderConfig, Gemma, LocalLayers
from fmjax.transformer import AttentionOptions

_LAYER, _BLOCK = "model.layers.{i}.", "blocks/layer_{i}/"
_ROPE_TYPES = ("default", "linear", "llama3")
_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class _Family:
  """What one HF model_type can express (the features of `_features`) and must have."""
  hf_class: str
  allows: frozenset
  requires: frozenset = frozenset()
  tied_default: bool = False  # tie_word_embeddings when config.json leaves it out
  default_theta: float = 10_000.0


_F = lambda *names: frozenset(names)
FAMILIES = {
    "llama": _Family("LlamaForCausalLM", _F("attention_bias", "mlp_bias")),
    "mistral": _Family("MistralForCausalLM", _F("sliding_window")),
    "qwen2": _Family("Qwen2ForCausalLM", _F("qkv_bias", "sliding_window"), _F("qkv_bias")),
    "qwen3": _Family("Qwen3ForCausalLM", _F("attention_bias", "qk_norm", "sliding_window"),
                     _F("qk_norm")),
    "gemma": _Family("GemmaForCausalLM", _F("gemma", "attention_bias"), _F("gemma"),
                     tied_default=True),
    "gemma2": _Family("Gemma2ForCausalLM",
                      _F("gemma", "sandwich_norms", "sliding_window", "attn_softcap",
                         "final_softcap", "attn_scale", "attention_bias"),
                      _F("gemma", "sandwich_norms"), tied_default=True),
    "gemma3_text": _Family("Gemma3ForCausalLM",
                           _F("gemma", "sandwich_norms", "sliding_window", "local_rope",
                              "attn_softcap", "final_softcap", "attn_scale", "attention_bias",
                              "qk_norm"),
                           _F("gemma", "sandwich_norms", "qk_norm"), tied_default=True,
                           default_theta=1_000_000.0),
}


def _features(c: DecoderConfig) -> set[str]:
  """The quirks a DecoderConfig uses, in `_Family` terms."""
  a = c.attention
  on = {"attention_bias": c.attention_bias, "mlp_bias": c.mlp_bias,
        "qkv_bias": a.qkv_bias is not None and a.qkv_bias != c.attention_bias,
        "qk_norm": a.qk_norm, "sliding_window": c.local is not None,
        "local_rope": c.local is not None and c.local.rope not in (None, a.rope),
        "gemma": c.gemma is not None, "sandwich_norms": bool(c.gemma and c.gemma.sandwich_norms),
        "attn_softcap": a.softcap is not None, "final_softcap": bool(c.gemma and
                                                                     c.gemma.final_softcap),
        "attn_scale": a.scale is not None}
  return {k for k, v in on.items() if v}


def _rules(c: DecoderConfig):
  """The HF tensors of a *ForCausalLM with this config ("{i}": every layer)."""
  qkv_bias = c.attention_bias if c.attention.qkv_bias is None else c.attention.qkv_bias
  out = [rule("model.embed_tokens.weight", "wte/embedding")]
  for hf, fm in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
    out.append(rule(_LAYER + f"self_attn.{hf}.weight", _BLOCK + f"attn/{fm}/kernel", LINEAR))
    if qkv_bias:
      out.append(rule(_LAYER + f"self_attn.{hf}.bias", _BLOCK + f"attn/{fm}/bias", FLAT))
  out.append(rule(_LAYER + "self_attn.o_proj.weight", _BLOCK + "attn/out/kernel", Matrix(n_in=2)))
  if c.attention_bias:
    out.append(rule(_LAYER + "self_attn.o_proj.bias", _BLOCK + "attn/out/bias"))
  if c.attention.qk_norm:
    out += [rule(_LAYER + "self_attn.q_norm.weight", _BLOCK + "attn/query_norm/scale"),
            rule(_LAYER + "self_attn.k_norm.weight", _BLOCK + "attn/key_norm/scale")]
  for hf, fm in (("gate_proj", "wi"), ("up_proj", "wi_up"), ("down_proj", "wo")):
    out.append(rule(_LAYER + f"mlp.{hf}.weight", _BLOCK + f"mlp/{fm}/kernel", LINEAR))
    if c.mlp_bias:
      out.append(rule(_LAYER + f"mlp.{hf}.bias", _BLOCK + f"mlp/{fm}/bias"))
  out.append(rule(_LAYER + "input_layernorm.weight", _BLOCK + "ln_attn/scale"))
  if c.gemma and c.gemma.sandwich_norms:  # Gemma 2/3: post_attention_layernorm is a post-norm
    out += [rule(_LAYER + "post_attention_layernorm.weight", _BLOCK + "ln_attn_out/scale"),
            rule(_LAYER + "pre_feedforward_layernorm.weight", _BLOCK + "ln_mlp/scale"),
            rule(_LAYER + "post_feedforward_layernorm.weight", _BLOCK + "ln_mlp_out/scale")]
  else:  # Llama's "post_attention_layernorm" is the norm before the MLP
    out.append(rule(_LAYER + "post_attention_layernorm.weight", _BLOCK + "ln_mlp/scale"))
  out.append(rule("model.norm.weight", "ln_f/scale"))
  if not c.tie_embeddings:
    out.append(rule("lm_head.weight", "lm_head/kernel", LINEAR))  # (V, D)
  return out


def _rope(params: dict, where: str) -> Rope:
  """A Rope from one rope_parameters dict (rope_type or the older `type` key); `where` prefixes
  the error ("full_attention " for Gemma 3's per-layer-type dicts)."""
  kind = params.get("rope_type", params.get("type", "default"))
  if kind not in _ROPE_TYPES:
    raise ValueError(f"config.json has {where}rope type {kind!r}; fmjax supports rope types "
                     f"{list(_ROPE_TYPES)}")
  if params.get("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError(f"config.json has {where}partial_rotary_factor="
                     f"{params['partial_rotary_factor']}; fmjax rotates the whole head (1.0)")
  theta = float(params["rope_theta"])
  if kind == "default":
    return Rope(theta)
  if kind == "linear":
    return Rope(theta, "linear", float(params["factor"]))
  return Rope(theta, "llama3", float(params["factor"]), float(params["low_freq_factor"]),
              float(params["high_freq_factor"]), int(params["original_max_position_embeddings"]))


def _rope_to_hf(r: Rope) -> dict:
  out = {"rope_type": "default" if r.scaling == "none" else r.scaling, "rope_theta": r.theta}
  if r.scaling != "none":
    out["factor"] = r.factor
  if r.scaling == "llama3":
    out.update(low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor,
               original_max_position_embeddings=r.original_max_len)
  return out


def _ropes(hf: dict, model_type: str, family: _Family) -> tuple[Rope, Rope | None]:
  """(global layers' rope, local layers' rope or None) from either config.json spelling."""
  params = hf.get("rope_parameters")
  if model_type == "gemma3_text":
    if not (params and "full_attention" in params):  # older files: rope_theta + local base
      params = {"full_attention": {**(hf.get("rope_scaling") or {}),
                                   "rope_theta": _get(hf, "rope_theta", 1_000_000.0)},
                "sliding_attention": {"rope_theta": _get(hf, "rope_local_base_freq", 10_000.0)}}
    return (_rope(params["full_attention"], "full_attention "),
            _rope(params["sliding_attention"], "sliding_attention "))
  if not params:
    params = {**(hf.get("rope_scaling") or {}),
              "rope_theta": _get(hf, "rope_theta", family.default_theta)}
  params.setdefault("rope_theta", family.default_theta)
  return _rope(params, ""), None


def _local(hf: dict, model_type: str, num_layers: int, rope: Rope | None) -> LocalLayers | None:
  """Which layers slide: layer_types, else each family's older convention."""
  window = hf.get("sliding_window")
  types = hf.get("layer_types")
  if types is None:
    if model_type == "mistral":
      types = ["sliding_attention"] * num_layers
    elif model_type in ("qwen2", "qwen3"):
      start = _get(hf, "max_window_layers", num_layers) if hf.get("use_sliding_window") else None
      types = ["sliding_attention" if start is not None and i >= start else "full_attention"
               for i in range(num_layers)]
    elif model_type in ("gemma2", "gemma3_text"):
      every = 2 if model_type == "gemma2" else _get(hf, "sliding_window_pattern", 6)
      types = ["sliding_attention" if (i + 1) % every else "full_attention"
               for i in range(num_layers)]
    else:
      types = ["full_attention"] * num_layers
  bad = sorted(set(types) - set(_LAYER_TYPES))
  if bad or len(types) != num_layers:
    raise ValueError(f"config.json has layer_types={types}; fmjax supports {num_layers} entries "
                     f"of {list(_LAYER_TYPES)}")
  layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
  if not layers or window is None:
    return None
  return LocalLayers(window=int(window), layers=layers, rope=rope)


def _config(hf: dict) -> DecoderConfig:
  """config.json -> DecoderConfig, for every model_type of FAMILIES."""
  model_type = hf["model_type"]
  family = FAMILIES[model_type]
  gemma = "gemma" in family.requires
  _require(hf, "use_bidirectional_attention", (None, False),
           f"{family.hf_class} (causal attention)")
  act_key = "hidden_activation" if hf.get("hidden_activation") else "hidden_act"
  act = _get(hf, act_key, "gelu_pytorch_tanh" if gemma else "silu")
  if gemma and act == "gelu":  # transformers reads Gemma's legacy "gelu" as the tanh GELU
    act = "gelu_pytorch_tanh"
  if act not in HF_ACTIVATIONS:
    raise ValueError(f"config.json has {act_key}={act!r}; fmjax supports {sorted(HF_ACTIVATIONS)}")
  d, n = _get(hf, "hidden_size", 4096), _get(hf, "num_attention_heads", 32)
  head_dim = hf.get("head_dim") or d // n
  num_layers = _get(hf, "num_hidden_layers", 32)
  global_rope, local_rope = _ropes(hf, model_type, family)
  attention_bias = bool(_get(hf, "attention_bias", False))
  options = AttentionOptions(
      qkv_bias=True if model_type == "qwen2" else None, qk_norm=model_type in ("qwen3",
                                                                              "gemma3_text"),
      rope=global_rope)
  gemma_fields = None
  if gemma:
    sandwich = model_type != "gemma"
    if sandwich:
      options = dataclasses.replace(
          options, scale=float(_get(hf, "query_pre_attn_scalar", head_dim)) ** -0.5,
          softcap=hf.get("attn_logit_softcapping"))
    gemma_fields = Gemma(sandwich_norms=sandwich,
                         final_softcap=hf.get("final_logit_softcapping") if sandwich else None)
  return DecoderConfig(
      family=model_type, vocab_size=_get(hf, "vocab_size", 32000),
      max_len=_get(hf, "max_position_embeddings", 2048), num_layers=num_layers, embed_dim=d,
      mlp_dim=_get(hf, "intermediate_size", 11008), num_heads=n,
      num_kv_heads=_get(hf, "num_key_value_heads", n),
      head_dim=None if head_dim == d // n else head_dim,
      norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)), mlp_activation=HF_ACTIVATIONS[act],
      tie_embeddings=bool(_get(hf, "tie_word_embeddings", family.tied_default)),
      attention_bias=attention_bias and model_type != "qwen2",
      mlp_bias=bool(_get(hf, "mlp_bias", False)), attention=options,
      local=_local(hf, model_type, num_layers, local_rope), gemma=gemma_fields)


def _hf_config(c: DecoderConfig) -> dict:
  """DecoderConfig -> config.json fields (transformers 5 spelling) of its family."""
  family = FAMILIES[c.family]
  used = _features(c)
  if used - family.allows or family.requires - used:
    raise ValueError(f"DecoderConfig(family={c.family!r}) uses {sorted(used - family.allows)} and "
                     f"lacks {sorted(family.requires - used)}; a {family.hf_class} can express "
                     f"{sorted(family.allows)} and needs {sorted(family.requires)}: change "
                     "family or the config")
  act = {"gelu_tanh": "gelu_pytorch_tanh"}.get(c.mlp_activation, c.mlp_activation)
  out = {"vocab_size": c.vocab_size, "hidden_size": c.embed_dim, "intermediate_size": c.mlp_dim,
         "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
         "num_key_value_heads": c.num_kv_heads or c.num_heads, "head_dim": c.head_width,
         "max_position_embeddings": c.max_len, "rms_norm_eps": c.norm_eps,
         "tie_word_embeddings": c.tie_embeddings, "attention_dropout": 0.0,
         "initializer_range": 0.02, "rope_parameters": _rope_to_hf(c.attention.rope),
         "hidden_activation" if c.family in ("gemma2", "gemma3_text") else "hidden_act": act}
  if "attention_bias" in family.allows:
    out["attention_bias"] = c.attention_bias
  if "mlp_bias" in family.allows:
    out["mlp_bias"] = c.mlp_bias
  if "sliding_window" in family.allows:
    local = c.local.layers if c.local else ()
    if c.family == "mistral" and local and len(local) != c.num_layers:
      raise ValueError(f"DecoderConfig.local.layers={local}: Mistral slides in every layer")
    out["sliding_window"] = c.local.window if c.local else None
    if c.family != "mistral":
      out["layer_types"] = [_LAYER_TYPES[i in local] for i in range(c.num_layers)]
    if c.family in ("qwen2", "qwen3"):
      out["use_sliding_window"] = bool(local)
      out["max_window_layers"] = min(local, default=c.num_layers)
  if c.family in ("gemma2", "gemma3_text"):
    scale = c.attention.scale if c.attention.scale is not None else c.head_width ** -0.5
    scalar = scale ** -2
    out.update(query_pre_attn_scalar=round(scalar) if abs(scalar - round(scalar)) < 1e-6
               else scalar, attn_logit_softcapping=c.attention.softcap,
               final_logit_softcapping=c.gemma.final_softcap, use_bidirectional_attention=False)
  if c.family == "gemma3_text":
    local_rope = c.local.rope if c.local and c.local.rope else c.attention.rope
    out["rope_parameters"] = {"full_attention": _rope_to_hf(c.attention.rope),
                              "sliding_attention": _rope_to_hf(local_rope)}
  return out


def _architecture(model_type: str) -> Architecture:
  variant = Variant(FAMILIES[model_type].hf_class, Decoder, root="", base_model=False,
                    rules=_rules)
  return Architecture(
      model_type=model_type, prefix="model.", heads=("lm_head.",),
      tied={"lm_head.weight": "model.embed_tokens.weight"},
      ignored=lambda name: name.endswith("rotary_emb.inv_freq"),  # buffers in older files
      variants=(variant,), config_from_hf=_config, config_to_hf=_hf_config,
      variant=lambda config, names: variant, owns=lambda config: config.family == model_type)


ARCHITECTURES = {t: _architecture(t) for t in FAMILIES}
# from_pretrained(task="causal_lm") of each family: the Decoder with its LM head.
CAUSAL_LM = {t: a.variants[0] for t, a in ARCHITECTURES.items()}
