"""vllm_dms: DMS (Dynamic Memory Sparsification) on a compact FP8 KV cache, as a vLLM plugin."""
