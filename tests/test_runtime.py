"""Architecture vs runtime (fmjax/runtime.py), model-config validation, fmjax/sources.py and
the resolved schedule, as a user meets them.

Pinned:
  - each bad Runtime or model-config field is one ValueError naming the class, the field, the
    value and the choices; GPT over max_len learned positions raises instead of NaN logits;
  - a Runtime changes how the parameters are computed, never which ones there are (except
    scan_layers' stacked layout), and checkpoints compare the architecture only;
  - resuming the tiny GPT program with another remat policy continues the uninterrupted
    run's losses bit for bit; with the chunked attention kernel instead of xla, within float
    rounding (online softmax sums in another order); with scanned layers, the checkpoint's
    layers are stacked on resume;
  - an explicit train.steps wins over train.epochs, which counts only with steps = 0;
  - sources.parse: a workdir's architecture, tokenizer and params (into a scanned model too).
"""

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # configs/ and train/ (the programs run in-process below)

from fmjax import checkpoint, metrics, sources, trainer  # noqa: E402
from fmjax.models import bert, gpt, seq2seq, vit  # noqa: E402
from fmjax.runtime import Runtime  # noqa: E402

# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("fields,message", [
    ({"attention_impl": "flash"}, "Runtime.attention_impl='flash' is not one of ['xla', "
                                  "'chunked', 'cudnn', 'splash', 'auto']"),
    ({"remat_policy": "all"}, "Runtime.remat_policy='all' is not one of ['none', 'full', "
                              "'dots', 'dots_no_batch']"),
    ({"dtype": "int8"}, "Runtime.dtype='int8' is not a floating-point dtype name"),
    ({"param_dtype": "fp32"}, "Runtime.param_dtype='fp32' is not a floating-point dtype name"),
    ({"dropout_rate": 1.0}, "Runtime.dropout_rate=1.0: a dropout rate must be in [0, 1)"),
    ({"attention_dropout_rate": -0.1}, "Runtime.attention_dropout_rate=-0.1: a dropout rate"),
    ({"scan_layers": "yes"}, "Runtime.scan_layers='yes': must be True or False"),
])
def test_bad_runtime_fields_are_named(fields, message):
  with pytest.raises(ValueError) as e:
    Runtime(**fields)
  assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_runtime_accepts_every_documented_choice():
  for impl in ("xla", "chunked", "cudnn", "splash", "auto"):
    Runtime(attention_impl=impl)
  for policy in ("none", "full", "dots", "dots_no_batch"):
    Runtime(remat_policy=policy)
  rt = Runtime(dtype="bfloat16", param_dtype="float16", dropout_rate=0.1)
  assert (rt.compute_dtype, rt.params_dtype) == (jnp.bfloat16, jnp.float16)


@pytest.mark.parametrize("make,message", [
    (lambda: gpt.get_config("tiny", num_heads=5),
     "GPTConfig.embed_dim=64 is not divisible by num_heads=5: each head would get 12.8 "
     "dimensions; choose num_heads dividing embed_dim (e.g. 4)"),
    (lambda: gpt.get_config("tiny", num_kv_heads=3),
     "GPTConfig.num_kv_heads=3 does not divide num_heads=4"),
    (lambda: gpt.get_config("tiny", position="rotary"),
     "GPTConfig.position='rotary' is not one of ['learned', 'rope']; choose one of them"),
    (lambda: gpt.get_config("tiny", norm="batch"),
     "GPTConfig.norm='batch' is not one of ['layer', 'rms']"),
    (lambda: gpt.get_config("tiny", mlp_activation="swish"),
     "GPTConfig.mlp_activation='swish' is not one of ['gelu', 'gelu_tanh', 'relu', 'silu']"),
    (lambda: gpt.get_config("tiny", num_layers=0), "GPTConfig.num_layers=0: must be a positive"),
    (lambda: gpt.get_config("tiny", position="rope", embed_dim=60, num_heads=4),
     "GPTConfig: rotary positions rotate pairs of dimensions, but head_dim"),
    (lambda: bert.get_config("tiny", num_heads=3),
     "BertConfig.embed_dim=128 is not divisible by num_heads=3"),
    (lambda: bert.get_config("tiny", type_vocab_size=0), "BertConfig.type_vocab_size=0"),
    (lambda: vit.get_config("tiny", pool="mean"),
     "ViTConfig.pool='mean' is not one of ['cls', 'gap']"),
    (lambda: vit.get_config("tiny", num_heads=3), "ViTConfig.embed_dim=32 is not divisible"),
    (lambda: vit.get_config("tiny", num_classes=-1), "ViTConfig.num_classes=-1: must be an "
                                                     "integer >= 0"),
    (lambda: seq2seq.get_config("tiny", mlp_activation="tanh"),
     "Seq2SeqConfig.mlp_activation='tanh' is not one of"),
    (lambda: seq2seq.get_config("tiny", num_heads=6), "Seq2SeqConfig.embed_dim=64 is not "
                                                      "divisible by num_heads=6"),
    (lambda: seq2seq.get_config("tiny", encoder_layers=-1), "Seq2SeqConfig.encoder_layers=-1"),
])
def test_bad_model_config_fields_are_named(make, message):
  with pytest.raises(ValueError) as e:
    make()
  assert str(e.value).startswith(message), str(e.value)
  assert "--config" not in str(e.value) and "\n" not in str(e.value)


def test_model_configs_hold_the_architecture_only():
  for cls in (gpt.GPTConfig, bert.BertConfig, vit.ViTConfig, seq2seq.Seq2SeqConfig):
    names = {f.name for f in dataclasses.fields(cls)}
    assert not names & {f.name for f in dataclasses.fields(Runtime)}, cls.__name__
  for module in (gpt.GPT, bert.BertEncoder, bert.BertForPreTraining,
                 bert.BertForSequenceClassification, bert.BertForQuestionAnswering, vit.ViT,
                 vit.ViTEncoder, seq2seq.Seq2Seq, seq2seq.ImageCaptioner):
    fields = [f for f in dataclasses.fields(module) if f.name not in ("parent", "name")]
    assert fields[-1].name == "runtime" and fields[-1].default == Runtime(), module.__name__


def test_gpt_longer_than_its_learned_positions_raises():
  """Before, the positions past the table gave NaN logits without a word."""
  c = gpt.get_config("tiny")  # max_len 64
  model = gpt.GPT(c)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  assert model.apply(params, jnp.zeros((1, 64), jnp.int32)).shape == (1, 64, 256)  # at max_len
  with pytest.raises(ValueError, match=r"tokens have length 65 but this GPT has max_len=64 "
                                       r"learned positions; pass at most 64 tokens"):
    model.apply(params, jnp.zeros((1, 65), jnp.int32))
  rope = gpt.GPT(gpt.get_config("tiny", position="rope"))  # no table: any length
  logits = rope.apply(rope.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)),
                      jnp.zeros((1, 80), jnp.int32))
  assert np.isfinite(np.asarray(logits)).all()


def test_seq2seq_refuses_what_its_decoder_loop_cannot_do():
  model = seq2seq.Seq2Seq(seq2seq.get_config("tiny"), Runtime(remat_policy="full"))
  x = jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="Seq2Seq runs its decoder layers in a Python loop"):
    model.init(jax.random.key(0), x, x > 0, x)


# ------------------------------------------------------------------------------ what a runtime changes


def _params(model, t=8):
  x = jnp.zeros((2, t), jnp.int32)
  return nn.meta.unbox(model.init(jax.random.key(0), x)["params"]), x


def test_runtime_changes_the_computation_not_the_parameters():
  c = gpt.get_config("tiny")
  params, x = _params(gpt.GPT(c))
  x = jax.random.randint(jax.random.key(1), (2, 24), 0, c.vocab_size)
  ref = gpt.GPT(c, Runtime(attention_impl="xla")).apply({"params": params}, x)
  for rt in (Runtime(attention_impl="chunked"), Runtime(remat_policy="full"),
             Runtime(dropout_rate=0.3, attention_dropout_rate=0.2)):  # eval: no dropout
    other, _ = _params(gpt.GPT(c, rt))
    assert jax.tree_util.tree_structure(other) == jax.tree_util.tree_structure(params)
    np.testing.assert_allclose(gpt.GPT(c, rt).apply({"params": params}, x), ref, atol=2e-5)
  half, _ = _params(gpt.GPT(c, Runtime(param_dtype="bfloat16")))
  assert {a.dtype for a in jax.tree_util.tree_leaves(half)} == {jnp.dtype("bfloat16")}
  scanned, _ = _params(gpt.GPT(c, Runtime(scan_layers=True)))
  flat = checkpoint.flatten_params(params)
  stacked = checkpoint.stack_layers(flat)
  assert {p: a.shape for p, a in checkpoint.flatten_params(scanned).items()} == \
      {p: a.shape for p, a in stacked.items()}
  back = checkpoint.unstack_layers(stacked)
  assert back.keys() == flat.keys() and all(np.array_equal(back[p], flat[p]) for p in flat)


def test_checkpoints_compare_the_architecture_only(tmp_path):
  """meta["model"] is the architecture; a checkpoint from before the split listed runtime
  fields with it, and those are ignored."""
  c = gpt.get_config("tiny")
  signature = checkpoint.model_signature(c)
  assert "attention_impl" not in signature and "dropout_rate" not in signature
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1, async_save=False)
  old = {**signature, "attention_impl": "xla", "scan_layers": True, "dropout_rate": 0.1}
  ckpt.save(1, {"w": np.zeros(2)}, {"model": old}, force=True)
  assert ckpt.check_compatible(signature)["model"] == old
  assert checkpoint.saved_scan_layers({"model": old})
  assert not checkpoint.saved_scan_layers({"model": old, "runtime": {"scan_layers": False}})
  with pytest.raises(checkpoint.CheckpointMismatchError, match="num_layers: checkpoint 2 vs "
                                                               "config 3"):
    ckpt.check_compatible(checkpoint.model_signature(dataclasses.replace(c, num_layers=3)))
  ckpt.close()


# ------------------------------------------------------------------------------ the schedule


def train_block(**fields):
  t = ml_collections.ConfigDict({"steps": 0, "epochs": 0.0, "batch_size": 8, "warmup_steps": 7,
                                 "warmup_fraction": 0.0, "accum_steps": 1})
  t.update(fields)
  return t


def test_explicit_steps_win_over_epochs(caplog):
  with caplog.at_level(logging.INFO, logger="fmjax"):
    s = trainer.resolve_schedule(train_block(steps=500, epochs=3.0), num_examples=714)
  assert s == trainer.Schedule(steps=500, warmup_steps=7, accum_steps=1)
  assert "train.epochs=3 is ignored" in caplog.text
  # steps 0: epochs count, ceil(3 * 714 / 8) = 268, warmup 10% of them
  s = trainer.resolve_schedule(train_block(epochs=3.0, warmup_fraction=0.1), num_examples=714)
  assert s == trainer.Schedule(steps=268, warmup_steps=26, accum_steps=1)
  assert trainer.resolve_schedule(train_block(steps=9), accum_steps=4).accum_steps == 4
  with pytest.raises(ValueError, match="train.steps=0 and train.epochs=0: set one of them"):
    trainer.resolve_schedule(train_block())
  with pytest.raises(ValueError, match="epochs is set, but this caller trains by steps"):
    trainer.resolve_schedule(train_block(epochs=1.0))
  with pytest.raises(ValueError, match="Schedule.accum_steps=0"):
    trainer.Schedule(steps=1, accum_steps=0)


@pytest.fixture(scope="module", autouse=True)
def _known_peak_flops():
  """fit measures the CPU's matmul peak once per cache dir; not needed here."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(metrics, "peak_flops_per_device", lambda device=None, **_: (1e13, "test"))
    yield


def test_finetune_explicit_steps_win_and_config_json_records_them(tmp_path, monkeypatch):
  """The trap of issue 15: --config.train.steps on a variant that trains by epochs ran the
  epochs' steps. Now the explicit steps run, and config.json says what ran."""
  monkeypatch.chdir(REPO)
  from configs import finetune as finetune_configs
  from train import finetune
  config = finetune_configs.get_config("tiny")
  config.train.update(steps=2, epochs=3.0, log_every=1, eval_every=2, save_every=2)
  config.runtime.attention_impl = "xla"
  finetune.run(config, str(tmp_path / "ft"))
  rows = metrics.read_metrics(str(tmp_path / "ft" / "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2]
  recorded = json.load(open(tmp_path / "ft" / "config.json"))
  assert recorded["train"]["steps"] == 2 and recorded["train"]["warmup_steps"] == 0  # 10% of 2
  assert recorded["runtime"] == {**dataclasses.asdict(Runtime()), "attention_impl": "xla",
                                 "dropout_rate": 0.1, "attention_dropout_rate": 0.1}
  assert recorded["model"]["vocab_size"] > 0  # the architecture built, not -1


# ------------------------------------------------------------------------------ resume under another runtime


def gpt_config(**runtime):
  from configs import gpt as gpt_configs
  config = gpt_configs.get_config("tiny")
  config.train.update(steps=20, save_every=10, log_every=5, eval_every=10)
  config.sample.num_tokens = 0
  config.runtime.update({"attention_impl": "xla", **runtime})
  return config


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The tiny GPT program, 20 steps, checkpoints at 10 and 20."""
  from train import pretrain_gpt
  os.chdir(REPO)
  workdir = tmp_path_factory.mktemp("gpt") / "straight"
  pretrain_gpt.run(gpt_config(), str(workdir))
  return workdir


def resumed_at_10(uninterrupted, workdir, **runtime):
  """The same run stopped at step 10 (its later checkpoint removed), resumed under `runtime`."""
  from train import pretrain_gpt
  shutil.copytree(uninterrupted, workdir)
  shutil.rmtree(workdir / "checkpoints" / "20")
  pretrain_gpt.run(gpt_config(**runtime), str(workdir))
  return metrics.read_metrics(str(workdir / "metrics.jsonl"))


def losses(rows, keys=("train/loss", "eval/loss", "grad_norm")):
  return [(r["step"], *(r.get(k) for k in keys)) for r in rows]


def test_resume_with_another_remat_policy_is_bit_identical(uninterrupted, tmp_path):
  """Remat recomputes the same operations in the backward pass: the same numbers."""
  rows = resumed_at_10(uninterrupted, tmp_path / "remat", remat_policy="full")
  straight = metrics.read_metrics(str(uninterrupted / "metrics.jsonl"))
  assert [r["step"] for r in rows] == [5, 10, 15, 20]
  assert losses(rows) == losses(straight)
  meta = checkpoint.read_latest(str(tmp_path / "remat"))[1]
  assert meta["runtime"]["remat_policy"] == "full"
  assert json.load(open(tmp_path / "remat" / "config.json"))["runtime"]["remat_policy"] == "full"


def test_resume_with_the_chunked_kernel_continues_within_rounding(uninterrupted, tmp_path):
  """xla -> chunked: the chunked kernel's online softmax accumulates the same sums in
  another order, so the losses agree to float32 rounding, not bit for bit."""
  rows = resumed_at_10(uninterrupted, tmp_path / "chunked", attention_impl="chunked",
                       remat_policy="dots")
  straight = metrics.read_metrics(str(uninterrupted / "metrics.jsonl"))
  assert losses(rows)[:2] == losses(straight)[:2]  # steps 5 and 10: the first run's rows
  for a, b in zip(rows[2:], straight[2:]):
    for key in ("train/loss", "grad_norm", "eval/loss"):
      if key in b:
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)


def test_resume_with_scanned_layers_stacks_the_checkpoint(uninterrupted, tmp_path):
  """scan_layers changes the parameter layout: the step-10 checkpoint's layers (and their
  Adam moments) are stacked on resume, and training continues as before, within rounding
  (nn.scan compiles the layers as a loop of its own)."""
  rows = resumed_at_10(uninterrupted, tmp_path / "scan", scan_layers=True)
  straight = metrics.read_metrics(str(uninterrupted / "metrics.jsonl"))
  for a, b in zip(rows[2:], straight[2:]):
    assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5), a["step"]
  state = checkpoint.load_params(str(tmp_path / "scan"))
  assert state["blocks"]["layers"]["attn"]["query"]["kernel"].shape == (2, 64, 4, 16)


def test_a_workdir_source_gives_architecture_tokenizer_and_params(uninterrupted):
  source = sources.parse(str(uninterrupted))
  c = source.architecture(gpt.GPTConfig)
  assert c == gpt.get_config("tiny", vocab_size=67)  # the character vocabulary
  assert source.tokenizer().vocab_size == 67
  assert source.runtime() == Runtime(attention_impl="xla")
  with pytest.raises(ValueError, match=r"holds a checkpoint of a model that is not a "
                                       r"BertConfig \(missing \['norm_eps', 'type_vocab_size'\]\)"):
    source.architecture(bert.BertConfig)
  # Into a scanned model: the per-layer checkpoint stacked, every array equal.
  model = gpt.GPT(c, Runtime(scan_layers=True))
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  shardings = jax.tree_util.tree_map(
      lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
      nn.meta.unbox(abstract["params"]))
  loaded = source.load(nn.meta.unbox(abstract["params"]), shardings)
  saved = checkpoint.load_params(str(uninterrupted))
  np.testing.assert_array_equal(loaded["blocks"]["layers"]["mlp"]["wo"]["kernel"][1],
                                saved["blocks"]["layer_1"]["mlp"]["wo"]["kernel"])
  np.testing.assert_array_equal(loaded["wte"]["embedding"], saved["wte"]["embedding"])
  assert not sources.parse("")  # no source
  with pytest.raises(FileNotFoundError, match="has no checkpoints/ directory"):
    sources.parse(str(uninterrupted / "tokenizer"))
