"""`vllm-dms demo`: SmolLM2-135M-Instruct with DMS fields, generated with DMS eviction on.

On a CUDA machine it runs stock ``vllm.LLM(..., kv_cache_dtype="dms_fp8")`` (our backend, our
arena); without a GPU it runs the exact dense reference on the CPU. Either way it prints the
text and the per-layer compression (sequence length / live tokens) of the request.
"""
from __future__ import annotations

import os

import torch

PROMPT = ("<|im_start|>user\nWrite a short story about a robot who learns to paint.<|im_end|>\n"
          "<|im_start|>assistant\n")


def _print_compression(live: torch.Tensor, n_tokens: int) -> None:
    """live [L, H]: live tokens per (layer, head) after the last step."""
    per_layer = live.float().mean(dim=1)
    print(f"\nlive KV tokens per layer (of {n_tokens}) and compression:")
    for i, v in enumerate(per_layer.tolist()):
        print(f"  layer {i:2d}: {v:7.1f} live  {n_tokens / max(v, 1e-9):5.2f}x")
    print(f"  overall: {n_tokens / per_layer.mean().item():.2f}x")


def run_demo(max_tokens: int = 96, window: int = 16, cpu: bool = False,
             untrained: bool = False) -> None:
    if untrained:
        from vllm_dms.checkpoints import smollm2_dms
        model_dir = smollm2_dms(window=window)
    else:  # the embedded default: SmolLM2-135M retrofitted with DMS by vllm_dms.training
        from vllm_dms.training.delta import shipped_checkpoint
        model_dir = shipped_checkpoint()
    print(f"model: {model_dir}")
    if torch.cuda.is_available() and not cpu:
        _demo_vllm(model_dir, max_tokens)
    else:
        _demo_reference(model_dir, max_tokens)


def _demo_vllm(model_dir: str, max_tokens: int) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # read the arena in-process
    from vllm import LLM, SamplingParams

    from vllm_dms.runtime import inprocess_engine
    # no prefix caching: the finished request's slot is released (not kept as an entry), so
    # its rows can be read from the release list
    llm = LLM(model_dir, kv_cache_dtype="dms_fp8", max_model_len=4096, gpu_memory_utilization=0.3,
              enable_prefix_caching=False)
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=max_tokens))[0]
    print(out.outputs[0].text)
    mgr, rt = inprocess_engine(llm)
    slot = mgr.link.release[-1]
    from vllm_dms.kernels.arena_ops import arena_state
    ctx = llm.llm_engine.vllm_config.compilation_config.static_forward_context
    live = torch.stack([arena_state(ctx[n].kv_cache.view(-1), rt.layout).row_len[slot].cpu()
                        for n in rt.layer_index])
    _print_compression(live, len(out.prompt_token_ids) + len(out.outputs[0].token_ids) - 1)


def _demo_reference(model_dir: str, max_tokens: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_dms.config import DMSConfig
    from vllm_dms.reference import greedy_generate_reference
    print("(no GPU: exact dense DMS reference on the CPU)")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    dms = DMSConfig.from_checkpoint(model_dir)
    ids = torch.tensor(tok(PROMPT)["input_ids"])
    with torch.no_grad():
        tokens, ref = greedy_generate_reference(model, dms, ids, max_tokens)
    print(tok.decode(tokens))
    _print_compression(ref.live[:, -1], ref.live.shape[1])
