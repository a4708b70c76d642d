"""C.4 rows 9 and 12: too little KV memory for one max-length request fails at startup, with
needed vs available and the largest feasible max_model_len, along vLLM's real sizing path
(get_kv_cache_configs on DMSCompactSpec, then the DMS scheduler on the num_blocks it produced).
After startup no request within max_model_len can be refused for size (one formula).
"""
import random
import re

from test_scheduler import (dms, dms_spec, layer_names, llama_dir,  # noqa: F401
                            make_request, make_scheduler, make_vllm_config)

import pytest
from vllm.utils.math_utils import cdiv
from vllm.v1.core.kv_cache_utils import get_kv_cache_configs

from vllm_dms.engine.config import DMSConfigError

L, SEQS, MAX_LEN, P = 16, 64, 8192, 16


def _sized(spec_mod, llama_dir, budget, max_len=MAX_LEN):
    """(VllmConfig, spec, num_blocks) exactly as vLLM sizes a DMS KV cache for `budget` bytes."""
    vc = make_vllm_config(llama_dir, max_num_seqs=SEQS, max_num_batched_tokens=max_len,
                          max_model_len=max_len, block_size=P)
    spec = dms_spec(spec_mod, block_size=P, max_num_seqs=SEQS)
    cfg = get_kv_cache_configs(vc, [dict.fromkeys(layer_names(L), spec)], [budget])[0]
    return vc, spec, cfg.num_blocks


def test_r9_vllm_check_uses_compact_accounting(dms, llama_dir):
    spec_mod, _ = dms
    spec = dms_spec(spec_mod, block_size=P, max_num_seqs=SEQS)
    need = cdiv(MAX_LEN, P) * spec.page_size_bytes * L  # one unmeasured max-length request
    with pytest.raises(ValueError) as e:
        _sized(spec_mod, llama_dir, need // 2)
    msg = str(e.value)
    fits = (need // 2) // (spec.page_size_bytes * L) * P  # compact pages, not dense bf16 ones
    for needle in (f"max seq len ({MAX_LEN})", "KV cache is needed", "available KV cache memory",
                   f"estimated maximum model length is {fits}", "gpu_memory_utilization",
                   "max_model_len"):
        assert needle in msg, (needle, msg)


def test_r9_state_region_alone_too_big(dms, llama_dir):
    spec_mod, sched_mod = dms
    vc = make_vllm_config(llama_dir, max_num_seqs=SEQS, max_num_batched_tokens=MAX_LEN,
                          max_model_len=MAX_LEN)
    with pytest.raises(ValueError) as e:
        make_scheduler(sched_mod.DMSScheduler, vc, dms_spec(spec_mod, max_num_seqs=SEQS), L, 2)
    for needle in ("DMS arena too small", "state region", "--gpu-memory-utilization",
                   "--max-num-seqs"):
        assert needle in str(e.value), (needle, str(e.value))


def test_r9_vllm_sized_but_state_region_short_fails_at_startup(dms, llama_dir):
    """vLLM's check passes at exactly one max-length request's pages; the DMS state region makes
    it short. Startup must refuse, and the max_model_len it proposes must start."""
    spec_mod, sched_mod = dms
    spec = dms_spec(spec_mod, block_size=P, max_num_seqs=SEQS)
    budget = cdiv(MAX_LEN, P) * spec.page_size_bytes * L
    vc, spec, blocks = _sized(spec_mod, llama_dir, budget)  # vLLM accepts this
    assert blocks == cdiv(MAX_LEN, P)
    with pytest.raises(DMSConfigError) as e:
        make_scheduler(sched_mod.DMSScheduler, vc, spec, L, blocks)
    msg = str(e.value)
    for needle in (f"--max-model-len {MAX_LEN}", f"needs {blocks} blocks", "state region",
                   "--gpu-memory-utilization", "--kv-cache-memory-bytes", "--max-num-seqs"):
        assert needle in msg, (needle, msg)
    best = int(re.search(r"Lower --max-model-len to at most (\d+)", msg).group(1))
    assert 0 < best < MAX_LEN
    vc2 = make_vllm_config(llama_dir, max_num_seqs=SEQS, max_num_batched_tokens=MAX_LEN,
                           max_model_len=best, block_size=P)
    s = make_scheduler(sched_mod.DMSScheduler, vc2, spec, L, blocks)  # the advice works
    assert s.dms.refusal(make_request("r", best - 1, 1)) is None


def test_r12_after_startup_no_request_within_max_model_len_is_refused(dms, llama_dir):
    """Sizing and admission share one formula: anything that started serves every length."""
    spec_mod, sched_mod = dms
    probe = dms_spec(spec_mod, block_size=P, max_num_seqs=SEQS)
    rng = random.Random(12)
    for extra in (0, 1, 7, 40):  # blocks on top of the smallest arena that starts
        budget = cdiv(MAX_LEN, P) * probe.page_size_bytes * L
        vc, spec, blocks = _sized(spec_mod, llama_dir, budget)
        while True:
            try:
                s = make_scheduler(sched_mod.DMSScheduler, vc, spec, L, blocks + extra)
                break
            except DMSConfigError:
                blocks += 1
        for i in range(200):
            prompt = rng.randint(1, MAX_LEN - 1)
            req = make_request(f"q{i}", prompt, rng.randint(1, MAX_LEN - prompt))
            assert s.dms.refusal(req) is None, (prompt, req.max_tokens, blocks + extra)
        assert s.dms.refusal(make_request("max", MAX_LEN - 1, 1)) is None
