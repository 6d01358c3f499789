"""Val loss after equal CPU time: fmjax vs Hugging Face GPT2LMHeadModel on tiny Shakespeare.

  python bench/shakespeare_quality.py [--minutes 10] [--chunk 60]

Char-level tiny Shakespeare, first 90% train / last 10% val (nanoGPT's split). Each
implementation gets `--minutes` of training wall time on this machine; the two alternate in
`--chunk`-second turns so machine drift hits both alike. Each uses its own recipe:
  fmjax:    configs/gpt.py:shakespeare_char (model, batch, block, optimizer and schedule)
  hf_torch: 4 layers, width 192, 4 heads, block 128, batch 32, AdamW lr 2e-3, warmup +
            cosine, no dropout (the recipe the issue measured at val loss 1.57).
A first 20-step calibration sets each run's step count so its cosine ends at the budget.
Val loss is the mean next-char cross-entropy over every non-overlapping window of the val
split. Prints one JSON line per implementation and a summary line; each line records the
machine and the load over its turns (`loaded` when any turn ran at a load above the core
count: the turns are the training itself, so they are marked, not repeated; bench/machine.py).
"""

import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402,F401  (first: one JAX device per CPU core, as the programs do)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench.machine import Load, combine, machine  # noqa: E402
from configs import gpt as gpt_configs  # noqa: E402
from fmjax import data as fdata  # noqa: E402
from fmjax import heads, sharding, training  # noqa: E402
from fmjax.models import gpt  # noqa: E402
from fmjax.runtime import Runtime  # noqa: E402

TEXT = os.path.join(ROOT, "data", "tiny_shakespeare.txt")


def streams():
  with open(TEXT, encoding="utf-8") as f:
    text = f.read()
  cut = int(len(text) * 0.9)
  tok = fdata.CharTokenizer.from_text(text)
  train = np.array(tok.encode(text[:cut]) + [tok.eos_id], np.int32)
  val = np.array(tok.encode(text[cut:]) + [tok.eos_id], np.int32)
  return tok, train, val


class FmjaxRun:
  """configs/gpt.py:shakespeare_char, driven step by step."""

  def __init__(self, tok, train, val, budget_s):
    cfg = gpt_configs.get_config("shakespeare_char")
    self.cfg = cfg
    mc = dict(cfg.model)
    mc["vocab_size"] = tok.vocab_size
    self.model_config = gpt.GPTConfig(**mc)
    self.model = gpt.GPT(self.model_config, Runtime(**cfg.runtime))
    t, d = cfg.train, cfg.data
    self.seq_len, self.batch = d.seq_len, t.batch_size
    self.it = fdata.LMBatchIterator(train, batch_size=t.batch_size, seq_len=d.seq_len,
                                    seed=0, eos_id=tok.eos_id)
    self.val, self.eos = val, tok.eos_id
    self.mesh = sharding.make_mesh(dict(cfg.mesh))  # all devices, as train.pretrain_gpt
    self.rules = sharding.get_rules("dp")
    self.loss_fn = heads.causal_lm_loss_fn(self.model)
    self.budget_s, self.t = budget_s, t
    self._build(total_steps=t.steps)

  def _build(self, total_steps):
    t = self.t
    tx, schedule = training.make_optimizer(
        learning_rate=t.learning_rate, total_steps=total_steps, warmup_steps=t.warmup_steps,
        decay=t.decay, end_factor=t.end_factor, weight_decay=t.weight_decay, b1=t.b1, b2=t.b2,
        eps=t.eps, grad_clip=t.grad_clip)
    example = self.it.batch_at(0)
    self.state, shardings = sharding.sharded_init(
        training.init_fn(self.model, tx, example["inputs"]), self.mesh, self.rules, jax.random.key(0))
    with sharding.context(self.mesh, self.rules):
      self.p_train, self.p_eval = training.jit_steps(
          training.make_train_step(self.loss_fn, tx, schedule=schedule),
          training.make_eval_step(self.loss_fn), shardings, self.mesh)
    self.it.set_state({"step": 0})
    self.total_steps, self.steps = total_steps, 0

  def step(self):
    batch = sharding.shard_batch(next(self.it), self.mesh)
    self.state, m = self.p_train(self.state, batch, jax.random.key(0))
    self.steps += 1
    return m

  def sync(self, m):
    jax.block_until_ready(m["train/loss"])

  def restart(self, total_steps):
    self._build(total_steps)

  def val_loss(self):
    losses = [float(self.p_eval(self.state.params, sharding.shard_batch(b, self.mesh))["eval/loss"])
              for b in fdata.eval_batches(self.val, 16, self.seq_len, eos_id=self.eos)]
    return float(np.mean(losses))

  def describe(self):
    c = self.model_config
    return {"layers": c.num_layers, "width": c.embed_dim, "heads": c.num_heads,
            "block": self.seq_len, "batch": self.batch, "lr": self.t.learning_rate}


class TorchRun:
  """HF GPT2LMHeadModel with the issue's recipe."""

  def __init__(self, tok, train, val, budget_s):
    import torch
    import transformers
    self.torch = torch
    self.seq_len, self.batch, self.lr, self.warmup = 128, 32, 2e-3, 100
    self.train, self.val, self.vocab = train, val, tok.vocab_size
    self.hf = transformers.GPT2Config(
        vocab_size=tok.vocab_size, n_positions=self.seq_len, n_embd=192, n_layer=4, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tok.eos_id,
        eos_token_id=tok.eos_id)
    self.budget_s = budget_s
    self.restart(5000)

  def restart(self, total_steps):
    torch = self.torch
    import transformers
    torch.manual_seed(0)
    self.model = transformers.GPT2LMHeadModel(self.hf)
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr, betas=(0.9, 0.99),
                                 weight_decay=0.1)
    warm, total = self.warmup, total_steps
    lr_lambda = lambda s: (s + 1) / warm if s < warm else \
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, total - warm))))
    self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda)
    self.rng = np.random.default_rng(0)
    self.total_steps, self.steps = total_steps, 0

  def step(self):
    torch = self.torch
    self.model.train()
    starts = self.rng.integers(0, len(self.train) - self.seq_len - 1, self.batch)
    x = torch.from_numpy(np.stack([self.train[s:s + self.seq_len] for s in starts]).astype(np.int64))
    y = torch.from_numpy(np.stack([self.train[s + 1:s + 1 + self.seq_len] for s in starts]).astype(np.int64))
    logits = self.model(input_ids=x).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, self.vocab), y.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    self.sched.step()
    self.steps += 1
    return loss

  def sync(self, m):
    pass

  def val_loss(self):
    torch = self.torch
    self.model.eval()
    n = (len(self.val) - 1) // self.seq_len
    losses = []
    with torch.no_grad():
      for i in range(0, n, 16):
        idx = range(i, min(i + 16, n))
        x = torch.from_numpy(np.stack([self.val[j * self.seq_len:(j + 1) * self.seq_len] for j in idx]).astype(np.int64))
        y = torch.from_numpy(np.stack([self.val[j * self.seq_len + 1:(j + 1) * self.seq_len + 1] for j in idx]).astype(np.int64))
        logits = self.model(input_ids=x).logits
        losses.append(float(torch.nn.functional.cross_entropy(logits.reshape(-1, self.vocab), y.reshape(-1))))
    return float(np.mean(losses))

  def describe(self):
    return {"layers": 4, "width": 192, "heads": 4, "block": self.seq_len, "batch": self.batch,
            "lr": self.lr}


def calibrate(run, budget_s, steps=20):
  """Times `steps` steps (after compilation), restarts with the step count that fits the
  budget, and takes the restarted run's first (compiling) step outside the budget."""
  run.sync(run.step())
  t = time.perf_counter()
  for _ in range(steps):
    m = run.step()
  run.sync(m)
  per_step = (time.perf_counter() - t) / steps
  run.restart(max(int(budget_s / per_step), 200))
  run.sync(run.step())
  return per_step


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--minutes", type=float, default=10.0)
  p.add_argument("--chunk", type=float, default=60.0, help="seconds per turn")
  p.add_argument("--only", choices=["fmjax", "hf_torch"], default=None)
  args = p.parse_args(argv)
  budget = args.minutes * 60
  tok, train, val = streams()
  runs = {}
  if args.only in (None, "fmjax"):
    runs["fmjax"] = FmjaxRun(tok, train, val, budget)
  if args.only in (None, "hf_torch"):
    try:
      runs["hf_torch"] = TorchRun(tok, train, val, budget)
    except ImportError:
      print(json.dumps({"note": "torch/transformers not installed: reference skipped"}))
  per_step = {name: calibrate(run, budget) for name, run in runs.items()}
  used = {name: 0.0 for name in runs}
  loads = {name: [] for name in runs}
  while any(used[n] < budget and runs[n].steps < runs[n].total_steps for n in runs):
    for name, run in runs.items():
      turn = min(args.chunk, budget - used[name])
      load = Load()
      t = time.perf_counter()
      m = None
      while time.perf_counter() - t < turn and run.steps < run.total_steps:
        m = run.step()
        if run.steps % 10 == 0:
          run.sync(m)
      if m is not None:
        run.sync(m)
      used[name] += time.perf_counter() - t
      loads[name].append(load.close())
  results, host = {}, machine()
  for name, run in runs.items():
    results[name] = {"impl": name, "val_loss": round(run.val_loss(), 4), "steps": run.steps,
                     "train_seconds": round(used[name], 1),
                     "tokens_per_second": round(run.steps * run.batch * run.seq_len / used[name], 1),
                     "calibrated_seconds_per_step": round(per_step[name], 4), **run.describe(),
                     **(combine(loads[name]) if loads[name] else {}), "machine": host}
    print(json.dumps(results[name]), flush=True)
  if len(results) == 2:
    print(json.dumps({"minutes": args.minutes, "fmjax_val_loss": results["fmjax"]["val_loss"],
                      "hf_torch_val_loss": results["hf_torch"]["val_loss"],
                      "fmjax_lower": results["fmjax"]["val_loss"] < results["hf_torch"]["val_loss"],
                      "loaded": any(r.get("loaded", False) for r in results.values())}))


if __name__ == "__main__":
  main()
