"""The startup validator (EngineArgs.create_engine_config wrapper) on vLLM's CPU platform.

All scenarios run in two fresh interpreters started in parallel: one with the plugin loaded
through its entry point, one with VLLM_PLUGINS excluding it (stock vLLM, for the "untouched"
comparison). Each scenario builds a real VllmConfig from a local fixture checkpoint.

Minimal test-only patches, both inside the subprocess:
* vLLM's CPU platform is set in-process (this machine's CUDA wheel resolves no platform).
* DMSLlama/DMSQwen3ForCausalLM are pointed at vLLM's stock Llama/Qwen3 classes: ModelConfig
  inspects the routed class (in a registry subprocess); the real DMS model modules belong to
  the models work and are not what this test checks (config plumbing only).
"""
import json
import os
import subprocess
import sys

import pytest

FIX = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures")
RESULT = "DMS_TEST_RESULT="
NV, FAST, PLAIN = (os.path.join(FIX, n) for n in
                   ("ckpt_nvidia_qwen3", "ckpt_fastdms_llama", "ckpt_plain_qwen3"))
DMS = dict(kv_cache_dtype="dms_fp8")

# name -> EngineArgs kwargs (skip_tokenizer_init=True is added to all).
SCENARIOS = {
    "plain_auto": dict(model=PLAIN),
    "plain_fp8": dict(model=PLAIN, kv_cache_dtype="fp8"),
    "nvidia": dict(model=NV, **DMS),
    "fastdms": dict(model=FAST, **DMS),
    "long_ctx": dict(model=NV, hf_overrides={"max_position_embeddings": 32768},
                     enable_chunked_prefill=False, **DMS),
    "explicit_off": dict(model=NV, enable_prefix_caching=False, enable_chunked_prefill=False,
                         async_scheduling=False, attention_backend="CUSTOM",
                         max_num_batched_tokens=4096, **DMS),
    "prefix_caching": dict(model=NV, enable_prefix_caching=True, **DMS),
    "chunked_prefill": dict(model=NV, enable_chunked_prefill=True, max_num_batched_tokens=512,
                            **DMS),
    "async": dict(model=NV, async_scheduling=True, **DMS),
    "tp2": dict(model=NV, tensor_parallel_size=2, **DMS),  # served: one KV head per rank
    "tp3": dict(model=NV, tensor_parallel_size=3, **DMS),  # 3 does not divide 2 KV heads
    "pp2": dict(model=NV, pipeline_parallel_size=2, **DMS),
    "ray": dict(model=NV, distributed_executor_backend="ray", **DMS),
    "mp": dict(model=NV, distributed_executor_backend="mp", **DMS),
    "dp2": dict(model=NV, data_parallel_size=2, **DMS),
    "spec": dict(model=NV, speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                               "prompt_lookup_max": 3}, **DMS),
    "spec_method": dict(model=NV, spec_method="ngram", **DMS),
    "other_backend": dict(model=NV, attention_backend="FLASH_ATTN", **DMS),
    "skip_layers": dict(model=NV, kv_cache_dtype_skip_layers=["0"], **DMS),
    "offload": dict(model=NV, kv_offloading_size=1.0, **DMS),
    "scheduler_cls": dict(model=NV, scheduler_cls="my.Scheduler", **DMS),
    "small_budget": dict(model=NV, max_num_batched_tokens=512, max_model_len=1024,
                         enable_chunked_prefill=False, **DMS),
    "small_budget_chunked": dict(model=NV, max_num_batched_tokens=512, max_model_len=1024,
                                 **DMS),
    "budget_no_len": dict(model=NV, max_num_batched_tokens=512, enable_chunked_prefill=False,
                          **DMS),
    "budget_no_len_chunked": dict(model=NV, max_num_batched_tokens=512, **DMS),
    "fp16": dict(model=NV, dtype="float16", **DMS),
    "lora": dict(model=NV, enable_lora=True, **DMS),
    "calc_scales": dict(model=NV, calculate_kv_scales=True, **DMS),
    "plain_lora": dict(model=PLAIN, enable_lora=True, dtype="float16"),
    "no_dms_fields": dict(model=PLAIN, **DMS),
    "separate_alpha": dict(model=os.path.join(FIX, "ckpt_separate_alpha"), **DMS),
    # Set after EngineArgs() (offline, __post_init__ would fail resolving an uncached hub id).
    "hub_id": dict(model=NV, model_after="Qwen/Qwen3-0.6B", **DMS),
    "dms_ckpt_auto": dict(model=NV),
}

RUNNER = """
import json, logging, sys
import vllm.platforms as p
from vllm.platforms.cpu import CpuPlatform
p._current_platform = CpuPlatform()
import vllm.plugins
vllm.plugins.load_general_plugins()
from vllm import ModelRegistry
if "vllm_dms" in sys.modules:
    ModelRegistry.register_model("DMSQwen3ForCausalLM", "vllm.model_executor.models.qwen3:Qwen3ForCausalLM")
    ModelRegistry.register_model("DMSLlamaForCausalLM", "vllm.model_executor.models.llama:LlamaForCausalLM")
from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
from vllm.config.kv_transfer import KVTransferConfig

class Grab(logging.Handler):
    records = []
    def emit(self, record):
        Grab.records.append(record.getMessage())
logging.getLogger("vllm.dms").addHandler(Grab())

def summary(c):
    return dict(
        cache=repr(c.cache_config), sched=repr(c.scheduler_config), attn=repr(c.attention_config),
        archs=c.model_config.architectures, hf_archs=c.model_config.hf_config.architectures,
        hf_overrides=repr(c.model_config.hf_overrides), max_model_len=c.model_config.max_model_len,
        parallel=repr(c.parallel_config.world_size), hash=c.compute_hash(),
        backend=str(c.attention_config.backend), prefix=c.cache_config.enable_prefix_caching,
        chunked=c.scheduler_config.enable_chunked_prefill,
        async_=c.scheduler_config.async_scheduling, sched_cls=c.scheduler_config.scheduler_cls,
        mnbt=c.scheduler_config.max_num_batched_tokens, dtype=c.cache_config.cache_dtype,
        v2_model=c._is_default_v2_model_runner_model(),
        v2_unsupported=c._get_v2_model_runner_unsupported_features())

def attempt(make):
    Grab.records.clear()
    try:
        res = {"ok": summary(make().create_engine_config())}
    except Exception as e:  # the test reports what was raised
        res = {"error": type(e).__name__, "msg": str(e)}
    res["logs"] = list(Grab.records)
    return res

def build(kw):
    kw = dict(kw)
    after = kw.pop("model_after", None)
    args = EngineArgs(skip_tokenizer_init=True, **kw)
    if after:
        args.model = after
    return args

scenarios, with_cli = json.loads(sys.argv[1]), sys.argv[2] == "1"
out = {n: attempt(lambda: build(kw)) for n, kw in scenarios.items()}
out["kv_transfer"] = attempt(lambda: EngineArgs(
    model=scenarios["nvidia"]["model"], skip_tokenizer_init=True, kv_cache_dtype="dms_fp8",
    kv_transfer_config=KVTransferConfig(kv_connector="ExampleConnector", kv_role="kv_both")))
out["callable_overrides"] = attempt(lambda: EngineArgs(
    model=scenarios["nvidia"]["model"], skip_tokenizer_init=True, kv_cache_dtype="dms_fp8",
    hf_overrides=lambda cfg: cfg))
if with_cli:  # the `vllm serve` parser's defaults must read as "not requested"
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    from vllm.entrypoints.openai.cli_args import make_arg_parser
    parser = make_arg_parser(FlexibleArgumentParser())
    base = [scenarios["nvidia"]["model"], "--kv-cache-dtype", "dms_fp8", "--skip-tokenizer-init"]
    def cli(*extra):
        a = parser.parse_args(base + list(extra))
        a.model = a.model_tag
        return AsyncEngineArgs.from_cli_args(a)
    out["cli_default"] = attempt(lambda: cli())
    out["cli_prefix"] = attempt(lambda: cli("--enable-prefix-caching"))
    out["cli_no_prefix"] = attempt(lambda: cli("--no-enable-prefix-caching"))
    out["cli_tp2"] = attempt(lambda: cli("--tensor-parallel-size", "2"))
    out["cli_tp3"] = attempt(lambda: cli("--tensor-parallel-size", "3"))
    out["cli_async"] = attempt(lambda: cli("--async-scheduling"))
    out["cli_fp16"] = attempt(lambda: cli("--dtype", "float16"))
    out["cli_lora"] = attempt(lambda: cli("--enable-lora"))
    out["cli_calc_scales"] = attempt(lambda: cli("--calculate-kv-scales"))
print(%r + json.dumps(out), flush=True)
""" % RESULT


def _start(scenarios, with_cli, plugins):
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    env.update(HF_HUB_OFFLINE="1", VLLM_LOGGING_LEVEL="INFO")
    if not plugins:
        env["VLLM_PLUGINS"] = "none_but_stock"
    return subprocess.Popen([sys.executable, "-c", RUNNER, json.dumps(scenarios),
                             "1" if with_cli else "0"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _collect(proc):
    logs, _ = proc.communicate(timeout=300)
    lines = [ln for ln in logs.splitlines() if ln.startswith(RESULT)]
    assert proc.returncode == 0 and lines, logs[-4000:]
    return json.loads(lines[-1][len(RESULT):])


@pytest.fixture(scope="module")
def runs():
    stock_scen = {k: SCENARIOS[k] for k in ("plain_auto", "plain_fp8", "nvidia", "dms_ckpt_auto",
                                            "plain_lora")}
    plugin, stock = _start(SCENARIOS, True, True), _start(stock_scen, False, False)
    return _collect(plugin), _collect(stock)


def ok(res):
    assert "ok" in res, res
    return res["ok"]


def test_dms_fp8_config(runs):
    for name, arch in (("nvidia", "DMSQwen3ForCausalLM"), ("fastdms", "DMSLlamaForCausalLM")):
        c = ok(runs[0][name])
        assert c["dtype"] == "dms_fp8"
        assert c["backend"] == "AttentionBackendEnum.CUSTOM"
        assert c["prefix"] is True and c["chunked"] is True  # vLLM's defaults, as stock
        assert c["mnbt"] == ok(runs[0]["plain_auto"])["mnbt"]  # vLLM's token budget, not raised
        # async scheduling is vLLM's call (its CPU platform turns it off); the scheduler follows
        assert c["sched_cls"] == ("vllm_dms.engine.scheduler.DMSAsyncScheduler" if c["async_"]
                                  else "vllm_dms.engine.scheduler.DMSScheduler")
        assert c["archs"] == [arch] and c["hf_archs"] == [arch]


def test_dms_fp8_keeps_vllms_default_model_runner(runs):
    """vLLM 0.26 picks Model Runner V2 for dense (non-MoE) models when Triton is present (a GPU
    host): the DMS config must not turn that off, so MRv2 is what runs DMS on the H200."""
    for name in ("nvidia", "fastdms"):
        c = ok(runs[0][name])
        assert c["v2_model"] is True and c["v2_unsupported"] == [], c


def test_one_log_line_says_what_is_on(runs):
    logs = runs[0]["nvidia"]["logs"]
    assert len(logs) == 1, logs
    c = ok(runs[0]["nvidia"])
    assert f"chunked prefill on (max_num_batched_tokens={c['mnbt']})" in logs[0], logs[0]
    assert "prefix caching on" in logs[0] and "DMSQwen3ForCausalLM" in logs[0], logs[0]
    assert f"async scheduling {'on' if c['async_'] else 'off'}" in logs[0], logs[0]
    (off,) = runs[0]["explicit_off"]["logs"]
    assert "chunked prefill off, prefix caching off, async scheduling off" in off, off


def test_token_budget_raised_to_max_model_len_when_default(runs):
    c = ok(runs[0]["long_ctx"])
    assert c["max_model_len"] == 32768 and c["mnbt"] >= 32768


@pytest.mark.parametrize("name", ["prefix_caching", "cli_prefix"])
def test_explicit_prefix_caching_is_accepted(runs, name):
    c = ok(runs[0][name])  # opt-in: finished requests' rows are reused whole (prefix_cache)
    assert c["prefix"] is True and c["sched_cls"].startswith("vllm_dms.engine.scheduler.DMS")


def test_explicit_chunked_prefill_is_accepted_with_a_small_budget(runs):
    c = ok(runs[0]["chunked_prefill"])  # opt-in: the continuation-chunk kernels take over
    assert c["chunked"] is True and c["mnbt"] == 512 < c["max_model_len"]
    assert c["sched_cls"].startswith("vllm_dms.engine.scheduler.DMS") and c["prefix"] is True


def test_small_budget_is_accepted_with_chunked_prefill_by_default(runs):
    c = ok(runs[0]["small_budget_chunked"])
    assert c["chunked"] is True and c["mnbt"] == 512 and c["max_model_len"] == 1024


def test_explicitly_off_is_accepted(runs):
    c = ok(runs[0]["explicit_off"])
    assert c["prefix"] is False and c["chunked"] is False and c["mnbt"] == 4096


@pytest.mark.parametrize("name, flag", [
    ("tp3", "--tensor-parallel-size"),
    ("pp2", "--pipeline-parallel-size"),
    ("ray", "--distributed-executor-backend"),
    ("dp2", "--data-parallel-size"),
    ("spec", "--speculative-config"),
    ("spec_method", "--spec-method"),
    ("other_backend", "--attention-backend"),
    ("skip_layers", "--kv-cache-dtype-skip-layers"),
    ("offload", "--kv-offloading-size"),
    ("kv_transfer", "--kv-transfer-config"),
    ("scheduler_cls", "--scheduler-cls"),
    ("small_budget", "--max-num-batched-tokens"),
    ("cli_tp3", "--tensor-parallel-size"),
    ("fp16", "--dtype"),
    ("lora", "--enable-lora"),
    ("calc_scales", "--calculate-kv-scales"),
    ("cli_fp16", "--dtype"),
    ("cli_lora", "--enable-lora"),
    ("cli_calc_scales", "--calculate-kv-scales"),
])
def test_explicit_unsupported_flag_rejected(runs, name, flag):
    res = runs[0][name]
    assert res.get("error") == "DMSConfigError", res
    assert res["msg"].startswith(flag) and "dms_fp8" in res["msg"]


@pytest.mark.parametrize("name", ["tp2", "cli_tp2", "mp"])
def test_tensor_parallelism_and_the_mp_executor_are_accepted(runs, name):
    c = ok(runs[0][name])  # rank-local KV heads (vllm_dms.engine.tp); tests/test_cpu_executors.py
    assert c["sched_cls"].startswith("vllm_dms.engine.scheduler.DMS")


@pytest.mark.parametrize("name", ["async", "cli_async"])
def test_explicit_async_scheduling_is_accepted(runs, name):
    c = ok(runs[0][name])  # asking for it explicitly is accepted
    assert c["prefix"] is True and c["chunked"] is True
    # vLLM's CPU platform turns async off again here; the scheduler follows what vLLM resolved.
    want = "DMSAsyncScheduler" if c["async_"] else "DMSScheduler"
    assert c["sched_cls"] == f"vllm_dms.engine.scheduler.{want}"


@pytest.mark.parametrize("async_, cls", [(True, "DMSAsyncScheduler"), (False, "DMSScheduler")])
def test_finish_selects_the_scheduler_for_the_resolved_async_setting(monkeypatch, async_, cls):
    from types import SimpleNamespace as NS

    from vllm_dms.engine import validation
    from vllm_dms.patches import engine
    monkeypatch.setattr(validation, "install_frontend_check", lambda: None)
    sc = NS(enable_chunked_prefill=False, async_scheduling=async_, max_num_batched_tokens=4096,
            scheduler_cls=None)
    vc = NS(scheduler_config=sc, cache_config=NS(enable_prefix_caching=False, block_size=64),
            attention_config=NS(backend=NS(name="CUSTOM")),
            model_config=NS(max_model_len=4096, architectures=["DMSLlamaForCausalLM"],
                            dtype="torch.bfloat16"))
    engine._finish_dms(vc)
    assert sc.scheduler_cls == f"vllm_dms.engine.scheduler.{cls}"
    from vllm_dms.engine import scheduler
    assert issubclass(getattr(scheduler, cls), scheduler.DMSSchedulerMixin)


@pytest.mark.parametrize("dtype", ["torch.float16", "torch.float32"])
def test_finish_refuses_a_dtype_vllm_resolved_to_other_than_bf16(monkeypatch, dtype):
    from types import SimpleNamespace as NS

    from vllm_dms.engine.config import DMSConfigError
    from vllm_dms.patches import engine
    vc = NS(scheduler_config=NS(), cache_config=NS(), model_config=NS(dtype=dtype))
    want = r"^--dtype auto \(resolved by vLLM to float.*bfloat16 only"
    with pytest.raises(DMSConfigError, match=want):
        engine._finish_dms(vc)


@pytest.mark.parametrize("name, needles", [
    ("no_dms_fields", ["dms_window_size", "dms_alpha_scale", "dms_initial_alpha_offset",
                       "dms_cr", "dms_metadata.json"]),
    ("separate_alpha", ["dms_separate_alpha"]),
    ("hub_id", ["Qwen/Qwen3-0.6B", "local checkpoint directory"]),
])
def test_bad_checkpoint_rejected_naming_field(runs, name, needles):
    res = runs[0][name]
    assert res.get("error") == "DMSConfigError", res
    assert all(n in res["msg"] for n in needles), res["msg"]


def test_serve_cli_defaults_are_not_explicit(runs):
    for name, prefix in (("cli_default", True), ("cli_no_prefix", False)):
        c = ok(runs[0][name])
        assert c["prefix"] is prefix and c["chunked"] is True and c["async_"] is False
        assert c["backend"] == "AttentionBackendEnum.CUSTOM"


def test_callable_hf_overrides_still_routed(runs):
    assert ok(runs[0]["callable_overrides"])["hf_archs"] == ["DMSQwen3ForCausalLM"]


def test_non_dms_checkpoint_untouched(runs):
    plugin, stock = runs
    for name in ("plain_auto", "plain_fp8", "plain_lora"):  # LoRA, fp16: refused for DMS only
        assert ok(plugin[name]) == ok(stock[name])
        assert plugin[name]["logs"] == []


def test_dms_checkpoint_without_dms_fp8_routes_to_no_evict(runs):
    plugin, stock = runs
    c, s = ok(plugin["dms_ckpt_auto"]), ok(stock["dms_ckpt_auto"])
    assert s["archs"] == ["Qwen3ForCausalLM"] and c["archs"] == ["DMSQwen3ForCausalLM"]
    # Only the model class changes: cache, scheduler and backend stay stock.
    assert (c["cache"], c["sched"], c["attn"]) == (s["cache"], s["sched"], s["attn"])
    assert len(plugin["dms_ckpt_auto"]["logs"]) == 1
    assert "no-evict" in plugin["dms_ckpt_auto"]["logs"][0]


def test_stock_vllm_rejects_dms_fp8(runs):
    assert "cache_dtype" in runs[1]["nvidia"]["msg"]


# ------------------------------------------------------------------ in-process shape checks
def test_budget_below_max_model_len_without_explicit_len_rejected(runs):
    # max_model_len is only known inside vLLM here; its own SchedulerConfig check rejects it.
    res = runs[0]["budget_no_len"]
    assert "error" in res and "max_num_batched_tokens (512)" in res["msg"], res
    c = ok(runs[0]["budget_no_len_chunked"])  # chunked prefill on (the default): accepted
    assert c["chunked"] is True and c["mnbt"] == 512 < c["max_model_len"]


def test_check_refuses_other_signature(monkeypatch):
    pytest.importorskip("vllm")
    from vllm.engine.arg_utils import EngineArgs
    from vllm_dms.patches import PatchError, engine

    engine.check()  # the installed vLLM has the expected shape
    monkeypatch.setattr(EngineArgs, "create_engine_config", lambda self, usage_context: None)
    with pytest.raises(PatchError, match="create_engine_config"):
        engine.check()
