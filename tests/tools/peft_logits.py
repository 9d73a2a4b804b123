"""Run inside the converter venv (torch + transformers + peft): the reference logits of a base
model with a PEFT adapter, as Hugging Face computes them.

usage: python peft_logits.py MODEL_DIR ADAPTER_DIR OUT.npy IDS...   (ids of one sequence)
"""

import sys

import numpy as np
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

model_dir, adapter_dir, out = sys.argv[1:4]
ids = [int(x) for x in sys.argv[4:]]
base = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
model = PeftModel.from_pretrained(base, adapter_dir).eval()
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0].float().numpy()
np.save(out, logits)
