"""DMS Llama: stock vLLM LlamaForCausalLM plus the DMS transform."""
from vllm.model_executor.models.llama import LlamaForCausalLM

from vllm_dms.worker.models.transform import DMSModelMixin


class DMSLlamaForCausalLM(DMSModelMixin, LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._dms_init(vllm_config)
