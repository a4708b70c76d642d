"""DMS scheduler tests through vLLM's real Scheduler and KVCacheManager (CPU only).

VLLM_USE_V2_MODEL_RUNNER=0 (the V1 runner's output format) for every test here: on a CPU host
vLLM refuses MRv2 ("Model Runner V2 requires Triton"). test_admission_events additionally flips
``Scheduler.use_v2_model_runner`` to check MRv2's format (resumed requests reported as new).

This module is also the shared harness (test_spec / test_admission_events import it) and, run as
a script, the stock-vLLM side of the parity test: that part must not import vllm_dms.
"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"

import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import vllm.platforms as _platforms  # noqa: E402
from vllm.platforms.cpu import CpuPlatform  # noqa: E402

_platforms._current_platform = CpuPlatform()

import pytest  # noqa: E402
import torch  # noqa: E402
from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.utils.math_utils import cdiv  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheConfig,  # noqa: E402
                                        KVCacheGroupSpec)
from vllm.v1.outputs import ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
LLAMA_1B_LIKE = "sched_llama_1b_like.json"  # 16 layers, 8 kv heads, head_dim 64
init_none_hash(sha256)


# ---------------------------------------------------------------------------- harness (vLLM only)
def model_dir(root: Path, fixture: str = LLAMA_1B_LIKE) -> str:
    d = Path(root) / Path(fixture).stem
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(FIXTURES / fixture, d / "config.json")
    return str(d)


def make_vllm_config(model: str, *, max_num_seqs: int, max_num_batched_tokens: int,
                     max_model_len: int, block_size: int = 16,
                     enable_prefix_caching: bool = False,
                     async_scheduling: bool = False) -> VllmConfig:
    sc = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                         max_model_len=max_model_len, is_encoder_decoder=False,
                         enable_chunked_prefill=True, async_scheduling=async_scheduling)
    mc = ModelConfig(model=model, dtype="bfloat16", seed=0, skip_tokenizer_init=True,
                     max_model_len=max_model_len)
    cc = CacheConfig(block_size=block_size, gpu_memory_utilization=0.9, cache_dtype="auto",
                     enable_prefix_caching=enable_prefix_caching)
    vc = VllmConfig(scheduler_config=sc, model_config=mc, cache_config=cc)
    vc.scheduler_config.async_scheduling = async_scheduling  # the CPU platform forces it off
    return vc


def layer_names(n: int) -> list[str]:
    return [f"model.layers.{i}.self_attn.attn" for i in range(n)]


def make_scheduler(cls, vc: VllmConfig, spec, num_layers: int, num_blocks: int):
    kcfg = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                         kv_cache_groups=[KVCacheGroupSpec(layer_names(num_layers), spec)])
    vc.cache_config.num_gpu_blocks = num_blocks
    return cls(vllm_config=vc, kv_cache_config=kcfg,
               structured_output_manager=StructuredOutputManager(vc),
               block_size=spec.block_size, log_stats=True)


def make_request(rid: str, prompt_len: int, max_tokens: int, token: int = 0,
                 block_size: int = 16) -> Request:
    return Request(request_id=rid, prompt_token_ids=[token] * prompt_len,
                   sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   pooling_params=None,
                   block_hasher=get_request_block_hasher(block_size, sha256))


def runner_output(sched, out, token: int = 1) -> ModelRunnerOutput:
    """A model runner that samples one token for every request whose prefill is complete."""
    ids = list(out.num_scheduled_tokens)
    sampled = []
    for rid in ids:
        req = sched.requests[rid]
        sampled.append([token] if req.num_computed_tokens >= req.num_tokens else [])
    return ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                             sampled_token_ids=sampled)


def record(out) -> dict:
    c = out.scheduled_cached_reqs
    rec = {"tokens": sorted(out.num_scheduled_tokens.items()),
           "new": sorted((r.req_id, r.block_ids, r.num_computed_tokens)
                          for r in out.scheduled_new_reqs),
           "cached": sorted((rid, c.new_block_ids[i], rid in c.resumed_req_ids)
                            for i, rid in enumerate(c.req_ids)),
           "preempted": sorted(out.preempted_req_ids), "finished": sorted(out.finished_req_ids),
           "common_prefix": out.num_common_prefix_blocks}
    return json.loads(json.dumps(rec))


def run_trace(sched, trace: dict) -> list[dict]:
    bs = trace["config"]["block_size"]
    arrivals: dict[int, list] = {}
    for r in trace["requests"]:
        arrivals.setdefault(r["arrive_step"], []).append(r)
    aborts: dict[int, list] = {}
    for a in trace["aborts"]:
        aborts.setdefault(a["step"], []).append(a["id"])
    from vllm.v1.request import RequestStatus
    steps = []
    for step in range(trace["max_steps"]):
        for r in arrivals.get(step, []):
            sched.add_request(make_request(r["id"], r["prompt_len"], r["max_tokens"],
                                           token=r["prefix"], block_size=bs))
        if aborts.get(step):
            sched.finish_requests(aborts[step], RequestStatus.FINISHED_ABORTED)
        if step > max(arrivals) and not sched.has_requests():
            break
        out = sched.schedule()
        steps.append(record(out))
        sched.update_from_output(out, runner_output(sched, out))
    return steps


def parity_scheduler(cls, trace: dict, model: str):
    c = trace["config"]
    vc = make_vllm_config(model, max_num_seqs=c["max_num_seqs"],
                          max_num_batched_tokens=c["max_num_batched_tokens"],
                          max_model_len=c["max_model_len"], block_size=c["block_size"],
                          enable_prefix_caching=c["enable_prefix_caching"])
    spec = FullAttentionSpec(block_size=c["block_size"], num_kv_heads=8, head_size=64,
                             dtype=torch.bfloat16)
    return make_scheduler(cls, vc, spec, c["num_layers"], c["num_blocks"])


# ---------------------------------------------------------------------------- DMS worker stand-in
def dms_live(window: int, cr: int):
    """Closed-form compression: per row live = min(n, W+1) + ceil((n - W - 1) / cr)."""
    def live(rid, n_prev, live_prev, n):
        return n if n <= window + 1 else window + 1 + cdiv(n - window - 1, cr)
    return live


def dms_live_8x(window: int):
    return dms_live(window, 8)


class SimWorker:
    """Plays the DMS worker: learns slots and releases only from the SchedulerOutput, and after
    each step reports its rows (n_done, pages_max, 0, tag) on the ModelRunnerOutput."""

    def __init__(self, mgr, live_fn, report=lambda rid: True):
        from vllm_dms.engine.channel import COLS, INVALID
        self.mgr, self.layout, self.live_fn, self.report = mgr, mgr.layout, live_fn, report
        self.slot: dict[str, int] = {}
        self.tag: dict[str, int] = {}  # owner tag decoded from the block id
        self.live: dict[str, tuple[int, int]] = {}  # rid -> (n_done, live tokens per row)
        self.released: list[int] = []
        self.rows = torch.zeros(mgr.layout.num_slots, COLS, dtype=torch.int32)
        self.rows[:, 0] = INVALID

    def step(self, sched, out) -> ModelRunnerOutput:
        from vllm_dms.engine.channel import FEEDBACK_ATTR, ORDERS_ATTR
        drained = getattr(out, ORDERS_ATTR).release
        self.released += drained
        gone = out.finished_req_ids | out.preempted_req_ids
        expect = [self.slot.pop(r) for r in gone if r in self.slot]
        for r in gone:
            self.live.pop(r, None)
        assert sorted(drained) == sorted(expect), (drained, expect)
        new = [(r.req_id, r.block_ids) for r in out.scheduled_new_reqs]
        c = out.scheduled_cached_reqs
        for i, rid in enumerate(c.req_ids):
            if rid in c.resumed_req_ids:
                new.append((rid, c.new_block_ids[i]))
            else:
                assert c.new_block_ids[i] is None, f"{rid}: new block ids after its first step"
        for rid, ids in new:
            assert len(ids) == 1 and len(ids[0]) == 1, (rid, ids)
            assert rid not in self.slot
            S1 = self.layout.num_slots
            self.slot[rid], self.tag[rid], self.live[rid] = ids[0][0] % S1, ids[0][0] // S1, (0, 0)
        assert self.slot == self.mgr._slot_of
        H, P = self.layout.num_kv_heads, self.layout.block_size
        for rid, k in out.num_scheduled_tokens.items():
            n = sched.requests[rid].num_computed_tokens
            n_prev, live_prev = self.live[rid]
            assert n_prev == n - k, (rid, n_prev, n, k)
            # The reservation is exactly the arena's function of what this worker last reported.
            row = self.mgr.link.read_row(self.slot[rid])  # what the scheduler last absorbed
            ok = row[3] == self.tag[rid] and 0 <= row[0] <= n_prev  # this owner's, maybe lagging
            want = self.layout.reservation_blocks(n, row[:2] if ok else None)
            assert self.mgr.held_blocks(rid) == want, (rid, n, row, want)
            live = self.live_fn(rid, n_prev, live_prev, n)
            self.live[rid] = (n, live)
            pages_max = H * cdiv(live, P)
            # The ledger covers what the GPU holds: a pop never underflows the free stack.
            assert pages_max <= H * self.mgr.held_blocks(rid), (rid, pages_max)
            if self.report(rid):
                self.rows[self.slot[rid]] = torch.tensor([n, pages_max, 0, self.tag[rid]],
                                                         dtype=torch.int32)
        used = sum(H * cdiv(lv, P) for _, lv in self.live.values())
        assert used <= self.layout.num_data_subpages
        mro = runner_output(sched, out)
        setattr(mro, FEEDBACK_ATTR, self.rows.numpy().copy())  # as the worker patch attaches it
        return mro


class RowsWorker:
    """Stand-in DMS worker, prefix caching included: learns slots from the SchedulerOutput and
    after each step reports (n_done, pages_max, 0, tag) for every scheduled request and for the
    snapshots it was ordered to pack (a cache slot holding the first L tokens of a request).
    Subclasses check more through the hooks ``learn``, ``pack`` and ``report``."""

    token = 1  # the sampled token every request gets

    def __init__(self, mgr, live_fn):
        from vllm_dms.engine.channel import COLS, INVALID
        self.mgr, self.S1, self.H = mgr, mgr.layout.num_slots, mgr.layout.num_kv_heads
        self.P, self.live = mgr.layout.block_size, live_fn
        self.rows = torch.zeros(self.S1, COLS, dtype=torch.int32)
        self.rows[:, 0] = INVALID
        self.slot: dict[str, tuple[int, int]] = {}  # rid -> (slot, owner tag of its block id)
        self.by_slot: dict[int, str] = {}  # slot -> rid, as of this step

    def pages(self, n: int) -> int:
        return self.H * cdiv(self.live(None, 0, 0, n), self.P)

    def learn(self, out, orders) -> None:
        c = out.scheduled_cached_reqs
        new = [(r.req_id, r.block_ids) for r in out.scheduled_new_reqs]
        new += [(rid, c.new_block_ids[i]) for i, rid in enumerate(c.req_ids)
                if rid in c.resumed_req_ids]
        for rid in out.finished_req_ids | out.preempted_req_ids:
            self.slot.pop(rid, None)
        for rid, ids in new:
            self.slot[rid] = (ids[0][0] % self.S1, ids[0][0] // self.S1)
        self.by_slot = {s: rid for rid, (s, _) in self.slot.items()}

    def pack(self, out, order) -> bool:
        """Whether this snapshot order is packed: its request ran a chunk this step."""
        return self.by_slot.get(order[0]) in out.num_scheduled_tokens

    def report(self, sched, rid: str, slot: int, n: int, tag: int) -> None:
        self.rows[slot] = torch.tensor([n, self.pages(n), 0, tag], dtype=torch.int32)

    def step(self, sched, out):
        from vllm_dms.engine.channel import FEEDBACK_ATTR, ORDERS_ATTR
        orders = getattr(out, ORDERS_ATTR)
        self.learn(out, orders)
        for order in orders.snapshots:
            if self.pack(out, order):
                _, length, cache_slot, tag = order
                self.report(sched, None, cache_slot, length, tag)
        for rid in out.num_scheduled_tokens:
            slot, tag = self.slot[rid]
            self.report(sched, rid, slot, sched.requests[rid].num_computed_tokens, tag)
        mro = runner_output(sched, out, token=self.token)
        setattr(mro, FEEDBACK_ATTR, self.rows.numpy().copy())  # as the worker patch attaches it
        return mro


def drive(sched, step_fn, max_steps: int, on_step=None) -> int:
    for step in range(max_steps):
        if not sched.has_requests():
            return step
        out = sched.schedule()
        outputs = sched.update_from_output(out, step_fn(sched, out))
        if on_step is not None:
            on_step(step, out, outputs)
    raise AssertionError(f"not done after {max_steps} steps")


# ---------------------------------------------------------------------------- DMS fixtures
@pytest.fixture(scope="module")
def dms():
    from vllm_dms.engine import scheduler, spec
    spec.register_spec()
    yield spec, scheduler


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return model_dir(tmp_path_factory.mktemp("models"))


def dms_spec(spec_mod, *, heads=8, head_dim=64, block_size=16, window=256, max_num_seqs=128):
    return spec_mod.DMSCompactSpec(block_size=block_size, num_kv_heads=heads, head_size=head_dim,
                                   dtype=torch.uint8, dms_window=window,
                                   dms_max_num_seqs=max_num_seqs)


# ---------------------------------------------------------------------------- 1. admission
def test_admission_5x_dense_at_equal_bytes(dms, llama_dir):
    spec_mod, sched_mod = dms
    from vllm.v1.core.kv_cache_utils import get_kv_cache_configs
    L, prompt, out_len, nreq = 16, 8192, 128, 100
    max_len = prompt + out_len
    vc = make_vllm_config(llama_dir, max_num_seqs=128, max_num_batched_tokens=8192,
                          max_model_len=max_len)
    dense = FullAttentionSpec(block_size=16, num_kv_heads=8, head_size=64, dtype=torch.bfloat16)
    budget = (8 * cdiv(prompt, 16) + 1) * dense.page_size_bytes * L  # 8 dense 8K requests + null
    specs = dict.fromkeys(layer_names(L))
    dense_blocks = get_kv_cache_configs(vc, [{k: dense for k in specs}], [budget])[0].num_blocks
    assert dense_blocks - 1 == 8 * cdiv(prompt, 16)
    dspec = dms_spec(spec_mod)
    dms_blocks = get_kv_cache_configs(vc, [{k: dspec for k in specs}], [budget])[0].num_blocks
    assert dms_blocks == budget // (dspec.page_size_bytes * L)

    sched = make_scheduler(sched_mod.DMSScheduler, vc, dspec, L, dms_blocks)
    mgr = sched.kv_cache_manager
    assert isinstance(mgr, sched_mod.DMSKVCacheManager)
    worker = SimWorker(mgr, dms_live_8x(dspec.dms_window))
    for i in range(nreq):
        sched.add_request(make_request(f"q{i}", prompt, out_len))
    peak = {"running": 0, "preempted": 0, "finished": 0}

    def on_step(step, out, outputs):
        assert 0.0 <= mgr.usage <= 1.0
        peak["running"] = max(peak["running"], len(sched.running))
        peak["preempted"] += len(out.preempted_req_ids)
        peak["finished"] += sum(o.finish_reason is not None for e in outputs.values()
                                for o in e.outputs)
    steps = drive(sched, worker.step, 5000, on_step)
    assert peak["finished"] == nreq
    assert mgr.num_held == 0 and mgr.block_pool.get_num_free_blocks() == mgr.num_usable

    dense_sched = make_scheduler(Scheduler, make_vllm_config(
        llama_dir, max_num_seqs=128, max_num_batched_tokens=8192, max_model_len=max_len),
        dense, L, dense_blocks)
    for i in range(nreq):
        dense_sched.add_request(make_request(f"q{i}", prompt, out_len))
    dense_peak = {"running": 0}
    drive(dense_sched, runner_output, 20000,
          lambda s, o, e: dense_peak.__setitem__(
              "running", max(dense_peak["running"], len(dense_sched.running))))
    print(f"\n[test1] budget {budget} B: dense bf16 {dense_blocks} blocks, DMS fp8 {dms_blocks} "
          f"blocks ({mgr.layout.first_data_block} state); max running DMS={peak['running']} "
          f"dense={dense_peak['running']}; DMS steps={steps}, preemptions={peak['preempted']}")
    assert dense_peak["running"] <= 8
    assert peak["running"] >= 5 * 8


# ---------------------------------------------------------------------------- 2. never fits
def test_arena_that_cannot_hold_max_model_len_is_refused_at_startup(dms, llama_dir):
    """So no request can never fit after startup (tests/test_validation.py: per-request refusals,
    FINISHED_ERROR while the others are served)."""
    spec_mod, sched_mod = dms
    from vllm_dms.engine.config import DMSConfigError
    vc = make_vllm_config(llama_dir, max_num_seqs=8, max_num_batched_tokens=512,
                          max_model_len=4096)
    dspec = dms_spec(spec_mod, max_num_seqs=8)
    with pytest.raises(DMSConfigError) as err:
        make_scheduler(sched_mod.DMSScheduler, vc, dspec, 16, 110)
    msg = str(err.value)
    print(f"\n[test2] {msg}")
    for part in ("--max-model-len 4096", f"{cdiv(4096, 16)} blocks of 16 tokens",
                 "--gpu-memory-utilization", "--max-num-seqs"):
        assert part in msg, (part, msg)


# ---------------------------------------------------------------------------- 4. parity
def test_parity_with_stock_scheduler_on_dense_spec(dms, tmp_path):
    _, sched_mod = dms
    trace_path = FIXTURES / "sched_parity_trace.json"
    trace = json.loads(trace_path.read_text())
    model = model_dir(tmp_path)
    # Stock vLLM in a fresh interpreter: no vllm_dms imported, no plugins loaded.
    env = dict(os.environ, VLLM_PLUGINS="")
    proc = subprocess.run([sys.executable, __file__, str(trace_path), model], env=env,
                          capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stock = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stock["vllm_dms_loaded"] is False
    ours = run_trace(parity_scheduler(sched_mod.DMSScheduler, trace, model), trace)
    plain = run_trace(parity_scheduler(Scheduler, trace, model), trace)
    assert any(s["preempted"] for s in stock["steps"]), "trace must exercise preemption"
    assert any(n[2] > 0 for s in stock["steps"] for n in s["new"]), "and prefix-cache hits"
    assert ours == stock["steps"]
    assert plain == stock["steps"]
    print(f"\n[test4] {len(ours)} identical steps, "
          f"{sum(len(s['preempted']) for s in ours)} preemptions")


def test_dense_config_keeps_stock_manager(dms, llama_dir):
    _, sched_mod = dms
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    vc = make_vllm_config(llama_dir, max_num_seqs=4, max_num_batched_tokens=256,
                          max_model_len=256)
    spec = FullAttentionSpec(block_size=16, num_kv_heads=8, head_size=64, dtype=torch.bfloat16)
    s = make_scheduler(sched_mod.DMSScheduler, vc, spec, 2, 64)
    assert type(s.kv_cache_manager) is KVCacheManager and s.dms is None
    assert s.dms_stats() == {}


def test_stock_scheduler_refuses_dms_spec(dms, llama_dir):
    spec_mod, _ = dms
    vc = make_vllm_config(llama_dir, max_num_seqs=4, max_num_batched_tokens=256,
                          max_model_len=256)
    s = make_scheduler(Scheduler, vc, dms_spec(spec_mod, max_num_seqs=4), 2, 200)
    s.add_request(make_request("a", 10, 2))
    with pytest.raises(RuntimeError, match="DMSScheduler"):
        s.schedule()


if __name__ == "__main__":
    # Stock side of the parity test: python test_scheduler.py TRACE MODEL_DIR
    _trace = json.loads(Path(sys.argv[1]).read_text())
    _steps = run_trace(parity_scheduler(Scheduler, _trace, sys.argv[2]), _trace)
    print(json.dumps({"steps": _steps, "vllm_dms_loaded": "vllm_dms" in sys.modules}))
