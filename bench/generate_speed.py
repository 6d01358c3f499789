"""Generation speed: fmjax (KV cache, one jitted while_loop) vs Hugging Face transformers.

  python bench/generate_speed.py --batch 1|8 [--rounds 5 --prompt_len 32 --new_tokens 128]
  python bench/generate_speed.py --hf DIR --batch 1|8 [--rounds 5 ...]   # a real checkpoint

GPT-2 124M shape (fmjax.models.gpt preset gpt2_small), random weights, CPU fp32, greedy,
exactly --new_tokens new tokens per row (no stop token). The reference is
`transformers.GPT2LMHeadModel(...).generate(do_sample=False)` on the same configuration in
the same process; the two alternate round by round (this machine drifts) and the medians
are compared. Each timing covers a whole call, prefill included, and tokens/s counts new
tokens. Prints one JSON object per implementation and a last line with the fmjax/reference
median ratio; load_average is the host's 1-minute load before and after (other jobs sharing
the CPU slow both, PyTorch's spinning OpenMP threads far more): a ratio measured at a load
above 2 on a 2-core machine is not a valid measurement (the last line says `valid`). A round run
at a load above the core count is repeated up to --retries times and, if still loaded, kept and
marked (`loaded`, `loaded_rounds`; bench/machine.py). Each line also records the machine (CPU
model, cores, XLA flags) and the versions of jax, jaxlib, flax, optax, torch and transformers.
Without torch + transformers only fmjax runs.

--hf DIR: any causal LM directory fmjax.hf.from_pretrained(DIR, task="causal_lm") loads (GPT-2,
Llama/SmolLM2, Mistral, Qwen2/3, Gemma 1/2/3), its real weights in float32, against
`transformers.AutoModelForCausalLM.from_pretrained(DIR, dtype=float32).generate(do_sample=False)`
on the same directory; the prompts are random ids of its vocabulary and every row gets exactly
--new_tokens tokens (stop tokens suppressed on both sides). `tokens_agree` is the fraction of
rows whose greedy tokens were identical in the warm-up call (fp32 near-ties on random prompts
may part them after many tokens; a sanity check, not part of the speed).

--static adds a third implementation, `hf_torch_static`: the same transformers model with
`cache_implementation="static"`, which makes transformers' `generate` compile the decoding
step with `torch.compile` (its fastest documented path); its warm-up call pays the compile.
The last line then gives the ratio against each reference, the stronger one as `ratio`.

fmjax runs on one JAX device (all cores as its intra-op threads): decoding is a chain of
small matmuls, which a data-parallel mesh of one device per core would not split.
--threads 1 pins the process to one core and runs both single-threaded (XLA without its
Eigen thread pool, torch.set_num_threads(1)): a per-core comparison that stays fair when
other jobs share the machine.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--hf", metavar="DIR", default=None,
                 help="a Hugging Face causal LM directory (default: random GPT-2 124M)")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--prompt_len", type=int, default=32)
  p.add_argument("--new_tokens", type=int, default=128)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--threads", type=int, choices=[0, 1], default=0,
                 help="0: every core (default); 1: one core, single-threaded")
  p.add_argument("--no-reference", action="store_true", help="skip HF transformers")
  p.add_argument("--static", action="store_true",
                 help="also transformers with a static cache + torch.compile")
  p.add_argument("--retries", type=int, default=2,
                 help="times a round whose load exceeded the core count is repeated "
                      "(bench/machine.py); still loaded: kept, marked loaded")
  return p.parse_args(argv)


if __name__ == "__main__":
  # The programs' CPU settings (train/__init__.py: 512-bit vectors on AVX-512 hosts, ...) on
  # one JAX device, set before jax starts.
  os.environ.setdefault("FMJAX_CPU_DEVICES", "1")
  import train  # noqa: F401,E402

if __name__ == "__main__" and parse_args().threads == 1:  # before jax creates its threads
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_cpu_multi_thread_eigen=false").strip()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.machine import combine, machine, measured  # noqa: E402
from fmjax import generate, hf, metrics  # noqa: E402
from fmjax.models import decoder, gpt  # noqa: E402
from fmjax.runtime import Runtime  # noqa: E402


def forward_flops_per_token(c: gpt.GPTConfig, context: float) -> float:
  """Forward FLOPs of one decoded token: 2 * matmul params (tied head included) + attention
  over `context` keys (4 * L * D * context: Q K^T and P V)."""
  return gpt.flops_per_token(c, 0) / 3 + 4.0 * c.num_layers * c.embed_dim * context


def hf_forward_flops_per_token(config, context: float) -> float:
  """Forward FLOPs of one decoded token of a model fmjax.hf loaded (GPT or Decoder)."""
  if isinstance(config, gpt.GPTConfig):
    return forward_flops_per_token(config, context)
  return decoder.flops_per_token(config, context) / 3  # training FLOPs are 3x the forward's


def fmjax_generate(c: gpt.GPTConfig | None, prompts: np.ndarray, new_tokens: int, model=None,
                   params=None):
  """A call generating `new_tokens` for every row of `prompts` (random weights of config `c`
  unless `model` and `params` are given); returns the new tokens."""
  if model is None:
    model = gpt.GPT(c, Runtime(attention_impl="xla"))
    params = jax.jit(
        lambda k: nn.meta.unbox(model.init(k, jnp.zeros((1, 8), jnp.int32)))["params"])(
            jax.random.key(0))
  rows = prompts.tolist()

  def run():
    out = generate.generate(model, params, rows, max_new_tokens=new_tokens)
    assert all(len(r) == new_tokens for r in out)
    return out
  return run


def torch_generate(c: gpt.GPTConfig, prompts: np.ndarray, new_tokens: int, threads: int = 0,
                   static: bool = False):
  import torch
  import transformers
  torch.manual_seed(0)
  if threads:
    torch.set_num_threads(threads)
  hf = transformers.GPT2Config(
      vocab_size=c.vocab_size, n_positions=c.max_len, n_embd=c.embed_dim, n_layer=c.num_layers,
      n_head=c.num_heads, n_inner=c.mlp_dim, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
      activation_function="gelu_new", tie_word_embeddings=True)
  return torch_run(transformers.GPT2LMHeadModel(hf).eval(), prompts, new_tokens, static)


def torch_run(model, prompts: np.ndarray, new_tokens: int, static: bool = False):
  """A call of `model.generate`, greedy, exactly `new_tokens` per row; returns them. static:
  a static KV cache, with which transformers compiles the decoding step (torch.compile)."""
  import torch
  ids = torch.from_numpy(prompts.astype(np.int64))
  mask = torch.ones_like(ids)

  def run():
    with torch.no_grad():
      out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, pad_token_id=0,
                           **(_static_compiled() if static else {}))
    assert out.shape[1] == ids.shape[1] + new_tokens
    return out[:, ids.shape[1]:].tolist()
  return run


def _static_compiled() -> dict:
  """generate() keywords for a static KV cache with the decoding step compiled: transformers
  compiles it by itself only on accelerators, and on CPU when asked through CompileConfig."""
  import transformers
  compile_config = transformers.CompileConfig(mode="default")
  compile_config._compile_all_devices = True
  return {"cache_implementation": "static", "compile_config": compile_config}


def torch_generate_hf(directory: str, prompts: np.ndarray, new_tokens: int, threads: int = 0,
                      static: bool = False):
  """transformers' AutoModelForCausalLM of `directory` in float32, as torch_run."""
  import torch
  import transformers
  if threads:
    torch.set_num_threads(threads)
  transformers.logging.set_verbosity_error()
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
  return torch_run(model.eval(), prompts, new_tokens, static)


def has_reference() -> bool:
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
    return True
  except ImportError:
    return False


def interleaved(runs: dict, *, rounds: int, warmup: int = 1, settle: float = 1.0,
                retries: int = 2):
  """Seconds per call of each impl in every round, alternating impls (and their order), and
  the best fp32 matmul FLOP/s seen between rounds (the MFU denominator: a CPU peak cached
  while other jobs loaded the machine would flatter every MFU). Each timed call starts after
  `settle` idle seconds: OpenMP (torch) and Eigen (XLA) workers spin for a while after their
  last task and would otherwise steal the cores from the call that follows. A round run while
  the load exceeded the core count is repeated up to `retries` times (bench/machine.py);
  returns (times, peak, outputs, the kept rounds' Loads)."""
  outputs = {}
  for name, run in runs.items():
    for _ in range(warmup):
      outputs[name] = run()
  times = {name: [] for name in runs}
  names, peak, loads = list(runs), [0.0], []

  def one_round(r):
    peak[0] = max(peak[0], metrics.measure_cpu_peak_flops())
    out = {}
    for name in (names if r % 2 == 0 else names[::-1]):
      time.sleep(settle)  # let the other runtime's worker threads stop spinning
      t = time.perf_counter()
      runs[name]()
      out[name] = time.perf_counter() - t
    return out

  for r in range(rounds):
    out, load = measured(lambda: one_round(r), retries=retries,
                         log=lambda m: print(m, file=sys.stderr))
    loads.append(load)
    for name, t in out.items():
      times[name].append(t)
  return times, peak[0], outputs, loads


def main(argv=None):
  args = parse_args(argv)

  context = args.prompt_len + args.new_tokens / 2  # the mean attended length of a new token
  reference = not args.no_reference and has_reference()
  if args.hf is None:
    name, extra = "gpt2_small", {}
    c = gpt.get_config(name)
    prompts = np.random.RandomState(0).randint(0, c.vocab_size, (args.batch, args.prompt_len))
    runs = {"fmjax": fmjax_generate(c, prompts, args.new_tokens)}
    if reference:
      runs["hf_torch"] = torch_generate(c, prompts, args.new_tokens, args.threads)
      if args.static:
        runs["hf_torch_static"] = torch_generate(c, prompts, args.new_tokens, args.threads, True)
    flops = forward_flops_per_token(c, context)
  else:
    directory = os.path.abspath(args.hf)
    model, variables = hf.from_pretrained(directory, task="causal_lm",
                                          runtime=Runtime(attention_impl="xla"))
    name = os.path.basename(directory.rstrip("/"))
    with open(os.path.join(directory, "config.json")) as f:
      hf_config = json.load(f)
    extra = {"hf_dir": directory, "model_type": hf_config.get("model_type"),
             "architectures": hf_config.get("architectures"), "dtype": "float32"}
    prompts = np.random.RandomState(0).randint(0, model.config.vocab_size,
                                               (args.batch, args.prompt_len))
    runs = {"fmjax": fmjax_generate(None, prompts, args.new_tokens, model, variables["params"])}
    if reference:
      runs["hf_torch"] = torch_generate_hf(directory, prompts, args.new_tokens, args.threads)
      if args.static:
        runs["hf_torch_static"] = torch_generate_hf(directory, prompts, args.new_tokens,
                                                    args.threads, True)
    flops = hf_forward_flops_per_token(model.config, context)
  load_before = os.getloadavg()
  times, peak, outputs, loads = interleaved(runs, rounds=args.rounds, retries=args.retries)
  if args.hf is not None and "hf_torch" in outputs:
    agree = [a == b for a, b in zip(outputs["fmjax"], outputs["hf_torch"])]
    extra["tokens_agree"] = round(sum(agree) / len(agree), 3)
  source = "best 1024^3 fp32 matmul measured between rounds"
  host = machine()
  load_after = os.getloadavg()
  rows = {}
  for impl, ts in times.items():
    tps = args.batch * args.new_tokens / statistics.median(ts)
    rows[impl] = {"impl": impl, "model": name, **extra, "batch": args.batch,
                  "seq_len": args.prompt_len + args.new_tokens, "prompt_len": args.prompt_len,
                  "new_tokens": args.new_tokens, "tokens_per_second": round(tps, 2),
                  "mfu": round(tps * flops / peak, 4),
                  "seconds_per_call": [round(t, 3) for t in ts],
                  "peak_flops": peak, "peak_source": source, "rounds": args.rounds,
                  "threads": args.threads or "all",
                  "load_average": [round(load_before[0], 2), round(load_after[0], 2)],
                  "load_average_1_5_15_after": [round(x, 2) for x in load_after],
                  **{k: v for k, v in combine(loads).items() if k != "load_average"},
                  "machine": host}
    print(json.dumps(rows[impl]), flush=True)
  references = [r for r in ("hf_torch", "hf_torch_static") if r in rows]
  if references:
    ratios = {r: round(rows["fmjax"]["tokens_per_second"] / rows[r]["tokens_per_second"], 3)
              for r in references}
    strongest = min(ratios, key=ratios.get)
    load = max(load_before[0], load_after[0])
    print(json.dumps({"model": name, "batch": args.batch, "ratio": ratios[strongest],
                      "fmjax_over": strongest, "ratios": ratios,
                      "max_load_average": round(load, 2),
                      "valid": load <= host["cores"] and not rows["fmjax"]["loaded"]}))


if __name__ == "__main__":
  main()
