"""Hugging Face PEFT LoRA adapters in and out of fmjax.lora.

A PEFT adapter directory holds adapter_config.json (r, lora_alpha, target_modules, ...) and
adapter_model.safetensors with one pair per adapted torch module:

  base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   (r, in)
  base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight   (out, r)

The module names come from the weight tables fmjax.hf already has (fmjax/hf/tables.py,
fmjax/hf/decoders.py): a rule mapping "....q_proj.weight" to an fmjax kernel (in..., out...)
maps the adapter of that kernel, lora_a (in..., r) <-> lora_A.T and lora_b (r, out...) <->
lora_B.T, whatever the kernel's torch layout (Linear or GPT-2's Conv1D: PEFT's lora_A and
lora_B are Linear layers either way).

One torch module holding several fmjax kernels (GPT-2's fused c_attn = [query | key | value]):
fmjax's three adapters (rank r each) sharing one A (as PEFT's own c_attn adapters load) are
written as one adapter of rank r, lora_B their B's stacked; otherwise as one of rank 3 r,
lora_A the three A's stacked and lora_B block-diagonal, with rank_pattern / alpha_pattern {"c_attn": 3 r, 3 alpha}
so the scale alpha / r is unchanged: the same function, exactly. Reading, a block-diagonal
one splits back into the three; one of rank r (PEFT's own c_attn adapters) gives the three
kernels the same A and each its rows of B.

  fmjax.hf.peft.save_adapter("out/peft", model, params, spec)   # PeftModel.from_pretrained reads it
  params, spec = fmjax.hf.peft.load_adapter("peft_dir", model, base_params)
  fmjax.hf.save_pretrained(model, fmjax.lora.merge(params, spec), "out/merged")
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from fmjax import lora
from fmjax.checkpoint import stack_layers, unflatten_params, unstack_layers
from fmjax.hf import weights
from fmjax.hf.tables import Matrix, expand

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel's names for the wrapped model's modules
TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
              ("ForSequenceClassification", "SEQ_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"))


def _modules(model):
  """[(torch module name, fmjax module paths (loop layout), Matrix layout)] of every weight
  matrix in the model's table, and the unpadded fmjax kernel shapes by path."""
  arch, variant = weights._architecture_of(model)  # pylint: disable=protected-access
  root = variant.root + "/" if variant.root else ""
  out = []
  for r in expand(variant.rules(model.config), model.config.num_layers):
    if not (isinstance(r.layout, Matrix) and r.hf.endswith(".weight")
            and all(p.endswith("/kernel") for p in r.fm)):
      continue
    name = r.hf[:-len(".weight")]
    if variant.base_model:
      name = name[len(arch.prefix):]
    out.append((name, [p[len(root):-len("/kernel")] for p in r.fm], r.layout))
  shapes = weights._param_shapes(arch, variant, weights._unpadded(model))  # pylint: disable=protected-access
  return arch, variant, out, {p[len(root):]: s for p, s in shapes.items()}


def _whole(model):
  """[(HF tensor name as the class saves it, Rule with paths relative to the model)] of every
  tensor: the full tensors of PEFT's modules_to_save (a classifier trained beside adapters)."""
  arch, variant = weights._architecture_of(model)  # pylint: disable=protected-access
  root = variant.root + "/" if variant.root else ""
  out = []
  for r in expand(variant.rules(model.config), model.config.num_layers):
    name = r.hf[len(arch.prefix):] if variant.base_model else r.hf
    out.append((name, dataclasses.replace(r, fm=tuple(p[len(root):] for p in r.fm))))
  return out


def _flat_loop(model, params) -> dict:
  flat = {p: np.asarray(x) for p, x in weights._flatten(nn.meta.unbox(params)).items()}  # pylint: disable=protected-access
  return unstack_layers(flat) if model.runtime.scan_layers else flat


def save_adapter(directory, model: nn.Module, params, spec: lora.LoraSpec) -> None:
  """Writes the adapters of `params` as a PEFT LoRA directory.

  peft.PeftModel.from_pretrained(base, directory) then computes what
  `fmjax.lora.apply(model, params, spec, ...)` computes, with `base` the transformers model
  that fmjax.hf.save_pretrained(model, base params) writes.

  Args:
    directory: created if needed; adapter_config.json and adapter_model.safetensors written.
    model: the fmjax model (a class fmjax.hf exports: GPT, the decoder families, BERT, ViT).
    params: its params holding adapters (fmjax.lora), scanned or not, boxed or not.
    spec: the LoraSpec they were made with; its modules_to_save (e.g. "classifier") are
      written whole under their torch names, as PEFT saves them.

  Raises:
    ValueError: an adapter on a kernel PEFT cannot name (no torch module in the table), on
      part of a fused torch module, or none at all; modules_to_save the table does not write.
  """
  arch, variant, modules, shapes = _modules(model)
  flat = _flat_loop(model, params)
  left = {p[:-len("/lora_a")] for p in flat if p.endswith("/lora_a")}
  tensors, rank_pattern, alpha_pattern, names, fan_in_fan_out = {}, {}, {}, [], False
  for name, paths, layout in modules:
    have = [p in left for p in paths]
    if not any(have):
      continue
    if not all(have):
      raise ValueError(f"adapters on {[p for p, h in zip(paths, have) if h]} but not on "
                       f"{[p for p, h in zip(paths, have) if not h]}: PEFT adapts the torch "
                       f"module {name} as a whole; target all of them or none")
    a_s, b_s = [], []
    for p in paths:
      kernel = shapes[p + "/kernel"]
      n_in = layout.n_in
      a = flat[p + "/lora_a"].reshape(-1, spec.rank)  # (in, r)
      b = flat[p + "/lora_b"].reshape(spec.rank, -1)[:, :math.prod(kernel[n_in:])]  # (r, out)
      a_s.append(a[:math.prod(kernel[:n_in])].T.astype(np.float32))
      b_s.append(b.T.astype(np.float32))
      left.discard(p)
    if len(paths) == 1 or all(np.array_equal(a_s[0], a) for a in a_s[1:]):
      lora_a, lora_b = a_s[0], np.concatenate(b_s, axis=0)  # one A (as PEFT's own fused ones)
    else:  # one torch module, several fmjax kernels: rank k r, B block-diagonal
      lora_a = np.concatenate(a_s, axis=0)
      lora_b = np.zeros((sum(b.shape[0] for b in b_s), len(paths) * spec.rank), np.float32)
      row = 0
      for i, b in enumerate(b_s):
        lora_b[row:row + b.shape[0], i * spec.rank:(i + 1) * spec.rank] = b
        row += b.shape[0]
      short = name.rsplit(".", 1)[-1]
      rank_pattern[short] = len(paths) * spec.rank
      alpha_pattern[short] = len(paths) * spec.alpha
    fan_in_fan_out |= not layout.transpose
    tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(lora_a)
    tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(lora_b)
    names.append(name)
  if left:
    raise ValueError(f"adapters on {sorted(left)[:5]} have no torch module in fmjax.hf's "
                     f"{arch.model_type} table; PEFT cannot name them")
  saved, unpadded = set(), weights._param_shapes(arch, variant, weights._unpadded(model))  # pylint: disable=protected-access
  root = variant.root + "/" if variant.root else ""
  for hf, r in _whole(model):  # modules_to_save: whole tensors, under the module's own name
    if all(any(p == k or p.startswith(k + "/") for k in spec.modules_to_save) for p in r.fm):
      xs = [weights._fit(flat[p], unpadded[root + p]) for p in r.fm]  # pylint: disable=protected-access
      tensors[PREFIX + hf] = np.ascontiguousarray(r.to_hf(xs))
      saved.add(hf.rsplit(".", 1)[0])
  missing = [k for k in spec.modules_to_save
             if not any(p == k or p.startswith(k + "/") for _, r in _whole(model) for p in r.fm)]
  if missing:
    raise ValueError(f"LoraSpec.modules_to_save {missing} are no parameters fmjax.hf's "
                     f"{arch.model_type} table writes")
  if not names:
    raise ValueError("params hold no adapters (fmjax.lora.add_adapters adds them)")
  shorts = sorted({n.rsplit(".", 1)[-1] for n in names})
  every = {n for n, _, _ in modules if n.rsplit(".", 1)[-1] in shorts}
  task = next((t for suffix, t in TASK_TYPES if variant.hf_class.endswith(suffix)), None)
  config = {
      "peft_type": "LORA", "task_type": task, "base_model_name_or_path": None,
      "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
      "target_modules": shorts if every == set(names) else sorted(names),
      "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
      "fan_in_fan_out": fan_in_fan_out, "bias": "none", "use_rslora": False, "use_dora": False,
      "modules_to_save": sorted(saved) or None, "init_lora_weights": True, "inference_mode": True,
      "layers_to_transform": None, "layers_pattern": None, "revision": None,
  }
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  safetensors.numpy.save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
  (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def _pattern_value(patterns: dict, name: str, default):
  """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the module's name."""
  for key, value in patterns.items():
    if re.match(rf"(.*\.)?{key}$", name):
      return value
  return default


def load_adapter(directory, model: nn.Module, params):
  """Reads a PEFT LoRA directory onto an fmjax model's params.

  Args:
    directory: holds adapter_config.json and adapter_model.safetensors (peft's save_pretrained).
    model: the fmjax model whose base params `params` are (e.g. from fmjax.hf.from_pretrained
      of the adapter's base model).
    params: its params without adapters (nested dicts, scanned or not).

  Returns:
    (params with the adapters (and the modules_to_save tensors in place of the base's), the
    LoraSpec to run them with: fmjax.lora.apply / LoraModel).

  Raises:
    FileNotFoundError: no adapter files in `directory`.
    ValueError: not a LoRA adapter, DoRA, adapters of different scales or ranks, or tensors no
      module of the model's table holds (naming them).
  """
  directory = pathlib.Path(directory)
  if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
    raise FileNotFoundError(f"{directory} has no {CONFIG_FILE} and {WEIGHTS_FILE}; give a "
                            "PEFT adapter directory (peft's save_pretrained)")
  cfg = json.loads((directory / CONFIG_FILE).read_text())
  if cfg.get("peft_type") != "LORA" or cfg.get("use_dora"):
    raise ValueError(f"{directory / CONFIG_FILE}: peft_type={cfg.get('peft_type')!r}, "
                     f"use_dora={cfg.get('use_dora')}; fmjax reads LoRA adapters only")
  if cfg.get("bias", "none") != "none":
    raise ValueError(f"{directory / CONFIG_FILE}: bias={cfg['bias']!r}; fmjax reads adapters "
                     "without trained biases (bias='none')")
  tensors = safetensors.numpy.load_file(directory / WEIGHTS_FILE)
  _, _, modules, shapes = _modules(model)
  _, padded, _, padded_shapes = _modules_padded(model)
  r0, alpha0 = int(cfg["r"]), float(cfg["lora_alpha"])
  adapters, scales, ranks, adapted = {}, set(), set(), []
  for name, paths, layout in modules:
    key_a, key_b = f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"
    if key_a not in tensors:
      continue
    lora_a, lora_b = tensors.pop(key_a).astype(np.float32), tensors.pop(key_b).astype(np.float32)
    rank = lora_a.shape[0]
    alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, name, alpha0))
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    outs = [math.prod(shapes[p + "/kernel"][layout.n_in:]) for p in paths]
    rows = np.cumsum([0] + outs)
    k = len(paths)
    split = k > 1 and rank % k == 0 and all(  # our block-diagonal export: back to k adapters
        not np.any(lora_b[rows[i]:rows[i + 1], :j * rank // k])
        and not np.any(lora_b[rows[i]:rows[i + 1], (j + 1) * rank // k:])
        for i, j in zip(range(k), range(k)))
    for i, p in enumerate(paths):
      kernel = shapes[p + "/kernel"]
      if split:
        r = rank // k
        a, b = lora_a[i * r:(i + 1) * r], lora_b[rows[i]:rows[i + 1], i * r:(i + 1) * r]
      else:
        r, a, b = rank, lora_a, lora_b[rows[i]:rows[i + 1]]
      a = a.T.reshape(kernel[:layout.n_in] + (r,))
      b = b.T.reshape((r,) + kernel[layout.n_in:])
      full = padded_shapes[p + "/kernel"]
      adapters[p + "/lora_a"] = weights._fit(a, full[:layout.n_in] + (r,))  # pylint: disable=protected-access
      adapters[p + "/lora_b"] = weights._fit(b, (r,) + full[layout.n_in:])  # pylint: disable=protected-access
      scales.add(scale)  # a block-diagonal split keeps the module's scale
      ranks.add(r)
      adapted.append(p)
  flat_params, keep = None, []
  for hf, r in _whole(model):  # modules_to_save: whole tensors replacing the base's
    if PREFIX + hf in tensors:
      if flat_params is None:
        flat_params = _flat_loop(model, params)
      w = tensors.pop(PREFIX + hf)
      for p, x in zip(r.fm, r.to_fmjax(w, [shapes[p] for p in r.fm])):
        flat_params[p] = weights._fit(x.astype(flat_params[p].dtype), padded_shapes[p])  # pylint: disable=protected-access
        keep.append(p)
  if flat_params is not None:
    if model.runtime.scan_layers:
      flat_params = stack_layers(flat_params)
    params = unflatten_params({p: jnp.asarray(x) for p, x in flat_params.items()})
  if tensors:
    raise ValueError(f"{directory / WEIGHTS_FILE}: {len(tensors)} tensors match no weight matrix "
                     f"of a {type(model).__name__} with this config, e.g. {sorted(tensors)[:4]}")
  if not adapted:
    raise ValueError(f"{directory / WEIGHTS_FILE} holds no LoRA tensors")
  if len(ranks) > 1 or len({round(s, 12) for s in scales}) > 1:
    raise ValueError(f"{directory}: adapters of ranks {sorted(ranks)} and scales "
                     f"{sorted(scales)}; fmjax.lora runs one rank and one alpha / r per model")
  rank, scale = ranks.pop(), scales.pop()
  spec = lora.LoraSpec(rank=rank, alpha=scale * rank, dropout=float(cfg.get("lora_dropout", 0.0)),
                       targets=_targets(adapted, [p for _, ps, _ in modules for p in ps]),
                       modules_to_save=tuple(sorted({p.rsplit("/", 1)[0] for p in keep})))
  adapters = {p: jnp.asarray(x) for p, x in adapters.items()}
  if model.runtime.scan_layers:
    adapters = stack_layers(adapters, stack=jnp.stack)
  return lora.combine(params, unflatten_params(adapters)), spec


def _modules_padded(model):
  """`_modules` with the model's own (vocabulary-padded) kernel shapes."""
  arch, variant = weights._architecture_of(model)  # pylint: disable=protected-access
  root = variant.root + "/" if variant.root else ""
  shapes = weights._param_shapes(arch, variant, model)  # pylint: disable=protected-access
  return arch, variant, None, {p[len(root):]: s for p, s in shapes.items()}


def _targets(adapted: list[str], every: list[str]) -> tuple[str, ...]:
  """LoraSpec targets matching exactly the adapted module paths: "(.*/)?attn/query" where
  every layer's is adapted, else the paths themselves."""
  tail = lambda p: "/".join(p.split("/")[-2:])
  out = []
  for t in dict.fromkeys(tail(p) for p in adapted):
    if {p for p in every if tail(p) == t} <= set(adapted):
      out.append(f"(.*/)?{re.escape(t)}")
    else:
      out += [re.escape(p) for p in adapted if tail(p) == t]
  return tuple(out)
