"""C.4 rows 1-5, 7, 8: the startup validation matrix through EngineArgs.create_engine_config.

Every refusal must name the offending field or flag AND the supported alternative. All
scenarios run in two interpreters started in parallel (plugin loaded / plugin excluded), in
the order listed, so dense-after-DMS and DMS-after-dense configs are compared too (row 5).
"""
import json
import os
import shutil

import pytest

from engine_runner import collect, start

FIX = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures")
NV, FAST, PLAIN = (os.path.join(FIX, n) for n in
                   ("ckpt_nvidia_qwen3", "ckpt_fastdms_llama", "ckpt_plain_qwen3"))
DMS = dict(kv_cache_dtype="dms_fp8")
ALT_DTYPE = "use another --kv-cache-dtype"  # the generic alternative for a rejected flag


def _copy(tmp, src, name, config=None, meta_drop=None):
    d = tmp / name
    shutil.copytree(src, d)
    if config:
        c = json.loads((d / "config.json").read_text())
        c.update(config)
        (d / "config.json").write_text(json.dumps(c))
    if meta_drop:
        m = json.loads((d / "dms_metadata.json").read_text())
        for k in meta_drop:
            m.get("config", m).pop(k)
        (d / "dms_metadata.json").write_text(json.dumps(m))
    return str(d)


def scenarios(tmp):
    no_window = _copy(tmp, FAST, "no_window", meta_drop=["window_size"])
    no_offset = _copy(tmp, FAST, "no_offset", meta_drop=["alpha_offset"])
    no_evict = _copy(tmp, NV, "disable_eviction", config={"dms_disable_eviction": True})
    fp16 = _copy(tmp, NV, "fp16", config={"torch_dtype": "float16"})
    kv_scheme = _copy(tmp, NV, "kv_scheme", config={"quantization_config": {
        "quant_method": "compressed-tensors", "kv_cache_scheme": {
            "type": "float", "num_bits": 8, "strategy": "tensor", "dynamic": False}}})
    f = lambda n: os.path.join(FIX, n)  # noqa: E731
    s = [
        # row 4 / 5: dense first, then DMS, then dense again, then DMS again
        ("plain_auto", dict(model=PLAIN), "kv_blocks"),
        ("plain_fp8", dict(model=PLAIN, kv_cache_dtype="fp8"), "kv_blocks"),
        ("dms_a", dict(model=NV, **DMS), None),
        ("plain_auto_after_dms", dict(model=PLAIN), "kv_blocks"),
        ("dms_b", dict(model=NV, **DMS), None),
        # row 1
        ("r1_no_fields", dict(model=PLAIN, **DMS), None),
        ("r1_partial", dict(model=f("ckpt_partial"), **DMS), None),
        ("r1_fastdms_no_window", dict(model=no_window, **DMS), None),
        ("r1_fastdms_no_offset", dict(model=no_offset, **DMS), None),
        # row 2
        ("r2_separate_alpha", dict(model=f("ckpt_separate_alpha"), **DMS), None),
        ("r2_alpha_per_layer", dict(model=f("ckpt_alpha_per_layer"), **DMS), None),
        ("r2_arch", dict(model=f("ckpt_unsupported_arch"), **DMS), None),
        ("r2_disable_eviction", dict(model=no_evict, **DMS), None),
        ("r2_head_dim_40", dict(model=NV, hf_overrides={"head_dim": 40}, **DMS), None),
        ("r2_head_dim_8", dict(model=NV, hf_overrides={"head_dim": 8}, **DMS), None),
        ("r2_gqa_32", dict(model=NV, hf_overrides={"num_attention_heads": 64,
                                                   "num_key_value_heads": 2}, **DMS), None),
        ("r2_sliding", dict(model=NV, hf_overrides={"sliding_window": 128,
                                                    "use_sliding_window": True}, **DMS), None),
        ("r2_head_dim_72", dict(model=NV, hf_overrides={"head_dim": 72}, **DMS), None),
        ("r2_kv_cache_scheme", dict(model=kv_scheme, **DMS), None),
        ("r2_fp16_checkpoint", dict(model=fp16, **DMS), None),
        ("r2_fp16_checkpoint_as_bf16", dict(model=fp16, dtype="bfloat16", **DMS), None),
        ("r2_dtype_fp16", dict(model=NV, dtype="float16", **DMS), None),
        # row 3: DMS checkpoints without dms_fp8
        ("r3_auto", dict(model=NV), "dms_config"),
        ("r3_fp8", dict(model=FAST, kv_cache_dtype="fp8"), "dms_config"),
        ("r3_disable_eviction_auto", dict(model=no_evict), "dms_config"),
        ("r3_partial_auto", dict(model=f("ckpt_partial")), "dms_config"),
        ("r3_separate_alpha_auto", dict(model=f("ckpt_separate_alpha")), "dms_config"),
        ("r3_arch_auto", dict(model=f("ckpt_unsupported_arch")), None),
        # row 8
        ("r8_small_budget", dict(model=NV, max_num_batched_tokens=512, max_model_len=1024,
                                 enable_chunked_prefill=False, **DMS), None),
        ("r8_budget_no_len", dict(model=NV, max_num_batched_tokens=512,
                                  enable_chunked_prefill=False, **DMS), None),
        ("r8_budget_ok", dict(model=NV, max_num_batched_tokens=1024, max_model_len=1024,
                              **DMS), None),
    ]
    s += [(f"r7_{name}", dict(model=NV, **kw, **DMS), None) for name, (_, kw) in FLAGS.items()]
    s += [("r7_async_ok", dict(model=NV, async_scheduling=True, **DMS), None),
          ("r7_chunked_ok", dict(model=NV, enable_chunked_prefill=True,
                                 max_num_batched_tokens=256, **DMS), None),
          ("r7_prefix_ok", dict(model=NV, enable_prefix_caching=True, **DMS), None),
          ("r7_tp_ok", dict(model=NV, tensor_parallel_size=2, **DMS), None),
          ("r7_tp_3", dict(model=NV, tensor_parallel_size=3, **DMS), None)]
    return [dict(name=n, kwargs=kw, probe=p) for n, kw, p in s]


# row 7: name -> (flag the message must start with, EngineArgs kwargs)
FLAGS = {
    "pp": ("--pipeline-parallel-size", dict(pipeline_parallel_size=2)),
    "dp": ("--data-parallel-size", dict(data_parallel_size=2)),
    "dcp": ("--decode-context-parallel-size", dict(decode_context_parallel_size=2)),
    "pcp": ("--prefill-context-parallel-size", dict(prefill_context_parallel_size=2)),
    "spec_config": ("--speculative-config", dict(speculative_config={
        "method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3})),
    "spec_method": ("--spec-method", dict(spec_method="ngram")),
    "spec_model": ("--spec-model", dict(spec_model="some/draft")),
    "spec_tokens": ("--spec-tokens", dict(spec_tokens=3)),
    "kv_offload": ("--kv-offloading-size", dict(kv_offloading_size=4.0)),
    "skip_layers": ("--kv-cache-dtype-skip-layers", dict(kv_cache_dtype_skip_layers=["0"])),
    "backend": ("--attention-backend", dict(attention_backend="FLASH_ATTN")),
    "backend_cfg": ("--attention-config.backend", dict(attention_config={
        "backend": "FLASH_ATTN"})),
    "scheduler": ("--scheduler-cls", dict(scheduler_cls="my.Scheduler")),
    "sleep": ("--enable-sleep-mode", dict(enable_sleep_mode=True)),
    "lora": ("--enable-lora", dict(enable_lora=True)),
    "calc_kv_scales": ("--calculate-kv-scales", dict(calculate_kv_scales=True)),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    sc = scenarios(tmp_path_factory.mktemp("ckpts"))
    stock = [s for s in sc if s["name"].startswith("plain") or s["name"] == "r3_auto"]
    p, s = start(sc, plugins=True), start(stock, plugins=False)
    return collect(p), collect(s)


def refused(res, *needles):
    assert res.get("error") == "DMSConfigError", res
    for n in needles:
        assert n in res["msg"], (n, res["msg"])
    return res["msg"]


# ------------------------------------------------------------------------------- row 1
def test_r1_no_dms_fields_lists_what_was_looked_for(runs):
    refused(runs[0]["r1_no_fields"], "dms_window_size", "dms_alpha_scale",
            "dms_initial_alpha_offset", "dms_cr", "dms_metadata.json", "window_size",
            "alpha_offset", "--kv-cache-dtype auto")


def test_r1_partial_fields_names_missing_and_required(runs):
    refused(runs[0]["r1_partial"], "missing ['dms_initial_alpha_offset', 'dms_cr']",
            "all of ['dms_window_size', 'dms_alpha_scale', 'dms_initial_alpha_offset', "
            "'dms_cr'] are required")


@pytest.mark.parametrize("name, field", [("r1_fastdms_no_window", "window_size"),
                                         ("r1_fastdms_no_offset", "alpha_offset")])
def test_r1_fastdms_missing_key_is_never_defaulted(runs, name, field):
    # FastDMS itself would fill window 256 / offset 5; we refuse and list accepted aliases
    refused(runs[0][name], f"missing {field}", "also accepted", "dms_metadata.json")


# ------------------------------------------------------------------------------- row 2
@pytest.mark.parametrize("name, needles", [
    ("r2_separate_alpha", ["dms_separate_alpha: true", "dms_separate_alpha: false"]),
    ("r2_alpha_per_layer", ["dms_alpha_per: 'layer'", 'dms_alpha_per: "head"']),
    ("r2_arch", ["architectures=['Phi3ForCausalLM']", "supported:", "LlamaForCausalLM",
                 "Qwen3ForCausalLM"]),
    ("r2_disable_eviction", ["dms_disable_eviction: true", "--kv-cache-dtype auto"]),
    ("r2_head_dim_40", ["head_dim=40", "multiple of 16", "--kv-cache-dtype auto"]),
    ("r2_head_dim_8", ["head_dim=8", "16..256"]),
    ("r2_gqa_32", ["GQA group 32", "num_attention_heads", "num_key_value_heads", "<= 16"]),
    ("r2_sliding", ["sliding_window", "use_sliding_window"]),
    ("r2_head_dim_72", ["head_dim=72", "multiple of 16", "--kv-cache-dtype auto"]),
    ("r2_kv_cache_scheme", ["quantization_config.kv_cache_scheme", "KV-cache scales",
                            "another --kv-cache-dtype"]),
    ("r2_fp16_checkpoint", ["--dtype", "torch_dtype float16", "pass --dtype bfloat16"]),
    ("r2_dtype_fp16", ["--dtype float16", "pass --dtype bfloat16"]),
])
def test_r2_unsupported_variant_names_field_and_alternative(runs, name, needles):
    refused(runs[0][name], *needles)


def test_r2_dtype_refusals_name_the_flag_first(runs):
    for name in ("r2_fp16_checkpoint", "r2_dtype_fp16"):
        assert runs[0][name]["msg"].startswith("--dtype"), runs[0][name]


def test_r2_fp16_checkpoint_served_as_bf16_is_accepted(runs):
    res = runs[0]["r2_fp16_checkpoint_as_bf16"]
    assert "ok" in res and res["ok"]["dtype"] == "dms_fp8", res


# ------------------------------------------------------------------------------- row 3
@pytest.mark.parametrize("name, arch", [("r3_auto", "DMSQwen3ForCausalLM"),
                                        ("r3_fp8", "DMSLlamaForCausalLM"),
                                        ("r3_disable_eviction_auto", "DMSQwen3ForCausalLM")])
def test_r3_dms_checkpoint_without_dms_fp8_runs_no_evict_model(runs, name, arch):
    res = runs[0][name]
    assert res["ok"]["archs"] == [arch], res
    assert res["ok"]["sched_cls"] != "vllm_dms.engine.scheduler.DMSScheduler"
    # what the DMS model's __init__ does first must succeed (no late failure in the worker)
    assert res.get("probe", {}).get("compact") is False, res
    assert any("no-evict" in ln for ln in res["logs"]), res["logs"]


@pytest.mark.parametrize("name, needles", [
    ("r3_partial_auto", ["missing ['dms_initial_alpha_offset', 'dms_cr']", "no-evict",
                         "remove its dms_* fields"]),
    ("r3_separate_alpha_auto", ["dms_separate_alpha: true", "no-evict"]),
    ("r3_arch_auto", ["Phi3ForCausalLM", "decision lane", "remove its dms_* fields"]),
])
def test_r3_broken_dms_checkpoint_without_dms_fp8_fails_at_config_time(runs, name, needles):
    # Never served as a plain model (decision lane live), never a late failure in the worker.
    refused(runs[0][name], *needles)


# ------------------------------------------------------------------------- rows 4 and 5
@pytest.mark.parametrize("name", ["plain_auto", "plain_fp8", "plain_auto_after_dms"])
def test_r4_r5_dense_config_and_block_count_identical_to_stock(runs, name):
    plugin, stock = runs
    ref = stock[name.replace("_after_dms", "")]
    assert plugin[name]["ok"] == ref["ok"]
    assert plugin[name]["probe"] == ref["probe"]  # same KV groups and num_blocks
    assert plugin[name]["logs"] == []


def test_r5_dms_config_after_dense_is_unchanged(runs):
    a, b = runs[0]["dms_a"]["ok"], runs[0]["dms_b"]["ok"]
    assert a == b and a["dtype"] == "dms_fp8"


# ------------------------------------------------------------------------------- row 7
@pytest.mark.parametrize("name", sorted(FLAGS))
def test_r7_each_unsupported_flag_rejected_with_alternative(runs, name):
    flag = FLAGS[name][0]
    msg = refused(runs[0][f"r7_{name}"], "dms_fp8", f"remove {flag} or {ALT_DTYPE}")
    assert msg.startswith(flag), msg


def test_r7_tensor_parallelism_must_divide_the_kv_heads(runs):
    assert "ok" in runs[0]["r7_tp_ok"], runs[0]["r7_tp_ok"]  # 2 KV heads: one per rank
    msg = refused(runs[0]["r7_tp_3"], "dms_fp8", "num_key_value_heads=2", "use one of [1, 2]")
    assert msg.startswith("--tensor-parallel-size 3"), msg


def test_r7_explicit_async_scheduling_accepted(runs):
    assert "ok" in runs[0]["r7_async_ok"], runs[0]["r7_async_ok"]  # opt-in: DMSAsyncScheduler


def test_r7_explicit_prefix_caching_accepted(runs):
    res = runs[0]["r7_prefix_ok"]  # on by default; asking for it explicitly is fine too
    assert "ok" in res, res


def test_r7_explicit_chunked_prefill_accepted(runs):
    res = runs[0]["r7_chunked_ok"]  # budget below max_len is fine with chunked prefill
    assert "ok" in res and res["ok"]["mnbt"] == 256, res


# ------------------------------------------------------------------------------- row 8
def test_r8_budget_below_max_model_len_rejected_without_chunked_prefill(runs):
    refused(runs[0]["r8_small_budget"], "--max-num-batched-tokens", "512", "max_model_len=1024",
            "prompt must fit one step", "remove --max-num-batched-tokens")
    res = runs[0]["r8_budget_no_len"]  # max_model_len only known inside vLLM: its own check
    assert "max_num_batched_tokens (512)" in res["msg"] and "max_model_len" in res["msg"], res
    assert runs[0]["r8_budget_ok"]["ok"]["mnbt"] == 1024
