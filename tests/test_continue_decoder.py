"""Continued pretraining of the decoder families: `python -m train.pretrain_gpt
--config.init_from=hf:DIR` on a Llama directory builds fmjax.models.decoder's
Decoder with the directory's DecoderConfig, weights and tokenizer (issue 17, item 5).

Pinned, through the program (one CPU device): with a learning rate of 0 the evaluation loss is
the one computed directly from fmjax.hf.from_pretrained's model on the same windows (the
weights were loaded, not re-initialised); the checkpoint's signature is the DecoderConfig and
fmjax.sources rebuilds it from the workdir (nested AttentionOptions/Rope); rerunning resumes at
a high learning rate with a finite, falling loss; train.sample samples from the workdir. The
Hugging Face source of every golden names the class to build (GPT for GPT-2, else Decoder).
In a subprocess with 8 simulated devices (tests/sharded_steps.py), a decoder's train step
under fsdp_tp on a (2, 2, 2) mesh equals one device. The memory planner counts grouped-query
and Gemma-width heads.
"""

import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "hf"
SEQ_LEN, BATCH, EVAL_BATCHES = 16, 4, 2


def corpus(n: int, seed: int) -> str:
  """Short sentences over a small alphabet: learnable within a few steps."""
  rng = np.random.RandomState(seed)
  words = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "his", "red", "ball"]
  return "".join(" ".join(rng.choice(words, 6)) + ".\n" for _ in range(n))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """The subprocesses' environment: one CPU device, a private compilation cache."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "FMJAX_DEBUG")}
  env.update(JAX_PLATFORMS="cpu", FMJAX_CPU_DEVICES="1")
  cache = tmp_path_factory.mktemp("cache")
  env["XDG_CACHE_HOME"] = str(cache)  # MFU's CPU peak FLOP/s: given, not measured (metrics.py)
  key = f"{platform.processor() or platform.machine()}-{os.cpu_count()}-1"
  (cache / "fmjax").mkdir()
  (cache / "fmjax" / "cpu_peak_flops.json").write_text(json.dumps({key: 1e10}))
  env["JAX_COMPILATION_CACHE_DIR"] = str(cache / "jax")
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return env


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("text")
  (root / "train.txt").write_text(corpus(120, 0))
  (root / "eval.txt").write_text(corpus(20, 1))
  return root


def hf_directory(name: str, root: pathlib.Path, text: str) -> pathlib.Path:
  """The golden's random weights plus a character-level tokenizer.json (< its 96 ids)."""
  directory = root / name
  shutil.copytree(GOLDEN / name, directory, ignore=shutil.ignore_patterns("reference.npz"))
  specials = ["<unk>", "<s>", "</s>"]
  vocab = {t: i for i, t in enumerate(specials + sorted(set(text)))}
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
  tok.add_special_tokens(specials)
  tok.decoder = decoders.Fuse()
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
  return directory


def program(env, data, workdir, directory, *overrides):
  cmd = [sys.executable, "-m", "train.pretrain_gpt", "--config=configs/gpt.py:tiny",
         f"--workdir={workdir}", f"--config.init_from=hf:{directory}",
         f"--config.data.train_path={data / 'train.txt'}",
         f"--config.data.eval_path={data / 'eval.txt'}", f"--config.data.seq_len={SEQ_LEN}",
         f"--config.train.batch_size={BATCH}", f"--config.train.eval_batches={EVAL_BATCHES}",
         "--config.train.log_every=1", "--config.sample.prompt=the", *overrides]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
  assert "Traceback" not in proc.stderr
  return proc


def rows(workdir):
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def direct_eval_loss(directory, eval_file) -> float:
  """The program's evaluation loss (mean over the first batches of in-order windows),
  computed from fmjax.hf.from_pretrained's model and the directory's tokenizer."""
  import jax
  from fmjax import data as fdata
  from fmjax import heads, hf
  model, variables = hf.from_pretrained(directory, task="causal_lm")
  tokenizer = hf.tokenizer_from_pretrained(directory)
  tokens = np.asarray(tokenizer.encode(eval_file.read_text()) + [tokenizer.eos_id], np.int32)
  loss_fn = heads.causal_lm_loss_fn(model)
  losses = [float(loss_fn(variables["params"], b, jax.random.key(0), False)[0])
            for b in fdata.eval_batches(tokens, BATCH, SEQ_LEN, max_batches=EVAL_BATCHES,
                                        eos_id=tokenizer.eos_id)]
  assert len(losses) == EVAL_BATCHES
  return float(np.mean(losses))


def frozen(env, data, workdir, directory):
  """One step at learning rate 0 (weights unchanged), evaluated: (rows, stderr)."""
  proc = program(env, data, workdir, directory, "--config.train.steps=1",
                 "--config.train.learning_rate=0.0",
                 "--config.train.allow_nonpositive_learning_rate=true",
                 "--config.train.eval_every=1", "--config.train.save_every=1",
                 "--config.sample.num_tokens=0")
  return rows(workdir), proc.stderr


def test_continue_llama_loads_resumes_and_samples(env, data, tmp_path):
  from fmjax import checkpoint, hf, sources
  from fmjax.models import decoder
  from train import pretrain_gpt, sample
  directory = hf_directory("llama", tmp_path, (data / "train.txt").read_text())
  workdir = tmp_path / "run"
  first, log = frozen(env, data, workdir, directory)
  (step1,) = [r for r in first if "eval/loss" in r]
  assert step1["step"] == 1
  direct = direct_eval_loss(directory, data / "eval.txt")
  np.testing.assert_allclose(step1["eval/loss"], direct, rtol=1e-5)
  assert abs(direct - np.log(96)) > 0.2  # not the near-uniform loss of fresh small weights
  assert "memory plan per device" in log

  # The checkpoint's signature is the DecoderConfig; the workdir gives it back, nested parts too.
  config, _ = hf.read_weights(directory)
  assert isinstance(config, decoder.DecoderConfig) and config.attention.rope.scaling == "llama3"
  _, meta, _ = checkpoint.read_latest(str(workdir))
  assert meta["model"] == checkpoint.model_signature(config)
  assert sources.parse(str(workdir)).architecture(tuple(pretrain_gpt.MODELS)) == config
  assert json.load(open(workdir / "tokenizer" / "fmjax_tokenizer.json"))["kind"] == "hf"

  # Rerun: resumes from step 1 (same architecture; under another runtime: bfloat16, scanned
  # and rematerialised layers) and trains at a high learning rate.
  proc = program(env, data, workdir, directory, "--config.train.steps=8",
                 "--config.runtime.dtype=bfloat16", "--config.runtime.scan_layers=true",
                 "--config.runtime.remat_policy=dots_no_batch",
                 "--config.train.learning_rate=3e-2", "--config.train.warmup_steps=0",
                 "--config.train.eval_every=8", "--config.train.save_every=8",
                 "--config.sample.num_tokens=0")
  assert "resumed from" in proc.stderr
  later = rows(workdir)
  train = [r["train/loss"] for r in later if "train/loss" in r and r["step"] > 1]
  assert len(train) == 7 and np.all(np.isfinite(train))
  assert train[-1] < 0.8 * train[0], train
  final = [r["eval/loss"] for r in later if "eval/loss" in r and r["step"] == 8]
  assert final and final[-1] < step1["eval/loss"]

  # python -m train.sample's loading and sampling, in-process (greedy).
  text = sample.sample(str(workdir), "the cat", max_new_tokens=6, temperature=0.0)
  assert text.startswith("the cat") and len(text) > len("the cat")


@pytest.mark.parametrize("name", ["gpt2", "mistral", "qwen3", "gemma2", "gemma3_text"])
def test_hf_source_names_the_model_to_build(name):
  """The source's architecture picks the class pretrain_gpt builds (and sample.py loads)."""
  from fmjax import sources
  from fmjax.models import decoder, gpt
  from train import pretrain_gpt
  config = sources.parse(f"hf:{GOLDEN / name}").architecture(tuple(pretrain_gpt.MODELS))
  model = pretrain_gpt.MODELS[type(config)][0]
  assert model is (gpt.GPT if name == "gpt2" else decoder.Decoder)
  if name != "gpt2":
    assert config.family == name
  with pytest.raises(ValueError, match="is a DecoderConfig, not a GPTConfig"):
    sources.parse(f"hf:{GOLDEN / 'llama'}").architecture(gpt.GPTConfig)


def test_decoder_fsdp_tp_on_8_devices_equals_one_device():
  """tests/sharded_steps.py's two SGD steps with a tiny decoder (GQA, head_dim 32 != D/N, q/k
  norms) under fsdp_tp on a (2, 2, 2) mesh vs one device."""
  code = (
      "import json, sys; sys.path.insert(0, 'tests'); import sharded_steps\n"
      "from fmjax.models import decoder\n"
      "from fmjax.runtime import Runtime\n"
      "from fmjax.transformer import AttentionOptions\n"
      "c = decoder.get_config('tiny', num_layers=1, head_dim=32,\n"
      "                       attention=AttentionOptions(qk_norm=True))\n"
      "m = decoder.Decoder(c, Runtime(attention_impl='xla'))\n"
      "print(json.dumps({'one': sharded_steps.run('none', {'data': 1}, 1, model=m),\n"
      "  'tp': sharded_steps.run('fsdp_tp', {'data': 2, 'fsdp': 2, 'tensor': 2}, 8, model=m)}))\n")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  env.pop("FMJAX_CPU_DEVICES", None)
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  runs = json.loads(out.stdout.strip().splitlines()[-1])
  one, tp = runs["one"], runs["tp"]
  assert tp["wte_spec"] == "P('tensor', 'fsdp')"
  np.testing.assert_allclose(tp["losses"], one["losses"], rtol=1e-6)
  assert one["losses"][1] != one["losses"][0]
  for path, values in one["params"].items():
    np.testing.assert_allclose(tp["params"][path], values, atol=1e-6, err_msg=path)


def test_memory_plan_counts_kv_heads_and_head_width():
  from fmjax import memory
  base = dict(num_layers=2, embed_dim=64, mlp_dim=128, num_heads=4, vocab_size=256,
              seq_len=32, batch_size=8, attention_impl="chunked")
  mha = memory.Shape(**base)
  gqa = memory.Shape(**base, num_kv_heads=1)
  wide = memory.Shape(**base, num_kv_heads=1, head_dim=32)  # Gemma: N H = 128 != D
  # One kv head of 16 instead of 4: keys and values 2 x 48 elements narrower per full layer
  # (all L layers with no remat; the one rebuilt layer with remat).
  for policy, fewer in (("none", 2 * 96), ("dots_no_batch", 96)):
    count = lambda s: memory.activation_elements_per_token(s, policy)
    assert count(memory.Shape(**base, num_kv_heads=4, head_dim=16)) == count(mha)
    assert count(gqa) == pytest.approx(count(mha) - fewer)
    assert count(wide) > count(gqa)


def test_smollm2_recipe():
  """configs/gpt.py:smollm2 continues SmolLM2-135M-Instruct from the directory
  bench/make_smollm2.py writes ($FMJAX_SMOLLM2 overrides it), gently; any hf:DIR passes the
  checks."""
  import ml_collections
  from configs import gpt as recipes
  from train import checks
  config = recipes.get_config("smollm2")
  default = os.path.join(os.path.expanduser("~"), ".cache", "fmjax", "smollm2-135m-instruct")
  assert config.init_from == "hf:" + (os.environ.get("FMJAX_SMOLLM2") or default)
  t = config.train
  assert t.learning_rate == 3e-5 and t.warmup_steps > 0 and t.decay == "cosine"
  assert 256 <= config.data.seq_len <= 512 and config.data.train_path.endswith(".txt")
  config = ml_collections.ConfigDict(config.to_dict())
  config.init_from = f"hf:{GOLDEN / 'llama'}"
  checks.validate(config)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(env, data, tmp_path):
  """GPT-2's 300-id tokenizer next to the Llama's 96-row embedding: one error line, exit 2."""
  directory = tmp_path / "llama"
  shutil.copytree(GOLDEN / "llama", directory, ignore=shutil.ignore_patterns("reference.npz"))
  for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
    if (GOLDEN / "gpt2" / name).exists():
      shutil.copy(GOLDEN / "gpt2" / name, directory / name)
  proc = subprocess.run(
      [sys.executable, "-m", "train.pretrain_gpt", "--config=configs/gpt.py:tiny",
       f"--workdir={tmp_path / 'run'}", f"--config.init_from=hf:{directory}",
       f"--config.data.train_path={data / 'train.txt'}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and lines[-1].startswith("error: the tokenizer has"), proc.stderr
  assert "vocab_size=96" in lines[-1] and "Traceback" not in proc.stderr
