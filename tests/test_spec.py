"""DMSCompactSpec: page size, sizing through vLLM's real get_kv_cache_configs, registration.

CPU only; VLLM_USE_V2_MODEL_RUNNER=0 (set by the test_scheduler harness, see there).
"""
import pickle

from test_scheduler import dms, dms_spec, layer_names, llama_dir, make_vllm_config  # noqa: F401

import pytest
import torch
from vllm.utils.math_utils import cdiv
from vllm.v1.core.kv_cache_utils import (get_kv_cache_configs,
                                         get_max_concurrency_for_kv_cache_config,
                                         is_kv_cache_spec_uniform)
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVQuantMode, TQFullAttentionSpec
from vllm.v1.kv_cache_spec_registry import _REGISTRY_KVCACHESPEC_LIST, KVCacheSpecRegistry

from vllm_dms.engine.arena import ArenaLayout, spec_page_bytes

L, H, D, P, W, MAX_LEN = 16, 8, 64, 16, 256, 8320


def test_page_size_and_max_memory_match_arena(dms, llama_dir):
    spec_mod, _ = dms
    vc = make_vllm_config(llama_dir, max_num_seqs=128, max_num_batched_tokens=8192,
                          max_model_len=MAX_LEN)
    for elem in (1, 2):
        s = spec_mod.DMSCompactSpec(block_size=P, num_kv_heads=H, head_size=D, dtype=torch.uint8,
                                    dms_window=W, dms_elem_bytes=elem, dms_max_num_seqs=128)
        layout = ArenaLayout(num_layers=L, num_kv_heads=H, head_dim=D, block_size=P, window=W,
                             max_num_seqs=128, max_model_len=MAX_LEN, num_blocks=1000,
                             elem_bytes=elem)
        assert s.page_size_bytes == s.real_page_size_bytes == layout.page_bytes
        assert s.page_size_bytes == spec_page_bytes(H, D, P, elem) == H * P * (2 * D * elem + 4)
        assert s.max_memory_usage_bytes(vc) == layout.max_request_blocks() * layout.page_bytes
        assert layout.max_request_blocks() == cdiv(MAX_LEN, P)
        assert s.kv_quant_mode == KVQuantMode.NONE
        assert pickle.loads(pickle.dumps(s)) == s  # specs travel worker -> engine core pickled


def test_get_kv_cache_configs_sizes_by_compact_page(dms, llama_dir):
    spec_mod, _ = dms
    vc = make_vllm_config(llama_dir, max_num_seqs=128, max_num_batched_tokens=8192,
                          max_model_len=MAX_LEN)
    s = dms_spec(spec_mod)
    page = s.page_size_bytes
    budget = 7 * 1024**3 + 12345  # not a multiple of anything
    cfg = get_kv_cache_configs(vc, [dict.fromkeys(layer_names(L), s)], [budget])[0]
    assert cfg.num_blocks == budget // (page * L)
    assert len(cfg.kv_cache_groups) == 1
    assert cfg.kv_cache_groups[0].kv_cache_spec == s
    assert len(cfg.kv_cache_groups[0].layer_names) == L
    assert len(cfg.kv_cache_tensors) == L
    assert all(t.size == cfg.num_blocks * page for t in cfg.kv_cache_tensors)
    # "Maximum concurrency" uses the compact worst case: cdiv(max_model_len, P) pages.
    conc = get_max_concurrency_for_kv_cache_config(vc, cfg)
    assert conc == cfg.num_blocks / cdiv(MAX_LEN, P)
    dense = FullAttentionSpec(block_size=P, num_kv_heads=H, head_size=D, dtype=torch.bfloat16)
    dcfg = get_kv_cache_configs(vc, [dict.fromkeys(layer_names(L), dense)], [budget])[0]
    print(f"\n[test5] {budget} B: DMS {cfg.num_blocks} blocks, max concurrency {conc:.2f}x; "
          f"dense bf16 {dcfg.num_blocks} blocks, "
          f"{get_max_concurrency_for_kv_cache_config(vc, dcfg):.2f}x")


def test_merge_keeps_dms_fields_and_rejects_mixtures(dms):
    spec_mod, _ = dms
    a = dms_spec(spec_mod)
    merged = spec_mod.DMSCompactSpec.merge([a, dms_spec(spec_mod)])
    assert merged == a and merged.dms_window == W and merged.dms_max_num_seqs == 128
    with pytest.raises(AssertionError, match="dms_window"):
        spec_mod.DMSCompactSpec.merge([a, dms_spec(spec_mod, window=128)])
    dense = FullAttentionSpec(block_size=P, num_kv_heads=H, head_size=D, dtype=torch.bfloat16)
    assert not is_kv_cache_spec_uniform({"a": a, "b": dense})
    assert is_kv_cache_spec_uniform({"a": a, "b": dms_spec(spec_mod)})
    with pytest.raises(ValueError, match="kv_quant_mode"):
        spec_mod.DMSCompactSpec(block_size=P, num_kv_heads=H, head_size=D, dtype=torch.uint8,
                                dms_window=W, dms_max_num_seqs=4,
                                kv_quant_mode=KVQuantMode.FP8_PER_TENSOR)


def test_register_spec_idempotent_and_builtins_kept(dms):
    spec_mod, _ = dms
    spec_mod.register_spec()
    spec_mod.register_spec()
    s = dms_spec(spec_mod)
    assert KVCacheSpecRegistry.get_manager_class(s) is spec_mod.DMSCompactManager
    assert KVCacheSpecRegistry.get_uniform_type_base_spec(s) is spec_mod.DMSCompactSpec
    dense = FullAttentionSpec(block_size=P, num_kv_heads=H, head_size=D, dtype=torch.bfloat16)
    assert KVCacheSpecRegistry.get_manager_class(dense) is FullAttentionManager
    assert KVCacheSpecRegistry.get_uniform_type_base_spec(dense) is FullAttentionSpec
    assert TQFullAttentionSpec in _REGISTRY_KVCACHESPEC_LIST
    KVCacheSpecRegistry.check_kv_cache_spec_registry({"a": s, "b": dense})


def test_register_spec_first_in_still_registers_builtins(dms):
    spec_mod, _ = dms
    saved = dict(_REGISTRY_KVCACHESPEC_LIST)
    try:
        _REGISTRY_KVCACHESPEC_LIST.clear()  # a fresh worker process, plugin loaded first
        spec_mod.register_spec()
        dense = FullAttentionSpec(block_size=P, num_kv_heads=H, head_size=D, dtype=torch.bfloat16)
        assert KVCacheSpecRegistry.get_manager_class(dense) is FullAttentionManager
        assert spec_mod.DMSCompactSpec in _REGISTRY_KVCACHESPEC_LIST
        assert len(_REGISTRY_KVCACHESPEC_LIST) == len(saved)
    finally:
        _REGISTRY_KVCACHESPEC_LIST.clear()
        _REGISTRY_KVCACHESPEC_LIST.update(saved)
