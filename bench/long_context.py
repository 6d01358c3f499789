"""Long sequences: time per training step and peak memory against sequence length.

  python bench/long_context.py [--lengths 512,1024,...,16384] [--impls chunked,xla,hf]

A small GPT (2 layers, width 128, 4 heads, byte vocabulary) takes one training step
(forward, backward, AdamW) on a batch of one sequence of each length, each in a fresh
subprocess so its peak resident memory (ru_maxrss) is its own. Implementations:
  chunked  fmjax with attention_impl=chunked: online softmax over key blocks, O(T) memory
  xla      fmjax with attention_impl=xla: the (T, T) scores are materialised
  hf       Hugging Face GPT-2 in PyTorch (eager attention), when torch and transformers are
           installed: the reference a user would otherwise pick
A run that exceeds --timeout seconds is reported as failed; a quadratic implementation whose
attention scores alone (3 x layers x heads x T^2 float32) exceed --limit_gb is skipped
rather than run into the machine's memory.
Prints one JSON object per (impl, length): impl, model, batch, seq_len, step_seconds,
tokens_per_second, mfu, peak_rss_gb, with the machine and the load around it (a run made while
the load exceeded the core count is repeated up to --retries times, then kept marked loaded;
bench/machine.py).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

MODEL = dict(num_layers=2, embed_dim=128, num_heads=4, mlp_dim=512, vocab_size=258)


def fmjax_step(impl: str, seq_len: int, steps: int) -> dict:
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  import jax
  import jax.numpy as jnp
  import numpy as np
  from fmjax import metrics, training
  from fmjax.models import gpt
  from fmjax.runtime import Runtime
  c = gpt.GPTConfig(max_len=seq_len, **MODEL)
  model = gpt.GPT(c, Runtime(attention_impl=impl))
  tx, schedule = training.make_optimizer(learning_rate=1e-3, total_steps=10, warmup_steps=1)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, seq_len + 1)), jnp.int32)
  state = training.init_fn(model, tx, tokens[:, :-1])(jax.random.key(0))
  import flax.linen as nn
  state = nn.meta.unbox(state)

  def loss_fn(params, batch, rng, train):
    logits = model.apply({"params": params}, batch["inputs"], train=train)
    return training.cross_entropy(logits, batch["targets"])[0], {}
  step = jax.jit(training.make_train_step(loss_fn, tx, schedule=schedule), donate_argnums=0)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  state, m = step(state, batch, jax.random.key(1))  # compile + first step
  jax.block_until_ready(m)
  begin = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, batch, jax.random.key(1))
  jax.block_until_ready(m)
  seconds = (time.perf_counter() - begin) / steps
  flops = gpt.flops_per_token(c, seq_len) * seq_len
  peak, _ = metrics.peak_flops_per_device()
  return {"step_seconds": seconds, "mfu": metrics.mfu(flops / seconds, peak)}


def hf_step(seq_len: int, steps: int) -> dict:
  import torch
  import transformers
  torch.manual_seed(0)
  config = transformers.GPT2Config(n_layer=MODEL["num_layers"], n_embd=MODEL["embed_dim"],
                                   n_head=MODEL["num_heads"], n_inner=MODEL["mlp_dim"],
                                   vocab_size=MODEL["vocab_size"], n_positions=seq_len,
                                   attn_implementation="eager")
  model = transformers.GPT2LMHeadModel(config)
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
  tokens = torch.randint(0, 256, (1, seq_len))

  def one():
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
  one()
  begin = time.perf_counter()
  for _ in range(steps):
    one()
  return {"step_seconds": (time.perf_counter() - begin) / steps, "mfu": None}


def child(impl: str, seq_len: int, steps: int) -> None:
  result = hf_step(seq_len, steps) if impl == "hf" else fmjax_step(impl, seq_len, steps)
  result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
  print(json.dumps(result))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", default="512,1024,2048,4096,8192,16384")
  parser.add_argument("--impls", default="chunked,xla,hf")
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--limit_gb", type=float, default=16.0)
  parser.add_argument("--timeout", type=float, default=900)
  parser.add_argument("--retries", type=int, default=2,
                      help="times a run made under a load above the core count is repeated")
  parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args.child[0], int(args.child[1]), int(args.child[2]))
    return
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from bench.machine import machine, measured
  host = machine()
  for impl in args.impls.split(","):
    if impl == "hf":
      try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
      except ImportError:
        print(json.dumps({"impl": "hf", "skipped": "torch/transformers not installed"}))
        continue
    for seq_len in map(int, args.lengths.split(",")):
      limit = int(args.limit_gb * 1024 ** 3)
      set_limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
      row = {"impl": f"fmjax-{impl}" if impl != "hf" else "hf-torch", "model": "gpt-2x128",
             "batch": 1, "seq_len": seq_len}
      quadratic = 3 * MODEL["num_layers"] * MODEL["num_heads"] * seq_len ** 2 * 4
      if impl != "chunked" and quadratic > limit:
        row["skipped"] = (f"its (T, T) attention scores alone need ~{quadratic / 1024 ** 3:.0f} GiB "
                          f"> --limit_gb={args.limit_gb:g}")
        print(json.dumps({**row, "machine": host}), flush=True)
        continue

      def attempt():
        out = {}
        try:
          proc = subprocess.run([sys.executable, __file__, "--child", impl, str(seq_len),
                                 str(args.steps)], capture_output=True, text=True,
                                timeout=args.timeout,
                                preexec_fn=set_limit if impl == "hf" else None)
          lines = proc.stdout.strip().splitlines()
          if proc.returncode or not lines:
            out["failed"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
          else:
            result = json.loads(lines[-1])
            out.update(result, tokens_per_second=seq_len / result["step_seconds"])
        except subprocess.TimeoutExpired:
          out["failed"] = f"over {args.timeout:.0f} s"
        return out
      result, load = measured(attempt, retries=args.retries,
                              log=lambda m: print(m, file=sys.stderr))
      row.update(result, **load.fields(), machine=host)
      print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
