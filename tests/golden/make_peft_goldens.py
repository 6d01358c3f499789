"""Writes the PEFT LoRA golden adapters that tests/test_peft.py checks fmjax against.

Run from the repository root where torch, transformers and peft are installed (optional
extras; the tests themselves run without them):

  .venv/bin/python tests/golden/make_peft_goldens.py

For each base model already in tests/golden/hf/ (made by make_hf_goldens.py) it writes
tests/golden/peft/<name>/ (about 50 KB each):
  adapter_config.json, adapter_model.safetensors  peft's save_pretrained of a LoRA on the base
      (rank 4, alpha 8) with every lora_A and lora_B drawn at random (std 0.1, fixed seed),
      so B is non-zero and each adapter changes the outputs;
  reference.npz  input_ids (2, 12) and the PeftModel's logits (2, 12, V), float32.

  llama/  LlamaForCausalLM (tests/golden/hf/llama), targets q/k/v/o_proj, gate/up/down_proj.
  gpt2/   GPT2LMHeadModel (tests/golden/hf/gpt2), targets c_attn (GPT-2's fused
          query|key|value: one adapter whose lora_B covers all three), c_proj (attention
          output and MLP output), c_fc; fan_in_fan_out as peft wants for Conv1D.
"""

import json
import pathlib
import shutil

import numpy as np
import peft
import torch
import transformers

ROOT = pathlib.Path(__file__).parent
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def make(name: str) -> None:
  base_dir = ROOT / "hf" / name
  base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
  config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS[name],
                           fan_in_fan_out=name == "gpt2", task_type="CAUSAL_LM")
  model = peft.get_peft_model(base, config).eval()
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for pname, p in sorted(model.named_parameters()):
      if "lora_" in pname:
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
  vocab = base.config.vocab_size
  ids = np.random.RandomState(1).randint(0, vocab, (2, 12)).astype(np.int64)
  with torch.no_grad():
    logits = model(input_ids=torch.from_numpy(ids)).logits.float().numpy()
  out = ROOT / "peft" / name
  shutil.rmtree(out, ignore_errors=True)
  model.save_pretrained(out)
  np.savez(out / "reference.npz", input_ids=ids.astype(np.int32), logits=logits)
  (out / "README.md").unlink(missing_ok=True)  # peft's model card template: not needed
  config_file = out / "adapter_config.json"  # the base's path relative to the repository
  saved = json.loads(config_file.read_text())
  saved["base_model_name_or_path"] = f"tests/golden/hf/{name}"
  config_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
  (out / "adapter_model.safetensors").chmod(0o644)
  print(f"wrote {out}: {sorted(p.name for p in out.iterdir())}")


if __name__ == "__main__":
  for n in TARGETS:
    make(n)
