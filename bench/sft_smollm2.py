"""LoRA vs full supervised finetuning of SmolLM2-135M-Instruct on a small instruction set.

  python bench/make_smollm2.py            # once: the Hugging Face directory (see that file)
  python bench/sft_smollm2.py [--steps 60 --batch 4 --seq_len 128 --rank 8]

The instruction set is made here from SST-2 sentences (../shared/data/sst2: train.tsv for
training rows, test.tsv -- GLUE's dev set -- for the held-out rows), two tasks in a format
the checkpoint does not produce by itself, as chat messages:
  sentiment  "Review: ...\\nIs this review positive or negative? Answer in JSON."
             -> {"sentiment": "positive"}
  last word  "Sentence: ...\\nWhat is the sentence's last word? Answer as LAST WORD: <WORD>."
             -> LAST WORD: <THE WORD IN CAPITALS>
Each run is `python -m train.sft --config=configs/sft.py:lora` (LoRA: --config.lora.rank) or
`:full` as a user runs it, fp32 on the CPU (--config.runtime.dtype=float32, no remat), in a
subprocess of its own (its peak resident memory is its own, from wait4):
  base  one LoRA step at learning rate 1e-9 (B starts at zero: the checkpoint itself), whose
        evaluation gives the untrained response loss and answers;
  lora  rank --rank adapters (alpha 2 x rank) on --targets (default the attention
        projections q, k, v, o: under 1% of the parameters at rank 8), lr 2e-4;
  full  every parameter, lr 2e-5.
The same data order, steps, batch and sequence length for lora and full; one evaluation at
the end (eval/loss: the response tokens of the held-out rows; answers: greedy, 24 tokens).

Prints one JSON object per run (written to --out with the command) and a last line comparing
them: trainable share, held-out response loss before/after, answers in the taught format,
sentiment accuracy, seconds per step, peak memory. A run taken at a load above the core count
is marked invalid for its timings.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench.machine import Load, machine  # noqa: E402

DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "sst2")
SMOLLM2 = os.environ.get("FMJAX_SMOLLM2") or os.path.join(
    os.path.expanduser("~"), ".cache", "fmjax", "smollm2-135m-instruct")
SENTIMENT = re.compile(r'\{"sentiment": "(positive|negative)"\}')
LAST_WORD = re.compile(r"LAST WORD: (\S+)")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--hf", default=SMOLLM2, help="the SmolLM2 Hugging Face directory")
  p.add_argument("--steps", type=int, default=60)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--targets", default="query,key,value,out",
                 help="config.lora.targets (default: the attention projections, as PEFT's "
                      "q/k/v/o; '' for fmjax.lora's default, attention and MLP)")
  p.add_argument("--train_rows", type=int, default=600)
  p.add_argument("--eval_rows", type=int, default=40)
  p.add_argument("--runs", default="base,lora,full")
  p.add_argument("--workdir", default=os.path.join(REPO, "workdirs", "sft_bench"))
  p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "sft_smollm2.jsonl"))
  return p.parse_args(argv)


def sentences(path: str, n: int, seed: int) -> list[tuple[str, int]]:
  """n SST-2 (sentence, label) rows of 6 to 30 words, shuffled with `seed`."""
  import numpy as np
  rows = []
  with open(path, encoding="utf-8") as f:
    next(f)
    for line in f:
      text, label = line.rstrip("\n").rsplit("\t", 1)
      text = " ".join(text.split())
      if 6 <= len(text.split()) <= 30 and text[-1].isalpha():
        rows.append((text, int(label)))
  order = np.random.default_rng(seed).permutation(len(rows))[:n]
  return [rows[i] for i in order]


def conversation(text: str, label: int, task: int) -> dict:
  """One chat row of the instruction set (task 0: sentiment, 1: last word)."""
  if task == 0:
    ask = f"Review: {text}\nIs this review positive or negative? Answer in JSON."
    answer = json.dumps({"sentiment": "positive" if label else "negative"})
  else:
    ask = (f"Sentence: {text}\nWhat is the sentence's last word? "
           "Answer as LAST WORD: <WORD>.")
    answer = f"LAST WORD: {text.split()[-1].upper()}"
  return {"messages": [{"role": "user", "content": ask},
                       {"role": "assistant", "content": answer}]}


def make_data(directory: str, train_rows: int, eval_rows: int) -> tuple[str, str]:
  """train.jsonl and eval.jsonl under `directory`; returns their paths."""
  os.makedirs(directory, exist_ok=True)
  paths = []
  for name, source, n in (("train", "train.tsv", train_rows), ("eval", "test.tsv", eval_rows)):
    rows = [conversation(t, y, i % 2) for i, (t, y) in
            enumerate(sentences(os.path.join(DATA, source), n, seed=len(name)))]
    path = os.path.join(directory, f"{name}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
    paths.append(path)
  return paths[0], paths[1]


def score(predictions: list[dict]) -> dict:
  """The share of answers in the taught format, and sentiment accuracy, of the last eval."""
  fmt, right, sentiment = 0, 0, 0
  for p in predictions:
    answer, reference = p["answer"].strip(), p["reference"].strip()
    pattern = SENTIMENT if reference.startswith("{") else LAST_WORD
    ok = pattern.fullmatch(answer)
    fmt += bool(ok)
    if pattern is SENTIMENT:
      sentiment += 1
      right += bool(ok) and answer == reference
  return {"format_ok": round(fmt / max(len(predictions), 1), 3),
          "sentiment_accuracy": round(right / max(sentiment, 1), 3),
          "answer_match": round(sum(p["answer"].strip() == p["reference"].strip()
                                    for p in predictions) / max(len(predictions), 1), 3)}


def run(name: str, args, train_path: str, eval_path: str) -> dict:
  """One train.sft run in a subprocess; its metrics, answers, time and peak memory."""
  workdir = os.path.join(args.workdir, name)
  subprocess.run(["rm", "-rf", workdir], check=True)
  steps = 1 if name == "base" else args.steps
  variant = "full" if name == "full" else "lora"
  lr = {"base": 1e-9, "lora": 2e-4, "full": 2e-5}[name]
  cmd = [sys.executable, "-m", "train.sft", f"--config=configs/sft.py:{variant}",
         f"--workdir={workdir}", f"--config.init_from=hf:{args.hf}",
         f"--config.data.train_path={train_path}", f"--config.data.eval_path={eval_path}",
         f"--config.data.seq_len={args.seq_len}", f"--config.train.steps={steps}",
         f"--config.train.batch_size={args.batch}", f"--config.train.learning_rate={lr}",
         f"--config.train.warmup_steps={min(10, steps - 1)}",
         f"--config.train.eval_every={steps}", f"--config.train.save_every={steps}",
         f"--config.train.log_every={max(1, min(10, steps))}",
         f"--config.sample.num_prompts={args.eval_rows}", "--config.sample.num_tokens=24",
         "--config.runtime.dtype=float32", "--config.runtime.remat_policy=none",
         *([f"--config.lora.rank={args.rank}", f"--config.lora.alpha={2.0 * args.rank}",
            f"--config.lora.targets={args.targets}"]
           if variant == "lora" else [])]
  load = Load()
  began = time.perf_counter()
  log_path = os.path.join(args.workdir, f"{name}.log")
  with open(log_path, "w") as log:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak resident memory
  wall = time.perf_counter() - began
  load.close()
  code = os.waitstatus_to_exitcode(status)
  if code:
    with open(log_path) as log:
      raise SystemExit(f"{name}: train.sft failed ({code}):\n{log.read()[-3000:]}")
  peak_gb = usage.ru_maxrss / 1024 ** 2
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  predictions = os.path.join(workdir, "predictions", f"step_{steps}.jsonl")
  answers = [json.loads(line) for line in open(predictions, encoding="utf-8")]
  timed = [r["tokens_per_second"] for r in rows if "tokens_per_second" in r]
  tps = sorted(timed)[len(timed) // 2] if timed else None
  first, last = rows[0], rows[-1]
  return {"impl": f"fmjax_{name}", "model": os.path.basename(args.hf.rstrip("/")),
          "batch": args.batch, "seq_len": args.seq_len, "steps": steps, "learning_rate": lr,
          "lora_rank": args.rank if variant == "lora" else 0,
          "trainable_params": first.get("trainable_params"),
          "total_params": first.get("total_params"),
          "eval_loss": last.get("eval/loss"), **score(answers),
          "tokens_per_second": tps,
          "seconds_per_step": round(args.batch * args.seq_len / tps, 3) if tps else None,
          "peak_rss_gb": round(peak_gb, 2), "wall_s": round(wall, 1),
          **load.fields(),
          "answers": [a["answer"] for a in answers[:4]]}


def main(argv=None):
  args = parse_args(argv)
  train_path, eval_path = make_data(os.path.join(args.workdir, "data"), args.train_rows,
                                    args.eval_rows)
  results = {}
  with open(args.out, "a") as f:
    f.write(json.dumps({"command": " ".join(["python", "bench/sft_smollm2.py", *sys.argv[1:]]),
                        "machine": machine()}) + "\n")
    for name in args.runs.split(","):
      results[name] = run(name, args, train_path, eval_path)
      print(json.dumps(results[name]), flush=True)
      f.write(json.dumps(results[name]) + "\n")
    if {"base", "lora", "full"} <= results.keys():
      b, lo, fu = results["base"], results["lora"], results["full"]
      cores = len(os.sched_getaffinity(0))
      summary = {
          "trainable_share_lora": round(lo["trainable_params"] / lo["total_params"], 5),
          "eval_loss": {"base": b["eval_loss"], "lora": lo["eval_loss"], "full": fu["eval_loss"]},
          "lora_loss_cut": round(1 - lo["eval_loss"] / b["eval_loss"], 3),
          "format_ok": {k: r["format_ok"] for k, r in results.items()},
          "sentiment_accuracy": {k: r["sentiment_accuracy"] for k, r in results.items()},
          "seconds_per_step": {"lora": lo["seconds_per_step"], "full": fu["seconds_per_step"]},
          "peak_rss_gb": {"lora": lo["peak_rss_gb"], "full": fu["peak_rss_gb"]},
          "valid": (max(x for r in results.values() for x in r["load_average"]) <= cores
                    and not any(r["loaded"] for r in results.values()))}
      print(json.dumps(summary), flush=True)
      f.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
  main()
