"""The Colab notebooks run top to bottom on CPU, as committed (outputs stripped).

Each notebook runs in its own kernel inside a scratch copy of the repository (symlinks to
every top-level entry but colab/, which is copied), so its workdirs/ are fresh each time and the checkout is untouched.
../shared beside the repository is linked too when present (the notebooks then read the
offline datasets; without them they would try the tfds catalog, so the tests skip).
06_decoder_chat runs on a tiny random Llama made here (`tiny_decoder`), passed in
FMJAX_NOTEBOOK_DECODER, instead of SmolLM2.
"""

import json
import os
import pathlib
import re
import shutil

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
NAMES = ["01_gpt_quickstart", "02_bert_pretrain_finetune", "03_huggingface", "04_sharding",
         "05_vit", "06_decoder_chat", "07_text_to_image"]


def _load(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def test_the_notebooks_are_committed_with_outputs_stripped():
  assert [p.stem for p in NOTEBOOKS] == NAMES
  for path in NOTEBOOKS:
    nb = _load(path)
    for i, cell in enumerate(nb["cells"]):
      if cell["cell_type"] == "code":
        assert cell["outputs"] == [] and cell["execution_count"] is None, (path.name, i)


def test_each_notebook_has_an_open_in_colab_badge_that_the_readme_repeats():
  readme = (ROOT / "README.md").read_text(encoding="utf-8")
  for path in NOTEBOOKS:
    first = "".join(_load(path)["cells"][0]["source"])
    link = re.search(r"\(https://colab\.research\.google\.com/github/[^)]*/colab/"
                     + re.escape(path.name) + r"\)", first)
    assert link, path.name
    assert link.group(0) in readme, f"README lacks the badge link of {path.name}"


def test_notebooks_only_call_the_library():
  """No model code in a notebook: no Flax module is defined there."""
  for path in NOTEBOOKS:
    source = "\n".join("".join(c["source"]) for c in _load(path)["cells"] if c["cell_type"] == "code")
    assert "nn.Module" not in source and "@nn.compact" not in source, path.name


@pytest.fixture
def scratch_repo(tmp_path):
  repo = tmp_path / "repo"
  repo.mkdir()
  for entry in ROOT.iterdir():
    if entry.name not in ("workdirs", ".git", ".venv", "colab"):
      (repo / entry.name).symlink_to(entry)
  # A real directory: os.getcwd() in the kernel resolves symlinks, and the notebooks find the
  # repository as the parent of their working directory.
  shutil.copytree(ROOT / "colab", repo / "colab")
  if SHARED.is_dir():
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(SHARED)
  return repo


def tiny_decoder(directory: pathlib.Path) -> pathlib.Path:
  """A tiny random-weight Llama written by fmjax.hf.save_pretrained, with the golden GPT-2's
  byte-level BPE (300 ids), SmolLM2's ChatML template and <|endoftext|> (0) as the stop id."""
  import flax.linen as nn
  import jax
  import numpy as np
  from fmjax import hf
  from fmjax.models.decoder import Decoder, DecoderConfig
  model = Decoder(DecoderConfig(vocab_size=300, max_len=256, num_layers=2, embed_dim=32,
                                mlp_dim=64, num_heads=4, num_kv_heads=2))
  shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 1), np.int32))
  rng = np.random.default_rng(0)  # random weights without compiling init
  hf.save_pretrained(model, jax.tree_util.tree_map(
      lambda s: 0.1 * rng.standard_normal(s.shape, np.float32), nn.meta.unbox(shapes)), directory)
  golden = ROOT / "tests" / "golden" / "hf" / "gpt2"
  shutil.copy(golden / "tokenizer.json", directory)
  config = _load(golden / "tokenizer_config.json")
  config["chat_template"] = (
      "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
      "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
      "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
      "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
  (directory / "tokenizer_config.json").write_text(json.dumps(config))
  (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
  return directory


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom_on_cpu(name, scratch_repo):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(scratch_repo / "colab" / f"{name}.ipynb", as_version=4)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  if name == "06_decoder_chat":
    env["FMJAX_NOTEBOOK_DECODER"] = str(tiny_decoder(scratch_repo.parent / "tiny_llama"))
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(scratch_repo / "colab")}})
  client.execute(env=env)  # a failing cell raises CellExecutionError with its traceback
  assert (scratch_repo / "workdirs").is_dir() or name == "04_sharding"  # ran here, not in ROOT
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "image/png" in o.get("data", {}) or "text/html" in o.get("data", {})]
  if name != "03_huggingface":
    assert images, f"{name} shows no plot"
