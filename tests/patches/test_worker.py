"""The worker-side patch (vllm_dms.patches.worker) on vLLM's real WorkerWrapperBase, with a fake
worker behind it: inert for a model without dms_fp8 layers; for a DMS model the orders on the
SchedulerOutput run before the step, and the rows come back on the ModelRunnerOutput (also the
deferred one of async scheduling). CPU only."""
import types

import pytest
import torch
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, AsyncModelRunnerOutput, ModelRunnerOutput
from vllm.v1.worker.worker_base import WorkerWrapperBase

from vllm_dms.engine.arena import ArenaLayout
from vllm_dms.engine.channel import FEEDBACK_ATTR, ORDERS_ATTR, StepOrders
from vllm_dms.engine.config import DMSConfig
from vllm_dms.patches import worker as patch
from vllm_dms.worker.runtime import DMSRuntime, worker_link

NS = types.SimpleNamespace


@pytest.fixture(autouse=True, scope="module")
def applied():
    patch.check()
    patch.apply()


class FakeWorker:
    def __init__(self, result, sampled=None, step=None):
        self.result, self.sampled, self.step, self.calls = result, sampled, step, []

    def execute_model(self, so):
        self.calls.append("execute")
        if self.step:
            self.step()
        return self.result

    def sample_tokens(self, grammar_output):
        self.calls.append("sample")
        return self.sampled() if callable(self.sampled) else self.sampled


def wrapper(ctx, worker):
    w = WorkerWrapperBase(rpc_rank=0)
    w.vllm_config = NS(compilation_config=NS(static_forward_context=ctx))
    w.worker, w.mm_receiver_cache = worker, None
    return w


def step_output(orders=None, tokens=1):
    so = SchedulerOutput.make_empty()
    so.total_num_scheduled_tokens = tokens
    if orders is not None:
        setattr(so, ORDERS_ATTR, orders)
    return so


def mro():
    return ModelRunnerOutput(req_ids=["a"], req_id_to_index={"a": 0}, sampled_token_ids=[[5]])


def dms_ctx():
    lay = ArenaLayout(num_layers=1, num_kv_heads=2, head_dim=32, block_size=16, window=4,
                      max_num_seqs=2, max_model_len=64, num_blocks=40)
    cfg = DMSConfig(arch="llama", num_layers=1, num_q_heads=4, num_kv_heads=2, head_dim=32,
                    window=4, alpha_scale=100.0, alpha_offset=5.0, decision_shift=1,
                    target_cr=None, source="test")
    ctx = {"l0": NS(kv_cache_dtype="dms_fp8",
                    kv_cache=torch.zeros(lay.num_blocks, lay.page_bytes, dtype=torch.uint8)),
           "mlp": NS()}
    rt = DMSRuntime(cfg, lay, ["l0"], 4, torch.device("cpu"))
    rt.init_arenas([ctx["l0"].kv_cache])
    worker_link(ctx, ["l0"]).runtime = rt
    return ctx, rt


def test_apply_is_idempotent():
    wrapped = WorkerWrapperBase.execute_model
    patch.apply()
    assert WorkerWrapperBase.execute_model is wrapped and wrapped.__wrapped__ is not wrapped


def test_a_model_without_dms_layers_is_stock():
    out, sampled = mro(), mro()
    w = wrapper({"l0": NS(kv_cache_dtype="auto")}, FakeWorker(out, sampled))
    assert w.execute_model(step_output(StepOrders(release=[1]))) is out
    assert w.sample_tokens(None) is sampled
    assert not hasattr(out, FEEDBACK_ATTR) and not hasattr(sampled, FEEDBACK_ATTR)
    assert w.__dict__[patch._CACHE] is False, "decided once"


def test_orders_run_before_the_step_and_rows_come_back():
    ctx, rt = dms_ctx()
    seen = []
    rt.release = lambda kv, slots: seen.append(("release", slots))
    rt.fork = lambda kv, pairs: seen.append(("fork", pairs))

    def step():  # the forward: its last layer stages slot 1's row
        seen.append(("forward",))
        rt.slot_ntok[1], rt.slot_tag[1] = 12, 3
        rt.publish()
    fake = FakeWorker(None, mro, step)  # a fresh output per call
    w = wrapper(ctx, fake)
    orders = StepOrders(release=[2], forks=[(2, 1)], snapshots=[(1, 8, 2, 4)])
    assert w.execute_model(step_output(orders)) is None  # sample_tokens follows
    assert seen == [("release", [2]), ("fork", [(2, 1)]), ("forward",)]
    assert worker_link(ctx, ["l0"]).take_snapshots() == [(1, 8, 2, 4)], "left for the build"
    out = w.sample_tokens(None)
    assert getattr(out, FEEDBACK_ATTR)[1].tolist() == [12, 0, 0, 3]
    again = w.sample_tokens(None)
    assert not hasattr(again, FEEDBACK_ATTR), "a report is sent once"


def test_async_output_gets_the_rows_taken_in_the_worker_thread():
    ctx, rt = dms_ctx()
    final = mro()

    class Deferred(AsyncModelRunnerOutput):
        def get_output(self):
            return final
    def step():
        rt.slot_ntok.fill_(7)
        rt.publish()
    w = wrapper(ctx, FakeWorker(None, Deferred(), step))
    w.execute_model(step_output())
    deferred = w.sample_tokens(None)
    rt.slot_ntok.fill_(9)  # a later step: must not leak into this output's rows
    rt.publish()
    rt.post()
    assert deferred.get_output() is final and getattr(final, FEEDBACK_ATTR)[1, 0] == 7


def test_empty_steps_leave_the_shared_empty_output_alone():
    ctx, rt = dms_ctx()
    w = wrapper(ctx, FakeWorker(EMPTY_MODEL_RUNNER_OUTPUT))
    rt.publish()
    rt.post()  # a report is pending
    assert w.execute_model(step_output(tokens=0)) is EMPTY_MODEL_RUNNER_OUTPUT
    assert not hasattr(EMPTY_MODEL_RUNNER_OUTPUT, FEEDBACK_ATTR)
    assert rt.ring.latest() is not None, "kept for the next real output"
