"""Training throughput: fmjax vs Hugging Face transformers (PyTorch) on the same config.

  python bench/train_speed.py --model gpt --size small|base [--rounds 5 --steps 5]

Both implementations train the same architecture (random tokens, AdamW, fp32, no dropout)
on this machine in the same process; timings are interleaved round by round (the machine
drifts) and the medians compared. Prints one JSON object per implementation and a last one
with the fmjax/reference ratio. Without torch+transformers (`pip install -e '.[bench]'
torch==2.13.0`), only fmjax runs.
"""

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fmjax import metrics, sharding, training  # noqa: E402
from fmjax.models import gpt  # noqa: E402

SIZES = {  # name -> (model config, batch, seq_len)
    "gpt": {
        "small": (gpt.GPTConfig(vocab_size=8192, max_len=256, num_layers=4, num_heads=4,
                                embed_dim=256, mlp_dim=1024), 16, 256),
        "base": (gpt.get_config("gpt2_small"), 4, 256),
    },
}


def fmjax_gpt(c: gpt.GPTConfig, batch: int, seq_len: int):
  """A jitted fmjax train step on one device; returns step() that runs one update."""
  model = gpt.GPT(c)
  tx, _ = training.make_optimizer(learning_rate=1e-4, total_steps=10_000, warmup_steps=0)
  rng = np.random.RandomState(0)
  tokens = rng.randint(0, c.vocab_size, (batch, seq_len + 1)).astype(np.int32)
  data = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

  def loss_fn(params, b, r, train):
    logits = model.apply({"params": params}, b["inputs"], train=train)
    loss, acc, _ = training.cross_entropy(logits, b["targets"])
    return loss, {}

  mesh = sharding.make_mesh({"data": -1})
  rules = sharding.get_rules("dp")
  state, shardings = sharding.sharded_init(training.init_fn(model, tx, data["inputs"]), mesh,
                                           rules, jax.random.key(0))
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


def has_reference() -> bool:
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
    return True
  except ImportError:
    return False


def interleaved(steps_by_impl: dict, *, rounds: int, steps: int, warmup: int = 2) -> dict:
  """Median seconds per step for each impl, alternating impls every round."""
  for step in steps_by_impl.values():
    for _ in range(warmup):
      step()
  times = {name: [] for name in steps_by_impl}
  for _ in range(rounds):
    for name, step in steps_by_impl.items():
      t = time.perf_counter()
      for _ in range(steps):
        step()
      times[name].append((time.perf_counter() - t) / steps)
  return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", choices=sorted(SIZES), default="gpt")
  p.add_argument("--size", choices=["small", "base"], default="small")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=5, help="steps per round")
  p.add_argument("--no-reference", action="store_true", help="skip HF transformers")
  args = p.parse_args(argv)

  c, batch, seq_len = SIZES[args.model][args.size]
  impls = {"fmjax": fmjax_gpt(c, batch, seq_len)}
  if not args.no_reference and has_reference():
    impls["hf_torch"] = torch_gpt(c, batch, seq_len)
  sec = interleaved(impls, rounds=args.rounds, steps=args.steps)
  peak, source = metrics.peak_flops_per_device()
  flops_per_token = gpt.flops_per_token(c, seq_len)
  rows = {}
  for name, s in sec.items():
    tps = batch * seq_len / s
    rows[name] = {"impl": name, "model": f"{args.model}_{args.size}", "batch": batch,
                  "seq_len": seq_len, "tokens_per_second": round(tps, 1),
                  "mfu": round(tps * flops_per_token / peak, 4), "seconds_per_step": round(s, 4),
                  "peak_flops": peak, "peak_source": source, "rounds": args.rounds,
                  "steps_per_round": args.steps}
    print(json.dumps(rows[name]), flush=True)
  if "hf_torch" in rows:
    ratio = rows["fmjax"]["tokens_per_second"] / rows["hf_torch"]["tokens_per_second"]
    print(json.dumps({"model": f"{args.model}_{args.size}", "ratio": round(ratio, 3),
                      "fmjax_over": "hf_torch"}))


if __name__ == "__main__":
  main()
