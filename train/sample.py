"""Samples text from a trained GPT workdir, or from a Hugging Face causal LM directory.

  python -m train.sample --workdir=DIR --prompt="ROMEO:" [--max_new_tokens=300 \
      --temperature=0.8 --top_k=40 --top_p=1.0 --num_beams=1 --length_penalty=1.0 --seed=0]
  python -m train.sample --hf=DIR --prompt="The capital of France is" [same settings]

Loads DIR's latest checkpoint (its architecture and params, through fmjax.sources), its
tokenizer (DIR/tokenizer) and run config (DIR/config.json: the context), continues the prompt with fmjax.generate (KV cache; temperature 0 is
greedy; --num_beams > 1 is beam search) and prints prompt + completion. Generation stops at
the tokenizer's end-of-document token and never shows the model more than the context it was
trained on (config data.seq_len), continuing in chunks beyond it (fmjax.generate.complete).
Bad input (no checkpoint, an empty prompt, a character the tokenizer lacks, an impossible
setting) is one `error:` line on stderr and exit status 2.

With --hf=DIR the model is fmjax.hf.from_pretrained(DIR, task="causal_lm") and its tokenizer
(the prompt gets the special tokens a model input gets, e.g. Llama's BOS; no chat template:
python -m train.chat is for chat models); generation stops at generation_config.json's
eos_token_id(s) (else the tokenizer's), and sampling settings not given as flags are the
checkpoint's generation_config.json ones (greedy unless it says do_sample), as in transformers.
"""

import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from absl import logging as absl_logging

from fmjax import generate, hf, sharding, sources
from fmjax import data as fdata
from train import common, pretrain_gpt

FLAGS = flags.FLAGS  # --workdir is train.common's
flags.DEFINE_string("hf", None, "a Hugging Face causal LM directory (instead of --workdir)")
flags.DEFINE_string("prompt", None, "text to continue")
flags.DEFINE_integer("max_new_tokens", 300, "tokens to generate (fewer if EOS comes)")
flags.DEFINE_float("temperature", 0.8, "softmax temperature; 0 is greedy")
flags.DEFINE_integer("top_k", 40, "sample among the k most likely tokens (0: all)")
flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass (1: off)")
flags.DEFINE_integer("num_beams", 1, "beam search width; > 1 turns sampling off")
flags.DEFINE_float("length_penalty", 1.0, "beam score = log-prob / length ** length_penalty")
flags.DEFINE_integer("seed", 0, "sampling seed")


def _check_workdir(workdir: str) -> None:
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir) or not any(n.isdigit() for n in os.listdir(ckpt_dir)):
    raise FileNotFoundError(f"no checkpoint in {ckpt_dir}; train one first with "
                            f"python -m train.pretrain_gpt --config=... --workdir={workdir}")
  if not os.path.exists(os.path.join(workdir, "config.json")):
    raise FileNotFoundError(f"{workdir}/config.json is missing; {workdir} is not a "
                            "pretrain_gpt workdir")


def load(workdir: str):
  """(model, params, context) of a pretrain_gpt workdir's latest checkpoint, on one device."""
  _check_workdir(workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  source = sources.parse(workdir)
  model_config = source.architecture(tuple(pretrain_gpt.MODELS))  # GPT or a decoder family
  model = pretrain_gpt.MODELS[type(model_config)][0](model_config, source.runtime())
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  mesh = sharding.make_mesh({}, devices=jax.devices()[:1])
  shardings = sharding.shardings_of(abstract, mesh, sharding.get_rules("dp"))["params"]
  params = source.load(nn.meta.unbox(abstract)["params"], shardings)
  seq_len = config.data.get("seq_len", model_config.max_len) if "data" in config else model_config.max_len
  return model, params, min(seq_len, model_config.max_len)


def load_hf(directory: str):
  """(model, params, context) of a Hugging Face causal LM directory, on one device; context
  is the number of learned positions (None for a model without that limit)."""
  model, variables = hf.from_pretrained(directory, task="causal_lm")
  config = getattr(model, "config", None)
  context = config.max_len if getattr(config, "position", None) == "learned" else None
  return model, variables["params"], context


def sample_hf(directory: str, prompt: str, **settings) -> str:
  """Prompt + completion from a Hugging Face directory's model; settings as generate's, those
  left out (or None) taken from its generation_config.json."""
  if not prompt:
    raise ValueError("--prompt is empty; give the text to continue, e.g. --prompt='Once upon'")
  defaults = hf.generation_config(directory)
  settings = {**defaults.sampling(), **{k: v for k, v in settings.items() if v is not None}}
  settings.setdefault("max_new_tokens", defaults.max_new_tokens or 300)
  generate.GenerateConfig(**{k: v for k, v in settings.items() if k != "seed"})  # check first
  tokenizer = hf.tokenizer_from_pretrained(directory)
  ids = tokenizer.encode(prompt, add_special_tokens=True)
  if len(ids) == len(tokenizer.encode("", add_special_tokens=True)):
    raise ValueError(f"--prompt={prompt!r} encodes to no tokens; give some text")
  stop = defaults.stop_tokens or (tokenizer.eos_id,)
  model, params, context = load_hf(directory)
  if context is None:
    new = generate.generate(model, params, [ids], stop_tokens=stop, pad_id=tokenizer.pad_id,
                            **settings)[0]
  else:
    new = generate.complete(model, params, ids, context=context, stop_tokens=stop,
                            pad_id=tokenizer.pad_id, **settings)
  if new and new[-1] in stop:
    new = new[:-1]
  return prompt + tokenizer.decode(new)


def sample(workdir: str, prompt: str, **settings) -> str:
  """Prompt + completion from the workdir's model; settings as fmjax.generate.generate's."""
  if not prompt:
    raise ValueError("--prompt is empty; give the text to continue, e.g. --prompt='ROMEO:'")
  generate.GenerateConfig(**{k: v for k, v in settings.items() if k != "seed"})  # check first
  _check_workdir(workdir)
  tokenizer = fdata.load_tokenizer(os.path.join(workdir, "tokenizer"))
  missing = tokenizer.missing_characters(prompt)  # checked before loading the model
  if missing:
    raise ValueError(f"--prompt={prompt!r}: the {tokenizer.kind} tokenizer of {workdir} cannot "
                     f"encode {', '.join(repr(c) for c in missing)} (not in its training text); "
                     "give a prompt of characters the corpus has")
  ids = tokenizer.encode(prompt)
  if not ids:
    raise ValueError(f"--prompt={prompt!r} encodes to no tokens; give some text")
  model, params, context = load(workdir)
  new = generate.complete(model, params, ids, context=context, stop_tokens=[tokenizer.eos_id],
                          **settings)
  return prompt + tokenizer.decode(new)


def main(argv):
  absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's restore chatter
  if len(argv) > 1:
    common.fail(f"unexpected arguments {argv[1:]}; quote the prompt: --prompt=\"...\"")
  if (FLAGS.workdir is None) == (FLAGS.hf is None) or FLAGS.prompt is None:
    common.fail("--prompt=TEXT and one of --workdir=DIR (a pretrain_gpt workdir) or --hf=DIR "
                "(a Hugging Face causal LM directory) are required")
  temperature, top_k = FLAGS.temperature, FLAGS.top_k
  if FLAGS.num_beams > 1:  # beam search is deterministic: drop the sampling defaults
    temperature = temperature if FLAGS["temperature"].present else 0.0
    top_k = top_k if FLAGS["top_k"].present else 0
  common.enable_compilation_cache()
  try:
    if FLAGS.hf is not None:  # the checkpoint's generation_config.json for what is not given
      given = lambda name: FLAGS[name].value if FLAGS[name].present else None
      text = sample_hf(FLAGS.hf, FLAGS.prompt, max_new_tokens=given("max_new_tokens"),
                       temperature=given("temperature"), top_k=given("top_k"),
                       top_p=given("top_p"), num_beams=FLAGS.num_beams,
                       length_penalty=FLAGS.length_penalty, seed=FLAGS.seed)
    else:
      text = sample(FLAGS.workdir, FLAGS.prompt, max_new_tokens=FLAGS.max_new_tokens,
                    temperature=temperature, top_k=top_k, top_p=FLAGS.top_p,
                    num_beams=FLAGS.num_beams, length_penalty=FLAGS.length_penalty,
                    seed=FLAGS.seed)
  except common.EXPECTED_ERRORS as e:
    if os.environ.get("FMJAX_DEBUG"):
      raise
    common.fail(str(e))
  print(text)


if __name__ == "__main__":
  app.run(main, sys.argv, flags_parser=common.parse_flags)
