"""Several DMS engines in one process and engine-side failures (C.4 rows 5, 24, 25).

With VLLM_ENABLE_V1_MULTIPROCESSING=0 (or TP=1 UniProc) the scheduler and the worker of an
engine live in the caller's process, so a second engine in the same process must start clean:
no state is process-wide (each scheduler has its ``link``, each worker its ``WorkerLink`` on its
own layers). Row 5: both correct, no shared arena. CPU only: real DMSScheduler /
DMSMetadataBuilder objects, arena kernels in Triton's interpreter. The same through ``vllm.LLM``:
tests/test_cpu_executors.py.
"""
import os
import types

from test_scheduler import (SimWorker, dms, dms_live_8x, dms_spec, drive,  # noqa: F401
                            layer_names, make_request, make_scheduler, make_vllm_config)

import pytest
import torch
from vllm.v1.request import RequestStatus

NV = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "ckpt_nvidia_qwen3")
H, D, P, L = 2, 32, 16, 2  # the nvidia fixture: 2 layers, 2 KV heads of 32


def _engine_scheduler(sched_mod, spec_mod, seqs, blocks, max_len=256):
    vc = make_vllm_config(NV, max_num_seqs=seqs, max_num_batched_tokens=max_len,
                          max_model_len=max_len)
    spec = dms_spec(spec_mod, heads=H, head_dim=D, block_size=P, window=32, max_num_seqs=seqs)
    return make_scheduler(sched_mod.DMSScheduler, vc, spec, L, blocks)


def test_r5_second_dms_scheduler_in_process_starts_clean(dms):
    spec_mod, sched_mod = dms
    s1 = _engine_scheduler(sched_mod, spec_mod, seqs=4, blocks=120)
    s1.add_request(make_request("a", 40, 3))
    worker = SimWorker(s1.dms, dms_live_8x(32))
    out = s1.schedule()
    s1.update_from_output(out, worker.step(s1, out))
    s1.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert s1.dms.link.release, "engine 1 stopped with a freed slot not yet sent to its worker"
    # engine 2 in the same process, other max_num_seqs: must start, with nothing of engine 1's
    s2 = _engine_scheduler(sched_mod, spec_mod, seqs=8, blocks=200)
    assert s2.dms.link.release == [] and tuple(s2.dms.link.feedback.shape) == (9, 4)
    s2.add_request(make_request("b", 40, 4))
    drive(s2, SimWorker(s2.dms, dms_live_8x(32)).step, 50)
    assert s2.dms.num_held == 0 and s2.dms.block_pool.get_num_free_blocks() == s2.dms.num_usable
    assert s1.dms.link.release, "engine 2 never takes engine 1's orders"


def _builder(spec_mod, seqs, num_blocks, max_len):
    from vllm_dms.worker.backend import DMSMetadataBuilder
    vc = make_vllm_config(NV, max_num_seqs=seqs, max_num_batched_tokens=max_len,
                          max_model_len=max_len)
    spec = dms_spec(spec_mod, heads=H, head_dim=D, block_size=P, window=32, max_num_seqs=seqs)
    names = layer_names(L)
    kv = [torch.zeros(num_blocks, spec.page_size_bytes, dtype=torch.uint8) for _ in names]
    ctx = vc.compilation_config.static_forward_context
    for n, t in zip(names, kv):
        ctx[n] = types.SimpleNamespace(kv_cache=t)
    return (lambda: DMSMetadataBuilder(spec, names, vc, torch.device("cpu"))), kv


def test_r5_second_engine_gets_its_own_arena_runtime(dms):
    from vllm_dms.worker.kernels.arena_ops import arena_state
    spec_mod, _ = dms
    make1, kv1 = _builder(spec_mod, seqs=4, num_blocks=60, max_len=256)
    rt1 = make1()._ensure_runtime()
    assert rt1.layout.num_blocks == 60
    make2, kv2 = _builder(spec_mod, seqs=8, num_blocks=90, max_len=512)
    b2, b2_other = make2(), make2()  # e.g. one builder per micro-batch: one shared runtime
    rt2 = b2._ensure_runtime()
    assert rt2 is not rt1, "engine 2 reused engine 1's runtime (its layout and counters)"
    assert (rt2.layout.num_blocks, rt2.layout.max_num_seqs, rt2.layout.max_model_len) == \
        (90, 8, 512)
    for kv in kv2:  # engine 2's own KV tensors hold an initialised arena
        st = arena_state(kv.view(-1), rt2.layout)
        assert int(st.free_top[0]) == rt2.layout.num_data_subpages
    assert b2_other._ensure_runtime() is rt2
    st1 = arena_state(kv1[0].view(-1), rt1.layout)  # engine 1's arena untouched by engine 2
    assert int(st1.free_top[0]) == rt1.layout.num_data_subpages


# ------------------------------------------------------------------------------ row 24
def test_r24_kernel_overflow_stops_the_step_loudly():
    """A kernel that hit its capacity check must fail the next step (an EngineCore error the
    server turns into 500 / an error chunk), never continue on a violated ledger."""
    from vllm_dms.engine.arena import ArenaLayout
    from vllm_dms.engine.config import DMSConfig
    from vllm_dms.worker.runtime import DMSRuntime
    dmsc = DMSConfig(arch="llama", num_layers=1, num_q_heads=4, num_kv_heads=2, head_dim=32,
                     window=4, alpha_scale=100.0, alpha_offset=5.0, decision_shift=1,
                     target_cr=None, source="test")
    lay = ArenaLayout(num_layers=1, num_kv_heads=2, head_dim=32, block_size=16, window=4,
                      max_num_seqs=2, max_model_len=64, num_blocks=40)
    rt = DMSRuntime(dmsc, lay, ["l0"], 4, torch.device("cpu"))
    rt.check_overflow()  # clean: no error
    rt.overflow[0] = 1
    rt.publish()
    rt.post()  # the end-of-step copy the next step reads
    with pytest.raises(RuntimeError, match="ledger violated"):
        rt.check_overflow()


# ------------------------------------------------------------------------------ row 25
def test_r25_reset_prefix_cache_only_when_idle(dms):
    spec_mod, sched_mod = dms
    s = _engine_scheduler(sched_mod, spec_mod, seqs=4, blocks=120)
    idle_free = s.dms.block_pool.get_num_free_blocks()
    assert s.reset_prefix_cache() is True  # idle: nothing cached, nothing held
    s.add_request(make_request("a", 40, 20))
    worker = SimWorker(s.dms, dms_live_8x(32))
    out = s.schedule()
    s.update_from_output(out, worker.step(s, out))
    assert s.reset_prefix_cache() is False  # a request holds arena blocks
    assert s.reset_prefix_cache(reset_running_requests=True) is True  # preempts, frees, resets
    assert s.dms.num_held == 0 and s.dms.block_pool.get_num_free_blocks() == idle_free
    drive(s, worker.step, 100)  # the preempted request recomputes and finishes
    assert s.dms.block_pool.get_num_free_blocks() == idle_free and not s.dms._slot_of
