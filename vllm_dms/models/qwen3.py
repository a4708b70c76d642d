"""DMS Qwen3: stock vLLM Qwen3ForCausalLM plus the DMS transform (lane read after q_norm)."""
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from vllm_dms.models.transform import apply_dms_transform, dms_mode


class DMSQwen3ForCausalLM(Qwen3ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        dms, compact = dms_mode(vllm_config)
        apply_dms_transform(self, dms, compact)
        self._hf_config = vllm_config.model_config.hf_config

    def dms_after_dummy_weights(self) -> None:
        if getattr(self._hf_config, "dms_synthetic", None):  # calibrated synthetic checkpoint
            from vllm_dms.synthetic import apply_synthetic_weights
            apply_synthetic_weights(self, self._hf_config)
