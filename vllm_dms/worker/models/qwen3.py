"""DMS Qwen3: stock vLLM Qwen3ForCausalLM plus the DMS transform (lane read after q_norm)."""
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from vllm_dms.worker.models.transform import DMSModelMixin


class DMSQwen3ForCausalLM(DMSModelMixin, Qwen3ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._dms_init(vllm_config)
