"""A random-weight Llama checkpoint (SmolLM2-135M shape, Llama-3 tokenizer) with DMS fields.

Used where the real GGUF is not staged: vLLM and the HF reference load the same weights, so the
exactness of the mechanics can be checked. python benchmarks/make_random_llama.py OUT TOKENIZER_DIR
"""
import json
import os
import shutil
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

out, tok = sys.argv[1], sys.argv[2]
cfg = LlamaConfig(vocab_size=128256, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                  max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                  tie_word_embeddings=True, initializer_range=0.05)
cfg.architectures = ["LlamaForCausalLM"]
torch.manual_seed(0)
LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
c = json.load(open(os.path.join(out, "config.json")))
c.pop("rope_parameters", None)
c.update(rope_theta=100000.0, dms_window_size=64, dms_alpha_scale=100.0,
         dms_initial_alpha_offset=5.0, dms_cr=8, dms_decision_shift=1)
json.dump(c, open(os.path.join(out, "config.json"), "w"), indent=1)
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(tok, f), out)
print(out)
