"""Issue 15's traps, tried as a user would: import fmjax, build things, call them.

Each trap either works now or raises one clear error that names the argument and its value.
The slow proofs live beside their subject and are not repeated here: the tiny GPT recipe
trained under fsdp_tp on a (2, 2, 2) mesh equals one device (tests/test_vocab.py), a resume
with another remat policy is bit-identical (tests/test_runtime.py), --config.train.steps on a
finetune program (tests/test_runtime.py), the exported classifier read by transformers
(tests/test_hf_tasks.py).
"""

import logging
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fmjax
from fmjax import Runtime, checkpoint, heads, hf, sharding
from fmjax.models import gpt

REPO = pathlib.Path(__file__).resolve().parents[1]
BERT_DIR = REPO / "tests" / "golden" / "hf" / "bert"
CHARS = 67  # the tiny recipe's character vocabulary: tiny_shakespeare's 65 characters + 2


@pytest.fixture(scope="module")
def tiny():
  """The tiny GPT and its variables, initialised straight into a one-device mesh by rule-set
  name (one compiled init serves the whole file)."""
  model = fmjax.GPT(gpt.get_config("tiny"))
  mesh = fmjax.make_mesh({}, devices=jax.devices()[:1])
  variables, shardings = fmjax.sharded_init(
      lambda key: model.init(key, jnp.zeros((1, 8), jnp.int32)), mesh, "fsdp_tp",
      jax.random.key(0))
  return model, variables, shardings, mesh


def one_line(error) -> str:
  message = str(error.value)
  assert "\n" not in message and "--config" not in message, message
  return message


# --- the model refuses what it cannot compute -----------------------------------------------

def test_a_sequence_longer_than_max_len_is_refused_not_nan(tiny):
  model, variables, _, _ = tiny  # learned positions, max_len 64
  assert np.isfinite(jax.jit(model.apply)(variables, jnp.zeros((2, 64), jnp.int32))).all()
  with pytest.raises(ValueError) as e:  # before: NaN logits past the position table
    jax.jit(model.apply)(variables, jnp.zeros((2, 65), jnp.int32))
  assert "length 65" in one_line(e) and "max_len=64" in one_line(e)


def test_heads_that_do_not_divide_the_width_are_refused_at_construction():
  with pytest.raises(ValueError) as e:
    gpt.get_config("tiny", num_heads=5)  # 64 / 5: before, a narrower model without a word
  assert one_line(e).startswith("GPTConfig.embed_dim=64 is not divisible by num_heads=5")


def test_an_unknown_position_lists_the_choices():
  with pytest.raises(ValueError) as e:
    gpt.get_config("tiny", position="rotary")  # before: trained with no positions at all
  assert one_line(e).startswith("GPTConfig.position='rotary' is not one of ['learned', 'rope']")


@pytest.mark.parametrize("fields,named", [
    ({"dtype": "bf16"}, "Runtime.dtype='bf16'"),
    ({"attention_impl": "flash"}, "Runtime.attention_impl='flash'"),
    ({"remat_policy": "everything"}, "Runtime.remat_policy='everything'"),
])
def test_runtime_names_the_bad_field(fields, named):
  with pytest.raises(ValueError) as e:
    Runtime(**fields)
  assert one_line(e).startswith(named)


# --- every rule set runs with any tokenizer -------------------------------------------------

@pytest.mark.parametrize("name,vocab", [("tiny", 65), ("tiny", CHARS), ("gpt2_medium", 50257)])
def test_a_padded_vocabulary_passes_the_fsdp_tp_check(name, vocab):
  """Before: "dimension 67 is split over mesh axes ('tensor',)". The run itself, 8 simulated
  devices against one, is tests/test_vocab.py's test_tiny_recipe_under_fsdp_tp_equals_one_device."""
  config = gpt.get_config(name, vocab_size=vocab)
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  abstract = jax.eval_shape(fmjax.GPT(config).init, jax.random.key(0), tokens)
  mesh = jax.sharding.AbstractMesh((2, 2, 2), sharding.MESH_AXES)
  sharding.check_divisible(abstract, mesh, "fsdp_tp")  # no error
  rows = abstract["params"]["wte"]["embedding"].value.shape[0]
  assert rows % 128 == 0 and rows - 128 < vocab <= rows  # padded to the next multiple of 128


def test_sharded_init_takes_a_rule_set_name(tiny):
  _, variables, shardings, mesh = tiny  # the fixture passed "fsdp_tp" (from_pretrained does too)
  assert variables["params"]["wte"]["embedding"].shape == (256, 64)
  assert shardings["params"]["wte"]["embedding"].mesh.shape == mesh.shape
  with pytest.raises(ValueError) as e:
    fmjax.sharded_init(lambda key: {}, mesh, "zero3", jax.random.key(0))
  assert "'zero3'" in one_line(e) and "'fsdp_tp'" in one_line(e)


# --- training: the steps asked for, resuming under another runtime --------------------------

def test_explicit_steps_win_over_a_finetune_variants_epochs(caplog, monkeypatch):
  monkeypatch.chdir(REPO)
  from configs import finetune as finetune_configs
  from fmjax import trainer
  config = finetune_configs.get_config("sst2")  # trains by epochs: 1 epoch of SST-2
  config.train.steps = 500
  with caplog.at_level(logging.WARNING, logger="fmjax"):
    schedule = trainer.resolve_schedule(config.train, num_examples=67349)
  assert schedule.steps == 500  # before: the epoch's steps ran instead
  assert "train.epochs=1 is ignored" in caplog.text
  config.train.steps, config.train.epochs = 0, 0.0
  with pytest.raises(ValueError) as e:
    trainer.resolve_schedule(config.train, num_examples=67349)
  assert one_line(e).startswith("train.steps=0 and train.epochs=0")


def test_a_checkpoint_resumes_under_another_kernel_and_remat_policy(tiny, tmp_path):
  """The run-time choices are not the model: its signature, which a resume compares, is the
  architecture alone, and the same weights compute the same function under both."""
  _, variables, _, _ = tiny
  config = gpt.get_config("tiny")
  saved_as = fmjax.GPT(config, runtime=Runtime(attention_impl="xla", remat_policy="none"))
  resumed_as = fmjax.GPT(config, runtime=Runtime(attention_impl="chunked", remat_policy="full"))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, config.vocab_size)
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1, async_save=False)
  ckpt.save(1, {"w": np.zeros(2)}, {"model": checkpoint.model_signature(saved_as.config)},
            force=True)
  ckpt.check_compatible(checkpoint.model_signature(resumed_as.config))  # accepted
  with pytest.raises(checkpoint.CheckpointMismatchError) as e:  # another architecture is not
    ckpt.check_compatible(checkpoint.model_signature(gpt.get_config("tiny", num_heads=2)))
  assert "num_heads: checkpoint 4 vs config 2" in one_line(e)
  ckpt.close()
  np.testing.assert_allclose(jax.jit(resumed_as.apply)(variables, tokens),
                             jax.jit(saved_as.apply)(variables, tokens), rtol=1e-4, atol=1e-4)


# --- Hugging Face: task models, export, batch tokenization ----------------------------------

def test_a_bert_directory_gives_a_classifier_that_exports(tmp_path):
  model, variables = hf.from_pretrained(BERT_DIR, task="classification", num_labels=2)
  assert isinstance(model, fmjax.BertForSequenceClassification)
  load_tokenizer = getattr(hf, "tokenizer_from_pretrained", None) or hf.load_tokenizer
  batch = load_tokenizer(BERT_DIR)(["a short one", "and a somewhat longer second sentence"])
  logits = model.apply(variables, batch["input_ids"], attention_mask=batch["attention_mask"])
  assert logits.shape == (2, 2)
  hf.save_pretrained(model, variables, tmp_path / "export")  # before: refused
  again, reread = hf.from_pretrained(tmp_path / "export")
  assert isinstance(again, fmjax.BertForSequenceClassification) and again.num_labels == 2
  jax.tree_util.tree_map(np.testing.assert_array_equal, reread, variables)
  np.testing.assert_array_equal(
      again.apply(reread, batch["input_ids"], attention_mask=batch["attention_mask"]), logits)


def test_the_tokenizer_call_adds_specials_and_pads_with_masks():
  load_tokenizer = getattr(hf, "tokenizer_from_pretrained", None) or hf.load_tokenizer
  tok = load_tokenizer(BERT_DIR)
  cls, sep, pad = (tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
  out = tok(["hello", "hello world again"])
  ids, mask = out["input_ids"], out["attention_mask"]
  assert ids.shape == mask.shape and ids.dtype == np.int32
  lengths = mask.sum(1)
  assert lengths[0] < lengths[1] == ids.shape[1]  # padded to the longest row
  for row, n in zip(ids, lengths):
    assert row[0] == cls and row[n - 1] == sep and (row[n:] == pad).all()
  np.testing.assert_array_equal(mask, np.arange(ids.shape[1]) < lengths[:, None])
  pair = tok(["hello"], ["world"])
  n = int(pair["attention_mask"][0].sum())
  assert list(pair["input_ids"][0, :n]).count(sep) == 2
  assert pair["token_type_ids"][0, n - 1] == 1 and pair["token_type_ids"][0, 0] == 0


# --- names and imports ----------------------------------------------------------------------

def test_import_fmjax_leaves_logging_to_the_user():
  code = ("import logging, fmjax\n"
          "logging.basicConfig(level=logging.INFO, format='mine: %(message)s')\n"
          "logging.getLogger('app').info('configured')\n")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120, check=True)
  assert "mine: configured" in out.stderr.splitlines()


def test_library_errors_name_the_argument_not_a_flag():
  from fmjax import trainer
  from fmjax.errors import ArgumentError
  with pytest.raises(ArgumentError) as e:  # before: "config.train.batch_size=8 ... config.mesh"
    trainer.check_batch_size(8, 1, jax.sharding.AbstractMesh((3, 1, 1), sharding.MESH_AXES))
  assert one_line(e).startswith("batch_size=8 does not split evenly over the 3 batch shards")
  assert "config." not in one_line(e)
  assert (e.value.function, e.value.argument) == ("check_batch_size", "batch_size")


def test_the_causal_lm_loss_is_in_fmjax():
  logits = jnp.log(jnp.array([[[1.0, 2.0, 1.0], [1.0, 1.0, 2.0]]]))  # p(target) = 1/2 each
  loss, metrics = heads.causal_lm_loss(logits, jnp.array([[1, 2]]))
  np.testing.assert_allclose(loss, np.log(2), rtol=1e-6)
  assert float(metrics["accuracy"]) == 1.0


def test_tests_without_the_shared_data_stop_with_where_it_must_be(tmp_path):
  """Without ../shared/data beside the repo the suite stops at once, saying where the data
  must be, instead of skipping the tests that read it."""
  repo = tmp_path / "repo"
  (repo / "tests").mkdir(parents=True)
  shutil.copy(pathlib.Path(__file__).with_name("conftest.py"), repo / "tests" / "conftest.py")
  (repo / "tests" / "test_one.py").write_text("def test_one():\n  assert True\n")
  run = lambda: subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                "tests"], cwd=repo, capture_output=True, text=True, timeout=120)
  proc = run()
  assert proc.returncode == 4, proc.stdout + proc.stderr
  assert f"{tmp_path / 'shared' / 'data'} is missing" in proc.stdout + proc.stderr
  assert "../shared/data" in proc.stdout + proc.stderr
  (tmp_path / "shared" / "data").mkdir(parents=True)
  proc = run()
  assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout + proc.stderr
