"""Tooling around the serving code: the dense reference, the quality harness, training and
checkpoints, synthetic checkpoints, texts, the demo and the `vllm-dms` command line."""
