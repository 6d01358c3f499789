"""Start-up time: from launching a program to its first finished training step, cold and warm.

  python bench/startup.py [--configs tiny,gpt2_small] [--rounds 3] [--out [FILE]]

Each measurement launches `python -m train.pretrain_gpt` in a fresh process with a new workdir
and times, from the launch, the moment its log says `compiled the train step ... (step 1; ...`
(the first step has run and its result is back on the host: imports, JAX start-up, data and
tokenizer, init, compilation and one step). Both variants run one step (the program still
evaluates, saves and samples after it; `process_s` is the whole run, for reference):
  tiny        configs/gpt.py:tiny as the tests run it (2 layers x 64, the bundled text).
  gpt2_small  configs/gpt.py:gpt2_small's architecture (12 layers x 768, 12 heads, its scanned
              layers and remat) on the bundled tiny Shakespeare with char tokens, so its
              embedding has the char vocabulary's rows (padded to 128) instead of 50,257 (~85M
              parameters rather than 124M), fp32, batch 2 x 128 tokens: a CPU-sized step
              whose compile is the real stack's.
Cache: `cold` runs with FMJAX_COMPILATION_CACHE set to a new empty directory; `warm` runs
again with the same directory (the programs keep JAX's persistent compilation cache by
default, train/common.py). Rounds interleave the variants and cache states (round r: tiny
cold, tiny warm, gpt2_small cold, gpt2_small warm), so machine drift hits them alike.

Prints one JSON line per measurement (first_step_s, compile_s from the log line, process_s,
the machine and the load; a run made while the load exceeded the core count is repeated up to
--retries times, then kept marked `loaded`; bench/machine.py) and a summary line per variant
and cache state with the medians. --out appends them to bench/results/startup.jsonl (or FILE)
after a `# python bench/startup.py ...` line; without it nothing is written.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench.machine import machine, measured  # noqa: E402

RESULTS = os.path.join(REPO, "bench", "results", "startup.jsonl")
FIRST_STEP = re.compile(r"compiled the train step for batch shape (.*?) in ([\d.]+) s \(step 1;")
CONFIGS = {  # name -> the program's arguments besides --workdir
    "tiny": ["--config=configs/gpt.py:tiny", "--config.train.steps=1"],
    "gpt2_small": [
        "--config=configs/gpt.py:gpt2_small", "--config.data.train_path=data/tiny_shakespeare.txt",
        "--config.data.tfds_name=", "--config.data.tokenizer=char", "--config.data.mode=random",
        "--config.data.seq_len=128", "--config.model.vocab_size=-1",
        "--config.runtime.dtype=float32", "--config.train.steps=1",
        "--config.train.batch_size=2", "--config.train.warmup_steps=0",
        "--config.train.eval_batches=1", "--config.sample.num_tokens=8"],
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--configs", default="tiny,gpt2_small",
                 help=f"comma-separated, of {', '.join(CONFIGS)}")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--retries", type=int, default=2,
                 help="times a run made under a load above the core count is repeated")
  p.add_argument("--timeout", type=float, default=1800, help="seconds per process")
  p.add_argument("--out", nargs="?", const=RESULTS, default=None, metavar="FILE",
                 help=f"append the lines to FILE (default {os.path.relpath(RESULTS, REPO)})")
  args = p.parse_args(argv)
  unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
  if unknown:
    p.error(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
  return args


def launch(config: str, cache_dir: str, scratch: str, timeout: float) -> dict:
  """One fresh process of the program; the seconds from launch to its first finished step.

  Args:
    config: a key of CONFIGS.
    cache_dir: the FMJAX_COMPILATION_CACHE directory it runs with.
    scratch: a directory for its (new) workdir.
    timeout: seconds before the process is killed.

  Returns:
    {"first_step_s", "compile_s", "batch_shape", "process_s"}.
  """
  workdir = tempfile.mkdtemp(prefix=f"{config}_", dir=scratch)
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # it wins
  env["FMJAX_COMPILATION_CACHE"] = cache_dir
  cmd = [sys.executable, "-m", "train.pretrain_gpt", *CONFIGS[config], f"--workdir={workdir}"]
  began = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1)
  killer = threading.Timer(timeout, proc.kill)  # a hung process is killed, and reported
  killer.start()
  first, tail = None, []
  try:
    for line in proc.stdout:
      now = time.perf_counter()
      match = FIRST_STEP.search(line)
      if match and first is None:
        first = {"first_step_s": round(now - began, 2), "compile_s": float(match.group(2)),
                 "batch_shape": match.group(1)}
      tail = (tail + [line.rstrip()])[-30:]
    code = proc.wait()
  finally:
    killer.cancel()
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  process_s = round(time.perf_counter() - began, 2)
  shutil.rmtree(workdir, ignore_errors=True)
  if code != 0 or first is None:
    raise SystemExit(f"error: {' '.join(cmd)} exited {code}"
                     + ("" if first else " without the 'compiled the train step ... (step 1;' "
                        "log line") + ":\n" + "\n".join(tail))
  return {**first, "process_s": process_s}


def main(argv=None) -> None:
  args = parse_args(argv)
  configs = args.configs.split(",")
  host = machine()
  scratch = tempfile.mkdtemp(prefix="fmjax_startup_")
  lines = []
  try:
    for r in range(args.rounds):
      for config in configs:
        cache_dir = tempfile.mkdtemp(prefix=f"cache_{config}_", dir=scratch)
        for cache in ("cold", "warm"):
          def once():
            if cache == "cold":  # every attempt at a cold start gets an empty cache
              shutil.rmtree(cache_dir)
              os.makedirs(cache_dir)
            return launch(config, cache_dir, scratch, args.timeout)
          result, load = measured(once, retries=args.retries,
                                  log=lambda m: print(m, file=sys.stderr))
          line = {"bench": "startup", "config": config, "cache": cache, "round": r + 1,
                  **result, **load.fields(), "machine": host,
                  "command": ["python", "-m", "train.pretrain_gpt", *CONFIGS[config]]}
          print(json.dumps(line), flush=True)
          lines.append(line)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  for config in configs:
    for cache in ("cold", "warm"):
      mine = [x for x in lines if x["config"] == config and x["cache"] == cache]
      summary = {"bench": "startup", "config": config, "cache": cache, "rounds": len(mine),
                 **{f"median_{k}": round(statistics.median(x[k] for x in mine), 2)
                    for k in ("first_step_s", "compile_s", "process_s")},
                 "loaded_rounds": sum(x["loaded"] for x in mine)}
      print(json.dumps(summary), flush=True)
      lines.append(summary)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as f:
      f.write("# python bench/startup.py " + " ".join(argv if argv is not None else sys.argv[1:])
              + "\n")
      f.writelines(json.dumps(x) + "\n" for x in lines)


if __name__ == "__main__":
  main()
