"""fmjax.hf task models: `from_pretrained(dir, task=...)` against transformers' task classes,
task heads initialised when a checkpoint lacks them, and `save_pretrained` of finetuned
classifiers, span (QA) and masked-LM models that transformers reads with the same logits.

The goldens (tests/golden/hf/bert_cls, bert_qa, bert_mlm and the bert, gpt2, vit ones of
tests/test_hf.py) are transformers' own models and outputs, written by
tests/golden/make_hf_goldens.py; only the last tests need torch (skipped without it).
"""

import json
import logging
import pathlib
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from fmjax import heads, hf, sharding, training
from fmjax.models.bert import (BertForMaskedLM, BertForQuestionAnswering,
                               BertForSequenceClassification)
from fmjax.models.gpt import GPT
from fmjax.models.vit import ViT

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "hf"
BERT_DIR, GPT2_DIR, VIT_DIR = GOLDEN / "bert", GOLDEN / "gpt2", GOLDEN / "vit"
CLS_DIR, QA_DIR, MLM_DIR = GOLDEN / "bert_cls", GOLDEN / "bert_qa", GOLDEN / "bert_mlm"
ATOL = 1e-5  # float32 vs transformers' float32 PyTorch outputs
LABELS = {"0": "negative", "1": "neutral", "2": "positive"}  # bert_cls's id2label


def reference(directory):
  return dict(np.load(directory / "reference.npz"))


def bert_inputs(ref):
  return ref["input_ids"], ref["token_type_ids"], ref["attention_mask"]


def max_diff(a, b):
  """Largest |a - b|; a vocabulary-wide `a` may be padded past b's vocabulary (vocab_multiple),
  and those padded logits must be -inf."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  if a.ndim == b.ndim == 3 and a.shape[-1] > b.shape[-1]:
    assert np.all(a[..., b.shape[-1]:] == -np.inf)
    a = a[..., :b.shape[-1]]
  return float(np.max(np.abs(a - b)))


def flat(tree):
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_trees_equal(a, b):
  a, b = flat(a), flat(b)
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k


def read_tensors(directory):
  return safetensors.numpy.load_file(directory / "model.safetensors")


def read_config(directory):
  return json.loads((directory / "config.json").read_text())


def write_model_dir(directory, config, tensors):
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(config))
  safetensors.numpy.save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
  return directory


def load_quietly(directory, **kwargs):
  """from_pretrained with warnings as errors: a task load drops other heads without one."""
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    return hf.from_pretrained(directory, **kwargs)


# --- Each task against transformers' golden logits ---------------------------------------------

def test_classification_matches_transformers():
  model, variables = load_quietly(CLS_DIR, task="classification")
  assert type(model) is BertForSequenceClassification and model.num_labels == 3  # id2label
  ref = reference(CLS_DIR)
  logits = jax.jit(model.apply)(variables, *bert_inputs(ref))
  assert logits.shape == (2, 3) and max_diff(logits, ref["logits"]) <= ATOL
  assert np.abs(ref["logits"]).max() > 0.5  # not near zero: a dropped bias would show


def test_question_answering_matches_transformers():
  model, variables = load_quietly(QA_DIR, task="question_answering")
  assert type(model) is BertForQuestionAnswering
  assert "pooler" not in variables["params"]["bert"]  # HF's QA model has none either
  ref = reference(QA_DIR)
  start, end = jax.jit(model.apply)(variables, *bert_inputs(ref))
  assert start.shape == end.shape == (2, 12)
  assert max_diff(start, ref["start_logits"]) <= ATOL
  assert max_diff(end, ref["end_logits"]) <= ATOL
  assert min(np.abs(ref["start_logits"]).max(), np.abs(ref["end_logits"]).max()) > 2


def test_masked_lm_matches_transformers():
  model, variables = load_quietly(MLM_DIR, task="masked_lm")
  assert type(model) is BertForMaskedLM and "pooler" not in variables["params"]["bert"]
  ref = reference(MLM_DIR)
  apply = jax.jit(model.apply)
  logits = apply(variables, *bert_inputs(ref))
  # The vocabulary is padded to 256 rows (vocab_multiple 128), the padded ids masked to -inf.
  assert logits.shape == (2, 12, 256) and np.all(np.asarray(logits)[..., 200:] == -np.inf)
  assert max_diff(logits[..., :200], ref["logits"]) <= ATOL
  # Only some positions: the same rows, gathered before the D x V projection.
  positions = np.array([[1, 4, 4], [0, 7, 2]], np.int32)
  some = apply(variables, *bert_inputs(ref), positions)
  expected = np.take_along_axis(ref["logits"], positions[..., None], axis=1)
  assert some.shape == (2, 3, 256) and max_diff(some[..., :200], expected) <= ATOL


@pytest.mark.parametrize("directory,task", [(CLS_DIR, "classification"),
                                            (QA_DIR, "question_answering"),
                                            (MLM_DIR, "masked_lm")])
def test_without_a_task_the_checkpoints_class_is_built(directory, task):
  """task=None: the class transformers saved (config.json's architectures), told by the heads."""
  model, variables = load_quietly(directory)
  assert type(model).__name__ == read_config(directory)["architectures"][0]
  with_task, task_variables = hf.from_pretrained(directory, task=task)
  assert model == with_task
  assert_trees_equal(variables, task_variables)


def test_masked_lm_of_a_pretraining_checkpoint_is_its_mlm_head(caplog):
  """BertForPreTraining's prediction logits are BertForMaskedLM's on the same weights; the
  pooler and next-sentence head are left out (logged, not warned)."""
  with caplog.at_level(logging.INFO, logger="fmjax.hf.weights"):
    model, variables = load_quietly(BERT_DIR, task="masked_lm")
  assert type(model) is BertForMaskedLM
  assert "task='masked_lm' leaves out 4 tensors" in caplog.text
  assert "cls.seq_relationship.weight" in caplog.text and "bert.pooler.dense.weight" in caplog.text
  ref = reference(BERT_DIR)
  logits = jax.jit(model.apply)(variables, *bert_inputs(ref))
  assert max_diff(logits, ref["prediction_logits"]) <= ATOL


def test_causal_lm_matches_transformers():
  model, variables = load_quietly(GPT2_DIR, task="causal_lm")
  assert type(model) is GPT
  ref = reference(GPT2_DIR)
  logits = jax.jit(model.apply)(variables, ref["input_ids"])
  vocab = model.config.vocab_size  # the logits are padded to vocab_multiple, masked beyond it
  assert max_diff(logits[..., :vocab], ref["logits"]) <= ATOL


def test_image_classification_matches_transformers_and_inits_a_missing_head(tmp_path, caplog):
  model, variables = load_quietly(VIT_DIR, task="image_classification")
  assert type(model) is ViT and model.config.num_classes == 5
  ref = reference(VIT_DIR)
  assert max_diff(jax.jit(model.apply)(variables, ref["images"]), ref["logits"]) <= ATOL
  # A ViTModel-like checkpoint (no classifier) with 4 labels: the head is fmjax ViT's own,
  # zero-initialised (the paper's fine-tuning head), so the logits are exactly 0.
  tensors = {k: v for k, v in read_tensors(VIT_DIR).items() if not k.startswith("classifier.")}
  d = write_model_dir(tmp_path / "vit_model", {**read_config(VIT_DIR),
                                               "architectures": ["ViTModel"]}, tensors)
  with caplog.at_level(logging.WARNING, logger="fmjax.hf.weights"):
    model, variables = load_quietly(d, task="image_classification", num_labels=4)
  assert "no ViTForImageClassification head (classifier.*): initialised ['head/kernel', " \
         "'head/bias'] with seed 0" in caplog.text
  assert model.config.num_classes == 4 and variables["params"]["head"]["kernel"].shape == (32, 4)
  np.testing.assert_array_equal(jax.jit(model.apply)(variables, ref["images"]), np.zeros((2, 4)))


# --- A head the checkpoint lacks: initialised, trained, exported -------------------------------

def examples():
  """Eight hand-made sentence pairs of the golden BERT's vocabulary: label 1 when token 50
  is in the second segment, 0 when token 60 is; the rest random, the last two rows padded."""
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 200, size=(8, 10)).astype(np.int32)
  ids[ids == 50], ids[ids == 60] = 51, 61
  ids[:, 0], ids[:, 4], ids[:, -1] = 2, 3, 3  # [CLS] a [SEP] b [SEP]
  labels = np.array([1, 0, 1, 0, 1, 0, 1, 0], np.int32)
  ids[np.arange(8), 6] = np.where(labels == 1, 50, 60)
  types = np.zeros_like(ids)
  types[:, 5:] = 1
  mask = np.ones_like(ids)
  mask[6:, 8:], ids[6:, 8:], types[6:, 8:] = 0, 0, 0
  ids[6:, 7] = 3
  return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "label": labels}


def train(model, variables, batch, steps):
  """A few AdamW steps of fmjax.training on one batch; returns (params, losses)."""
  tx, _ = training.make_optimizer(learning_rate=1e-2, total_steps=steps, warmup_steps=0,
                                  decay="constant", weight_decay=0.0)

  def loss_fn(params, batch, rng, train):
    logits = model.apply({"params": params}, batch["input_ids"], batch["token_type_ids"],
                         batch["attention_mask"], train=train, rngs={"dropout": rng})
    return heads.classification_loss(logits, batch["label"])

  step = jax.jit(training.make_train_step(loss_fn, tx))
  params = variables["params"]
  state = training.TrainingState(step=jnp.zeros((), jnp.int32), params=params,
                                 opt_state=tx.init(params))
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch, jax.random.key(1))
    losses.append(float(metrics["train/loss"]))
  return {"params": state.params}, losses


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The golden BertForPreTraining as a 2-label classifier: new head, trained, exported."""
  model, variables = hf.from_pretrained(BERT_DIR, task="classification", num_labels=2, seed=3)
  fresh = jax.tree_util.tree_map(np.asarray, variables)
  variables, losses = train(model, variables, examples(), steps=12)
  out = tmp_path_factory.mktemp("trained") / "export"
  hf.save_pretrained(model, variables, out, id2label=["negative", "positive"])
  return model, fresh, variables, losses, out


def test_classifier_on_a_pretrained_encoder_initialises_its_head(caplog):
  with caplog.at_level(logging.INFO, logger="fmjax.hf.weights"):
    model, variables = load_quietly(BERT_DIR, task="classification", num_labels=2, seed=3)
  assert type(model) is BertForSequenceClassification and model.num_labels == 2
  assert ("has no BertForSequenceClassification head (classifier.*): initialised "
          "['classifier/dense/kernel', 'classifier/dense/bias'] with seed 3") in caplog.text
  assert "leaves out 7 tensors" in caplog.text  # cls.predictions.* (5) + cls.seq_relationship.*
  # The encoder is the checkpoint's, pooler included: its pooled output is transformers'.
  _, pretraining = hf.from_pretrained(BERT_DIR)
  assert_trees_equal(variables["params"]["bert"], pretraining["params"]["bert"])
  head = variables["params"]["classifier"]["dense"]
  assert head["kernel"].shape == (32, 2) and np.abs(head["kernel"]).max() > 0
  np.testing.assert_array_equal(head["bias"], np.zeros(2))
  # Seeded: the same seed gives the same head, another seed another one.
  _, again = hf.from_pretrained(BERT_DIR, task="classification", num_labels=2, seed=3)
  _, other = hf.from_pretrained(BERT_DIR, task="classification", num_labels=2, seed=4)
  np.testing.assert_array_equal(again["params"]["classifier"]["dense"]["kernel"], head["kernel"])
  assert not np.array_equal(other["params"]["classifier"]["dense"]["kernel"], head["kernel"])
  # read_weights returns the same tree, as numpy arrays.
  config, params = hf.read_weights(BERT_DIR, task="classification", num_labels=2, seed=3)
  assert config == model.config
  assert_trees_equal(jax.tree_util.tree_map(jnp.asarray, params), variables["params"])


def test_initialised_head_trains_and_exports_as_transformers_classifier(trained):
  model, fresh, variables, losses, out = trained
  assert losses[-1] < 0.2 * losses[0], losses  # the new head (and encoder) learn the rule
  assert not np.array_equal(fresh["params"]["classifier"]["dense"]["kernel"],
                            variables["params"]["classifier"]["dense"]["kernel"])
  config = read_config(out)
  assert config["architectures"] == ["BertForSequenceClassification"]
  assert config["model_type"] == "bert" and config["num_labels"] == 2
  assert config["id2label"] == {"0": "negative", "1": "positive"}
  assert config["label2id"] == {"negative": 0, "positive": 1} and "problem_type" not in config
  # HF BertForSequenceClassification's tensor names, as in the golden saved by transformers.
  ours = read_tensors(out)
  assert ours.keys() == read_tensors(CLS_DIR).keys()
  np.testing.assert_array_equal(ours["classifier.weight"],
                                variables["params"]["classifier"]["dense"]["kernel"].T)


def test_export_reimports_bit_exact(trained):
  model, _, variables, _, out = trained
  model2, variables2 = load_quietly(out, task="classification")
  assert model2 == model
  assert_trees_equal(variables2, variables)
  ids, types, mask = (examples()[k] for k in ("input_ids", "token_type_ids", "attention_mask"))
  apply = jax.jit(model.apply)  # model2 == model: one function of the variables
  np.testing.assert_array_equal(apply(variables2, ids, types, mask),
                                apply(variables, ids, types, mask))


@pytest.mark.parametrize("directory,task", [(CLS_DIR, "classification"),
                                            (QA_DIR, "question_answering"),
                                            (MLM_DIR, "masked_lm")])
def test_export_of_unchanged_model_is_the_checkpoint(directory, task, tmp_path):
  """Tensor for tensor what transformers saved, so transformers reads it with the golden
  logits; and fmjax reads it back with them too."""
  model, variables = hf.from_pretrained(directory, task=task)
  hf.save_pretrained(model, variables, tmp_path,
                     **({"id2label": LABELS} if task == "classification" else {}))
  theirs, ours = read_tensors(directory), read_tensors(tmp_path)
  assert ours.keys() == theirs.keys()
  for k in theirs:
    assert ours[k].dtype == theirs[k].dtype and np.array_equal(ours[k], theirs[k]), k
  config, original = read_config(tmp_path), read_config(directory)
  assert config["architectures"] == original["architectures"]
  if task == "classification":
    assert config["id2label"] == original["id2label"] == LABELS
  model2, variables2 = hf.from_pretrained(tmp_path, task=task)
  assert model2 == model
  assert_trees_equal(variables2, variables)


def test_regression_head_exports_with_problem_type(tmp_path):
  model, variables = load_quietly(BERT_DIR, task="classification", num_labels=1)
  ref = reference(BERT_DIR)
  assert jax.eval_shape(model.apply, variables, *bert_inputs(ref)).shape == (2, 1)
  hf.save_pretrained(model, variables, tmp_path)
  config = read_config(tmp_path)
  assert (config["num_labels"], config["problem_type"]) == (1, "regression")
  assert config["id2label"] == {"0": "LABEL_0"}
  model2, variables2 = load_quietly(tmp_path)  # task None: the checkpoint's classifier
  assert model2 == model
  assert_trees_equal(variables2, variables)


def test_fresh_head_is_placed_on_the_mesh():
  mesh = sharding.make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
  model, variables = hf.from_pretrained(BERT_DIR, task="question_answering", mesh=mesh)
  kernel = variables["params"]["qa_outputs"]["dense"]["kernel"]
  assert kernel.shape == (32, 2) and kernel.sharding.mesh.shape == mesh.shape
  _, plain = hf.from_pretrained(BERT_DIR, task="question_answering")
  assert_trees_equal(variables, plain)


# --- Errors: one clear line each ---------------------------------------------------------------

def one_line_error(match, fn, *args, **kwargs):
  with pytest.raises(ValueError, match=match) as e:
    fn(*args, **kwargs)
  assert "\n" not in str(e.value)


def test_errors(tmp_path):
  one_line_error(r"model.safetensors: head tensor 'classifier.weight' has shape \(3, 16\), but "
                 r"num_labels=5 \(the argument\) needs \(5, 16\); the checkpoint's head has 3 "
                 r"labels: pass num_labels=3, or a directory without classifier.\* for a new head",
                 hf.from_pretrained, CLS_DIR, task="classification", num_labels=5)
  d = shutil.copytree(CLS_DIR, tmp_path / "two_names")
  (d / "config.json").write_text(json.dumps({**read_config(CLS_DIR),
                                             "id2label": {"0": "no", "1": "yes"}}))
  one_line_error(r"'classifier.weight' has shape \(3, 16\), but num_labels=2 \(config.json's "
                 r"id2label\) needs \(2, 16\)", hf.read_weights, d)
  one_line_error(r"unknown task='summarization'; choose one of \['causal_lm', 'masked_lm', "
                 r"'classification', 'question_answering', 'image_classification'\], or "
                 r"task=None", hf.from_pretrained, BERT_DIR, task="summarization")
  one_line_error(r"task='classification' needs a bert checkpoint, but .*gpt2/config.json has "
                 r"model_type='gpt2', which serves tasks \['causal_lm'\]",
                 hf.from_pretrained, GPT2_DIR, task="classification")
  one_line_error(r"task='causal_lm' needs a gpt2 or llama or .* or gemma3_text checkpoint, but "
                 r".*model_type='vit', which "
                 r"serves tasks \['image_classification'\]",
                 hf.from_pretrained, VIT_DIR, task="causal_lm")
  one_line_error(r"num_labels=3 sizes a classifier's head, but a BertForQuestionAnswering has "
                 r"no labels; pass it with task in \['classification', 'image_classification'\]",
                 hf.from_pretrained, BERT_DIR, task="question_answering", num_labels=3)
  one_line_error(r"num_labels=0; give a positive int", hf.from_pretrained, BERT_DIR,
                 task="classification", num_labels=0)
  tensors = {k: v for k, v in read_tensors(CLS_DIR).items() if k != "classifier.bias"}
  d = write_model_dir(tmp_path / "half_head", read_config(CLS_DIR), tensors)
  one_line_error(r"has no tensor 'classifier.bias'", hf.from_pretrained, d,
                 task="classification")
  model, variables = hf.from_pretrained(CLS_DIR)
  one_line_error(r"id2label=\['a', 'b'\] does not name labels 0..2 of this model's "
                 r"num_labels=3", hf.save_pretrained, model, variables, tmp_path / "x",
                 id2label=["a", "b"])
  qa, qa_variables = hf.from_pretrained(QA_DIR)
  one_line_error(r"a BertForQuestionAnswering has none, so leave id2label out",
                 hf.save_pretrained, qa, qa_variables, tmp_path / "y", id2label=["a"])


# --- With transformers installed: it reads fmjax's exports with fmjax's logits ----------------

def _has_transformers():
  try:
    import torch, transformers  # noqa: F401  pylint: disable=g-import-not-at-top,multiple-imports
  except ImportError:
    return False
  return True


@pytest.mark.skipif(not _has_transformers(), reason="needs torch and transformers")
def test_transformers_reads_fmjax_task_exports(trained, tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  def load(cls, directory):
    m, info = getattr(transformers, cls).from_pretrained(directory, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    return m.eval()

  ref = reference(BERT_DIR)
  args = {k: torch.tensor(ref[k], dtype=torch.long)
          for k in ("input_ids", "token_type_ids", "attention_mask")}
  # The trained classifier (a fresh head on the golden encoder).
  model, _, variables, _, out = trained
  with torch.no_grad():
    theirs = load("AutoModelForSequenceClassification", out)
    assert type(theirs).__name__ == "BertForSequenceClassification"
    assert theirs.config.id2label == {0: "negative", 1: "positive"}
    assert max_diff(jax.jit(model.apply)(variables, *bert_inputs(ref)),
                    theirs(**args).logits) <= ATOL
  # A regression head, a span head and the MLM head, each with random (seeded) weights.
  for task, cls in [("classification", "BertForSequenceClassification"),
                    ("question_answering", "BertForQuestionAnswering"),
                    ("masked_lm", "BertForMaskedLM")]:
    model, variables = hf.from_pretrained(BERT_DIR, task=task, seed=5,
                                          **({"num_labels": 1} if task == "classification"
                                             else {}))
    hf.save_pretrained(model, variables, tmp_path / task)
    ours = jax.jit(model.apply)(variables, *bert_inputs(ref))
    with torch.no_grad():
      theirs = load(cls, tmp_path / task)(**args)
    if task == "question_answering":
      assert max_diff(ours[0], theirs.start_logits) <= ATOL
      assert max_diff(ours[1], theirs.end_logits) <= ATOL
    else:
      assert max_diff(ours, theirs.logits) <= ATOL
    if task == "classification":
      assert theirs.logits.shape == (2, 1)
      assert load(cls, tmp_path / task).config.problem_type == "regression"
