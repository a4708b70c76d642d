"""`vllm-dms demo`: SmolLM2-135M-Instruct with DMS fields, generated with DMS eviction on.

On a CUDA machine it runs stock ``vllm.LLM(..., kv_cache_dtype="dms_fp8")`` (our backend, our
arena); without a GPU it runs the exact dense reference on the CPU. Either way the question goes
through the model's chat template, generation stops at its end-of-turn token, and it prints
the text, the per-layer and overall compression (sequence length / live tokens) and the KV bytes
the live rows take (FP8 K and V plus a 4-byte meta word per token) against BF16's.
"""
from __future__ import annotations

import os

import torch

QUESTION = "Write a short story about a robot who learns to paint."


def chat_prompt(tok) -> tuple[list[int], int]:
    """(prompt ids through the tokenizer's chat template, the end-of-turn token id)."""
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}],
                                  add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # BatchEncoding or list
    return list(ids), tok.eos_token_id  # SmolLM2: <|im_end|>


def _print_compression(live: torch.Tensor, n_tokens: int, head_dim: int) -> None:
    """live [L, H]: live tokens per (layer, head) after the last step."""
    per_layer = live.float().mean(dim=1)
    print(f"\nlive KV tokens per layer (of {n_tokens}) and compression:")
    for i, v in enumerate(per_layer.tolist()):
        print(f"  layer {i:2d}: {v:7.1f} live  {n_tokens / max(v, 1e-9):5.2f}x")
    print(f"  overall: {n_tokens / per_layer.mean().item():.2f}x")
    dms_bytes = int(live.sum()) * (2 * head_dim + 4)  # FP8 K + V, one meta word per token
    bf16_bytes = n_tokens * live.numel() * 2 * head_dim * 2
    print(f"KV bytes: {dms_bytes} (DMS, FP8) vs {bf16_bytes} (BF16): "
          f"{bf16_bytes / max(dms_bytes, 1):.1f}x less")


def run_demo(max_tokens: int = 96, window: int = 16, cpu: bool = False,
             untrained: bool = False) -> None:
    if untrained:
        from vllm_dms.tools.checkpoints import smollm2_dms
        model_dir = smollm2_dms(window=window)
    else:  # the embedded default: SmolLM2-135M retrofitted with DMS by vllm_dms.tools.training
        from vllm_dms.tools.training.delta import shipped_checkpoint
        model_dir = shipped_checkpoint()
    print(f"model: {model_dir}")
    if torch.cuda.is_available() and not cpu:
        _demo_vllm(model_dir, max_tokens)
    else:
        _demo_reference(model_dir, max_tokens)


def _demo_vllm(model_dir: str, max_tokens: int) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # read the arena in-process
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from vllm_dms.worker.runtime import inprocess_engine
    ids, eot = chat_prompt(AutoTokenizer.from_pretrained(model_dir))
    # no prefix caching: the finished request's slot is released (not kept as an entry), so
    # its rows can be read from the release list
    llm = LLM(model_dir, kv_cache_dtype="dms_fp8", max_model_len=4096, gpu_memory_utilization=0.3,
              enable_prefix_caching=False)
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=[eot])
    out = llm.generate([{"prompt_token_ids": ids}], sp)[0]
    print(out.outputs[0].text)
    mgr, rt = inprocess_engine(llm)
    slot = mgr.link.release[-1]
    from vllm_dms.worker.kernels.arena_ops import arena_state
    ctx = llm.llm_engine.vllm_config.compilation_config.static_forward_context
    live = torch.stack([arena_state(ctx[n].kv_cache.view(-1), rt.layout).row_len[slot].cpu()
                        for n in rt.layer_index])
    _print_compression(live, len(out.prompt_token_ids) + len(out.outputs[0].token_ids) - 1,
                       rt.layout.head_dim)


def _demo_reference(model_dir: str, max_tokens: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_dms.engine.config import DMSConfig
    from vllm_dms.tools.reference import greedy_generate_reference
    print("(no GPU: exact dense DMS reference on the CPU)")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    dms = DMSConfig.from_checkpoint(model_dir)
    ids, eot = chat_prompt(tok)
    with torch.no_grad():
        tokens, ref = greedy_generate_reference(model, dms, torch.tensor(ids), max_tokens,
                                                stop_id=eot)
    print(tok.decode(tokens, skip_special_tokens=True))
    # live after the last query (the final token's own decision is pending, as in the arena)
    _print_compression(ref.live[:, -2 if len(tokens) > 1 else -1], ref.live.shape[1] - 1,
                       dms.head_dim)
