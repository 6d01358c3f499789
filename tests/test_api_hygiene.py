"""The library as other code meets it: what `import fmjax` loads, logging left to the user,
imports pointing inward without cycles, mesh axis names in one module, rule-set names
accepted wherever rules are, the LM loss in fmjax/, and errors that name arguments."""

import ast
import json
import os
import pathlib
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fmjax import heads, sharding
from fmjax.errors import ArgumentError
from fmjax.models import gpt

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEAVY = ("orbax", "tensorflow_datasets", "tensorflow", "tensorboardX", "matplotlib",
         "sentencepiece", "safetensors", "tokenizers", "torch", "transformers", "grain")


def _python(code: str) -> dict:
  """Runs `code` in a fresh interpreter at the repository root; returns its JSON output."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  return json.loads(run.stdout.strip().splitlines()[-1])


# --- What `import fmjax` loads, and logging ------------------------------------------------

def test_import_fmjax_loads_no_heavy_optional_part_and_leaves_logging_to_the_user():
  out = _python(f"""
import io, json, logging, sys
import fmjax
heavy = {HEAVY!r}
loaded = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
root_handlers = len(logging.root.handlers)
fmjax_handlers = len(logging.getLogger("fmjax").handlers)
stream = io.StringIO()
logging.basicConfig(level=logging.INFO, stream=stream, format="%(name)s|%(message)s")
logging.getLogger("user").info("hello")
logging.getLogger("fmjax").info("from fmjax")
# The lazy parts load on first use, and only then.
tokenizer = fmjax.data.CharTokenizer.from_text("abc")
after_data = sorted(m for m in ("tensorflow_datasets", "orbax") if m in sys.modules)
fmjax.checkpoint.flatten_params
print(json.dumps(dict(loaded=loaded, root_handlers=root_handlers,
                      fmjax_handlers=fmjax_handlers, logged=stream.getvalue(),
                      vocab=tokenizer.vocab_size, after_data=after_data,
                      orbax="orbax" in sys.modules, gpt=fmjax.GPT.__module__)))
""")
  assert out["loaded"] == []
  assert out["root_handlers"] == 0 and out["fmjax_handlers"] == 0
  assert out["logged"] == "user|hello\nfmjax|from fmjax\n"  # basicConfig took effect
  assert out["vocab"] == 5 and out["after_data"] == []  # 3 characters + EOS + PAD, no tfds
  assert out["orbax"] is True  # fmjax.checkpoint did load orbax: the check above can fail
  assert out["gpt"] == "fmjax.models.gpt"


def test_lazy_attributes_resolve_to_the_defining_modules():
  import fmjax
  from fmjax import data as fdata
  from fmjax.data import tokenizers
  assert fdata.CharTokenizer is tokenizers.CharTokenizer
  assert fdata.load_tokenizer is tokenizers.load_tokenizer
  from fmjax.data import glue  # a submodule that the package names nowhere
  assert fdata.glue is glue
  assert "checkpoint" in dir(fmjax) and "CharTokenizer" in dir(fdata)
  for module, name in ((fmjax, "no_such_thing"), (fdata, "NoSuchTokenizer")):
    with pytest.raises(AttributeError, match=repr(name)):
      getattr(module, name)


# --- The import graph -------------------------------------------------------------------------

def _modules(package: pathlib.Path) -> dict[str, pathlib.Path]:
  names = {}
  for path in package.rglob("*.py"):
    parts = path.relative_to(package.parent).with_suffix("").parts
    names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return names


def _is_type_checking(node) -> bool:
  test = node.test
  return isinstance(node, ast.If) and (getattr(test, "id", None) == "TYPE_CHECKING"
                                       or getattr(test, "attr", None) == "TYPE_CHECKING")


def _imports(source: str, name: str, is_package: bool, known) -> list[tuple[str, bool]]:
  """(imported module, at module level?) for each import statement of one module.

  `from a import b` counts as importing a.b when that is a module, else a; the implicit
  import of a module's parent packages is not an edge. Imports under `if TYPE_CHECKING:` are
  not run and not counted.
  """
  found = []

  def visit(node, in_function):
    if isinstance(node, ast.If) and _is_type_checking(node):
      return
    if isinstance(node, ast.Import):
      found.extend((alias.name, not in_function) for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        package = (name if is_package else name.rpartition(".")[0]).split(".")
        base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
      else:
        base = node.module
      for alias in node.names:
        full = f"{base}.{alias.name}"
        found.append((full if full in known else base, not in_function))
    inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
    for child in ast.iter_child_nodes(node):
      visit(child, inner)

  visit(ast.parse(source), False)
  return found


def _graph():
  """{module: {(imported module, at module level?)}} for every module under fmjax/."""
  modules = _modules(ROOT / "fmjax")
  return {name: set(_imports(path.read_text(encoding="utf-8"), name,
                             path.name == "__init__.py", modules))
          for name, path in modules.items()}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (or a self-import)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def connect(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in edges.get(v, ()):
      if w not in index:
        connect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1 or v in edges.get(v, ()):
        out.append(sorted(component))

  for v in sorted(edges):
    if v not in index:
      connect(v)
  return out


def test_cycle_finder_finds_a_cycle():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert _cycles({"a": {"b"}, "b": set()}) == []


def test_import_parser_sees_module_and_function_level_imports():
  source = ("import fmjax.layers\nfrom fmjax import sharding, GPT\nfrom . import heads\n"
            "def f():\n  from fmjax.data import tokenizers\n  import train.common\n"
            "if TYPE_CHECKING:\n  import fmjax.hf\n")
  known = {"fmjax", "fmjax.layers", "fmjax.sharding", "fmjax.heads", "fmjax.data",
           "fmjax.data.tokenizers"}
  assert sorted(_imports(source, "fmjax.x", False, known)) == [
      ("fmjax", True), ("fmjax.data.tokenizers", False), ("fmjax.heads", True),
      ("fmjax.layers", True), ("fmjax.sharding", True), ("train.common", False)]
  graph = _graph()  # and on the real tree, edges we know exist
  assert ("fmjax.data.tokenizers", True) in graph["fmjax.hf.tokenizer"]
  assert ("fmjax.hf", False) in graph["fmjax.sources"]  # hf only when init_from asks for it


def test_no_import_cycles_and_imports_point_inward():
  graph = _graph()
  inside = lambda module_level_only: {
      m: {t for t, top in edges if t in graph and (top or not module_level_only)}
      for m, edges in graph.items()}
  assert _cycles(inside(True)) == [], "import cycle among module-level imports"
  assert _cycles(inside(False)) == [], "import cycle counting imports inside functions"
  outward = sorted((m, t) for m, edges in graph.items() for t, _ in edges
                   if t.split(".")[0] in ("train", "configs", "tests", "bench", "colab"))
  assert outward == [], "fmjax/ imports the programs, recipes or tests"
  # The shared maths never reach for models, data, checkpoints, interop or the loop.
  shared = ("fmjax.attention", "fmjax.layers", "fmjax.transformer", "fmjax.sharding",
            "fmjax.errors")
  upward = sorted((m, t) for m in shared for t, _ in graph[m]
                  if t.startswith(("fmjax.models", "fmjax.data", "fmjax.hf", "fmjax.trainer",
                                   "fmjax.checkpoint", "fmjax.heads", "fmjax.training")))
  assert upward == []


# --- Mesh axis names live in fmjax/sharding.py ----------------------------------------------

MESH_NAMES = {*sharding.MESH_AXES, "processes"}


def _mesh_axis_uses(source: str) -> list[str]:
  """Code that names a mesh axis: mesh.shape["data"], sizes.get("fsdp"), {"data": 1},
  P("tensor"), Mesh(..., ("data", ...)); other strings that happen to be "data" are fine."""
  found = []
  meshy = lambda node: ("mesh" in ast.unparse(node).lower()
                        or (isinstance(node, ast.Attribute) and node.attr == "shape"))
  is_axis = lambda node: isinstance(node, ast.Constant) and node.value in MESH_NAMES
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Subscript) and meshy(node.value) and is_axis(node.slice):
      found.append(ast.unparse(node))
    elif isinstance(node, ast.Dict) and node.keys and all(is_axis(k) for k in node.keys):
      found.append(ast.unparse(node))
    elif isinstance(node, ast.Call):
      func = ast.unparse(node.func)
      args = [a for arg in node.args for a in ast.walk(arg)]
      if ((func.endswith(".get") and meshy(node.func.value) and node.args and is_axis(node.args[0]))
          or (func.split(".")[-1] in ("P", "PartitionSpec", "Mesh", "AbstractMesh")
              and any(is_axis(a) for a in args))):
        found.append(ast.unparse(node))
  return found


def test_mesh_axis_finder_finds_the_patterns():
  source = ('a = mesh.shape["data"] * mesh_shape.get("fsdp", 1)\nm = make_mesh({"data": 1})\n'
            's = P("tensor")\nq = Mesh(d, ("processes", "local"))\n'
            'ok = meta["data"], d.get("data"), {"data": 1, "model": 2}\n')
  assert len(_mesh_axis_uses(source)) == 5


def test_mesh_axis_names_only_in_sharding_py():
  uses = {}
  for folder in ("fmjax", "train"):
    for path in sorted((ROOT / folder).rglob("*.py")):
      if path != ROOT / "fmjax" / "sharding.py":
        found = _mesh_axis_uses(path.read_text(encoding="utf-8"))
        if found:
          uses[str(path.relative_to(ROOT))] = found
  assert uses == {}


def test_batch_and_tensor_shards():
  assert sharding.batch_shards({"data": 2, "fsdp": 4, "tensor": 2}) == 8
  assert sharding.batch_shards({"tensor": 4}) == 1 and sharding.tensor_shards({"tensor": 4}) == 4
  mesh = jax.sharding.AbstractMesh((3, 2, 5), sharding.MESH_AXES)
  assert (sharding.batch_shards(mesh), sharding.tensor_shards(mesh)) == (6, 5)


# --- Rule-set names wherever rules are accepted ---------------------------------------------

def _abstract(config):
  return jax.eval_shape(gpt.GPT(config).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))


@pytest.mark.parametrize("name", sorted(sharding.RULES))
def test_rule_set_names_accepted_where_rule_lists_are(name):
  rules = sharding.RULES[name]
  config = gpt.get_config("tiny")
  abstract = _abstract(config)
  assert sharding.describe(abstract, name) == sharding.describe(abstract, rules)
  mesh = sharding.make_mesh({}, devices=jax.devices()[:1])
  by_name = sharding.shardings_of(abstract, mesh, name)
  by_list = sharding.shardings_of(abstract, mesh, list(rules))
  assert jax.tree_util.tree_map(lambda s: s.spec, by_name) == jax.tree_util.tree_map(
      lambda s: s.spec, by_list)
  wte = by_name["params"]["wte"]["embedding"].spec
  assert wte == {"dp": P(None, None), "fsdp": P(None, "fsdp"), "fsdp_tp": P("tensor", "fsdp")}[name]
  init = lambda key: gpt.GPT(config).init(key, jnp.zeros((1, 8), jnp.int32))
  params, shardings = sharding.sharded_init(init, mesh, name, jax.random.key(0))
  reference, _ = sharding.sharded_init(init, mesh, rules, jax.random.key(0))
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, reference)
  assert shardings["params"]["wte"]["embedding"].spec == wte
  with sharding.context(mesh, name):  # the rules in scope for models' logical constraints
    in_scope = nn.logical_to_mesh_axes(("embed", "mlp"))
  assert in_scope == {"dp": P(None, None), "fsdp": P("fsdp", None),
                      "fsdp_tp": P("fsdp", "tensor")}[name]


def test_check_divisible_takes_a_name():
  config = gpt.get_config("tiny", embed_dim=60, num_heads=4, mlp_dim=120)
  mesh = jax.sharding.AbstractMesh((1, 8, 1), sharding.MESH_AXES)
  with pytest.raises(ArgumentError, match=r"60 % 8 != 0") as e:
    sharding.check_divisible(_abstract(config), mesh, "fsdp")
  assert (e.value.function, e.value.argument) == ("check_divisible", "mesh")
  assert "config." not in str(e.value)
  sharding.check_divisible(_abstract(config), mesh, "dp")  # nothing is split over fsdp


def test_unknown_rule_set_names_the_choices_and_bad_lists_are_refused():
  with pytest.raises(ArgumentError, match=r"unknown sharding rule set 'zero3'; choose from "
                     r"\['dp', 'fsdp', 'fsdp_tp'\]") as e:
    sharding.sharded_init(lambda key: {}, None, "zero3", jax.random.key(0))
  assert (e.value.function, e.value.argument) == ("get_rules", "rules")
  with pytest.raises(ArgumentError, match=r"bad pair \('embed',\)"):
    sharding.get_rules([("batch", ("data", "fsdp")), ("embed",)])
  with pytest.raises(ArgumentError, match="rules=None is neither"):
    sharding.get_rules(None)
  assert sharding.get_rules({"embed": "fsdp"}) == [("embed", "fsdp")]


# --- Errors name arguments; the programs name flags -----------------------------------------

def test_mesh_errors_name_the_argument_and_the_program_adds_the_flag():
  from train import common
  n = jax.device_count()
  with pytest.raises(ArgumentError) as e:
    sharding.make_mesh({"data": 3 * n})
  message = str(e.value)
  assert f"needs {3 * n} devices but {n} are available" in message
  assert "config" not in message and (e.value.function, e.value.argument) == ("make_mesh", "sizes")
  assert common.explain(e.value) == f"--config.mesh: {message}"
  with pytest.raises(ArgumentError) as e:
    sharding.get_rules("zero3")
  assert common.explain(e.value).startswith("--config.sharding: unknown sharding rule set")
  assert common.explain(ValueError("plain")) == "plain"


def test_run_config_errors_name_the_field_and_the_program_adds_the_flag():
  import ml_collections
  from fmjax import trainer
  from fmjax.data import glue
  from train import common
  with pytest.raises(ArgumentError) as e:
    trainer.check_batch_size(8, 1, jax.sharding.AbstractMesh((3, 1, 1), sharding.MESH_AXES))
  assert common.explain(e.value).startswith(
      "--config.train.batch_size (or --config.mesh): batch_size=8 does not split evenly")
  t = ml_collections.ConfigDict({"steps": 0, "epochs": 0.0, "warmup_steps": 0, "accum_steps": 1})
  with pytest.raises(ArgumentError) as e:
    trainer.resolve_schedule(t)
  assert common.explain(e.value).startswith("--config.train.steps: train.steps=0 and train.")
  with pytest.raises(ArgumentError) as e:
    glue.TableFormat(("sentence",), quoting="excel")
  assert common.explain(e.value) == ("--config.data.quoting: TableFormat.quoting='excel': "
                                     "choose one of ['none', 'csv']")
  with pytest.raises(glue.DataError) as e:  # a row the labels do not cover: the data, or them
    glue.parse_label("maybe", glue.TableFormat(("s",), label_names=("no", "yes")), "a.tsv:2")
  assert common.explain(e.value) == ("--config.data.label_names: a.tsv:2: label 'maybe' is not "
                                     "one of ['no', 'yes']; fix the row or set "
                                     "TableFormat.label_names")


def test_library_messages_name_no_command_line_flags():
  """fmjax/ says no "--config", "--workdir" or "config.train." (the programs' run config)
  outside docstrings: its errors name arguments, and train/common.explain adds the flag."""
  flag = re.compile(r"--(config|workdir)\b|\bconfig\.(train|data|mesh|model|sharding|runtime)\b")
  found = []
  for path in sorted((ROOT / "fmjax").rglob("*.py")):
    name = str(path.relative_to(ROOT))
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
                  and isinstance(n.body[0], ast.Expr)}
    for node in ast.walk(tree):
      if (isinstance(node, ast.Constant) and isinstance(node.value, str)
          and flag.search(node.value) and id(node) not in docstrings):
        found.append(f"{name}: {node.value[:60]!r}")
  assert found == []


# --- The causal-LM loss lives in fmjax/ ------------------------------------------------------

def _reference_lm_loss(logits, targets, weights):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  correct = (logits.argmax(-1) == targets).astype(np.float64)
  return (nll * weights).sum() / weights.sum(), (correct * weights).sum() / weights.sum()


def test_causal_lm_loss_equals_a_hand_computation():
  # Two positions, three-token vocabulary, worked by hand: log-softmax of (0, ln 2, ln 3) is
  # (ln 1/6, ln 2/6, ln 3/6); targets 1 and 2 -> -(ln 1/3 + ln 1/2) / 2.
  logits = jnp.log(jnp.array([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]]))
  loss, m = heads.causal_lm_loss(logits, jnp.array([[1, 2]]))
  np.testing.assert_allclose(loss, (np.log(3) + np.log(2)) / 2, rtol=1e-6)
  assert float(m["accuracy"]) == 0.5 and float(m["loss"]) == float(loss)
  loss_w, m_w = heads.causal_lm_loss(logits, jnp.array([[1, 2]]), jnp.array([[0.0, 1.0]]))
  np.testing.assert_allclose(loss_w, np.log(2), rtol=1e-6)
  assert float(m_w["accuracy"]) == 1.0

  rng = np.random.RandomState(0)
  logits = rng.randn(3, 5, 11).astype(np.float32) * 3
  targets = rng.randint(0, 11, (3, 5))
  weights = (rng.rand(3, 5) > 0.3).astype(np.float32)
  for w in (None, weights):
    loss, m = heads.causal_lm_loss(jnp.asarray(logits), jnp.asarray(targets),
                                   None if w is None else jnp.asarray(w))
    ref_loss, ref_acc = _reference_lm_loss(logits, targets, np.ones((3, 5)) if w is None else w)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(m["accuracy"], ref_acc, rtol=1e-6)


def test_causal_lm_loss_fn_applies_the_model_to_packed_windows():
  config = gpt.get_config("tiny", vocab_size=13, max_len=16)
  model = gpt.GPT(config)
  rng = np.random.RandomState(1)
  inputs = rng.randint(0, 13, (2, 8)).astype(np.int32)
  batch = {"inputs": inputs, "targets": rng.randint(0, 13, (2, 8)).astype(np.int32),
           "positions": np.tile(np.r_[0:3, 0:5], (2, 1)).astype(np.int32),
           "segment_ids": np.tile(np.r_[[1] * 3, [2] * 5], (2, 1)).astype(np.int32)}
  params = model.init(jax.random.key(0), inputs)["params"]
  loss, m = heads.causal_lm_loss_fn(model)(params, batch, jax.random.key(1), False)
  logits = model.apply({"params": params}, inputs, positions=batch["positions"],
                       segment_ids=batch["segment_ids"])
  ref_loss, ref_acc = _reference_lm_loss(logits, batch["targets"], np.ones((2, 8)))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(m["accuracy"], ref_acc, rtol=1e-6)
  # Without positions and segments the second document would see the first: a different loss.
  plain = model.apply({"params": params}, inputs)
  assert abs(_reference_lm_loss(plain, batch["targets"], np.ones((2, 8)))[0] - ref_loss) > 1e-4


# --- One meaning per name ---------------------------------------------------------------------

def test_ambiguous_names_are_gone_from_the_public_api():
  import flax.training.train_state
  import fmjax
  from fmjax import hf, training
  # fmjax.hf.load_params (HF weights) vs fmjax.checkpoint.load_params (a workdir's params);
  # fmjax.hf.load_tokenizer vs fmjax.data.load_tokenizer; fmjax.TrainState vs flax's.
  for module, old, new in ((hf, "load_params", "read_weights"),
                           (hf, "load_tokenizer", "tokenizer_from_pretrained"),
                           (fmjax, "TrainState", "TrainingState")):
    assert not hasattr(module, old) and old not in module.__all__ and old not in dir(module)
    assert new in module.__all__ and callable(getattr(module, new))
  assert fmjax.TrainingState is training.TrainingState
  assert fmjax.TrainingState is not flax.training.train_state.TrainState
  assert [f for f in training.TrainingState.__dataclass_fields__] == ["step", "params",
                                                                     "opt_state"]


def test_segment_ids_are_packed_documents_and_token_type_ids_sentence_pairs():
  from fmjax import data as fdata
  from fmjax.data import glue, squad
  tok = fdata.load_tokenizer(ROOT / "tests" / "golden" / "hf" / "bert")
  a, b = len(tok.encode("a film")), len(tok.encode("dull"))
  arrays, _ = glue.encode_examples([glue.Example(("a film", "dull"), 1, "t:1")], tok,
                                   max_seq_length=16)  # [CLS] A [SEP] B [SEP] PAD ...
  np.testing.assert_array_equal(arrays["token_type_ids"],
                                [[0] * (a + 2) + [1] * (b + 1) + [0] * (13 - a - b)])
  q, c = len(tok.encode("who sat")), len(tok.encode("the cat sat"))
  qa = squad.QAExample("q", "t", "the cat sat", "who sat", (("the cat", 0),), "s:1")
  features, _ = squad.make_features([qa], tok, max_seq_length=20, doc_stride=4,
                                    max_query_length=8)  # [CLS] question [SEP] context [SEP]
  np.testing.assert_array_equal(features["token_type_ids"],
                                [[0] * (q + 2) + [1] * (c + 1) + [0] * (17 - q - c)])
  assert "segment_ids" not in arrays and "segment_ids" not in features
  lm = fdata.make_batch(np.array([5, 0, 6, 7, 0]), np.array([0]), 4, eos_id=0)  # packed documents
  np.testing.assert_array_equal(lm["segment_ids"], [[1, 1, 2, 2]])


@pytest.mark.parametrize("model, files", [
    ("bert", ("tokenizer.json", "tokenizer_config.json")),
    ("bert", ("vocab.txt", "tokenizer_config.json")),  # WordPiece, as BertTokenizer
    ("gpt2", ("vocab.json", "merges.txt", "tokenizer_config.json"))])  # byte-level BPE
def test_data_load_tokenizer_reads_hugging_face_directories(model, files, tmp_path):
  import shutil
  from fmjax import data as fdata
  from fmjax import hf
  for name in files:
    shutil.copy(ROOT / "tests" / "golden" / "hf" / model / name, tmp_path / name)
  ours, theirs = fdata.load_tokenizer(tmp_path), hf.tokenizer_from_pretrained(tmp_path)
  assert type(ours) is hf.HFTokenizer and ours.fingerprint == theirs.fingerprint
  assert (ours.eos_id, ours.pad_id, ours.vocab_size) == (
      theirs.eos_id, theirs.pad_id, theirs.vocab_size)
  texts, pairs = ["Hello, world!", "a longer second text"], ["and a pair", "b"]
  for key, value in theirs(texts, pairs, padding="longest").items():
    np.testing.assert_array_equal(ours(texts, pairs, padding="longest")[key], value)
  # An fmjax-saved tokenizer directory still restores by its kind.
  ours.save(tmp_path / "saved")
  assert fdata.load_tokenizer(tmp_path / "saved").fingerprint == theirs.fingerprint


def test_data_load_tokenizer_names_both_kinds_of_directory(tmp_path):
  from fmjax import data as fdata
  with pytest.raises(FileNotFoundError, match=r"no fmjax_tokenizer.json in .*nor a Hugging Face "
                                              r"tokenizer \(tokenizer.json, vocab.txt"):
    fdata.load_tokenizer(tmp_path)
