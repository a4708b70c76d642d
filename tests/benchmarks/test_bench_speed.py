"""benchmarks/bench_speed.py's driver side on synthetic worker rows: repeats run interleaved,
rows report the median and spread, ratios only where BF16/FP8 ran, and the JSON and table are
written for any subset of engines (no GPU: the worker processes are replaced)."""
import json
import os
import sys
from types import SimpleNamespace

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import bench_speed  # noqa: E402
from speed_rows import row  # noqa: E402


def test_aggregate_reports_median_runs_and_spread():
    runs = [row("dms_fp8", 8, d, p, t1_s=t) for d, p, t in
            ((100.0, 900.0, 1.0), (130.0, 700.0, 2.0), (120.0, 800.0, 3.0))]
    runs[0]["decode_profile"] = {"step_wall_us": 5.0}
    (r,) = bench_speed.aggregate(runs)
    assert (r["decode_tok_s"], r["prefill_tok_s"]) == (120.0, 800.0), "medians, existing names"
    assert r["decode_tok_s_runs"] == [100.0, 130.0, 120.0]
    assert r["prefill_tok_s_runs"] == [900.0, 700.0, 800.0]
    assert r["decode_tok_s_spread"] == [100.0, 130.0]
    assert r["prefill_tok_s_spread"] == [700.0, 900.0]
    assert r["t1_s"] == 3.0, "other fields: the run nearest the median decode"
    assert r["decode_profile"] == {"step_wall_us": 5.0}, "the one profiled run's"
    assert (r["runs"], r["failed_runs"]) == (3, 0)


def test_aggregate_keeps_order_failures_and_one_row_per_engine_and_c():
    runs = [row("a", 1, 1.0, 1.0), row("a", 8, 2.0, 2.0), dict(engine="b", error="x"),
            row("a", 1, 3.0, 3.0), row("a", 8, 4.0, 4.0), dict(engine="b", error="y"),
            dict(engine="a", error="z")]
    rows = bench_speed.aggregate(runs)
    assert [(r["engine"], r.get("c")) for r in rows] == [("a", 1), ("a", 8), ("b", None)]
    assert rows[0]["decode_tok_s"] == 2.0 and rows[0]["failed_runs"] == 1
    assert rows[2] == dict(engine="b", error="y", failed_runs=2)


def test_ratios_only_against_engines_that_ran():
    rows = [row("vllm-bf16", 8, 100.0, 1000.0), row("dms_fp8", 8, 150.0, 900.0),
            row("dms_fp8", 1, 15.0, 90.0)]
    bench_speed.add_ratios(rows)
    assert rows[1]["decode_x_bf16"] == pytest.approx(1.5)
    assert rows[1]["prefill_x_bf16"] == pytest.approx(0.9)
    assert "decode_x_fp8" not in rows[1], "no FP8 engine ran"
    assert "decode_x_bf16" not in rows[2], "no BF16 row at c=1"


def _args(tmp_path, engines, repeats=3):
    return SimpleNamespace(model="/ckpt", name="m", ctx=8192, gen=128, conc=[1, 8],
                           engines=engines, out_dir=str(tmp_path), timeout=1, profile_c=8,
                           repeats=repeats)


@pytest.fixture
def fake_engines(monkeypatch):
    calls = []

    def run_engine(a, eng, profile):
        calls.append((eng, profile))
        k = len(calls)
        return [row(eng, c, 10.0 * c + k, 100.0 * c + k) for c in a.conc]
    monkeypatch.setattr(bench_speed, "run_engine", run_engine)
    monkeypatch.setattr(bench_speed, "_device", lambda: "H200")
    monkeypatch.setattr(bench_speed, "_vllm", lambda: "0.26.0")
    return calls


def _saved(tmp_path):
    (path,) = [p for p in os.listdir(tmp_path) if p.endswith(".json")]
    return json.load(open(tmp_path / path)), open(tmp_path / path.replace(".json", ".md")).read()


def test_driver_interleaves_engines_and_profiles_only_the_first_round(tmp_path, fake_engines):
    bench_speed.driver(_args(tmp_path, ["vllm-bf16", "dms_fp8"]))
    assert fake_engines == [("vllm-bf16", True), ("dms_fp8", True), ("vllm-bf16", False),
                            ("dms_fp8", False), ("vllm-bf16", False), ("dms_fp8", False)]
    rows, md = _saved(tmp_path)
    dms8 = next(r for r in rows if r["engine"] == "dms_fp8" and r["c"] == 8)
    assert dms8["decode_tok_s_runs"] == [82.0, 84.0, 86.0] and dms8["decode_tok_s"] == 84.0
    assert dms8["decode_x_bf16"] == pytest.approx(84.0 / 83.0) and dms8["repeats"] == 3
    assert "| dms_fp8 | 8 | 3 | 804 (802-806) | 84.0 (82.0-86.0) | 1.01 | - |" in md


def test_driver_with_dms_fp8_alone_writes_json_and_table(tmp_path, fake_engines):
    bench_speed.driver(_args(tmp_path, ["dms_fp8"], repeats=2))
    rows, md = _saved(tmp_path)
    assert [(r["engine"], r["c"], r["runs"]) for r in rows] == [("dms_fp8", 1, 2),
                                                                ("dms_fp8", 8, 2)]
    assert all("decode_x_bf16" not in r and "decode_x_fp8" not in r for r in rows)
    assert "| dms_fp8 | 1 | 2 | 102 (101-102) | 11.5 (11.0-12.0) | - | - | - |" in md


def test_repeats_flag_defaults_to_three(monkeypatch):
    seen = {}
    monkeypatch.setattr(bench_speed, "driver", lambda a: seen.update(vars(a)))
    monkeypatch.setattr(sys, "argv", ["bench_speed.py", "--model", "/ckpt"])
    bench_speed.main()
    assert seen["repeats"] == 3


def test_decode_profile_per_step_and_prefill_kernels(monkeypatch):
    """The profiled runs' arithmetic, on a stand-in for torch's CUDA profiler: per decode step =
    (33-token run - 1-token run) / 32; the 1-token run's own kernels are the prefill's."""
    import torch.profiler
    runs = {1: {"gemm": (1000.0, 10), "attn_prefill": (500.0, 16)},
            33: {"gemm": (1640.0, 42), "attn_prefill": (500.0, 16), "decode": (320.0, 512)}}

    class FakeProfile:
        def __init__(self, activities):
            self.events = None

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.events = runs[FakeProfile.gen]

        def key_averages(self):
            return [SimpleNamespace(key=k, device_time_total=t, count=n)
                    for k, (t, n) in self.events.items()]

    def run_gen(gen):
        FakeProfile.gen = gen
        return {1: 0.5, 33: 0.5 + 32 * 0.002}[gen]
    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)
    out = bench_speed.decode_profile(run_gen, dict(engine="dms_fp8", c=8))
    assert out["step_wall_us"] == pytest.approx(2000.0)
    assert out["step_gpu_busy_us"] == pytest.approx(20.0 + 10.0)  # gemm 640/32, decode 320/32
    assert out["top"][0] == ["gemm", 20.0, 1.0] and out["top"][1] == ["decode", 10.0, 16.0]
    assert out["prefill_wall_us"] == pytest.approx(5e5)
    assert out["prefill_gpu_busy_us"] == 1500.0
    assert out["prefill_top"] == [["gemm", 1000.0, 10], ["attn_prefill", 500.0, 16]]
