"""Run inside the converter venv: write a PEFT adapter (LoRA or DoRA) with non-trivial weights,
so that mlx_lora can be checked against adapters PEFT itself made.

usage: python peft_make_adapter.py MODEL_DIR OUT_DIR lora|dora
"""

import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

model_dir, out, kind = sys.argv[1:4]
torch.manual_seed(0)
base = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
config = LoraConfig(
    r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=kind == "dora"
)
model = get_peft_model(base, config)
with torch.no_grad():
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.05)
        elif "lora_magnitude_vector" in name:
            p.mul_(1 + 0.1 * torch.randn_like(p))
model.save_pretrained(out)
