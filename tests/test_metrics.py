"""DMS gauges on vLLM's Prometheus /metrics, the whole path on CPU (Triton interpreter):

kernels' live counter (DMSRuntime.slot_live) -> publish() -> the worker's report on the
ModelRunnerOutput -> DMSScheduler
.make_stats -> EngineCoreOutputs through vLLM's msgpack codec -> StatLoggerManager (our plugin
logger, then vLLM's LoggingStatLogger) -> prometheus_client text.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first @triton.jit

from test_scheduler import (dms, llama_dir, make_request, make_scheduler,  # noqa: E402,F401
                            make_vllm_config, runner_output)

import types  # noqa: E402

import pytest  # noqa: E402
from prometheus_client import REGISTRY, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from vllm.v1.engine import EngineCoreOutputs  # noqa: E402
from vllm.v1.metrics.loggers import (LoggingStatLogger, PrometheusStatLogger,  # noqa: E402
                                     StatLoggerManager, load_stat_logger_plugin_factories)
from vllm.v1.metrics.stats import SchedulerStats  # noqa: E402
from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder  # noqa: E402

from vllm_dms.engine.channel import FEEDBACK_ATTR, ORDERS_ATTR  # noqa: E402
from vllm_dms.worker.runtime import WorkerLink  # noqa: E402
from vllm_dms.engine.config import DMSConfig  # noqa: E402
from vllm_dms.worker.kernels.arena_ops import arena_state  # noqa: E402
from vllm_dms.engine.metrics import GAUGES, DMSPrometheusStatLogger, take_dms_stats  # noqa: E402
from vllm_dms.engine.scheduler import METRICS_ENV, STATS_KEY  # noqa: E402

H, G, D, P, W, L, S, BLOCKS, MAX_LEN = 2, 2, 32, 16, 4, 2, 4, 40, 128
NAMES = {f"vllm:dms_{k}" for k in GAUGES}


def scrape() -> dict[str, float]:
    """Every sample of the default registry by name (one engine, so one sample per gauge)."""
    text = generate_latest(REGISTRY).decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name.startswith("vllm:")}


def dms_config(vc, spec_mod, monkeypatch, metrics=True):
    if metrics:
        monkeypatch.setenv(METRICS_ENV, "1")
    else:
        monkeypatch.delenv(METRICS_ENV, raising=False)
    vc.cache_config.cache_dtype = "dms_fp8"  # what --kv-cache-dtype dms_fp8 leaves in the config
    return spec_mod.DMSCompactSpec(block_size=P, num_kv_heads=H, head_size=D, dtype=torch.uint8,
                                   dms_window=W, dms_max_num_seqs=S)


class ArenaWorker:
    """The DMS worker on CPU: real arenas, DMSRuntime and the backend impl (store + attend)."""

    def __init__(self, layout, seed=0):
        from vllm_dms.worker.backend import DMSCompactAttentionImpl
        from vllm_dms.worker.runtime import DMSRuntime
        self.layout, self.names = layout, [f"l{i}" for i in range(L)]
        self.kvs = [torch.zeros(layout.num_blocks, layout.page_bytes, dtype=torch.uint8)
                    for _ in range(L)]
        self.dms = DMSConfig(arch="llama", num_layers=L, num_q_heads=H * G, num_kv_heads=H,
                             head_dim=D, window=W, alpha_scale=100.0, alpha_offset=5.0,
                             decision_shift=1, target_cr=None, source="test")
        self.rt = DMSRuntime(self.dms, layout, self.names, H * G, torch.device("cpu"))
        self.rt.init_arenas(self.kvs)
        self.link = WorkerLink()  # what the worker patch drives around each step
        self.link.runtime = self.rt
        self.impl = DMSCompactAttentionImpl(H * G, D, D ** -0.5, H)
        self.gen = torch.Generator().manual_seed(seed)
        self.slot: dict[str, int] = {}
        self.seq: dict[str, dict] = {}

    def tensors(self, rid):
        if rid not in self.seq:  # q/k/v for every position; lane D-1 carries the decision
            T = MAX_LEN
            q = torch.randn(T, H * G, D, generator=self.gen).to(torch.bfloat16)
            q[:, ::G, D - 1] = torch.where(torch.rand(T, H, generator=self.gen) < 0.6, 0.3,
                                           -0.2).to(torch.bfloat16)
            self.seq[rid] = dict(q=q, k=torch.randn(T, H, D, generator=self.gen).to(torch.bfloat16),
                                 v=torch.randn(T, H, D, generator=self.gen).to(torch.bfloat16))
        return self.seq[rid]

    def step(self, sched, out):
        from vllm_dms.worker.backend import DMSMetadata
        self.link.receive(getattr(out, ORDERS_ATTR))  # releases before the forward
        for r in out.finished_req_ids | out.preempted_req_ids:
            self.slot.pop(r, None)
        for r in out.scheduled_new_reqs:  # block id = slot + S1 * owner tag
            slot, tag = divmod(r.block_ids[0][0], self.layout.num_slots)[::-1]
            self.slot[r.req_id] = slot
            self.rt.slot_tag[slot] = tag  # what DMSMetadataBuilder.build decodes
        i32 = dict(dtype=torch.int32)
        for rid, k in out.num_scheduled_tokens.items():
            done = sched.requests[rid].num_computed_tokens - k
            slot, x = self.slot[rid], self.tensors(rid)
            self.rt.slot_ntok[slot] = done + k
            s = torch.tensor([slot], **i32)
            if done == 0:  # whole prompt in one step
                cu = torch.tensor([0, k], **i32)
                md = DMSMetadata(k, 0, 0, 1, k, s, torch.zeros(0, **i32), cu,
                                 (cu[1:] - 1).long(), self.rt)
            else:
                assert k == 1
                md = DMSMetadata(1, 1, 1, 0, 0, s, torch.tensor([done], **i32),
                                 torch.zeros(1, **i32), torch.zeros(0, dtype=torch.long), self.rt)
            sl = slice(done, done + k)
            for name, kv in zip(self.names, self.kvs):  # the last layer publishes
                out_buf = torch.empty(k, H * G * D, dtype=torch.bfloat16)
                self.impl.forward(types.SimpleNamespace(layer_name=name),
                                  x["q"][sl].reshape(k, -1), x["k"][sl].reshape(k, -1),
                                  x["v"][sl].reshape(k, -1), kv, md, out_buf)
        self.link.after_forward()
        mro = runner_output(sched, out)
        setattr(mro, FEEDBACK_ATTR, self.link.report())
        return mro

    def live_in_arenas(self, slot) -> int:
        return sum(int(arena_state(kv.view(-1), self.layout).row_len[slot].sum())
                   for kv in self.kvs)


def test_live_counter_reaches_prometheus(dms, llama_dir, monkeypatch):  # noqa: F811
    spec_mod, sched_mod = dms
    vc = make_vllm_config(llama_dir, max_num_seqs=S, max_num_batched_tokens=256,
                          max_model_len=MAX_LEN)
    sched = make_scheduler(sched_mod.DMSScheduler, vc, dms_config(vc, spec_mod, monkeypatch),
                           L, BLOCKS)
    mgr = sched.dms
    worker = ArenaWorker(mgr.layout)
    loggers = StatLoggerManager(vc, custom_stat_loggers=[DMSPrometheusStatLogger])
    kinds = [type(x) for x in loggers.stat_loggers]
    assert kinds[0] is DMSPrometheusStatLogger and PrometheusStatLogger not in kinds
    assert any(getattr(x, "per_engine_stat_loggers", None) for x in loggers.stat_loggers), (
        "vLLM's LoggingStatLogger runs after ours and must not see the DMS dict")
    for rid, n, out_len in (("a", 23, 5), ("b", 9, 3), ("c", 40, 2)):
        sched.add_request(make_request(rid, n, out_len))
    enc, dec = MsgpackEncoder(), MsgpackDecoder(EngineCoreOutputs)
    block_bytes = mgr.layout.page_bytes * L
    compressed = False
    while sched.has_requests():
        out = sched.schedule()
        eco = sched.update_from_output(out, worker.step(sched, out))[0]
        stats = dec.decode(enc.encode(eco)).scheduler_stats  # what the front-end receives
        live = dense = 0
        for rid, slot in mgr._slot_of.items():
            in_arena = worker.live_in_arenas(slot)
            assert int(worker.rt.slot_live[slot]) == in_arena, "counter == sum of row_len"
            assert mgr.link.read_live(slot)[1] == in_arena, "reported with the step's output"
            live += in_arena
            dense += sched.requests[rid].num_computed_tokens * L * H
        assert stats.kv_connector_stats[STATS_KEY]["live_kv_tokens"] == live
        loggers.record(stats, None)
        assert stats.kv_connector_stats is None, "popped before vLLM's LoggingStatLogger"
        m = scrape()
        assert m["vllm:dms_live_kv_tokens"] == live
        assert m["vllm:dms_evicted_kv_tokens"] == dense - live
        assert m["vllm:dms_compression_ratio"] == pytest.approx(dense / live if live else 1.0)
        in_use = (mgr.layout.first_data_block + mgr.num_held) * block_bytes
        assert m["vllm:dms_arena_bytes_in_use"] == in_use
        assert m["vllm:dms_arena_bytes_free"] == mgr.block_pool.get_num_free_blocks() * block_bytes
        assert m["vllm:dms_arena_bytes_in_use"] + m["vllm:dms_arena_bytes_free"] == (
            BLOCKS * block_bytes)
        assert m["vllm:kv_cache_usage_perc"] == pytest.approx(mgr.usage)  # compact usage
        assert m["vllm:num_requests_running"] == len(sched.running)
        compressed |= live > 0 and dense > live
    assert compressed, "the run must evict something"
    m = scrape()
    assert m["vllm:dms_live_kv_tokens"] == 0 and m["vllm:kv_cache_usage_perc"] == 0
    assert m["vllm:dms_arena_bytes_in_use"] == mgr.layout.first_data_block * block_bytes


def test_gauges_from_simulated_rows(dms, llama_dir, monkeypatch):  # noqa: F811
    """The stats dict the scheduler builds from hand-written worker rows."""
    spec_mod, sched_mod = dms
    vc = make_vllm_config(llama_dir, max_num_seqs=S, max_num_batched_tokens=256,
                          max_model_len=MAX_LEN)
    sched = make_scheduler(sched_mod.DMSScheduler, vc, dms_config(vc, spec_mod, monkeypatch),
                           L, BLOCKS)
    mgr = sched.dms
    for rid, n in (("x", 30), ("y", 12)):
        sched.add_request(make_request(rid, n, 8))
    sched.schedule()
    sx, sy = mgr.slot_of("x"), mgr.slot_of("y")
    gx, gy = mgr._gen[sx], mgr._gen[sy]  # (n_done, pages, live, owner tag)
    mgr.link.feedback[sx] = torch.tensor([30, 4, 50, gx], dtype=torch.int32)
    mgr.link.feedback[sy] = torch.tensor([12, 2, 48, gy], dtype=torch.int32)
    mgr.link.feedback[S] = torch.tensor([99, 9, 999, 0], dtype=torch.int32)  # nobody's: ignored
    page = mgr.layout.page_bytes * L
    got = sched.make_stats().kv_connector_stats[STATS_KEY]
    dense = (30 + 12) * L * H
    assert got == dict(live_kv_tokens=98, evicted_kv_tokens=dense - 98,
                       compression_ratio=dense / 98,
                       arena_bytes_in_use=(mgr.layout.first_data_block + mgr.num_held) * page,
                       arena_bytes_free=mgr.block_pool.get_num_free_blocks() * page)
    mgr.link.invalidate(sy)  # a slot that changed owner counts nothing until the worker reports
    assert sched.make_stats().kv_connector_stats[STATS_KEY]["live_kv_tokens"] == 50


def test_no_dict_without_the_dms_logger(dms, llama_dir, monkeypatch):  # noqa: F811
    """Handshake: without VLLM_DMS_METRICS (no DMS logger in the front-end) nothing is attached;
    that matters because vLLM's LoggingStatLogger cannot take a kv_connector_stats dict without
    a KV connector, while its Prometheus logger ignores it."""
    spec_mod, sched_mod = dms
    vc = make_vllm_config(llama_dir, max_num_seqs=S, max_num_batched_tokens=256,
                          max_model_len=MAX_LEN)
    spec = dms_config(vc, spec_mod, monkeypatch, metrics=False)
    sched = make_scheduler(sched_mod.DMSScheduler, vc, spec, L, BLOCKS)
    assert sched.make_stats().kv_connector_stats is None
    payload = {STATS_KEY: {k: 1 for k in GAUGES}}
    PrometheusStatLogger(vc).record(SchedulerStats(kv_connector_stats=dict(payload)), None)
    with pytest.raises(AttributeError, match="connector_cls"):
        LoggingStatLogger(vc).record(SchedulerStats(kv_connector_stats=dict(payload)), None)
    other = SchedulerStats(kv_connector_stats={"other": 1, **payload})
    assert take_dms_stats(other) == payload[STATS_KEY] and other.kv_connector_stats == {"other": 1}
    assert take_dms_stats(SchedulerStats()) is None and take_dms_stats(None) is None


def test_dense_engine_gets_stock_series_only(llama_dir):  # noqa: F811
    vc = make_vllm_config(llama_dir, max_num_seqs=S, max_num_batched_tokens=256,
                          max_model_len=MAX_LEN)
    logger = DMSPrometheusStatLogger(vc)
    assert logger.dms_gauges == {}
    logger.record(SchedulerStats(kv_cache_usage=0.25), None)
    m = scrape()
    assert not NAMES & set(m) and m["vllm:kv_cache_usage_perc"] == 0.25


def test_asyncllm_patch_adds_dms_logger_only_for_dms_fp8(llama_dir, monkeypatch):  # noqa: F811
    """patches/metrics.py: dms_fp8 engines get DMSPrometheusStatLogger and the handshake; any
    other dtype reaches vLLM's AsyncLLM.__init__ with its arguments untouched."""
    from vllm.v1.engine import async_llm

    from vllm_dms.patches import metrics as patch
    seen = []
    monkeypatch.setattr(async_llm.AsyncLLM, "__init__",
                        lambda self, vc, *a, **kw: seen.append((vc.cache_config.cache_dtype, kw)))
    patch.apply()
    monkeypatch.delenv(METRICS_ENV, raising=False)
    vc = make_vllm_config(llama_dir, max_num_seqs=S, max_num_batched_tokens=256,
                          max_model_len=MAX_LEN)
    async_llm.AsyncLLM(vc, None, False)
    assert seen[-1] == ("auto", {}) and METRICS_ENV not in os.environ
    vc.cache_config.cache_dtype = "dms_fp8"
    async_llm.AsyncLLM(vc, None, False, stat_loggers=None)
    assert seen[-1][1]["stat_loggers"] == [DMSPrometheusStatLogger]
    assert os.environ.get(METRICS_ENV) == "1"
    kinds = [type(x) for x in StatLoggerManager(
        vc, custom_stat_loggers=seen[-1][1]["stat_loggers"]).stat_loggers]
    assert DMSPrometheusStatLogger in kinds and PrometheusStatLogger not in kinds
    assert NAMES <= set(scrape())
