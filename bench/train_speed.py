"""Training throughput: fmjax vs Hugging Face transformers (PyTorch) on the same config.

  python bench/train_speed.py --model gpt|bert --size small|base [--rounds 5 --steps 5]

Both implementations train the same architecture (random tokens, AdamW, fp32, no dropout;
BERT: MLM at 20 masked positions per example + NSP, HF BertForPreTraining as the reference)
on this machine in the same process; timings are interleaved round by round (the machine
drifts) and the medians compared. Prints one JSON object per implementation and a last one
with the fmjax/reference ratio; every line records the machine and the load (a round run at a
load above the core count is repeated up to --retries times, then kept marked `loaded`;
bench/machine.py). Without torch+transformers (`pip install -e '.[bench]'
torch==2.13.0`), only fmjax runs.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402,F401  (first: one JAX device per CPU core, as the programs do)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench.machine import combine, machine, measured  # noqa: E402
from fmjax import metrics, sharding, training  # noqa: E402
from fmjax.models import bert, gpt  # noqa: E402

SIZES = {  # name -> (model config, batch, seq_len)
    "gpt": {
        "small": (gpt.GPTConfig(vocab_size=8192, max_len=256, num_layers=4, num_heads=4,
                                embed_dim=256, mlp_dim=1024), 16, 256),
        "base": (gpt.get_config("gpt2_small"), 4, 256),
    },
    "bert": {
        "small": (bert.BertConfig(vocab_size=8192, max_len=512, num_layers=4, num_heads=4,
                                  embed_dim=256, mlp_dim=1024), 16, 128),
        "base": (bert.get_config("base"), 8, 128),  # no dropout: the default Runtime
    },
}
PREDICTIONS = 20  # masked positions per BERT example (max_predictions_per_seq at 128 tokens)


def fmjax_step(model, loss_fn, data, init_args):
  """A jitted fmjax train step (AdamW), data parallel over all devices (on CPU: one per core,
  see train/__init__.py), as the programs run it; returns step() running one update."""
  tx, _ = training.make_optimizer(learning_rate=1e-4, total_steps=10_000, warmup_steps=0)
  mesh = sharding.make_mesh({"data": -1})
  rules = sharding.get_rules("dp")
  state, shardings = sharding.sharded_init(training.init_fn(model, tx, *init_args), mesh, rules,
                                           jax.random.key(0))
  with sharding.context(mesh, rules):
    p_train, _ = training.jit_steps(training.make_train_step(loss_fn, tx),
                                    training.make_eval_step(loss_fn), shardings, mesh)
  data = sharding.shard_batch(data, mesh)
  key = jax.random.key(0)
  holder = {"state": state}

  def step():
    holder["state"], m = p_train(holder["state"], data, key)
    jax.block_until_ready(m["train/loss"])
  return step


def fmjax_gpt(c: gpt.GPTConfig, batch: int, seq_len: int):
  model = gpt.GPT(c)
  tokens = np.random.RandomState(0).randint(0, c.vocab_size, (batch, seq_len + 1)).astype(np.int32)
  data = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

  def loss_fn(params, b, r, train):
    logits = model.apply({"params": params}, b["inputs"], train=train)
    return training.cross_entropy(logits, b["targets"])[0], {}
  return fmjax_step(model, loss_fn, data, (data["inputs"],))


def bert_batch(c, batch: int, seq_len: int):
  rng = np.random.RandomState(0)
  return {"input_ids": rng.randint(0, c.vocab_size, (batch, seq_len)).astype(np.int32),
          "token_type_ids": (np.arange(seq_len) >= seq_len // 2).astype(np.int32)[None].repeat(batch, 0),
          "input_mask": np.ones((batch, seq_len), np.int32),
          "masked_lm_positions": np.sort(rng.choice(seq_len, (batch, PREDICTIONS)), -1).astype(np.int32),
          "masked_lm_ids": rng.randint(0, c.vocab_size, (batch, PREDICTIONS)).astype(np.int32),
          "masked_lm_weights": np.ones((batch, PREDICTIONS), np.float32),
          "next_sentence_labels": rng.randint(0, 2, (batch,)).astype(np.int32)}


def fmjax_bert(c: bert.BertConfig, batch: int, seq_len: int):
  model = bert.BertForPreTraining(c)
  data = bert_batch(c, batch, seq_len)

  def loss_fn(params, b, r, train):
    out = model.apply({"params": params}, b["input_ids"], b["token_type_ids"], b["input_mask"],
                      b["masked_lm_positions"], train=train, rngs={"dropout": r})
    return bert.pretraining_loss(out, b)
  return fmjax_step(model, loss_fn, data, (data["input_ids"], data["token_type_ids"],
                                           data["input_mask"], data["masked_lm_positions"]))


def torch_gpt(c: gpt.GPTConfig, batch: int, seq_len: int):
  """HF GPT2LMHeadModel with the same shape, AdamW, fp32."""
  import torch
  import transformers
  torch.manual_seed(0)
  hf = transformers.GPT2Config(
      vocab_size=c.vocab_size, n_positions=c.max_len, n_embd=c.embed_dim, n_layer=c.num_layers,
      n_head=c.num_heads, n_inner=c.mlp_dim, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
      activation_function="gelu_new", tie_word_embeddings=True)
  model = transformers.GPT2LMHeadModel(hf)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
  tokens = torch.randint(0, c.vocab_size, (batch, seq_len + 1))
  inputs, labels = tokens[:, :-1], tokens[:, 1:]

  def step():
    logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
  return step


def torch_bert(c: bert.BertConfig, batch: int, seq_len: int):
  """HF BertForPreTraining with the same shape, AdamW, fp32; MLM loss on the same positions."""
  import torch
  import transformers
  torch.manual_seed(0)
  hf = transformers.BertConfig(
      vocab_size=c.vocab_size, hidden_size=c.embed_dim, num_hidden_layers=c.num_layers,
      num_attention_heads=c.num_heads, intermediate_size=c.mlp_dim, max_position_embeddings=c.max_len,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  model = transformers.BertForPreTraining(hf)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, eps=1e-6)
  b = {k: torch.from_numpy(v.astype(np.int64) if v.dtype != np.float32 else v)
       for k, v in bert_batch(c, batch, seq_len).items()}
  labels = torch.full((batch, seq_len), -100, dtype=torch.long)  # HF: loss only where label != -100
  labels.scatter_(1, b["masked_lm_positions"], b["masked_lm_ids"])

  def step():
    out = model(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"],
                attention_mask=b["input_mask"], labels=labels,
                next_sentence_label=b["next_sentence_labels"])
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
  return step


def has_reference() -> bool:
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
    return True
  except ImportError:
    return False


def interleaved(steps_by_impl: dict, *, rounds: int, steps: int, warmup: int = 2,
                retries: int = 2) -> tuple[dict, list]:
  """Median seconds per step for each impl, alternating impls every round, and the kept
  rounds' Loads: a round run while the load exceeded the core count is repeated up to
  `retries` times (bench/machine.py)."""
  for step in steps_by_impl.values():
    for _ in range(warmup):
      step()
  times = {name: [] for name in steps_by_impl}

  def one_round():
    out = {}
    for name, step in steps_by_impl.items():
      t = time.perf_counter()
      for _ in range(steps):
        step()
      out[name] = (time.perf_counter() - t) / steps
    return out

  loads = []
  for _ in range(rounds):
    out, load = measured(one_round, retries=retries, log=lambda m: print(m, file=sys.stderr))
    loads.append(load)
    for name, t in out.items():
      times[name].append(t)
  return {name: statistics.median(ts) for name, ts in times.items()}, loads


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", choices=sorted(SIZES), default="gpt")
  p.add_argument("--size", choices=["small", "base"], default="small")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=5, help="steps per round")
  p.add_argument("--no-reference", action="store_true", help="skip HF transformers")
  p.add_argument("--retries", type=int, default=2,
                 help="times a round whose load exceeded the core count is repeated "
                      "(bench/machine.py); still loaded: kept, marked loaded")
  args = p.parse_args(argv)

  c, batch, seq_len = SIZES[args.model][args.size]
  fmjax_fn, torch_fn, flops_fn = {"gpt": (fmjax_gpt, torch_gpt, gpt.flops_per_token),
                                  "bert": (fmjax_bert, torch_bert, bert.flops_per_token)}[args.model]
  impls = {"fmjax": fmjax_fn(c, batch, seq_len)}
  if not args.no_reference and has_reference():
    impls["hf_torch"] = torch_fn(c, batch, seq_len)
  sec, loads = interleaved(impls, rounds=args.rounds, steps=args.steps, retries=args.retries)
  host, load = machine(), combine(loads)
  peak, source = metrics.peak_flops_per_device()
  peak *= jax.local_device_count()  # the host's peak: both implementations use every core
  flops_per_token = flops_fn(c, seq_len)
  rows = {}
  for name, s in sec.items():
    tps = batch * seq_len / s
    rows[name] = {"impl": name, "model": f"{args.model}_{args.size}", "batch": batch,
                  "seq_len": seq_len, "tokens_per_second": round(tps, 1),
                  "mfu": round(metrics.mfu(tps * flops_per_token, peak), 4), "seconds_per_step": round(s, 4),
                  "peak_flops": peak, "peak_source": source, "rounds": args.rounds,
                  "steps_per_round": args.steps, **load, "machine": host}
    print(json.dumps(rows[name]), flush=True)
  if "hf_torch" in rows:
    ratio = rows["fmjax"]["tokens_per_second"] / rows["hf_torch"]["tokens_per_second"]
    print(json.dumps({"model": f"{args.model}_{args.size}", "ratio": round(ratio, 3),
                      "fmjax_over": "hf_torch", "loaded": load["loaded"]}))


if __name__ == "__main__":
  main()
