"""benchmarks/serve_bench.py's workloads and report (the servers themselves need a GPU)."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import serve_bench as sb  # noqa: E402


def test_mixed_workload_spans_the_stated_ranges():
    w = sb.WORKLOADS["mixed"]
    r = w["range_ratio"]
    assert round(w["input_len"] * (1 - r["input"])) == 256
    assert round(w["input_len"] * (1 + r["input"])) == 8192
    assert round(w["output_len"] * (1 - r["output"])) == 128
    assert round(w["output_len"] * (1 + r["output"])) == 2048
    assert sb.WORKLOADS["decode-heavy"]["concurrency"] == 256


def row(workload, engine, tput, **kw):
    return dict(workload=workload, engine=engine, output_throughput=tput, mean_ttft_ms=10.0,
                p99_ttft_ms=20.0, mean_tpot_ms=5.0, p99_tpot_ms=6.0, peak_requests_running=3,
                failed=0, drained=True, **kw)


def test_report_ratios_within_a_workload(tmp_path):
    rows = [row("mixed", "vllm-bf16", 100.0), row("mixed", "dms_fp8", 250.0),
            row("decode-heavy", "dms_fp8", 40.0),
            dict(workload="decode-heavy", engine="vllm-fp8", error="boom")]
    path = str(tmp_path / "serve-x-2026-12-04.json")
    json.dump(rows, open(path, "w"))
    sb.write_report(path, rows)
    md = open(path[:-5] + ".md").read().splitlines()
    assert md[2].startswith("| mixed | vllm-bf16 | 100 | 1.00 | - |")
    assert md[3].startswith("| mixed | dms_fp8 | 250 | 2.50 | - |")
    assert md[4].startswith("| decode-heavy | dms_fp8 | 40 | - | - |")  # no BF16 row there
    assert "FAILED: 'boom'" in md[5]


def test_server_args_fix_the_kv_bytes_when_asked():
    import argparse
    a = argparse.Namespace(gpu_util=0.12, kv_bytes=0, prefix_len=0, max_num_seqs=256,
                           prefix_caching=None, **sb.WORKLOADS["mixed"])
    a.range_ratio = sb.WORKLOADS["mixed"]["range_ratio"]
    args = sb.server_args("dms_fp8", a, synthetic=True)
    assert args[:2] == ["--kv-cache-dtype", "dms_fp8"] and "--kv-cache-memory-bytes" not in args
    assert args[args.index("--max-model-len") + 1] == str(8192 + 1 + 2048 + 1 + 64)
    assert args[-2:] == ["--load-format", "dummy"]
    a.kv_bytes = 8 << 30
    args = sb.server_args("vllm-bf16", a, synthetic=False)
    assert args[1] == "auto" and args[args.index("--kv-cache-memory-bytes") + 1] == str(8 << 30)
