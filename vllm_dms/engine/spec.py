"""DMSCompactSpec: the KV-cache spec of a DMS layer, and its registration with vLLM.

One vLLM block of this spec is one arena page of one layer (``vllm_dms.engine.arena``): H
sub-pages of P slots of ``2*D*elem + 4`` bytes. vLLM sizes the KV memory from ``page_size_bytes``
as usual (``num_blocks = bytes // (page * layers)``); the scheduler side
(``vllm_dms.engine.ledger``) turns the blocks into a reservation ledger.

The spec is registered as its *own* uniform-type base so that DMS layers never share a KV-cache
group (and a block table) with dense layers. Its manager class only exists because the registry
and the coordinator need one: all accounting lives in ``DMSKVCacheManager``, which replaces the
stock KVCacheManager in ``DMSScheduler``; used by anything else, the manager refuses to allocate.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import (FullAttentionManager,
                                                         register_all_kvcache_specs)
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVQuantMode
from vllm.v1.kv_cache_spec_registry import _REGISTRY_KVCACHESPEC_LIST, KVCacheSpecRegistry

from vllm_dms.engine.arena import spec_page_bytes

if TYPE_CHECKING:
    from vllm.config import VllmConfig


@dataclass(frozen=True, kw_only=True)
class DMSCompactSpec(FullAttentionSpec):
    dms_window: int
    dms_elem_bytes: int = 1   # 1: FP8 e4m3 store, 2: bf16 test store
    dms_max_num_seqs: int     # sizes the state region (S1 = dms_max_num_seqs + 1 slots)

    def __post_init__(self) -> None:
        super().__post_init__()
        # The arena is addressed by our kernels only; vLLM's quantized-KV paths must stay off.
        if self.kv_quant_mode != KVQuantMode.NONE:
            raise ValueError(f"DMSCompactSpec needs kv_quant_mode NONE, got {self.kv_quant_mode}")
        if self.head_size_v != self.head_size:
            raise ValueError(f"DMSCompactSpec needs head_size_v == head_size "
                             f"({self.head_size_v} != {self.head_size})")

    @property
    def real_page_size_bytes(self) -> int:
        return spec_page_bytes(self.num_kv_heads, self.head_size, self.block_size,
                               self.dms_elem_bytes)

    def max_memory_usage_bytes(self, vllm_config: VllmConfig) -> int:
        # One max-length request before anything is measured (ArenaLayout.max_request_blocks):
        # the honest worst case, paid only while its prompt is prefilled.
        return cdiv(vllm_config.model_config.max_model_len, self.block_size) * self.page_size_bytes

    @classmethod
    def merge(cls, specs: list[DMSCompactSpec]) -> DMSCompactSpec:
        # AssertionError (not ValueError) is what is_kv_cache_spec_uniform expects for "differs".
        for s in specs[1:]:
            if s != specs[0]:
                diff = [f.name for f in dataclasses.fields(s)
                        if getattr(s, f.name) != getattr(specs[0], f.name)]
                raise AssertionError(f"DMS layers in one KV cache group differ in {diff}")
        return specs[0]


class DMSCompactManager(FullAttentionManager):
    """Registry placeholder: DMSKVCacheManager does all DMS accounting, never through this."""

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        raise RuntimeError(
            "DMSCompactSpec KV caches must be scheduled by vllm_dms.engine.scheduler.DMSScheduler "
            "(set scheduler_cls); the stock KVCacheManager would hand dense block ids to the "
            "DMS worker")

    def get_num_common_prefix_blocks(self, running_request_id: str) -> int:
        return 0  # pages are request-private: no cascade attention


def register_spec() -> None:
    """Register DMSCompactSpec -> DMSCompactManager as its own uniform-type base; idempotent."""
    if not _REGISTRY_KVCACHESPEC_LIST:
        # The registry fills the built-ins only while it is empty; never be first in.
        register_all_kvcache_specs(None)
    KVCacheSpecRegistry.register(DMSCompactSpec, DMSCompactManager,
                                 uniform_type_base_spec=DMSCompactSpec)
